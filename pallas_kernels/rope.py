"""Rotary position embedding (HF Llama rotate-half convention) with per-token positions.

Dims: B batch, S sequence, N query heads, M key/value heads (GQA), H head dim, T = B*S tokens.
  rope_tables(position_ids [B, S]) -> cos, sin [B, S, H] f32        (emb = concat(freqs, freqs))
  apply_rope(q [B,S,N,H], k [B,S,M,H], cos, sin) -> q', k'           x' = x*cos + rotate_half(x)*sin
Positions come per token, so packed sequences restart at 0. Math is f32, outputs keep the
input dtype. The backward is the transposed rotation, i.e. the same kernel with sin replaced by
-swap_halves(sin) (= -sin for HF tables, whose halves are equal); it saves nothing but the tables.
One Pallas program rotates all heads of q and k for `block_tokens` tokens: every element is read
and written once, cos/sin once per token. On GPU the default is nevertheless XLA's fused rotation,
which measured as fast or faster (see _DEFAULT_ON_GPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common

__all__ = ["rope_tables", "apply_rope", "apply_rope_reference", "rope_inv_freq"]


# -------------------------------------------------------------------------------------- tables

def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> np.ndarray:
  """[H/2] f32 inverse frequencies, as transformers' `default` and `llama3` rope init functions."""
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64)
                                          .astype(np.float32) / np.float32(head_dim)))
  inv_freq = inv_freq.astype(np.float32)
  rope_type = None if rope_scaling is None else rope_scaling.get(
      "rope_type", rope_scaling.get("type"))
  if rope_type in (None, "default"):
    return inv_freq
  if rope_type != "llama3":
    raise ValueError(f"rope_tables: rope_scaling.rope_type {rope_type!r} is not supported "
                     "(expected None, 'default' or 'llama3')")
  factor = rope_scaling["factor"]
  low_freq_factor = rope_scaling["low_freq_factor"]
  high_freq_factor = rope_scaling["high_freq_factor"]
  old_context_len = rope_scaling["original_max_position_embeddings"]
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def rope_tables(position_ids, head_dim: int, theta: float, rope_scaling: dict | None = None):
  """cos, sin [B, S, head_dim] f32 for integer position_ids [B, S] (HF Llama convention)."""
  inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta, rope_scaling))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


# -------------------------------------------------------------------------------------- kernel

# q elements per program and warps: the fastest of the H200 sweep (bench/kernels.py --sweep rope),
# though all configurations were within 6%.
BLOCK_ELEMS = 32768
NUM_WARPS = 8


def _block_tokens(heads_pad: int, h_pad: int) -> int:
  return max(1, BLOCK_ELEMS // (heads_pad * h_pad))


def _rotate_block(x_ref, o_ref, t0, tok_bound, heads, half, c1, c2, s1, s2):
  heads_p, half_p = _common.next_pow2(heads), _common.next_pow2(half)
  bt = c1.shape[0]
  mask = _common.tail_mask((bt, heads_p, half_p), (
      tok_bound, (0, heads) if heads != heads_p else None, (0, half) if half != half_p else None))
  lo = (pl.ds(t0, bt), pl.ds(0, heads_p), pl.ds(0, half_p))
  hi = (pl.ds(t0, bt), pl.ds(0, heads_p), pl.ds(half, half_p))
  x1 = _common.load(x_ref.at[lo], mask).astype(jnp.float32)
  x2 = _common.load(x_ref.at[hi], mask).astype(jnp.float32)
  o1 = x1 * c1[:, None, :] - x2 * s1[:, None, :]
  o2 = x2 * c2[:, None, :] + x1 * s2[:, None, :]
  _common.store(o_ref.at[lo], o1.astype(o_ref.dtype), mask)
  _common.store(o_ref.at[hi], o2.astype(o_ref.dtype), mask)


def _rope_kernel(q_ref, k_ref, cos_ref, sin_ref, qo_ref, ko_ref, *, n_tokens, n_q, n_k, half, bt):
  t0 = pl.program_id(0) * bt
  half_p = _common.next_pow2(half)
  tok_bound = (t0, n_tokens) if n_tokens % bt else None
  mask = _common.tail_mask((bt, half_p), (tok_bound, (0, half) if half != half_p else None))
  lo = (pl.ds(t0, bt), pl.ds(0, half_p))
  hi = (pl.ds(t0, bt), pl.ds(half, half_p))
  c1 = _common.load(cos_ref.at[lo], mask)
  c2 = _common.load(cos_ref.at[hi], mask)
  s1 = _common.load(sin_ref.at[lo], mask)
  s2 = _common.load(sin_ref.at[hi], mask)
  _rotate_block(q_ref, qo_ref, t0, tok_bound, n_q, half, c1, c2, s1, s2)
  _rotate_block(k_ref, ko_ref, t0, tok_bound, n_k, half, c1, c2, s1, s2)


def _apply_pallas(q3, k3, cos2, sin2):
  n_tokens, n_q, h = q3.shape
  n_k = k3.shape[1]
  half = h // 2
  bt = _block_tokens(_common.next_pow2(n_q), 2 * _common.next_pow2(half))
  kernel = functools.partial(_rope_kernel, n_tokens=n_tokens, n_q=n_q, n_k=n_k, half=half, bt=bt)
  return _common.pallas_call(
      kernel, grid=(pl.cdiv(n_tokens, bt),), num_warps=NUM_WARPS if bt * n_q * h >= 4096 else 4,
      name="rope",
      out_shape=(jax.ShapeDtypeStruct(q3.shape, q3.dtype),
                 jax.ShapeDtypeStruct(k3.shape, k3.dtype)))(q3, k3, cos2, sin2)


def _rotate_xla(x3, cos2, sin2):
  half = x3.shape[-1] // 2
  x = x3.astype(jnp.float32)
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos2[:, None, :] + rot * sin2[:, None, :]).astype(x3.dtype)


