"""NF4 weights (jaxsloth.quant), the bnb tensor reader (convert.bnb) and nf4_matmul's kernels.

CPU tests run the Pallas kernels in interpret mode; `gpu`-marked tests need an NVIDIA GPU.
Tolerances: kernels round the dequantized weight to x.dtype before the dot (as the XLA path does),
so against the f32 reference the error is bf16 rounding of W and of y: we allow
2**-7 relative to the largest |y| (bf16 has 8 significant bits).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.bnb import BnbFormatError, bnb_keys, nf4_from_bnb_tensors
from jaxsloth.quant import (DYNAMIC_MAP, NF4, NF4_CODE, dequantize_absmax, dequantize_nf4,
                            nf4_nbytes, quantize_nf4, stack_nf4, unstack_nf4)
from pallas_kernels import nf4_matmul as nf4_mod
from pallas_kernels.nf4_matmul import (Plan, nf4_dequantize_pallas, nf4_matmul,
                                       nf4_matmul_reference)

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")


def _weight(n, k, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (n, k), jnp.float32).astype(dtype)


# ------------------------------------------------------------------ numpy oracles of bnb's rules

def _np_nf4_codes(w: np.ndarray, bs: int):
  """Nearest NF4 code of w / absmax per block (ties impossible on random data), packed hi-first."""
  n, k = w.shape
  blocks = w.astype(np.float32).reshape(-1, bs)
  absmax = np.abs(blocks).max(1)
  scaled = blocks * (np.float32(1) / absmax)[:, None]
  idx = np.abs(scaled[..., None] - NF4_CODE).argmin(-1).astype(np.uint8).reshape(n, k)
  return (idx[:, 0::2] << 4) | idx[:, 1::2], absmax.reshape(n, k // bs)


def _np_dquantize(x: float) -> int:
  """bitsandbytes' dQuantize<0> binary search, scalar python, for the 8-bit dynamic map."""
  code = DYNAMIC_MAP
  pivot, upper_pivot, lower_pivot, lower, upper = 127, 255, 0, -1.0, 1.0
  val = code[pivot]
  i = 64
  while i > 0:
    if x > val:
      lower_pivot, lower, pivot = pivot, val, pivot + i
    else:
      upper_pivot, upper, pivot = pivot, val, pivot - i
    val = code[pivot]
    i >>= 1
  if upper_pivot == 255:
    upper = code[255]
  if lower_pivot == 0:
    lower = code[0]
  if x > val:
    return upper_pivot if x > np.float32((upper + val) * np.float32(0.5)) else pivot
  return lower_pivot if x < np.float32((lower + val) * np.float32(0.5)) else pivot


# ------------------------------------------------------------------ tables and quantization

def test_tables_are_bnb_shaped():
  assert NF4_CODE.shape == (16,) and NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
  assert DYNAMIC_MAP.shape == (256,) and np.all(np.diff(DYNAMIC_MAP) >= 0)
  assert DYNAMIC_MAP[127] == 0 and DYNAMIC_MAP[255] == 1 and DYNAMIC_MAP[0] > -1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_codes_and_absmax_follow_bnb_layout(dtype):
  w = _weight(24, 192, dtype=dtype)
  q = quantize_nf4(w, double_quant=False)
  codes, absmax = _np_nf4_codes(np.asarray(w, np.float32), 64)
  np.testing.assert_array_equal(np.asarray(q.codes), codes)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  assert q.dtype == jnp.dtype(dtype).name and q.shape == (24, 192)


def test_double_quant_keeps_codes_and_uses_bnb_binary_search():
  w = _weight(64, 1024, seed=3)
  plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w)
  np.testing.assert_array_equal(np.asarray(plain.codes), np.asarray(dq.codes))
  assert dq.absmax.dtype == jnp.uint8 and dq.nested_absmax.shape == (4,)
  centred = np.asarray(plain.absmax).reshape(-1) - np.float32(dq.absmax_offset)
  np.testing.assert_allclose(float(dq.absmax_offset), np.asarray(plain.absmax).mean(), rtol=1e-6)
  nested = np.abs(centred.reshape(-1, 256)).max(1)
  np.testing.assert_array_equal(np.asarray(dq.nested_absmax), nested)
  scaled = (centred.reshape(-1, 256) * (np.float32(1) / nested)[:, None]).reshape(-1)
  expect = [_np_dquantize(np.float32(v)) for v in scaled]
  np.testing.assert_array_equal(np.asarray(dq.absmax).reshape(-1), expect)


def test_dynamic_quantize_midpoint_rules():
  # values exactly on and around code points and midpoints exercise every branch of the search
  from jaxsloth.quant import _dynamic_quantize
  mids = (DYNAMIC_MAP[1:] + DYNAMIC_MAP[:-1]) * np.float32(0.5)
  xs = np.concatenate([DYNAMIC_MAP, mids, np.nextafter(mids, 2), np.nextafter(mids, -2),
                       [-1.0, 1.0, 0.0]]).astype(np.float32)
  got = np.asarray(_dynamic_quantize(jnp.asarray(xs)))
  np.testing.assert_array_equal(got, [_np_dquantize(x) for x in xs])


