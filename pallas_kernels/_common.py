"""Device checks shared by the kernel modules: which backend runs, whether Pallas
must interpret, the GPU's compute capability, and how `implementation=` resolves.

Kernels here are written in the portable Pallas subset (whole-array refs,
`pl.ds` slices, masked `pallas.triton.load/store`) so that one source runs
Triton-lowered on NVIDIA GPUs (compute capability >= 8.0) and interpreted on CPU.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

IMPLEMENTATIONS = ("xla", "pallas")
BACKWARDS = ("kernel", "reference")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def interpret() -> bool:
  """Pallas kernels run through the HLO interpreter everywhere but on a GPU.

  JAXSLOTH_PALLAS_INTERPRET=0 forces the Triton lowering, e.g. to lower for "cuda" on a CPU
  machine (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`) and catch lowering errors.
  """
  forced = os.environ.get("JAXSLOTH_PALLAS_INTERPRET")
  if forced is not None:
    return forced not in ("0", "false", "False")
  return not on_gpu()


@functools.cache
def compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the first GPU, or None without one."""
  if not on_gpu():
    return None
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc is None:
    return None
  major, minor = str(cc).split(".")[:2]
  return int(major), int(minor)


def pallas_supported() -> bool:
  """Triton-lowered Pallas needs Ampere or newer; anything else interprets."""
  if not on_gpu():
    return True  # interpret mode
  cc = compute_capability()
  return cc is not None and cc >= (8, 0)


def resolve(implementation: str | None, op: str, default_on_gpu: str = "pallas") -> str:
  """None -> the op's measured-fastest implementation on GPU, "xla" elsewhere."""
  if implementation is None:
    return default_on_gpu if (on_gpu() and pallas_supported()) else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"{op}: implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  if implementation == "pallas" and not pallas_supported():
    return "xla"
  return implementation


def check_backward(backward: str, op: str) -> None:
  if backward not in BACKWARDS:
    raise ValueError(f"{op}: backward must be one of {BACKWARDS}, got {backward!r}")


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def pallas_call(kernel, *, out_shape, grid, num_warps: int = 4, num_stages: int = 1,
                name: str | None = None, input_output_aliases=None):
  """`pl.pallas_call` on the Triton lowering (GPU) or the interpreter (CPU)."""
  common = dict(out_shape=out_shape, grid=grid, name=name,
                input_output_aliases=input_output_aliases or {})
  if interpret():
    return pl.pallas_call(kernel, interpret=True, **common)
  return pl.pallas_call(
      kernel, compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      **common)


def tail_mask(shape, bounds):
  """Mask of a block of `shape` whose dim i starts at start_i of an array dim of size limit_i.

  bounds[i] = (start_i, limit_i), or None where the block never runs past the array. Returns None
  when no dim needs a mask: unmasked loads and stores vectorise, masked ones may not.
  """
  mask = None
  for axis, bound in enumerate(bounds):
    if bound is None:
      continue
    start, limit = bound
    m = start + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < limit
    mask = m if mask is None else mask & m
  return mask


def load(ref, mask=None, other=0, eviction_policy=None):
  """Masked (mask=None: unmasked) load; the L2 eviction hint applies on the GPU only."""
  kw = {} if eviction_policy is None or interpret() else {"eviction_policy": eviction_policy}
  if mask is None:
    return pltriton.load(ref, **kw)
  return pltriton.load(ref, mask=mask, other=other, **kw)


def store(ref, value, mask=None, eviction_policy=None):
  kw = {} if eviction_policy is None or interpret() else {"eviction_policy": eviction_policy}
  pltriton.store(ref, value, mask=mask, **kw)
