"""The Mosaic GPU NF4 kernel (pallas_kernels/nf4_mgpu.py) on the GPU: correctness against the f32
reference on odd and Llama shapes, then forward times against the bf16 dot and the current
dispatch (nf4_matmul's default; "triton": its Triton/XLA plan where the default dispatch runs a
Mosaic kernel), interleaved rounds, each op compiled once.

  python bench/nf4_mgpu.py --out bench/runs/<name>.jsonl [--plans 128,128,128,4 ...]

A plan is "tm,tn,tk,stages[,split[,chunk]][+flag...][@max_m]": MgpuPlan's first six fields, then
its boolean fields by name (+ws, +swap, +gather, +dq, +reduce, +finish, +dequant, +overlap,
+skip_decode, +skip_mma, +decoder) or +epi_rows=N, +stream=N, +lut=N, +decoder=N; a plan is timed
only up to max_m rows of x (swap plans without gather: 64).
+skip_decode times a kernel without its decode, +skip_mma one without its wgmma (results wrong,
not checked); a plan whose check fails is not timed, at the small shapes or at the timed shape
(against the f32 product of x and the dequantized W). --kernel-only also times each swap plan's
kernel without the XLA passes around it. Runs of session 9 wrote the flags positionally:
"256,128,64,4,1,64,0,1" is now "256,128,64,4,1,64+ws"; session 11's runs r1 and r3 used flags since
removed (+pingpong, +overlap on swap plans), session 14's r7 +mma_decode (removed), session 15's
r1-r4 +pair / +pair=2 (removed; last in commit 750054b), session 19's r1 +persist and +epi_rows on
swap plans (removed; last in commit 7932aea).
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.nf4_matmul import JaxBench  # noqa: E402

SHAPES = {"8b_gate_up": (14336, 4096), "8b_down": (4096, 14336), "8b_q_o": (4096, 4096),
          "70b_gate_up": (28672, 8192), "70b_down": (8192, 28672), "70b_q_o": (8192, 8192),
          "8b_k_v": (1024, 4096), "70b_k_v": (1024, 8192),
          # Llama 3.2 3B and 1B MLP weights (session 20: the small-M dispatch's splits there)
          "3b_gate_up": (8192, 3072), "3b_down": (3072, 8192), "1b_gate_up": (8192, 2048),
          "1b_down": (2048, 8192)}


def rel_err(jnp, y, ref):
  """max |y - ref| / max |ref|, the kernels' error measure (bound 2^-7)."""
  return float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))


def check(jax, jnp, mod, quant, plan, log):
  worst = 0.0
  for m, n, k in ((1, 128, 256), (16, 192, 256), (40, 320, 512), (100, 320, 512),
                  (256, 1024, 4096), (2048, 4096, 4096)):
    if (mod.check_supported(k, 64, jnp.bfloat16, plan)
        or (plan.swap and not plan.gather and m > 64) or (plan.dq and mod._dq_problem(k, plan))
        or ((plan.stream or plan.lut) and mod._swap_smem_over(m, k, plan))):
      continue
    w = quant.quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) * 0.02)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    y = jax.jit(lambda x, w: mod.nf4_matmul_mgpu(x, w, plan))(x, w)
    ref = x.astype(jnp.float32) @ quant.dequantize_nf4(w, jnp.float32).T
    err = rel_err(jnp, y, ref)
    worst = math.nan if math.isnan(err) or math.isnan(worst) else max(worst, err)
    log(dict(kind="check", plan=str(plan), m=m, n=n, k=k, max_rel_err=err))
  return worst


