"""Session 15: where pair 2's time goes (nf4_mgpu MgpuPlan.pair=2, each program copying the
peer's decoded half of the W tile from the peer's shared memory). Times at M=2048 the plan as it
is, without its two fence.acq_rel.cluster per pass, without the copy (wrong results: the peer's
half never arrives), and without both, against the same plan unpaired and the bf16 dot, in
interleaved rounds, and the plans that copy checked against the f32 product. The variants
monkeypatch nf4_mgpu._cluster_fence / _copy_tile at trace time.

MgpuPlan.pair was removed after these runs: run this at commit 750054b.

  python bench/diag/s15_pull_variants.py --out run.jsonl [--shapes 8b_gate_up] [--rounds 3]
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.nf4_matmul import JaxBench  # noqa: E402
from bench.nf4_mgpu import SHAPES  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--shapes", default="8b_gate_up")
  ap.add_argument("--m", type=int, default=2048)
  ap.add_argument("--rounds", type=int, default=3)
  a = ap.parse_args()
  bench = JaxBench()
  jax, jnp = bench.jax, bench.jnp
  from pallas_kernels import nf4_mgpu as mod
  P = mod.MgpuPlan
  base = dict(tile_m=256, tile_n=128, tile_k=64, stages=4, decoder=2, lut=16)
  noop = lambda *args: None
  variants = {"unpaired": (P(**base), {}), "pair2": (P(**base, pair=2), {}),
              "pair2_nofence": (P(**base, pair=2), {"_cluster_fence": noop}),
              "pair2_nocopy": (P(**base, pair=2), {"_copy_tile": noop}),
              "pair2_nofence_nocopy": (P(**base, pair=2), {"_cluster_fence": noop,
                                                           "_copy_tile": noop})}
  fh = open(a.out, "a")
  for shape in a.shapes.split(","):
    n, k = SHAPES[shape]
    ops = bench.operands(n, k, a.m)
    timers = {"bf16": bench.timer("bf16", n, k, a.m, "fwd", ops=ops)}
    times = {"bf16": [timers["bf16"]()]}
    for name, (plan, patch) in variants.items():
      saved = {f: getattr(mod, f) for f in patch}
      for f, v in patch.items():
        setattr(mod, f, v)
      try:
        t = bench.timer("mgpu", n, k, a.m, "fwd", ops=ops,
                        op=lambda x, w, plan=plan: mod.nf4_matmul_mgpu(x, w, plan))
        times[name] = [t()]          # compiled here, with the patch in place
        timers[name] = t
        if "nocopy" not in name:     # its result against the f32 product, at this shape
          x, w = ops[3][0], ops[1][0]
          y = jax.jit(lambda x, w, plan=plan: mod.nf4_matmul_mgpu(x, w, plan))(x, w)
          ref = jnp.dot(x.astype(jnp.float32), bench.dequantize(w).astype(jnp.float32).T)
          err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
          print(f"{shape} {name}: max |y - ref| / max |ref| = {err:.2e}", flush=True)
          fh.write(json.dumps(dict(kind="check", shape=shape, impl=name, err=err)) + "\n")
      except Exception as e:        # noqa: BLE001 - report and go on
        print(f"{shape} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
      finally:
        for f, v in saved.items():
          setattr(mod, f, v)
    for _ in range(a.rounds - 1):
      for name, t in timers.items():
        times[name].append(t())
    bf = statistics.median(times["bf16"])
    for name, ts in times.items():
      ms = statistics.median(ts)
      rec = dict(kind="time", shape=shape, m=a.m, impl=name, ms=ms, vs_bf16=ms / bf)
      fh.write(json.dumps(rec) + "\n")
      print(f"{shape} M={a.m} {name}: {ms * 1000:.1f} us, {ms / bf:.3f} of the bf16 dot", flush=True)


if __name__ == "__main__":
  main()
