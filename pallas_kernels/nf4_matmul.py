"""y = x @ dequant(W).T for a frozen NF4 weight W [N, K] (`jaxsloth.quant.NF4`): kernels + dispatch.

Dims: M rows of x (all leading dims flattened), K in features, N out features, B = K / blocksize
quantization blocks per row, P = blocksize / 2 code bytes per block. Codes are [N, K/2] uint8, two
per byte with the even k in the high nibble; absmax [N, B] (f32 after undoing double quant).

The backward gives dx = dy @ dequant(W) only: W is frozen, its NF4 leaves get zero (float0 for the
integer leaves) cotangents. Dequantized weights are never saved for the backward.

Implementations (`implementation=`):
  "xla"     dequantize in XLA through a 256-entry byte -> (hi, lo) table, then a cuBLAS dot.
            The reference path and the default off-GPU.
  "pallas"  portable Pallas kernels (Triton lowering on GPU, interpreter on CPU):
            - fused (small M): reads 4-bit codes, decodes in registers, never writes W:
              fwd grid (N / bn, split-K), each program loops over its K range one quantization
              block at a time: x's even/odd columns (strided loads) @ the high/low nibble tiles.
              bwd grid (B, split-N): dx's even/odd columns of one block, looping over N.
              Variants (Plan): decode by select tree / bf16-pair table / f32 table; x split into
              even/odd columns in XLA; a GEMV form for M == 1 (CUDA-core multiply + reductions).
            - dequant (large M): a bandwidth-bound kernel writes W [N, K] in x.dtype once, then
              cuBLAS does the dot (the fused kernel cannot match cuBLAS's GEMM at training sizes).
  None      the measured-fastest per device and M (`TUNED`, `_auto_plan`); "xla" off-GPU.
Requirements: K % blocksize == 0 (checked by NF4 itself), blocksize a power of two >= 32 for the
Pallas kernels; M and N are free (padded inside to the kernels' tiles).

Where it stands (H100, bench/RESULTS.md "NF4 matmul"): M=16384 fwd 1.00x the bf16 dot, M=4096 1.14x
(the dequant pass moves 42 MB per 4096x4096 weight); M<=16 the fused kernel beats XLA dequant+dot
(0.030 vs 0.039 ms) but is 1.8x slower than the bf16 dot: decode-bound at 0.32 TB/s. A Mosaic GPU
(wgmma, decode in registers) kernel is the missing piece for both targets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common

if TYPE_CHECKING:
  from jaxsloth.quant import NF4


def _quant():
  # Imported lazily: jaxsloth/__init__ imports the model, which imports this module, so importing
  # jaxsloth.quant at module level here would be circular when this module is imported first.
  from jaxsloth import quant
  return quant

__all__ = ["nf4_matmul", "nf4_matmul_reference", "nf4_dequantize_pallas", "Plan"]

IMPLEMENTATIONS = ("xla", "pallas")
_F32_DOT = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- plans / dispatch

@dataclasses.dataclass(frozen=True)
class Plan:
  """How one call runs, for fwd and bwd: "xla" | "dequant" (Pallas dequant + dot) | "fused".

  The tuning knobs are for the benchmark; `_auto_plan` picks them for real calls.
  """
  fwd: str = "xla"
  bwd: str = "xla"
  decode: str = "f32"        # "f32": two 16-entry f32 lookups per byte; "pair": one u32 lookup of
                             # two bf16-rounded values per byte; "select": a where-tree, no lookup
  bn: int = 64               # fused fwd: rows of W per program
  split: int = 0             # fused fwd split-K / bwd split-N (0: enough programs for 2 per SM)
  unroll: int = 2            # quantization blocks per loop step
  bwd_bn: int = 64           # fused bwd: rows of W per loop step
  dq_bn: int = 32            # dequant kernel: rows per program
  dq_blocks: int = 8         # dequant kernel: quantization blocks per program
  num_warps: int = 4
  num_stages: int = 3
  x_split: bool = False      # fused fwd: x's even/odd columns split in XLA (contiguous loads)
                             # instead of stride-2 loads in the kernel
  gemv: bool = False         # fused, M == 1: multiply + row reductions, no tensor-core dot
  bwd_decode: str | None = None     # the fused bwd's own decode / num_warps (None: as the fwd)
  bwd_num_warps: int | None = None


FUSED_MAX_M = 256            # the fused kernels keep all of x's rows in one tile

# Measured dispatch on the GPU, by M bucket: "m1" (M == 1), "small" (M <= 16), "large".
# bench/nf4_matmul.py --sweep measures the candidates and may override these in-process.
# Measured 2026-11-26 on an H100 (bench/RESULTS.md, "NF4 matmul"), 8B 4096x4096 weight: at M=16
# the fused fwd with the select-tree decode, bn=128 took 0.030 ms (XLA dequant+dot 0.039 ms;
# the f32-table decode 0.053-0.079 ms); the fused bwd with the (hi, lo) bf16-pair table and 64-row
# steps beat the others; at M=4096 the Pallas dequant (f32 table, 16 rows x 4 blocks per program)
# + cuBLAS tied XLA's dequant (0.215 vs 0.220 ms) and won at M=16384 (0.802 vs 0.858 ms).
TUNED: dict[str, Plan] = {
    "m1": Plan("fused", "fused", decode="select", bn=128, unroll=1, bwd_bn=64,
               bwd_decode="pair"),
    "small": Plan("fused", "fused", decode="select", bn=128, unroll=1, bwd_bn=64,
                  bwd_decode="pair"),
    "large": Plan("dequant", "dequant", decode="f32", dq_bn=16, dq_blocks=4),
}


def _bucket(m: int) -> str:
  return "m1" if m == 1 else "small" if m <= 16 else "large"


def _auto_plan(m: int, impl: str | None) -> Plan:
  if impl == "xla" or (impl is None and not (_common.on_gpu() and _common.pallas_supported())):
    return Plan("xla", "xla")
  plan = TUNED[_bucket(m)]
  if impl == "pallas":  # a Pallas kernel for both passes, whatever the measurement preferred
    plan = dataclasses.replace(
        plan, fwd="dequant" if plan.fwd == "xla" else plan.fwd,
        bwd="dequant" if plan.bwd == "xla" else plan.bwd)
  return plan


# ----------------------------------------------------------------------------- reference

def nf4_matmul_reference(x: jax.Array, w: NF4) -> jax.Array:
  """f32 oracle: x [..., K] @ dequant(W).T -> [..., N] in f32."""
  wf = _quant().dequantize_nf4(w, jnp.float32)
  return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), wf, precision=_F32_DOT)


# ----------------------------------------------------------------------------- decode helpers

def _tables(decode: str):
  """The lookup table a kernel takes as input (kernels may not capture array constants)."""
  if decode == "f32":
    return jnp.asarray(_quant().NF4_CODE)                          # [16] f32
  if decode == "pair":
    b16 = _quant().NF4_CODE.astype(jnp.bfloat16).view(np.uint16).astype(np.uint32)
    b = np.arange(256)
    return jnp.asarray((b16[b >> 4] << 16) | b16[b & 15], jnp.uint32)   # [256] u32
  if decode == "select":
    return jnp.zeros((16,), jnp.float32)                           # unused placeholder
  raise ValueError(f"unknown decode {decode!r}")


def _select_tree(n):
  """NF4 value of nibbles n (int32) with a 4-level where-tree on the bits."""
  vals = [float(v) for v in _quant().NF4_CODE]
  bits = [(n & (1 << i)) != 0 for i in range(4)]
  level = vals
  for bit in bits:
    level = [jnp.where(bit, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
  return level[0]


def _decode(c, lut_ref, decode: str):
  """uint8 codes [r, P] -> (high-nibble values, low-nibble values), each f32 [r, P]."""
  ci = c.astype(jnp.int32)
  if decode == "f32":
    return lut_ref[ci >> 4], lut_ref[ci & 15]
  if decode == "pair":
    v = lut_ref[ci]
    hi = jax.lax.bitcast_convert_type(v & jnp.uint32(0xFFFF0000), jnp.float32)
    lo = jax.lax.bitcast_convert_type(v << 16, jnp.float32)
    return hi, lo
  return _select_tree(ci >> 4), _select_tree(ci & 15)


def _call(kernel, out_shape, grid, plan: Plan, name: str):
  if _common.interpret():
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=True, name=name)
  from jax.experimental.pallas import triton as pltriton
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, name=name,
      compiler_params=pltriton.CompilerParams(num_warps=plan.num_warps,
                                              num_stages=plan.num_stages))


def _largest_divisor(n: int, cap: int) -> int:
  cap = max(1, min(n, cap))
  return max(d for d in range(1, cap + 1) if n % d == 0)


def _pad_rows(a, rows: int):
  return a if a.shape[0] == rows else jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _check_kernel_blocksize(w: NF4):
  bs = w.blocksize
  if bs < 32 or bs & (bs - 1):
    raise ValueError(f"nf4_matmul: the Pallas kernels need a power-of-two blocksize >= 32, "
                     f"got {bs}; use implementation='xla'")


def _prepared(w: NF4, rows: int):
  """(codes [rows, K/2] u8, absmax [rows, B] f32) with N padded to `rows` (zeros decode to 0)."""
  return _pad_rows(w.codes, rows), _pad_rows(_quant().dequantize_absmax(w), rows)


def _n_programs_target():
  return 264  # 2 per SM on an H100 (132 SMs)


# ----------------------------------------------------------------------------- dequant kernel

def _dequant_kernel(codes_ref, absmax_ref, lut_ref, o_ref, *, bn, nblk, p, decode, dtype):
  rows = pl.ds(pl.program_id(0) * bn, bn)
  for u in range(nblk):
    b = pl.program_id(1) * nblk + u
    c = codes_ref[rows, pl.ds(b * p, p)]
    a = absmax_ref[rows, pl.ds(b, 1)]
    hi, lo = _decode(c, lut_ref, decode)
    o_ref[rows, pl.ds(b * p, p), :] = jnp.stack([(hi * a).astype(dtype), (lo * a).astype(dtype)],
                                                axis=-1)


def nf4_dequantize_pallas(w: NF4, dtype=jnp.bfloat16, plan: Plan = Plan()) -> jax.Array:
  """W [N, K] in dtype via the Pallas dequant kernel (bit-identical to dequantize_nf4 with
  decode="f32" or "select")."""
  _check_kernel_blocksize(w)
  n, k = w.shape
  p = w.blocksize // 2
  nb = k // w.blocksize
  bn = min(plan.dq_bn, _common.next_pow2(n))
  nblk = _largest_divisor(nb, plan.dq_blocks)
  n_pad = -(-n // bn) * bn
  codes, absmax = _prepared(w, n_pad)
  kernel = functools.partial(_dequant_kernel, bn=bn, nblk=nblk, p=p, decode=plan.decode,
                             dtype=jnp.dtype(dtype))
  out = _call(kernel, jax.ShapeDtypeStruct((n_pad, k // 2, 2), dtype), (n_pad // bn, nb // nblk),
              plan, "nf4_dequant")(codes, absmax, _tables(plan.decode))
  return out.reshape(n_pad, k)[:n]


# ----------------------------------------------------------------------------- fused kernels

def _fused_fwd_body(load_x, codes_ref, absmax_ref, lut_ref, o_ref, *, m, bn, p, blocks_per_prog, unroll,
                    decode, cdtype):
  """acc[m, bn] over this program's K blocks; ``load_x(b) -> (x_even, x_odd)`` of block b."""
  rows = pl.ds(pl.program_id(0) * bn, bn)
  s = pl.program_id(1)
  dims = (((1,), (1,)), ((), ()))

  def step(t, acc):
    for u in range(unroll):
      b = s * blocks_per_prog + t * unroll + u
      c = codes_ref[rows, pl.ds(b * p, p)]
      a = absmax_ref[rows, pl.ds(b, 1)]
      hi, lo = _decode(c, lut_ref, decode)
      xe, xo = load_x(b)
      acc += jax.lax.dot_general(xe, (hi * a).astype(cdtype), dims,
                                 preferred_element_type=jnp.float32)
      acc += jax.lax.dot_general(xo, (lo * a).astype(cdtype), dims,
                                 preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, blocks_per_prog // unroll, step, jnp.zeros((m, bn), jnp.float32))
  o_ref[s, :, rows] = acc


def _fused_fwd_kernel(x_ref, codes_ref, absmax_ref, lut_ref, o_ref, *, p, **kw):
  """x as one [M, K] array: even/odd columns read with stride 2."""
  def load_x(b):
    return (x_ref[:, pl.ds(b * 2 * p, p, stride=2)], x_ref[:, pl.ds(b * 2 * p + 1, p, stride=2)])

  _fused_fwd_body(load_x, codes_ref, absmax_ref, lut_ref, o_ref, m=x_ref.shape[0], p=p, **kw)


def _fused_fwd_split_kernel(xe_ref, xo_ref, codes_ref, absmax_ref, lut_ref, o_ref, *, p, **kw):
  """x split into even/odd columns by XLA beforehand: contiguous loads."""
  def load_x(b):
    return xe_ref[:, pl.ds(b * p, p)], xo_ref[:, pl.ds(b * p, p)]

  _fused_fwd_body(load_x, codes_ref, absmax_ref, lut_ref, o_ref, m=xe_ref.shape[0], p=p, **kw)


def _gemv_fwd_kernel(xe_ref, xo_ref, codes_ref, absmax_ref, lut_ref, o_ref, *, bn, p,
                     blocks_per_prog, unroll, decode):
  """M == 1: y[n] = sum_k W[n, k] x[k] with CUDA-core multiplies and row sums (no MMA)."""
  rows = pl.ds(pl.program_id(0) * bn, bn)
  s = pl.program_id(1)

  def step(t, acc):
    for u in range(unroll):
      b = s * blocks_per_prog + t * unroll + u
      c = codes_ref[rows, pl.ds(b * p, p)]
      a = absmax_ref[rows, b]
      hi, lo = _decode(c, lut_ref, decode)
      xe = jax.lax.broadcast_in_dim(xe_ref[0, pl.ds(b * p, p)].astype(jnp.float32), (bn, p), (1,))
      xo = jax.lax.broadcast_in_dim(xo_ref[0, pl.ds(b * p, p)].astype(jnp.float32), (bn, p), (1,))
      part = jnp.sum(hi * xe + lo * xo, axis=1)
      acc += part * a
    return acc

  acc = jax.lax.fori_loop(0, blocks_per_prog // unroll, step, jnp.zeros((bn,), jnp.float32))
  o_ref[s, 0, rows] = acc


def _fused_fwd(x2, w: NF4, plan: Plan):
  _check_kernel_blocksize(w)
  m, k = x2.shape
  n = w.shape[0]
  p = w.blocksize // 2
  nb = k // w.blocksize
  mp = max(16, _common.next_pow2(m))
  bn = min(plan.bn, max(16, _common.next_pow2(n)))
  n_pad = -(-n // bn) * bn
  split = plan.split or max(1, _n_programs_target() // (n_pad // bn))
  split = _largest_divisor(nb, split)
  blocks_per_prog = nb // split
  unroll = _largest_divisor(blocks_per_prog, plan.unroll)
  codes, absmax = _prepared(w, n_pad)
  common = dict(bn=bn, p=p, blocks_per_prog=blocks_per_prog, unroll=unroll, decode=plan.decode)
  if plan.gemv and m == 1:
    mp = 1
    kernel = functools.partial(_gemv_fwd_kernel, **common)
    xs = (x2[:, 0::2], x2[:, 1::2])
  elif plan.x_split or plan.gemv:
    xp = _pad_rows(x2, mp)
    kernel = functools.partial(_fused_fwd_split_kernel, cdtype=x2.dtype, **common)
    xs = (xp[:, 0::2], xp[:, 1::2])
  else:
    kernel = functools.partial(_fused_fwd_kernel, cdtype=x2.dtype, **common)
    xs = (_pad_rows(x2, mp),)
  part = _call(kernel, jax.ShapeDtypeStruct((split, mp, n_pad), jnp.float32),
               (n_pad // bn, split), plan, "nf4_matmul_fused_fwd")(*xs, codes, absmax,
                                                                    _tables(plan.decode))
  return part.sum(0)[:m, :n].astype(x2.dtype)


def _fused_bwd_kernel(dy_ref, codes_ref, absmax_ref, lut_ref, oe_ref, oo_ref, *, bn, p,
                      rows_per_prog, decode, cdtype):
  b = pl.program_id(0)
  s = pl.program_id(1)
  cols = pl.ds(b * p, p)
  mp = dy_ref.shape[0]

  def step(t, carry):
    acc_e, acc_o = carry
    r0 = s * rows_per_prog + t * bn
    c = codes_ref[pl.ds(r0, bn), cols]
    a = absmax_ref[pl.ds(r0, bn), pl.ds(b, 1)]
    hi, lo = _decode(c, lut_ref, decode)
    g = dy_ref[:, pl.ds(r0, bn)]
    acc_e += jnp.dot(g, (hi * a).astype(cdtype), preferred_element_type=jnp.float32)
    acc_o += jnp.dot(g, (lo * a).astype(cdtype), preferred_element_type=jnp.float32)
    return acc_e, acc_o

  zeros = jnp.zeros((mp, p), jnp.float32)
  acc_e, acc_o = jax.lax.fori_loop(0, rows_per_prog // bn, step, (zeros, zeros))
  oe_ref[s, :, cols] = acc_e
  oo_ref[s, :, cols] = acc_o


def _gemv_bwd_kernel(dy_ref, codes_ref, absmax_ref, lut_ref, oe_ref, oo_ref, *, bn, p,
                     rows_per_prog, decode):
  """M == 1: dx[k] = sum_n dy[n] W[n, k] with CUDA-core multiplies and column sums."""
  b = pl.program_id(0)
  s = pl.program_id(1)
  cols = pl.ds(b * p, p)

  def step(t, carry):
    acc_e, acc_o = carry
    r0 = s * rows_per_prog + t * bn
    c = codes_ref[pl.ds(r0, bn), cols]
    a = absmax_ref[pl.ds(r0, bn), b]
    hi, lo = _decode(c, lut_ref, decode)
    g = dy_ref[0, pl.ds(r0, bn)].astype(jnp.float32)
    ga = jax.lax.broadcast_in_dim(g * a, (bn, p), (0,))
    return acc_e + jnp.sum(hi * ga, axis=0), acc_o + jnp.sum(lo * ga, axis=0)

  zeros = jnp.zeros((p,), jnp.float32)
  acc_e, acc_o = jax.lax.fori_loop(0, rows_per_prog // bn, step, (zeros, zeros))
  oe_ref[s, 0, cols] = acc_e
  oo_ref[s, 0, cols] = acc_o


def _fused_bwd(dy2, w: NF4, plan: Plan):
  _check_kernel_blocksize(w)
  m, n = dy2.shape
  k = w.shape[1]
  p = w.blocksize // 2
  nb = k // w.blocksize
  mp = max(16, _common.next_pow2(m))
  bn = min(plan.bwd_bn, max(16, _common.next_pow2(n)))
  n_pad = -(-n // bn) * bn
  chunks = n_pad // bn
  split = plan.split or max(1, _n_programs_target() // nb)
  split = _largest_divisor(chunks, split)
  codes, absmax = _prepared(w, n_pad)
  decode = plan.bwd_decode or plan.decode
  plan = dataclasses.replace(plan, num_warps=plan.bwd_num_warps or plan.num_warps)
  if plan.gemv and m == 1:
    mp = 1
    kernel = functools.partial(_gemv_bwd_kernel, bn=bn, p=p, rows_per_prog=n_pad // split,
                               decode=decode)
  else:
    kernel = functools.partial(_fused_bwd_kernel, bn=bn, p=p, rows_per_prog=n_pad // split,
                               decode=decode, cdtype=dy2.dtype)
  g = jnp.pad(dy2, ((0, mp - m), (0, n_pad - n)))
  shape = jax.ShapeDtypeStruct((split, mp, k // 2), jnp.float32)
  oe, oo = _call(kernel, (shape, shape), (nb, split), plan, "nf4_matmul_fused_bwd")(
      g, codes, absmax, _tables(decode))
  dx = jnp.stack([oe.sum(0), oo.sum(0)], axis=-1).reshape(mp, k)
  return dx[:m].astype(dy2.dtype)


# ----------------------------------------------------------------------------- custom_vjp

def _dense(w: NF4, dtype, how: str, plan: Plan):
  if how == "xla":
    return _quant().dequantize_nf4(w, dtype)
  return nf4_dequantize_pallas(w, dtype, plan)


def _dot(a, b):
  """a @ b in a's dtype with f32 accumulation. On the GPU the GEMM writes a's dtype itself (cuBLAS
  accumulates bf16 products in f32): asking for an f32 result and casting it made XLA run the cast as
  a separate pass over the output for the large MLP matmuls (profile of the 8B step: 3-5 such
  `wrapped_convert` kernels per layer, 11-19 ms per step). Elsewhere (CPU) the f32 result is kept
  explicit, since there a low-precision dot may accumulate in its own dtype."""
  if a.dtype != jnp.float32 and jax.default_backend() == "gpu":
    return jnp.dot(a, b, preferred_element_type=a.dtype)
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _forward(x2, w: NF4, plan: Plan):
  if plan.fwd == "fused":
    return _fused_fwd(x2, w, plan)
  wd = _dense(w, x2.dtype, plan.fwd, plan)
  return _dot(x2, wd.T)


def _backward(dy2, w: NF4, plan: Plan):
  if plan.bwd == "fused":
    return _fused_bwd(dy2, w, plan)
  wd = _dense(w, dy2.dtype, plan.bwd, plan)
  return _dot(dy2, wd)


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.floating):
    return jnp.zeros_like(leaf)
  return np.zeros(leaf.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul2d(x2, w, plan):
  return _forward(x2, w, plan)


def _matmul2d_fwd(x2, w, plan):
  return _forward(x2, w, plan), w


# Experimental, off until measured: also tie W to dy in the backward's barrier, so the scheduler
# cannot dequantize a layer's seven weights before their cotangents exist (all dense at once: 0.44
# GiB for 8B, 1.7 GiB for 70B); each would be made when its matmul can run. bench/train_throughput.py
# presets take "/tie=1" to A/B it.
TIE_BACKWARD_TO_COTANGENT = False


def _matmul2d_bwd(plan, w, dy2):
  # The barrier keeps XLA from merging (CSE) the backward's dequantization with the forward's when
  # both land in one program: that would keep the dense W alive from the forward to the backward.
  if TIE_BACKWARD_TO_COTANGENT:
    dy2, wb = jax.lax.optimization_barrier((dy2, w))
  else:
    wb = jax.lax.optimization_barrier(w)
  return _backward(dy2, wb, plan), jax.tree_util.tree_map(_zero_cotangent, w)


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


# ----------------------------------------------------------------------------- public entry

def nf4_matmul(x: jax.Array, w: NF4, *, implementation: str | None = None,
               plan: Plan | None = None) -> jax.Array:
  """x [..., K] (bf16/f16/f32) @ dequant(w).T -> [..., N] in x.dtype; differentiable in x only.

  w must be one layer's NF4 (inside `jax.lax.scan` over a stacked weight, scan hands each layer
  an unstacked one). `plan` overrides the dispatch (benchmarks, tests).
  """
  if not isinstance(w, _quant().NF4):
    raise ValueError(f"nf4_matmul: w must be an NF4 weight, got {type(w).__name__}")
  if w.stacked_dims:
    raise ValueError(f"nf4_matmul: w is stacked over leading dims {w.stacked_dims}; pass one "
                     "layer's weight (e.g. from inside jax.lax.scan)")
  w.validate("nf4_matmul: w")
  n, k = w.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"nf4_matmul: x's last dim must be K={k} (W is [N, K] = {w.shape}), "
                     f"got x of shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 2:
    raise ValueError(f"nf4_matmul: x must be bfloat16, float16 or float32, got {x.dtype}")
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"nf4_matmul: implementation must be one of {IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}")
  lead = x.shape[:-1]
  m = int(np.prod(lead)) if lead else 1
  if plan is None:
    plan = _auto_plan(m, implementation)
  if "fused" in (plan.fwd, plan.bwd) and m > FUSED_MAX_M:
    plan = dataclasses.replace(plan, fwd=plan.fwd.replace("fused", "dequant"),
                               bwd=plan.bwd.replace("fused", "dequant"))
  y = _matmul2d(x.reshape(m, k), w, plan)
  return y.reshape(lead + (n,))
