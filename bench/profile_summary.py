"""GPU time per op class from a JAX profiler trace (``jax.profiler.trace(dir, create_perfetto_trace=True)``).

Reads the ``perfetto_trace.json.gz`` under DIR, takes the kernel events of the GPU's stream threads
and sums their durations by class (name patterns below: cuBLAS/CUTLASS GEMMs, cuDNN attention, our
Pallas/Triton kernels by name, host<->device copies of offloaded activations, XLA fusions), plus the
30 kernels that take the most time. Durations are summed, so concurrent streams can add up to more
than the wall time; ``busy_ms`` is the union of the intervals.

    python bench/profile_summary.py DIR [--steps N] [--out summary.json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

CLASSES = [  # first match wins; patterns are matched against the lower-cased kernel name
    ("nf4 dequant / matmul (Pallas)", r"nf4|dequant|_fused_fwd|_fused_bwd|gemv"),
    ("rmsnorm (Pallas)", r"rms"),
    ("rope (Pallas)", r"rope|rotary"),
    ("loss softmax pass (Pallas)", r"softmax_pass|cross_entropy|_ce_"),
    ("attention (cuDNN)", r"cudnn|fmha|flash|sdpa|attention"),
    ("matmul (cuBLAS/CUTLASS)", r"gemm|cutlass|nvjet|xmma|cublas|wgmma|matmul|dot"),
    ("copies (memcpy: saved activations, host offload)", r"memcpy|memset|copy"),
    ("XLA fusions / elementwise", r"fusion|loop_|input_|reduce|transpose|concatenate|slice|broadcast|convert"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pat in CLASSES:
        if re.search(pat, low):
            return cls
    return "other"


def summarize(trace_dir: str, steps: int = 1) -> dict:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise SystemExit(f"{trace_dir}: no perfetto_trace.json.gz (trace with create_perfetto_trace=True)")
    ev = json.load(gzip.open(paths[-1]))["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {p for p, n in procs.items() if "gpu" in n.lower() or "device" in n.lower()}
    kernels = [e for e in ev if e.get("ph") == "X" and e.get("pid") in gpu
               and "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
    if not kernels:  # no stream threads: take every device event
        kernels = [e for e in ev if e.get("ph") == "X" and e.get("pid") in gpu]
    by_class, by_name, by_hlo = collections.Counter(), collections.Counter(), collections.Counter()
    count = collections.Counter()
    for e in kernels:
        by_class[classify(e["name"])] += e["dur"]
        by_name[e["name"][:120]] += e["dur"]
        count[e["name"][:120]] += 1
        args = e.get("args") or {}
        hlo = args.get("hlo_op") or args.get("long_name") or args.get("tf_op")
        if hlo:  # which HLO instruction launched the kernel (when the trace records it)
            by_hlo[f"{classify(e['name'])}: {str(hlo)[:100]}"] += e["dur"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, -1e30
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    total = sum(by_class.values())
    ms = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731
    return {"trace": paths[-1], "steps": steps, "kernels": len(kernels),
            "wall_ms": ms(spans[-1][1] - spans[0][0]) if spans else 0, "busy_ms": ms(busy), "sum_ms": ms(total),
            "by_class_ms": {k: ms(v) for k, v in by_class.most_common()},
            "by_class_share": {k: round(v / total, 3) for k, v in by_class.most_common()} if total else {},
            "top_kernels": [{"name": n, "ms": ms(v), "calls": count[n] // steps} for n, v in by_name.most_common(30)],
            "top_hlo_ops": [{"op": n, "ms": ms(v)} for n, v in by_hlo.most_common(30)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=1, help="steps in the trace: figures are per step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    s = summarize(args.dir, args.steps)
    text = json.dumps(s, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