def test_dequantize_error_is_within_half_a_code_gap():
  w = _weight(32, 256, seed=1)
  q = quantize_nf4(w, double_quant=False)
  err = np.abs(np.asarray(dequantize_nf4(q, jnp.float32)) - np.asarray(w))
  half_gap = np.diff(NF4_CODE).max() / 2
  bound = np.repeat(np.asarray(q.absmax), 64, axis=1) * half_gap * (1 + 1e-6)
  assert np.all(err <= bound)


def test_double_quant_absmax_close_to_exact():
  w = _weight(32, 512, seed=2)
  exact = np.asarray(quantize_nf4(w, double_quant=False).absmax)
  approx = np.asarray(dequantize_absmax(quantize_nf4(w)))
  assert np.abs(approx - exact).max() <= 0.02 * np.abs(exact - exact.mean()).max()


def test_zero_blocks_dequantize_to_zero():
  # (with double quant a zero block's absmax comes back as ~offset, as in bitsandbytes)
  w = jnp.zeros((4, 128)).at[0, :64].set(1.5)
  d = np.asarray(dequantize_nf4(quantize_nf4(w, double_quant=False), jnp.float32))
  np.testing.assert_array_equal(d[1:], 0)
  np.testing.assert_allclose(d[0, :64], 1.5, rtol=2e-2)


def test_quantize_and_dequantize_jit_and_pytree():
  q = quantize_nf4(_weight(16, 128))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 4
  q2 = jax.tree_util.tree_unflatten(treedef, leaves)
  np.testing.assert_array_equal(jax.jit(dequantize_nf4)(q2), dequantize_nf4(q))
  assert nf4_nbytes(q) == 16 * 64 + 16 * 2 + 4 + 4


def test_stacked_weights_run_under_scan():
  ws = [quantize_nf4(_weight(128, 128, seed=i)) for i in range(3)]
  s = stack_nf4(ws)
  assert s.codes.shape == (3, 128, 64) and s.shape == (128, 128)
  assert dequantize_nf4(s).shape == (3, 128, 128)
  x = jax.random.normal(jax.random.key(9), (2, 128), jnp.float32)
  y, _ = jax.lax.scan(lambda c, w: (nf4_matmul(c, w), None), x, s)
  ref = x
  for w in unstack_nf4(s):
    ref = nf4_matmul(ref, w)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("plan", ["xla", "fused-f32"])
def test_grad_through_remat_scan_over_stacked_weights(plan):
  # what the model does: scan over layers, each layer checkpointed, W frozen (integer leaves)
  s = stack_nf4([quantize_nf4(_weight(64, 64, seed=i)) for i in range(2)])
  x = jax.random.normal(jax.random.key(3), (3, 64), jnp.float32)

  def loss(x, matmul):
    body = jax.checkpoint(lambda c, w: (jnp.tanh(matmul(c, w)), None))
    return jnp.sum(jax.lax.scan(body, x, s)[0] ** 2)

  g = jax.jit(jax.grad(lambda x: loss(x, lambda c, w: nf4_matmul(c, w, plan=PLANS[plan]))))(x)
  g_ref = jax.grad(lambda x: loss(x, nf4_matmul_reference))(x)
  np.testing.assert_allclose(g, g_ref, rtol=0, atol=2**-7 * np.abs(g_ref).max())


# ------------------------------------------------------------------ bad input

def test_quantize_rejects_bad_input():
  with pytest.raises(ValueError, match="multiple of blocksize"):
    quantize_nf4(jnp.ones((4, 100)))
  with pytest.raises(ValueError, match="2-D"):
    quantize_nf4(jnp.ones((4, 4, 64)))
  with pytest.raises(ValueError, match="dtype"):
    quantize_nf4(jnp.ones((4, 64), jnp.int32))
  with pytest.raises(ValueError, match="power of two"):
    quantize_nf4(jnp.ones((4, 96)), blocksize=48)


def test_stack_rejects_mismatched_layers():
  with pytest.raises(ValueError, match="item 1"):
    stack_nf4([quantize_nf4(_weight(8, 64)), quantize_nf4(_weight(8, 128))])


def test_matmul_rejects_bad_input():
  q = quantize_nf4(_weight(8, 64))
  with pytest.raises(ValueError, match="K=64"):
    nf4_matmul(jnp.ones((2, 32)), q)
  with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
    nf4_matmul(jnp.ones((2, 64), jnp.int32), q)
  with pytest.raises(ValueError, match="stacked"):
    nf4_matmul(jnp.ones((2, 64)), stack_nf4([q, q]))
  with pytest.raises(ValueError, match="implementation"):
    nf4_matmul(jnp.ones((2, 64)), q, implementation="cuda")
  bad = dataclasses.replace(q, absmax=q.absmax.astype(jnp.float32))
  with pytest.raises(ValueError, match="`absmax` must be uint8"):
    nf4_matmul(jnp.ones((2, 64)), bad)


# ------------------------------------------------------------------ kernels vs reference

