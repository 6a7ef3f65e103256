"""y = x @ dequant(W).T for a frozen NF4 weight W [N, K] (jaxsloth.quant.NF4): kernels + dispatch.

Dims: M tokens (all leading dims of x flattened), K in features, N out features.
Backward gives dx = dy @ dequant(W) only: W is frozen, its NF4 leaves get zero cotangents.
(First cut: XLA "dequantize then dot" only; Pallas kernels follow.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.quant import NF4, dequantize_nf4

__all__ = ["nf4_matmul", "nf4_matmul_reference"]

IMPLEMENTATIONS = ("xla", "pallas")


def nf4_matmul_reference(x: jax.Array, w: NF4) -> jax.Array:
  """f32 oracle: x [..., K] @ dequant(W).T -> [..., N] in f32."""
  wf = dequantize_nf4(w, jnp.float32)
  return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), wf,
                    precision=jax.lax.Precision.HIGHEST)


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.floating):
    return jnp.zeros_like(leaf)
  return np.zeros(leaf.shape, jax.dtypes.float0)


def _xla_fwd(x2, w):
  wd = dequantize_nf4(w, x2.dtype)
  return jnp.dot(x2, wd.T, preferred_element_type=jnp.float32).astype(x2.dtype)


def _xla_bwd(dy2, w):
  wd = dequantize_nf4(w, dy2.dtype)
  return jnp.dot(dy2, wd, preferred_element_type=jnp.float32).astype(dy2.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul2d(x2, w, impl):
  return _xla_fwd(x2, w)


def _matmul2d_fwd(x2, w, impl):
  return _xla_fwd(x2, w), w


def _matmul2d_bwd(impl, w, dy2):
  dx = _xla_bwd(dy2, w)
  return dx, jax.tree_util.tree_map(_zero_cotangent, w)


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def nf4_matmul(x: jax.Array, w: NF4, *, implementation: str | None = None) -> jax.Array:
  """x [..., K] (bf16/f32) @ dequant(w).T -> [..., N] in x.dtype; differentiable in x only."""
  if not isinstance(w, NF4):
    raise ValueError(f"nf4_matmul: w must be an NF4 weight, got {type(w).__name__}")
  n, k = w.shape
  if x.shape[-1] != k:
    raise ValueError(f"nf4_matmul: x's last dim must be K={k} (W is {w.shape}), got x {x.shape}")
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"nf4_matmul: implementation must be one of {IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}")
  lead = x.shape[:-1]
  y = _matmul2d(x.reshape(-1, k), w, implementation or "xla")
  return y.reshape(lead + (n,))
