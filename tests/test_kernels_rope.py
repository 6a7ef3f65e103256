"""RoPE: tables against transformers (default and Llama-3.1 scaling), kernels against the f32 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import rope as R
from pallas_kernels.rope import (RopeConfig, apply_rope, apply_rope_positions, apply_rope_reference,
                                 rope_inv_freq, rope_tables)

IMPLS = ["xla", "pallas"]
DTYPES = [jnp.float32, jnp.bfloat16]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # bf16: 8 mantissa bits of |x| <= ~4
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _qk(b, s, n, m, h, dtype, seed=0):
  kq, kk = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(kq, (b, s, n, h), jnp.float32).astype(dtype),
          jax.random.normal(kk, (b, s, m, h), jnp.float32).astype(dtype))


def _packed_positions(b, s):
  # Two packed examples per row: positions restart at 0 mid-row.
  cut = s // 3
  row = np.concatenate([np.arange(cut), np.arange(s - cut)])
  return jnp.asarray(np.stack([row + 7 * i for i in range(b)]), jnp.int32)


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "default"}, LLAMA31])
def test_tables_match_transformers_llama_rotary_embedding(scaling):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
  cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                                 rope_scaling=scaling, max_position_embeddings=131072)
  pos = np.array([[0, 1, 2, 8191, 8192, 100000], [5, 4, 3, 2, 1, 0]])
  emb = LlamaRotaryEmbedding(cfg)
  x = torch.zeros(1, dtype=torch.float32)
  want_cos, want_sin = emb(x, torch.tensor(pos))
  cos, sin = rope_tables(jnp.asarray(pos), 128, 500000.0, scaling)
  assert cos.shape == (2, 6, 128) and cos.dtype == jnp.float32
  # Same f32 angles; at 1e5 rad one f32 ulp of the angle is 7.8e-3, and XLA's and torch's
  # cos/sin reduce such arguments differently, so allow one ulp of the angle.
  np.testing.assert_allclose(np.asarray(cos), want_cos.numpy(), atol=8e-3)
  np.testing.assert_allclose(np.asarray(sin), want_sin.numpy(), atol=8e-3)
  near = pos < 100  # small angles: tight
  np.testing.assert_allclose(np.asarray(cos)[near], want_cos.numpy()[near], atol=2e-5)
  np.testing.assert_allclose(rope_inv_freq(128, 500000.0, scaling), emb.inv_freq.numpy(), rtol=1e-6)


def test_unknown_rope_type_is_an_error():
  with pytest.raises(ValueError, match="rope_type"):
    rope_tables(jnp.zeros((1, 2), jnp.int32), 64, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
# H=96 (halves of 48 = 32 + 16) and 3 heads (2 + 1) exercise the power-of-two chunks; 16 tokens of
# 32 heads fill whole kernel blocks (the unmasked path), the others end in a masked tail.
@pytest.mark.parametrize("dims", [(2, 6, 4, 2, 16), (1, 5, 3, 1, 96), (1, 16, 32, 8, 128)])
def test_apply_matches_reference(impl, dtype, dims):
  b, s, n, m, h = dims
  q, k = _qk(b, s, n, m, h, dtype)
  cos, sin = rope_tables(_packed_positions(b, s), h, 500000.0, LLAMA31)
  got = apply_rope(q, k, cos, sin, implementation=impl)
  want = apply_rope_reference(q, k, cos, sin)
  for g, w, x in zip(got, want, (q, k)):
    assert g.shape == x.shape and g.dtype == x.dtype
    _close(g, w, TOL[dtype])


def test_apply_matches_transformers_apply_rotary_pos_emb():
  torch = pytest.importorskip("torch")
  llama = pytest.importorskip("transformers.models.llama.modeling_llama")
  q, k = _qk(2, 6, 4, 2, 16, jnp.float32)
  cos, sin = rope_tables(_packed_positions(2, 6), 16, 10000.0)
  t = lambda a: torch.tensor(np.asarray(a))
  # transformers wants [B, heads, S, H] and unsqueezes cos/sin on dim 1.
  wq, wk = llama.apply_rotary_pos_emb(t(q).transpose(1, 2), t(k).transpose(1, 2), t(cos), t(sin))
  gq, gk = apply_rope(q, k, cos, sin, implementation="pallas")
  np.testing.assert_allclose(np.asarray(gq), wq.transpose(1, 2).numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(gk), wk.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_the_transposed_rotation(impl, dtype):
  q, k = _qk(2, 6, 4, 2, 16, dtype)
  cos, sin = rope_tables(_packed_positions(2, 6), 16, 10000.0)

  def loss(backward):
    def f(q, k):
      q2, k2 = apply_rope(q, k, cos, sin, implementation=impl, backward=backward)
      pq = jnp.cos(jnp.arange(q2.size, dtype=jnp.float32)).reshape(q2.shape)
      return jnp.sum(q2.astype(jnp.float32) * pq) + jnp.sum(k2.astype(jnp.float32) ** 2)
    return f

  got = jax.grad(loss("kernel"), (0, 1))(q, k)
  want = jax.grad(loss("reference"), (0, 1))(q, k)
  for g, w in zip(got, want):
    _close(g, w, TOL[dtype])


def test_rotation_preserves_norm_per_pair():
  q, k = _qk(1, 4, 2, 2, 16, jnp.float32)
  cos, sin = rope_tables(_packed_positions(1, 4), 16, 10000.0)
  q2, _ = apply_rope(q, k, cos, sin, implementation="pallas")
  pair = lambda x: x[..., :8] ** 2 + x[..., 8:] ** 2
  np.testing.assert_allclose(np.asarray(pair(q2)), np.asarray(pair(q)), rtol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(2, 2048, 32, 8, 128), (1, 1000, 64, 8, 128), (1, 77, 3, 1, 96)])
def test_gpu_kernel_matches_reference(dtype, dims):
  b, s, n, m, h = dims
  q, k = _qk(b, s, n, m, h, dtype)
  cos, sin = rope_tables(_packed_positions(b, s), h, 500000.0, LLAMA31)
  for g, w in zip(apply_rope(q, k, cos, sin, implementation="pallas"),
                  apply_rope_reference(q, k, cos, sin)):
    _close(g, w, TOL[dtype])
  f = lambda impl, bw: jax.grad(lambda q, k: sum(
      jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in apply_rope(
          q, k, cos, sin, implementation=impl, backward=bw)), (0, 1))(q, k)
  for g, w in zip(f("pallas", "kernel"), f("xla", "reference")):
    _close(g, w, TOL[dtype])


# ------------------------------------------------------------------------------ kernel variants

def _run_fast(fn):
  """jit + run fn() with XLA's cheap CPU codegen: interpreted kernels compile ~2x faster."""
  opts = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
          if jax.default_backend() == "cpu" else {})
  return jax.jit(fn).lower().compile(compiler_options=opts)()


