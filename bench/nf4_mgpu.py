"""The Mosaic GPU NF4 kernel (pallas_kernels/nf4_mgpu.py) on the GPU: correctness against the f32
reference on odd and Llama shapes, then forward times against the bf16 dot and the current
dispatch (nf4_matmul's default), interleaved rounds, each op compiled once.

  python bench/nf4_mgpu.py --out bench/runs/<name>.jsonl [--plans 128,128,128,4 ...]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.nf4_matmul import JaxBench  # noqa: E402

SHAPES = {"8b_gate_up": (14336, 4096), "8b_down": (4096, 14336), "8b_q_o": (4096, 4096),
          "70b_gate_up": (28672, 8192), "70b_down": (8192, 28672), "70b_q_o": (8192, 8192)}


def check(jax, jnp, mod, quant, plan, log):
  worst = 0.0
  for m, n, k in ((1, 128, 256), (16, 192, 256), (100, 320, 512), (256, 1024, 4096),
                  (2048, 4096, 4096)):
    if mod.check_supported(k, 64, jnp.bfloat16, plan):
      continue
    w = quant.quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) * 0.02)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    y = jax.jit(lambda x, w: mod.nf4_matmul_mgpu(x, w, plan))(x, w)
    ref = x.astype(jnp.float32) @ quant.dequantize_nf4(w, jnp.float32).T
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
    worst = max(worst, err)
    log(dict(kind="check", plan=str(plan), m=m, n=n, k=k, max_rel_err=err))
  return worst


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--plans", nargs="*",   # run 5's best (warp-specialized) and M=16 plans
                  default=["256,128,64,4,1,64,0,1", "64,128,128,4,1,128,0,1@16"])
  ap.add_argument("--ms", default="16,2048")   # run 1 used 16,2048,4096
  ap.add_argument("--shapes", default="8b_gate_up,8b_down,70b_gate_up")
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  bench = JaxBench()
  jax, jnp = bench.jax, bench.jnp
  from jaxsloth import quant
  from pallas_kernels import nf4_mgpu as mod
  fh = open(args.out, "a")

  def log(rec):
    print(json.dumps(rec), flush=True)
    fh.write(json.dumps(rec) + "\n")
    fh.flush()

  log(dict(kind="info", device=str(jax.devices()[0].device_kind), jax=jax.__version__,
           date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())))
  # "tm,tn,tk,stages[,split[,chunk[,overlap[,ws[,skip_decode]]]]][@max_m]": a plan timed only up to
  # max_m rows of x; skip_decode=1 times the kernel without its decode (results wrong, not checked)
  plans, max_ms = [], {}
  for p in args.plans:
    spec, _, mm = p.partition("@")
    vals = [int(v) for v in spec.split(",")]
    plan = mod.MgpuPlan(*vals[:6], *[bool(v) for v in vals[6:]])
    plans.append(plan)
    max_ms[plan] = int(mm) if mm else 1 << 30
  ok = []
  for plan in plans:
    if plan.skip_decode:
      ok.append(plan)
      continue
    try:
      err = check(jax, jnp, mod, quant, plan, log)
      ok.append(plan)
      log(dict(kind="check_done", plan=str(plan), worst=err))
    except Exception as e:  # a plan that fails to compile is reported, the others still run
      log(dict(kind="check_failed", plan=str(plan), error=repr(e)[:2000]))
  for name in args.shapes.split(","):
    n, k = SHAPES[name]
    for m in [int(v) for v in args.ms.split(",")]:
      ops = bench.operands(n, k, m)
      r, qs, wds, xs, dys = ops
      timers = {"bf16": bench.timer("bf16", n, k, m, "fwd", ops=ops),
                "ours": bench.timer("ours", n, k, m, "fwd", ops=ops)}
      for plan in ok:
        if m > max_ms[plan] or mod.check_supported(k, qs[0].blocksize, jnp.bfloat16, plan):
          continue
        timers[str(plan)] = bench.timer(
            "mgpu", n, k, m, "fwd", ops=ops,
            op=lambda x, w, plan=plan: mod.nf4_matmul_mgpu(x, w, plan))
      times = {key: [] for key in timers}
      for _ in range(args.rounds):
        for key, t in timers.items():
          try:
            times[key].append(t())
          except Exception as e:
            log(dict(kind="time_failed", shape=name, m=m, impl=key, error=repr(e)[:1000]))
            times[key].append(float("nan"))
      med = {key: statistics.median(v) for key, v in times.items()}
      for key, t in med.items():
        log(dict(kind="time", shape=name, n=n, k=k, m=m, impl=key, ms=t,
                 vs_bf16=t / med["bf16"], vs_ours=t / med["ours"], rounds=times[key]))


if __name__ == "__main__":
  main()
