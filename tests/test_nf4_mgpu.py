"""The Mosaic GPU NF4 kernel (pallas_kernels/nf4_mgpu.py).

CPU: the PTX block through the small PTX interpreter of test_nf4 (against its jnp emulation and the
f32 dequantization), and the whole kernel through Mosaic GPU's lowering to MLIR for sm_90 (layouts,
register mapping, shared-memory budget, transforms). GPU (Hopper): the kernel against the f32
reference on odd and Llama-sized shapes; same tolerance as test_nf4 (2**-7 of max |y|), since W is
rounded to bf16 (three roundings: codebook, absmax, product) before a bf16 wgmma with f32 sums.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsloth.quant import NF4_CODE, dequantize_nf4, quantize_nf4
from pallas_kernels import _common, nf4_mgpu
from tests.test_nf4 import _bf16_words, _run_ptx

ON_HOPPER = _common.compute_capability() == (9, 0)
hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm_90) GPU")
PLANS = [nf4_mgpu.MgpuPlan(128, 128, 64, 2), nf4_mgpu.MgpuPlan(64, 128, 128, 4, split=2),
         nf4_mgpu.MgpuPlan(64, 64, 256, 3, split=0), nf4_mgpu.MgpuPlan(128, 128, 128, 2, chunk=128),
         nf4_mgpu.MgpuPlan(128, 128, 64, 3, overlap=True),
         nf4_mgpu.MgpuPlan(64, 128, 64, 4, split=2, overlap=True),
         nf4_mgpu.MgpuPlan(256, 128, 64, 3, ws=True), nf4_mgpu.MgpuPlan(64, 128, 64, 6, ws=True),
         nf4_mgpu.MgpuPlan(256, 128, 64, 4, overlap=True, ws=True),
         nf4_mgpu.MgpuPlan(256, 128, 64, 4, ws=True, epi_rows=128),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=4, split=0, chunk=64, swap=True),
         nf4_mgpu.MgpuPlan(tile_n=128, tile_k=128, stages=3, split=2, chunk=128, swap=True),
         nf4_mgpu.MgpuPlan(tile_n=128, tile_k=128, stages=4, split=2, chunk=64, swap=True,
                           ws=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=0, swap=True, gather=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, stages=3, split=1, swap=True, gather=True),
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, swap=True, ws=True,
                           gather=True),
         nf4_mgpu.MgpuPlan(tile_m=128, tile_n=128, tile_k=128, stages=3, split=2, swap=True,
                           ws=True, gather=True),
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=128, stages=2, swap=True, ws=True,
                           gather=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=0, swap=True, dq=True),
         nf4_mgpu.MgpuPlan(tile_m=128, tile_n=128, tile_k=128, stages=2, split=2, swap=True,
                           ws=True, gather=True, dq=True),
         # session 12: several tiles per program in one pipeline, x resident
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=3, split=2, swap=True, stream=2),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, stages=4, split=1, swap=True, gather=True,
                           stream=3),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=4, split=2, swap=True, gather=True,
                           dq=True, stream=2, reduce=True),
         nf4_mgpu.MgpuPlan(tile_n=128, tile_k=256, stages=3, split=4, swap=True, dq=True,
                           stream=2, reduce=True),
         # session 12: the decode through a shared-memory table
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=0, swap=True, lut=32),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=3, split=1, swap=True, gather=True,
                           dq=True, lut=16),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=512, stages=2, split=0, swap=True, gather=True,
                           dq=True, lut=32),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=3, split=2, swap=True, dq=True,
                           stream=2, reduce=True, lut=32),
         # session 13: the split-K partials added by TMA without stream (the dispatch from M=9
         # with gather); tile_k 128, 4 programs per SM by the shared-memory model
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=0, swap=True, dq=True, lut=32,
                           reduce=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=4, swap=True, gather=True,
                           dq=True, lut=32, reduce=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, stages=2, split=0, swap=True, dq=True, lut=32),
         # session 16: the last K range's program adds the others' partials and writes y (bf16)
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=4, swap=True, gather=True,
                           dq=True, lut=32, finish=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=0, swap=True, dq=True, lut=32,
                           finish=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, stages=3, split=2, swap=True, gather=True,
                           finish=True),
         # session 13: W decoded to HBM in bf16 by the same decode, then cuBLAS (large M)
         nf4_mgpu.DEQUANT_PLAN,
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, stages=4, split=1, swap=True, gather=True,
                           dequant=True),
         nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=1, swap=True, gather=True,
                           dq=True, lut=32, dequant=True),
         # session 14: a decoder warpgroup between the copies and the wgmma warpgroups
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=3, decoder=1),
         nf4_mgpu.MgpuPlan(tile_m=128, tile_n=128, tile_k=64, stages=4, decoder=1),
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, decoder=2),
         nf4_mgpu.MgpuPlan(tile_m=192, tile_n=128, tile_k=64, stages=4, decoder=2),
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=3, decoder=1, lut=32),
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, decoder=2, lut=16),
         # session 17: the table decode in the warp-specialized gather kernel (any M)
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=3, split=1, swap=True,
                           ws=True, gather=True, lut=32),
         nf4_mgpu.MgpuPlan(tile_m=128, tile_n=128, tile_k=128, stages=3, split=0, swap=True,
                           ws=True, gather=True, dq=True, lut=32),
         # ... and as dispatched at mid M (nf4_matmul._mgpu_mid_plan)
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, split=1, swap=True,
                           ws=True, gather=True, lut=16),
         nf4_mgpu.MgpuPlan(tile_m=128, tile_n=128, tile_k=128, stages=3, split=0, swap=True,
                           ws=True, gather=True, lut=32),
         # session 18: each step's wgmma left in flight into the next, even and odd steps
         # decoding in two branches (plan.lag; the first as dispatched at M = 256-4096)
         nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, split=1, swap=True,
                           ws=True, gather=True, lut=16, lag=True),
         nf4_mgpu.MgpuPlan(tile_m=128, tile_n=128, tile_k=128, stages=3, split=0, swap=True,
                           ws=True, gather=True, lut=32, lag=True)]


def _shape_of_nf4(n, k):
  """An NF4 weight's abstract value (shapes and dtypes only), for lowering and dispatch tests."""
  return jax.eval_shape(lambda: quantize_nf4(jnp.zeros((n, k), jnp.float32)))


def _too_big(plan, m, k):
  """A swap plan without ws whose stages (with stream: x's resident rows) and table overflow shared
  memory at this M (a stream plan refuses, the others fail to compile)."""
  return bool(plan.stream or plan.lut) and nf4_mgpu._swap_smem_over(m, k, plan)


def _plan_id(p):
  return (f"{p.tile_m}x{p.tile_n}x{p.tile_k}s{p.split}c{p.chunk}{'o' * p.overlap}{'w' * p.ws}"
          f"e{p.epi_rows}{'S' * p.swap}{'G' * p.gather}{'Q' * p.dq}"
          f"{f'T{p.stream}' if p.stream else ''}{'R' * p.reduce}{f'L{p.lut}' if p.lut else ''}"
          f"{'D' * p.dequant}{f'P{p.decoder}' if p.decoder else ''}{'F' * p.finish}"
          f"{'A' * p.lag}")


