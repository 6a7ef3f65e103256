"""One NF4 matmul call per bucket, for `ncu` (Nsight Compute) to profile the kernels.

  ncu --kernel-name regex:nf4 --section SpeedOfLight --section InstructionStats \
      --section WarpStateStats python bench/nf4_ncu.py --m 1 --n 28672 --k 8192

Runs the forward once to compile, then once more (the profiled launch is the second).
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--m", type=int, default=1)
  ap.add_argument("--n", type=int, default=28672)
  ap.add_argument("--k", type=int, default=8192)
  ap.add_argument("--plan", default="", help="Plan fields as k=v,k=v over the tuned bucket's plan")
  args = ap.parse_args()
  import dataclasses
  import jax
  import jax.numpy as jnp
  from jaxsloth.quant import quantize_nf4
  from pallas_kernels import nf4_matmul as mod
  plan = mod._auto_plan(args.m, None)
  for kv in filter(None, args.plan.split(",")):
    key, val = kv.split("=")
    cur = getattr(plan, key)
    val = (val == "1") if isinstance(cur, bool) else type(cur)(val) if cur is not None else val
    plan = dataclasses.replace(plan, **{key: val})
  print("plan:", plan)
  w = quantize_nf4(jax.random.normal(jax.random.key(0), (args.n, args.k), jnp.bfloat16) * 0.02)
  x = jax.random.normal(jax.random.key(1), (args.m, args.k), jnp.bfloat16)
  f = jax.jit(lambda x, w: mod.nf4_matmul(x, w, plan=plan))
  for _ in range(2):
    jax.block_until_ready(f(x, w))


if __name__ == "__main__":
  main()
