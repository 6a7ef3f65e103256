"""Session 13: which swap plans give non-finite or wrong outputs at one shape (run s13_r1's failure:
dq + lut + reduce, tile_k 256, at M=40 on 576 x 1024), each run twice: the error against the f32
product and the count of non-finite outputs.

  python bench/diag/s13_nan_probe.py M N K
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxsloth.quant import dequantize_nf4, quantize_nf4  # noqa: E402
from pallas_kernels import nf4_mgpu  # noqa: E402

P = nf4_mgpu.MgpuPlan


def main():
  m, n, k = (int(v) for v in sys.argv[1:4])
  base = P(tile_n=64, tile_k=256, stages=2, split=0, swap=True)
  plans = {"plain": base, "dq": dataclasses.replace(base, dq=True),
           "lut": dataclasses.replace(base, lut=32),
           "dq+lut": dataclasses.replace(base, dq=True, lut=32),
           "dq+lut+reduce": dataclasses.replace(base, dq=True, lut=32, reduce=True),
           "dq+lut tk128": dataclasses.replace(base, dq=True, lut=32, tile_k=128),
           "dq+lut st3": dataclasses.replace(base, dq=True, lut=32, stages=3)}
  w = quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) * 0.02)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
  ref = np.asarray(x, np.float32) @ np.asarray(dequantize_nf4(w, jnp.float32)).T
  for name, plan in plans.items():
    split = nf4_mgpu._swap_split(m, n, k, plan)
    for rep in range(2):
      try:
        y = np.asarray(jax.jit(lambda x, w, p=plan: nf4_mgpu.nf4_matmul_mgpu(x, w, p))(x, w),
                       np.float32)
      except Exception as e:
        print(name, "error", repr(e)[:300], flush=True)
        break
      bad = ~np.isfinite(y)
      err = np.abs(np.where(bad, 0, y) - ref).max() / np.abs(ref).max()
      rows, cols = np.nonzero(bad)
      print(f"{name} split={split} rep={rep} err={err:.2e} nonfinite={bad.sum()} rows="
            f"{sorted(set(rows.tolist()))[:8]} cols={sorted(set(cols.tolist()))[:8]}", flush=True)


if __name__ == "__main__":
  main()
