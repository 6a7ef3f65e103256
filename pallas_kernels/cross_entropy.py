"""lm_head matmul fused with softmax cross-entropy, chunked over tokens, gradient made in the forward.

Dims: T tokens, D hidden, V vocab (128256 for Llama-3: not a power of two), C tokens per chunk.
  fused_cross_entropy(hidden [T, D], lm_head [V, D], labels [T]) -> (loss_sum f32, count int32)
labels are already shifted (labels[t] is the target of position t); -100 is ignored.

Per chunk of C tokens:
  logits = hidden_c @ lm_head.T      cuBLAS, f32 accumulation, stored in the inputs' dtype (bf16 for
                                     bf16 inputs, as HF's lm_head output that the loss then upcasts)
  lse, label logit, dlogits = softmax(logits) - onehot(label)   one pass (Pallas kernel or XLA), f32 math
  dhidden_c = dlogits @ lm_head      (and d lm_head += dlogits.T @ hidden_c when lm_head_grad)
so only [C, V] logits and [C, V] dlogits exist at a time (C=1024: ~0.5 GiB in bf16 for V=128256),
and the backward only scales the saved dhidden [T, D] by the incoming cotangent: the loss costs two
matmuls (three with lm_head_grad) plus one read-read-write pass over the logits.
The primal alone (no gradient asked) skips dlogits and the second matmul.
Callers average across gradient-accumulation micro-batches with sum(loss_sum) / sum(count).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common

__all__ = ["fused_cross_entropy", "fused_cross_entropy_reference", "IGNORE_INDEX"]

IGNORE_INDEX = -100
# Logits + dlogits of one chunk stay under this (the "extra memory" target is 1 GiB).
_CHUNK_BYTES = 640 * 2**20


def default_chunk_size(n_tokens: int, vocab: int, logits_bytes: int) -> int:
  per_token = vocab * 2 * logits_bytes
  c = max(16, _CHUNK_BYTES // per_token)
  c = 1 << (c.bit_length() - 1)  # power of two: whole matmul tiles
  return min(c, max(16, _common.next_pow2(n_tokens)))


# -------------------------------------------------------------------- softmax pass: Pallas kernel

# Vocab tile, warps and pipelining depth of the softmax pass: the fastest of the H200 sweep
# (bench/kernels.py --sweep ce).
BLOCK_V = 2048
NUM_WARPS = 4
NUM_STAGES = 2
# None: one program per row. An int P: P persistent programs, each walking rows pid, pid + P, ...
# With P near the SM count only P rows (P * V * 2 bytes, 33 MB for P=128) are in flight, so the
# second read of a row can come from L2 instead of HBM. Not yet measured on a GPU: off.
PROGRAMS = None


def _ce_row(row, logits_ref, labels_ref, lse_ref, ll_ref, grad_ref, vocab, block_v):
  # Full tiles load unmasked (vectorised); only the vocab tail (128256 = 62 * 2048 + 1280) is masked.
  label = labels_ref[row]
  n_full = vocab // block_v
  has_tail = vocab % block_v != 0
  tail = row * 0 + n_full  # traced: a static start would trip the static bounds check of pl.ds

  def tile(j, masked):
    cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, (block_v,), 0)
    ref = logits_ref.at[row, pl.ds(j * block_v, block_v)]
    x = _common.load(ref, cols < vocab, -jnp.inf) if masked else _common.load(ref)
    return cols, x.astype(jnp.float32)

  def online(j, carry, masked=False):
    m, s, ll = carry
    cols, x = tile(j, masked)
    m_new = jnp.maximum(m, jnp.max(x))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new))
    ll = ll + jnp.sum(jnp.where(cols == label, x, 0.0))
    return m_new, s, ll

  carry = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.float32(0.0))
  if n_full:
    carry = jax.lax.fori_loop(0, n_full, online, carry)
  if has_tail:
    carry = online(tail, carry, masked=True)
  m, s, ll = carry
  lse = m + jnp.log(s)
  lse_ref[row] = lse
  ll_ref[row] = ll

  if grad_ref:
    (dl_ref,) = grad_ref
    scale = (label != IGNORE_INDEX).astype(jnp.float32)

    def write(j, carry, masked=False):
      cols, x = tile(j, masked)
      g = (jnp.exp(x - lse) - (cols == label).astype(jnp.float32)) * scale
      _common.store(dl_ref.at[row, pl.ds(j * block_v, block_v)], g.astype(dl_ref.dtype),
                    cols < vocab if masked else None)
      return carry

    if n_full:
      jax.lax.fori_loop(0, n_full, write, 0)
    if has_tail:
      write(tail, 0, masked=True)


def _ce_kernel(logits_ref, labels_ref, lse_ref, ll_ref, *grad_ref, vocab, block_v, programs,
               n_rows):
  pid = pl.program_id(0)
  args = (logits_ref, labels_ref, lse_ref, ll_ref, grad_ref, vocab, block_v)
  if programs is None:
    _ce_row(pid, *args)
    return

  def one_row(i, carry):
    _ce_row(pid + i * programs, *args)
    return carry

  jax.lax.fori_loop(0, n_rows // programs, one_row, 0)


def _softmax_pass_pallas(logits, labels, grad_dtype):
  c, v = logits.shape
  block_v = min(BLOCK_V, _common.next_pow2(v))
  programs = PROGRAMS if (PROGRAMS and c % PROGRAMS == 0 and c > PROGRAMS) else None
  out_shape = [jax.ShapeDtypeStruct((c,), jnp.float32)] * 2
  if grad_dtype is not None:
    out_shape.append(jax.ShapeDtypeStruct((c, v), grad_dtype))
  kernel = functools.partial(_ce_kernel, vocab=v, block_v=block_v, programs=programs, n_rows=c)
  outs = _common.pallas_call(kernel, grid=(programs or c,), num_warps=NUM_WARPS,
                             num_stages=NUM_STAGES, name="cross_entropy_softmax",
                             out_shape=tuple(out_shape))(logits, labels)
  lse, ll = outs[0], outs[1]
  return lse, ll, (outs[2] if grad_dtype is not None else None)


# ------------------------------------------------------------------------ softmax pass: XLA twin

def _softmax_pass_xla(logits, labels, grad_dtype):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  valid = labels != IGNORE_INDEX
  safe = jnp.where(valid, labels, 0)
  ll = jnp.take_along_axis(x, safe[:, None], axis=-1)[:, 0]
  ll = jnp.where(valid, ll, 0.0)
  if grad_dtype is None:
    return lse, ll, None
  onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == labels[:, None]
  g = (jnp.exp(x - lse[:, None]) - onehot) * valid[:, None]
  return lse, ll, g.astype(grad_dtype)


# ----------------------------------------------------------------------------- chunked driver

def _chunks(hidden, labels, chunk):
  t, d = hidden.shape
  n = pl.cdiv(t, chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad), constant_values=IGNORE_INDEX)
  return hidden.reshape(n, chunk, d), labels.reshape(n, chunk)


def _loss_and_grads(hidden, lm_head, labels, impl, chunk, with_grad, lm_head_grad):
  t, d = hidden.shape
  dtype = jnp.result_type(hidden.dtype, lm_head.dtype)
  softmax_pass = _softmax_pass_pallas if impl == "pallas" else _softmax_pass_xla
  h_chunks, l_chunks = _chunks(hidden, labels, chunk)

  def body(carry, xs):
    loss, dw = carry
    h_c, l_c = xs
    logits = jax.lax.dot_general(h_c.astype(dtype), lm_head.astype(dtype),
                                 (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = logits.astype(dtype)
    lse, ll, dlogits = softmax_pass(logits, l_c, dtype if with_grad else None)
    loss = loss + jnp.sum(jnp.where(l_c != IGNORE_INDEX, lse - ll, 0.0))
    if not with_grad:
      return (loss, dw), None
    dh = jnp.dot(dlogits, lm_head.astype(dtype), preferred_element_type=jnp.float32)
    if lm_head_grad:
      dw = dw + jax.lax.dot_general(dlogits, h_c.astype(dtype), (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    return (loss, dw), dh.astype(hidden.dtype)

  dw0 = jnp.zeros(lm_head.shape, jnp.float32) if (with_grad and lm_head_grad) else None
  (loss, dw), dh = jax.lax.scan(body, (jnp.float32(0.0), dw0), (h_chunks, l_chunks))
  if dh is not None:
    dh = dh.reshape(-1, d)[:t]
  return loss, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused_ce(hidden, lm_head, labels, impl, chunk, lm_head_grad, backward):
  return _loss_and_grads(hidden, lm_head, labels, impl, chunk, False, False)[0]


def _fused_ce_fwd(hidden, lm_head, labels, impl, chunk, lm_head_grad, backward):
  if backward == "reference":
    loss = _loss_and_grads(hidden, lm_head, labels, impl, chunk, False, False)[0]
    return loss, (hidden, lm_head, labels)
  loss, dh, dw = _loss_and_grads(hidden, lm_head, labels, impl, chunk, True, lm_head_grad)
  return loss, (dh, dw, lm_head)


def _fused_ce_bwd(impl, chunk, lm_head_grad, backward, res, g):
  if backward == "reference":
    hidden, lm_head, labels = res
    _, vjp = jax.vjp(lambda h, w: fused_cross_entropy_reference(h, w, labels)[0], hidden, lm_head)
    dh, dw = vjp(g)
    dw = dw if lm_head_grad else jnp.zeros_like(dw)
    return dh.astype(hidden.dtype), dw.astype(lm_head.dtype), None
  dh, dw, lm_head = res
  dh = (g * dh.astype(jnp.float32)).astype(dh.dtype)
  dw = (g * dw).astype(lm_head.dtype) if lm_head_grad else jnp.zeros_like(lm_head)
  return dh, dw, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


# The matmuls are cuBLAS either way; "pallas" only swaps the softmax pass over the logits chunk.
# Pallas is the GPU default: on an H200 (bench/RESULTS.md, 2026-11-26) it was 1-2% faster end to
# end than the XLA pass (8B, 16K tokens: 56.5 vs 56.8 ms fwd+bwd; the pass alone 0.275 vs 0.322 ms
# per 1024-token chunk).
_DEFAULT_ON_GPU = "pallas"


@functools.partial(jax.jit, static_argnames=("implementation", "chunk_size", "lm_head_grad",
                                             "backward"))
def fused_cross_entropy(hidden, lm_head, labels, *, implementation=None, chunk_size=None,
                        lm_head_grad=False, backward="kernel"):
  """Summed token cross-entropy of softmax(hidden @ lm_head.T) against labels, and the count.

  hidden [T, D], lm_head [V, D] (pass the embedding matrix for tied embeddings), labels [T] int
  (already shifted; -100 ignored). Returns (loss_sum f32 scalar, count int32 scalar); an
  all-ignored batch gives (0.0, 0). Differentiable in hidden (and lm_head when lm_head_grad,
  zeros otherwise).
  implementation: None (GPU default, see _DEFAULT_ON_GPU; XLA elsewhere) | "xla" | "pallas".
  chunk_size: tokens per chunk (default: largest power of two keeping a chunk's logits and
  dlogits under ~640 MiB). backward: "kernel" | "reference" (jax.vjp of the f32 reference).
  """
  if hidden.ndim != 2 or lm_head.ndim != 2 or hidden.shape[1] != lm_head.shape[1]:
    raise ValueError(f"fused_cross_entropy: expected hidden [T, D] and lm_head [V, D], got "
                     f"{hidden.shape} and {lm_head.shape}")
  if labels.shape != hidden.shape[:1]:
    raise ValueError(f"fused_cross_entropy: labels must be [T={hidden.shape[0]}], got {labels.shape}")
  _common.check_backward(backward, "fused_cross_entropy")
  impl = _common.resolve(implementation, "fused_cross_entropy", _DEFAULT_ON_GPU)
  labels = labels.astype(jnp.int32)
  itemsize = jnp.dtype(jnp.result_type(hidden.dtype, lm_head.dtype)).itemsize
  chunk = chunk_size or default_chunk_size(hidden.shape[0], lm_head.shape[0], itemsize)
  loss = _fused_ce(hidden, lm_head, labels, impl, int(chunk), bool(lm_head_grad), backward)
  count = jnp.sum(labels != IGNORE_INDEX).astype(jnp.int32)
  return loss, count


def fused_cross_entropy_reference(hidden, lm_head, labels):
  """f32 oracle: full [T, V] logits in f32, logsumexp, summed over non-ignored tokens."""
  logits = hidden.astype(jnp.float32) @ lm_head.astype(jnp.float32).T
  valid = labels != IGNORE_INDEX
  lse = jax.nn.logsumexp(logits, axis=-1)
  ll = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(jnp.where(valid, lse - ll, 0.0)), jnp.sum(valid).astype(jnp.int32)
