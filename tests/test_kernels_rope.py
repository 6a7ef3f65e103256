"""RoPE: tables against transformers (default and Llama-3.1 scaling), kernels against the f32 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rope import apply_rope, apply_rope_reference, rope_inv_freq, rope_tables

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
# H=96 (halves of 48, not a power of two) exercises the fallback to XLA; 16 tokens of 32 heads
# fill whole kernel blocks (the unmasked path), the others end in a masked tail.
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