def test_pair_asm_text_decodes_and_scales():
  """The PTX string, interpreted: for code words in $4 and (s, s) bf16 pairs in $5, $0..$3 hold
  the 8 weights of each word in order (high nibble first), each bf16(bf16(code) * s); inputs are
  never written."""
  rng = np.random.default_rng(0)
  n = 4096
  words = np.concatenate([rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
                          np.array([0, 0xFFFFFFFF, 0x01234567, 0xFEDCBA98], np.uint32)])
  scales = (rng.uniform(-4, 4, words.size) * 10.0 ** rng.integers(-3, 2, words.size))
  sb = _bf16_words(scales.astype(np.float32))
  regs_in = {"$4": words, "$5": sb | (sb << 16)}
  regs_in.update({f"${6 + i}": np.full(words.shape, v, np.uint32)
                  for i, v in enumerate(nf4_mgpu.pair_asm_inputs())})
  out = _run_ptx(nf4_mgpu.pair_asm(), regs_in)
  want = np.asarray(nf4_mgpu.pair_asm_emulated(words, jnp.asarray(scales, jnp.bfloat16)))
  got = np.stack([out[f"${j}"] for j in range(4)], -1)          # [n, 4] words
  got = got.view(np.uint16).reshape(-1, 8)                       # little endian: low half first
  np.testing.assert_array_equal(got, want.view(np.uint16))
  for r, v in regs_in.items():
    np.testing.assert_array_equal(out[r], v)


