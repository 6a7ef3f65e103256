"""Session 15: nf4_matmul's fwd+bwd at large M with the backward's W decoded by nf4_mgpu's decode
(MGPU_DEQUANT_BWD, the forward's decode on these weights) against the bucket's backward (the
Pallas dequant kernel), and the bf16 dot's fwd+bwd, in interleaved rounds; also dx against the
f32 vjp at each shape. The variant is set at trace time.

  python bench/diag/s15_bwd_dequant.py --out run.jsonl [--shapes 8b_gate_up,70b_gate_up] [--m 2048]
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
  ap.add_argument("--shapes", default="8b_gate_up,70b_gate_up,8b_down")
  ap.add_argument("--m", type=int, default=2048)
  ap.add_argument("--rounds", type=int, default=3)
  a = ap.parse_args()
  bench = JaxBench()
  jax, jnp = bench.jax, bench.jnp
  mod = bench.mod
  fh = open(a.out, "a")
  for shape in a.shapes.split(","):
    n, k = SHAPES[shape]
    ops = bench.operands(n, k, a.m)
    timers = {"bf16": bench.timer("bf16", n, k, a.m, "fwd+bwd", ops=ops)}
    times = {"bf16": [timers["bf16"]()]}
    for name, on in (("mgpu_bwd", True), ("pallas_bwd", False)):
      saved, mod.MGPU_DEQUANT_BWD = mod.MGPU_DEQUANT_BWD, on
      try:
        t = bench.timer("ours", n, k, a.m, "fwd+bwd", ops=ops)
        times[name], timers[name] = [t()], t        # compiled here, with the variant set
        x, w, dy = ops[3][0], ops[1][0], ops[4][0]
        dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: mod.nf4_matmul(x, w), x)[1](dy)[0])(
            x, w, dy)
        ref = jnp.dot(dy.astype(jnp.float32), bench.dequantize(w).astype(jnp.float32))
        err = float(jnp.max(jnp.abs(dx.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        print(f"{shape} {name}: max |dx - ref| / max |ref| = {err:.2e}", flush=True)
        fh.write(json.dumps(dict(kind="check", shape=shape, impl=name, err=err)) + "\n")
      finally:
        mod.MGPU_DEQUANT_BWD = saved
    for _ in range(a.rounds - 1):
      for name, t in timers.items():
        times[name].append(t())
    bf = statistics.median(times["bf16"])
    for name, ts in times.items():
      ms = statistics.median(ts)
      fh.write(json.dumps(dict(kind="time", shape=shape, m=a.m, impl=name, pass_="fwd+bwd", ms=ms,
                               vs_bf16=ms / bf)) + "\n")
      print(f"{shape} M={a.m} fwd+bwd {name}: {ms * 1000:.1f} us, {ms / bf:.3f} of the bf16 dot's",
            flush=True)


if __name__ == "__main__":
  main()