def _rotate(name, q, k, pos, h):
  """The variant `name` of R.VARIANTS through its entry point (tables or positions), Llama-3.1
  scaled frequencies."""
  cfg = R.VARIANTS[name]
  if cfg.tables == "positions":
    inv = jnp.asarray(rope_inv_freq(h, 500000.0, LLAMA31))
    return apply_rope_positions(q, k, pos, inv, implementation="pallas", config=cfg)
  cos, sin = rope_tables(pos, h, 500000.0, LLAMA31)
  return apply_rope(q, k, cos, sin, implementation="pallas", config=cfg)


@pytest.mark.parametrize("name", list(R.VARIANTS))
def test_variant_matches_reference(name):
  """Each variant: bf16 forward with H=96 (pair chunks 32 + 16), GQA 2/1 and a masked token tail;
  f32 forward and jax.vjp (the kernel's in-kernel adjoint rotation) with random cotangents at
  H=16, GQA 12/4 (head chunks 8 + 4, or two head groups of 8, the second masked); packed
  positions in both. (num_warps, num_stages and evict do not change the interpreted program.)"""
  q96, k96 = _qk(1, 5, 2, 1, 96, jnp.bfloat16)
  pos96 = _packed_positions(1, 5) + 20000  # low-frequency pairs (inv_freq ~2e-5) turn too
  q, k = _qk(2, 6, 12, 4, 16, jnp.float32, seed=1)
  cot = _qk(2, 6, 12, 4, 16, jnp.float32, seed=2)
  pos = _packed_positions(2, 6)

  def run():  # one program: the vjp's backward kernel would otherwise run op by op
    fwd96 = _rotate(name, q96, k96, pos96, 96)
    out, vjp = jax.vjp(lambda a, b: _rotate(name, a, b, pos, 16), q, k)
    return fwd96, out + vjp(cot)

  got96, got = _run_fast(run)
  cos, sin = rope_tables(pos96, 96, 500000.0, LLAMA31)
  for g, w, x in zip(got96, apply_rope_reference(q96, k96, cos, sin), (q96, k96)):
    assert g.shape == x.shape and g.dtype == x.dtype
    _close(g, w, TOL[jnp.bfloat16])
  cos, sin = rope_tables(pos, 16, 500000.0, LLAMA31)
  want, vjp_ref = jax.vjp(lambda a, b: apply_rope_reference(a, b, cos, sin), q, k)
  for g, w in zip(got, want + vjp_ref(cot)):
    _close(g, w, TOL[jnp.float32])


