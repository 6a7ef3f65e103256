"""Session 15: where the pair plans (nf4_mgpu MgpuPlan.pair) go wrong on the GPU. Each case runs in
its own process with a time limit (a hang is reported as such) and prints the relative error of
y per quadrant: x's tile parity (the program's rank in the cluster) x the half of W's 128-row tile
(decoded here or by the peer). --no-remote replaces the st.async to the peer by a local arrive
(the peer's half then holds stale data: a check of the rest of the protocol). --pair 2: the
cases with pair=2 (the peer's half copied from its shared memory) instead of 1.

MgpuPlan.pair was removed after these runs: run this at commit 750054b.

  python bench/diag/s15_pair_probe.py            # all cases, one subprocess each
  python bench/diag/s15_pair_probe.py --case 0 [--no-remote] [--pair 2]
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

CASES = [  # (plan kwargs, m, n, k)
    (dict(tile_m=256, tile_n=128, tile_k=64, stages=3, decoder=1, pair=1), 512, 256, 256),
    (dict(tile_m=256, tile_n=128, tile_k=64, stages=3, decoder=1, pair=1), 512, 256, 1024),
    (dict(tile_m=128, tile_n=128, tile_k=64, stages=4, decoder=2, pair=1), 256, 256, 512),
    (dict(tile_m=256, tile_n=128, tile_k=64, stages=4, decoder=2, lut=16, pair=1), 1, 128, 256),
    (dict(tile_m=256, tile_n=128, tile_k=64, stages=4, decoder=2, lut=16, pair=1), 2048, 1024, 4096),
]


def run(i, no_remote, pair):
  import numpy as np
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from jaxsloth.quant import quantize_nf4, dequantize_nf4
  from pallas_kernels import nf4_mgpu
  if no_remote:
    plgpu.async_store_smem = lambda src, ref, barrier, **kw: plgpu.barrier_arrive(barrier)
  kw, m, n, k = CASES[i]
  kw = dict(kw, pair=pair)
  plan = nf4_mgpu.MgpuPlan(**kw)
  w = quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) * 0.02)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
  y = np.asarray(jax.jit(lambda x, w: nf4_mgpu.nf4_matmul_mgpu(x, w, plan))(x, w), np.float32)
  ref = np.asarray(x, np.float32) @ np.asarray(dequantize_nf4(w, jnp.float32)).T
  scale = np.abs(ref).max()
  rows = np.arange(m) // plan.tile_m % 2
  cols = np.arange(n) % plan.tile_n // (plan.tile_n // 2)
  out = []
  for r in range(2):
    for h in range(2):
      sel = np.ix_(rows == r, cols == h)
      if sel[0].size and sel[1].size:
        out.append(f"rank{r}/half{h} {np.abs(y[sel] - ref[sel]).max() / scale:.2e}")
  print(f"case {i} {kw} m={m} n={n} k={k} no_remote={no_remote}: " + ", ".join(out), flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--case", type=int)
  ap.add_argument("--no-remote", action="store_true")
  ap.add_argument("--timeout", type=int, default=45)
  ap.add_argument("--pair", type=int, default=1)
  a = ap.parse_args()
  if a.case is not None:
    return run(a.case, a.no_remote, a.pair)
  for i in range(len(CASES)):
    for nr in ([True, False] if i == 0 and a.pair == 1 else [False]):
      cmd = ([sys.executable, __file__, "--case", str(i), "--pair", str(a.pair)]
             + (["--no-remote"] if nr else []))
      try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("case ")
                 or "Error" in l or "error" in l]
        print("\n".join(lines[-4:]) or f"case {i}: rc={p.returncode}, no output", flush=True)
      except subprocess.TimeoutExpired:
        print(f"case {i} no_remote={nr}: TIMEOUT after {a.timeout} s (hang)", flush=True)


if __name__ == "__main__":
  main()