@pytest.mark.parametrize("copies", [32, 16])
def test_lut_asm_text_matches_the_pair_block(copies):
  """plan.lut's PTX, interpreted with its table in the columns of the (even) lanes that read it
  and a wrong table (rows rolled) in the others: the same words as `pair_asm` for every byte value
  and scale; a table one row off, or the right one only in the odd lanes' columns, fails."""
  rng = np.random.default_rng(2)
  words = np.concatenate([rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32),
                          np.arange(256, dtype=np.uint32) * 0x01010101])
  scales = (rng.uniform(-4, 4, words.size) * 10.0 ** rng.integers(-3, 2, words.size))
  sb = _bf16_words(scales.astype(np.float32))
  lanes = 2 * rng.integers(0, copies // 2, words.size)    # even columns
  base = 0x400
  want = np.asarray(nf4_mgpu.pair_asm_emulated(words, jnp.asarray(scales, jnp.bfloat16)))
  table = nf4_mgpu.lut_table(copies)
  assert table.shape == (256, copies) and table.dtype == np.uint32

  def run(right, cols):
    mem = np.roll(table, 7, axis=0)            # wrong but valid bf16 pairs
    mem[:, cols] = right[:, cols]
    shared = np.zeros(base + mem.nbytes, np.uint8)
    shared[base:] = mem.reshape(-1).view(np.uint8)
    regs_in = {"$4": words, "$5": sb | (sb << 16), "$6": (base + 4 * lanes).astype(np.uint32)}
    out = _run_ptx(nf4_mgpu.lut_asm(copies), regs_in, shared)
    for r, v in regs_in.items():
      np.testing.assert_array_equal(out[r], v)
    return np.stack([out[f"${j}"] for j in range(4)], -1).view(np.uint16).reshape(-1, 8)

  np.testing.assert_array_equal(run(table, lanes), want.view(np.uint16))
  np.testing.assert_array_equal(nf4_mgpu.lut_emulated(words, scales).view(np.uint16),
                                want.view(np.uint16))
  assert not np.array_equal(run(np.roll(table, 1, axis=0), lanes), want.view(np.uint16))
  assert not np.array_equal(run(table, lanes + 1), want.view(np.uint16))     # odd columns only


def test_lut_gather_asm_picks_byte_q_of_each_word():
  """plan.gather's table block, interpreted: for 4 code words and a lane's q, $i is byte q of
  word i through the table, scaled, as `pair_asm` decodes that byte; selecting another byte
  fails."""
  rng = np.random.default_rng(3)
  n = 2048
  words = rng.integers(0, 2**32, (n, 4), dtype=np.uint64).astype(np.uint32)
  q = rng.integers(0, 4, n)
  scales = rng.uniform(-4, 4, n) * 10.0 ** rng.integers(-3, 2, n)
  sb = _bf16_words(scales.astype(np.float32))
  table, base = nf4_mgpu.lut_table(32), 0x400
  shared = np.zeros(base + table.nbytes, np.uint8)
  shared[base:] = table.reshape(-1).view(np.uint8)
  lanes = 4 * rng.integers(0, 8, n) + q                   # lane % 4 == q

  def run(sel):
    regs_in = {**{f"${4 + i}": words[:, i] for i in range(4)}, "$8": sb | (sb << 16),
               "$9": (base + 4 * lanes).astype(np.uint32), "$10": sel.astype(np.uint32)}
    out = _run_ptx(nf4_mgpu.lut_gather_asm(32), regs_in, shared)
    for r, v in regs_in.items():
      np.testing.assert_array_equal(out[r], v)
    return np.stack([out[f"${i}"] for i in range(4)], -1)

  byte_q = (words >> (8 * q[:, None]).astype(np.uint32)) & 0xFF          # [n, 4]
  want = np.asarray(nf4_mgpu.pair_asm_emulated(byte_q[:, 0] | byte_q[:, 1] << 8 |
                                               byte_q[:, 2] << 16 | byte_q[:, 3] << 24,
                                               jnp.asarray(scales, jnp.bfloat16)))
  want = want.view(np.uint16).reshape(n, 4, 2)
  got = run(0x4440 + q).view(np.uint16).reshape(n, 4, 2)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(run(0x4440 + (q + 1) % 4).view(np.uint16).reshape(n, 4, 2), want)


def test_pair_emulation_is_the_scaled_codebook_in_order():
  """Byte j of a word holds weights 2j (high nibble) and 2j+1: the emulation's 8 values are the
  codebook of those nibbles times the scale, within 1.5 bf16 ulp of the f32 product."""
  rng = np.random.default_rng(1)
  words = rng.integers(0, 2**32, 512, dtype=np.uint64).astype(np.uint32)
  s = rng.uniform(0.01, 3, 512).astype(np.float32)
  got = np.asarray(nf4_mgpu.pair_asm_emulated(words, jnp.asarray(s, jnp.bfloat16)), np.float64)
  nib = np.stack([(words >> (8 * (j // 2) + (4 if j % 2 == 0 else 0))) & 15 for j in range(8)], -1)
  exact = NF4_CODE[nib].astype(np.float64) * s[:, None]
  np.testing.assert_allclose(got, exact, rtol=1.5 * 2**-7, atol=0)
  # a mutation: the nibble order swapped inside each byte must not pass
  swapped = np.stack([(words >> (8 * (j // 2) + (0 if j % 2 == 0 else 4))) & 15 for j in range(8)],
                     -1)
  assert not np.allclose(got, NF4_CODE[swapped] * s[:, None], rtol=1.5 * 2**-7)


@pytest.mark.skipif(not nf4_mgpu.available(), reason="no Pallas Mosaic GPU backend in this JAX")
@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
@pytest.mark.parametrize("mnk", [(16, 192, 256), (100, 320, 512), (2048, 4096, 4096),
                                 (5, 1024, 4096)])
def test_kernel_lowers_for_sm90(plan, mnk):
  """The kernel goes through Mosaic GPU's lowering (layouts, the inline PTX, the pipeline and the
  shared-memory budget) to one custom call, without a GPU."""
  m, n, k = mnk
  if plan.dq and nf4_mgpu._dq_problem(k, plan) and plan.split:
    pytest.skip("dq takes K / 64 / split a multiple of 16")
  if plan.dq and k % 1024:
    pytest.skip("dq takes K / 64 a multiple of 16")
  m = m if not plan.swap or plan.gather else min(m, 40)
  if nf4_mgpu.check_supported(k, 64, jnp.bfloat16, plan):
    pytest.skip("K not taken by this plan")
  if _too_big(plan, m, k):
    pytest.skip("x's K range does not fit in shared memory")
  w = _shape_of_nf4(n, k)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  f = jax.jit(lambda x, w: nf4_mgpu.nf4_matmul_mgpu(x, w, plan))
  text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.skipif(not nf4_mgpu.available(), reason="no Pallas Mosaic GPU backend in this JAX")
def test_reduce_at_split_1_is_the_direct_kernel():
  """plan.reduce where the split resolves to 1 lowers to exactly the kernel without it (y written
  in bf16, no TMA add into an unzeroed y: session 13's run r1 got wrong outputs from that), and at
  split 2 to another one."""
  plan = nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=0, swap=True, dq=True, lut=32)
  assert nf4_mgpu._swap_split(40, 576, 1024, plan) == 1
  with_reduce = dataclasses.replace(plan, reduce=True)
  modules = lambda p: nf4_mgpu._kernel_modules(p, 40, 576, 1024)
  assert modules(with_reduce) and modules(with_reduce) == modules(plan)
  two = lambda p: dataclasses.replace(p, split=2, dq=False)
  assert modules(two(with_reduce)) != modules(two(plan))


@pytest.mark.skipif(not nf4_mgpu.available(), reason="no Pallas Mosaic GPU backend in this JAX")
def test_finish_waits_on_a_semaphore_only_when_split():
  """plan.finish where the split resolves to 1 lowers to exactly the kernel without it; at split
  2 the K range 0 program's release of its partial and the other's acquiring wait on the tile's
  semaphore are in the module, and y comes out of the kernel in bf16 with no XLA pass after it
  (the reduce plan's zeroed buffer and transpose are gone)."""
  plan = nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=0, swap=True, dq=True, lut=32,
                           gather=True)
  assert nf4_mgpu._swap_split(40, 576, 1024, plan) == 1
  fin = dataclasses.replace(plan, finish=True)
  modules = lambda p: nf4_mgpu._kernel_modules(p, 40, 576, 1024)
  assert modules(fin) and modules(fin) == modules(plan)
  two = lambda p: dataclasses.replace(p, split=2, dq=False)
  text = "".join(modules(two(fin)))
  assert "red.release.gpu.global.add" in text and "fence.acquire.gpu" in text
  assert "red.release" not in "".join(modules(two(plan)))
  w, x = _shape_of_nf4(576, 1024), jax.ShapeDtypeStruct((40, 1024), jnp.bfloat16)
  hlo = lambda p: jax.jit(lambda x, w: nf4_mgpu.nf4_matmul_mgpu(x, w, p)).trace(x, w).lower(
      lowering_platforms=("cuda",)).as_text()
  after = lambda text: text[text.rindex("mosaic_gpu"):]     # what follows the kernel's call
  assert "transpose" not in after(hlo(two(fin)))
  assert "transpose" in after(hlo(two(dataclasses.replace(plan, reduce=True))))
  assert "finish" in nf4_mgpu.check_supported(1024, 64, jnp.bfloat16,
                                              dataclasses.replace(fin, reduce=True))


def _operand_codes(n, k, pair):
  """wgmma's register operand [n, k] as the swap kernels fill it: thread t of the warpgroup (lane
  l = t % 32, q = l % 4) holds in register (i, 8j + e, h), at logical columns 64j + 8e + 2q + (0, 1)
  of row 64i + 16(t // 32) + 8h + l // 4, the two codes pair(row, j, e, q); every slot written
  once."""
  a = np.full((n, k), np.nan)
  for t in range(128):
    lane, q = t % 32, t % 4
    for i in range(n // 64):
      for h in range(2):
        row = 64 * i + 16 * (t // 32) + 8 * h + lane // 4
        for j in range(k // 64):
          for e in range(8):
            a[row, 64 * j + 8 * e + 2 * q + np.arange(2)] = pair(row, j, e, q)
  assert not np.isnan(a).any()
  return a


def test_swap_layout_pairs_codes_with_permuted_x():
  """The swap kernel's operand, built as `_decode_regs` maps it (thread t of the warpgroup, lane
  l = t % 32, q = l % 4: register (i, 8j + e, h) holds (value of the high nibble, of the low
  nibble) of byte 32j + 8q + e of row 64i + 16(t // 32) + 8h + l // 4, and wgmma's register layout
  puts that pair at logical columns 64j + 8e + 2q + (0, 1)), times `_swap_x`'s x, is W @ x.T.
  Fails if the permutation of x or the byte a register decodes is off."""
  rng = np.random.default_rng(3)
  n, k, m = 128, 256, 5
  w = quantize_nf4(jnp.asarray(rng.normal(size=(n, k)), jnp.float32))
  codes = np.asarray(w.codes)                                # [n, k / 2], byte j: 2j hi, 2j+1 lo
  vals = np.stack([codes >> 4, codes & 15], -1).astype(np.int64)   # [n, k/2, 2]
  a = _operand_codes(n, k, lambda row, j, e, q: vals[row, 32 * j + 8 * q + e])
  x = rng.normal(size=(m, k)).astype(np.float32)
  xs = np.asarray(nf4_mgpu._swap_x(jnp.asarray(x), 8), np.float64)
  assert xs.shape == (8, k) and not xs[m:].any()
  got = NF4_CODE[a.astype(np.int64)] @ xs.T                 # codebook values, scales left out
  want = NF4_CODE[vals.reshape(n, k)] @ x.astype(np.float64).T
  np.testing.assert_allclose(got[:, :m], want, rtol=1e-9, atol=1e-9)
  bad = np.asarray(nf4_mgpu._swap_x(jnp.asarray(x[:, ::-1].copy()), 8), np.float64)
  assert not np.allclose(NF4_CODE[a.astype(np.int64)] @ bad.T[:, :m], want)


def test_gather_layout_pairs_codes_with_x_in_order():
  """plan.gather: the operand built as `_decode_gather` fills it (thread t, lane l = t % 32,
  q = l % 4: register (i, 8j + e, h) holds the pair of byte q of word e of block j of row
  64i + 16(t // 32) + 8h + l // 4, i.e. code byte 32j + 4e + q, at logical columns
  64j + 8e + 2q + (0, 1)) times x in its own order is W @ x.T. Gathering byte e*4 + q' of another
  lane q' fails it."""
  rng = np.random.default_rng(4)
  n, k, m = 128, 256, 5
  w = quantize_nf4(jnp.asarray(rng.normal(size=(n, k)), jnp.float32))
  codes = np.asarray(w.codes)
  vals = np.stack([codes >> 4, codes & 15], -1).astype(np.int64)   # [n, k/2, 2]
  words = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(codes).reshape(n, -1, 4),
                                                  jnp.uint32))      # [n, k/8]

  def operand(byte_of):
    def pair(row, j, e, q):
      byte = (int(words[row, 8 * j + e]) >> (8 * byte_of(q))) & 0xFF
      return byte >> 4, byte & 15
    return NF4_CODE[_operand_codes(n, k, pair).astype(np.int64)]

  x = rng.normal(size=(m, k))
  want = NF4_CODE[vals.reshape(n, k)] @ x.T
  np.testing.assert_allclose(operand(lambda q: q) @ x.T, want, rtol=1e-9, atol=1e-9)
  assert not np.allclose(operand(lambda q: 3 - q) @ x.T, want)


def _dq_scales(w, n_pad, tn, tile_k, split, shift_base=0, programs=None, use_shift=True):
  """plan.dq's scales as the kernel computes them (`_DQ`, `_scale_fn`, `_SwapGeom.dq_load` and
  `dq_step`), emulated with numpy f32 on `_dq_inputs`: program (ni, si), step idx, row r, block j:
  map[code] * ne_window[(r * B + base + j) >> 8] + offset, each rounded to f32, then bf16.
  programs: the ni emulated (default all; the others' columns stay 0); not use_shift: the copy
  windows of `_ne_window` without its shift of the base (a wrong kernel)."""
  am, ne, qm, off = (np.asarray(a) for a in nf4_mgpu._dq_inputs(w, n_pad, tn))
  nb_all = w.shape[1] // 64
  kr, nb = nb_all // split, tile_k // 64
  out = np.zeros((nb_all, n_pad), np.float32)
  ne_len = nf4_mgpu._ne_len(tn, nb_all)
  for ni in (range(n_pad // tn) if programs is None else programs):
    start, shift = nf4_mgpu._ne_window(ni * tn * nb_all // 256, ne_len, n_pad - tn, nb_all,
                                       ne.shape[0], minimum=min)
    win = ne[start:][:ne_len]
    assert win.shape == (ne_len,)     # the copy stays inside the array
    for si in range(split):
      for idx in range(kr // nb):
        base = si * kr + idx * nb + shift_base + shift * use_shift
        for r in range(tn):
          for j in range(nb):
            code = am[ni * tn + r, si * kr + idx * nb + j]
            at = (r * nb_all + base + j) >> 8
            prod = np.float32(qm[code]) * win[at if use_shift else min(at, ne_len - 1)]
            out[si * kr + idx * nb + j, ni * tn + r] = np.float32(prod) + off[0]
  return np.asarray(jnp.asarray(out).astype(jnp.bfloat16).astype(jnp.float32))


def test_dq_scales_match_the_prepass():
  """plan.dq's in-kernel scales (emulated) equal the XLA pre-pass's bf16 scales bit for bit, on
  rows past N's 64-row padding and several programs and steps; a base without the program's K
  offset does not."""
  n, k = 200, 4096
  w = quantize_nf4(jax.random.normal(jax.random.key(7), (n, k), jnp.float32)
                   * jnp.exp(jax.random.normal(jax.random.key(8), (n, 1))))
  want = np.asarray(nf4_mgpu._scales_bf16(w, 256).astype(jnp.float32))[:, :n]
  got = _dq_scales(w, 256, 64, 512, 2)[:, :n]
  np.testing.assert_array_equal(got, want)
  bad = _dq_scales(w, 256, 64, 512, 2, shift_base=-32)[:, :n]
  assert not np.array_equal(bad, want)


@pytest.mark.parametrize("n,k,tn", [(256, 7168, 64), (4160, 2048, 64), (4160, 14336, 64),
                                    (8192, 28672, 64), (512, 7168, 128)])
def test_dq_scales_without_a_padded_nested_absmax(n, k, tn):
  """Where W's rows need no padding, `_dq_inputs` passes the nested absmax as it is (no XLA pass)
  and the last programs' copies start early (`_ne_window`, a shifted base): the emulated scales of
  the last two programs still equal the pre-pass's bit for bit; the same copies without the shift
  do not. The shapes are ones whose last copy would run past the end (70B down among them)."""
  w = quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32)
                   * jnp.exp(jax.random.normal(jax.random.key(k), (n, 1))))
  assert nf4_mgpu._dq_inputs(w, n, tn)[1] is w.nested_absmax     # not padded: no XLA op on it
  nb = k // 64
  assert (n - tn) * nb // 256 + nf4_mgpu._ne_len(tn, nb) > w.nested_absmax.shape[0]
  last = range(n // tn - 2, n // tn)
  cols = slice(n - 2 * tn, n)
  want = np.asarray(nf4_mgpu._scales_bf16(w, n).astype(jnp.float32))[:, cols]
  np.testing.assert_array_equal(_dq_scales(w, n, tn, 512, 1, programs=last)[:, cols], want)
  bad = _dq_scales(w, n, tn, 512, 1, programs=last, use_shift=False)[:, cols]
  assert not np.array_equal(bad, want)


@pytest.mark.parametrize("tile_k,split", [(512, 7), (256, 7), (256, 14)])
def test_dq_scales_at_a_split_that_is_not_a_power_of_two(tile_k, split):
  """K = 14336 (8B down: 224 blocks of 64) split in 7 or 14: K / 64 / split (32, 16) stays a
  multiple of 16, so dq's absmax copies line up; the emulated in-kernel scales equal the
  pre-pass's bit for bit, and a base off by 8 blocks does not."""
  n, k = 256, 14336
  w = quantize_nf4(jax.random.normal(jax.random.key(1), (n, k), jnp.float32)
                   * jnp.exp(jax.random.normal(jax.random.key(2), (n, 1))))
  plan = nf4_mgpu.MgpuPlan(tile_n=64, tile_k=tile_k, stages=2, split=split, swap=True, dq=True,
                           gather=True, lut=32, reduce=True)
  assert nf4_mgpu._dq_problem(k, plan) is None
  assert nf4_mgpu._dq_problem(k, dataclasses.replace(plan, split=4)) is not None   # 56 blocks
  want = np.asarray(nf4_mgpu._scales_bf16(w, n).astype(jnp.float32))[:, :n]
  np.testing.assert_array_equal(_dq_scales(w, n, 64, tile_k, split)[:, :n], want)
  assert not np.array_equal(_dq_scales(w, n, 64, tile_k, split, shift_base=-8)[:, :n], want)


def test_auto_split_reaches_the_program_target():
  """split=0: K is split (powers of two dividing the steps) until ~PROGRAMS programs, not beyond."""
  plan = nf4_mgpu.MgpuPlan(64, 128, 128, split=0)
  assert nf4_mgpu._auto_split(16, 4096, 14336, plan) == 8          # 32 tiles -> 256 (112 steps)
  assert nf4_mgpu._auto_split(16, 28672, 8192, plan) == 1          # 224 tiles already
  assert nf4_mgpu._auto_split(16, 4096, 4096, plan) == 8           # 32 tiles, 32 steps -> 256
  assert nf4_mgpu._auto_split(2048, 4096, 4096, plan) == 1


def test_swap_split_balances_waves():
  """split=0 on swap plans: the wave model's choice (70B gate/up, 64-row tiles of 256 columns, 4
  stages: 3 programs per SM, split 4 = 5 waves of 8 + 2 steps; s10_swap2 measured 94 us for it vs
  105 unsplit), a divisor of the steps, and more split for fewer rows of W; with dq a divisor
  that is not a power of two where the powers stop (8B down, 56 steps: 14; s20_r1)."""
  plan = nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=4, swap=True)
  assert nf4_mgpu._swap_split(16, 28672, 8192, plan) == 4
  for n, k in ((28672, 8192), (8192, 28672), (1024, 4096), (4096, 14336)):
    s = nf4_mgpu._swap_split(16, n, k, plan)
    assert (k // 256) % s == 0
  assert nf4_mgpu._swap_split(16, 1024, 8192, plan) > nf4_mgpu._swap_split(16, 28672, 8192, plan)
  dq = dataclasses.replace(plan, stages=2, dq=True, lut=32, gather=True)
  assert nf4_mgpu._swap_split(16, 4096, 14336, dq) == 14
  assert nf4_mgpu._dq_problem(14336, dataclasses.replace(dq, split=14)) is None


def test_unsupported_calls_say_why():
  w = quantize_nf4(jnp.ones((64, 192), jnp.float32))
  assert "multiple of tile_k * split" in nf4_mgpu.check_supported(192, 64, jnp.bfloat16,
                                                                  nf4_mgpu.MgpuPlan(tile_k=128))
  assert "bfloat16" in nf4_mgpu.check_supported(192, 64, jnp.float32, nf4_mgpu.MgpuPlan())
  assert "blocksize" in nf4_mgpu.check_supported(256, 32, jnp.bfloat16, nf4_mgpu.MgpuPlan())
  assert "swap" in nf4_mgpu.check_supported(256, 64, jnp.bfloat16,
                                            nf4_mgpu.MgpuPlan(tile_n=64, ws=True, swap=True))
  with pytest.raises(ValueError, match="M <= 64"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((65, 256), jnp.bfloat16),
                             quantize_nf4(jnp.ones((64, 256), jnp.float32)),
                             nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, swap=True))
  assert "dq" in nf4_mgpu.check_supported(1024, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(dq=True))
  with pytest.raises(ValueError, match="dq needs K / 64"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((4, 512), jnp.bfloat16),
                             quantize_nf4(jnp.ones((64, 512), jnp.float32)),
                             nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, swap=True, dq=True))
  assert "gather" in nf4_mgpu.check_supported(256, 64, jnp.bfloat16,
                                              nf4_mgpu.MgpuPlan(gather=True))
  assert "tile_m" in nf4_mgpu.check_supported(
      256, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(tile_m=512, swap=True, gather=True))
  for bad in (nf4_mgpu.MgpuPlan(tile_n=128, skip_mma=True),
              nf4_mgpu.MgpuPlan(tile_n=128, ws=True, swap=True, skip_mma=True)):
    assert "skip_mma" in nf4_mgpu.check_supported(256, 64, jnp.bfloat16, bad)
  assert "overlap" in nf4_mgpu.check_supported(
      256, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(tile_n=64, stages=2, swap=True, overlap=True))
  assert "epi_rows" in nf4_mgpu.check_supported(
      256, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(256, 128, 64, ws=True, epi_rows=96))
  with pytest.raises(ValueError, match="tile_k"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((4, 192), jnp.bfloat16), w, nf4_mgpu.MgpuPlan(tile_k=128))
  # the decoder plans: 2 steps per pass with 3 x stages would never issue the last steps' x
  # copies (a hang on the GPU, runs s14_r6 and r7), so it is refused; so are shared memory
  # overruns and an odd number of steps
  dec = dict(tile_m=256, tile_n=128, tile_k=64, decoder=2)
  assert "stages >= max(3, 2 x decoder)" in nf4_mgpu.check_supported(
      4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(stages=3, **dec))
  assert nf4_mgpu.check_supported(4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(stages=4, **dec)) is None
  assert "shared memory" in nf4_mgpu.check_supported(
      4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(stages=4, lut=32, **dec))
  assert "multiple of it" in nf4_mgpu.check_supported(
      192, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(stages=4, **dec))
  assert "decoder" in nf4_mgpu.check_supported(
      4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(stages=4, tile_m=256, tile_n=128, tile_k=128,
                                                decoder=1))
  # the table in the warp-specialized kernel takes gather (its code words row-major, so any
  # tile_k); without ws, gather with the table takes swizzled rows of >= 128 bytes
  ws = dict(tile_m=256, tile_n=128, tile_k=64, stages=4, swap=True, ws=True, lut=16)
  assert "lut takes" in nf4_mgpu.check_supported(4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(**ws))
  assert nf4_mgpu.check_supported(4096, 64, jnp.bfloat16,
                                  nf4_mgpu.MgpuPlan(gather=True, **ws)) is None
  assert "lag takes" in nf4_mgpu.check_supported(
      4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, swap=True, lag=True))
  assert "epi_rows takes" in nf4_mgpu.check_supported(
      4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, swap=True,
                                                ws=True, gather=True, epi_rows=64))
  assert "lag takes" in nf4_mgpu.check_supported(
      4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(tile_n=128, tile_k=64, swap=True, ws=True,
                                                gather=True, stages=1, lag=True))
  assert "tile_k >= 256" in nf4_mgpu.check_supported(
      4096, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(tile_n=64, tile_k=128, swap=True, gather=True,
                                                lut=32))


@pytest.mark.skipif(not nf4_mgpu.available(), reason="no Pallas Mosaic GPU backend in this JAX")
def test_ws_gather_kernel_decodes_through_the_table():
  """plan.lut in the warp-specialized gather kernel (the mid-M dispatch): its module carries the
  table's loads (`lut_gather_asm`) and no byte-permute decode, and differs from the plan without
  the table only there; the same plan without lut keeps `pair_asm`."""
  plan = nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, split=1, swap=True,
                           ws=True, gather=True, lut=16)
  (with_lut,) = nf4_mgpu._kernel_modules(plan, 300, 1024, 1024)
  (without,) = nf4_mgpu._kernel_modules(dataclasses.replace(plan, lut=0), 300, 1024, 1024)
  table_load = "ld.shared.b32 v0"
  assert table_load in with_lut and table_load not in without
  assert "fma.rn.bf16x2 o0" in without and "fma.rn.bf16x2 o0" not in with_lut


@pytest.mark.skipif(not nf4_mgpu.available(), reason="no Pallas Mosaic GPU backend in this JAX")
def test_lag_decodes_even_and_odd_steps_in_two_branches():
  """plan.lag (the 256-row mid-M dispatch): the step's decode and wgmma twice, once per branch,
  their scales tagged apart, the step ending in wait_group 1 (its wgmma still in flight); without
  lag one copy, wait_group 0, no tags; one K step (nothing to overlap) lowers as without lag."""
  plan = nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, split=1, swap=True,
                           ws=True, gather=True, lut=16, lag=True)
  (lag,) = nf4_mgpu._kernel_modules(plan, 300, 1024, 1024)
  (plain,) = nf4_mgpu._kernel_modules(dataclasses.replace(plan, lag=False), 300, 1024, 1024)
  mma, wait1 = "wgmma.mma_async", "nvvm.wgmma.wait.group.sync.aligned 1"
  assert lag.count(mma) == 2 * plain.count(mma) > 0
  assert "// lag 0" in lag and "// lag 1" in lag and "// lag" not in plain
  assert wait1 in lag and wait1 not in plain
  one_step = lambda p: nf4_mgpu._kernel_modules(p, 300, 1024, 64)
  assert one_step(plan) == one_step(dataclasses.replace(plan, lag=False))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
@pytest.mark.parametrize("mnk", [(1, 128, 128), (16, 192, 256), (40, 576, 1024), (100, 320, 512),
                                 (300, 1000, 1024), (2048, 4096, 4096), (7, 4160, 2048)])
def test_kernel_matches_reference_on_gpu(plan, mnk):
  m, n, k = mnk
  if (nf4_mgpu.check_supported(k, 64, jnp.bfloat16, plan) or (plan.swap and not plan.gather
                                                               and m > 64)
      or (plan.dq and (k % 1024 or (plan.split and nf4_mgpu._dq_problem(k, plan))))
      or _too_big(plan, m, k)):
    pytest.skip("shape not taken by this plan")
  x, w = _operands(m, n, k)
  y = _run(plan, x, w)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  _assert_close(y, x, w)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,ws", [(16, 8192, 8192, False), (5, 4160, 14336, False),
                                      (300, 4096, 4096, True)])
def test_dq_equals_the_prepass_bitwise_on_gpu(m, n, k, ws):
  """plan.dq (the double quant undone in the kernel, mul and add rounded apart, then bf16) gives
  exactly the scales of the XLA pre-pass (`dequantize_absmax` -> bf16): the outputs of the same
  plan with and without it are bit-identical."""
  # the same split on both sides (split=0 may pick another for dq: the f32 partial sums differ)
  plan = (nf4_mgpu.MgpuPlan(tile_m=128, tile_n=128, tile_k=128, stages=3, split=2, swap=True,
                            ws=True, gather=True) if ws else
          nf4_mgpu.MgpuPlan(tile_n=64, tile_k=512, stages=2, split=2, swap=True))
  _assert_bitwise_equal(plan, dataclasses.replace(plan, dq=True), *_operands(m, n, k))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("tile_k,split", [(512, 7), (256, 14)])
def test_dq_at_a_split_that_is_not_a_power_of_two_on_gpu(tile_k, split):
  """8B down's shape at M=16 (K = 14336, 4096 rows of W) with K split in 7 or 14 (split 4 is
  refused by dq): the same bits with and without dq where XLA sums the f32 partials (in a fixed
  order), and the dispatched form, the partials added by TMA (plan.reduce: in the order the
  programs finish, so not bitwise repeatable), within bf16 tolerance of the f32 reference."""
  plan = nf4_mgpu.MgpuPlan(tile_n=64, tile_k=tile_k, stages=2, split=split, swap=True,
                           gather=True, lut=32)
  x, w = _operands(16, 4096, 14336)
  _assert_bitwise_equal(plan, dataclasses.replace(plan, dq=True), x, w)
  _assert_close(_run(dataclasses.replace(plan, dq=True, reduce=True), x, w), x, w)


def _operands(m, n, k):
  """Random x [m, k] (bf16) and NF4 W [n, k], keyed by m and n."""
  w = quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) * 0.02)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
  return x, w


def _run(plan, x, w):
  return np.asarray(jax.jit(lambda x, w: nf4_mgpu.nf4_matmul_mgpu(x, w, plan))(x, w))


def _assert_close(y, x, w):
  """y is within the kernel tolerance (2^-7 of max |ref|) of the f32 product x @ W.T."""
  ref = np.asarray(x, np.float32) @ np.asarray(dequantize_nf4(w, jnp.float32)).T
  assert np.abs(y.astype(np.float32) - ref).max() / np.abs(ref).max() < 2**-7


def _assert_bitwise_equal(plan, other, x, w):
  """Two plans' outputs on x and W are bit-identical, and within the kernel tolerance of the
  f32 reference."""
  a, b = _run(plan, x, w), _run(other, x, w)
  assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
  _assert_close(b, x, w)


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,lut,flags", [(16, 8192, 8192, 32, dict(dq=True)),
                                             (1, 4160, 14336, 16, {}),
                                             (40, 1000, 2048, 32, dict(gather=True)),
                                             (5, 4096, 4096, 8, dict(dq=True, gather=True))])
