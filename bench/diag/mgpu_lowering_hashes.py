"""Hashes of the Mosaic GPU modules nf4_mgpu's plans lower to, on a CPU (no GPU needed).

A refactor of pallas_kernels/nf4_mgpu.py that should not change the kernels can be checked by
running this before and after and diffing the output: each line is M, N, K, the sha256 prefix of
the kernel modules (debug info stripped) and how many there were, or the lowering's error.

  python bench/diag/mgpu_lowering_hashes.py > before.txt   # ... change ...; diff before.txt after.txt
"""
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax.numpy as jnp  # noqa: E402

from pallas_kernels import nf4_mgpu  # noqa: E402

P = nf4_mgpu.MgpuPlan
PLANS = [P(tile_n=64, tile_k=256, stages=4, split=0, chunk=64, swap=True),
         P(tile_n=64, tile_k=512, stages=2, split=0, chunk=64, swap=True),
         P(tile_n=128, tile_k=128, stages=3, split=2, chunk=128, swap=True),
         P(tile_n=128, tile_k=128, stages=4, split=2, chunk=64, swap=True, ws=True),
         P(tile_n=256, tile_k=256, stages=4, split=0, chunk=64, swap=True, ws=True, skip_decode=True),
         P(tile_n=64, tile_k=256, stages=4, split=0, chunk=64, swap=True, skip_decode=True),
         P(256, 128, 64, 4, ws=True), P(128, 128, 64, 2),
         # session 11: the swap kernels with gather (any M) and dq (double quant in the kernel)
         P(tile_m=256, tile_n=128, tile_k=128, stages=2, split=1, swap=True, ws=True, gather=True),
         P(tile_m=128, tile_n=128, tile_k=128, stages=3, split=0, swap=True, ws=True, gather=True),
         P(tile_n=64, tile_k=512, stages=2, split=0, chunk=64, swap=True, dq=True),
         # session 12: the table decode (the dispatched small-M plans), with gather, and stream
         P(tile_n=64, tile_k=256, stages=2, split=0, chunk=64, swap=True, dq=True, lut=32),
         P(tile_n=64, tile_k=512, stages=2, split=0, chunk=64, swap=True, dq=True, lut=32),
         P(tile_n=64, tile_k=256, stages=2, split=0, chunk=64, swap=True, dq=True, gather=True,
           lut=32),
         P(tile_n=64, tile_k=256, stages=3, split=2, chunk=64, swap=True, dq=True, stream=2,
           reduce=True),
         # session 13: the dispatch from M=9 (x unpermuted, the split-K partials added by TMA)
         P(tile_n=64, tile_k=256, stages=2, split=0, chunk=64, swap=True, dq=True, gather=True,
           lut=32, reduce=True),
         P(tile_n=64, tile_k=512, stages=2, split=0, chunk=64, swap=True, dq=True, gather=True,
           lut=32, reduce=True),
         # session 16: the dispatch from M=9 where K is split in 2 (the last K range writes y)
         P(tile_n=64, tile_k=256, stages=2, split=2, chunk=64, swap=True, dq=True, gather=True,
           lut=32, finish=True),
         P(tile_n=64, tile_k=512, stages=2, split=2, chunk=64, swap=True, dq=True, gather=True,
           lut=32, finish=True),
         # session 17: the mid-M dispatch, the warp-specialized gather kernel with the table
         P(tile_m=256, tile_n=128, tile_k=64, stages=4, split=1, swap=True, ws=True, gather=True,
           lut=16),
         P(tile_m=128, tile_n=128, tile_k=128, stages=3, split=0, swap=True, ws=True, gather=True,
           lut=32),
         # session 18: the 256-row mid-M dispatch, each step's wgmma in flight into the next
         P(tile_m=256, tile_n=128, tile_k=64, stages=4, split=1, swap=True, ws=True, gather=True,
           lut=16, lag=True)]
SHAPES = [(16, 192, 512), (1, 320, 1024), (40, 28672, 8192), (300, 4096, 14336)]


def main():
  for plan in PLANS:
    for m, n, k in SHAPES:
      if (nf4_mgpu.check_supported(k, 64, jnp.bfloat16, plan)
          or (plan.swap and not plan.gather and m > 64) or (plan.dq and k % 1024)):
        continue
      try:
        captured = nf4_mgpu._kernel_modules(plan, m, n, k)
      except ValueError as e:
        print(m, n, k, "error", str(e)[:60])
        continue
      digest = hashlib.sha256("".join(captured).encode()).hexdigest()[:16]
      print(m, n, k, digest, len(captured))

if __name__ == "__main__":
  main()
