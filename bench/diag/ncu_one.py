"""Run one nf4_mgpu plan's forward a few times on one shape, for Nsight Compute to profile its
Mosaic kernel (session 12: where the M=16 kernel's time goes; device machine has ncu).

  ncu -k regex:mosaic_gpu --launch-skip 2 --launch-count 1 --section WarpStateStats ... \
      python bench/diag/ncu_one.py --plan "64,64,512,2,0,64+swap+dq" --m 16 --n 28672 --k 8192

Plans are written as in bench/nf4_mgpu.py. The weight is random N(0, 0.02) quantized to NF4 with
double quant, x random bf16; each call is checked against the f32 reference once at the end
(skip_decode / skip_mma plans excepted).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--plan", required=True)
  ap.add_argument("--m", type=int, default=16)
  ap.add_argument("--n", type=int, default=28672)
  ap.add_argument("--k", type=int, default=8192)
  ap.add_argument("--calls", type=int, default=4)
  args = ap.parse_args()
  import jax
  import jax.numpy as jnp
  from bench.nf4_mgpu import parse_plan, rel_err
  from jaxsloth.quant import dequantize_nf4, quantize_nf4
  from pallas_kernels import nf4_mgpu as mod

  plan, _ = parse_plan(mod, args.plan)
  w = quantize_nf4(jax.random.normal(jax.random.key(0), (args.n, args.k), jnp.float32) * 0.02)
  x = jax.random.normal(jax.random.key(1), (args.m, args.k), jnp.float32).astype(jnp.bfloat16)
  f = jax.jit(lambda x, w: mod.nf4_matmul_mgpu(x, w, plan))
  for _ in range(args.calls):
    y = jax.block_until_ready(f(x, w))
  if not (plan.skip_decode or plan.skip_mma):
    ref = x.astype(jnp.float32) @ dequantize_nf4(w, jnp.float32).T
    err = rel_err(jnp, y, ref)
    print(f"max error / max |y|: {err:.5f}", flush=True)


if __name__ == "__main__":
  main()
