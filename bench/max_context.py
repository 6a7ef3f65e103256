"""Longest sequence (batch 1) for which one QLoRA training step completes on this GPU (ours).

Loads a Llama-3-shaped checkpoint with NF4 on load (generating a random 8B-shaped one when --base
is absent: bench/export_merged_8b.py's generator), or for 70B (and with --random-nf4) builds the
model in NF4 directly on the device (bench/random_model.py: never written in bf16), attaches LoRA r=32, then grows the sequence along
--schedule with the chosen memory preset until a step fails or the time budget would be passed,
and bisects down to --granularity. Each probe records: ok / OOM, seconds per step, the compiled
step's device footprint (arguments + temporaries, from XLA's memory analysis), the device's bytes
in use after the step and the process's host RSS (offloaded activations live there).

    python bench/max_context.py --preset 8b --remat offload --remat-group 2 --mlp-chunk 8192 \
        --schedule 65536,131072,262144,393216,458752 --budget 420 --out max_context_8b.json
    python bench/max_context.py --preset 70b --mesh fsdp=2 --remat offload --schedule 65536,131072
    python bench/max_context.py --tiny --schedule 256,512 --budget 60      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxsloth.gpu_env import use_whole_gpu  # noqa: E402

GPU_ENV = use_whole_gpu()  # the card and the pinned host pool for offload, before jax starts

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

import jaxsloth  # noqa: E402
from export_merged_8b import LLAMA3_8B, TINY, write_random_base  # noqa: E402
from jaxsloth.train import TrainingArguments, _is_oom  # noqa: E402
from train_throughput import build_step, lora_to_host, place_on_mesh, random_batch  # noqa: E402

GiB = 2**30


def host_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) * 1024 / GiB, 2)
    return float("nan")


def probe(model, seq, args, key, run_step=True, mesh=None):
    targs = TrainingArguments(learning_rate=1e-4, max_steps=1000)
    preset = f"{args.remat}/group={args.remat_group}" + (f"/mlp={args.mlp_chunk}" if args.mlp_chunk else "")
    _, step, lora, opt, ctx = build_step(model, preset, mesh, targs)
    # batch 1: on a mesh the one row enters replicated; inside the model each layer's activations
    # are split along the sequence (jaxsloth.sharding.constrain_rows), and FSDP splits the weights,
    # LoRA and optimizer state
    batch = random_batch(model.config.vocab_size, 1, seq, seed=seq)
    if mesh is not None:  # one row: replicated on every device (shard_batch wants rows per device)
        from jax.sharding import NamedSharding, PartitionSpec

        batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec()))
    rec = {"seq": seq}
    t = time.perf_counter()
    try:
        with ctx:
            compiled = step.lower(lora, opt, model.replace(lora=None), batch, key).compile()
            mem = compiled.memory_analysis()
            if mem is not None:
                rec["footprint_gib"] = round((mem.argument_size_in_bytes + mem.temp_size_in_bytes) / GiB, 2)
                for name in ("host_temp_size_in_bytes", "host_argument_size_in_bytes"):  # offloaded activations
                    if getattr(mem, name, None):
                        rec[name.replace("_size_in_bytes", "_gib")] = round(getattr(mem, name) / GiB, 2)
            rec["compile_s"] = round(time.perf_counter() - t, 1)
            if not run_step:  # the compiler's footprint only: no step run (too slow for the job)
                rec.update(ok=None, compiled_only=True)
                return rec
            print(json.dumps({"seq": seq, "compile_s": rec["compile_s"], "running_step": True}), flush=True)
            t = time.perf_counter()
            _, _, m = compiled(lora, opt, model.replace(lora=None), batch, key)
            rec.update(ok=True, s_per_step=round(time.perf_counter() - t, 2), loss=round(float(m["loss"]), 4))
    except Exception as e:  # noqa: BLE001 - a probe that fails is a result
        rec.update(ok=False, error="OOM" if _is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}")
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    rec["device_in_use_gib"] = round(max(st.get("bytes_in_use", 0) for st in stats) / GiB, 2)
    rec["device_peak_gib"] = round(max(st.get("peak_bytes_in_use", 0) for st in stats) / GiB, 2)
    rec["host_rss_gib"] = host_rss_gib()
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="HF checkpoint dir (default: generate under --workdir)")
    ap.add_argument("--workdir", default="/tmp/jx")
    ap.add_argument("--preset", choices=["8b", "70b", "tiny"], default="8b")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--random-nf4", action="store_true",
                    help="build the model in NF4 on the device (bench/random_model.py) instead of loading a "
                         "checkpoint; always so for 70b (no 140 GB bf16 detour)")
    ap.add_argument("--mesh", default=None, help="device mesh, e.g. fsdp=2 (batch 1: FSDP splits weights and state)")
    ap.add_argument("--remat", default="offload", choices=["none", "full", "offload"])
    ap.add_argument("--remat-group", type=int, default=1)
    ap.add_argument("--mlp-chunk", type=int, default=None)
    ap.add_argument("--schedule", default="65536,131072,196608,262144,327680,393216,458752")
    ap.add_argument("--granularity", type=int, default=16384)
    ap.add_argument("--budget", type=float, default=400, help="seconds for the whole search")
    ap.add_argument("--compile-only", default="",
                    help="lengths to compile (device footprint from XLA's memory analysis) but not run, first")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    preset = "tiny" if args.tiny else args.preset
    t_build = time.perf_counter()
    if preset == "70b" or args.random_nf4:
        from random_model import PRESETS, random_nf4_model

        model = random_nf4_model(PRESETS[preset])
    else:
        shape = TINY if preset == "tiny" else LLAMA3_8B
        base = Path(args.base) if args.base else Path(args.workdir) / ("base-tiny" if shape is TINY else "base-8b")
        if not (base / "config.json").exists():
            write_random_base(base, shape, shard_bytes=int(5e9))
        model, _ = jaxsloth.load_model(base, dtype="bfloat16", load_in_4bit=True)
    model = lora_to_host(jaxsloth.add_lora(model, r=32, lora_alpha=32))
    jax.block_until_ready(model.params)
    key = jax.random.PRNGKey(0)
    info = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "preset": preset, "remat": args.remat, "remat_group": args.remat_group, "mlp_chunk": args.mlp_chunk,
            "build_s": round(time.perf_counter() - t_build, 1), **GPU_ENV}
    model, mesh = place_on_mesh(model, args.mesh, info)
    print(json.dumps(info), flush=True)

    t0, tries, lo, hi, last = time.perf_counter(), [], None, None, None

    def predicted(seq):  # attention makes a step grow faster than linearly in the sequence
        return 0.0 if last is None else last[1] * (seq / last[0]) ** 1.7 + 30.0

    def run(seq):
        nonlocal lo, hi, last
        rec = probe(model, seq, args, key, mesh=mesh)
        tries.append(rec)
        print(json.dumps(rec), flush=True)
        if rec["ok"]:
            lo, last = seq, (seq, rec["s_per_step"] + rec.get("compile_s", 0))
        else:
            hi = seq
        return rec

    stopped = None
    for seq in [int(s) for s in args.compile_only.split(",") if s]:
        if time.perf_counter() - t0 + 60 > args.budget:
            break
        rec = probe(model, seq, args, key, run_step=False, mesh=mesh)
        tries.append(rec)
        print(json.dumps(rec), flush=True)
    for seq in [int(s) for s in args.schedule.split(",")]:
        if time.perf_counter() - t0 + predicted(seq) > args.budget:
            stopped = f"time budget before seq={seq}"
            break
        if not run(seq)["ok"]:
            break
    while stopped is None and lo is not None and hi is not None and hi - lo > args.granularity:
        mid = (lo + hi) // 2 // 1024 * 1024
        if time.perf_counter() - t0 + predicted(mid) > args.budget:
            stopped = f"time budget before seq={mid}"
            break
        run(mid)
    result = {**info, "max_ok": lo, "first_fail": hi, "stopped": stopped, "tries": tries,
              "elapsed_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
