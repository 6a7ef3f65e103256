"""NF4 weights: bitsandbytes-compatible 4-bit storage of frozen Linear weights, in pure JAX.

Dims: N out features, K in features (HF layout W [N, K]; the model computes y = x @ W.T),
B = K // blocksize quantization blocks per row, L an optional leading layer dim (stacked weights
run under `jax.lax.scan`; array leaves carry [L, ...], the static `shape` stays (N, K)).

Layout (identical to bitsandbytes 0.50.2 `quantize_4bit(..., quant_type="nf4")`, so that our codes
and bnb's are byte-for-byte the same and pre-quantized "-bnb-4bit" checkpoints load as is):
  - the weight is flattened row-major and cut into blocks of `blocksize` (64) elements; we require
    K % blocksize == 0 so that a block never straddles two rows (true for every Llama projection);
  - absmax[b] = max |w| over block b (f32), codes = the NF4 code of w * (1 / absmax) chosen by
    bnb's comparison tree (strict ">" against the midpoints of the sorted code book);
  - two codes per byte, the first (even) element in the high nibble: codes [N, K // 2] uint8;
  - double quant ("compress_statistics"): offset = mean(absmax); absmax - offset is quantized
    blockwise (256 per block, over the flattened absmax) to uint8 with bnb's signed dynamic 8-bit
    map and bnb's binary-search rounding; nested_absmax [ceil(N*B/256)] f32 holds the block maxima.
Dequantization follows bnb's kernels op for op (f32 multiply, then one rounding to the output dtype):
  absmax = dynamic_map[q] * nested_absmax[i // 256] + offset,  w = nf4[code] * absmax[block].

Known bit-level caveats vs bnb (both measured on the GPU, see bench/RESULTS.md): bnb is compiled with
--use_fast_math, so its 1/absmax is an approximate reciprocal; and torch's f32 mean of absmax may
differ from ours by an ulp. Either can flip a code whose scaled value sits within an ulp of a
decision threshold (never seen on random weights so far, see the GPU test).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NF4", "NF4_CODE", "DYNAMIC_MAP", "quantize_nf4", "dequantize_nf4", "dequantize_absmax",
    "stack_nf4", "unstack_nf4", "nf4_nbytes", "NESTED_BLOCKSIZE",
]

# bitsandbytes' NF4 code book (`get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)

# The decision thresholds of bnb's `dQuantizeNF4` tree (midpoints between neighbouring codes, as
# f32 literals). The tree is a binary search over these sorted values, so code = #{t : x > t}.
_NF4_THRESHOLDS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=np.float32)

# bitsandbytes' signed dynamic 8-bit map, `create_dynamic_map(signed=True)` (0.50.2), as f32 bit
# patterns: the recipe goes through torch.linspace in f32, whose rounding numpy does not reproduce,
# so the table is stored rather than recomputed. Sorted; [127] == 0.0, [255] == 1.0.
DYNAMIC_MAP = np.array([
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000
], dtype=np.uint32).view(np.float32)

NESTED_BLOCKSIZE = 256
_DTYPES = ("bfloat16", "float16", "float32")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "absmax_offset", "nested_absmax"],
    meta_fields=["shape", "blocksize", "double_quant", "dtype"])
@dataclasses.dataclass(frozen=True)
class NF4:
  """A frozen NF4 weight W [N, K] (optionally stacked over layers: leaves get a leading [L]).

  codes:         uint8 [L?, N, K // 2]  two 4-bit codes per byte, first element high nibble.
  absmax:        f32 [L?, N, B] or, with double quant, uint8 [L?, N, B].
  absmax_offset: f32 [L?]  mean of the absmax (0 without double quant).
  nested_absmax: f32 [L?, ceil(N * B / 256)] (size 0 without double quant).
  shape:         static (N, K) of one layer's weight.
  dtype:         name of the compute dtype that dequantization produces by default.
  """
  codes: jax.Array
  absmax: jax.Array
  absmax_offset: jax.Array
  nested_absmax: jax.Array
  shape: tuple[int, int]
  blocksize: int = 64
  double_quant: bool = True
  dtype: str = "bfloat16"

  @property
  def n_blocks(self) -> int:
    return self.shape[1] // self.blocksize

  @property
  def stacked_dims(self) -> tuple[int, ...]:
    """Leading dims beyond one layer's leaves (() for an unstacked weight)."""
    return tuple(self.codes.shape[:-2])

  def validate(self, where: str = "NF4") -> None:
    """Raise ValueError naming the offending field when leaves do not match the metadata."""
    n, k = self.shape
    bs = self.blocksize
    lead = self.stacked_dims
    nb = k // bs
    expect = {
        "codes": (lead + (n, k // 2), (np.uint8,)),
        "absmax": (lead + (n, nb), (np.uint8,) if self.double_quant else (np.float32,)),
        "absmax_offset": (lead, (np.float32,)),
        "nested_absmax": (lead + (_cdiv(n * nb, NESTED_BLOCKSIZE) if self.double_quant else 0,),
                          (np.float32,)),
    }
    for name, (shape, dtypes) in expect.items():
      leaf = getattr(self, name)
      if tuple(leaf.shape) != shape or np.dtype(leaf.dtype) not in dtypes:
        raise ValueError(
            f"{where}: field `{name}` must be {np.dtype(dtypes[0]).name}{list(shape)} for a "
            f"{'double-quantized ' if self.double_quant else ''}NF4 weight of shape {self.shape} "
            f"with blocksize {bs}; found {np.dtype(leaf.dtype).name}{list(leaf.shape)}")


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _check_blocking(shape, blocksize: int, where: str) -> tuple[int, int]:
  if len(shape) != 2:
    raise ValueError(f"{where}: expected a 2-D weight [N, K], got shape {tuple(shape)}")
  n, k = (int(s) for s in shape)
  if blocksize <= 0 or blocksize % 2 or blocksize & (blocksize - 1):
    raise ValueError(f"{where}: blocksize must be an even power of two, got {blocksize}")
  if k % blocksize:
    raise ValueError(
        f"{where}: K (in features, the last dim) must be a multiple of blocksize={blocksize} so that "
        f"no quantization block straddles two rows; got shape {(n, k)}")
  return n, k


def _nf4_codes(x: jax.Array) -> jax.Array:
  """bnb's dQuantizeNF4 on f32 values already scaled by 1/absmax (NaN -> 0, like the CUDA tree)."""
  t = jnp.asarray(_NF4_THRESHOLDS)
  return jnp.sum(x[..., None] > t, axis=-1, dtype=jnp.int32).astype(jnp.uint8)


def _dynamic_quantize(x: jax.Array) -> jax.Array:
  """bnb's `dQuantize<0>` (7-step binary search + midpoint rounding) over DYNAMIC_MAP, vectorized."""
  code = jnp.asarray(DYNAMIC_MAP)
  pivot = jnp.full(x.shape, 127, jnp.int32)
  upper_pivot = jnp.full(x.shape, 255, jnp.int32)
  lower_pivot = jnp.zeros(x.shape, jnp.int32)
  lower = jnp.full(x.shape, -1.0, jnp.float32)
  upper = jnp.full(x.shape, 1.0, jnp.float32)
  val = code[pivot]
  for i in (64, 32, 16, 8, 4, 2, 1):
    gt = x > val
    lower_pivot = jnp.where(gt, pivot, lower_pivot)
    lower = jnp.where(gt, val, lower)
    upper_pivot = jnp.where(gt, upper_pivot, pivot)
    upper = jnp.where(gt, upper, val)
    pivot = jnp.where(gt, pivot + i, pivot - i)
    val = code[pivot]
  upper = jnp.where(upper_pivot == 255, code[255], upper)
  lower = jnp.where(lower_pivot == 0, code[0], lower)
  gt = x > val
  up = jnp.where(x > (upper + val) * 0.5, upper_pivot, pivot)
  down = jnp.where(x < (lower + val) * 0.5, lower_pivot, pivot)
  return jnp.where(gt, up, down).astype(jnp.uint8)


def _blockwise_absmax(x: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
  """(absmax per block, x * (1/absmax)) for x [..., nb * blocksize] f32, as bnb computes them."""
  xb = x.reshape(x.shape[:-1] + (x.shape[-1] // blocksize, blocksize))
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  scaled = xb * (1.0 / absmax)[..., None]
  return absmax, scaled


@functools.partial(jax.jit, static_argnames=("blocksize", "double_quant", "dtype"))
def _quantize(w, blocksize, double_quant, dtype):
  n, k = w.shape
  x = w.astype(jnp.float32)
  absmax, scaled = _blockwise_absmax(x, blocksize)        # [N, B], [N, B, bs]
  q = _nf4_codes(scaled).reshape(n, k // 2, 2)
  codes = (q[..., 0] << 4) | q[..., 1]
  if not double_quant:
    return NF4(codes, absmax, jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32),
               (n, k), blocksize, False, dtype)
  flat = absmax.reshape(-1)
  offset = jnp.mean(flat)
  centred = flat - offset
  pad = (-flat.size) % NESTED_BLOCKSIZE                    # bnb loads the tail block with zeros
  nested, scaled2 = _blockwise_absmax(jnp.pad(centred, (0, pad)), NESTED_BLOCKSIZE)
  qabs = _dynamic_quantize(scaled2).reshape(-1)[:flat.size].reshape(absmax.shape)
  return NF4(codes, qabs, offset, nested, (n, k), blocksize, True, dtype)


def quantize_nf4(w: jax.Array, blocksize: int = 64, double_quant: bool = True,
                 dtype: str | None = None) -> NF4:
  """Quantize W [N, K] (bf16/f16/f32) to NF4 exactly as bitsandbytes' quantize_4bit does.

  `dtype` is the compute dtype recorded on the weight (default: w's dtype). Runs jitted on the
  default device (an 8B model's 224 projections quantize in seconds on a GPU).
  """
  w = jnp.asarray(w)
  _check_blocking(w.shape, blocksize, "quantize_nf4")
  if w.dtype.name not in _DTYPES:
    raise ValueError(f"quantize_nf4: weight dtype must be one of {_DTYPES}, got {w.dtype.name}")
  dtype = w.dtype.name if dtype is None else jnp.dtype(dtype).name
  if dtype not in _DTYPES:
    raise ValueError(f"quantize_nf4: dtype must be one of {_DTYPES}, got {dtype}")
  return _quantize(w, blocksize, bool(double_quant), dtype)


def dequantize_absmax(q: NF4) -> jax.Array:
  """The f32 absmax [L?, N, B] of q (undoing double quant the way bnb's dequantize_4bit does)."""
  if not q.double_quant:
    return q.absmax.astype(jnp.float32)
  lead = q.stacked_dims
  flat = q.absmax.reshape(lead + (-1,))
  nb_flat = flat.shape[-1]
  nested_idx = np.arange(nb_flat) // NESTED_BLOCKSIZE
  code = jnp.asarray(DYNAMIC_MAP)[flat]
  scaled = code * q.nested_absmax[..., nested_idx]
  # bnb rounds the product to f32 in one kernel and adds the offset in another. LLVM (XLA CPU and
  # GPU) would contract a multiply feeding an add into one FMA, which rounds once and differs by an
  # ulp; a per-element select the compiler cannot fold (map values are >= -1) keeps them apart.
  scaled = jnp.where(code >= -2, scaled, jnp.float32(0))
  absmax = scaled + q.absmax_offset[..., None]
  return absmax.reshape(q.absmax.shape)


def _byte_lut() -> np.ndarray:
  """[256, 2] f32: the two NF4 values (high nibble, low nibble) of every byte."""
  b = np.arange(256)
  return np.stack([NF4_CODE[b >> 4], NF4_CODE[b & 15]], axis=-1)


_BYTE_LUT = _byte_lut()


def dequantize_nf4(q: NF4, dtype=None) -> jax.Array:
  """W [L?, N, K] in `dtype` (default: q.dtype), bit-identical to bnb's dequantize_4bit.

  Decodes each byte through a 256-entry (hi, lo) table: one gather per two elements, which XLA
  runs near memory speed (DESIGN.md: 1.13-1.15x a bf16 dot for dequant+dot, vs 1.37x for a
  per-nibble gather).
  """
  dtype = jnp.dtype(q.dtype if dtype is None else dtype)
  n, k = q.shape
  lead = q.stacked_dims
  absmax = dequantize_absmax(q)                            # [L?, N, B]
  vals = jnp.asarray(_BYTE_LUT)[q.codes]                   # [L?, N, K/2, 2]
  vals = vals.reshape(lead + (n, k // q.blocksize, q.blocksize))
  w = vals * absmax[..., None]
  return w.reshape(lead + (n, k)).astype(dtype)


def stack_nf4(weights: list[NF4]) -> NF4:
  """Stack per-layer NF4 weights (same shape/blocksize/double_quant/dtype) into leaves [L, ...]."""
  if not weights:
    raise ValueError("stack_nf4: got an empty list")
  first = weights[0]
  meta = (first.shape, first.blocksize, first.double_quant, first.dtype)
  for i, w in enumerate(weights):
    if not isinstance(w, NF4):
      raise ValueError(f"stack_nf4: item {i} is {type(w).__name__}, not NF4")
    if (w.shape, w.blocksize, w.double_quant, w.dtype) != meta:
      raise ValueError(
          f"stack_nf4: item {i} has (shape, blocksize, double_quant, dtype) = "
          f"{(w.shape, w.blocksize, w.double_quant, w.dtype)}, item 0 has {meta}")
    if w.stacked_dims:
      raise ValueError(f"stack_nf4: item {i} is already stacked (leading dims {w.stacked_dims})")
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *weights)


def unstack_nf4(q: NF4) -> list[NF4]:
  """Inverse of stack_nf4 along the first leading dim."""
  if not q.stacked_dims:
    raise ValueError("unstack_nf4: weight is not stacked")
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], q) for i in range(q.stacked_dims[0])]


def nf4_nbytes(q: NF4) -> int:
  """Bytes held by q's arrays (codes + absmax + double-quant state)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(q)))
