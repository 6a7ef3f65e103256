"""Rotary position embedding (HF Llama rotate-half convention) with per-token positions.

Dims: B batch, S sequence, N query heads, M key/value heads (GQA), H head dim, T = B*S tokens.
  rope_tables(position_ids [B, S]) -> cos, sin [B, S, H] f32        (emb = concat(freqs, freqs))
  apply_rope(q [B,S,N,H], k [B,S,M,H], cos, sin) -> q', k'           x' = x*cos + rotate_half(x)*sin
  apply_rope_positions(q, k, position_ids [B, S], inv_freq [H/2]) -> q', k'   (tables in-kernel)
Positions come per token, so packed sequences restart at 0. Math is f32, outputs keep the
input dtype. The backward is the transposed rotation, i.e. the same kernel with sin replaced by
-swap_halves(sin) (= -sin for HF tables, whose halves are equal), done inside the kernel
(`transposed`); it saves nothing but the tables (or positions).
By default one Pallas program rotates all heads of q and k for `block_tokens` tokens: every
element is read and written once, cos/sin once per token. `RopeConfig` describes the variants
(tile sizes, warps, table mode, load mode, q/k split, aliasing, persistent programs) that
`bench/kernels.py --sweep rope` times; `VARIANTS` names the candidates. Head dims whose halves
are not a power of two (H = 96) are rotated in power-of-two chunks (48 = 32 + 16), head counts
likewise. On GPU `apply_rope` defaults to the kernel (1 token per program, measured faster than
XLA's fused rotation at 8B and 70B, see _DEFAULT_ON_GPU); the model keeps XLA's rotation unless its
implementation is "pallas" (MODEL_DEFAULT_ON_GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common

__all__ = ["rope_tables", "apply_rope", "apply_rope_positions", "apply_rope_reference",
           "rope_inv_freq", "RopeConfig", "VARIANTS"]


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
  return _tables_of(position_ids, jnp.asarray(rope_inv_freq(head_dim, theta, rope_scaling)))


def _tables_of(position_ids, inv_freq):
  """cos, sin [..., H] f32 of integer positions [...] and inv_freq [H/2]."""
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


# -------------------------------------------------------------------------------------- kernel

# q elements per program and warps of the default variant: the fastest of the H200 sweep of run A
# (block sizes x warps), though all configurations were within 6%.
BLOCK_ELEMS = 32768
NUM_WARPS = 8

TABLE_MODES = ("full", "half", "positions")
LOAD_MODES = ("halves", "rows")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """One variant of the Pallas kernel: how it tiles and feeds the rotation (all compute the same).

  block_tokens: tokens per program (a power of two); None: BLOCK_ELEMS // (heads per program * H).
  block_heads: None: a program rotates all N heads of q, then all M heads of k, of its tokens. A
    power of two: the grid gets cdiv(N, block_heads) + cdiv(M, block_heads) head groups and each
    program rotates block_heads heads of q or of k (equal work per program, more programs).
  num_warps: None: NUM_WARPS, 4 when a program's x tile has under 4096 elements. num_stages:
    Triton's software-pipelining depth; it can only matter for the loop of `programs`.
  tables: "full": read cos, sin [T, H] f32 (any tables). "half": read cos[:, :H/2], sin[:, :H/2]
    only, valid when both halves are equal, as `rope_tables` makes them. "positions": no tables:
    cos, sin of positions[T] * inv_freq[H/2] are computed in the kernel (`apply_rope_positions`).
  load: "halves": each x tile is loaded and stored as two [tokens, heads, H/2] halves. "rows": one
    [tokens, heads, H] load and store, halves split and joined in registers (H a power of two;
    otherwise as "halves").
  split_qk: q and k in two pallas_calls, each with its own block_tokens default.
  alias: the outputs overwrite q and k (input_output_aliases; XLA copies an input that stays live).
  programs: None: one program per token block. P: P programs per head group loop over the token
    blocks (persistent; with num_stages > 1 Triton may prefetch the next block).
  evict: L2 hints on the GPU: q/k loads and stores "evict_first" (streamed once), table loads
    "evict_last" (re-read by the other head groups); ignored when interpreted.
  """
  block_tokens: int | None = None
  block_heads: int | None = None
  num_warps: int | None = None
  num_stages: int = 1
  tables: str = "full"
  load: str = "halves"
  split_qk: bool = False
  alias: bool = False
  programs: int | None = None
  evict: bool = False

  def __post_init__(self):
    def pow2(v):
      return isinstance(v, int) and v >= 1 and v == _common.next_pow2(v)
    bad = []
    if self.block_tokens is not None and not pow2(self.block_tokens):
      bad.append(f"block_tokens={self.block_tokens!r} (a power of two >= 1 or None)")
    if self.block_heads is not None and not pow2(self.block_heads):
      bad.append(f"block_heads={self.block_heads!r} (a power of two >= 1 or None)")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16, 32):
      bad.append(f"num_warps={self.num_warps!r} (1, 2, 4, 8, 16, 32 or None)")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      bad.append(f"num_stages={self.num_stages!r} (an int >= 1)")
    if self.tables not in TABLE_MODES:
      bad.append(f"tables={self.tables!r} (one of {TABLE_MODES})")
    if self.load not in LOAD_MODES:
      bad.append(f"load={self.load!r} (one of {LOAD_MODES})")
    if self.programs is not None and not (isinstance(self.programs, int) and self.programs >= 1):
      bad.append(f"programs={self.programs!r} (an int >= 1 or None)")
    if bad:
      raise ValueError("RopeConfig: bad " + "; ".join(bad))

  def describe(self) -> str:
    """The fields that differ from the default, e.g. "block_tokens=2, tables='half'"."""
    return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                     if getattr(self, f.name) != f.default) or "defaults"


# Candidates for bench/kernels.py --sweep rope (the GPU decides); every one is tested on CPU.
# Token counts in the names are per program; the default ("base") takes 8 tokens at 8B, 4 at 70B.
VARIANTS = {
    "base": RopeConfig(),                                            # the kernel of runs A and C
    "tok1_w2": RopeConfig(block_tokens=1, num_warps=2),              # tiny tiles: many CTAs per SM
    "tok2_w4": RopeConfig(block_tokens=2, num_warps=4),
    "tok4_w4": RopeConfig(block_tokens=4, num_warps=4),
    "half_tables": RopeConfig(tables="half"),                        # half the table reads
    "positions": RopeConfig(tables="positions"),                     # sin/cos in-kernel
    "rows": RopeConfig(load="rows"),                                 # one load/store per row
    "heads8_tok4_w4": RopeConfig(block_heads=8, block_tokens=4, num_warps=4),  # uniform programs
    "heads8_tok8_w4": RopeConfig(block_heads=8, block_tokens=8, num_warps=4),
    "heads8_tok4_w4_half_evict": RopeConfig(block_heads=8, block_tokens=4, num_warps=4,
                                            tables="half", evict=True),
    "split_qk": RopeConfig(split_qk=True),
    "alias": RopeConfig(alias=True),
    "persist1k": RopeConfig(programs=1056),                          # 8 programs per H100 SM
    "persist1k_s3": RopeConfig(programs=1056, num_stages=3, block_tokens=2, num_warps=4),
    "tok2_w4_half_alias": RopeConfig(block_tokens=2, num_warps=4, tables="half", alias=True),
    "tok2_w4_pos_rows": RopeConfig(block_tokens=2, num_warps=4, tables="positions", load="rows"),
    "evict": RopeConfig(evict=True),                                 # L2 hints
    "tok2_w4_half_evict": RopeConfig(block_tokens=2, num_warps=4, tables="half", evict=True),
    # (session 8) the winner's table and alias modes with other tile sizes, aimed at 70B
    "tok1_w2_half_alias": RopeConfig(block_tokens=1, num_warps=2, tables="half", alias=True),
    "tok1_w4_half_alias": RopeConfig(block_tokens=1, num_warps=4, tables="half", alias=True),
    "tok2_w8_half_alias": RopeConfig(block_tokens=2, num_warps=8, tables="half", alias=True),
    "tok4_w8_half_alias": RopeConfig(block_tokens=4, num_warps=8, tables="half", alias=True),
    # full tables (any caller's cos, sin) with the 1-token tiles
    "tok1_w4": RopeConfig(block_tokens=1, num_warps=4),
    "tok1_w4_alias": RopeConfig(block_tokens=1, num_warps=4, alias=True),
}


def _pow2_chunks(n: int):
  """[(start, size)] covering range(n), power-of-two sizes, largest first: 48 -> (0,32),(32,16)."""
  out, start = [], 0
  for bit in reversed(range(int(n).bit_length())):
    if n & (1 << bit):
      out.append((start, 1 << bit))
      start += 1 << bit
  return out


def _load_tables(t_refs, t0, bt, tok_bound, half, tables, transposed, evict):
  """Per frequency chunk (c0, cw) of the H/2 pairs: (c0, cw, c1, c2, s1, s2), each [bt, cw] f32,
  such that out_lo = x_lo*c1 - x_hi*s1 and out_hi = x_hi*c2 + x_lo*s2. transposed: the adjoint
  rotation (the backward), i.e. s1, s2 -> -s2, -s1."""
  load = functools.partial(_common.load, eviction_policy=evict)
  out = []
  rows = pl.ds(t0, bt)
  if tables == "positions":   # the block's positions, loaded once for every frequency chunk
    pos_ref, inv_ref = t_refs
    pos = load(pos_ref.at[rows], _common.tail_mask((bt,), (tok_bound,)))
  for c0, cw in _pow2_chunks(half):
    if tables == "positions":
      inv = load(inv_ref.at[pl.ds(c0, cw)], None)
      ang = pos.astype(jnp.float32)[:, None] * inv[None, :]    # as rope_tables: one f32 product
      c1 = c2 = jnp.cos(ang)
      s1 = s2 = jnp.sin(ang)
    else:
      cos_ref, sin_ref = t_refs
      mask = _common.tail_mask((bt, cw), (tok_bound, None))
      lo = (rows, pl.ds(c0, cw))
      c1 = load(cos_ref.at[lo], mask)
      s1 = load(sin_ref.at[lo], mask)
      if tables == "half":
        c2, s2 = c1, s1
      else:
        hi = (rows, pl.ds(half + c0, cw))
        c2 = load(cos_ref.at[hi], mask)
        s2 = load(sin_ref.at[hi], mask)
    if transposed:
      s1, s2 = -s2, -s1
    out.append((c0, cw, c1, c2, s1, s2))
  return out


def _rotate(x_ref, o_ref, t0, bt, tok_bound, h0, hc, head_bound, half, tabs, load_mode, evict):
  """o[t0:t0+bt, h0:h0+hc] = x there rotated (hc a power of two; head_bound masks heads >= N)."""
  load = functools.partial(_common.load, eviction_policy=evict)
  store = functools.partial(_common.store, eviction_policy=evict)
  rows, heads = pl.ds(t0, bt), pl.ds(h0, hc)
  if load_mode == "rows" and len(tabs) == 1:
    _, _, c1, c2, s1, s2 = tabs[0]
    mask = _common.tail_mask((bt, hc, 2 * half), (tok_bound, head_bound, None))
    idx = (rows, heads, pl.ds(0, 2 * half))
    x1, x2 = jnp.split(load(x_ref.at[idx], mask).astype(jnp.float32), 2, axis=-1)
    o1 = x1 * c1[:, None, :] - x2 * s1[:, None, :]
    o2 = x2 * c2[:, None, :] + x1 * s2[:, None, :]
    # [bt, hc, half, 2] -> [bt, hc, 2, half] -> [bt, hc, H]: o1 then o2 along the row.
    o = jnp.swapaxes(jnp.stack([o1, o2], axis=-1), -1, -2).reshape(bt, hc, 2 * half)
    store(o_ref.at[idx], o.astype(o_ref.dtype), mask)
    return
  for c0, cw, c1, c2, s1, s2 in tabs:
    mask = _common.tail_mask((bt, hc, cw), (tok_bound, head_bound, None))
    lo = (rows, heads, pl.ds(c0, cw))
    hi = (rows, heads, pl.ds(half + c0, cw))
    x1 = load(x_ref.at[lo], mask).astype(jnp.float32)
    x2 = load(x_ref.at[hi], mask).astype(jnp.float32)
    o1 = x1 * c1[:, None, :] - x2 * s1[:, None, :]
    o2 = x2 * c2[:, None, :] + x1 * s2[:, None, :]
    store(o_ref.at[lo], o1.astype(o_ref.dtype), mask)
    store(o_ref.at[hi], o2.astype(o_ref.dtype), mask)


def _rope_kernel(*refs, n_x, heads, n_tokens, n_blocks, bt, half, cfg, transposed):
  """refs: n_x inputs x [T, heads_i, H], two table refs, n_x outputs. Grid (head groups, token
  blocks or cfg.programs)."""
  x_refs, t_refs, o_refs = refs[:n_x], refs[n_x:n_x + 2], refs[n_x + 2:]
  group = pl.program_id(0)

  def one_block(b):
    t0 = b * bt
    tok_bound = (t0, n_tokens) if n_tokens % bt else None
    tabs = _load_tables(t_refs, t0, bt, tok_bound, half, cfg.tables, transposed,
                        "evict_last" if cfg.evict else None)
    x_evict = "evict_first" if cfg.evict else None
    first = 0
    for x_ref, o_ref, n in zip(x_refs, o_refs, heads):
      if cfg.block_heads is None:
        for h0, hc in _pow2_chunks(n):
          _rotate(x_ref, o_ref, t0, bt, tok_bound, h0, hc, None, half, tabs, cfg.load, x_evict)
        continue
      hb = cfg.block_heads
      n_groups = pl.cdiv(n, hb)

      @pl.when((group >= first) & (group < first + n_groups))
      def _(x_ref=x_ref, o_ref=o_ref, n=n, first=first):
        h0 = (group - first) * hb
        _rotate(x_ref, o_ref, t0, bt, tok_bound, h0, hb, (h0, n) if n % hb else None, half, tabs,
                cfg.load, x_evict)
      first += n_groups

  if cfg.programs is None:
    one_block(pl.program_id(1))
  else:
    p, n_prog = pl.program_id(1), min(cfg.programs, n_blocks)

    def body(i, carry):
      one_block(p + i * n_prog)
      return carry
    jax.lax.fori_loop(0, (n_blocks - p + n_prog - 1) // n_prog, body, 0)


def _apply_pallas(q3, k3, t1, t2, config, transposed=False):
  """q3 [T,N,H], k3 [T,M,H]; t1, t2 = cos, sin [T,H] f32, or positions [T] int32 and inv_freq
  [H/2] f32 for config.tables == "positions". transposed: rotate by the adjoint (the backward)."""
  cfg = config
  n_tokens, _, h = q3.shape
  half = h // 2
  h_p = 2 * _common.next_pow2(half)
  outs = []
  for xs in ([q3], [k3]) if cfg.split_qk else ([q3, k3],):
    heads = tuple(x.shape[1] for x in xs)
    per_program = cfg.block_heads or _common.next_pow2(heads[0])
    bt = cfg.block_tokens or max(1, BLOCK_ELEMS // (per_program * h_p))
    n_blocks = pl.cdiv(n_tokens, bt)
    n_groups = 1 if cfg.block_heads is None else sum(pl.cdiv(n, cfg.block_heads) for n in heads)
    grid = (n_groups, n_blocks if cfg.programs is None else min(cfg.programs, n_blocks))
    warps = cfg.num_warps or (NUM_WARPS if bt * per_program * h_p >= 4096 else 4)
    kernel = functools.partial(_rope_kernel, n_x=len(xs), heads=heads, n_tokens=n_tokens,
                               n_blocks=n_blocks, bt=bt, half=half, cfg=cfg, transposed=transposed)
    outs += _common.pallas_call(
        kernel, grid=grid, num_warps=warps, num_stages=cfg.num_stages, name="rope",
        input_output_aliases={i: i for i in range(len(xs))} if cfg.alias else None,
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs))(*xs, t1, t2)
  return tuple(outs)


def _tables_xla(t1, t2, tables):
  """cos, sin [T, H] f32 for the XLA paths: the tables themselves, or computed from positions."""
  return (t1, t2) if tables != "positions" else _tables_of(t1, t2)


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


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.integer):
    return np.zeros(x.shape, jax.dtypes.float0)
  return jnp.zeros_like(x)


# ---------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _rope(q3, k3, t1, t2, impl, backward, config):
  if impl == "pallas":
    return _apply_pallas(q3, k3, t1, t2, config)
  return _apply_xla(q3, k3, *_tables_xla(t1, t2, config.tables))


def _rope_fwd(q3, k3, t1, t2, impl, backward, config):
  return _rope(q3, k3, t1, t2, impl, backward, config), (t1, t2)


def _rope_bwd(impl, backward, config, res, g):
  t1, t2 = res
  dq, dk = g
  if backward == "reference":
    cos2, sin2 = _tables_xla(t1, t2, config.tables)
    _, vjp = jax.vjp(lambda a, b: (_rotate_ref(a, cos2, sin2), _rotate_ref(b, cos2, sin2)),
                     dq.astype(jnp.float32), dk.astype(jnp.float32))
    gq, gk = vjp((dq.astype(jnp.float32), dk.astype(jnp.float32)))
    gq, gk = gq.astype(dq.dtype), gk.astype(dk.dtype)
  elif impl == "pallas":
    gq, gk = _apply_pallas(dq, dk, t1, t2, config, transposed=True)  # adjoint in the kernel
  else:
    cos2, sin2 = _tables_xla(t1, t2, config.tables)
    gq, gk = _apply_xla(dq, dk, cos2, _transposed_sin(sin2))
  # Tables and positions are constants of the rotation: no gradient flows into them.
  return gq, gk, _zero_cotangent(t1), _zero_cotangent(t2)


_rope.defvjp(_rope_fwd, _rope_bwd)


# GPU defaults, from the session-8 sweeps (H100, 2026-11-27, bench/RESULTS.md "RoPE"; medians of 5
# interleaved rounds, two runs on two machines): with one token per program and 4 warps the kernel
# beats XLA's fused rotation at every size, fwd and fwd+bwd (8B/70B x 16K/64K tokens): full tables
# ("tok1_w4", any cos/sin) 0.975x XLA's time fwd and 0.971x fwd+bwd (geometric means), the half
# tables with aliased outputs ("tok1_w4_half_alias", the model's) 0.96x / 0.954x, at 93-100% of
# copy bandwidth. Sessions 4-5's 2-token tiles had stayed 1-2% behind XLA at 70B.
_DEFAULT_ON_GPU = "pallas"
DEFAULT_CONFIG = "tok1_w4"                     # apply_rope(config=None)
# apply_rope_positions (sin/cos computed in the kernel) was not re-measured with these tiles; its
# best, "tok2_w4_pos_rows", was slower than XLA at 70B fwd+bwd (session 4), so XLA stays.
_POSITIONS_DEFAULT_ON_GPU = "xla"

# The model: implementation="pallas" runs MODEL_VARIANT (its tables come from rope_tables, whose
# halves are equal, so the half-table read is valid; the outputs overwrite q and k). With the
# model's implementation=None the rotation stays XLA's (MODEL_DEFAULT_ON_GPU): inside the training
# step XLA fuses it with its neighbours, and the one step measured with the Pallas kernel (session
# 5, the 2-token variant) ran no faster (0.7036 vs 0.7020 s per step).
MODEL_VARIANT = "tok1_w4_half_alias"
MODEL_DEFAULT_ON_GPU = "xla"


def model_implementation(implementation: str | None) -> str:
  """The rotation the model runs for its `implementation` argument."""
  if implementation is None:
    return _common.resolve(None, "model rope", MODEL_DEFAULT_ON_GPU)
  return implementation


def _check_qk(q, k, op):
  if q.ndim != 4 or k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
    raise ValueError(f"{op}: expected q [B,S,N,H] and k [B,S,M,H]; got q {q.shape}, k {k.shape}")
  if q.shape[3] % 2:
    raise ValueError(f"{op}: head dim must be even, got {q.shape[3]}")


def _check_config(config, op, positions):
  if config is None:
    return RopeConfig(tables="positions") if positions else VARIANTS[DEFAULT_CONFIG]
  if not isinstance(config, RopeConfig):
    raise ValueError(f"{op}: config must be a RopeConfig or None, got {type(config).__name__}")
  if positions != (config.tables == "positions"):
    raise ValueError(f"{op}: config.tables={config.tables!r} does not fit this entry point: "
                     "tables='positions' is for apply_rope_positions, 'full'/'half' for apply_rope")
  return config


@functools.partial(jax.jit, static_argnames=("implementation", "backward", "config"))
def apply_rope(q, k, cos, sin, *, implementation=None, backward="kernel", config=None):
  """Rotate q [B,S,N,H] and k [B,S,M,H] by cos, sin [B,S,H]; returns (q', k') in their dtypes.

  implementation: None (Pallas on GPU: measured faster than XLA, see _DEFAULT_ON_GPU; XLA
  elsewhere) | "xla" | "pallas" (interpreted on CPU). backward: "kernel" | "reference" (jax.vjp of
  `apply_rope_reference`). config: a RopeConfig (tables "full" or "half") choosing the Pallas
  variant; None: DEFAULT_CONFIG (full tables, valid for any cos, sin).
  """
  _check_qk(q, k, "apply_rope")
  b, s, _, h = q.shape
  if cos.shape != (b, s, h) or sin.shape != cos.shape:
    raise ValueError(f"apply_rope: expected q [B,S,N,H], k [B,S,M,H], cos/sin [B,S,H]; got "
                     f"q {q.shape}, k {k.shape}, cos {cos.shape}, sin {sin.shape}")
  _common.check_backward(backward, "apply_rope")
  config = _check_config(config, "apply_rope", positions=False)
  impl = _common.resolve(implementation, "apply_rope", _DEFAULT_ON_GPU)
  t = b * s
  return _rope_tokens(q, k, cos.reshape(t, h).astype(jnp.float32),
                      sin.reshape(t, h).astype(jnp.float32), impl, backward, config)


def _rope_tokens(q, k, t1, t2, impl, backward, config):
  """_rope over q, k flattened to tokens [B*S, heads, H], reshaped back."""
  b, s, n_q, h = q.shape
  q2, k2 = _rope(q.reshape(b * s, n_q, h), k.reshape(b * s, k.shape[2], h), t1, t2, impl,
                 backward, config)
  return q2.reshape(q.shape), k2.reshape(k.shape)


@functools.partial(jax.jit, static_argnames=("implementation", "backward", "config"))
def apply_rope_positions(q, k, position_ids, inv_freq, *, implementation=None, backward="kernel",
                         config=None):
  """apply_rope with cos, sin of position_ids [B,S] (int) * inv_freq [H/2] (f32, `rope_inv_freq`),
  i.e. the tables of `rope_tables`, computed where they are used instead of read from memory.

  The Pallas kernel (config.tables must be "positions"; None: RopeConfig(tables="positions"))
  computes sin/cos once per token and frequency; "xla" builds the tables and rotates in one jit.
  """
  _check_qk(q, k, "apply_rope_positions")
  b, s, _, h = q.shape
  if position_ids.shape != (b, s) or not jnp.issubdtype(position_ids.dtype, jnp.integer):
    raise ValueError(f"apply_rope_positions: expected integer position_ids [B,S] = {(b, s)}, got "
                     f"{position_ids.dtype} {position_ids.shape}")
  if inv_freq.shape != (h // 2,):
    raise ValueError(f"apply_rope_positions: expected inv_freq [H/2] = ({h // 2},), got "
                     f"{inv_freq.shape}")
  _common.check_backward(backward, "apply_rope_positions")
  config = _check_config(config, "apply_rope_positions", positions=True)
  impl = _common.resolve(implementation, "apply_rope_positions", _POSITIONS_DEFAULT_ON_GPU)
  return _rope_tokens(q, k, position_ids.reshape(b * s).astype(jnp.int32),
                      inv_freq.astype(jnp.float32), impl, backward, config)


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