@pytest.mark.parametrize("cfg", [
    RopeConfig(programs=3, block_tokens=2),                      # 2-3 loop trips, masked tail
    RopeConfig(block_heads=2, block_tokens=4, programs=2, load="rows", tables="half"),
    RopeConfig(block_heads=1, block_tokens=8, split_qk=True, alias=True),
])
def test_config_corners(cfg):
  """Persistent loops of several trips, head groups smaller than the head count, 13 tokens."""
  q, k = _qk(1, 13, 5, 3, 32, jnp.float32)
  pos = _packed_positions(1, 13)
  cos, sin = rope_tables(pos, 32, 10000.0)
  cot = _qk(1, 13, 5, 3, 32, jnp.float32, seed=4)

  def run():
    out, vjp = jax.vjp(lambda a, b: apply_rope(a, b, cos, sin, implementation="pallas", config=cfg),
                       q, k)
    return out + vjp(cot)

  want, vjp_ref = jax.vjp(lambda a, b: apply_rope_reference(a, b, cos, sin), q, k)
  for g, w in zip(_run_fast(run), want + vjp_ref(cot)):
    _close(g, w, 1e-5)


def test_default_config_takes_any_tables():
  """apply_rope's default variant (the GPU default) reads full tables: random cos, sin whose halves
  differ give the reference's rotation. The model's variant may read half tables (its tables are
  rope_tables'), and the model keeps XLA's rotation unless asked for Pallas."""
  assert R.VARIANTS[R.DEFAULT_CONFIG].tables == "full"
  q, k = _qk(1, 7, 4, 2, 32, jnp.float32)
  cos, sin = [jax.random.normal(jax.random.key(i), (1, 7, 32), jnp.float32) for i in (5, 6)]
  for g, w in zip(apply_rope(q, k, cos, sin, implementation="pallas"),
                  apply_rope_reference(q, k, cos, sin)):
    _close(g, w, 1e-5)
  assert R.model_implementation(None) == "xla" and R.MODEL_DEFAULT_ON_GPU == "xla"
  assert R.model_implementation("pallas") == "pallas"