def test_lut_equals_the_byte_permutes_bitwise_on_gpu(m, n, k, lut, flags):
  """plan.lut (each byte's bf16 pair from the shared-memory table) gives exactly the outputs of
  the same plan decoding with `pair_asm`'s byte permutes."""
  plan = nf4_mgpu.MgpuPlan(tile_n=64, tile_k=256, stages=2, split=2, swap=True, **flags)
  _assert_bitwise_equal(plan, dataclasses.replace(plan, lut=lut), *_operands(m, n, k))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,plan", [
    (4160, 4096, nf4_mgpu.DEQUANT_PLAN),
    (576, 2048, dataclasses.replace(nf4_mgpu.DEQUANT_PLAN, lut=32, split=1)),
    (1000, 1024, dataclasses.replace(nf4_mgpu.DEQUANT_PLAN, dq=False, tile_k=128, stages=4))])
def test_dequantize_mgpu_is_the_emulated_decode_on_gpu(n, k, plan):
  """nf4_dequantize_mgpu's W is bit for bit the numpy emulation of the decode (each weight
  bf16(bf16(code) * bf16(scale)), `pair_asm_emulated` on the code words), with the rows padded to
  64 cut off, and within bf16 rounding of dequantize_nf4."""
  w = quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) * 0.02)
  got = np.asarray(jax.jit(lambda w: nf4_mgpu.nf4_dequantize_mgpu(w, plan))(w))
  assert got.shape == (n, k) and got.dtype == jnp.bfloat16
  words = np.asarray(w.codes).view(np.uint32)                          # [n, k / 8]
  scales = np.asarray(nf4_mgpu._scales_bf16(w, n)).T                   # [n, k / 64]
  want = nf4_mgpu.pair_asm_emulated(words, jnp.asarray(np.repeat(scales, 8, axis=1)))
  np.testing.assert_array_equal(got.view(np.uint16),
                                np.asarray(want).reshape(n, k).view(np.uint16))
  ref = np.asarray(dequantize_nf4(w, jnp.float32))
  assert np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max() < 2**-7