PLANS = {
    "xla": Plan("xla", "xla"),
    "fused-f32": Plan("fused", "fused", decode="f32", bn=16, bwd_bn=16, unroll=2),
    "fused-pair": Plan("fused", "fused", decode="pair", bn=32, bwd_bn=16, split=2),
    "fused-select": Plan("fused", "fused", decode="select", bn=16, bwd_bn=32),
    "dequant-f32": Plan("dequant", "dequant", decode="f32", dq_bn=16, dq_blocks=2),
    "gemv-select": Plan("fused", "fused", decode="select", gemv=True, bn=32, bwd_bn=16),
    "split-pair": Plan("fused", "fused", decode="pair", x_split=True, bn=16, bwd_bn=16),
    # several quantization blocks per loop step ([bn, chunk, P] tiles); CUDA-core GEMV for M > 1
    "chunk-select": Plan("fused", "fused", decode="select", bn=16, chunk=2, unroll=1,
                         bwd_bn=16),
    "gemv-pair-chunk": Plan("fused", "fused", decode="pair", gemv=True, bn=8, chunk=2,
                            bwd_bn=16),
    # next step's tiles loaded before this step's math (carried through the loop)
    "gemv-prefetch": Plan("fused", "fused", decode="f32", gemv=True, bn=8, chunk=1,
                          prefetch=True, bwd_bn=16),
    "chunk-prefetch": Plan("fused", "fused", decode="pair", bn=16, chunk=1, prefetch=True,
                           x_split=True, bwd_bn=16),
    # y.T = W @ x.T: the decoded W is the dot's left operand, output written transposed
    "wlhs-select": Plan("fused", "fused", decode="select", bn=16, chunk=2, unroll=1,
                        x_split=True, w_lhs=True, bwd_bn=16),
    # PTX byte-permute decode (its jnp emulation in interpret mode)
    "wlhs-prmt": Plan("fused", "fused", decode="prmt", bn=16, chunk=2, unroll=1, x_split=True,
                      w_lhs=True, bwd_bn=16),
    "gemv-fma": Plan("fused", "fused", decode="prmt", gemv=True, gemv_fma=True, bn=8, chunk=2,
                     prefetch=True, bwd_bn=16),
    "gemv-prmt": Plan("fused", "fused", decode="prmt", gemv=True, bn=8, chunk=2, prefetch=True,
                      bwd_bn=16),
    # the decoded tile put in W's column order in registers, x read as is
    "wlhs-interleave": Plan("fused", "fused", decode="prmt", bn=16, chunk=2, unroll=1,
                            w_lhs=True, interleave=True, bwd_bn=16),
    # the bwd GEMV accumulating elementwise, rows summed once
    "gemv-row-acc": Plan("fused", "fused", decode="prmt", gemv=True, bn=8, chunk=2,
                         bwd_bn=16, bwd_row_acc=True, split=2),
    "interleave-f32": Plan("fused", "fused", decode="f32", bn=32, chunk=1, interleave=True,
                           bwd_bn=16),
    # both tiles scaled in bf16 by the PTX block (its jnp emulation in interpret mode)
    "wlhs-prmt-bf16": Plan("fused", "fused", decode="prmt_bf16", bn=16, chunk=2, unroll=1,
                           x_split=True, w_lhs=True, prefetch=True, bwd_bn=16),
    "interleave-prmt-bf16": Plan("fused", "fused", decode="prmt_bf16", bn=16, chunk=2, unroll=1,
                                 w_lhs=True, interleave=True, bwd_bn=32, split=2),
    "rhs-prmt-bf16": Plan("fused", "fused", decode="prmt_bf16", bn=16, chunk=1, bwd_bn=16),
    # the M=1 GEMV forward with the tensor-core backward (dy padded to 16 rows)
    "gemv-tc-bwd-bf16": Plan("fused", "fused", decode="prmt_bf16", gemv=True, bn=8, chunk=2,
                             prefetch=True, bwd_gemv=False, bwd_bn=32),
}
# (M, N, K): M and N off every tile size; K a multiple of the blocksize (64).
SHAPES = [(1, 40, 128), (7, 96, 192), (33, 24, 256)]


def _check_close(got, ref):
  got = np.asarray(got, np.float32)
  ref = np.asarray(ref, np.float32)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2**-7 * np.abs(ref).max())


# every plan on the odd shape, the main plans on all (interpret mode is slow: keep CI < 2 min)
CASES = [(p, s) for p in PLANS for s in SHAPES if p in ("fused-f32", "dequant-f32")
         or s == SHAPES[1] or (p.startswith("gemv") and s[0] == 1)
         or (p in ("wlhs-interleave", "interleave-prmt-bf16") and s[0] == 33)]


def _check_against_reference(q, x, plan=None, dy_seed=7):
  """Jitted nf4_matmul (plan None: the dispatch) and its dx for a random dy against the f32
  reference; returns (y, dx)."""
  f = jax.jit(lambda x: nf4_matmul(x, q, plan=plan))
  y = f(x)
  _check_close(y, nf4_matmul_reference(x, q))
  dy = jax.random.normal(jax.random.key(dy_seed), y.shape, jnp.bfloat16)
  dx = jax.vjp(f, x)[1](dy)[0]
  _check_close(dx, jax.vjp(lambda x: nf4_matmul_reference(x, q), x)[1](dy.astype(jnp.float32))[0])
  return y, dx


@pytest.mark.parametrize("plan,mnk", CASES, ids=lambda v: v if isinstance(v, str) else
                         "x".join(map(str, v)))
