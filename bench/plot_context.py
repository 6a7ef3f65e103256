"""Memory vs context length for us and the baselines (issue 7's plot), from the max-context JSONs.

    python bench/plot_context.py --ours OUT/ours_ctx.json --unsloth OUT/unsloth_ctx.json \
        [--hf OUT/hf.json] --out bench/memory_vs_context.png

Ours: bench/max_context.py's "tries" (device footprint of the compiled step, GiB). Baselines:
bench/baselines/bench_common.py's "maxctx" tries (torch peak allocated, GiB). Failed probes are
drawn as crosses at the top of the axis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _series(path: str | None, key: str | None, mem_key: str):
    if not path or not Path(path).exists():
        return None
    data = json.loads(Path(path).read_text())
    tries = (data.get(key) or {}).get("tries", []) if key else data.get("tries", [])
    ok = [(t["seq"], t.get(mem_key)) for t in tries if t.get("ok") and t.get(mem_key) is not None]
    fail = [t["seq"] for t in tries if t.get("ok") is False]
    return sorted(ok), fail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours")
    ap.add_argument("--unsloth")
    ap.add_argument("--hf")
    ap.add_argument("--title", default="Llama-3 8B QLoRA, batch 1: memory vs context")
    ap.add_argument("--out", default="memory_vs_context.png")
    ap.add_argument("--ref", action="append", default=[],
                    help="LABEL=SEQ: a maximum context measured elsewhere, drawn as a dashed vertical line")
    ap.add_argument("--top", type=float, default=80.0, help="the card's memory (GiB): a horizontal line")
    ap.add_argument("--series", action="append", default=[],
                    help="LABEL=PATH[,PATH...]: more of our max_context JSONs drawn as one series (steps that "
                         "ran: filled; compile-only footprints: hollow; failed probes are not drawn)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = args.top
    for label, s in (("jaxsloth", _series(args.ours, None, "footprint_gib")),
                     ("Unsloth", _series(args.unsloth, "maxctx", "max_alloc_GiB")),
                     ("HF + PEFT + bnb", _series(args.hf, "maxctx", "max_alloc_GiB"))):
        if s is None:
            continue
        ok, fail = s
        line, = ax.plot([x / 1000 for x, _ in ok], [y for _, y in ok], marker="o", label=label)
        if fail:
            ax.scatter([x / 1000 for x in fail], [top] * len(fail), marker="x", color=line.get_color())
    if args.ours and Path(args.ours).exists():  # compile-only probes: XLA's footprint, no step run
        tries = json.loads(Path(args.ours).read_text()).get("tries", [])
        pts = sorted((t["seq"], t["footprint_gib"]) for t in tries if t.get("compiled_only") and "footprint_gib" in t)
        if pts:
            ax.plot([x / 1000 for x, _ in pts], [y for _, y in pts], marker="o", linestyle=":", fillstyle="none",
                    label="jaxsloth, compiled footprint (not run)")
    for spec in args.series:
        label, paths = spec.split("=", 1)
        tries = [t for p in paths.split(",") for t in json.loads(Path(p).read_text()).get("tries", [])]
        ran = sorted((t["seq"], t["footprint_gib"]) for t in tries if t.get("ok") and "footprint_gib" in t)
        comp = sorted({(t["seq"], t["footprint_gib"]) for t in tries if "footprint_gib" in t and not t.get("ok") is False})
        line, = ax.plot([x / 1000 for x, _ in comp], [y for _, y in comp], linestyle=":", marker="o",
                        fillstyle="none", label=f"{label} (compiled footprint)")
        if ran:
            ax.scatter([x / 1000 for x, _ in ran], [y for _, y in ran], color=line.get_color(), zorder=3,
                       label=f"{label}: step ran")
    for ref in args.ref:
        label, seq = ref.rsplit("=", 1)
        ax.axvline(int(seq) / 1000, linestyle="--", linewidth=1, color="gray")
        ax.text(int(seq) / 1000, top * 0.97, f" {label}", rotation=90, va="top", fontsize=7, color="gray")
    ax.axhline(top, linewidth=0.8, color="black")
    ax.set_xlabel("sequence length (thousand tokens)")
    ax.set_ylabel("GPU memory (GiB)")
    ax.set_title(args.title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