def test_dequantize_mgpu_refuses_bad_plans():
  w = quantize_nf4(jnp.ones((64, 1024), jnp.float32))
  with pytest.raises(ValueError, match="must have dequant"):
    nf4_mgpu.nf4_dequantize_mgpu(w, dataclasses.replace(nf4_mgpu.DEQUANT_PLAN, dequant=False))
  assert "dequant takes" in nf4_mgpu.check_supported(
      1024, 64, jnp.bfloat16, dataclasses.replace(nf4_mgpu.DEQUANT_PLAN, tile_n=128))
  assert "dequant takes" in nf4_mgpu.check_supported(
      1024, 64, jnp.bfloat16, dataclasses.replace(nf4_mgpu.DEQUANT_PLAN, gather=False))
  with pytest.raises(ValueError, match="dq needs"):
    nf4_mgpu.nf4_dequantize_mgpu(w, nf4_mgpu.DEQUANT_PLAN)           # K / 64 / split = 8


def test_refuses_a_gpu_without_wgmma(monkeypatch):
  """On a non-Hopper GPU (no wgmma) the call says so and points to the portable kernels."""
  from pallas_kernels import _common
  monkeypatch.setattr(_common, "compute_capability", lambda: (8, 0))
  w = quantize_nf4(jnp.ones((128, 256), jnp.float32))
  with pytest.raises(RuntimeError, match="sm_80.*nf4_matmul"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((4, 256), jnp.bfloat16), w)
  with pytest.raises(RuntimeError, match="nf4_dequantize_mgpu: needs a Hopper GPU"):
    nf4_mgpu.nf4_dequantize_mgpu(w)


