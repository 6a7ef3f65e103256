"""What any NF4 op costs at least in bench/nf4_matmul.py's timing loop (M <= 16), against the bf16
dot and the dispatch, interleaved rounds, per weight shape:

  loop:  an op of one tiny XLA fusion on x (x * 2): the loop's cost per op without any weight
  read:  one XLA reduction over the weight's NF4 codes (max of the bytes, then added to x's first
         column): reading the 4-bit codes once, at what one kernel gets from HBM, plus the loop

If `read` alone is above 0.40 of the bf16 dot, no NF4 kernel reaches the issue's 2.5x at that
shape in this measure (it reads at least the codes, and the absmax besides).

  python bench/diag/s16_floor.py --out bench/runs/<name>.jsonl [--shapes ...] [--ms 16,1]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.nf4_matmul import JaxBench  # noqa: E402
from bench.nf4_mgpu import SHAPES, jsonl_log  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--shapes", default="8b_k_v,70b_k_v,8b_q_o,70b_q_o,8b_gate_up,8b_down")
  ap.add_argument("--ms", default="16,1")
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  bench = JaxBench()
  jax, jnp = bench.jax, bench.jnp
  log = jsonl_log(args.out, jax)
  for name in args.shapes.split(","):
    n, k = SHAPES[name]
    for m in [int(v) for v in args.ms.split(",")]:
      ops = bench.operands(n, k, m)
      read = lambda x, w: x[:, :1] + jnp.max(w.codes).astype(x.dtype)
      timers = {"bf16": bench.timer("bf16", n, k, m, "fwd", ops=ops),
                "ours": bench.timer("ours", n, k, m, "fwd", ops=ops),
                "loop": bench.timer("mgpu", n, k, m, "fwd", ops=ops, op=lambda x, w: x * 2),
                "read": bench.timer("mgpu", n, k, m, "fwd", ops=ops, op=read)}
      times = {key: [] for key in timers}
      for _ in range(args.rounds):
        for key, t in timers.items():
          times[key].append(t())
      med = {key: statistics.median(v) for key, v in times.items()}
      for key, t in med.items():
        log(dict(kind="time", shape=name, n=n, k=k, m=m, impl=key, ms=t,
                 vs_bf16=t / med["bf16"], vs_ours=t / med["ours"], rounds=times[key],
                 codes_bytes=n * k // 2))


if __name__ == "__main__":
  main()
