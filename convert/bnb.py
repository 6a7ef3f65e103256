"""Read one pre-quantized bitsandbytes 4-bit Linear (HF-serialized) into a `jaxsloth.quant.NF4`.

A bnb "-bnb-4bit" checkpoint stores, for each quantized Linear `<prefix>` (W [N, K]):
  <prefix>.weight                                uint8 [N*K/2, 1]  codes, two per byte, high nibble first
  <prefix>.weight.absmax                         uint8 [N*K/64] (double quant) or f32
  <prefix>.weight.quant_map                      f32 [16]   the NF4 code book
  <prefix>.weight.nested_absmax                  f32 [ceil(N*K/64/256)]        (double quant only)
  <prefix>.weight.nested_quant_map               f32 [256]  dynamic 8-bit map  (double quant only)
  <prefix>.weight.quant_state.bitsandbytes__nf4  uint8 [*]  JSON: quant_type, blocksize, dtype, shape
                                                 and, with double quant, nested_blocksize, nested_dtype,
                                                 nested_offset
Nothing is dequantized: the arrays are reshaped into our layout (which is bnb's) after validation.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from jaxsloth.quant import DYNAMIC_MAP, NESTED_BLOCKSIZE, NF4, NF4_CODE

__all__ = ["bnb_keys", "nf4_from_bnb_tensors", "nf4_to_bnb_tensors", "BnbFormatError"]

_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_DTYPES = {"bfloat16", "float16", "float32"}


class BnbFormatError(ValueError):
  """A bitsandbytes 4-bit tensor group is missing, malformed or inconsistent."""


def bnb_keys(prefix: str, double_quant: bool = True) -> list[str]:
  """Tensor names consumed for the Linear `prefix` (e.g. "model.layers.0.self_attn.q_proj")."""
  names = ["weight", "weight.absmax", "weight.quant_map", _STATE_KEY]
  if double_quant:
    names += ["weight.nested_absmax", "weight.nested_quant_map"]
  return [f"{prefix}.{n}" for n in names]


def _quant_state(prefix: str, raw: np.ndarray, source: str) -> dict:
  name = f"{prefix}.{_STATE_KEY}"
  raw = np.asarray(raw)
  if raw.dtype != np.uint8:
    raise BnbFormatError(f"{source}: tensor {name!r} must be uint8 (packed JSON), got {raw.dtype}")
  try:
    state = json.loads(raw.reshape(-1).tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BnbFormatError(f"{source}: tensor {name!r} is not valid packed JSON ({e})") from None
  if not isinstance(state, dict):
    raise BnbFormatError(f"{source}: tensor {name!r} must hold a JSON object, got {type(state).__name__}")
  return state


def _get(tensors, prefix, key, source):
  name = f"{prefix}.{key}"
  if name not in tensors:
    raise BnbFormatError(f"{source}: missing tensor {name!r} (bitsandbytes 4-bit Linear {prefix!r}; "
                         f"present: {sorted(k for k in tensors if k.startswith(prefix))})")
  return np.asarray(tensors[name])


def _expect(cond: bool, source: str, name: str, msg: str):
  if not cond:
    raise BnbFormatError(f"{source}: tensor {name!r}: {msg}")


def nf4_from_bnb_tensors(prefix: str, tensors: dict[str, np.ndarray], shape: tuple[int, int],
                         source: str) -> NF4:
  """NF4 for the Linear `prefix` from its bnb tensors; `shape` is the (N, K) the config implies.

  Raises BnbFormatError (a ValueError) naming the tensor when anything does not match.
  """
  n, k = (int(s) for s in shape)
  state_name = f"{prefix}.{_STATE_KEY}"
  state = _quant_state(prefix, _get(tensors, prefix, _STATE_KEY, source), source)
  qt = state.get("quant_type")
  _expect(qt == "nf4", source, state_name, f"quant_type must be 'nf4', found {qt!r}")
  bs = state.get("blocksize")
  _expect(isinstance(bs, int) and bs >= 2 and not bs & (bs - 1), source, state_name,
          f"blocksize must be a power of two, found {bs!r}")
  st_shape = state.get("shape")
  _expect(isinstance(st_shape, list) and [int(s) for s in st_shape] == [n, k], source, state_name,
          f"shape {st_shape} does not match the [out, in] = {[n, k]} that config.json implies")
  dtype = state.get("dtype", "bfloat16")
  _expect(dtype in _DTYPES, source, state_name, f"dtype must be one of {sorted(_DTYPES)}, found {dtype!r}")
  _expect(k % bs == 0, source, state_name,
          f"in features K={k} must be a multiple of blocksize {bs} (jaxsloth keeps blocks within rows)")
  nb = n * k // bs
  double_quant = "nested_absmax" in state or "nested_offset" in state

  codes_name = f"{prefix}.weight"
  codes = _get(tensors, prefix, "weight", source)
  _expect(codes.dtype == np.uint8, source, codes_name, f"packed 4-bit codes must be uint8, found {codes.dtype}")
  _expect(codes.size == n * k // 2, source, codes_name,
          f"expected {n * k // 2} bytes (= {n}*{k}/2) of packed codes, found shape {list(codes.shape)}")

  qmap_name = f"{prefix}.weight.quant_map"
  qmap = _get(tensors, prefix, "weight.quant_map", source).astype(np.float32).reshape(-1)
  _expect(qmap.shape == (16,) and np.array_equal(qmap, NF4_CODE), source, qmap_name,
          "is not bitsandbytes' NF4 code book (only standard NF4 is supported)")

  absmax_name = f"{prefix}.weight.absmax"
  absmax = _get(tensors, prefix, "weight.absmax", source).reshape(-1)
  _expect(absmax.size == nb, source, absmax_name,
          f"expected {nb} block scales (= {n}*{k}/{bs}), found shape {list(absmax.shape)}")
  if double_quant:
    _expect(absmax.dtype == np.uint8, source, absmax_name,
            f"with double quant the absmax must be uint8, found {absmax.dtype}")
    nbs = state.get("nested_blocksize")
    _expect(nbs == NESTED_BLOCKSIZE, source, state_name,
            f"nested_blocksize must be {NESTED_BLOCKSIZE}, found {nbs!r}")
    off = state.get("nested_offset")
    _expect(isinstance(off, (int, float)) and np.isfinite(off), source, state_name,
            f"nested_offset must be a finite number, found {off!r}")
    nd = state.get("nested_dtype", "float32")
    _expect(nd == "float32", source, state_name, f"nested_dtype must be 'float32', found {nd!r}")
    nested_name = f"{prefix}.weight.nested_absmax"
    nested = _get(tensors, prefix, "weight.nested_absmax", source).reshape(-1)
    n_nested = -(-nb // NESTED_BLOCKSIZE)
    _expect(nested.dtype == np.float32 and nested.size == n_nested, source, nested_name,
            f"expected float32[{n_nested}], found {nested.dtype}{list(nested.shape)}")
    _expect(bool(np.all(np.isfinite(nested))) and bool(np.all(nested >= 0)), source, nested_name,
            "holds negative or non-finite block maxima")
    nmap_name = f"{prefix}.weight.nested_quant_map"
    nmap = _get(tensors, prefix, "weight.nested_quant_map", source).astype(np.float32).reshape(-1)
    _expect(nmap.shape == (256,) and np.array_equal(nmap, DYNAMIC_MAP), source, nmap_name,
            "is not bitsandbytes' signed dynamic 8-bit map")
    offset = np.float32(off)
  else:
    _expect(absmax.dtype == np.float32, source, absmax_name,
            f"without double quant the absmax must be float32, found {absmax.dtype}")
    _expect(bool(np.all(np.isfinite(absmax))) and bool(np.all(absmax >= 0)), source, absmax_name,
            "holds negative or non-finite block maxima")
    nested = np.zeros((0,), np.float32)
    offset = np.float32(0.0)

  q = NF4(codes=jnp.asarray(codes.reshape(n, k // 2)),
          absmax=jnp.asarray(absmax.reshape(n, k // bs)),
          absmax_offset=jnp.asarray(offset, jnp.float32),
          nested_absmax=jnp.asarray(nested),
          shape=(n, k), blocksize=bs, double_quant=double_quant, dtype=dtype)
  q.validate(f"{source}: {prefix}")
  return q


def nf4_to_bnb_tensors(prefix: str, q: NF4) -> dict[str, np.ndarray]:
  """The inverse of `nf4_from_bnb_tensors`: one (unstacked) NF4 weight as transformers + bitsandbytes
  serialize it, so that our quantized weights can be written as a "-bnb-4bit" checkpoint."""
  n, k = q.shape
  state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": q.dtype, "shape": [n, k]}
  out = {f"{prefix}.weight": np.asarray(q.codes).reshape(-1, 1),
         f"{prefix}.weight.absmax": np.asarray(q.absmax).reshape(-1),
         f"{prefix}.weight.quant_map": np.asarray(NF4_CODE, np.float32).copy()}
  if q.double_quant:
    state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(q.absmax_offset))
    out[f"{prefix}.weight.nested_absmax"] = np.asarray(q.nested_absmax, np.float32).reshape(-1)
    out[f"{prefix}.weight.nested_quant_map"] = np.asarray(DYNAMIC_MAP, np.float32).copy()
  out[f"{prefix}.{_STATE_KEY}"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
  return out