def test_refuses_a_stacked_weight():
  from jaxsloth.quant import stack_nf4
  q = quantize_nf4(jnp.ones((128, 256), jnp.float32))
  with pytest.raises(ValueError, match="stacked"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((4, 256), jnp.bfloat16), stack_nf4([q, q]))
  with pytest.raises(ValueError, match="nf4_dequantize_mgpu: w is stacked"):
    nf4_mgpu.nf4_dequantize_mgpu(stack_nf4([q, q]))


def test_dispatch_takes_the_swap_kernel_on_hopper_for_large_weights(monkeypatch):
  """nf4_matmul's default forward for 1 <= M <= 16, bf16 x, on Hopper: the swap kernel with the
  double quant undone in-kernel (dq) and the table decode (lut), tile_k 512 where K > N on 70B
  down's size (8B down: tile_k 256, K split in 14, since session 20), from M=9
  with x unpermuted (gather) and the split-K partials added in the kernel (reduce; finish at
  split 2), for
  weights of >= MGPU_LUT_MIN_WEIGHT elements at 2 <= M <= 16, and at M = 1 on >= MGPU_MIN_WEIGHT
  or >= MGPU_M1_DOWN_MIN_WEIGHT with K > N; the bf16-scale one for weights without double quant
  of >= MGPU_MIN_WEIGHT; the Triton plans otherwise (measured faster there)."""
  from pallas_kernels import nf4_matmul as mod
  monkeypatch.setattr(_common, "on_gpu", lambda: True)
  monkeypatch.setattr(_common, "compute_capability", lambda: (9, 0))
  big, small = _shape_of_nf4(8192, 8192), _shape_of_nf4(4096, 4096)
  plan = mod._dispatch_plan(16, big, None, jnp.bfloat16)
  assert plan.fwd == "mgpu" and plan.mgpu.swap and plan.mgpu.dq and plan.bwd == "fused"
  assert plan.mgpu.lut == 32 and plan.mgpu.tile_k == 256
  assert plan.mgpu.gather and plan.mgpu.finish     # M >= MGPU_GATHER_MIN_M, split 2 (70B q/o)
  assert mod._dispatch_plan(2, big, "pallas", jnp.bfloat16).fwd == "mgpu"
  for n, k in ((14336, 4096), (4096, 14336), (4096, 4096)):        # 8B gate/up, down, q/o: dq
    p8 = mod._dispatch_plan(8, _shape_of_nf4(n, k), None, jnp.bfloat16).mgpu
    assert p8.dq and p8.lut and p8.tile_k == 256
    assert not (p8.gather or p8.reduce)
    p9 = mod._dispatch_plan(9, _shape_of_nf4(n, k), None, jnp.bfloat16).mgpu
    fin = 1 < p9.split <= mod.MGPU_FINISH_MAX_SPLIT     # (split 1 writes y itself either way)
    assert p9 == dataclasses.replace(p8, gather=True, reduce=not fin, finish=fin, split=p9.split)
    single = jax.eval_shape(lambda: quantize_nf4(jnp.zeros((n, k), jnp.float32),
                                                 double_quant=False))
    assert mod._dispatch_plan(8, single, None, jnp.bfloat16).fwd != "mgpu"
  # at M=16: finish on 70B q/o (split 2), reduce on 70B gate/up (split 4) and 8B down (14)
  for (n, k), fin in (((8192, 8192), True), ((4096, 14336), False), ((28672, 8192), False)):
    p16 = mod._dispatch_plan(16, _shape_of_nf4(n, k), None, jnp.bfloat16).mgpu
    assert (p16.finish, p16.reduce, p16.split == 2) == (fin, not fin, fin), (n, k, p16)
  for m in (1, 4, 16):    # the two down projections: tile_k by size, K split to the wave model
    down70 = mod._dispatch_plan(m, _shape_of_nf4(8192, 28672), None, jnp.bfloat16).mgpu
    down8 = mod._dispatch_plan(m, _shape_of_nf4(4096, 14336), None, jnp.bfloat16).mgpu
    assert (down70.tile_k, down8.tile_k, down8.split) == (512, 256, 14), (m, down70, down8)
  single = jax.eval_shape(lambda: quantize_nf4(jnp.zeros((8192, 8192), jnp.float32),
                                               double_quant=False))
  plan = mod._dispatch_plan(8, single, None, jnp.bfloat16)
  assert plan.fwd == "mgpu" and not plan.mgpu.dq and plan.mgpu.lut
  for n, k in ((8192, 28672), (28672, 8192), (8192, 8192), (4096, 14336), (3072, 8192),
               (2048, 8192)):   # M=1 (the last two: Llama 3.2's down, session 20)
    one = mod._dispatch_plan(1, _shape_of_nf4(n, k), None, jnp.bfloat16)
    assert one.fwd == "mgpu" and one.mgpu.dq and one.bwd == mod.TUNED["m1"].bwd, (n, k)
  for m, w, impl, dt in ((1, _shape_of_nf4(14336, 4096), None, jnp.bfloat16),   # 8B gate/up
                         (1, _shape_of_nf4(8192, 3072), None, jnp.bfloat16),   # 3B gate/up
                         (1, small, None, jnp.bfloat16), (17, big, None, jnp.bfloat16),
                         (16, _shape_of_nf4(1024, 8192), None, jnp.bfloat16),  # 70B k/v
                         (16, big, None, jnp.float32), (16, big, "xla", jnp.bfloat16),
                         (16, _shape_of_nf4(16384, 4160), None, jnp.bfloat16)):  # K % 512 != 0
    assert mod._dispatch_plan(m, w, impl, dt).fwd != "mgpu", (m, w.shape, impl, dt)
  monkeypatch.setattr(_common, "compute_capability", lambda: (8, 0))
  assert mod._dispatch_plan(16, big, None, jnp.bfloat16).fwd == "fused"