def test_matmul_and_grad_match_reference(plan, mnk):
  m, n, k = mnk
  q = quantize_nf4(_weight(n, k, seed=m))
  x = jax.random.normal(jax.random.key(m + 1), (m, k), jnp.bfloat16)
  y, dx = _check_against_reference(q, x, PLANS[plan])
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16


@pytest.mark.parametrize("m", [1, 5, 40, 300])
def test_dispatch_keeps_f32_inputs_exact(m):
  """The measured plans decode through bf16-rounded codebooks; for f32 x the dispatch switches both
  passes to the exact f32 codebook, so the Pallas path matches the XLA path to f32 rounding."""
  assert nf4_mod._auto_plan(m, "pallas", jnp.bfloat16).decode in ("prmt", "prmt_bf16", "pair",
                                                                  "f32")
  plan = nf4_mod._auto_plan(m, "pallas", jnp.float32)
  assert not {plan.decode, plan.bwd_decode} & set(nf4_mod._BF16_CODEBOOK_DECODES)
  q = quantize_nf4(_weight(72, 192, seed=m))
  x = jax.random.normal(jax.random.key(m), (m, 192), jnp.float32)
  f = lambda impl: jax.jit(lambda x: nf4_matmul(x, q, implementation=impl))
  dy = jax.random.normal(jax.random.key(m + 1), (m, 72), jnp.float32)
  (a, da), (b, db) = [(f(i)(x), jax.vjp(f(i), x)[1](dy)[0]) for i in ("pallas", "xla")]
  for got, ref in ((a, b), (da, db)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                               atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("plan", ["fused-f32", "dequant-f32"])
def test_f32_inputs_and_leading_dims(plan):
  q = quantize_nf4(_weight(48, 128, seed=5))
  x = jax.random.normal(jax.random.key(6), (2, 3, 128), jnp.float32)
  y = nf4_matmul(x, q, plan=PLANS[plan])
  assert y.shape == (2, 3, 48) and y.dtype == jnp.float32
  _check_close(y, nf4_matmul_reference(x, q))


@pytest.mark.parametrize("plan", ["dequant-f32", "chunk-select", "gemv-pair-chunk"])
def test_kernels_without_double_quant(plan):
  """f32 absmax (no double-quant state) goes through the same in-kernel scale path."""
  q = quantize_nf4(_weight(40, 256, seed=8), double_quant=False)
  x = jax.random.normal(jax.random.key(9), (3, 256), jnp.bfloat16)
  _check_close(nf4_matmul(x, q, plan=PLANS[plan]), nf4_matmul_reference(x, q))


@pytest.mark.parametrize("plan", [p for p in PLANS if p != "xla"])
def test_kernels_lower_for_the_gpu(plan, triton_lowering):
  """The Triton lowering (not the interpreter) accepts every kernel, fwd and bwd: catches Pallas
  ops without a Triton rule on a CPU machine (Triton's own compile still needs the GPU)."""
  q = quantize_nf4(_weight(96, 256, seed=10))
  m = 1 if plan.startswith("gemv") else 7
  f = jax.jit(lambda x, dy: jax.vjp(lambda x: nf4_matmul(x, q, plan=PLANS[plan]), x)[1](dy))
  args = (jnp.ones((m, 256), jnp.bfloat16), jnp.ones((m, 96), jnp.bfloat16))
  text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text          # the kernels went through Triton, not the interpreter
  assert triton_lowering is None or triton_lowering[0] >= 2   # fwd and bwd verified


@pytest.mark.parametrize("bucket,m", [("m1", 1), ("small", 5), ("mid", 40)])
@pytest.mark.parametrize("k", [192, 320, 448])
def test_dispatched_plans_lower_for_odd_block_counts(bucket, m, k, triton_lowering):
  """K / blocksize = 3, 5, 7 quantization blocks per row: the measured plans' [bn, chunk, P] tiles
  stay powers of two (the Triton lowering refuses others; on the H100, K=192 at M=1 did)."""
  q = quantize_nf4(_weight(96, k, seed=k))
  plan = nf4_mod.TUNED[bucket]
  assert nf4_mod._bucket(m) == bucket
  f = jax.jit(lambda x, dy: jax.vjp(lambda x: nf4_matmul(x, q, plan=plan), x)[1](dy))
  args = (jnp.ones((m, k), jnp.bfloat16), jnp.ones((m, 96), jnp.bfloat16))
  assert "__gpu$xla.gpu.triton" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_fwd_split_has_its_own_target_for_narrow_weights():
  """K = 4096 in 32 steps of 2 blocks, 64-row tiles: N = 4096 (64 tiles) splits K to reach ~512
  programs with narrow_programs=512 (8 ways), ~1024 without (16); N = 4160 is not narrow."""
  plan = Plan("fused", "fused", bn=64, chunk=2, fwd_programs=1024, narrow_programs=512)
  assert nf4_mod._fwd_split(4096, 64, 32, plan) == 8
  assert nf4_mod._fwd_split(4096, 64, 32, dataclasses.replace(plan, narrow_programs=0)) == 16
  assert nf4_mod._fwd_split(nf4_mod.NARROW_N + 64, 66, 32, plan) == 8   # 1024 // 66 -> 8 (512: 4)
  assert nf4_mod._fwd_split(14336, 224, 32, plan) == 4
  assert nf4_mod._fwd_split(4096, 64, 32, dataclasses.replace(plan, split=2)) == 2
  assert nf4_mod.TUNED["small"].narrow_programs == 512


def test_prmt_follows_ptx_semantics():
  """The emulation of PTX prmt.b32 (default mode): byte i of the result is byte (nibble i & 7) of
  {b, a}, or that byte's sign replicated when the nibble's bit 3 is set."""
  a, b = jnp.uint32(0x33221100), jnp.uint32(0xF7E6D5C4)
  assert int(nf4_mod._prmt(a, b, jnp.uint32(0x3210))) == 0x33221100
  assert int(nf4_mod._prmt(a, b, jnp.uint32(0x7654))) == 0xF7E6D5C4
  assert int(nf4_mod._prmt(a, b, jnp.uint32(0x0415))) == 0x00C411D5
  assert int(nf4_mod._prmt(a, b, jnp.uint32(0x8C0F))) == 0x00FF00FF   # signs of 0xF7, -, 0xC4, 0x00


def test_prmt_decode_is_the_bf16_codebook():
  """Every byte: the byte-permute lookups give the "pair" table's word (bf16 NF4 value of the high
  nibble << 16 | of the low nibble), and the PTX holds the same planes."""
  b = jnp.arange(256, dtype=jnp.int32)
  words = nf4_mod._prmt_decode_emulated(b.astype(jnp.uint8))
  np.testing.assert_array_equal(np.asarray(words), np.asarray(nf4_mod._tables("pair")))
  code = NF4_CODE.astype(jnp.bfloat16).astype(np.float32)
  hi = (np.asarray(words) & np.uint32(0xFFFF0000)).view(np.float32)
  np.testing.assert_array_equal(hi, code[np.arange(256) >> 4])
  asm = nf4_mod._prmt_asm()
  lo_w, hi_w = nf4_mod._prmt_planes()
  for j in range(4):
    assert f"mov.b32 l{j}, {lo_w[j]:#010x};" in asm and f"mov.b32 h{j}, {hi_w[j]:#010x};" in asm
  assert asm.count("prmt.b32") == 16 and asm.count("0x5140") == 2


def _bf16x2_fma(a, b, c):
  """PTX fma.rn.bf16x2 on uint32 words: per 16-bit half, a * b + c rounded once to bf16 (f64 holds
  the exact value of any bf16 product plus a bf16 addend of these magnitudes)."""
  half = lambda w, i: ((w >> (16 * i)) & 0xFFFF).astype(np.uint32)
  as_f = lambda h: (h << 16).view(np.float32).astype(np.float64)
  out = np.zeros_like(a)
  for i in range(2):
    exact = as_f(half(a, i)) * as_f(half(b, i)) + as_f(half(c, i))
    r = np.asarray(jnp.asarray(exact.astype(np.float32)).astype(jnp.bfloat16))
    assert np.all(exact.astype(np.float32) == exact)   # so that one f32 -> bf16 rounding is exact
    out |= r.view(np.uint16).astype(np.uint32) << (16 * i)
  return out


def _run_ptx(asm: str, inputs: dict, shared=None) -> dict:
  """A tiny interpreter for the straight-line b32 PTX of `_prmt_asm` and `_prmt_bf16_asm` (mov,
  and, or, shr, prmt, fma.rn.bf16x2), and of nf4_mgpu's `lut_asm` (mad.lo.u32, and ld.shared.b32
  from `shared`, a uint8 array addressed in bytes) on numpy uint32 arrays: operands are registers
  or immediates; returns every register."""
  regs = {k: np.asarray(v, np.uint32) for k, v in inputs.items()}
  val = lambda o: np.uint32(int(o, 0)) if o[0].isdigit() else regs[o]
  body = asm.strip().removeprefix("{").removesuffix("}")
  for ins in filter(None, (i.strip() for i in body.split(";"))):
    op, _, rest = ins.partition(" ")
    if op == ".reg":
      continue
    d, *src = [o.strip() for o in rest.split(",")]
    if op == "ld.shared.b32":                      # d, [address register]
      addr = regs[src[0].strip("[]")].astype(np.int64)
      regs[d] = sum(shared[addr + i].astype(np.uint32) << np.uint32(8 * i) for i in range(4))
      continue
    a = [val(o) for o in src]
    if op == "mov.b32":
      regs[d] = np.broadcast_to(a[0], next(iter(inputs.values())).shape).astype(np.uint32).copy()
    elif op == "and.b32":
      regs[d] = a[0] & a[1]
    elif op == "or.b32":
      regs[d] = a[0] | a[1]
    elif op == "shr.b32":
      regs[d] = a[0] >> a[1]
    elif op == "mad.lo.u32":
      regs[d] = (a[0].astype(np.uint64) * a[1] + a[2]).astype(np.uint32)
    elif op == "fma.rn.bf16x2":
      regs[d] = _bf16x2_fma(*np.broadcast_arrays(*a))
    elif op == "prmt.b32":
      regs[d] = np.asarray(nf4_mod._prmt(jnp.asarray(a[0], jnp.uint32), jnp.asarray(a[1], jnp.uint32),
                                         jnp.asarray(a[2], jnp.uint32)))
    else:
      raise AssertionError(f"unexpected PTX instruction {ins!r}")
  return regs


def test_prmt_asm_text_computes_the_pair_words():
  """The PTX string itself, run by a small interpreter on CPU: for 4 code bytes in $4, $0..$3 are
  the "pair" words of bytes 0..3 (what the GPU tests check end to end with Triton's packing)."""
  rng = np.random.default_rng(0)
  words = np.concatenate([rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32),
                          np.array([0, 0xFFFFFFFF, 0x88888888, 0x77777777, 0x01234567, 0xFEDCBA98],
                                   np.uint32)])
  out = _run_ptx(nf4_mod._prmt_asm(), {"$4": words})
  pair = np.asarray(nf4_mod._tables("pair"))
  for i in range(4):
    np.testing.assert_array_equal(out[f"${i}"], pair[(words >> (8 * i)) & 0xFF])
  np.testing.assert_array_equal(out["$4"], words)      # the input register is never written


