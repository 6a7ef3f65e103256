"""NF4 matmul benchmark on the GPU: our kernels, XLA dequant+dot, bf16 dot, bitsandbytes+torch.

Shapes: Llama-3 8B and 70B projections as W [N, K] (out, in): q/o, k/v, gate/up, down, and
M in {1, 16, 256, 2048, 4096, 16384} rows of x; forward (y = x @ W.T) and forward+backward
(y and dx = dy @ W; W is frozen, no dW), all in bf16 with f32 accumulation.

Timing: every jitted call runs R independent (x, W) pairs held in distinct buffers, so that small
weights are read from HBM rather than the 50 MB L2 and Python dispatch is amortized; calls are
queued asynchronously and the mean per op is reported. The torch baseline runs in its own process
(so JAX's allocator does not starve it) with CUDA events and the same R.

  python bench/nf4_matmul.py --all --out $OUT        # tests + quantize + table + torch, one log
Sections (each in a subprocess, all under one deadline, --budget): pytest -m gpu, quantize (GPU
quantize timing), table (the comparison), torch (bitsandbytes dequantize_4bit + torch.matmul /
matmul_4bit); --sections adds sweep (the Triton plans' tuning). The table alone takes ~380 s on an
H100 (run s19_r3), so the default budget of 900 s leaves it whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

SHAPES = {
    "8B": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096),
           "down": (4096, 14336)},
    "70B": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192),
            "down": (8192, 28672)},
}
MS = (1, 16, 256, 2048, 4096, 16384)
L2_FLUSH_BYTES = 120e6
MEM_CAP_BYTES = 24e9


def _copies(n, k, m, cap=4):
  """Distinct (x, W) copies per timed call: enough NF4 bytes to overflow L2 at small M (capped:
  each copy is compiled separately), 2 at large M where the op is long and compute-bound."""
  if m >= 2048:
    return 2
  nf4 = n * k / 2
  r = min(cap, max(2, math.ceil(L2_FLUSH_BYTES / nf4)))
  per = 2 * (m * k + m * n + n * k + m * n)
  return max(1, min(r, int(MEM_CAP_BYTES // per)))


def _emit(fh, **rec):
  fh.write(json.dumps(rec) + "\n")
  fh.flush()


# ----------------------------------------------------------------------------- JAX side

def _jax_env():
  import jax
  import jax.numpy as jnp
  from jaxsloth.quant import dequantize_nf4, quantize_nf4
  from pallas_kernels import nf4_matmul as mod
  return jax, jnp, quantize_nf4, dequantize_nf4, mod


def _time_calls(jax, f, args, ops, min_time=0.03):
  out = f(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  out = f(*args)
  jax.block_until_ready(out)
  est = time.perf_counter() - t0
  n = max(3, min(100, int(min_time / max(est, 1e-6))))
  t0 = time.perf_counter()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / (n * ops) * 1e3


class JaxBench:
  def __init__(self):
    self.jax, self.jnp, self.quantize, self.dequantize, self.mod = _jax_env()
    self.cache = {}

  def operands(self, n, k, m):
    jax, jnp = self.jax, self.jnp
    r = _copies(n, k, m)
    key = (n, k)
    if key not in self.cache:
      self.cache.clear()
      w = jax.random.normal(jax.random.key(0), (n, k), jnp.bfloat16) * 0.02
      q = self.quantize(w)
      self.cache[key] = (q, self.dequantize(q))
    q, wd = self.cache[key]
    qs = [jax.tree_util.tree_map(jnp.copy, q) for _ in range(r)]
    wds = [jnp.copy(wd) for _ in range(r)]
    xs = [jax.random.normal(jax.random.key(i + 1), (m, k), jnp.bfloat16) for i in range(r)]
    dys = [jax.random.normal(jax.random.key(i + 100), (m, n), jnp.bfloat16) for i in range(r)]
    return r, qs, wds, xs, dys

  def time_impl(self, impl, n, k, m, passes=("fwd", "fwd+bwd"), plan=None, ops=None):
    return {p: self.timer(impl, n, k, m, p, plan, ops)() for p in passes}

  def timer(self, impl, n, k, m, pas, plan=None, ops=None, op=None):
    """A function timing one pass ("fwd" or "fwd+bwd") in ms per op; compiled at its first call,
    so timing it again (interleaved rounds) costs no compile. `op(x, w_nf4)` replaces the
    nf4_matmul call (other kernels, bench/nf4_mgpu.py)."""
    jax, jnp, mod = self.jax, self.jnp, self.mod
    r, qs, wds, xs, dys = ops if ops is not None else self.operands(n, k, m)
    if impl == "bf16":
      weights = wds
      op = lambda x, w: jnp.dot(x, w.T)   # bf16 out, f32 accumulation (cuBLAS); no f32 bwd
    else:
      weights = qs
      if op is None and plan is not None:
        op = lambda x, w: mod.nf4_matmul(x, w, plan=plan)
      elif op is None:
        op = lambda x, w: mod.nf4_matmul(x, w, implementation=None if impl == "ours" else impl)
    # Small ops (M <= 256) run `inner` times in a loop inside the jit: one dispatch per call, so
    # the host's per-call cost (~20 us per op with 4 copies) does not hide the device time. Each
    # iteration feeds a zero-weighted piece of its outputs into the next x (a tiny fused add), so
    # nothing is hoisted or dropped; large M keeps one op per copy and call.
    inner = 1 if m > 256 else (20 if m <= 16 else 5)

    def looped(one, feed):
      """jit of `one` over the copies; looped: `feed(outputs)` (an [M, 1] or [M, K] piece,
      behind an optimization barrier so no slice is pushed into a dot) joins the next x."""
      if inner == 1:
        return jax.jit(lambda xs, *rest: [one(x, *r) for x, *r in zip(xs, *rest)])

      def call(xs, *rest):
        def it(i, xs):
          outs = [feed(jax.lax.optimization_barrier(one(x, *r))) for x, *r in zip(xs, *rest)]
          return [x + jnp.where(i < 0, o, 0).astype(x.dtype) for x, o in zip(xs, outs)]
        return jax.lax.fori_loop(0, inner, it, list(xs))
      return jax.jit(call)

    if pas == "fwd":
      f = looped(op, lambda y: y[:, :1])
      return lambda: _time_calls(jax, f, (xs, weights), r * inner)

    def fb(x, w, dy):
      y, vjp = jax.vjp(lambda x: op(x, w), x)
      return y, vjp(dy)[0]
    f = looped(fb, lambda o: o[1] + o[0][:, :1])   # y is used: the forward is not dropped
    return lambda: _time_calls(jax, f, (xs, weights, dys), r * inner)


def _sweep_plans(mod):
  """(bucket, pass, plan) candidates. Buckets (SWEEP_MS): m1 (M=1), small (M=16), mid (M=256),
  large (M=2048 and 4096).

  History (bench/RESULTS.md "NF4 matmul"): session 4 swept 14 GEMV tilings at M=1 (f32 table,
  16 x 8 prefetched won) and 8 tensor-core tilings at M=16 (select tree, 128 x 4, 8 warps won);
  session 6 added the PTX byte-permute decode ("prmt"), which won both buckets (M=1: 0.0246 vs
  0.0288 ms; M=16 with the decoded W as the dot's left operand: 0.0468 vs 0.0955 ms), and the
  FMA-accumulating GEMV; session 7 added the "mid" bucket (M=256: x in one tile, the decoded W
  interleaved into column order won, 0.0874 vs 0.1259 ms for dequant + cuBLAS), the row-accumulating
  M=1 backward, and measured (commit f2d09f9) three ideas that lost, no longer listed: the fused
  forward with a grid over x's rows at M=2048/4096 (best 0.695 / 1.38 ms against 0.367 / 0.665 for
  dequant + cuBLAS, 10 tilings), the absmax applied to each block's dot result instead of every
  decoded value (M=16: 0.0387 vs 0.0380; M=256: 0.146 vs 0.0874) and the GEMV's pair products as
  one FMA (0.0237 vs 0.0238); session 8 added "prmt_bf16" (both tiles scaled in bf16 by one PTX
  block), which won M=16 (0.0360 vs 0.0397 ms) and the tensor-core backward at M=1 (fwd+bwd 0.0600
  vs 0.0669), lost the M=1 forward (0.0343 vs the GEMV's 0.0241) and, without the interleave it
  cannot take, M=256 (0.176 vs 0.0898). This list keeps the winners and their neighbours.
  """
  P = mod.Plan
  tc16 = dict(decode="prmt", bn=64, chunk=4, unroll=1, x_split=True, w_lhs=True, prefetch=True)
  gemv1 = dict(decode="prmt", gemv=True, bn=16, chunk=8, unroll=1, prefetch=True)
  # bwd candidates all run the same fused fwd, so no dequant is shared (CSE) between the passes
  out = [("m1", "fwd", P("xla", "xla")), ("small", "fwd", P("xla", "xla")),
         ("large", "fwd", P("xla", "xla")),
         ("m1", "fwd+bwd", P("fused", "xla", **gemv1)),
         ("small", "fwd+bwd", P("fused", "xla", **tc16))]
  # M=1: CUDA-core GEMV over [bn, chunk, 32] code tiles, the next step's tiles prefetched; fma:
  # elementwise FMAs into a [bn, chunk, 32] accumulator, reduced once at the end
  out.append(("m1", "fwd", P("fused", "xla", **gemv1)))
  # (session 7, for the narrow k/v and q/o weights) the K split's program target
  for bn, programs in ((16, 128), (16, 512), (8, 512), (16, 1024)):
    out.append(("m1", "fwd", P("fused", "xla", **dict(gemv1, bn=bn, fwd_programs=programs))))
  for decode, bn, chunk, warps in (("prmt", 16, 8, 4), ("prmt", 8, 8, 4), ("prmt", 16, 4, 4),
                                   ("prmt", 8, 16, 4), ("prmt", 32, 4, 8), ("f32", 16, 8, 4)):
    out.append(("m1", "fwd", P("fused", "xla", decode=decode, gemv=True, gemv_fma=True, bn=bn,
                               chunk=chunk, unroll=1, num_warps=warps, prefetch=True)))
  for bwd_bn in (128, 256):
    for decode in ("pair", "prmt"):
      out.append(("m1", "fwd+bwd", P("fused", "fused", bwd_bn=bwd_bn, bwd_decode=decode, **gemv1)))
  # (session 7) the bwd GEMV accumulating [bn, P] elementwise, rows summed once at the end
  for bwd_bn, decode in ((32, "pair"), (64, "pair"), (32, "prmt"), (64, "prmt"), (16, "pair"),
                        (128, "pair")):
    out.append(("m1", "fwd+bwd", P("fused", "fused", bwd_bn=bwd_bn, bwd_decode=decode,
                                   bwd_row_acc=True, **gemv1)))
  # M=16: tensor-core dots of the decoded W (left operand) with x's even/odd columns
  # (an ncu profile of 64 x 4 at 70B gate/up: 448 programs of 4 warps, 40% issue slots busy,
  # DRAM 19%: latency-bound, so split-K and smaller tiles for more warps per SM)
  for bn, chunk, warps, split, stages in (
      (64, 2, 4, 0, 3), (64, 4, 4, 0, 3), (32, 2, 4, 0, 3), (64, 2, 4, 2, 3), (64, 2, 4, 4, 3),
      (32, 2, 4, 2, 3), (32, 4, 4, 4, 3), (16, 2, 4, 0, 3), (64, 2, 8, 2, 3), (128, 2, 4, 2, 3),
      (64, 2, 4, 0, 1), (64, 2, 4, 2, 4)):
    out.append(("small", "fwd", P("fused", "xla", **dict(tc16, bn=bn, chunk=chunk,
                                                          num_warps=warps, split=split,
                                                          num_stages=stages))))
  # (split 4 won the above on 14336 x 4096: 0.0402 ms against 0.0438 for 2 and 0.0451 for none;
  # a program target carries that to other shapes)
  for bn, split, programs in ((64, 4, 0), (64, 8, 0), (64, 0, 1024), (64, 0, 2048), (32, 0, 1024),
                             (32, 0, 512), (16, 0, 512), (16, 0, 256), (64, 0, 512)):
    out.append(("small", "fwd", P("fused", "xla", **dict(tc16, bn=bn, chunk=2, split=split,
                                                          fwd_programs=programs))))
  for decode, bn in (("prmt", 128), ("prmt", 256), ("pair", 128)):
    out.append(("small", "fwd+bwd", P("fused", "fused", bwd_bn=bn, bwd_decode=decode, **tc16)))
  # M=256 and large M: the dequant kernel (scales decoded in the kernel) + cuBLAS; at M=256
  # against the fused kernel with x in one tile (interleave: W put in column order in registers,
  # x read as is; else x split into even/odd columns by XLA; W the left or right operand)
  for bucket in ("mid", "large"):
    out.append((bucket, "fwd", P("dequant", "dequant", decode="f32", dq_bn=16, dq_blocks=4)))
  for bn, warps, inter, lhs, stages in (
      (64, 4, True, True, 3), (64, 4, False, True, 3), (32, 4, True, True, 3),
      (128, 4, True, True, 3), (64, 8, True, True, 3), (64, 4, True, False, 3),
      (128, 8, True, False, 3), (64, 4, True, True, 4)):
    out.append(("mid", "fwd", P("fused", "xla", decode="prmt", unroll=1, bn=bn, chunk=1,
                                num_warps=warps, interleave=inter, x_split=not inter, w_lhs=lhs,
                                num_stages=stages)))
  # M=256 backward: the fused tensor-core bwd (dy in one tile) against the dequant kernel + cuBLAS
  mid = dict(decode="prmt", unroll=1, bn=64, chunk=1, num_warps=4, interleave=True, w_lhs=True)
  out.append(("mid", "fwd+bwd", P("fused", "dequant", bwd_decode="f32", dq_bn=16, dq_blocks=4,
                                  **mid)))
  for bwd_bn, warps, decode in ((64, 4, "prmt"), (128, 4, "prmt"), (128, 8, "prmt"),
                                (256, 8, "prmt"), (64, 8, "prmt"), (128, 8, "pair")):
    out.append(("mid", "fwd+bwd", P("fused", "fused", bwd_bn=bwd_bn, bwd_num_warps=warps,
                                    bwd_decode=decode, **mid)))
  # (session 8) "prmt_bf16": one PTX block gives both tiles scaled in bf16 (no f32 split, multiply
  # and conversion per value); tensor-core plans only, so at M=1 they race the GEMV
  # (session 8, run `nf4_decode`: at M=1 the best, 64 x 2, took 0.0343 ms against the GEMV's
  # 0.0241; at M=16 it won, 0.0360 against 0.0397 for the byte-permute plan. Interleaving the two
  # tiles miscompiles, see _kernel_decode, so those candidates are gone.)
  bf = dict(tc16, decode="prmt_bf16")
  for bucket in ("m1", "small"):
    for bn, chunk, warps, programs in ((64, 2, 4, 1024), (64, 4, 4, 1024), (64, 2, 4, 512),
                                       (64, 2, 4, 2048), (32, 2, 4, 1024), (128, 2, 4, 1024),
                                       (128, 2, 8, 1024)):
      out.append((bucket, "fwd", P("fused", "xla", **dict(
          bf, bn=bn, chunk=chunk, num_warps=warps, fwd_programs=programs))))
  # W as the dot's right operand (staged through shared memory) instead of the left
  for bn, chunk, warps in ((64, 2, 4), (128, 2, 4), (64, 4, 4)):
    out.append(("small", "fwd", P("fused", "xla", **dict(bf, bn=bn, chunk=chunk, num_warps=warps,
                                                          fwd_programs=1024, w_lhs=False))))
  # (the backward candidates of a bucket share one forward, so their times rank the backwards)
  for bwd_bn, warps in ((128, 4), (256, 4), (64, 4), (256, 8)):
    out.append(("m1", "fwd+bwd", P("fused", "fused", bwd_bn=bwd_bn, bwd_decode="prmt_bf16",
                                   bwd_gemv=False, bwd_num_warps=warps, **gemv1)))
    out.append(("small", "fwd+bwd", P("fused", "fused", bwd_bn=bwd_bn, bwd_decode="prmt_bf16",
                                      bwd_num_warps=warps, **tc16)))
  # M=256 without the interleave: x split into even/odd columns by XLA, or read with stride 2
  for bn, warps, chunk, split_x in ((64, 4, 1, True), (64, 4, 2, True), (128, 4, 1, True),
                                    (64, 8, 1, True), (128, 8, 2, True), (64, 4, 1, False),
                                    (128, 8, 1, False)):
    out.append(("mid", "fwd", P("fused", "xla", decode="prmt_bf16", unroll=1, bn=bn, chunk=chunk,
                                num_warps=warps, x_split=split_x, w_lhs=True)))
  for bwd_bn, warps in ((64, 4), (128, 4), (128, 8)):
    out.append(("mid", "fwd+bwd", P("fused", "fused", bwd_bn=bwd_bn, bwd_num_warps=warps,
                                    bwd_decode="prmt_bf16", **mid)))
  return out


SWEEP_SHAPE = (14336, 4096)
SWEEP_MS = {"m1": (1,), "small": (16,), "mid": (256,), "large": (2048, 4096)}


def run_sweep(fh, deadline, buckets=None, decode=None):
  """Time the candidates on the 8B gate/up weight; write the winners to tuned.json (buckets not
  swept keep the dispatch in the code). decode: only the candidates with that decode, and the
  dispatch in the code as theirs to beat."""
  b = JaxBench()
  n, k = SWEEP_SHAPE
  cands = _sweep_plans(b.mod)
  if decode:
    cands = [c for c in cands if decode in (c[2].decode, c[2].bwd_decode)] + [
        (bucket, p, b.mod.TUNED[bucket]) for bucket in SWEEP_MS for p in ("fwd", "fwd+bwd")]
  cands = list(dict.fromkeys(cands))   # a plan listed twice would be timed twice per M and dropped
  results = {}   # (bucket, pass, plan) -> its ms at each of the bucket's Ms
  for bucket, bucket_ms in SWEEP_MS.items():
    if buckets and bucket not in buckets:
      continue
    for m in bucket_ms:
      ops = b.operands(n, k, m)
      _emit(fh, section="sweep", kind=bucket, N=n, K=k, M=m, impl="bf16",
            **{"pass": "fwd", "ms": b.time_impl("bf16", n, k, m, passes=("fwd",), ops=ops)["fwd"]})
      for bkt, p, plan in cands:
        if bkt != bucket:
          continue
        if time.time() > deadline:
          _emit(fh, section="sweep", note="deadline reached")
          break
        key = (bucket, p, plan)
        try:
          ms = b.time_impl("plan", n, k, m, passes=(p,), plan=plan, ops=ops)[p]
          results.setdefault(key, []).append(ms)
          _emit(fh, section="sweep", kind=bucket, N=n, K=k, M=m, plan=dataclasses.asdict(plan),
                **{"pass": p, "ms": ms})
        except Exception as e:  # a config that does not lower is a result too
          results.pop(key, None)
          _emit(fh, section="sweep", kind=bucket, N=n, K=k, M=m, plan=dataclasses.asdict(plan),
                error=f"{type(e).__name__}: {str(e)[:300]}")
      del ops
  tuned = {}
  for bucket in SWEEP_MS:
    if buckets and bucket not in buckets:
      tuned[bucket] = dataclasses.asdict(b.mod.TUNED[bucket])
      continue
    # ranked by the summed time over the bucket's Ms; only plans measured at all of them
    ranked = lambda pas: sorted(
        ((sum(t), plan) for (bkt, p, plan), t in results.items()
         if bkt == bucket and p == pas and len(t) == len(SWEEP_MS[bucket])),
        key=lambda r: r[0])
    fwd, fb = ranked("fwd"), ranked("fwd+bwd")
    if not fwd:
      continue
    f = fwd[0][1]
    bw = fb[0][1] if fb else f
    if bucket == "large":   # the backward: dequant kernel (f32 table, bit-identical to XLA's)
      bw = dataclasses.replace(f, bwd="dequant", bwd_decode="f32")   # + cuBLAS
    tuned[bucket] = dataclasses.asdict(dataclasses.replace(
        f, bwd=bw.bwd, bwd_bn=bw.bwd_bn, split=bw.split,
        bwd_gemv=bw.gemv if bw.bwd_gemv is None else bw.bwd_gemv,
        bwd_decode=bw.bwd_decode or bw.decode, bwd_num_warps=bw.bwd_num_warps or bw.num_warps,
        bwd_row_acc=bw.bwd_row_acc, dq_bn=bw.dq_bn, dq_blocks=bw.dq_blocks))
  _emit(fh, section="sweep", tuned=tuned)
  with open(os.path.join(os.path.dirname(fh.name), "tuned.json"), "w") as f:
    json.dump(tuned, f)


def _load_tuned(mod, out_dir):
  path = os.path.join(out_dir, "tuned.json")
  if os.path.exists(path):
    with open(path) as f:
      for bucket, plan in json.load(f).items():
        mod.TUNED[bucket] = mod.Plan(**plan)


def run_table(fh, deadline, impls, models, ms):
  b = JaxBench()
  _load_tuned(b.mod, os.path.dirname(fh.name))
  _emit(fh, section="table", dispatch={k: dataclasses.asdict(v) for k, v in b.mod.TUNED.items()})
  # M-major, so that a deadline leaves every shape measured at the first Ms given
  for m in ms:
    for model in models:
      for proj, (n, k) in SHAPES[model].items():
        ops = b.operands(n, k, m)
        for impl in impls:
          if time.time() > deadline:
            _emit(fh, section="table", note="deadline reached")
            return
          if impl == "fused" and m > b.mod.FUSED_MAX_M:
            continue
          plan = None
          if impl == "fused":
            plan = b.mod.Plan("fused", "fused")
          elif impl == "pallas-dequant":
            plan = b.mod.Plan("dequant", "dequant")
          try:
            t = b.time_impl("plan" if plan else impl, n, k, m, plan=plan, ops=ops)
            for p, ms_ in t.items():
              _emit(fh, section="table", model=model, proj=proj, N=n, K=k, M=m, impl=impl,
                    **{"pass": p, "ms": ms_})
          except Exception as e:
            _emit(fh, section="table", model=model, proj=proj, N=n, K=k, M=m, impl=impl,
                  error=f"{type(e).__name__}: {str(e)[:300]}")
        del ops


def run_split_rounds(fh, deadline, models, m=16, rounds=3):
  """The M=16 K-split rule on every shape: the dispatched plan with each split rule and the bf16
  dot, timed `rounds` times with the candidates interleaved round by round (medians are taken by
  the reader): single timings of these 5-30 us ops vary by ~10%."""
  b = JaxBench()
  base = b.mod.TUNED["small"]
  one = lambda **kw: dict(kw, narrow_programs=0)   # the same rule for every N
  rules = {"programs=512": one(fwd_programs=512), "programs=1024": one(fwd_programs=1024),
           "programs=2048": one(fwd_programs=2048), "split=8": one(split=8),
           "split=4": one(split=4)}
  for model in models:
    for proj, (n, k) in SHAPES[model].items():
      ops = b.operands(n, k, m)
      timers = {name: b.timer("bf16" if kw is None else "plan", n, k, m, "fwd",
                              None if kw is None else dataclasses.replace(base, **kw), ops)
                for name, kw in [("bf16", None)] + list(rules.items())}
      for r in range(rounds):
        for name, timer in timers.items():
          if time.time() > deadline:
            _emit(fh, section="splits", note="deadline reached")
            return
          _emit(fh, section="splits", model=model, proj=proj, N=n, K=k, M=m, rule=name,
                round=r, ms=timer())
      del ops, timers


def _session7_dispatch(P):
  """The dispatch of session 7 (commit 402cd00) for M <= 256: the baseline of the decode section."""
  return {
      "m1": P("fused", "fused", decode="prmt", gemv=True, bn=16, chunk=8, unroll=1,
              prefetch=True, bwd_bn=128, bwd_decode="pair", bwd_row_acc=True),
      "small": P("fused", "fused", decode="prmt", bn=64, chunk=2, unroll=1, x_split=True,
                 w_lhs=True, prefetch=True, num_warps=4, fwd_programs=1024, bwd_bn=256,
                 bwd_decode="prmt", bwd_num_warps=4),
      "mid": P("fused", "fused", decode="prmt", bn=64, chunk=1, unroll=1, w_lhs=True,
               interleave=True, num_warps=4, bwd_bn=64, bwd_decode="prmt", bwd_num_warps=4)}


def run_decode_rounds(fh, deadline, models, rounds=3):
  """Every shape at M = 1, 16, 256: the bf16 dot, session 7's dispatch ("s7") and the dispatch in
  the code ("current"), timed `rounds` times interleaved (medians by the reader), forward and, at
  M <= 16, fwd+bwd."""
  b = JaxBench()
  base = _session7_dispatch(b.mod.Plan)
  current = dict(b.mod.TUNED)
  _emit(fh, section="decode", plans={k: dataclasses.asdict(v) for k, v in current.items()})
  for m, bucket in ((1, "m1"), (16, "small"), (256, "mid")):
    for model in models:
      for proj, (n, k) in SHAPES[model].items():
        ops = b.operands(n, k, m)
        passes = ("fwd", "fwd+bwd") if m <= 16 else ("fwd",)
        timers = {(name, p): b.timer(impl, n, k, m, p, plan, ops)
                  for name, impl, plan in (("bf16", "bf16", None), ("s7", "plan", base[bucket]),
                                           ("current", "plan", current[bucket]))
                  for p in passes}
        for r in range(rounds):
          for (name, p), timer in timers.items():
            if time.time() > deadline:
              _emit(fh, section="decode", note="deadline reached")
              return
            try:
              _emit(fh, section="decode", model=model, proj=proj, N=n, K=k, M=m, impl=name,
                    round=r, **{"pass": p, "ms": timer()})
            except Exception as e:
              _emit(fh, section="decode", model=model, proj=proj, N=n, K=k, M=m, impl=name,
                    round=r, error=f"{type(e).__name__}: {str(e)[:300]}", **{"pass": p})
        del ops, timers


def run_quantize_timing(fh):
  b = JaxBench()
  jax, jnp = b.jax, b.jnp
  total = 0.0
  for proj, (n, k) in SHAPES["8B"].items():
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.bfloat16)
    t0 = time.perf_counter()
    jax.block_until_ready(b.quantize(w))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
      q = b.quantize(w)
    jax.block_until_ready(q)
    per = (time.perf_counter() - t0) / 5
    mult = 2 if proj in ("q/o", "k/v", "gate/up") else 1
    total += per * mult * 32
    _emit(fh, section="quantize", proj=proj, N=n, K=k, first_call_s=first, per_call_ms=per * 1e3)
  _emit(fh, section="quantize", note="8B: 32 layers x 7 projections", total_s=total)


# ----------------------------------------------------------------------------- torch side

def run_torch(fh, deadline, models, ms):
  import torch
  import bitsandbytes as bnb
  import bitsandbytes.functional as F

  def timed(fn, r):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = s.elapsed_time(e) / 1e3
    n = max(3, min(100, int(0.03 / max(est, 1e-6))))
    s.record()
    for _ in range(n):
      fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / (n * r)

  for model in models:
    for proj, (n, k) in SHAPES[model].items():
      w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
      qw, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
      for m in ms:
        if time.time() > deadline:
          _emit(fh, section="torch", note="deadline reached")
          return
        r = _copies(n, k, m)
        try:
          qs = []
          for _ in range(r):
            q2, s2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            qs.append((q2, s2))
          xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(r)]
          dys = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(r)]
          wds = [w.clone() for _ in range(r)]

          def fwd():
            for (q2, s2), x in zip(qs, xs):
              torch.matmul(x, F.dequantize_4bit(q2, s2).t())

          def fwdbwd():
            for (q2, s2), x, dy in zip(qs, xs, dys):
              xx = x.detach().requires_grad_(True)
              y = bnb.matmul_4bit(xx, q2.t(), quant_state=s2)
              y.backward(dy)

          def dense():
            for wd, x in zip(wds, xs):
              torch.matmul(x, wd.t())

          for impl, p, fn in (("torch-bnb", "fwd", fwd), ("torch-bnb", "fwd+bwd", fwdbwd),
                              ("torch-bf16", "fwd", dense)):
            _emit(fh, section="torch", model=model, proj=proj, N=n, K=k, M=m, impl=impl,
                  **{"pass": p, "ms": timed(fn, r)})
          del qs, xs, dys, wds
          torch.cuda.empty_cache()
        except Exception as e:
          _emit(fh, section="torch", model=model, proj=proj, N=n, K=k, M=m,
                error=f"{type(e).__name__}: {str(e)[:300]}")


# ----------------------------------------------------------------------------- report

def _load(path):
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def make_report(recs) -> str:
  cols = ["bf16", "xla", "ours", "torch-bnb"]
  rows = {}
  for r in recs:
    if r.get("section") not in ("table", "torch") or "ms" not in r:
      continue
    rows.setdefault((r["pass"], r["model"], r["proj"], r["M"]), {})[r["impl"]] = r["ms"]
  lines = []
  for p in ("fwd", "fwd+bwd"):
    lines.append(f"\n### {p} (ms per op; ratio = ours / bf16 dot)\n")
    lines.append("| model | proj (N x K) | M | " + " | ".join(cols) + " | ours/bf16 | torch-bf16 |")
    lines.append("|" + " --- |" * (len(cols) + 5))
    for model in SHAPES:
      for proj, (n, k) in SHAPES[model].items():
        for m in MS:
          d = rows.get((p, model, proj, m))
          if not d:
            continue
          cells = [f"{d[c]:.4f}" if c in d else "" for c in cols]
          ratio = f"{d['ours'] / d['bf16']:.2f}" if "ours" in d and "bf16" in d else ""
          tb = rows.get(("fwd", model, proj, m), {}).get("torch-bf16")
          lines.append(f"| {model} | {proj} ({n}x{k}) | {m} | " + " | ".join(cells) +
                       f" | {ratio} | {'' if tb is None or p != 'fwd' else f'{tb:.4f}'} |")
  return "\n".join(lines)


def sweep_report(recs) -> str:
  best = {}
  lines = ["\n### sweep (best 3 per bucket/pass)\n"]
  for r in recs:
    if r.get("section") != "sweep" or "ms" not in r or "plan" not in r:
      continue
    best.setdefault((r["kind"], r["pass"], r["N"], r["K"], r["M"]), []).append((r["ms"], r["plan"]))
  for key, v in sorted(best.items()):
    v.sort(key=lambda t: t[0])
    for ms, plan in v[:3] + [t for t in v if t[1]["fwd"] == "xla"][:1]:
      short = {k: plan.get(k) for k in ("fwd", "bwd", "decode", "bn", "chunk", "unroll",
                                        "prefetch", "bwd_bn", "bwd_decode", "x_split", "gemv",
                                        "num_warps", "dq_bn", "dq_blocks", "w_lhs", "bwd_gemv",
                                        "gemv_fma", "split", "num_stages",
                                        "fwd_programs", "interleave", "bwd_row_acc")}
      lines.append(f"{key}: {ms:.4f} ms {short}")
  errs = [r for r in recs if "error" in r]
  for r in errs[:20]:
    lines.append(f"ERROR {r.get('section')} {r.get('kind', r.get('impl'))} N={r.get('N')} "
                 f"K={r.get('K')} M={r.get('M')}: {r['error'][:200]}")
  return "\n".join(lines)


def decode_report(recs) -> str:
  """The decode section: medians over rounds, ms and the ratio to the bf16 dot."""
  t = {}
  for r in recs:
    if r.get("section") == "decode" and "ms" in r:
      t.setdefault((r["M"], r["pass"], r["model"], r["proj"], r["N"], r["K"]), {}).setdefault(
          r["impl"], []).append(r["ms"])
  if not t:
    return ""
  lines = ["\n### decode: medians of interleaved rounds, ms (ratio to the bf16 dot)\n",
           "| M | pass | model | proj (N x K) | bf16 | session 7 | current | current / s7 |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for (m, p, model, proj, n, k), v in sorted(t.items()):
    med = {name: float(np.median(ts)) for name, ts in v.items()}
    b = med.get("bf16")
    cell = lambda name: (f"{med[name]:.4f} ({med[name] / b:.2f})" if name in med and b
                         else f"{med[name]:.4f}" if name in med else "-")
    ratio = (f"{med['current'] / med['s7']:.3f}" if "s7" in med and "current" in med else "-")
    lines.append(f"| {m} | {p} | {model} | {proj} ({n} x {k}) | {cell('bf16')} | "
                 f"{cell('s7')} | {cell('current')} | {ratio} |")
  return "\n".join(lines)


def env_report() -> str:
  info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  try:
    import jax
    info["jax"] = jax.__version__
    info["device"] = str(jax.devices()[0].device_kind)
  except Exception as e:  # noqa: BLE001
    info["jax"] = repr(e)
  for name in ("torch", "bitsandbytes", "transformers"):
    try:
      info[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
      info[name] = repr(e)[:80]
  return json.dumps(info)


def _sub(args, log, timeout, env=None):
  t0 = time.time()
  with open(log, "a") as fh:
    fh.write(f"\n$ {' '.join(args)}\n")
    fh.flush()
    try:
      rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, timeout=max(5, timeout),
                          env=env, cwd=ROOT).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  print(f"[{time.time() - t0:6.1f}s] {' '.join(args[1:4])} ... rc={rc}", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--all", action="store_true")
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/nf4bench"))
  ap.add_argument("--budget", type=float, default=900.0, help="seconds for --all")
  ap.add_argument("--sections", default="pytest,quantize,table,torch")
  ap.add_argument("--section")
  ap.add_argument("--deadline", type=float, default=0.0)
  ap.add_argument("--models", default="8B,70B")
  ap.add_argument("--ms", default=",".join(map(str, MS)))
  ap.add_argument("--impls", default="bf16,ours,xla")
  ap.add_argument("--tiny", action="store_true", help="CPU smoke test with small shapes")
  ap.add_argument("--sweep-shape", default="", help="N x K of the swept weight, e.g. 1024x4096")
  ap.add_argument("--buckets", default="",
                  help="sweep only these dispatch buckets (m1,small,mid,large)")
  ap.add_argument("--sweep-decode", default="",
                  help="sweep only the candidates with this decode (and the current dispatch)")
  ap.add_argument("--pytest-k", default="not nothing", help="pytest -k selection")
  ap.add_argument("--shares", default="", help="e.g. pytest=0.3,table=0.9")
  args = ap.parse_args()
  global SHAPES, SWEEP_SHAPE, SWEEP_MS
  if args.sweep_shape:
    SWEEP_SHAPE = tuple(int(v) for v in args.sweep_shape.split("x"))
  if args.tiny:
    SHAPES = {"8B": {"q/o": (128, 256)}}
    SWEEP_SHAPE, SWEEP_MS = (128, 256), {"m1": (1,), "small": (16,), "mid": (32,),
                                         "large": (64, 96)}
  os.makedirs(args.out, exist_ok=True)
  models = args.models.split(",")
  ms = [int(v) for v in args.ms.split(",")]
  if args.section:
    deadline = args.deadline or time.time() + 1e9
    path = os.path.join(args.out, f"results_{args.section}.jsonl")
    with open(path, "a") as fh:
      if args.section == "sweep":
        run_sweep(fh, deadline, args.buckets.split(",") if args.buckets else None,
                  args.sweep_decode or None)
      elif args.section == "table":
        run_table(fh, deadline, args.impls.split(","), models, ms)
      elif args.section == "torch":
        run_torch(fh, deadline, models, ms)
      elif args.section == "quantize":
        run_quantize_timing(fh)
      elif args.section == "splits":
        run_split_rounds(fh, deadline, models)
      elif args.section == "decode":
        run_decode_rounds(fh, deadline, models)
    return
  start = time.time()
  end = start + args.budget
  log = os.path.join(args.out, "log.txt")
  secs = args.sections.split(",")
  env = dict(os.environ)
  print(env_report(), flush=True)
  with open(log, "a") as fh:
    fh.write(env_report() + "\n")
  me = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--models", args.models,
        "--ms", args.ms, "--impls", args.impls, "--buckets", args.buckets,
        "--sweep-decode", args.sweep_decode] + (
            ["--tiny"] if args.tiny else [])
  # shares of the remaining budget, in order; torch gets a fixed slot at the end
  share = {"pytest": 0.3, "quantize": 0.04, "sweep": 0.2, "table": 1.0, "torch": 1.0,
           "splits": 1.0, "decode": 1.0}
  for kv in filter(None, args.shares.split(",")):
    name, val = kv.split("=")
    share[name] = float(val)
  torch_slot = 30.0 if "torch" in secs else 0.0
  for sec in secs:
    left = end - time.time() - (torch_slot if sec != "torch" else 0)
    if left <= 5:
      print(f"skip {sec}: out of budget", flush=True)
      continue
    budget = left * share[sec]
    if sec == "pytest":
      penv = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
      _sub([sys.executable, "-m", "pytest", "-q", "-rA", "-s", "-m", "gpu",
            "tests/test_nf4_gpu_bnb.py", "tests/test_nf4.py", "-k", args.pytest_k,
            "-p", "no:cacheprovider"], log, budget, penv)
    else:
      _sub(me + ["--section", sec, "--deadline", str(time.time() + budget - 10)], log,
           budget + 20, env)
  recs = []
  for sec in ("sweep", "table", "torch", "quantize", "decode"):
    recs += _load(os.path.join(args.out, f"results_{sec}.jsonl"))
  report = (env_report() + "\n" + make_report(recs) + "\n" + sweep_report(recs) + "\n"
            + decode_report(recs))
  for r in recs:
    if r.get("section") == "quantize":
      report += "\n" + json.dumps(r)
  with open(os.path.join(args.out, "report.md"), "w") as fh:
    fh.write(report)
  print(report)
  print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
  main()