def test_dispatch_takes_the_gather_kernel_at_mid_m(monkeypatch):
  """256 <= M <= 2048, bf16 x, Hopper, weights of >= 4096 rows and columns: the gather kernel's
  forward with the table (256-row x tiles unsplit, tile_k 64, 16 copies, each step's wgmma left
  in flight into the next (plan.lag), where they make >= 100 programs, else 128-row tiles split by
  the wave model, 32 copies, no lag), and to M=4096 on weights of >= 2^27 elements; the
  backward of the M bucket; on k/v-sized weights with K = 4096 the 128-row plan only where its
  tiles fill 90-100% of one wave (M = 1793-2048 at N = 1024; not at K = 2048 or 8192); not at
  M = 255, at 2049 on smaller weights, at 4097, for f32 x, with implementation="xla" or off
  Hopper."""
  from pallas_kernels import nf4_matmul as mod
  monkeypatch.setattr(_common, "on_gpu", lambda: True)
  monkeypatch.setattr(_common, "compute_capability", lambda: (9, 0))
  gate_up, q_o = _shape_of_nf4(28672, 8192), _shape_of_nf4(4096, 4096)
  down = _shape_of_nf4(8192, 28672)
  for m, w, tile_m, split in ((256, gate_up, 256, 1), (1024, gate_up, 256, 1),
                              (256, q_o, 128, 0), (512, q_o, 128, 0), (1024, q_o, 256, 1),
                              (1536, _shape_of_nf4(8192, 8192), 256, 1), (2048, q_o, 256, 1),
                              (2048, down, 256, 1)):
    plan = mod._dispatch_plan(m, w, None, jnp.bfloat16)
    assert plan.fwd == "mgpu" and plan.mgpu.gather and plan.mgpu.ws, (m, w.shape)
    assert (plan.mgpu.tile_m, plan.mgpu.split) == (tile_m, split), (m, w.shape, plan.mgpu)
    assert (plan.mgpu.lut, plan.mgpu.tile_k, plan.mgpu.lag) == (
        (16, 64, True) if tile_m == 256 else (32, 128, False))
    assert plan.bwd == mod.TUNED[mod._bucket(m)].bwd
  # 8B gate/up at M=1024: 448 programs, 3.39 waves of 132 SMs (W decoded to HBM until session 18)
  for m in (512, 1024, 1536):
    assert mod._dispatch_plan(m, _shape_of_nf4(14336, 4096), None, jnp.bfloat16).mgpu.lag
  for m, w in ((2048, gate_up), (4096, gate_up), (4096, down)):  # to 4096 on >= 2^27 elements
    assert mod._dispatch_plan(m, w, None, jnp.bfloat16).mgpu.lag, (m, w.shape)
  for m, w in ((2049, _shape_of_nf4(8192, 8192)), (2049, _shape_of_nf4(14336, 4096)),
               (4097, gate_up)):      # past 2048 on smaller weights, past 4096: W to HBM
    assert mod._dispatch_plan(m, w, None, jnp.bfloat16).mgpu == nf4_mgpu.DEQUANT_PLAN, (m, w.shape)
  kv = _shape_of_nf4(1024, 4096)
  for m in (1793, 2048):
    plan = mod._dispatch_plan(m, kv, None, jnp.bfloat16)
    assert plan.fwd == "mgpu" and plan.mgpu == mod._mgpu_mid_plan(m, 1024), m
    assert (plan.mgpu.tile_m, plan.mgpu.lut, plan.mgpu.lag) == (128, 32, False)
    assert plan.bwd == mod.TUNED[mod._bucket(m)].bwd
  for m, w, impl, dt in ((255, q_o, None, jnp.bfloat16), (2049, q_o, None, jnp.bfloat16),
                         (512, kv, None, jnp.bfloat16), (1792, kv, None, jnp.bfloat16),
                         (2049, kv, None, jnp.bfloat16), (4096, kv, None, jnp.bfloat16),
                         (2048, _shape_of_nf4(1024, 8192), None, jnp.bfloat16),
                         (2048, _shape_of_nf4(1024, 2048), None, jnp.bfloat16),
                         (2048, kv, None, jnp.float32),
                         (512, q_o, None, jnp.float32), (512, q_o, "xla", jnp.bfloat16)):
    assert mod._dispatch_plan(m, w, impl, dt).fwd != "mgpu", (m, w.shape, impl, dt)
  monkeypatch.setattr(_common, "compute_capability", lambda: (8, 0))
  assert mod._dispatch_plan(512, q_o, None, jnp.bfloat16).fwd == "dequant"