def _bf16_words(v):
  """bf16 values -> their 16-bit patterns as uint32."""
  return np.asarray(jnp.asarray(v, jnp.bfloat16)).view(np.uint16).astype(np.uint32)


def test_prmt_bf16_emulation_scales_the_bf16_codebook():
  """Every byte and a spread of scales: the emulated block gives bf16(bf16(code) * bf16(scale)) of
  the high and of the low nibble, within 1.5 bf16 ulp of the f32 dequantization."""
  c = jnp.tile(jnp.arange(256, dtype=jnp.int32), 5).astype(jnp.uint8)
  a = jnp.repeat(jnp.asarray([0.0, 1.0, 0.0123, 3.7, -2.5e-3], jnp.float32), 256)
  hi, lo = nf4_mod._prmt_bf16_emulated(c, a.astype(jnp.bfloat16))
  assert hi.dtype == lo.dtype == jnp.bfloat16
  code_bf = NF4_CODE.astype(jnp.bfloat16).astype(np.float32)
  a_bf = np.asarray(a.astype(jnp.bfloat16), np.float32)
  for got, nib in ((hi, np.asarray(c) >> 4), (lo, np.asarray(c) & 15)):
    want = np.asarray(jnp.asarray(code_bf[nib] * a_bf).astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    exact = NF4_CODE[nib].astype(np.float64) * np.asarray(a, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=1.5 * 2**-7, atol=0)


def test_prmt_bf16_asm_text_computes_the_scaled_values():
  """The two-result PTX block itself, run by the small interpreter: for 4 code bytes in $4 and
  bf16 scale pairs in $5, $6, the words $0..$3 hold what the emulation gives, byte by byte (the
  first byte of each pair in the low half), and no input register is written."""
  rng = np.random.default_rng(1)
  n = 4096
  words = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
  scales = rng.uniform(-4, 4, (n, 4)).astype(np.float32) * 10.0 ** rng.integers(-3, 2, (n, 4))
  sb = _bf16_words(scales)                                            # [n, 4] 16-bit patterns
  regs_in = {"$4": words, "$5": sb[:, 0] | (sb[:, 1] << 16), "$6": sb[:, 2] | (sb[:, 3] << 16)}
  out = _run_ptx(nf4_mod._prmt_bf16_asm(), regs_in)
  codes = ((words[:, None] >> (8 * np.arange(4))) & 0xFF).astype(np.uint8)   # [n, 4]
  hi, lo = nf4_mod._prmt_bf16_emulated(jnp.asarray(codes), jnp.asarray(scales, jnp.bfloat16))
  for (r0, r1), want in ((("$0", "$1"), hi), (("$2", "$3"), lo)):
    w = _bf16_words(want)
    np.testing.assert_array_equal(out[r0], w[:, 0] | (w[:, 1] << 16))
    np.testing.assert_array_equal(out[r1], w[:, 2] | (w[:, 3] << 16))
  for r, v in regs_in.items():
    np.testing.assert_array_equal(out[r], v)


def test_prmt_bf16_falls_back_where_no_bf16_dot_takes_it():
  """GEMV bodies, f16 operands and the dequant kernel decode "prmt_bf16" with the "prmt" lookups;
  f32 x gets the exact codebook from the dispatch; f16 x through the fused plan is still right."""
  assert nf4_mod._kernel_decode("prmt_bf16", jnp.bfloat16, False) == "prmt_bf16"
  assert nf4_mod._kernel_decode("prmt_bf16", jnp.bfloat16, True) == "prmt"
  assert nf4_mod._kernel_decode("prmt_bf16", jnp.float16, False) == "prmt"
  assert nf4_mod._kernel_decode("prmt", jnp.bfloat16, False) == "prmt"
  assert nf4_mod._kernel_decode("prmt_bf16", jnp.bfloat16, False, interleave=True) == "prmt"
  q = quantize_nf4(_weight(24, 128, seed=3))
  x = jax.random.normal(jax.random.key(4), (5, 128), jnp.float16)
  y = jax.jit(lambda x: nf4_matmul(x, q, plan=PLANS["wlhs-prmt-bf16"]))(x)
  assert y.dtype == jnp.float16
  _check_close(y, nf4_matmul_reference(x, q))


def test_prmt_bf16_falls_back_without_the_internal_api(monkeypatch):
  """A JAX whose internal Pallas-Triton API moved: the two-result op cannot be built, the kernels
  decode with "prmt" instead of failing."""
  assert nf4_mod._asm2_available()      # this JAX (CI's 0.10, the GPU machine's 0.11) has it

  def moved():
    raise ImportError("jax._src.pallas.triton.lowering moved")
  monkeypatch.setattr(nf4_mod, "_asm2_p", moved)
  assert nf4_mod._kernel_decode("prmt_bf16", jnp.bfloat16, False) == "prmt"


def test_pallas_dequant_is_bit_identical_to_xla():
  q = quantize_nf4(_weight(40, 256, seed=4))
  for decode in ("f32", "select"):
    d = nf4_dequantize_pallas(q, jnp.bfloat16, Plan(decode=decode, dq_bn=16, dq_blocks=2))
    np.testing.assert_array_equal(np.asarray(d, np.float32),
                                  np.asarray(dequantize_nf4(q, jnp.bfloat16), np.float32))


def test_grad_flows_to_other_params_and_weight_gets_zero_cotangent():
  q = quantize_nf4(_weight(32, 64))
  x = jax.random.normal(jax.random.key(1), (4, 64), jnp.float32)
  a = jnp.ones((64,), jnp.float32)

  def loss(a, w):
    return jnp.sum(nf4_matmul(x * a, w) ** 2)

  ga = jax.jit(jax.grad(loss))(a, q)
  ga_ref = jax.grad(lambda a: jnp.sum(nf4_matmul_reference(x * a, q) ** 2))(a)
  np.testing.assert_allclose(ga, ga_ref, rtol=1e-4, atol=1e-3 * np.abs(ga_ref).max())
  _, vjp = jax.vjp(loss, a, q)
  _, gw = vjp(jnp.float32(1))
  assert gw.codes.dtype == jax.dtypes.float0 and gw.absmax.dtype == jax.dtypes.float0
  assert float(jnp.abs(gw.absmax_offset)) == 0 and gw.nested_absmax.shape == q.nested_absmax.shape


def test_default_implementation_on_cpu_is_xla():
  q = quantize_nf4(_weight(16, 64))
  x = jnp.ones((3, 64), jnp.bfloat16)
  np.testing.assert_array_equal(nf4_matmul(x, q), nf4_matmul(x, q, implementation="xla"))
  _check_close(nf4_matmul(x, q, implementation="pallas"), nf4_matmul_reference(x, q))


# ------------------------------------------------------------------ convert.bnb

def _bnb_tensors(q: NF4, prefix="model.layers.0.mlp.down_proj"):
  """Tensors as transformers + bitsandbytes serialize them (see convert/bnb.py)."""
  n, k = q.shape
  state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": q.dtype, "shape": [n, k]}
  t = {f"{prefix}.weight": np.asarray(q.codes).reshape(-1, 1),
       f"{prefix}.weight.absmax": np.asarray(q.absmax).reshape(-1),
       f"{prefix}.weight.quant_map": NF4_CODE.copy()}
  if q.double_quant:
    state.update(nested_blocksize=256, nested_dtype="float32",
                 nested_offset=float(q.absmax_offset))
    t[f"{prefix}.weight.nested_absmax"] = np.asarray(q.nested_absmax)
    t[f"{prefix}.weight.nested_quant_map"] = DYNAMIC_MAP.copy()
  t[f"{prefix}.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(
      json.dumps(state).encode(), np.uint8).copy()
  return t


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_tensors_round_trip(double_quant):
  q = quantize_nf4(_weight(64, 256, dtype=jnp.bfloat16), double_quant=double_quant)
  t = _bnb_tensors(q, "p")
  assert sorted(t) == sorted(bnb_keys("p", double_quant=double_quant))
  r = nf4_from_bnb_tensors("p", t, (64, 256), source="mem.safetensors")
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(r)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (r.shape, r.blocksize, r.double_quant, r.dtype) == (q.shape, 64, double_quant, "bfloat16")


def _corrupt(key, value):
  t = _bnb_tensors(quantize_nf4(_weight(64, 256)), "p")
  if value is None:
    del t[f"p.{key}"]
  else:
    t[f"p.{key}"] = value(t[f"p.{key}"])
  return t


def _state_with(**kw):
  def edit(raw):
    s = json.loads(raw.tobytes())
    s.update(kw)
    return np.frombuffer(json.dumps(s).encode(), np.uint8).copy()
  return edit


@pytest.mark.parametrize("key,value,match", [
    ("weight.absmax", None, "missing tensor 'p.weight.absmax'"),
    ("weight", lambda v: v[:-1], "'p.weight'.*bytes"),
    ("weight", lambda v: v.astype(np.int8), "'p.weight'.*uint8"),
    ("weight.absmax", lambda v: v.astype(np.float32), "'p.weight.absmax'.*uint8"),
    ("weight.quant_map", lambda v: v * 2, "'p.weight.quant_map'.*NF4"),
    ("weight.nested_quant_map", lambda v: v[::-1].copy(), "'p.weight.nested_quant_map'"),
    ("weight.nested_absmax", lambda v: -v, "'p.weight.nested_absmax'.*negative"),
    ("weight.quant_state.bitsandbytes__nf4", lambda v: v[:-3], "not valid packed JSON"),
    ("weight.quant_state.bitsandbytes__nf4", _state_with(quant_type="fp4"), "nf4"),
    ("weight.quant_state.bitsandbytes__nf4", _state_with(shape=[256, 64]), "config.json"),
    ("weight.quant_state.bitsandbytes__nf4", _state_with(blocksize=48), "blocksize"),
    ("weight.quant_state.bitsandbytes__nf4", _state_with(nested_offset="x"), "nested_offset"),
])
def test_bnb_reader_names_the_bad_tensor(key, value, match):
  with pytest.raises(BnbFormatError, match=match):
    nf4_from_bnb_tensors("p", _corrupt(key, value), (64, 256), source="ckpt.safetensors")


def test_bnb_reader_rejects_k_not_multiple_of_blocksize():
  t = _bnb_tensors(quantize_nf4(_weight(64, 256)), "p")
  t["p.weight.quant_state.bitsandbytes__nf4"] = _state_with(shape=[512, 32])(
      t["p.weight.quant_state.bitsandbytes__nf4"])
  with pytest.raises(BnbFormatError, match="multiple of blocksize"):
    nf4_from_bnb_tensors("p", t, (512, 32), source="ckpt.safetensors")


# ------------------------------------------------------------------ GPU

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["fused-select", "gemv-select", "split-pair", "dequant-f32",
                                  "chunk-select", "gemv-pair-chunk", "gemv-prefetch",
                                  "chunk-prefetch", "wlhs-select", "wlhs-prmt", "gemv-prmt",
                                  "gemv-fma", "wlhs-interleave", "interleave-f32",
                                  "gemv-row-acc", "wlhs-prmt-bf16", "interleave-prmt-bf16",
                                  "rhs-prmt-bf16", "gemv-tc-bwd-bf16"])
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (16, 1000, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernels_match_reference(plan, mnk):
  m, n, k = mnk
  p = dataclasses.replace(PLANS[plan], bn=64, bwd_bn=64, dq_bn=32, dq_blocks=8, split=0)
  q = quantize_nf4(_weight(n, k, seed=1, dtype=jnp.bfloat16))
  x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
  _check_against_reference(q, x, p, dy_seed=3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["wlhs-interleave", "interleave-f32", "interleave-prmt-bf16"])
@pytest.mark.parametrize("m", [200, 256])
def test_gpu_interleave_at_the_mid_bucket_tiles(plan, m):
  """x in one tile of up to 256 rows with the mid bucket's tiles (64 rows of W, one quantization
  block per step, 4 warps), N and K off the tiles; fwd and the tensor-core bwd."""
  n, k = 1000, 4160
  p = dataclasses.replace(PLANS[plan], bn=64, chunk=1, num_warps=4, bwd_bn=64)
  q = quantize_nf4(_weight(n, k, seed=4, dtype=jnp.bfloat16))
  x = jax.random.normal(jax.random.key(5), (m, k), jnp.bfloat16)
  _check_against_reference(q, x, p, dy_seed=6)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 4096), (5, 4096), (16, 4096), (200, 4096), (300, 4096),
                                 (2048, 4096), (1, 4160), (16, 4160), (200, 4160)])