def test_variants_lower_to_triton(triton_lowering):
  """Every variant, forward and backward, through the Triton lowering for "cuda" (on any machine):
  catches primitives or hints (eviction policies) that only the GPU path uses. 8B heads, bf16."""
  q = jax.ShapeDtypeStruct((1, 40, 32, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 40, 8, 128), jnp.bfloat16)
  pos = jnp.zeros((1, 40), jnp.int32)
  for name, cfg in R.VARIANTS.items():
    def fb(a, b):
      out, vjp = jax.vjp(lambda u, v: _rotate(name, u, v, pos, 128), a, b)
      return out + vjp(out)
    text = jax.jit(fb).trace(q, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == (4 if cfg.split_qk else 2), name
  assert triton_lowering is None or triton_lowering[0] >= 2 * len(R.VARIANTS)


def test_half_tables_read_the_first_half_only():
  """tables="half" assumes equal halves (rope_tables'); with unequal halves it must differ from
  "full" exactly as the reference with the first half duplicated does."""
  q, k = _qk(1, 4, 2, 2, 16, jnp.float32)
  ang = jax.random.uniform(jax.random.PRNGKey(3), (1, 4, 16), jnp.float32, 0.0, 6.0)
  cos, sin = jnp.cos(ang), jnp.sin(ang)  # halves differ
  dup = lambda t: jnp.concatenate([t[..., :8], t[..., :8]], axis=-1)
  full, vjp = jax.vjp(lambda a, b: apply_rope(a, b, cos, sin, implementation="pallas"), q, k)
  half = apply_rope(q, k, cos, sin, implementation="pallas", config=RopeConfig(tables="half"))
  for f, h, w_full, w_half in zip(full, half, apply_rope_reference(q, k, cos, sin),
                                  apply_rope_reference(q, k, dup(cos), dup(sin))):
    _close(f, w_full, 1e-5)
    _close(h, w_half, 1e-5)
    assert np.abs(np.asarray(h) - np.asarray(w_full)).max() > 0.1
  # Unequal halves also tell the adjoint (-swap_halves(sin)) from a plain -sin.
  _, vjp_ref = jax.vjp(lambda a, b: apply_rope_reference(a, b, cos, sin), q, k)
  for g, w in zip(vjp((q, k)), vjp_ref((q, k))):
    _close(g, w, 1e-5)


@pytest.mark.parametrize("backward", ["kernel", "reference"])
def test_positions_xla_matches_tables(backward):
  q, k = _qk(2, 6, 4, 2, 16, jnp.float32)
  pos = _packed_positions(2, 6)
  inv = jnp.asarray(rope_inv_freq(16, 10000.0))
  cos, sin = rope_tables(pos, 16, 10000.0)
  f = lambda a, b: apply_rope_positions(a, b, pos, inv, implementation="xla", backward=backward)
  got, vjp = jax.vjp(f, q, k)
  want, vjp_ref = jax.vjp(lambda a, b: apply_rope_reference(a, b, cos, sin), q, k)
  for g, w in zip(got + vjp((q, k)), want + vjp_ref((q, k))):
    _close(g, w, 1e-5)


def test_pow2_chunks():
  assert R._pow2_chunks(64) == [(0, 64)]
  assert R._pow2_chunks(48) == [(0, 32), (32, 16)]
  assert R._pow2_chunks(3) == [(0, 2), (2, 1)]
  assert R._pow2_chunks(7) == [(0, 4), (4, 2), (6, 1)]


@pytest.mark.parametrize("kw", [dict(block_tokens=3), dict(block_heads=0), dict(num_warps=3),
                                dict(num_stages=0), dict(tables="bf16"), dict(load="gather"),
                                dict(programs=0)])
def test_bad_config_is_an_error(kw):
  with pytest.raises(ValueError, match="RopeConfig: bad " + next(iter(kw))):
    RopeConfig(**kw)


def test_bad_inputs_are_errors():
  q, k = _qk(1, 4, 2, 1, 16, jnp.float32)
  pos = _packed_positions(1, 4)
  cos, sin = rope_tables(pos, 16, 10000.0)
  inv = jnp.asarray(rope_inv_freq(16, 10000.0))
  with pytest.raises(ValueError, match="apply_rope_positions"):
    apply_rope(q, k, cos, sin, implementation="pallas", config=RopeConfig(tables="positions"))
  with pytest.raises(ValueError, match="does not fit"):
    apply_rope_positions(q, k, pos, inv, implementation="pallas", config=RopeConfig())
  with pytest.raises(ValueError, match="RopeConfig or None"):
    apply_rope(q, k, cos, sin, implementation="pallas", config="half")
  with pytest.raises(ValueError, match="integer position_ids"):
    apply_rope_positions(q, k, pos.astype(jnp.float32), inv)
  with pytest.raises(ValueError, match="inv_freq"):
    apply_rope_positions(q, k, pos, inv[:4])
  with pytest.raises(ValueError, match="even"):
    apply_rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
  with pytest.raises(ValueError, match="cos/sin"):
    apply_rope(q, k, cos[:, :3], sin[:, :3])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(R.VARIANTS))
@pytest.mark.parametrize("dims", [(2, 2048, 32, 8, 128), (1, 77, 3, 1, 96)])
def test_gpu_variant_matches_reference(name, dims):
  """The Triton-compiled variants, bf16, values and gradients (the adjoint kernel)."""
  b, s, n, m, h = dims
  q, k = _qk(b, s, n, m, h, jnp.bfloat16)
  pos = _packed_positions(b, s)
  cos, sin = rope_tables(pos, h, 500000.0, LLAMA31)
  got, vjp = jax.vjp(lambda a, c: _rotate(name, a, c, pos, h), q, k)
  want, vjp_ref = jax.vjp(lambda a, c: apply_rope_reference(a, c, cos, sin), q, k)
  # the reference computes (and so takes cotangents) in f32; ours keeps bf16
  cts_ref = tuple(t.astype(w.dtype) for t, w in zip((q, k), want))
  for g, w in zip(got + vjp((q, k)), want + vjp_ref(cts_ref)):
    _close(g, w, TOL[jnp.bfloat16])