def test_dispatch_decodes_w_to_hbm_at_large_m(monkeypatch):
  """Above FUSED_MAX_M where no fused Mosaic plan runs, bf16 x, Hopper: the forward decodes W by
  nf4_dequantize_mgpu (DEQUANT_PLAN) on double-quant weights of >= MGPU_DEQUANT_MIN_WEIGHT
  elements, and so does the backward (its plan.bwd, the bucket's, is what runs without
  MGPU_DEQUANT_BWD); the Pallas dequant kernel on smaller weights, without double quant, for f32 x
  or off Hopper."""
  from pallas_kernels import nf4_matmul as mod
  monkeypatch.setattr(_common, "on_gpu", lambda: True)
  monkeypatch.setattr(_common, "compute_capability", lambda: (9, 0))
  for m, (n, k) in ((4096, (14336, 4096)), (4096, (4096, 14336)), (16384, (28672, 8192)),
                    (4097, (8192, 28672)), (2049, (8192, 8192)), (4097, (28672, 8192))):
    plan = mod._dispatch_plan(m, _shape_of_nf4(n, k), None, jnp.bfloat16)
    assert plan.fwd == "mgpu" and plan.mgpu == nf4_mgpu.DEQUANT_PLAN, (m, n, k)
    assert plan.bwd == mod.TUNED["large"].bwd
  single = jax.eval_shape(lambda: quantize_nf4(jnp.zeros((14336, 4096), jnp.float32),
                                               double_quant=False))
  for m, w, dt in ((4096, _shape_of_nf4(4096, 4096), jnp.bfloat16),      # 8B q/o: 2^24
                   (4096, single, jnp.bfloat16), (2048, _shape_of_nf4(14336, 4096), jnp.float32)):
    assert mod._dispatch_plan(m, w, None, dt).fwd == "dequant", (m, w.shape, dt)
  monkeypatch.setattr(_common, "compute_capability", lambda: (8, 0))
  assert mod._dispatch_plan(2048, _shape_of_nf4(14336, 4096), None, jnp.bfloat16).fwd == "dequant"
  # the backward of the mgpu dequant plan: W through nf4_dequantize_mgpu (the Pallas dequant
  # kernel without MGPU_DEQUANT_BWD), traced for the GPU on any host
  monkeypatch.setattr(_common, "compute_capability", lambda: (9, 0))
  w = _shape_of_nf4(14336, 4096)
  plan = mod._dispatch_plan(4096, w, None, jnp.bfloat16)
  dy = jax.ShapeDtypeStruct((4096, 14336), jnp.bfloat16)
  calls = []
  real = nf4_mgpu.nf4_dequantize_mgpu
  monkeypatch.setattr(nf4_mgpu, "nf4_dequantize_mgpu", lambda *a: calls.append(a) or real(*a))
  for on, want in ((True, 1), (False, 0)):
    monkeypatch.setattr(mod, "MGPU_DEQUANT_BWD", on)
    calls.clear()
    jax.jit(lambda dy, w: mod._backward(dy, w, plan)).trace(dy, w).lower(
        lowering_platforms=("cuda",))
    assert len(calls) == want, (on, len(calls))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(5, 8192, 8192), (1, 8192, 28672), (12, 8192, 28672),
                                   (1, 4096, 14336), (13, 4096, 14336), (1, 2048, 8192),
                                   (300, 4096, 14336), (520, 11264, 4096), (1100, 8192, 4096),
                                   (1900, 1024, 4096)])
def test_dispatch_with_the_swap_kernel_matches_reference_on_gpu(m, n, k):
  """The default nf4_matmul on 70B q/o and down weights at M = 5, 1 and 12 (x [1, M, K]): the swap
  kernel's forward (dq, table decode; at 12 with gather and reduce) and the Triton backward; on 8B
  down at M = 1 and 13 the swap kernel with K split in 14, and on 1B down at M = 1 (session 20);
  at M = 300 and 11264 x 4096 at 520, the gather kernel's (128-row x tiles, split; 256-row,
  264 programs: two full waves) and dequant + cuBLAS; at M = 1100 on 8192 x 4096 the 256-row
  gather plan with lag (before session 18: W decoded to HBM, then cuBLAS); on an 8B k/v weight at
  M = 1900 the 128-row gather plan (one wave); against the f32 reference and its vjp."""
  from pallas_kernels import nf4_matmul as mod
  w = quantize_nf4(jax.random.normal(jax.random.key(0), (n, k), jnp.float32) * 0.02)
  assert mod._dispatch_plan(m, w, None, jnp.bfloat16).fwd == "mgpu"
  x = jax.random.normal(jax.random.key(1), (1, m, k), jnp.float32).astype(jnp.bfloat16)
  dy = jax.random.normal(jax.random.key(2), (1, m, n), jnp.float32).astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda x: mod.nf4_matmul(x, w), x)
  (dx,) = vjp(dy)
  wd = np.asarray(dequantize_nf4(w, jnp.float32), np.float64)
  ref = np.asarray(x, np.float64)[0] @ wd.T
  ref_dx = np.asarray(dy, np.float64)[0] @ wd
  assert y.shape == (1, m, n) and y.dtype == jnp.bfloat16
  assert np.abs(np.asarray(y, np.float64)[0] - ref).max() / np.abs(ref).max() < 2**-7
  assert np.abs(np.asarray(dx, np.float64)[0] - ref_dx).max() / np.abs(ref_dx).max() < 2**-7
