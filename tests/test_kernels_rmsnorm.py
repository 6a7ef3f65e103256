"""RMSNorm kernels: the Pallas kernel (interpreted on CPU) and the XLA twin against the f32 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rmsnorm import (rmsnorm, rmsnorm_reference, rmsnorm_residual,
                                     rmsnorm_residual_reference)

IMPLS = ["xla", "pallas"]
DTYPES = [jnp.float32, jnp.bfloat16]
# bf16 output holds ~3 significant digits; |y| is O(3) here.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}
gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _inputs(shape, dtype, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
  w = (1 + 0.1 * jax.random.normal(kw, shape[-1:], jnp.float32)).astype(dtype)
  return x, w


def _loss(impl, backward="kernel", weight_grad=True):
  def f(x, w):
    y = rmsnorm(x, w, 1e-5, implementation=impl, weight_grad=weight_grad, backward=backward)
    probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y.astype(jnp.float32) * probe)
  return f


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 96), (5, 64), (3, 4096)])
def test_forward_matches_reference(impl, dtype, shape):
  x, w = _inputs(shape, dtype)
  y = rmsnorm(x, w, implementation=impl)
  assert y.shape == x.shape and y.dtype == x.dtype
  _close(y, rmsnorm_reference(x, w), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pallas_forward_equals_xla_forward(dtype):
  # Same math and the same HF cast order: equal up to f32 reduction order, i.e. one bf16 ulp.
  x, w = _inputs((7, 96), dtype)
  _close(rmsnorm(x, w, implementation="pallas"), rmsnorm(x, w, implementation="xla"),
         1e-6 if dtype == jnp.float32 else 8e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference_vjp(impl, dtype):
  x, w = _inputs((2, 5, 96), dtype)
  got = jax.grad(_loss(impl), (0, 1))(x, w)
  want = jax.grad(_loss(impl, backward="reference"), (0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.dtype == r.dtype
    # dw sums 10 rows of bf16 products: allow a few bf16 ulps of its largest entry.
    _close(g, r, 1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_gradient_is_zero_unless_asked(impl):
  x, w = _inputs((4, 64), jnp.float32)
  _, dw = jax.grad(_loss(impl, weight_grad=False), (0, 1))(x, w)
  assert not np.any(np.asarray(dw))


def test_matches_transformers_llama_rmsnorm_in_bf16():
  torch = pytest.importorskip("torch")
  llama = pytest.importorskip("transformers.models.llama.modeling_llama")
  x, w = _inputs((3, 96), jnp.bfloat16)
  norm = llama.LlamaRMSNorm(96, eps=1e-5)
  norm.weight.data = torch.tensor(np.asarray(w, np.float32)).to(torch.bfloat16)
  want = norm(torch.tensor(np.asarray(x, np.float32)).to(torch.bfloat16)).detach().float().numpy()
  got = np.asarray(rmsnorm(x, w, implementation="pallas"), np.float32)
  np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)  # bf16 product rounding may differ by 1 ulp


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 1024, 4096), (1000, 96), (3, 8192)])
def test_gpu_kernel_matches_reference(dtype, shape):
  x, w = _inputs(shape, dtype)
  _close(rmsnorm(x, w, implementation="pallas"), rmsnorm_reference(x, w), TOL[dtype])
  got = jax.grad(_loss("pallas"), (0, 1))(x, w)
  want = jax.grad(_loss("xla", backward="reference"), (0, 1))(x, w)
  _close(got[0], want[0], 1e-5 if dtype == jnp.float32 else 2e-2)
  _close(got[1], want[1], 1e-4 if dtype == jnp.float32 else 3e-2)


# ------------------------------------------------------------------------ fused residual add


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_variant_matches_reference(impl, dtype):
  x, w = _inputs((2, 5, 96), dtype)
  res, _ = _inputs((2, 5, 96), dtype, seed=1)
  y, h = rmsnorm_residual(x, res, w, implementation=impl)
  want_y, want_h = rmsnorm_residual_reference(x, res, w)
  assert y.dtype == h.dtype == x.dtype and y.shape == h.shape == x.shape
  _close(h, want_h, TOL[dtype])
  _close(y, want_y, TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_variant_equals_add_then_rmsnorm_in_bf16(impl):
  x, w = _inputs((4, 64), jnp.bfloat16)
  res, _ = _inputs((4, 64), jnp.bfloat16, seed=1)
  y, h = rmsnorm_residual(x, res, w, implementation=impl)
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(x + res, np.float32))
  _close(y, rmsnorm(x + res, w, implementation=impl), 8e-3)  # same kernel math: <= 1 bf16 ulp


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_variant_gradients_match_reference_vjp(impl, dtype):
  x, w = _inputs((3, 7, 96), dtype)
  res, _ = _inputs((3, 7, 96), dtype, seed=1)

  def loss(backward):
    def f(x, res, w):
      y, h = rmsnorm_residual(x, res, w, implementation=impl, weight_grad=True, backward=backward)
      py = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
      return jnp.sum(y.astype(jnp.float32) * py) + jnp.sum(jnp.sin(h.astype(jnp.float32)))
    return f

  got = jax.grad(loss("kernel"), (0, 1, 2))(x, res, w)
  want = jax.grad(loss("reference"), (0, 1, 2))(x, res, w)
  for g, r in zip(got, want):
    assert g.dtype == r.dtype
    _close(g, r, 1e-5 if dtype == jnp.float32 else 2e-2)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(got[1]))  # d x == d residual


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 1024, 4096), (1000, 96)])
def test_gpu_residual_kernel_matches_reference(dtype, shape):
  x, w = _inputs(shape, dtype)
  res, _ = _inputs(shape, dtype, seed=1)
  y, h = rmsnorm_residual(x, res, w, implementation="pallas")
  want_y, want_h = rmsnorm_residual_reference(x, res, w)
  _close(h, want_h, TOL[dtype])
  _close(y, want_y, TOL[dtype])
  f = lambda bw: jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.concatenate([
      o.astype(jnp.float32) for o in rmsnorm_residual(a, b, w, implementation="pallas",
                                                       backward=bw)]))), (0, 1))(x, res)
  for g, r in zip(f("kernel"), f("reference")):
    _close(g, r, 1e-5 if dtype == jnp.float32 else 2e-2)


def test_kernels_lower_to_triton(triton_lowering):
  """Both norms, forward and backward (with d weight), through the Triton lowering for "cuda" and
  MLIR's verifier on any machine. Odd width and rows, bf16."""
  x = jax.ShapeDtypeStruct((3, 37, 96), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((96,), jnp.bfloat16)

  def fb(x, w):
    y, vjp = jax.vjp(lambda x, w: rmsnorm(x, w, implementation="pallas", weight_grad=True), x, w)
    h, y2 = rmsnorm_residual(x, x, w, implementation="pallas")
    return vjp(y), jax.grad(lambda x: (rmsnorm_residual(x, x, w, implementation="pallas")[1]
                                       .astype(jnp.float32).sum()))(x), h, y2
  text = jax.jit(fb).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("@__gpu$xla.gpu.triton(") >= 4
  assert triton_lowering is None or triton_lowering[0] >= 4
