"""GPU benchmark of the RMSNorm, RoPE and fused cross-entropy kernels against XLA and the PyTorch path.

Run on the GPU machine, in three processes so JAX and PyTorch never share the card's memory:
  python bench/kernels.py jax   --out DIR [--ops rmsnorm,rope,ce] [--sweep ce]  # ours vs XLA, copy BW, CE memory
  python bench/kernels.py torch --out DIR [--ops ...]   # HF eager, torch.compile, Unsloth (when importable)
  python bench/kernels.py report --out DIR              # merges DIR/*.json into DIR/kernels.md
  python bench/kernels.py jax --ops none --sweep rope --out DIR  # only the RoPE variants sweep (~1 min)
Shapes: Llama-3 8B (D=4096, 32/8 heads, H=128) and 70B (D=8192, 64/8 heads), V=128256, bf16,
tokens 2K..64K. RMSNorm and RoPE times (ms) are per step of a chain of 10 steps (4 for carries of
>= 512 MiB) inside one jit, with optimization barriers between steps: no dispatch cost, no fusion
across steps. Cross-entropy and torch times are the best of two runs of `reps` calls queued back to
back, divided by reps. Bandwidth counts the bytes an ideal kernel must move (each input read once,
each output written once). Budget: the whole set takes ~8 min on an H100; split it with --ops.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages without PYTHONPATH

MODELS = {"8B": dict(d=4096, n=32, m=8, h=128), "70B": dict(d=8192, n=64, m=8, h=128)}
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
VOCAB = 128256
TOKENS = [2048, 16384, 65536]
ROPE_SWEEP_TOKENS = [16384, 65536]  # --sweep rope: forward of every variant at these sizes,
ROPE_SWEEP_TOP = 3                  # then fwd+bwd of base, XLA and this many fastest variants
CE_TOKENS = [2048, 16384, 65536]
T0 = time.time()


def log(*a):
  print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def save(out, name, rows):
  with open(os.path.join(out, name), "w") as f:
    json.dump(rows, f, indent=1)


# ============================================================================================ JAX

def run_jax(out, sweep, budget_s, ops, rope_variants="", rope_budget_s=50.0, rope_threads=8, rope_rounds=1):
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pallas_kernels import cross_entropy as CE
  from pallas_kernels import rmsnorm as RN
  from pallas_kernels import rope as RP

  dev = jax.devices()[0]
  env = dict(device=dev.device_kind, jax=jax.__version__, backend=jax.default_backend(),
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  log("env", env)
  rows = []

  def timeit(f, *args, reps=10, warmup=2):
    """ms per call: `reps` calls queued back to back (async dispatch hides the launch cost)."""
    for _ in range(warmup):
      jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(2):
      t = time.perf_counter()
      for _ in range(reps):
        out = f(*args)  # one stream: the last result ready means all are
      jax.block_until_ready(out)
      best = min(best, (time.perf_counter() - t) * 1e3 / reps)
      del out
    return best

  def chained(step, carry):
    """(chain(c, *args): n calls of step(c, *args) unrolled, each behind an optimization barrier so
    XLA cannot fuse one step into the next (a while loop would add carry copies after custom calls),
    n): 10 steps, 4 for carries of >= 512 MiB."""
    n = 10 if sum(a.nbytes for a in jax.tree.leaves(carry)) < 2**29 else 4
    def chain(c, *args):
      for _ in range(n):
        c = jax.lax.optimization_barrier(step(c, *args))
      return c
    return chain, n

  def timeit_loop(step, carry):
    """ms per step of a chain inside one jit: no per-call dispatch is counted."""
    chain, n = chained(step, carry)
    return timeit(jax.jit(chain), carry, reps=3, warmup=1) / n

  def record(**kw):
    rows.append(kw)
    log(kw)
    save(out, "jax.json", dict(env=env, rows=rows))

  def safe(fn, **kw):
    try:
      fn()
    except Exception as e:  # keep going: one failing shape must not lose the rest of the run
      record(error=f"{type(e).__name__}: {str(e)[:300]}", **kw)

  key = jax.random.PRNGKey(0)

  # ---- copy bandwidth
  x = jnp.ones((2**30 if jax.default_backend() == "gpu" else 2**20,), jnp.bfloat16)
  t = timeit(jax.jit(lambda a: a + 1), x, reps=20)
  copy_gbs = 2 * x.nbytes / t / 1e6
  record(op="copy", impl="xla", what="x+1 (2 GiB moved)", ms=t, gbs=copy_gbs)
  t = timeit_loop(lambda a: a + 1, x)
  record(op="copy", impl="xla x+1 in-jit loop", ms=t, gbs=2 * x.nbytes / t / 1e6)
  del x

  rn_default = (RN.BLOCK_ELEMS, RN.NUM_WARPS)
  ce_default = (CE.BLOCK_V, CE.NUM_WARPS, CE.NUM_STAGES, CE.PROGRAMS)

  def rope_sweep():
    """Every rope.VARIANTS entry against XLA and a plain copy of the same q and k (x+1), at 8B and
    70B x ROPE_SWEEP_TOKENS, bf16: forward for all, then fwd+bwd for XLA, base and the
    ROPE_SWEEP_TOP fastest. Times are per step of a chain of steps in one jit with optimization
    barriers (as timeit_loop), with the carry donated so that aliasing variants need no copy of a
    non-donated argument (every row is timed this way). % = GB/s over the run's x+1 copy bandwidth;
    bytes = q, k read + written and f32 cos, sin read, the same count for every row ("positions"
    rows read no tables), so % ranks by time; the copy row counts q, k only. No new variant starts
    after rope_budget_s; skipped ones are listed. rope_rounds > 1 times every chain that many times,
    the chains interleaved round by round, and reports the median."""
    t_start = time.time()
    names = rope_variants.split(",") if rope_variants else list(RP.VARIANTS)
    unknown = [v for v in names if v not in RP.VARIANTS]
    if unknown:
      raise ValueError(f"--rope-variants: unknown {unknown}; known: {list(RP.VARIANTS)}")
    shapes = [(model, t_) for model in MODELS for t_ in ROPE_SWEEP_TOKENS]

    def lower_chain(step, carry, tabs):
      """(lowered jit of the chained steps, n). The carry is donated; the tables are arguments, not
      closed-over constants (XLA would embed them in the program and could fold table-only math)."""
      chain, n = chained(step, carry)
      return jax.jit(chain, donate_argnums=0).lower(carry, tabs), n

    def run_chain(compiled, n, carry, tabs):
      """ms per step: best of 2 x 3 calls after one warm-up call (as timeit_loop)."""
      carry = jax.block_until_ready(compiled(jax.tree.map(jnp.copy, carry), tabs))
      best = float("inf")
      for _ in range(2):
        t = time.perf_counter()
        for _ in range(3):
          carry = compiled(carry, tabs)
        jax.block_until_ready(carry)
        best = min(best, (time.perf_counter() - t) * 1e3 / 3)
      return best / n

    data = {}
    for model, t_ in shapes:
      cfg = MODELS[model]
      q = jax.random.normal(key, (1, t_, cfg["n"], cfg["h"]), jnp.bfloat16)
      k = jax.random.normal(jax.random.PRNGKey(1), (1, t_, cfg["m"], cfg["h"]), jnp.bfloat16)
      pos = jnp.arange(t_, dtype=jnp.int32)[None]
      cos, sin = RP.rope_tables(pos, cfg["h"], 500000.0, LLAMA31_SCALING)
      inv = jnp.asarray(RP.rope_inv_freq(cfg["h"], 500000.0, LLAMA31_SCALING))
      data[model, t_] = (q, k, pos, cos, sin, inv,
                         2 * (q.nbytes + k.nbytes) + cos.nbytes + sin.nbytes)

    def rotate(name, q, k, tabs):
      pos, cos, sin, inv = tabs
      if name == "xla":
        return RP.apply_rope(q, k, cos, sin, implementation="xla")
      if name == "xla_positions":
        return RP.apply_rope_positions(q, k, pos, inv, implementation="xla")
      v = RP.VARIANTS[name]
      if v.tables == "positions":
        return RP.apply_rope_positions(q, k, pos, inv, implementation="pallas", config=v)
      return RP.apply_rope(q, k, cos, sin, implementation="pallas", config=v)

    res = {}  # (name, "fwd" | "fwdbwd", model, tokens) -> ms per step

    def nbytes(name, what, model, t_):
      q, k, *_, nb = data[model, t_]
      return 2 * (q.nbytes + k.nbytes) if name == "copy" else nb * (1 if what == "fwd" else 2)

    def measure(names_, what):
      """Lower every (name, shape) chain, compile them on rope_threads threads, then time them
      one after another."""
      jobs = []
      for name in names_:
        if name in RP.VARIANTS and name != "base" and time.time() - t_start > rope_budget_s:
          skipped.append(f"{name} ({what})")
          continue
        for model, t_ in shapes:
          q, k, pos, cos, sin, inv, _ = data[model, t_]
          rot = functools.partial(rotate, name)
          if name == "copy":
            step, carry = (lambda c, tb: (c[0] + 1, c[1] + 1)), (q, k)
          elif what == "fwd":
            step, carry = (lambda c, tb, rot=rot: rot(c[0], c[1], tb)), (q, k)
          else:
            def step(c, tb, rot=rot):
              out, vjp = jax.vjp(lambda u, v: rot(u, v, tb), c[0], c[1])
              return out + vjp((c[2], c[3]))
            carry = (q, k, q, k)
          tabs = (pos, cos, sin, inv)
          try:
            jobs.append((name, model, t_, carry, tabs, *lower_chain(step, carry, tabs)))
          except Exception as e:  # one failing variant must not lose the others
            record(op="sweep_rope", variant=name, what=what, model=model, tokens=t_,
                   error=f"{type(e).__name__}: {str(e)[:300]}")

      def compile_(job):
        try:
          return job[5].compile()
        except Exception as e:  # noqa: BLE001
          return e
      with concurrent.futures.ThreadPoolExecutor(max(1, rope_threads)) as pool:
        compiled = list(pool.map(compile_, jobs))
      log(f"rope sweep: {len(jobs)} {what} chains compiled")
      rounds = {}   # job index -> ms of each round; rounds interleave the jobs (drift hits all alike)
      for _ in range(max(1, rope_rounds)):
        for j, ((name, model, t_, carry, tabs, _, n), comp) in enumerate(zip(jobs, compiled)):
          if isinstance(comp, Exception):
            continue
          def one():
            rounds.setdefault(j, []).append(run_chain(comp, n, carry, tabs))
          safe(one, op="sweep_rope", variant=name, what=what, model=model, tokens=t_)
      for j, ((name, model, t_, *_), comp) in enumerate(zip(jobs, compiled)):
        kw = dict(op="sweep_rope", variant=name, what=what, model=model, tokens=t_)
        if isinstance(comp, Exception):
          record(error=f"{type(comp).__name__}: {str(comp)[:300]}", **kw)
          continue
        if j not in rounds:
          continue
        ms = statistics.median(rounds[j])
        res[name, what, model, t_] = ms
        gbs = nbytes(name, what, model, t_) / ms / 1e6
        record(ms=ms, gbs=gbs, pct_copy=100 * gbs / copy_gbs, rounds_ms=rounds[j], **kw,
               **({"config": RP.VARIANTS[name].describe()} if name in RP.VARIANTS else {}))
      del jobs, compiled

    skipped = []
    measure(["copy", "xla", "xla_positions"] + names, "fwd")

    def vs_xla(name, what):
      r = [res[name, what, *s_] / res["xla", what, *s_] for s_ in shapes
           if (name, what, *s_) in res and ("xla", what, *s_) in res]
      return statistics.geometric_mean(r) if len(r) == len(shapes) else float("inf")

    ranked = sorted((v for v in names if vs_xla(v, "fwd") < float("inf")),
                    key=lambda v: vs_xla(v, "fwd"))
    measure(list(dict.fromkeys(["xla"] + [v for v in ["base"] if v in names] +
                               ranked[:ROPE_SWEEP_TOP])), "fwdbwd")

    # ---- compact table: ms (% of copy bandwidth) per shape; last column: time / XLA's (geo mean)
    cols = [f"{m} {t_ // 1024}K" if t_ >= 1024 else f"{m} {t_}" for m, t_ in shapes]
    w = max(map(len, ["xla_positions"] + names)) + 1
    lines = [f"RoPE sweep, bf16: ms per step (% of x+1 copy {copy_gbs:.0f} GB/s); "
             f"/xla = time over XLA's, geo mean"]
    for what in ("fwd", "fwdbwd"):
      lines.append(f"{what:<{w}}" + "".join(f"{c:>18}" for c in cols) + f"{'/xla':>7}")
      for name in ["copy", "xla", "xla_positions"] + names:
        if not any((name, what, *s_) in res for s_ in shapes):
          continue
        cells = []
        for model, t_ in shapes:
          ms = res.get((name, what, model, t_))
          pct = 100 * nbytes(name, what, model, t_) / ms / 1e6 / copy_gbs if ms else 0
          cells.append("-" if ms is None else f"{ms:.3f} ({pct:3.0f}%)")
        r = vs_xla(name, what)
        lines.append(f"{name:<{w}}" + "".join(f"{c:>18}" for c in cells) +
                     (f"{r:7.3f}" if r < float("inf") else f"{'-':>7}"))
    if skipped:
      lines.append(f"skipped (--rope-budget {rope_budget_s:.0f} s): {', '.join(skipped)}")
    if ranked:
      best = ranked[0]
      lines.append(f"best forward: {best} ({RP.VARIANTS[best].describe()}): "
                   f"{vs_xla(best, 'fwd'):.3f}x XLA's "
                   f"time fwd, {vs_xla(best, 'fwdbwd'):.3f}x fwd+bwd")
      record(op="rope_sweep_best", variant=best, config=RP.VARIANTS[best].describe(),
             fwd_vs_xla=vs_xla(best, "fwd"), fwdbwd_vs_xla=vs_xla(best, "fwdbwd"))
    log(f"rope sweep: {time.time() - t_start:.1f} s")
    print("\n".join(lines), flush=True)
    with open(os.path.join(out, "rope_sweep.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")

  def sweeps():
    t_, d = (16384, 4096) if VOCAB == 128256 else (64, 256)
    which = set(sweep.split(","))
    xs = jax.random.normal(key, (t_, d), jnp.bfloat16)
    w = jnp.ones((d,), jnp.bfloat16)
    r = jnp.ones((t_,), jnp.float32)
    for elems in (2048, 4096, 8192, 16384) if "rmsnorm" in which else ():
      for warps in (4, 8, 16):
        RN.BLOCK_ELEMS, RN.NUM_WARPS = elems, warps
        def one():
          tf = timeit(jax.jit(lambda a, b: RN._fwd_pallas(a, b, 1e-5)), xs, w)
          tb = timeit(jax.jit(lambda a, b, c: RN._bwd_pallas(a, b, c, a)), xs, w, r)
          record(op="sweep_rmsnorm", elems=elems, warps=warps, fwd_ms=tf, bwd_ms=tb,
                 fwd_gbs=2 * xs.nbytes / tf / 1e6, bwd_gbs=3 * xs.nbytes / tb / 1e6)
        safe(one, op="sweep_rmsnorm", elems=elems, warps=warps)
    RN.BLOCK_ELEMS, RN.NUM_WARPS = rn_default
    if "rope" in which:
      rope_sweep()
    del xs
    lg = jax.random.normal(key, (min(1024, t_), VOCAB), jnp.bfloat16)
    lb = jax.random.randint(key, (min(1024, t_),), 0, VOCAB)
    configs = [(2048, 4, 2, None), (4096, 8, 3, None)] + [
        (b, w, 3, p) for p in (128, 256) for b in (4096, 8192) for w in (8, 16)]
    for bv, warps, stages, programs in configs if "ce" in which else ():
      if time.time() - T0 > budget_s + 40:
        break
      CE.BLOCK_V, CE.NUM_WARPS, CE.NUM_STAGES, CE.PROGRAMS = bv, warps, stages, programs
      def one():
        tf = timeit(jax.jit(lambda a, b: CE._softmax_pass_pallas(a, b, jnp.bfloat16)), lg, lb)
        record(op="sweep_ce_pass", block_v=bv, warps=warps, stages=stages, programs=programs,
               ms=tf, gbs=2 * lg.nbytes / tf / 1e6)
      safe(one, op="sweep_ce_pass", block_v=bv, warps=warps, stages=stages, programs=programs)
    CE.BLOCK_V, CE.NUM_WARPS, CE.NUM_STAGES, CE.PROGRAMS = ce_default
    done = [r for r in rows if r.get("op") == "sweep_ce_pass" and "ms" in r]
    if done:
      best = min(done, key=lambda r: r["ms"])
      CE.BLOCK_V, CE.NUM_WARPS, CE.NUM_STAGES, CE.PROGRAMS = (
          best["block_v"], best["warps"], best["stages"], best["programs"])
      record(op="ce_config_used", block_v=best["block_v"], warps=best["warps"],
             stages=best["stages"], programs=best["programs"], ms=best["ms"])
    tx = timeit(jax.jit(lambda a, b: CE._softmax_pass_xla(a, b, jnp.bfloat16)), lg, lb)
    record(op="sweep_ce_pass", block_v="xla", ms=tx, gbs=2 * lg.nbytes / tx / 1e6)
    del lg

  # ---- RMSNorm
  for model, cfg in MODELS.items() if "rmsnorm" in ops else ():
    d = cfg["d"]
    for t_ in TOKENS:
      if time.time() - T0 > budget_s:
        break
      x = jax.random.normal(key, (t_, d), jnp.bfloat16)
      w = (1 + 0.1 * jax.random.normal(key, (d,), jnp.float32)).astype(jnp.bfloat16)
      dy = jax.random.normal(jax.random.PRNGKey(1), (t_, d), jnp.bfloat16)
      nb = x.nbytes
      for impl in ("pallas", "xla"):
        def one():
          _, r = RN._fwd_xla(x, w, 1e-5)
          bwd = RN._bwd_pallas if impl == "pallas" else RN._bwd_xla
          def fb(c):
            y, vjp = jax.vjp(lambda u: RN.rmsnorm(u, w, implementation=impl), c[0])
            return y, vjp(c[1])[0]
          tf = timeit_loop(lambda c: RN.rmsnorm(c, w, implementation=impl), x)
          tb = timeit_loop(lambda c: bwd(x, w, r, c), dy)
          tfb = timeit_loop(fb, (x, dy))
          record(op="rmsnorm", model=model, tokens=t_, impl=impl, fwd_ms=tf, bwd_ms=tb, fwdbwd_ms=tfb,
                 fwd_gbs=2 * nb / tf / 1e6, bwd_gbs=3 * nb / tb / 1e6,
                 fwdbwd_gbs=5 * nb / tfb / 1e6)
        safe(one, op="rmsnorm", model=model, tokens=t_, impl=impl)

        def residual():
          def fb(c):
            (y, h), vjp = jax.vjp(lambda u, v: RN.rmsnorm_residual(u, v, w, implementation=impl),
                                  c[0], c[1])
            return (y, h) + vjp((c[2], c[3]))
          tf = timeit_loop(lambda c: RN.rmsnorm_residual(c[0], c[1], w, implementation=impl), (x, dy))
          tfb = timeit_loop(fb, (x, dy, dy, x))
          # fwd reads x, residual and writes h, y; bwd reads h, dy, dh and writes dx (= d residual)
          record(op="rmsnorm_residual", model=model, tokens=t_, impl=impl, fwd_ms=tf,
                 fwdbwd_ms=tfb, fwd_gbs=4 * nb / tf / 1e6, fwdbwd_gbs=8 * nb / tfb / 1e6)
        safe(residual, op="rmsnorm_residual", model=model, tokens=t_, impl=impl)
      del x, dy

  # ---- RoPE
  for model, cfg in MODELS.items() if "rope" in ops else ():
    n, m, h = cfg["n"], cfg["m"], cfg["h"]
    for t_ in TOKENS:
      if time.time() - T0 > budget_s:
        break
      q = jax.random.normal(key, (1, t_, n, h), jnp.bfloat16)
      k = jax.random.normal(key, (1, t_, m, h), jnp.bfloat16)
      pos = jnp.arange(t_, dtype=jnp.int32)[None]
      cos, sin = RP.rope_tables(pos, h, 500000.0, LLAMA31_SCALING)
      nb = 2 * (q.nbytes + k.nbytes) + cos.nbytes + sin.nbytes
      for impl in ("pallas", "xla"):
        def one():
          def fb(c):
            out, vjp = jax.vjp(lambda u, v: RP.apply_rope(u, v, cos, sin, implementation=impl),
                               c[0], c[1])
            return out + vjp((c[2], c[3]))
          tf = timeit_loop(lambda c: RP.apply_rope(c[0], c[1], cos, sin, implementation=impl), (q, k))
          tfb = timeit_loop(fb, (q, k, q, k))
          # the backward is the forward kernel with -sin: bwd time ~ fwd time
          record(op="rope", model=model, tokens=t_, impl=impl, fwd_ms=tf, fwdbwd_ms=tfb,
                 fwd_gbs=nb / tf / 1e6, fwdbwd_gbs=2 * nb / tfb / 1e6)
        safe(one, op="rope", model=model, tokens=t_, impl=impl)
      del q, k

  if sweep:
    sweeps()  # picks the fastest CE softmax-pass config for the table below

  # ---- fused cross-entropy
  for model, cfg in MODELS.items() if "ce" in ops else ():
    d = cfg["d"]
    w = (jax.random.normal(key, (VOCAB, d), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    for t_ in CE_TOKENS:
      if time.time() - T0 > budget_s:
        break
      hsd = jax.random.normal(jax.random.PRNGKey(2), (t_, d), jnp.bfloat16)
      lab = jax.random.randint(key, (t_,), 0, VOCAB).at[::7].set(-100)
      reps = 5 if t_ * d <= 16384 * 4096 else 3

      def mem_of(f, *args):
        ma = jax.jit(f).lower(*args).compile().memory_analysis()
        return dict(temp_gib=ma.temp_size_in_bytes / 2**30, out_gib=ma.output_size_in_bytes / 2**30)

      def matmul_only():
        f1 = jax.jit(lambda a, b: a @ b.T)
        f2 = jax.jit(lambda a, b: (lambda lg: lg @ b)(a @ b.T))
        tf = timeit(f1, hsd, w, reps=reps)
        tfb = timeit(f2, hsd, w, reps=reps)
        flops = 2 * t_ * d * VOCAB
        record(op="ce", model=model, tokens=t_, impl="lm_head matmul only", fwd_ms=tf, fwdbwd_ms=tfb,
               tflops_fwd=flops / tf / 1e9, **mem_of(lambda a, b: (lambda lg: lg @ b)(a @ b.T), hsd, w))
      safe(matmul_only, op="ce", model=model, tokens=t_, impl="lm_head matmul only")

      for impl in ("pallas", "xla"):
        def one():
          fwd = jax.jit(lambda a, b, c: CE.fused_cross_entropy(a, b, c, implementation=impl)[0])
          fb_fn = lambda a, b, c: jax.value_and_grad(
              lambda u: CE.fused_cross_entropy(u, b, c, implementation=impl)[0])(a)
          tf = timeit(fwd, hsd, w, lab, reps=reps)
          tfb = timeit(jax.jit(fb_fn), hsd, w, lab, reps=reps)
          record(op="ce", model=model, tokens=t_, impl=f"ours ({impl} pass)", fwd_ms=tf, fwdbwd_ms=tfb,
                 **mem_of(fb_fn, hsd, w, lab))
        safe(one, op="ce", model=model, tokens=t_, impl=f"ours ({impl} pass)")

      if t_ == 16384 or VOCAB != 128256:  # (the second: --small smoke test)
        def with_lm_head_grad():
          fb_fn = lambda a, b, c: jax.value_and_grad(
              lambda u, v: CE.fused_cross_entropy(u, v, c, lm_head_grad=True)[0], (0, 1))(a, b)
          tfb = timeit(jax.jit(fb_fn), hsd, w, lab, reps=reps)
          f3 = jax.jit(lambda a, b: (lambda lg: (lg @ b, lg.T @ a))(a @ b.T))
          t3 = timeit(f3, hsd, w, reps=reps)
          record(op="ce", model=model, tokens=t_, impl="ours, lm_head_grad=True (default pass)",
                 fwdbwd_ms=tfb, matmul3_ms=t3, **mem_of(fb_fn, hsd, w, lab))
        safe(with_lm_head_grad, op="ce", model=model, tokens=t_, impl="ours, lm_head_grad=True")

      def naive():
        fb_fn = lambda a, b, c: jax.value_and_grad(
            lambda u: CE.fused_cross_entropy_reference(u, b, c)[0])(a)
        mem = mem_of(fb_fn, hsd, w, lab)
        if mem["temp_gib"] > 60:
          record(op="ce", model=model, tokens=t_, impl="XLA naive (f32 logits)", note="not run: memory",
                 **mem)
          return
        tfb = timeit(jax.jit(fb_fn), hsd, w, lab, reps=reps)
        record(op="ce", model=model, tokens=t_, impl="XLA naive (f32 logits)", fwdbwd_ms=tfb, **mem)
      safe(naive, op="ce", model=model, tokens=t_, impl="XLA naive (f32 logits)")
      del hsd
    del w
  log("jax part done")


# ========================================================================================== torch

def run_torch(out, budget_s, ops, compile_too=True):
  os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  unsloth_err = None
  try:
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth.kernels import fast_rms_layernorm, fast_rope_embedding
  except Exception as e:  # noqa: BLE001
    unsloth_err = f"{type(e).__name__}: {str(e)[:200]}"
    fast_rms_layernorm = fast_rope_embedding = None
  try:
    from unsloth_zoo.fused_losses.cross_entropy_loss import unsloth_fused_ce_loss
  except Exception as e:  # noqa: BLE001
    unsloth_fused_ce_loss = None
    unsloth_err = unsloth_err or f"{type(e).__name__}: {str(e)[:200]}"
  import torch
  import torch.nn.functional as F
  from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

  env = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
             unsloth=None if unsloth_err else getattr(sys.modules.get("unsloth"), "__version__", "?"),
             unsloth_error=unsloth_err, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  log("env", env)
  rows = []
  dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --small smoke test only

  def timeit(f, reps=10, warmup=3):
    for _ in range(warmup):
      f()
    if dev == "cpu":
      ts = []
      for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
      return statistics.median(ts)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(2):
      a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      a.record()
      for _ in range(reps):
        f()
      b.record()
      torch.cuda.synchronize()
      best = min(best, a.elapsed_time(b) / reps)
    return best

  def peak(f):
    if dev == "cpu":
      f()
      return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    f()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30

  def record(**kw):
    rows.append(kw)
    log(kw)
    save(out, "torch.json", dict(env=env, rows=rows))

  def safe(fn, **kw):
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      record(error=f"{type(e).__name__}: {str(e)[:300]}", **kw)
    if torch.cuda.is_available():
      torch.cuda.empty_cache()

  x = torch.ones(2**30 if dev == "cuda" else 2**20, dtype=torch.bfloat16, device=dev)
  y = torch.empty_like(x)
  t = timeit(lambda: y.copy_(x), reps=20)
  record(op="copy", impl="torch copy_", ms=t, gbs=2 * x.numel() * 2 / t / 1e6)
  del x, y

  def rms_eager(norm, x):
    return norm(x)

  rms_compiled = torch.compile(rms_eager, dynamic=True)
  rope_compiled = torch.compile(apply_rotary_pos_emb, dynamic=True)

  def ce_eager(h, w, lab):
    logits = h @ w.T
    return F.cross_entropy(logits.float(), lab, ignore_index=-100, reduction="sum")

  ce_compiled = torch.compile(ce_eager, dynamic=True)

  variants_rms = [("torch eager (HF)", rms_eager)]
  variants_rope = [("torch eager (HF)", apply_rotary_pos_emb)]
  variants_ce = [("torch eager (HF)", ce_eager)]
  if compile_too:
    variants_rms.append(("torch.compile", rms_compiled))
    variants_rope.append(("torch.compile", rope_compiled))
    variants_ce.append(("torch.compile", ce_compiled))
  if fast_rms_layernorm is not None:
    variants_rms.append(("unsloth triton", lambda norm, x: fast_rms_layernorm(norm, x)))

  for model, cfg in MODELS.items() if "rmsnorm" in ops else ():
    d = cfg["d"]
    for t_ in TOKENS:
      if time.time() - T0 > budget_s:
        break
      norm = LlamaRMSNorm(d, eps=1e-5).to(dev, torch.bfloat16)
      norm.weight.requires_grad_(False)
      x = torch.randn(t_, d, device=dev, dtype=torch.bfloat16)
      dy = torch.randn_like(x)
      nb = x.numel() * 2
      for name, fn in variants_rms:
        def one():
          tf = timeit(lambda: fn(norm, x))
          xg = x.clone().requires_grad_(True)
          tfb = timeit(lambda: torch.autograd.backward(fn(norm, xg), dy))
          record(op="rmsnorm", model=model, tokens=t_, impl=name, fwd_ms=tf, fwdbwd_ms=tfb,
                 fwd_gbs=2 * nb / tf / 1e6, fwdbwd_gbs=5 * nb / tfb / 1e6)
        safe(one, op="rmsnorm", model=model, tokens=t_, impl=name)
      del x, dy

  for model, cfg in MODELS.items() if "rope" in ops else ():
    n, m, h = cfg["n"], cfg["m"], cfg["h"]
    for t_ in TOKENS:
      if time.time() - T0 > budget_s:
        break
      q = torch.randn(1, n, t_, h, device=dev, dtype=torch.bfloat16)  # HF layout [B, heads, S, H]
      k = torch.randn(1, m, t_, h, device=dev, dtype=torch.bfloat16)
      ang = torch.arange(t_, device=dev, dtype=torch.float32)[:, None] * torch.rand(h // 2, device=dev)
      emb = torch.cat([ang, ang], -1)[None]
      cos, sin = emb.cos(), emb.sin()
      nb = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 4
      variants = list(variants_rope)
      if fast_rope_embedding is not None:
        variants.append(("unsloth triton", lambda a, b, c, s: fast_rope_embedding(a, b, c[0], s[0])))
      for name, fn in variants:
        def one():
          tf = timeit(lambda: fn(q, k, cos, sin))
          qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
          def fb():
            a, b = fn(qg, kg, cos, sin)
            torch.autograd.backward([a, b], [q, k])
          tfb = timeit(fb)
          record(op="rope", model=model, tokens=t_, impl=name, fwd_ms=tf, fwdbwd_ms=tfb,
                 fwd_gbs=nb / tf / 1e6, fwdbwd_gbs=2 * nb / tfb / 1e6)
        safe(one, op="rope", model=model, tokens=t_, impl=name)
      del q, k

  for model, cfg in MODELS.items() if "ce" in ops else ():
    d = cfg["d"]
    w = (torch.randn(VOCAB, d, device=dev) / d ** 0.5).to(torch.bfloat16)
    for t_ in CE_TOKENS:
      if time.time() - T0 > budget_s:
        break
      hs = torch.randn(t_, d, device=dev, dtype=torch.bfloat16)
      lab = torch.randint(0, VOCAB, (t_,), device=dev)
      lab[::7] = -100
      reps = 5 if t_ * d <= 16384 * 4096 else 3
      def torch_matmul():
        tf = timeit(lambda: hs @ w.T, reps=reps)
        tfb = timeit(lambda: (hs @ w.T) @ w, reps=reps)
        record(op="ce", model=model, tokens=t_, impl="torch lm_head matmul only", fwd_ms=tf,
               fwdbwd_ms=tfb)
      safe(torch_matmul, op="ce", model=model, tokens=t_, impl="torch lm_head matmul only")
      variants = list(variants_ce)
      if unsloth_fused_ce_loss is not None:
        variants.append(("unsloth fused CE", lambda h_, w_, l_: unsloth_fused_ce_loss(
            None, h_[None], w_, None, l_[None], n_items=torch.tensor(1.0, device=dev),
            shift_labels=False)))
      for name, fn in variants:
        def one():
          if t_ * VOCAB * 14 > 70 * 2**30 and name != "unsloth fused CE":
            record(op="ce", model=model, tokens=t_, impl=name, note="not run: memory (>70 GiB logits)")
            return
          tf = timeit(lambda: fn(hs, w, lab), reps=reps)
          hg = hs.clone().requires_grad_(True)
          tfb = timeit(lambda: fn(hg, w, lab).backward(), reps=reps)
          mem = peak(lambda: fn(hg, w, lab).backward())
          record(op="ce", model=model, tokens=t_, impl=name, fwd_ms=tf, fwdbwd_ms=tfb,
                 peak_extra_gib=mem)
        safe(one, op="ce", model=model, tokens=t_, impl=name)
      del hs
    del w
  log("torch part done")


# ========================================================================================= report

def report(out):
  parts = {}
  for name in ("jax", "torch"):
    p = os.path.join(out, f"{name}.json")
    if os.path.exists(p):
      with open(p) as f:
        parts[name] = json.load(f)
  lines = []
  for name, part in parts.items():
    lines.append(f"- {name}: " + ", ".join(f"{k}={v}" for k, v in part["env"].items()))
  copy = [r for p in parts.values() for r in p["rows"] if r.get("op") == "copy"]
  copy_gbs = max((r["gbs"] for r in copy), default=float("nan"))
  lines.append("- copy bandwidth: " + ", ".join(f"{r['impl']} {r['gbs']:.0f} GB/s" for r in copy))

  def fmt(v, spec=".3f"):
    return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))

  rows = [r for p in parts.values() for r in p["rows"]]
  for op in ("rmsnorm", "rmsnorm_residual", "rope"):
    if not any(r.get("op") == op for r in rows):
      continue
    lines += ["", f"### {op} (bf16; GB/s and % of copy bandwidth {copy_gbs:.0f} GB/s)", "",
              "| model | tokens | impl | fwd ms | fwd GB/s (%) | bwd ms | fwd+bwd ms | fwd+bwd GB/s (%) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    sel = sorted((r for r in rows if r.get("op") == op),
                 key=lambda r: (r["model"], r["tokens"], r["impl"]))
    for r in sel:
      if "error" in r:
        lines.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | error: {r['error'][:80]} |||||")
        continue
      pct = lambda g: f"{g:.0f} ({100 * g / copy_gbs:.0f}%)" if g else "-"
      lines.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | {fmt(r.get('fwd_ms'))} | "
                   f"{pct(r.get('fwd_gbs'))} | {fmt(r.get('bwd_ms'))} | {fmt(r.get('fwdbwd_ms'))} | "
                   f"{pct(r.get('fwdbwd_gbs'))} |")
  lines += ["", "### fused lm_head + cross-entropy (bf16, V=128256, grad wrt hidden only)", "",
            "| model | tokens | impl | fwd ms | fwd+bwd ms | vs matmul fwd+bwd | extra memory GiB |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  sel = sorted((r for r in rows if r.get("op") == "ce"), key=lambda r: (r["model"], r["tokens"], r["impl"]))
  for r in sel:
    base = next((b.get("fwdbwd_ms") for b in sel if b["model"] == r["model"] and
                 b["tokens"] == r["tokens"] and b["impl"] == "lm_head matmul only" and "error" not in b), None)
    if "error" in r or "note" in r:
      extra = r.get("error", r.get("note"))[:90]
      mem = f"temp {r['temp_gib']:.2f}" if "temp_gib" in r else ""
      lines.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | {extra} | | | {mem} |")
      continue
    ratio = f"{r['fwdbwd_ms'] / base:.2f}x" if base and r.get("fwdbwd_ms") else "-"
    if r.get("matmul3_ms"):
      ratio = f"{r['fwdbwd_ms'] / r['matmul3_ms']:.2f}x of 3 matmuls ({r['matmul3_ms']:.1f} ms)"
    if "temp_gib" in r:
      mem = f"{r['temp_gib']:.2f} temp + {r['out_gib']:.2f} out (XLA)"
    elif "peak_extra_gib" in r:
      mem = f"{r['peak_extra_gib']:.2f} peak (torch)"
    else:
      mem = "-"
    lines.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | {fmt(r.get('fwd_ms'))} | "
                 f"{fmt(r.get('fwdbwd_ms'))} | {ratio} | {mem} |")
  sweeps = [r for r in rows if str(r.get("op", "")).startswith("sweep") or
            r.get("op") == "ce_config_used"]
  if sweeps:
    lines += ["", "### block-size sweeps (8B, 16K tokens; CE pass on a 1024 x 128256 bf16 chunk)", ""]
    for r in sweeps:
      lines.append("- " + ", ".join(f"{k}={fmt(v, '.3f') if isinstance(v, float) else v}"
                                    for k, v in r.items()))
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "kernels.md"), "w") as f:
    f.write(text)
  print(text)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("part", choices=["jax", "torch", "report"])
  ap.add_argument("--out", default="bench_out")
  ap.add_argument("--ops", default="rmsnorm,rope,ce", help="comma list of ops to time")
  ap.add_argument("--sweep", default="", help="comma list of rmsnorm,rope,ce block-size sweeps")
  ap.add_argument("--no-compile", action="store_true")
  ap.add_argument("--small", action="store_true", help="tiny shapes: CPU smoke test of this script")
  ap.add_argument("--budget", type=float, default=200.0, help="seconds after which sizes are skipped")
  ap.add_argument("--models", default="", help="comma list of 8B,70B (default: both)")
  ap.add_argument("--tokens", default="", help="comma list of token counts for RMSNorm/RoPE and CE")
  ap.add_argument("--rope-variants", default="",
                  help="comma list of pallas_kernels.rope.VARIANTS for --sweep rope (default: all)")
  ap.add_argument("--rope-budget", type=float, default=50.0,
                  help="seconds into --sweep rope after which no further variant starts")
  ap.add_argument("--rope-rounds", type=int, default=1,
                  help="RoPE sweep: time every chain this many times, interleaved; the median counts")
  ap.add_argument("--rope-threads", type=int, default=8,
                  help="threads compiling the --sweep rope chains (1: one after another)")
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  if a.small:
    global VOCAB, TOKENS, CE_TOKENS, ROPE_SWEEP_TOKENS
    MODELS.clear()
    MODELS.update({"tiny": dict(d=256, n=4, m=2, h=128)})
    VOCAB, TOKENS, CE_TOKENS, ROPE_SWEEP_TOKENS = 1000, [64], [64], [64]
  if a.models:
    for name in [m for m in MODELS if m not in a.models.split(",")]:
      del MODELS[name]
  if a.tokens:
    TOKENS[:] = CE_TOKENS[:] = [int(t) for t in a.tokens.split(",")]
  if a.part == "jax":
    run_jax(a.out, a.sweep, a.budget, set(a.ops.split(",")), a.rope_variants, a.rope_budget,
            a.rope_threads, a.rope_rounds)
  elif a.part == "torch":
    run_torch(a.out, a.budget, set(a.ops.split(",")), compile_too=not a.no_compile)
  else:
    report(a.out)


if __name__ == "__main__":
  main()