def _apply_xla(q3, k3, cos2, sin2):
  return _rotate_xla(q3, cos2, sin2), _rotate_xla(k3, cos2, sin2)


def _transposed_sin(sin2):
  half = sin2.shape[-1] // 2
  return -jnp.concatenate([sin2[:, half:], sin2[:, :half]], axis=-1)


# ---------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _rope(q3, k3, cos2, sin2, impl, backward):
  return (_apply_pallas if impl == "pallas" else _apply_xla)(q3, k3, cos2, sin2)


def _rope_fwd(q3, k3, cos2, sin2, impl, backward):
  return _rope(q3, k3, cos2, sin2, impl, backward), (cos2, sin2)


def _rope_bwd(impl, backward, res, g):
  cos2, sin2 = res
  dq, dk = g
  if backward == "reference":
    _, vjp = jax.vjp(lambda a, b: (_rotate_ref(a, cos2, sin2), _rotate_ref(b, cos2, sin2)),
                     dq.astype(jnp.float32), dk.astype(jnp.float32))
    gq, gk = vjp((dq.astype(jnp.float32), dk.astype(jnp.float32)))
    gq, gk = gq.astype(dq.dtype), gk.astype(dk.dtype)
  else:
    apply = _apply_pallas if impl == "pallas" else _apply_xla
    gq, gk = apply(dq, dk, cos2, _transposed_sin(sin2))
  # Tables come from integer positions: no gradient flows into them.
  return gq, gk, jnp.zeros_like(cos2), jnp.zeros_like(sin2)


_rope.defvjp(_rope_fwd, _rope_bwd)


# XLA is the GPU default: on an H200 (bench/RESULTS.md, 2026-11-26) XLA's fused elementwise
# rotation matched or beat this kernel at every Llama-3 8B/70B size (e.g. 8B, 64K tokens: 0.375 vs
# 0.422 ms), both near copy bandwidth, and inside the model XLA can also fuse it into its neighbours.
# The kernel stays for implementation="pallas" and as the template for a fused QK-norm/RoPE.
_DEFAULT_ON_GPU = "xla"


@functools.partial(jax.jit, static_argnames=("implementation", "backward"))
def apply_rope(q, k, cos, sin, *, implementation=None, backward="kernel"):
  """Rotate q [B,S,N,H] and k [B,S,M,H] by cos, sin [B,S,H]; returns (q', k') in their dtypes.

  implementation: None (XLA: measured fastest on GPU, see _DEFAULT_ON_GPU) | "xla" | "pallas"
  (interpreted on CPU). backward: "kernel" | "reference" (jax.vjp of `apply_rope_reference`).
  """
  b, s, n_q, h = q.shape
  if k.shape[:2] != (b, s) or k.shape[3] != h or cos.shape != (b, s, h) or sin.shape != cos.shape:
    raise ValueError(f"apply_rope: expected q [B,S,N,H], k [B,S,M,H], cos/sin [B,S,H]; got "
                     f"q {q.shape}, k {k.shape}, cos {cos.shape}, sin {sin.shape}")
  if h % 2:
    raise ValueError(f"apply_rope: head dim must be even, got {h}")
  _common.check_backward(backward, "apply_rope")
  impl = _common.resolve(implementation, "apply_rope", _DEFAULT_ON_GPU)
  if impl == "pallas" and (h // 2) != _common.next_pow2(h // 2):
    impl = "xla"  # the kernel slices each half as one power-of-two block (H = 64, 128, 256)
  t = b * s
  q2, k2 = _rope(q.reshape(t, n_q, h), k.reshape(t, k.shape[2], h),
                 cos.reshape(t, h).astype(jnp.float32), sin.reshape(t, h).astype(jnp.float32),
                 impl, backward)
  return q2.reshape(q.shape), k2.reshape(k.shape)


def _rotate_ref(x3, cos2, sin2):
  half = x3.shape[-1] // 2
  x = x3.astype(jnp.float32)
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos2[:, None, :] + rot * sin2[:, None, :]


def apply_rope_reference(q, k, cos, sin):
  """f32 oracle: x * cos + rotate_half(x) * sin over [B,S,heads,H] with cos/sin [B,S,H]."""
  def rot(x):
    half = x.shape[-1] // 2
    x = x.astype(jnp.float32)
    r = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + r * sin[:, :, None, :]
  return rot(q), rot(k)
