"""The Mosaic GPU NF4 kernel (pallas_kernels/nf4_mgpu.py).

CPU: the PTX block through the small PTX interpreter of test_nf4 (against its jnp emulation and the
f32 dequantization), and the whole kernel through Mosaic GPU's lowering to MLIR for sm_90 (layouts,
register mapping, shared-memory budget, transforms). GPU (Hopper): the kernel against the f32
reference on odd and Llama-sized shapes; same tolerance as test_nf4 (2**-7 of max |y|), since W is
rounded to bf16 (three roundings: codebook, absmax, product) before a bf16 wgmma with f32 sums.
"""

from __future__ import annotations

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
         nf4_mgpu.MgpuPlan(256, 128, 64, 4, ws=True, epi_rows=128)]


def _plan_id(p):
  return (f"{p.tile_m}x{p.tile_n}x{p.tile_k}s{p.split}c{p.chunk}{'o' * p.overlap}{'w' * p.ws}"
          f"e{p.epi_rows}")


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
@pytest.mark.parametrize("mnk", [(16, 192, 256), (100, 320, 512), (2048, 4096, 4096)])
def test_kernel_lowers_for_sm90(plan, mnk):
  """The kernel goes through Mosaic GPU's lowering (layouts, the inline PTX, the pipeline and the
  shared-memory budget) to one custom call, without a GPU."""
  m, n, k = mnk
  w = jax.eval_shape(lambda: quantize_nf4(jnp.zeros((n, k), jnp.float32)))
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  f = jax.jit(lambda x, w: nf4_mgpu.nf4_matmul_mgpu(x, w, plan))
  text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_auto_split_reaches_the_program_target():
  """split=0: K is split (powers of two dividing the steps) until ~PROGRAMS programs, not beyond."""
  plan = nf4_mgpu.MgpuPlan(64, 128, 128, split=0)
  assert nf4_mgpu._auto_split(16, 4096, 14336, plan) == 8          # 32 tiles -> 256 (112 steps)
  assert nf4_mgpu._auto_split(16, 28672, 8192, plan) == 1          # 224 tiles already
  assert nf4_mgpu._auto_split(16, 4096, 4096, plan) == 8           # 32 tiles, 32 steps -> 256
  assert nf4_mgpu._auto_split(2048, 4096, 4096, plan) == 1


def test_unsupported_calls_say_why():
  w = quantize_nf4(jnp.ones((64, 192), jnp.float32))
  assert "multiple of tile_k * split" in nf4_mgpu.check_supported(192, 64, jnp.bfloat16,
                                                                  nf4_mgpu.MgpuPlan(tile_k=128))
  assert "bfloat16" in nf4_mgpu.check_supported(192, 64, jnp.float32, nf4_mgpu.MgpuPlan())
  assert "blocksize" in nf4_mgpu.check_supported(256, 32, jnp.bfloat16, nf4_mgpu.MgpuPlan())
  assert "epi_rows" in nf4_mgpu.check_supported(
      256, 64, jnp.bfloat16, nf4_mgpu.MgpuPlan(256, 128, 64, ws=True, epi_rows=96))
  with pytest.raises(ValueError, match="tile_k"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((4, 192), jnp.bfloat16), w, nf4_mgpu.MgpuPlan(tile_k=128))


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
@pytest.mark.parametrize("mnk", [(1, 128, 128), (16, 192, 256), (100, 320, 512), (300, 1000, 1024),
                                 (2048, 4096, 4096)])
def test_kernel_matches_reference_on_gpu(plan, mnk):
  m, n, k = mnk
  if nf4_mgpu.check_supported(k, 64, jnp.bfloat16, plan):
    pytest.skip("shape not taken by this plan")
  w = quantize_nf4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32) * 0.02)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
  y = jax.jit(lambda x, w: nf4_mgpu.nf4_matmul_mgpu(x, w, plan))(x, w)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  ref = np.asarray(x, np.float32) @ np.asarray(dequantize_nf4(w, jnp.float32)).T
  err = np.abs(np.asarray(y, np.float32) - ref).max() / np.abs(ref).max()
  assert err < 2**-7, err


def test_refuses_a_gpu_without_wgmma(monkeypatch):
  """On a non-Hopper GPU (no wgmma) the call says so and points to the portable kernels."""
  from pallas_kernels import _common
  monkeypatch.setattr(_common, "compute_capability", lambda: (8, 0))
  w = quantize_nf4(jnp.ones((128, 256), jnp.float32))
  with pytest.raises(RuntimeError, match="sm_80.*nf4_matmul"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((4, 256), jnp.bfloat16), w)


def test_refuses_a_stacked_weight():
  from jaxsloth.quant import stack_nf4
  q = quantize_nf4(jnp.ones((128, 256), jnp.float32))
  with pytest.raises(ValueError, match="stacked"):
    nf4_mgpu.nf4_matmul_mgpu(jnp.ones((4, 256), jnp.bfloat16), stack_nf4([q, q]))