def kernel_only_timer(bench, mod, plan, n, k, m, ops):
  """Times a swap plan's kernel alone: x permuted, codes padded and scales made outside the timed
  jit, the f32 partials not summed (the forward minus this is the XLA passes around the kernel)."""
  jax = bench.jax
  r, qs, wds, xs, dys = ops
  plan = dataclasses.replace(plan, split=plan.split or mod._swap_split(m, n, k, plan))
  mp = mod._swap_mp(m, plan)
  m_pad = -(-m // mp) * mp
  fwd = mod._forward_of(plan)
  prep = jax.jit(lambda x, w: (mod._swap_x_in(x, m_pad, plan), mod._operands(w, plan)))
  parts = [prep(x, w) for x, w in zip(xs, qs)]
  # y (split 1, or plan.finish: the kernel's y), or partial 0 of y.T
  first = lambda y: y if plan.split == 1 or plan.finish else y[0].T
  op = lambda xp, cs: first(fwd(xp, cs[0], cs[1], n_out=n, blocksize=64, plan=plan, raw=True))
  return bench.timer("mgpu", n, k, m, "fwd", op=op,
                     ops=(r, [p[1] for p in parts], wds, [p[0] for p in parts], dys))


def parse_plan(mod, text):
  """"tm,tn,tk,stages[,split[,chunk]][+flag...][@max_m]" -> (MgpuPlan, max_m)."""
  spec, _, mm = text.partition("@")
  nums, *flags = spec.split("+")
  kw = {}
  for f in flags:
    key, eq, val = f.partition("=")
    kw[key] = int(val) if eq else True
  plan = mod.MgpuPlan(*[int(v) for v in nums.split(",")], **kw)
  if plan.swap and not plan.gather and not mm:
    mm = "64"
  return plan, int(mm) if mm else 1 << 30


def jsonl_log(path, jax):
  """A function printing a record and appending it to the JSON lines file `path`; the first record
  (written now) names the device, the jax version and the date."""
  fh = open(path, "a")

  def log(rec):
    print(json.dumps(rec), flush=True)
    fh.write(json.dumps(rec) + "\n")
    fh.flush()

  log(dict(kind="info", device=str(jax.devices()[0].device_kind), jax=jax.__version__,
           date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())))
  return log


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--plans", nargs="*",   # run 5's best (warp-specialized) and M=16 plans
                  default=["256,128,64,4,1,64+ws", "64,64,256,4,0,64+swap@64"])
  ap.add_argument("--ms", default="16,2048")   # run 1 used 16,2048,4096
  ap.add_argument("--shapes", default="8b_gate_up,8b_down,70b_gate_up")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--kernel-only", action="store_true",
                  help="also time each swap plan's kernel without the XLA passes around it")
  ap.add_argument("--dequant-only", action="store_true",
                  help="also time each dequant plan's decode to HBM alone, and the Pallas dequant "
                       "kernel of the large-M dispatch")
  ap.add_argument("--no-triton", action="store_true",
                  help="leave out the Triton/XLA plan's times where the dispatch runs a Mosaic one")
  args = ap.parse_args()
  bench = JaxBench()
  jax, jnp = bench.jax, bench.jnp
  from jaxsloth import quant
  from pallas_kernels import nf4_mgpu as mod
  log = jsonl_log(args.out, jax)
  plans, max_ms = [], {}
  for p in args.plans:
    plan, max_ms_p = parse_plan(mod, p)
    plans.append(plan)
    max_ms[plan] = max_ms_p
  ok = []
  for plan in plans:
    if plan.skip_decode or plan.skip_mma:
      ok.append(plan)
      continue
    try:
      err = check(jax, jnp, mod, quant, plan, log)
      if not err < 2**-7:   # a wrong kernel is not timed (session 11 timed one before this)
        raise AssertionError(f"max error / max |y| {err} above 2^-7")
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
      if args.dequant_only and any(p.dequant for p in ok):
        large = bench.mod.TUNED["large"]
        timers["pallas dequant"] = bench.timer(
            "mgpu", n, k, m, "fwd", ops=ops,
            op=lambda x, w: bench.mod.nf4_dequantize_pallas(w, jnp.bfloat16, large))
      triton = bench.mod._auto_plan(m, None, jnp.bfloat16)   # the Triton/XLA plan of this M
      if not args.no_triton and bench.mod._dispatch_plan(m, qs[0], None, jnp.bfloat16) != triton:
        timers["triton"] = bench.timer("triton", n, k, m, "fwd", plan=triton, ops=ops)
      ref = None
      for plan in ok:
        if m > max_ms[plan] or mod.check_supported(k, qs[0].blocksize, jnp.bfloat16, plan):
          continue
        if not (plan.skip_decode or plan.skip_mma):   # checked at the timed shape too
          if ref is None:
            ref = xs[0].astype(jnp.float32) @ wds[0].astype(jnp.float32).T
          try:
            y = jax.jit(lambda x, w, plan=plan: mod.nf4_matmul_mgpu(x, w, plan))(xs[0], qs[0])
            err = rel_err(jnp, y, ref)
          except Exception as e:
            log(dict(kind="check_failed", shape=name, m=m, plan=str(plan), error=repr(e)[:2000]))
            continue
          log(dict(kind="check", shape=name, m=m, plan=str(plan), max_rel_err=err))
          if not err < 2**-7:
            continue
        timers[str(plan)] = bench.timer(
            "mgpu", n, k, m, "fwd", ops=ops,
            op=lambda x, w, plan=plan: mod.nf4_matmul_mgpu(x, w, plan))
        if args.dequant_only and plan.dequant:
          timers[f"{plan} dequant"] = bench.timer(
              "mgpu", n, k, m, "fwd", ops=ops,
              op=lambda x, w, plan=plan: mod.nf4_dequantize_mgpu(w, plan))
        if args.kernel_only and plan.swap and not plan.dequant:
          timers[f"{plan} kernel"] = kernel_only_timer(bench, mod, plan, n, k, m, ops)
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