def test_gpu_measured_dispatch_matches_reference(m, k):
  """The default plans (TUNED, one per bucket: M=1, M<=16, M<=FUSED_MAX_M, above); K=4160 has 65
  quantization blocks per row (odd: one block per step)."""
  q = quantize_nf4(_weight(4096, k, seed=m, dtype=jnp.bfloat16))
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
  _check_against_reference(q, x, dy_seed=m + 1)


@gpu
@pytest.mark.gpu
def test_gpu_pallas_dequant_bit_identical():
  q = quantize_nf4(_weight(1024, 4096, dtype=jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(nf4_dequantize_pallas(q), np.float32),
                                np.asarray(dequantize_nf4(q, jnp.bfloat16), np.float32))


def test_backward_tied_to_the_cotangent_gives_the_same_gradient(monkeypatch):
  """The experimental scheduling barrier (TIE_BACKWARD_TO_COTANGENT) only orders work: dx is identical."""
  import pallas_kernels.nf4_matmul as nm

  q = quantize_nf4(_weight(96, 128, seed=11))
  x = jax.random.normal(jax.random.key(12), (33, 128), jnp.float32)
  dy = jax.random.normal(jax.random.key(13), (33, 96), jnp.float32)

  def dx():
    jax.clear_caches()
    return np.asarray(jax.vjp(jax.jit(lambda x: nf4_matmul(x, q, plan=PLANS["dequant-f32"])), x)[1](dy)[0])

  plain = dx()
  monkeypatch.setattr(nm, "TIE_BACKWARD_TO_COTANGENT", True)
  tied = dx()
  np.testing.assert_array_equal(tied, plain)
  dx_ref = jax.vjp(lambda x: nf4_matmul_reference(x, q), x)[1](dy)[0]
  _check_close(jnp.asarray(tied), dx_ref)
