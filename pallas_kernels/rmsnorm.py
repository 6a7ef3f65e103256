"""RMSNorm (Llama) forward and backward: a Pallas kernel, its XLA twin, and the f32 reference.

Dims: T tokens (all leading dims of x flattened), D hidden.
  y[t] = w * (x[t] * rsqrt(mean(x[t]^2) + eps)).astype(x.dtype)     (HF LlamaRMSNorm cast order)
Math is f32; y has x's dtype. The backward saves x and the per-row inverse RMS r [T] f32 only:
  xhat = x * r,  g = dy * w,  dx = r * (g - xhat * mean(g * xhat)),  dw = sum_t dy * xhat
(the rounding of xhat to x.dtype is treated as identity in the gradient, as PyTorch autograd does
for HF's `.to(dtype)`). dw is computed only with `weight_grad=True`: Llama's norms are frozen in QLoRA.

Both passes read and write every element once; one program handles `block_rows` whole rows
(D padded to a power of two and masked for the Triton lowering).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common

__all__ = ["rmsnorm", "rmsnorm_reference", "rmsnorm_residual", "rmsnorm_residual_reference"]


# Elements per program and warps: the sweep in bench/kernels.py (--sweep rmsnorm) on an H200 was
# flat within 10%; 2048 (one row of 8B/70B per program) with 8 warps was among the fastest.
BLOCK_ELEMS = 2048
NUM_WARPS = 8


def _block_rows(d_pad: int) -> int:
  return max(1, BLOCK_ELEMS // d_pad)


def _num_warps(d_pad: int, block_rows: int) -> int:
  return NUM_WARPS if d_pad * block_rows >= 4096 else 4


# ------------------------------------------------------------------------------------- kernels

def _masks(i, n_rows, d, block_rows, d_pad):
  rows = (i * block_rows, n_rows) if n_rows % block_rows else None
  cols = (0, d) if d != d_pad else None
  return (_common.tail_mask((block_rows, d_pad), (rows, cols)),
          _common.tail_mask((d_pad,), (cols,)),
          _common.tail_mask((block_rows,), (rows,)))


def _fwd_kernel(*refs, eps, n_rows, d, block_rows, d_pad, residual):
  if residual:  # h = x + residual (rounded to x.dtype, as HF's add), then normalise h
    x_ref, res_ref, w_ref, y_ref, h_ref, r_ref = refs
  else:
    x_ref, w_ref, y_ref, r_ref = refs
  i = pl.program_id(0)
  mask, wmask, rmask = _masks(i, n_rows, d, block_rows, d_pad)
  blk = (pl.ds(i * block_rows, block_rows), pl.ds(0, d_pad))
  x = _common.load(x_ref.at[blk], mask).astype(jnp.float32)
  if residual:
    h = (x + _common.load(res_ref.at[blk], mask).astype(jnp.float32)).astype(h_ref.dtype)
    _common.store(h_ref.at[blk], h, mask)
    x = h.astype(jnp.float32)
  w = _common.load(w_ref.at[pl.ds(0, d_pad)], wmask).astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
  xhat = (x * r[:, None]).astype(y_ref.dtype).astype(jnp.float32)
  y = (w[None, :] * xhat).astype(y_ref.dtype)
  _common.store(y_ref.at[blk], y, mask)
  _common.store(r_ref.at[pl.ds(i * block_rows, block_rows)], r, rmask)


def _bwd_kernel(*refs, n_rows, d, block_rows, d_pad, residual):
  if residual:  # the residual stream's own cotangent dh adds to the norm's dx
    x_ref, w_ref, r_ref, dy_ref, dh_ref, dx_ref = refs
  else:
    x_ref, w_ref, r_ref, dy_ref, dx_ref = refs
  i = pl.program_id(0)
  mask, wmask, rmask = _masks(i, n_rows, d, block_rows, d_pad)
  blk = (pl.ds(i * block_rows, block_rows), pl.ds(0, d_pad))
  x = _common.load(x_ref.at[blk], mask).astype(jnp.float32)
  dy = _common.load(dy_ref.at[blk], mask).astype(jnp.float32)
  w = _common.load(w_ref.at[pl.ds(0, d_pad)], wmask).astype(jnp.float32)
  r = _common.load(r_ref.at[pl.ds(i * block_rows, block_rows)], rmask)
  xhat = x * r[:, None]
  g = dy * w[None, :]
  c = jnp.sum(g * xhat, axis=1) / d
  dx = r[:, None] * (g - xhat * c[:, None])
  if residual:
    dx = dx + _common.load(dh_ref.at[blk], mask).astype(jnp.float32)
  _common.store(dx_ref.at[blk], dx.astype(dx_ref.dtype), mask)


def _fwd_pallas(x2, weight, eps, res2=None):
  """(y, r) or, with res2, (y, h, r)."""
  n_rows, d = x2.shape
  d_pad = _common.next_pow2(d)
  br = _block_rows(d_pad)
  residual = res2 is not None
  kernel = functools.partial(_fwd_kernel, eps=eps, n_rows=n_rows, d=d, block_rows=br, d_pad=d_pad,
                             residual=residual)
  out = jax.ShapeDtypeStruct(x2.shape, x2.dtype)
  r = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
  return _common.pallas_call(
      kernel, grid=(pl.cdiv(n_rows, br),), num_warps=_num_warps(d_pad, br),
      name="rmsnorm_residual_fwd" if residual else "rmsnorm_fwd",
      out_shape=(out, out, r) if residual else (out, r))(
          *((x2, res2, weight) if residual else (x2, weight)))


def _bwd_pallas(x2, weight, r, dy2, dh2=None):
  n_rows, d = x2.shape
  d_pad = _common.next_pow2(d)
  br = _block_rows(d_pad)
  residual = dh2 is not None
  kernel = functools.partial(_bwd_kernel, n_rows=n_rows, d=d, block_rows=br, d_pad=d_pad,
                             residual=residual)
  return _common.pallas_call(
      kernel, grid=(pl.cdiv(n_rows, br),), num_warps=_num_warps(d_pad, br),
      name="rmsnorm_residual_bwd" if residual else "rmsnorm_bwd",
      out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype))(
          *((x2, weight, r, dy2, dh2) if residual else (x2, weight, r, dy2)))


# ----------------------------------------------------------------------------------- XLA twin

def _fwd_xla(x2, weight, eps):
  h = x2.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(h * h, axis=-1) + eps)
  xhat = (h * r[:, None]).astype(x2.dtype).astype(jnp.float32)
  return (weight.astype(jnp.float32) * xhat).astype(x2.dtype), r


def _bwd_xla(x2, weight, r, dy2, dh2=None):
  xhat = x2.astype(jnp.float32) * r[:, None]
  g = dy2.astype(jnp.float32) * weight.astype(jnp.float32)
  c = jnp.mean(g * xhat, axis=-1, keepdims=True)
  dx = r[:, None] * (g - xhat * c)
  if dh2 is not None:
    dx = dx + dh2.astype(jnp.float32)
  return dx.astype(x2.dtype)


def _fwd_xla_residual(x2, weight, eps, res2):
  h = (x2.astype(jnp.float32) + res2.astype(jnp.float32)).astype(x2.dtype)
  y, r = _fwd_xla(h, weight, eps)
  return y, h, r


def _weight_grad(x2, r, dy2, weight):
  xhat = (x2.astype(jnp.float32) * r[:, None]).astype(x2.dtype).astype(jnp.float32)
  return jnp.sum(dy2.astype(jnp.float32) * xhat, axis=0).astype(weight.dtype)


# ---------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rmsnorm(x2, weight, eps, impl, weight_grad, backward):
  fwd = _fwd_pallas if impl == "pallas" else _fwd_xla
  return fwd(x2, weight, eps)[0]


def _rmsnorm_fwd(x2, weight, eps, impl, weight_grad, backward):
  fwd = _fwd_pallas if impl == "pallas" else _fwd_xla
  y, r = fwd(x2, weight, eps)
  return y, (x2, weight, r)


def _rmsnorm_bwd(eps, impl, weight_grad, backward, res, dy2):
  x2, weight, r = res
  if backward == "reference":
    _, vjp = jax.vjp(lambda a, b: rmsnorm_reference(a, b, eps), x2, weight)
    dx, dw = vjp(dy2.astype(jnp.float32))
    dw = dw if weight_grad else jnp.zeros_like(dw)
    return dx.astype(x2.dtype), dw.astype(weight.dtype)
  bwd = _bwd_pallas if impl == "pallas" else _bwd_xla
  dx = bwd(x2, weight, r, dy2)
  dw = _weight_grad(x2, r, dy2, weight) if weight_grad else jnp.zeros_like(weight)
  return dx, dw


_rmsnorm.defvjp(_rmsnorm_fwd, _rmsnorm_bwd)


# Pallas is the GPU default: on an H100 (bench/RESULTS.md, 2026-11-26) fwd+bwd is 1.3-1.4x faster
# than XLA at 16K-64K tokens (8B, 16K: 0.237 vs 0.334 ms) and the forward ties (within 3%).
_DEFAULT_ON_GPU = "pallas"


@functools.partial(jax.jit, static_argnames=("eps", "implementation", "weight_grad", "backward"))
def rmsnorm(x, weight, eps=1e-5, *, implementation=None, weight_grad=False, backward="kernel"):
  """Llama RMSNorm of x [..., D] with weight [D]; returns x's shape and dtype.

  implementation: None (Pallas on GPU, XLA elsewhere) | "xla" | "pallas" (interpreted on CPU).
  weight_grad: compute d weight in the backward (zeros otherwise: frozen norms).
  backward: "kernel" | "reference" (the gradient of `rmsnorm_reference` through jax.vjp, for debugging).
  """
  if x.shape[-1] != weight.shape[-1] or weight.ndim != 1:
    raise ValueError(f"rmsnorm: weight must be [D={x.shape[-1]}], got {weight.shape}")
  _common.check_backward(backward, "rmsnorm")
  impl = _common.resolve(implementation, "rmsnorm", _DEFAULT_ON_GPU)
  x2 = x.reshape(-1, x.shape[-1])
  return _rmsnorm(x2, weight, float(eps), impl, bool(weight_grad), backward).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _rmsnorm_residual(x2, res2, weight, eps, impl, weight_grad, backward):
  fwd = _fwd_pallas if impl == "pallas" else _fwd_xla_residual
  y, h, _ = fwd(x2, weight, eps, res2)
  return y, h


def _rmsnorm_residual_fwd(x2, res2, weight, eps, impl, weight_grad, backward):
  fwd = _fwd_pallas if impl == "pallas" else _fwd_xla_residual
  y, h, r = fwd(x2, weight, eps, res2)
  return (y, h), (h, weight, r)


def _rmsnorm_residual_bwd(eps, impl, weight_grad, backward, res, g):
  h, weight, r = res
  dy2, dh2 = g
  if backward == "reference":
    _, vjp = jax.vjp(lambda a, b: rmsnorm_reference(a, b, eps), h, weight)
    dx, dw = vjp(dy2.astype(jnp.float32))
    dx = (dx + dh2.astype(jnp.float32)).astype(h.dtype)
    dw = dw.astype(weight.dtype) if weight_grad else jnp.zeros_like(weight)
    return dx, dx, dw
  bwd = _bwd_pallas if impl == "pallas" else _bwd_xla
  dx = bwd(h, weight, r, dy2, dh2)
  dw = _weight_grad(h, r, dy2, weight) if weight_grad else jnp.zeros_like(weight)
  return dx, dx, dw  # d(x + residual) reaches both summands unchanged


_rmsnorm_residual.defvjp(_rmsnorm_residual_fwd, _rmsnorm_residual_bwd)


@functools.partial(jax.jit, static_argnames=("eps", "implementation", "weight_grad", "backward"))
def rmsnorm_residual(x, residual, weight, eps=1e-5, *, implementation=None, weight_grad=False,
                     backward="kernel"):
  """Fused residual add + RMSNorm: h = x + residual (in x.dtype), returns (rmsnorm(h), h).

  One pass reads x and residual and writes h and y (the unfused pair moves 5 arrays, this 4); the
  backward adds h's own cotangent into dx in the same kernel and saves only h and 1/rms. Same
  arguments as `rmsnorm`. Not yet timed on a GPU (bench/RESULTS.md).
  """
  if x.shape != residual.shape or x.dtype != residual.dtype:
    raise ValueError(f"rmsnorm_residual: x and residual must match, got {x.shape} {x.dtype} and "
                     f"{residual.shape} {residual.dtype}")
  if x.shape[-1] != weight.shape[-1] or weight.ndim != 1:
    raise ValueError(f"rmsnorm_residual: weight must be [D={x.shape[-1]}], got {weight.shape}")
  _common.check_backward(backward, "rmsnorm_residual")
  impl = _common.resolve(implementation, "rmsnorm_residual", _DEFAULT_ON_GPU)
  d = x.shape[-1]
  y, h = _rmsnorm_residual(x.reshape(-1, d), residual.reshape(-1, d), weight, float(eps), impl,
                           bool(weight_grad), backward)
  return y.reshape(x.shape), h.reshape(x.shape)


def rmsnorm_residual_reference(x, residual, weight, eps=1e-5):
  """f32 oracle of `rmsnorm_residual`: (rmsnorm_reference(x + residual), x + residual) in f32."""
  h = x.astype(jnp.float32) + residual.astype(jnp.float32)
  return rmsnorm_reference(h, weight, eps), h


def rmsnorm_reference(x, weight, eps=1e-5):
  """f32 oracle: weight * x * rsqrt(mean(x^2) + eps), all in f32 (no intermediate rounding)."""
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return weight.astype(jnp.float32) * h
