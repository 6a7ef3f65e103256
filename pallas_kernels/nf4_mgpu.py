"""NF4 x bf16 matmul as a Mosaic GPU kernel (Hopper: TMA pipeline + wgmma), y = x @ dequant(W).T.

The portable kernels in `nf4_matmul` lower through Pallas' Triton backend. This one is written for
Pallas' Mosaic GPU backend (`jax.experimental.pallas.mosaic_gpu`, sm_90a only): per program one
[tile_m, tile_n] tile of y, and over K a pipeline of TMA copies (x, the code bytes, the scales)
`max_concurrent_steps` deep. Each step the warpgroup decodes the [tile_n, tile_k] tile of W into
shared memory in bf16 (one PTX block per 4 code bytes: byte-permute lookups of the codebook and a
bf16x2 multiply by the absmax) and runs wgmma on x's tile and the decoded tile. The bf16 weight
never reaches HBM.

Layouts. The code bytes are read from shared memory in Mosaic's WGMMA_LAYOUT_8BIT (a thread holds
4 consecutive bytes of a row) and the decoded tile is built in WGMMA_LAYOUT_UPCAST_4X (a thread
holds 8 consecutive bf16 of a row): both tile a 64-row block the same way, so register i of the
codes decodes to register i of the weight, the 8 values of one 32-bit code word. NF4 packs element
2j in the high nibble of byte j, so the word of byte j is (value of its high nibble, value of its
low nibble), low half first.

Scales (the large-M kernels): an XLA pre-pass turns the absmax (double quant undone) into bf16 pairs
(s, s) laid out [K / blocksize, N], so a TMA box of one step is [tile_k / blocksize, tile_n] words
(a box's inner extent must be >= 16 bytes; [tile_n, 2] f32 would be 8).

Small M (plan.swap, session 10): y.T = W @ x.T. W's decoded tile is wgmma's register operand (it
never touches shared memory) and x's rows are wgmma's N (8 to 64), so nothing is padded to 64 rows.
A thread's registers of that operand cover pairs of W columns in an order set by wgmma; instead of
shuffling the decoded values into it, x's K is permuted within each 64 columns (`_swap_x`, an XLA
pass over the small x) so that a thread's 8 consecutive code bytes of a row decode, one PTX block
per 4 bytes, into exactly its 8 operand registers for that row. K is split over programs by a wave
model (`_swap_split`) and XLA sums the f32 partial tiles. Scales: bf16 [K/64, N] from an XLA
pre-pass, or (plan.dq, session 11) the double quant undone in the kernel from each program's
absmax codes, nested absmax and map in shared memory, bit-identical and without the pass.

The table decode (plan.lut, session 12): Nsight Compute showed the byte-permute decode bound by
instruction issue (6.2 warp-instructions per weight at 70B gate/up, M=16, 17% of them ptxas copying
the codebook's byte planes into registers). With plan.lut each code byte's pair of bf16 codebook
values is one shared-memory load from a [256, copies] table (one copy per lane: each lane reads its
own bank), then the bf16x2 multiply by the scale: 4 instructions per 2 weights (`lut_asm`; with
gather, byte q of each word straight through the table, `lut_gather_asm`), outputs bitwise equal.
nf4_matmul dispatches the dq + lut kernel's forward for 2 <= M <= 16 on weights from 4096 x 4096
up and at M=1 on the larger ones (M=1: 70B gate/up 0.400 of the bf16 dot, down 0.391; M=16 0.428 /
0.426, 8B gate/up 0.536; bench/RESULTS.md, "Session 12 runs"). plan.stream (several W tiles per
program in one pipeline, x's K range resident) was measured slower and is not dispatched.

Any M (plan.swap + plan.gather, session 11): x in its own order; each thread loads the code words
of its rows' 64-column blocks and gathers the bytes its operand registers hold (`_decode_gather`),
so no x pass, x's rows tiled over programs (tile_m <= 256) and, at split 1, y written directly
through a transposed store. Warp-specialized with 256-row x tiles (wgmma m64n256k16): 1.18-1.39x
the bf16 dot at M=2048 and 4096 (skeleton 1.03-1.08x), level with dequant + cuBLAS at 2048;
nf4_matmul dispatches it at M=256-1024, where it beat the module's plans on 23 of 24 weight x M.

Session 13: from M=9 to 16 the dispatched small-M kernel takes gather (no x pass) and plan.reduce
(its split-K partials TMA-added into one zeroed y.T, no XLA sum): M=16 70B gate/up 0.411, down
0.408. Above M=256, where no fused plan runs, `nf4_dequantize_mgpu` writes W in bf16 through
`_decode_gather` for the cuBLAS dot (plan.dequant): 7-18% less time than the Pallas dequant kernel
on the larger weights (bench/RESULTS.md, "Session 13 runs").

Session 16, the XLA passes around the small-M kernel: the nested absmax is no longer padded per
call (`_ne_window`: the last programs' copies start early and shift their block base), ~1.6 us;
and where K is split in 2, plan.finish: the other K range's program stores its f32 partial and
signals a per-tile semaphore, and the last K range's program adds it and writes y in bf16, so no
zeroed buffer and no transpose (at split 4 reduce stays faster). M=16: 70B gate/up 0.400-0.419 of
the bf16 dot over four runs, down 0.387, q/o 0.453 (bench/RESULTS.md, "Session 16 runs").

Session 17, the table decode in the warp-specialized gather kernel (plan.ws + plan.gather +
plan.lut: the table copied by compute warpgroup 0, the code words row-major so that tile_k 64 and 4
stages fit beside a 16-copy table): 0.03-0.3 of the bf16 dot faster than without it at M = 256-2048
(run s17_r2 and r3), then nf4_matmul's dispatch at M = 256-1024 and up to 2048 where N <= K (M=2048:
8B down 1.16, 70B q/o 1.13, 70B down 1.17 against 1.20-1.29 for W decoded to HBM + cuBLAS in the
same run). Two decoding warpgroups feeding the wgmma warpgroups (64 W rows per program, the wgmma
warpgroups splitting x's rows to fit 128 registers) were slower (1.62-1.73 at M=2048; without their
decode already 1.15-1.20: each x tile is read from L2 for half as many W rows, twice the traffic)
and were removed (bench/RESULTS.md, "Session 17 runs"; the code is in git, commit db29f5b). Leaving
each step's last wgmma in flight while the next step decodes (the pipeline's delay_release) gave NaN
on the GPU at M >= 100.

Session 18, plan.lag: that overlap, right. In one loop body the next step's decode writes the very
PTX registers the previous step's wgmma may still be reading (the operand of an in-flight
wgmma.mma_async must not change before its wait_group, and nothing told ptxas). With plan.lag even
and odd steps decode and issue their wgmma in the two branches of a cond, their scale pairs passed
through moves tagged apart so LLVM cannot merge the branches: consecutive steps' operands are then
different registers, and each step ends in wgmma_wait(1). Correct on the GPU (the plans' tests and
the whole `-m gpu` suite), and as fast as the wrong one-body form. It is nf4_matmul's dispatch with
256-row x tiles at M = 256-2048 on every weight and to M = 4096 on the 70B MLP weights: M=2048
1.03-1.17 of the bf16 dot (70B down 1.033 and 1.067, q/o 1.087 twice; 8B gate/up 1.16) against
1.21-1.34 for W decoded to HBM + cuBLAS in the same run; M=4096 70B gate/up 1.04-1.09 against
1.19-1.25 (bench/RESULTS.md, "Session 18 runs"). 32-column chunks (half of a code block decoded
while the other half's wgmma runs) measured no better and were removed (commit 15e3640).
Session 19 (run s19_r1, M=2048): one program per SM looping over y's tiles (plan.persist) was
slower, 1.15-1.19 of the bf16 dot without lag and 1.28-1.33 with it against the dispatch's
1.07-1.11; a 5th stage beside the table, y stored 64 x rows at a time, was level (1.08-1.11). Both
were removed (bench/RESULTS.md, "Session 19 runs"; the code is in git, commit 7932aea).
Session 20: the small-M split (`_swap_split`) tries every divisor of the K steps, not only powers
of two: 8B down (tile_k 256) splits in 14, 3 programs per SM instead of one, M=1-16 0.57-0.61 of
the bf16 dot against 0.60-0.68 (runs s20_r1/r2). Without their decode the M=16 kernels run at
0.34-0.46 (70B gate/up to 8B q/o, run s20_r1): the stream itself is near the 0.40 target.

Large M, the shared-memory kernels (bench/RESULTS.md, "Session 9 runs"): correct, but slower than
nf4_matmul's dispatch at every size. With one warpgroup the decode and the wgmma add up (~1.96x the
bf16 dot at M=2048); warp-specialized (`ws`: a TMA warpgroup and two compute warpgroups, each
decoding its half of the W rows into shared memory against a 256-row x tile) 1.41-1.46x at M=2048
and 4096 (session 11: 1.50-1.70x, its decode alone 0.90x), against 0.95-1.05x for the same kernel
without its decode.

Session 14, large M (`plan.decoder`, `_forward_dec`; not dispatched): a third warpgroup decodes W
into shared memory (1 or 2 K steps per pass, optionally through the table) and issues the copies,
and two warpgroups only run wgmma on the decoded tiles. Its skeleton is at the bf16 dot, but one
decoding warpgroup per SM is the limit: 1.33-1.55x the bf16 dot at M=2048, against 1.17-1.27x for
nf4_matmul's dispatch (Nsight Compute's stalls in bench/RESULTS.md, "Session 14 runs").
Session 15 ran that kernel in clusters of two programs (consecutive x tiles, one W tile), each
decoding half of the W tile and exchanging it with its peer, by st.async into the peer's shared
memory or by loads from it: correct, but 1.5-2.6x the bf16 dot at M=2048; with the exchange and
its cluster fences left out (wrong results) still 1.15-1.19, no better than the dispatch, so it
was removed (bench/RESULTS.md, "Session 15 runs"; the code is in git, last in commit 750054b).

GPU only (Hopper): on another GPU `nf4_matmul_mgpu` and `nf4_dequantize_mgpu` raise; on the CPU
JAX refuses to run them (no interpret mode: `inline_mgpu` cannot be interpreted). The PTX block and
the layout mapping are tested on CPU (the PTX text through the tests' interpreter, the kernels
through Mosaic's lowering to MLIR), the kernels themselves against the reference in
tests/test_nf4_mgpu.py on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.nf4_matmul import _dot, _pad_rows, _prmt_planes, _quant

if TYPE_CHECKING:
  from jaxsloth.quant import NF4

__all__ = ["MgpuPlan", "nf4_matmul_mgpu", "nf4_dequantize_mgpu", "pair_asm", "pair_asm_emulated",
           "available"]


@dataclasses.dataclass(frozen=True)
class MgpuPlan:
  tile_m: int = 128        # rows of x (and y) per program; wgmma runs 64 rows at a time
  tile_n: int = 128        # rows of W (columns of y) per program
  tile_k: int = 128        # K per pipeline step (a multiple of the blocksize, >= 64)
  stages: int = 4          # TMA copies in flight (pipeline depth)
  split: int = 1           # K split over programs (f32 partial tiles summed by XLA): for small M
                           # and few rows of W, so every SM gets programs; 0: until ~PROGRAMS
  chunk: int = 64          # columns of W decoded per wgmma, each wgmma issued before the next
                           # chunk's decode, meant to overlap the two (measured: slower, see
                           # bench/RESULTS.md; chunk = tile_k: decode, then one wgmma)
  overlap: bool = False    # two W buffers, x's tile released a step late: step k's decode runs
                           # while step k-1's wgmma does (one wgmma in flight); chunk = tile_k
  ws: bool = False         # warp-specialized: a TMA warpgroup feeds two compute warpgroups, each
                           # decoding and multiplying its own half of the tile's W rows
                           # (tile_n / 2) against all tile_m rows of x; tile_m up to 256
  epi_rows: int = 0        # ws, not swap: y written in pieces of this many rows; 0: the whole
                           # tile at once (faster, runs 5 vs 6) unless overlap or a 5th stage
                           # needs the shared memory, then 64
  skip_decode: bool = False  # bench only (wrong results): wgmma on an undecoded tile, to time the
                             # pipeline and wgmma without the decode
  skip_mma: bool = False   # bench only (wrong results): the decode without the wgmma, to time it
  dq: bool = False         # swap: the double quant undone in the kernel (each program loads its
                           # absmax codes, nested absmax and the 256-entry map into shared memory,
                           # the offset from global), instead of an XLA pre-pass's bf16 scales
  gather: bool = False     # swap: x in its own order; each thread gathers the code bytes of its
                           # operand registers (`_decode_gather`), so any M (tile_m rows of x
                           # per program above 64)
  swap: bool = False       # y.T = W @ x.T, the decoded W tile wgmma's register operand (never
                           # stored to shared memory) and x's rows wgmma's N (8, 16, 32 or 64
                           # for M <= 64, not 64 padded rows; tile_m above, with gather), tile_n
                           # rows of W per program (a multiple of 64), chunk columns per wgmma
  stream: int = 0          # swap without ws: each program runs this many consecutive tile_n-row
                           # tiles of W over its K range in one pipeline (no drain between
                           # tiles), its x rows' K range copied to shared memory once, not per
                           # step; 0: one tile per program
  lut: int = 0             # swap without ws: each code byte decoded by one shared-memory load of
                           # its bf16 pair from a table of 256 rows and this many copies, lane l
                           # reading copy l % lut (`lut_asm`: 4 instructions per 2 weights)
                           # instead of `pair_asm`'s byte permutes; 32: conflict-free, 32 KB per
                           # program; 16: 16 KB, two lanes per bank; 0: pair_asm
  dequant: bool = False    # swap + gather, split >= 1, no ws: W decoded by the same decode and
                           # written to HBM in bf16 (`nf4_dequantize_mgpu`), then x @ W.T by
                           # XLA's dot (cuBLAS): the large-M route (tile_n 64)
  reduce: bool = False     # swap without ws, split > 1: the programs' f32 tiles of y.T added
                           # into one zeroed buffer by TMA (cp.reduce.async.bulk .add), not
                           # written as [split, N, M] partials for XLA to sum
  finish: bool = False     # swap without ws or stream, split > 1: the programs of K ranges 0 to
                           # split - 2 write their f32 tiles of y.T to global memory and signal
                           # the tile's semaphore; the program of the last K range waits for
                           # them, adds them to its accumulator and writes y in bf16 (no zeroed
                           # buffer, no XLA pass after the kernel)
  lag: bool = False        # swap + ws + gather (session 18): each step's last wgmma left in
                           # flight into the next step (wgmma_wait(1)), the step's buffers
                           # released a step late (the pipeline's delay_release); even and odd
                           # steps decode in two branches, so that consecutive steps' register
                           # operands are distinct registers (one body: NaN, session 17)
  decoder: int = 0         # large M, not swap: three warpgroups, one decoding W's [tile_n,
                           # tile_k] tiles into shared memory, this many K steps per pass (and
                           # issuing the copies), two running wgmma on them (y.T's tile_n / 2
                           # rows each, x's tile_m rows as wgmma's N): the decode off the wgmma
                           # warpgroups (`_forward_dec`); tile_n 128, tile_k 64, split 1


PROGRAMS = 264   # split=0 splits K until about this many programs (2 per SM of an H100)


SMS = 132       # streaming multiprocessors of an H100 (and H200): the swap split's wave model
SMEM = 228 * 1024   # shared memory per SM; each resident block also takes 1 KB of it
SWAP_FILL = 2


def _ne_len(rows: int, nblocks: int) -> int:
  """plan.dq: nested absmax values copied per program (or warpgroup) of `rows` W rows of K / 64 =
  nblocks blocks: those of its rows, rounded up to 32 (a copy must be a multiple of 128 bytes)."""
  return -(-rows * nblocks // 256 // 32) * 32


def _ne_window(ne0, ne_len: int, last_n0: int, nblocks: int, total: int, minimum=jnp.minimum):
  """plan.dq: where a copy of ne_len nested absmax values from ne0 starts, and the shift added to
  `dq_step`'s block base (256 per value). Where the copy of the last W rows (from row last_n0)
  would run past the end of the nested absmax (`total` values: not padded by `_dq_inputs`, so no
  XLA pass), every copy starts early enough to end there at the latest, and its rows' indices
  move into it along with it; elsewhere (statically known) the copy starts at ne0, shift 0."""
  if last_n0 * nblocks // 256 + ne_len <= total:
    return ne0, 0
  start = minimum(ne0, total - ne_len)
  return start, (ne0 - start) * 256


def _swap_smem(m: int, k: int, plan: MgpuPlan) -> int:
  """Bytes of shared memory one swap program takes: its pipeline stages and output tile, and with
  plan.dq (split resolved) its absmax codes, nested absmax, map and barriers."""
  mp, tn, tk = _swap_mp(m, plan), plan.tile_n, plan.tile_k
  x_stage = 0 if plan.stream else mp * tk * 2
  stage = x_stage + tn * tk // 2 + (0 if plan.dq else tk // 64 * tn * 2)
  rows, k_range = tn * max(plan.stream, 1), k // max(plan.split, 1)
  dq = rows * (k_range // 64) + (_ne_len(rows, k // 64) + 256) * 4 + 64 if plan.dq else 0
  x_res = mp * k_range * 2 + 8 * k_range // tk if plan.stream else 0   # and a barrier per step
  lut = 256 * plan.lut * 4 + 8 if plan.lut else 0
  return plan.stages * stage + tn * mp * 4 + 1024 + dq + x_res + lut


def _swap_smem_over(m: int, k: int, plan: MgpuPlan) -> bool:
  """Whether a swap plan without ws (split resolved) needs more shared memory than an SM has."""
  return plan.swap and not plan.ws and _swap_smem(m, k, plan) > SMEM - 1024


def _swap_split(m: int, n: int, k: int, plan: MgpuPlan) -> int:
  """split=0 for swap plans: the divisor of the steps that minimizes the modelled time,
  waves x (steps per program + SWAP_FILL), with as many programs resident per SM as shared memory
  allows (at most 8); ties go to the smaller split. Each program streams tile_n rows over
  K / split; SWAP_FILL steps stand for its pipeline fill and epilogue (run s10_swap2: split 4
  beat 1 at 70B gate/up, M=16: 94 vs 105 us). Every divisor, not only powers of two, since
  session 20: 8B down (K = 14336, 56 steps of 256) splits in 14, 896 programs with 3 resident per
  SM, where powers of two stop at 2 (dq needs K / 64 / split a multiple of 16): 128 programs, one
  per SM (run s20_r1, M=16: 0.565 of the bf16 dot vs 0.597)."""
  tiles = -(-n // (plan.tile_n * max(plan.stream, 1))) * -(-m // _swap_mp(m, plan))
  steps = k // plan.tile_k
  best, best_cost = 1, None
  for split in (s for s in range(1, steps + 1) if steps % s == 0):
    at = dataclasses.replace(plan, split=split)
    slots = SMS * max(1, min(8, SMEM // (_swap_smem(m, k, at) + 1024)))
    cost = -(-tiles * split // slots) * (max(plan.stream, 1) * steps // split + SWAP_FILL)
    ok = not plan.dq or _dq_problem(k, at) is None
    if ok and (best_cost is None or cost < best_cost):
      best, best_cost = split, cost
  return best


def _auto_split(m: int, n: int, k: int, plan: MgpuPlan) -> int:
  programs = -(-m // plan.tile_m) * -(-n // plan.tile_n)
  steps = k // plan.tile_k
  split = 1
  while programs * split * 2 <= PROGRAMS and steps % (split * 2) == 0:
    split *= 2
  return split


def available() -> bool:
  """Whether this JAX has Pallas' Mosaic GPU backend (the device must also be sm_90)."""
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: F401
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector  # noqa: F401
    return (all(hasattr(plgpu, a) for a in ("inline_mgpu", "emit_pipeline",
                                            "emit_pipeline_warp_specialized", "ShapeDtypeStruct",
                                            "transpose_ref", "layout_cast"))
            and all(hasattr(getattr(plgpu, "Layout", None), a)
                    for a in ("WGMMA", "WGMMA_TRANSPOSED", "WG_STRIDED"))
            and hasattr(mgpu, "WGMMA_LAYOUT_UPCAST_4X") and hasattr(mgpu, "WGMMA_LAYOUT"))
  except ImportError:
    return False


# ----------------------------------------------------------------------------- the PTX block

@functools.cache
def pair_asm() -> str:
  """PTX: 4 code bytes in $4, their bf16 scale as a pair (s, s) in $5, the codebook's byte planes
  in $6..$13 (low bytes l0..l3, high bytes h0..h3) -> in $0..$3 the words of bytes 0..3, each
  (s * value of the high nibble, s * value of the low nibble), the high nibble's in the low half.
  Every input is copied before any output is written (an output may share an input's register)."""
  regs = ".reg .b32 c, u, sc, z, s, t, a, b, L, H, o0, o1, o2, o3;"
  body = ["mov.b32 c, $4; mov.b32 sc, $5; shr.b32 u, c, 16; mov.b32 z, 0x80008000;"]
  for src, (o_a, o_b) in (("c", ("o0", "o1")), ("u", ("o2", "o3"))):
    body.append(f"and.b32 s, {src}, 0x7777; shr.b32 t, {src}, 1; and.b32 t, t, 0x4444; "
                "or.b32 t, t, 0x3210;")
    body.append("prmt.b32 a, $6, $7, s; prmt.b32 b, $8, $9, s; prmt.b32 L, a, b, t;")
    body.append("prmt.b32 a, $10, $11, s; prmt.b32 b, $12, $13, s; prmt.b32 H, a, b, t;")
    # L, H: byte 2i / 2i+1 = low / high byte of the value of byte i's low / high nibble
    body.append(f"prmt.b32 a, L, H, 0x4051; prmt.b32 b, L, H, 0x6273; "
                f"fma.rn.bf16x2 {o_a}, a, sc, z; fma.rn.bf16x2 {o_b}, b, sc, z;")
  body.append("mov.b32 $0, o0; mov.b32 $1, o1; mov.b32 $2, o2; mov.b32 $3, o3;")
  return "{ " + regs + " " + " ".join(body) + " }"


def pair_asm_inputs():
  """The constant inputs $6..$13 of `pair_asm` (uint32)."""
  lo, hi = _prmt_planes()
  return [*lo, *hi]


def pair_asm_emulated(words, scale_bf16):
  """`pair_asm` in jnp: uint32 code words [...] and bf16 scales [...] -> bf16 [..., 8], the 8
  weights of each word in order, each bf16(bf16(code) * scale)."""
  c = jnp.asarray(words, jnp.uint32)
  byte = jnp.stack([(c >> (8 * i)) & 0xFF for i in range(4)], -1)           # [..., 4]
  code = _quant().NF4_CODE.astype(jnp.bfloat16).astype(jnp.float32)
  vals = jnp.stack([code[byte >> 4], code[byte & 15]], -1).reshape(*c.shape, 8)
  s = jnp.asarray(scale_bf16, jnp.bfloat16).astype(jnp.float32)[..., None]
  return (vals * s).astype(jnp.bfloat16)


LUT_LANES = 32     # plan.lut: at most one copy of the table per lane (lane l reads only bank l)


def _lut_lookup(copies: int, addr: str, scale: str) -> list[str]:
  """The table blocks' common tail: byte indices in a0..a3 -> their rows' addresses (row stride
  4 * copies bytes, this lane's column address in `addr`), the loads into v0..v3, and $0..$3 =
  v * the scale pair in register `scale` (fma with -0 in z, as pair_asm)."""
  return ([f"mad.lo.u32 a{i}, a{i}, {4 * copies}, {addr};" for i in range(4)]
          + [f"ld.shared.b32 v{i}, [a{i}];" for i in range(4)]
          + [f"fma.rn.bf16x2 ${i}, v{i}, {scale}, z;" for i in range(4)])


@functools.cache
def lut_asm(copies: int = LUT_LANES) -> str:
  """PTX, `pair_asm`'s interface with a shared-memory table instead of the byte planes: 4 code
  bytes in $4, their bf16 scale pair in $5, this lane's address in the table in $6 (a u32 shared
  address: the table is u32 [256, copies], byte b's unscaled pair at row b, column lane % copies)
  -> in $0..$3 the words of bytes 0..3 as `pair_asm` gives them. Per byte one extract, one
  multiply-add of the address, one load and the bf16x2 multiply by the scale (fma with -0, as
  pair_asm)."""
  regs = ".reg .b32 c, sc, z, a0, a1, a2, a3, v0, v1, v2, v3;"
  body = ["mov.b32 c, $4; mov.b32 sc, $5; mov.b32 z, 0x80008000;",
          "and.b32 a0, c, 0xff; prmt.b32 a1, c, 0, 0x4441; prmt.b32 a2, c, 0, 0x4442; "
          "shr.b32 a3, c, 24;"] + _lut_lookup(copies, "$6", "sc")
  return "{ " + regs + " " + " ".join(body) + " }"


@functools.cache
def lut_gather_asm(copies: int = LUT_LANES) -> str:
  """PTX, `lut_asm` for plan.gather: 4 code words in $4..$7, the scale pair in $8, this lane's
  table address in $9, a byte selector in $10 (0x4440 + q: byte q, zero-extended) -> in $i the
  bf16 pair of byte q of word $(4 + i), scaled. Per word one byte extract (prmt), one multiply-add
  of the address, one load, one bf16x2 multiply: the gather costs no instruction of its own."""
  regs = ".reg .b32 sc, z, sel, a0, a1, a2, a3, v0, v1, v2, v3;"
  body = ["mov.b32 sc, $8; mov.b32 z, 0x80008000; mov.b32 sel, $10;"]
  body += [f"prmt.b32 a{i}, ${4 + i}, 0, sel;" for i in range(4)]
  body += _lut_lookup(copies, "$9", "sc")
  return "{ " + regs + " " + " ".join(body) + " }"


@functools.cache
def lut_table(copies: int = LUT_LANES) -> np.ndarray:
  """plan.lut's table, u32 [256, copies]: row b is byte b's pair of bf16 codebook values (the
  high nibble's in the low half), repeated in every column."""
  import ml_dtypes
  code = np.asarray(_quant().NF4_CODE, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
  b = np.arange(256)
  pair = code[b >> 4].astype(np.uint32) | (code[b & 15].astype(np.uint32) << 16)
  return np.ascontiguousarray(np.repeat(pair[:, None], copies, axis=1))


def lut_emulated(words, scale_bf16):
  """`lut_asm` in numpy through `lut_table` (lane 0): uint32 code words [...] and bf16 scales
  [...] -> bf16 [..., 8], as `pair_asm_emulated`."""
  import ml_dtypes
  c = np.asarray(words, np.uint32)
  pairs = lut_table()[:, 0][np.stack([(c >> (8 * i)) & 0xFF for i in range(4)], -1)]
  vals = np.stack([pairs & 0xFFFF, pairs >> 16], -1).astype(np.uint16).view(ml_dtypes.bfloat16)
  vals = vals.reshape(*c.shape, 8).astype(np.float32)
  s = np.asarray(scale_bf16, ml_dtypes.bfloat16).astype(np.float32)[..., None]
  return (vals * s).astype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------- the kernel

def _swizzle(row_bytes: int) -> int:
  for s in (128, 64, 32):
    if row_bytes % s == 0:
      return s
  raise ValueError(f"nf4_mgpu: a tile row of {row_bytes} bytes cannot be swizzled")


def _transforms(swizzle: int, itemsize: int):
  """Shared-memory tiling of a swizzled 2-D tile: 8 rows by one swizzle width."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


@dataclasses.dataclass(frozen=True)
class _Layouts:
  """Swizzles and transforms of one step's tiles, all set by tile_k: x's and the decoded W's
  bf16 rows (tile_k values) and the code rows (tile_k / 2 bytes)."""
  tile_k: int

  @property
  def bf16_swizzle(self) -> int:
    return _swizzle(self.tile_k * 2)

  @property
  def code_swizzle(self) -> int:
    return _swizzle(self.tile_k // 2)

  @property
  def bf16(self):
    return _transforms(self.bf16_swizzle, 2)

  @property
  def codes(self):
    return _transforms(self.code_swizzle, 1)


def _pair_asm_op():
  """Inside an `inline_mgpu` body: (code word, scale pair) i32 values -> the 4 words of
  `pair_asm`, each passed through `then` as it is extracted, with the PTX block's constant byte
  planes materialized once, where this is called."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  i32 = ir.IntegerType.get_signless(32)
  planes = [arith.constant(i32, ir.IntegerAttr.get(i32, int(np.int32(np.uint32(v)))))
            for v in pair_asm_inputs()]
  struct = ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>")
  asm = pair_asm()

  def decode(word, sc, then=lambda v: v):
    res = llvm.inline_asm(struct, [word, sc, *planes], asm, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                          has_side_effects=False)
    return [then(llvm.extractvalue(i32, res, [e])) for e in range(4)]

  return decode


def _lut_ops(lut_ref):
  """Inside an `inline_mgpu` body: (decode, gather) through the table at lut_ref (shared memory,
  u32 [256, copies]), this lane's address computed once, here. decode(word, scale pair) is
  `_pair_asm_op`'s through `lut_asm`; gather(4 words, scale pair) gives the pairs of byte q (q =
  lane % 4) of each word through `lut_gather_asm` (plan.gather)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  i32 = ir.IntegerType.get_signless(32)
  copies = ir.MemRefType(lut_ref.type).shape[1]
  base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(lut_ref))
  lane = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, copies))
  addr = arith.addi(base, arith.muli(lane, arith.constant(i32, 4)))
  struct = ir.Type.parse("!llvm.struct<(i32, i32, i32, i32)>")
  asm, gather_asm = lut_asm(copies), lut_gather_asm(copies)
  q = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, 4))
  sel = arith.addi(q, arith.constant(i32, 0x4440))

  def decode(word, sc, then=lambda v: v):
    res = llvm.inline_asm(struct, [word, sc, addr], asm, "=r,=r,=r,=r,r,r,r",
                          has_side_effects=False)
    return [then(llvm.extractvalue(i32, res, [e])) for e in range(4)]

  def gather(words, sc):
    res = llvm.inline_asm(struct, [*words, sc, addr, sel], gather_asm,
                          "=r,=r,=r,=r,r,r,r,r,r,r,r", has_side_effects=False)
    return [llvm.extractvalue(i32, res, [e]) for e in range(4)]

  return decode, gather


def _decode_tile(c_smem, s_smem, w_smem, *, tile_n, tile_k, blocksize, col0=0, cols=None):
  """Decode columns [col0, col0 + cols) of the [tile_n, tile_k / 2] code tile (with their scales)
  into the same columns of w_smem (bf16 [tile_n, tile_k]), all 128 threads of the warpgroup;
  Mosaic GPU code under `inline_mgpu`. `col0` and `cols` are multiples of the 64-column tiles of
  w_smem's layout."""
  cols = tile_k if cols is None else cols
  lay = _Layouts(tile_k)
  from jax.experimental.pallas import mosaic_gpu as plgpu
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jax._src.lib.mlir import ir          # the MLIR bindings Mosaic GPU itself builds with
  from jax._src.lib.mlir.dialects import arith, memref

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(lay.codes), plgpu.RefType(),
                                plgpu.RefType(lay.bf16)))
  def body(ctx, c_ref, s_ref, w_ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    bf16 = ir.BF16Type.get()
    codes = mgpu.FragmentedArray.load_tiled(c_ref, swizzle=lay.code_swizzle,
                                            layout=mgpu.WGMMA_LAYOUT_8BIT, is_signed=False)
    out_layout = mgpu.WGMMA_LAYOUT_UPCAST_4X
    shape = (tile_n, tile_k)
    if out_layout.registers_shape(shape) != codes.registers.shape:
      raise AssertionError(f"nf4_mgpu: code and weight register grids differ: "
                           f"{codes.registers.shape} vs {out_layout.registers_shape(shape)}")
    decode = _pair_asm_op()
    index = ir.IndexType.get()
    bs_c = arith.constant(index, blocksize)
    # register grid [tile_n / 64, tile_k / 32, ...]: axis 1 walks 32-column groups
    lo, hi = col0 // 32, (col0 + cols) // 32
    regs = np.empty(codes.registers[:, lo:hi].shape, dtype=object)
    for (idx, creg), (row, col) in zip(np.ndenumerate(codes.registers),
                                       out_layout.thread_idxs(shape)):
      if not lo <= idx[1] < hi:
        continue
      idx = (idx[0], idx[1] - lo) + idx[2:]
      word = mgpu_utils.bitcast(creg, i32)
      blk = arith.divui(col, bs_c)
      sc = memref.load(s_ref, [blk, row])
      pairs = decode(word, sc, lambda v: mgpu_utils.bitcast(v, ir.VectorType.get((2,), bf16)))
      regs[idx] = mgpu_utils.vector_concat(pairs)
    w = mgpu.FragmentedArray(_registers=regs, _layout=out_layout, _is_signed=None)
    # w_ref is tiled [tile_n / 8, tile_k / 64, 8, 64]: the chunk's 64-column tiles
    tiles = slice(col0 // 64, (col0 + cols) // 64)
    chunk_ref = mgpu_utils.memref_slice(w_ref, (slice(None), tiles))
    w.store_tiled(chunk_ref, swizzle=lay.bf16_swizzle)

  body(c_smem, s_smem, w_smem)


@dataclasses.dataclass(frozen=True)
class _DQ:
  """plan.dq: where a decode finds its scales. am: the absmax codes of the step's blocks, u8
  [rows, tile_k / 64]; ne: the nested absmax of the program's (or warpgroup's) rows, from its first
  row's first block's; qm: the 256-entry map (these three in shared memory); off: the offset (f32
  [1] in global memory: a shared copy would cost a 128-byte buffer, and 70B gate/up fits 3
  programs per SM; run s11_r8 read ne and qm from global memory too and was slower); base: an i32
  [128] array holding, in every element, the global index of the step's first block, so that
  block j of row r (of ne's rows) has nested absmax ne[(r * B + base + j) >> 8]; nblocks:
  B = K / 64."""
  am: object
  ne: object
  qm: object
  off: object
  base: object
  nblocks: int

  @staticmethod
  def arg_types():
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return (plgpu.RefType(),) * 4 + (plgpu.Layout.WG_STRIDED((128,), vec_size=1),)

  def args(self):
    return (self.am, self.ne, self.qm, self.off, self.base)


def _scale_fn(s_args, nblocks):
  """Inside an `inline_mgpu` body: (row index value, static block) -> the i32 bf16 pair (s, s) of
  that block's scale, from the bf16 scale tile [tile_k / 64, rows] or, with plan.dq, computed as
  `dequantize_absmax` does (map[code] * nested, rounded, plus the offset, rounded: mul.rn and
  add.rn, so nothing contracts them into one FMA) and rounded to bf16."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
  i32 = ir.IntegerType.get_signless(32)
  i16 = ir.IntegerType.get_signless(16)
  f32 = ir.F32Type.get()
  index = ir.IndexType.get()
  idx_c = lambda v: arith.constant(index, v)
  pair = lambda b16: arith.ori(b16, arith.shli(b16, arith.constant(i32, 16)))
  if not isinstance(s_args, tuple):
    s_ref = s_args
    return lambda row, blk: pair(arith.extui(i32, arith.bitcast(i16, memref.load(
        s_ref, [idx_c(blk), row]))))
  am, ne, qm, off, base = s_args
  base_reg = base.registers.flat[0]
  base = vector.extract(base_reg, [], [0]) if isinstance(base_reg.type, ir.VectorType) else base_reg
  offset = memref.load(off, [idx_c(0)])
  asm = lambda op, a, b: llvm.inline_asm(f32, [a, b], f"{op}.rn.f32 $0, $1, $2;", "=f,f,f",
                                         has_side_effects=False)

  def scale(row, blk):
    code = arith.extui(i32, memref.load(am, [row, idx_c(blk)]))
    r = arith.index_cast(i32, row)
    nidx = arith.shrui(arith.addi(arith.addi(arith.muli(r, arith.constant(i32, nblocks)), base),
                                  arith.constant(i32, blk)), arith.constant(i32, 8))
    nested = memref.load(ne, [arith.index_cast(index, nidx)])
    v = asm("add", asm("mul", memref.load(qm, [arith.index_cast(index, code)]), nested), offset)
    b16 = llvm.inline_asm(i16, [v], "cvt.rn.bf16.f32 $0, $1;", "=h,f", has_side_effects=False)
    return pair(arith.extui(i32, b16))

  return scale


def _operand_decode(code_type, s_smem, tile_n: int, cols: int, lut: bool = False,
                    out: bool = False):
  """The `inline_mgpu` decorator of a swap decode: (code ref, scales[, out ref][, table ref]) ->
  bf16 [tile_n, cols] in WGMMA_LAYOUT, or with `out` nothing (the body stores the tile to the
  swizzled bf16 out ref); the scales are a ref (bf16 tile) or, with plan.dq, `_DQ.args()`; the
  table (plan.lut) a ref. Call the decorated body with `_scale_args(s_smem)`."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  scales = _DQ.arg_types() if isinstance(s_smem, _DQ) else plgpu.RefType()
  refs = ((plgpu.RefType(_Layouts(cols).bf16),) if out else ()) + (
      (plgpu.RefType(),) if lut else ())
  if out:
    return plgpu.inline_mgpu(arg_types=(code_type, scales) + refs)
  return plgpu.inline_mgpu(arg_types=(code_type, scales) + refs,
                           return_type=plgpu.ShapeDtypeStruct((tile_n, cols), jnp.bfloat16,
                                                              layout=plgpu.Layout.WGMMA))


def _scale_args(s_smem):
  """What a decode body gets for its scales, and B for `_scale_fn` (0 for a bf16 tile)."""
  return (s_smem.args(), s_smem.nblocks) if isinstance(s_smem, _DQ) else (s_smem, 0)


def _decode_regs(c_smem, s_smem, *, tile_n, tile_k, col0, cols, skip=False, lut=None):
  """The swap kernel's decode: columns [col0, col0 + cols) of the [tile_n, tile_k / 2] code tile
  (with their bf16 scales [tile_k / 64, tile_n]) -> bf16 [tile_n, cols] in wgmma's register
  operand layout (WGMMA_LAYOUT), K permuted within each 64 columns as `_swap_x` permutes x;
  Mosaic GPU code under `inline_mgpu`.

  The code bytes are loaded in WGMMA_LAYOUT_UPCAST_4X (a thread holds 8 consecutive bytes of a
  row: bytes 8q..8q+7 of each 32-byte chunk, q = lane % 4), the register grid of the result is the
  code grid with its column axis 8 times longer: register (i, 8j + e, ...) is the bf16 pair of byte
  e of code register (i, j, ...), (value of the high nibble, value of the low nibble). In
  WGMMA_LAYOUT that register holds columns 64j + 8e + 2q + (0, 1) of the row, so logical column
  8e + 2q + v of a 64-column block is W's column 16q + 2e + v there. skip (bench only): the code
  words themselves as the operand, no PTX block (wrong results)."""
  lay = _Layouts(tile_k)
  from jax.experimental.pallas import mosaic_gpu as plgpu
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm

  s_args, nblocks = _scale_args(s_smem)

  @_operand_decode(plgpu.RefType(lay.codes), s_smem, tile_n, cols, lut is not None)
  def body(ctx, c_ref, s_args, *lut_ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    bf16 = ir.BF16Type.get()
    scale = _scale_fn(s_args, nblocks)
    code_layout = mgpu.WGMMA_LAYOUT_UPCAST_4X      # on bytes: 8 consecutive bytes per thread
    codes = mgpu.FragmentedArray.load_tiled(c_ref, swizzle=lay.code_swizzle, layout=code_layout,
                                            is_signed=False)
    a_shape = mgpu.WGMMA_LAYOUT.registers_shape((tile_n, cols))
    c_shape = codes.registers.shape
    if (a_shape[0], a_shape[2:]) != (c_shape[0], c_shape[2:]) or a_shape[1] * 8 != cols:
      raise AssertionError(f"nf4_mgpu: code and operand register grids differ: {c_shape} vs "
                           f"{a_shape}")
    decode = _lut_ops(lut_ref[0])[0] if lut_ref else _pair_asm_op()
    pair_ty = ir.VectorType.get((2,), bf16)
    lo, hi = col0 // 64, (col0 + cols) // 64      # code register column j: bytes 32j..32j+31
    regs = np.empty(a_shape, dtype=object)
    for (idx, creg), (row, _) in zip(np.ndenumerate(codes.registers),
                                     code_layout.thread_idxs((tile_n, tile_k // 2))):
      if not lo <= idx[1] < hi:
        continue
      sc = scale(row, idx[1])        # blocksize 64: block idx[1]'s scale pair (s, s)
      words = mgpu_utils.bitcast(creg, ir.VectorType.get((2,), i32))
      for half in range(2):
        word = llvm.extractelement(words, arith.constant(i32, half))
        outs = [word] * 4 if skip else decode(word, sc)
        for e in range(4):
          regs[(idx[0], 8 * (idx[1] - lo) + 4 * half + e) + idx[2:]] = mgpu_utils.bitcast(
              outs[e], pair_ty)
    return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return body(c_smem, s_args, *([] if lut is None else [lut]))


def _decode_gather(c_smem, s_smem, *, tile_n, tile_k, col0, cols, skip=False, lut=None,
                   out=None, swizzled=True, tag=None):
  """The swap kernels' decode with x in its own order (plan.gather): columns [col0, col0 + cols)
  of the code tile, 32-bit words [tile_n, tile_k / 8] row-major in shared memory, with their bf16
  scales [tile_k / 64, tile_n] -> bf16 [tile_n, cols] in WGMMA_LAYOUT; Mosaic GPU code under
  `inline_mgpu`.

  In WGMMA_LAYOUT register (i, 8j + e, ...) of a thread holds columns 64j + 8e + 2q + (0, 1) of its
  row (q = lane % 4): code byte 4e + q of the row's 64-column block j, the q-th byte of word e of
  the block. Each thread loads the block's 8 words of each of its rows (two 16-byte loads, the
  same for the 4 threads of a row), gathers byte q of words 0-3 and of words 4-7 into two words
  (3 byte-permutes each) and decodes each, one PTX block per word, into registers e = 0-3 and
  4-7. skip (bench only): the gathered words themselves as the operand (wrong results).
  out: a bf16 [tile_n, cols] shared ref (tile_k's swizzle) the decoded tile is stored to, inside
  the same body (not `out[...] = ` outside it, which also loads the old tile); returns None.
  swizzled: with lut, the code words in `_gather_code_transforms`' layout (rows of >= 128 bytes);
  not swizzled, row-major as without lut. tag (plan.lag): each scale pair passed through a move
  whose PTX text carries the tag, so that two decodes of the same tile differ to LLVM."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  import jax.experimental.mosaic.gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, vector

  s_args, nblocks = _scale_args(s_smem)
  swizzled = swizzled and lut is not None
  code_type = plgpu.RefType(_gather_code_transforms() if swizzled else ())

  @_operand_decode(code_type, s_smem, tile_n, cols, lut is not None, out is not None)
  def body(ctx, c_ref, s_args, *refs):
    del ctx
    o_ref, lut_ref = (None, refs) if out is None else (refs[0], refs[1:])
    i32 = ir.IntegerType.get_signless(32)
    bf16 = ir.BF16Type.get()
    index = ir.IndexType.get()
    idx_c = lambda v: arith.constant(index, v)
    scale = _scale_fn(s_args, nblocks)
    const = lambda v: arith.constant(i32, v)
    word_ty = ir.MemRefType(c_ref.type).element_type
    v4 = ir.VectorType.get((4,), word_ty)
    q = arith.remui(mgpu_utils.thread_idx(), const(4))
    pick = arith.addi(arith.muli(q, const(17)), const(64))    # bytes (a.q, b.q) of prmt(a, b)

    def prmt(a, b, sel):
      return llvm.inline_asm(i32, [a, b, sel], "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                             has_side_effects=False)

    layout = mgpu.WGMMA_LAYOUT
    a_shape = layout.registers_shape((tile_n, cols))
    if a_shape[1] * 8 != cols:
      raise AssertionError(f"nf4_mgpu: unexpected operand register grid {a_shape}")
    decode, lut_gather = _lut_ops(lut_ref[0]) if lut_ref else (_pair_asm_op(), None)
    pair_ty = ir.VectorType.get((2,), bf16)
    regs = np.empty(a_shape, dtype=object)
    for idx, (row, _) in zip(np.ndindex(a_shape), layout.thread_idxs((tile_n, cols))):
      if idx[1] % 8:
        continue            # one visit per row and 64-column block: registers e = 0..7
      j = idx[1] // 8
      blk = col0 // 64 + j
      sc = scale(row, blk)
      if tag is not None:
        sc = llvm.inline_asm(i32, [sc], f"mov.b32 $0, $1; // lag {tag}", "=r,r",
                             has_side_effects=False)
      words = []
      for h in range(2):
        if swizzled:    # tiled [rows / 8, words / 32, 8, 32], 16-byte chunk c of row r at c ^ r % 8
          w0 = 8 * blk + 4 * h
          r8 = arith.remui(row, idx_c(8))
          at = [arith.divui(row, idx_c(8)), idx_c(w0 // 32), r8,
                arith.muli(arith.xori(idx_c(w0 % 32 // 4), r8), idx_c(4))]
        else:
          at = [row, idx_c(8 * blk + 4 * h)]
        vec = vector.load(v4, c_ref, at)
        words += [mgpu_utils.bitcast(vector.extract(vec, [], [e]), i32) for e in range(4)]
      for half in range(2):
        w = words[4 * half:4 * half + 4]
        if lut_ref and not skip:
          outs = lut_gather(w, sc)
        else:
          word = prmt(prmt(w[0], w[1], pick), prmt(w[2], w[3], pick), const(0x5410))
          outs = [word] * 4 if skip else decode(word, sc)
        for e in range(4):
          regs[(idx[0], 8 * j + 4 * half + e) + idx[2:]] = mgpu_utils.bitcast(outs[e], pair_ty)
    w = mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)
    if o_ref is None:
      return w
    w.store_tiled(o_ref, swizzle=_Layouts(cols).bf16_swizzle)

  return body(c_smem, s_args, *([] if out is None else [out]), *([] if lut is None else [lut]))


def _gather_code_transforms():
  """plan.gather with plan.lut: the code words' shared-memory layout, tiled 8 rows by 128 bytes
  and 128-byte swizzled, so the 8 rows a warp loads at once sit in different banks (untransformed,
  rows of tile_k / 2 >= 128 bytes all start in the same bank: 8-way conflicts)."""
  return _transforms(128, 4)


def _code_words(codes):
  """The packed codes u8 [n_pad, K / 2] as u32 words [n_pad, K / 8] (`_decode_gather`'s input)."""
  return lax.bitcast_convert_type(codes.reshape(codes.shape[0], -1, 4), jnp.uint32)


def _swap_x(x2, mp: int):
  """x [M, K] -> [mp, K], rows padded and K permuted within each 64 columns as `_decode_regs`
  lays out W: column 8e + 2q + v of a block is x's column 16q + 2e + v."""
  m, k = x2.shape
  x2 = _pad_rows(x2, mp)
  return x2.reshape(mp, k // 64, 4, 8, 2).transpose(0, 1, 3, 2, 4).reshape(mp, k)


def _swap_x_in(x2, m_pad: int, plan: MgpuPlan):
  """x as the swap kernels take it: rows padded to m_pad and, without gather, K permuted."""
  return _pad_rows(x2, m_pad) if plan.gather else _swap_x(x2, m_pad)


def _swap_mp(m: int, plan: MgpuPlan) -> int:
  """x's rows per swap program, wgmma's N: 8, 16, 32 or 64 covering M <= 64, else tile_m (M > 64
  needs plan.gather: x is not permuted)."""
  for r in (8, 16, 32, 64):
    if m <= r:
      return r
  if not plan.gather:
    raise ValueError(f"nf4_mgpu: the swap kernel without gather takes M <= 64 (got {m})")
  return plan.tile_m


@dataclasses.dataclass(frozen=True)
class _SwapGeom:
  """What both swap kernels derive from x and the plan: x's rows per program (mp, wgmma's N: 8,
  16, 32 or 64 for M <= 64, else tile_m, with M tiled over programs), K steps per program, and
  whether y is written directly (split 1: bf16 y tiles through a transposed store) or as f32
  partials y.T [split, N, M] summed by XLA."""
  m: int
  k: int
  mp: int
  m_tiles: int
  steps: int
  plan: MgpuPlan

  @classmethod
  def of(cls, x2, plan: MgpuPlan):
    m, k = x2.shape
    mp = _swap_mp(m, plan)
    return cls(m, k, mp, -(-m // mp), k // plan.tile_k // plan.split, plan)

  @property
  def direct(self) -> bool:
    return self.plan.split == 1

  @property
  def finish(self) -> bool:
    """plan.finish at split > 1: the last K range's program writes y (bf16) itself."""
    return self.plan.finish and not self.direct

  @property
  def nblocks(self) -> int:
    return self.k // 64

  @property
  def kr(self) -> int:
    """Blocks of the absmax in one program's K range (plan.dq)."""
    return self.k // 64 // self.plan.split

  def dq_scratch(self, rows: int, lead=()):
    """plan.dq: shared memory for the absmax codes [rows, kr], the rows' nested absmax and the
    map, and a barrier per copy."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return [plgpu.SMEM(lead + (rows, self.kr), jnp.uint8),
            plgpu.SMEM(lead + (self.ne_len(rows),), jnp.float32),
            plgpu.SMEM(lead + (256,), jnp.float32),
            plgpu.Barrier(num_barriers=self.dq_copies(rows) * math.prod(lead))]

  def dq_copies(self, rows: int) -> int:
    """Copies (and barriers) of `dq_load`: a TMA copy takes at most 256 elements per dimension,
    so the absmax rows and the nested absmax go in pieces of 256."""
    return -(-rows // 256) + -(-self.ne_len(rows) // 256) + 1

  def ne_len(self, rows: int) -> int:
    return _ne_len(rows, self.nblocks)

  def dq_load(self, srcs, scratch, n0, si, rows: int, slot=None, wait=True):
    """Copies one program's (or warpgroup's) absmax codes and nested absmax of W rows [n0, n0 +
    rows) and K range si, and the map, into `scratch` (at `slot` of its leading axis) and waits
    (unless not `wait`: then `dq_wait` before the first use) -> what `dq_step` takes."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    am_g, ne_g, qm_g, off_g = srcs
    *bufs, bars = scratch
    if slot is not None:
      bufs = [b.at[slot] for b in bufs]
    am, ne, qm = bufs
    at = lambda a, i: a if i == 0 else a + i      # (no add of 0: plans before stream unchanged)
    size = lambda i, total: min(256, total - i)
    copies = [(am_g.at[pl.ds(at(n0, r), size(r, rows)), pl.ds(si * self.kr, self.kr)],
               am if rows <= 256 else am.at[pl.ds(r, size(r, rows))])
              for r in range(0, rows, 256)]
    ne0, ne_len = n0 * self.nblocks // 256, self.ne_len(rows)
    ne0, shift = _ne_window(ne0, ne_len, am_g.shape[0] - rows, self.nblocks, ne_g.shape[0])
    copies += [(ne_g.at[pl.ds(at(ne0, e), size(e, ne_len))],
                ne if ne_len <= 256 else ne.at[pl.ds(e, size(e, ne_len))])
               for e in range(0, ne_len, 256)]
    copies.append((qm_g, qm))
    first = 0 if slot is None else self.dq_copies(rows) * slot
    for i, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[first + i])
    if wait:
      self.dq_wait(scratch, rows, first)
    return (*bufs, off_g, shift)

  def dq_wait(self, scratch, rows: int, first=0):
    """Waits for `dq_load`'s copies of `rows` W rows (from barrier `first`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    for i in range(self.dq_copies(rows)):
      plgpu.barrier_wait(scratch[-1].at[first + i])

  def dq_step(self, bufs, idx, si, tile=None):
    """The step's `_DQ` (base: the global index of its first block, counted from the first row
    of the copied absmax; with plan.stream, of tile `tile` of the program's)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    am, ne, qm, off, shift = bufs
    nb = self.plan.tile_k // 64
    lc0 = idx * nb
    first = si * self.kr + lc0
    if not isinstance(shift, int) or shift:
      first = first + shift
    if tile is not None:
      tn = self.plan.tile_n
      am = am.at[pl.ds(tile * tn, tn)]
      first = first + tile * (tn * self.nblocks)
    base = plgpu.layout_cast(jnp.full((128,), first, jnp.int32),
                             plgpu.Layout.WG_STRIDED((128,), vec_size=1))
    return _DQ(am.at[:, pl.ds(lc0, nb)], ne, qm, off, base, self.nblocks)

  @property
  def layouts(self):
    return _Layouts(self.plan.tile_k)

  def lut_scratch(self):
    """plan.lut: shared memory for the table and the barrier of its copy."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return [plgpu.SMEM((256, self.plan.lut), jnp.uint32), plgpu.Barrier(num_barriers=1)]

  def lut_refs(self, s_in, scratch):
    """plan.lut: (the other inputs, the other scratch, the table's input (the last input), its
    shared memory and barrier (the last two scratch refs)); without the table, (s_in, scratch,
    None, None, None)."""
    if not self.plan.lut:
      return s_in, scratch, None, None, None
    *s_in, lut_g = s_in
    *scratch, lut, bar = scratch
    return s_in, scratch, lut_g, lut, bar

  def lut_load(self, s_in, scratch):
    """plan.lut: `lut_refs`, the table's copy started -> (the other inputs, the other scratch,
    table, its barrier); without the table, (s_in, scratch, None, None)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    s_in, scratch, lut_g, lut, bar = self.lut_refs(s_in, scratch)
    if lut is not None:
      plgpu.copy_gmem_to_smem(lut_g, lut, bar.at[0])
    return s_in, scratch, lut, bar

  def out_scratch(self, rows: int, lead=()):
    """Shared memory for one program's (or warpgroup's, rows of W) output tile."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if self.direct or self.finish:
      return plgpu.SMEM(lead + (self.mp, rows), jnp.bfloat16,
                        transforms=_transforms(_swizzle(rows * 2), 2))
    return plgpu.SMEM(lead + (rows, self.mp), jnp.float32,
                      transforms=_transforms(_swizzle(self.mp * 4), 4))

  def store(self, acc, o_smem, o_gmem, mi, ni, si, row0, rows: int, wait: bool = True,
            direct: bool | None = None):
    """The accumulator y.T [rows, mp] of W rows from tile ni's row0 -> shared memory -> y, the
    partials or (plan.reduce) added into y.T by TMA. Not `wait` (plan.stream, a store per tile):
    o_smem is rewritten once the previous store has read it, and this one is not waited for.
    direct: y written in bf16 (default: at split 1; plan.finish's last K range passes True)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    direct = self.direct if direct is None else direct
    if self.finish and not direct:
      return self._store_finish(acc, o_smem, o_gmem, mi, ni, si, row0, rows)
    if not wait:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    if direct:
      plgpu.transpose_ref(o_smem, (1, 0))[...] = plgpu.layout_cast(
          acc.astype(jnp.bfloat16), plgpu.Layout.WGMMA_TRANSPOSED)
      dst = o_gmem.at[pl.ds(mi * self.mp, self.mp), pl.ds(ni * self.plan.tile_n + row0, rows)]
    else:
      o_smem[...] = acc
      n_rows, m_cols = pl.ds(ni * self.plan.tile_n + row0, rows), pl.ds(mi * self.mp, self.mp)
      dst = o_gmem.at[n_rows, m_cols] if self.plan.reduce else o_gmem.at[si, n_rows, m_cols]
    plgpu.commit_smem()
    add = self.plan.reduce and not direct     # (split 1 writes y itself, bf16)
    plgpu.copy_smem_to_gmem(o_smem, dst, reduction_op="add" if add else None)
    if wait:
      plgpu.wait_smem_to_gmem(0)

  def _store_finish(self, acc, o_smem, o_gmem, mi, ni, si, row0, rows: int):
    """plan.finish: o_gmem is (y [m_pad, n_pad] bf16, partials y.T [split - 1, n_pad, m_pad]
    f32). A program of K range si < split - 1 stores its tile of y.T to partials[si] (plain
    stores, not TMA: the semaphore's release then orders them) and signals the tile's semaphore;
    the last K range's program waits until split - 1 have signalled (acquire; the semaphore goes
    back to 0), adds their tiles to its accumulator and writes the bf16 tile of y. The waiting
    program has the highest linear index of its tile's programs, so the ones it waits for were
    launched before it (the assumption of serial split-K reductions, as in CUTLASS); with the
    grid's "s" axis first (`call`), a whole slice of the grid before it."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    y_gmem, part_gmem = o_gmem
    split, tn, mp = self.plan.split, self.plan.tile_n, self.mp
    n_rows, m_cols = pl.ds(ni * tn + row0, rows), pl.ds(mi * mp, mp)
    sems = pl.get_global(plgpu.SemaphoreType.REGULAR((self.m_tiles, y_gmem.shape[1] // tn)))
    sem = sems.at[mi, ni]

    @pl.when(si < split - 1)
    def _():
      part_gmem.at[si, n_rows, m_cols][...] = acc
      plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

    @pl.when(si == split - 1)
    def _():
      plgpu.semaphore_wait(sem, split - 1, memory_scope="gpu")
      total = acc
      for i in range(split - 1):
        total = total + plgpu.load(part_gmem.at[i, n_rows, m_cols], (),
                                   layout=plgpu.Layout.WGMMA, optimized=False)
      self.store(total, o_smem, y_gmem, mi, ni, si, row0, rows, direct=True)

  @property
  def x_piped(self) -> bool:
    """Whether x's tile is a pipeline input (not with plan.stream, where x is resident, nor
    plan.dequant, which has no x)."""
    return not (self.plan.stream or self.plan.dequant)

  @property
  def lut_swizzled(self) -> bool:
    """Whether the gather kernel's code words come swizzled for the table decode
    (`_gather_code_transforms`, rows of >= 128 bytes); with ws, and without the table, they are
    row-major."""
    return bool(self.plan.lut) and not self.plan.ws

  def in_specs(self, blocksize: int):
    """x's [mp, tile_k] tile (if `x_piped`), the codes' [tile_n, tile_k / 2] bytes ([tile_n,
    tile_k / 8] words, untransformed, with gather), the scales' [tile_k / 64, tile_n]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    tn, tk, lay = self.plan.tile_n, self.plan.tile_k, self.layouts
    if self.plan.stream:     # grid (tile, step); x is resident, not a pipeline input
      c_map, s_map = (lambda t, s: (t, s)), (lambda t, s: (s, t))
    else:
      c_map, s_map = (lambda s: (0, s)), (lambda s: (s, 0))
    gather_t = _gather_code_transforms() if self.lut_swizzled else ()
    codes = (plgpu.BlockSpec((tn, tk // 8), c_map, transforms=gather_t) if self.plan.gather else
             plgpu.BlockSpec((tn, tk // 2), c_map, transforms=lay.codes))
    specs = [codes]
    if self.x_piped:
      specs.insert(0, plgpu.BlockSpec((self.mp, tk), lambda s: (0, s), transforms=lay.bf16))
    if not self.plan.dq:
      specs.append(plgpu.BlockSpec((tk // blocksize, tn), s_map))
    if self.plan.lag:       # a step's buffers go back a step late: its last wgmma may still run
      specs = [dataclasses.replace(sp, delay_release=1) for sp in specs]
    return specs

  def parts(self, x_gmem, c_gmem, s_gmem, mi, ni, si, blocksize: int):
    """Program (mi, ni, si)'s slices of x (if `x_piped`), the codes and the scales: x rows tile
    mi, W rows tile ni, K range si."""
    from jax.experimental import pallas as pl
    tn, tk, steps, mp = self.plan.tile_n, self.plan.tile_k, self.steps, self.mp
    tn = tn * max(self.plan.stream, 1)          # W rows per program
    per_code = 8 if self.plan.gather else 2     # K columns per element of the code array
    x = ((x_gmem.at[pl.ds(mi * mp, mp), pl.ds(si * steps * tk, steps * tk)],) if self.x_piped
         else ())
    parts = x + (c_gmem.at[pl.ds(ni * tn, tn),
                           pl.ds(si * steps * tk // per_code, steps * tk // per_code)],)
    if self.plan.dq:
      return parts
    return parts + (s_gmem.at[pl.ds(si * steps * tk // blocksize, steps * tk // blocksize),
                              pl.ds(ni * tn, tn)],)

  def step(self, acc_ref, x_smem, c_smem, s_smem, tile_n: int, lut=None, idx=None):
    """One K step: decode tile_n rows chunk by chunk into wgmma's register operand, each chunk's
    wgmma issued before the next chunk's decode; all done before the step's buffers go back
    (plan.lag: all but the last, and idx is the step's index). lut: plan.lut's table in shared
    memory."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    tk, ch = self.plan.tile_k, self.plan.chunk
    decode = _decode_gather if self.plan.gather else _decode_regs
    kw = {} if lut is None else dict(lut=lut)
    if lut is not None and self.plan.gather:
      kw["swizzled"] = self.lut_swizzled

    def chunks(tag=None):
      for j in range(tk // ch):
        a = decode(c_smem, s_smem, tile_n=tile_n, tile_k=tk, col0=j * ch, cols=ch,
                   skip=self.plan.skip_decode, **kw, **({} if tag is None else dict(tag=tag)))
        plgpu.wgmma(acc_ref, a, x_smem.at[:, pl.ds(j * ch, ch)].T)

    if self.plan.lag:
      # The wgmma of step i reads its operand's registers until the wait of step i + 1; step
      # i + 1 decodes in the other branch, into other registers (the tag keeps LLVM from
      # merging the branches' identical code)
      lax.cond(idx % 2 == 0, lambda: chunks(0), lambda: chunks(1))
    else:
      chunks()
    plgpu.wgmma_wait(1 if self.plan.lag else 0)

  def call(self, kernel, x2, codes, scales, n_out: int, raw: bool = False, **kernel_kw):
    """Runs the kernel -> y [M, n_out] in x's dtype. x is padded to m_tiles * mp rows (and
    K-permuted by `_swap_x` unless gather); raw (bench only): x2 is that already, and what the
    kernel writes comes back as it is, to time it without the XLA passes around it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    n_pad = codes.shape[0]
    m_pad = self.m_tiles * self.mp
    y_out = jax.ShapeDtypeStruct((m_pad, n_pad), jnp.bfloat16)
    if self.finish:    # y, and the partials of all K ranges but the last
      out = (y_out, jax.ShapeDtypeStruct((self.plan.split - 1, n_pad, m_pad), jnp.float32))
    else:
      out = y_out if self.direct else jax.ShapeDtypeStruct((self.plan.split, n_pad, m_pad),
                                                           jnp.float32)
    reduce = self.plan.reduce and not self.direct
    grid = (self.m_tiles, n_pad // self.plan.tile_n // max(self.plan.stream, 1), self.plan.split)
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
    if reduce:
      # y.T [n_pad, m_pad] f32 as a zeroed Ref each program's tiles are added into (aliased in
      # and out; plgpu.kernel's batching wrapper takes no Ref, so pl.kernel on its mesh)
      from jax.experimental import pallas as pl
      scratch = kernel_kw.pop("scratch_types", ())
      mesh = plgpu.Mesh(grid=grid, grid_names=("m", "n", "s"), **kernel_kw)

      def body(*refs):
        pl.run_scoped(functools.partial(kernel, *refs), *scratch)

      run = pl.kernel(body, out_type=(), mesh=mesh, compiler_params=params)

      def f(*args):
        acc = jax.new_ref(jnp.zeros((n_pad, m_pad), jnp.float32))
        run(*args, acc)
        return acc[...][None]
    elif self.finish:
      # the grid's last axis varies fastest in launch order (blockIdx.x): with "s" first, a
      # tile's other K ranges are launched a whole grid slice before the program that waits for
      # them, not beside it (run s16_r3: no change in time against s16_r2's "s" last; kept as a
      # wider margin for the launch-order assumption of `_store_finish`)
      f = plgpu.kernel(kernel, out_type=out, grid=(grid[2], grid[0], grid[1]),
                       grid_names=("s", "m", "n"), compiler_params=params, **kernel_kw)
    else:
      f = plgpu.kernel(kernel, out_type=out, grid=grid, grid_names=("m", "n", "s"),
                       compiler_params=params, **kernel_kw)
    if self.plan.gather:
      codes = _code_words(codes)
    y = f(x2 if raw else _swap_x_in(x2, m_pad, self.plan), codes, *scales)
    if self.finish:
      y = y[0]
    if raw:
      return y
    if not (self.direct or self.finish):
      y = y.sum(0).T
    return y[:self.m, :n_out].astype(x2.dtype)


def _forward_swap(x2, codes, scales, *, n_out, blocksize, plan: MgpuPlan, raw=False):
  """The small-M kernel (plan.swap): per program tile_n rows of W against mp rows of x, split-K
  over programs; y.T's tile accumulates in wgmma's f32 accumulator [tile_n, mp] with the decoded
  W chunk as the register operand and x's shared tile as the other. `scales`: (bf16 scales,), or
  with plan.dq `_dq_inputs`."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  g = _SwapGeom.of(x2, plan)
  tn = plan.tile_n
  n_in = len(scales)

  n_out_refs = 2 if g.finish else 1

  def kernel(x_gmem, c_gmem, *refs):
    s_in, o_gmem, (o_smem, *scratch) = (refs[:n_in], refs[n_in:n_in + n_out_refs],
                                        refs[n_in + n_out_refs:])
    o_gmem = o_gmem if g.finish else o_gmem[0]
    mi, ni, si = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
    s_in, scratch, lut, lut_bar = g.lut_load(s_in, scratch)
    bufs = g.dq_load(s_in, scratch, ni * tn, si, tn) if plan.dq else None
    if plan.lut:
      plgpu.barrier_wait(lut_bar.at[0])

    def compute(acc_ref):
      def body(idx, x_smem, c_smem, *s_smem):
        sc = g.dq_step(bufs, idx[0], si) if plan.dq else s_smem[0]
        g.step(acc_ref, x_smem, c_smem, sc, tile_n=tn, lut=lut)

      plgpu.emit_pipeline(
          body, grid=(g.steps,), max_concurrent_steps=min(plan.stages, g.steps),
          in_specs=g.in_specs(blocksize),
      )(*g.parts(x_gmem, c_gmem, None if plan.dq else s_in[0], mi, ni, si, blocksize))
      return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((tn, g.mp), jnp.float32))
    g.store(acc, o_smem, o_gmem, mi, ni, si, 0, tn)

  return g.call(kernel, x2, codes, scales, n_out, raw,
                scratch_types=[g.out_scratch(tn)] + (g.dq_scratch(tn) if plan.dq else [])
                + (g.lut_scratch() if plan.lut else []))


def _forward_swap_stream(x2, codes, scales, *, n_out, blocksize, plan: MgpuPlan, raw=False):
  """plan.swap + plan.stream: `_forward_swap` with each program running plan.stream consecutive
  tile_n-row tiles of W over its K range as one pipeline of (tile, step), so the code copies of
  the next tile are in flight while this one finishes. x's rows [mp, K range] are copied to shared
  memory once per program (the other kernels copy x's tile every step, as many bytes as the codes'
  at M=16). At each tile's last step the accumulator goes out through a TMA store (or add, with
  plan.reduce) that is not waited for, and is zeroed."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  g = _SwapGeom.of(x2, plan)
  tn, st, tk = plan.tile_n, plan.stream, plan.tile_k
  n_in = len(scales)

  def kernel(x_gmem, c_gmem, *refs):
    s_in, (o_gmem, x_smem, x_bars, o_smem, *dq_scratch) = refs[:n_in], refs[n_in:]
    mi, ni, si = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
    s_in, dq_scratch, lut, lut_bar = g.lut_load(s_in, dq_scratch)
    n0 = ni * (st * tn)
    k0 = si * (g.steps * tk)
    for s in range(g.steps):
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(mi * g.mp, g.mp), pl.ds(k0 + s * tk, tk)],
                              x_smem.at[s], x_bars.at[s])
    bufs = (g.dq_load(s_in, dq_scratch, n0, si, st * tn, wait=False) if plan.dq else None)

    def compute(acc_ref):
      def body(idx, c_smem, *s_smem):
        t, s = idx

        @pl.when(t == 0)
        def _():
          plgpu.barrier_wait(x_bars.at[s])
          if plan.dq or plan.lut:
            @pl.when(s == 0)
            def _():
              if plan.dq:
                g.dq_wait(dq_scratch, st * tn)
              if plan.lut:
                plgpu.barrier_wait(lut_bar.at[0])

        sc = g.dq_step(bufs, s, si, tile=t) if plan.dq else s_smem[0]
        g.step(acc_ref, x_smem.at[s], c_smem, sc, tile_n=tn, lut=lut)
        acc = acc_ref[...]
        last = s == g.steps - 1

        @pl.when(last)
        def _():
          g.store(acc, o_smem, o_gmem, mi, ni * st + t, si, 0, tn, wait=False)

        acc_ref[...] = acc * jnp.where(last, 0.0, 1.0).astype(jnp.float32)

      plgpu.emit_pipeline(
          body, grid=(st, g.steps), max_concurrent_steps=min(plan.stages, st * g.steps),
          in_specs=g.in_specs(blocksize),
      )(*g.parts(x_gmem, c_gmem, None if plan.dq else s_in[0], mi, ni, si, blocksize))

    pl.run_scoped(compute, plgpu.ACC((tn, g.mp), jnp.float32))
    plgpu.wait_smem_to_gmem(0)

  scratch = [plgpu.SMEM((g.steps, g.mp, tk), jnp.bfloat16, transforms=g.layouts.bf16),
             plgpu.Barrier(num_barriers=g.steps), g.out_scratch(tn)]
  return g.call(kernel, x2, codes, scales, n_out, raw,
                scratch_types=scratch + (g.dq_scratch(st * tn) if plan.dq else [])
                + (g.lut_scratch() if plan.lut else []))


def _forward_swap_ws(x2, codes, scales, *, n_out, blocksize, plan: MgpuPlan, raw=False):
  """plan.swap and plan.ws: the swap kernel warp-specialized, a TMA warpgroup feeding two compute
  warpgroups, each decoding and multiplying its half of the tile's W rows (tile_n / 2) against
  the shared x tile (with plan.dq, each loads its half's absmax); split-K over programs as in
  `_forward_swap`. plan.lut (session 17, with gather): the table in shared memory, copied by
  compute warpgroup 0 before the pipeline and read by both; the code words row-major."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  g = _SwapGeom.of(x2, plan)
  if plan.lag and g.steps < 2:        # one step: nothing to overlap (nor a step to release late)
    plan = dataclasses.replace(plan, lag=False)
    g = _SwapGeom.of(x2, plan)
  hn = plan.tile_n // 2
  n_in = len(scales)

  def kernel(x_gmem, c_gmem, *refs):
    s_in, o_gmem = refs[:n_in], refs[n_in]
    mi, ni, si = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
    parts = g.parts(x_gmem, c_gmem, None if plan.dq else s_in[0], mi, ni, si, blocksize)

    def get_pipeline(body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(g.steps,), memory_registers=40, in_specs=g.in_specs(blocksize),
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=min(plan.stages, g.steps),
          compute_context=compute_context)

    def scope(allocs, o_smem, *scratch):
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * hn, hn)
      bufs = []
      s_dq, dq_scratch, lut_g, lut, lut_bar = g.lut_refs(s_in, scratch)

      def compute_context(eval_pipeline):
        def acc_scope(acc_ref):
          if plan.lut:
            @pl.when(wg == 0)
            def _():
              plgpu.copy_gmem_to_smem(lut_g, lut, lut_bar.at[0])
            plgpu.barrier_wait(lut_bar.at[0])
          if plan.dq:
            bufs[:] = g.dq_load(s_dq, dq_scratch, plan.tile_n * ni + wg * hn, si, hn, slot=wg)
          eval_pipeline(acc_ref)
          plgpu.wgmma_wait(0)
          g.store(acc_ref[...], o_smem.at[wg], o_gmem, mi, ni, si, wg * hn, hn)
        pl.run_scoped(acc_scope, plgpu.ACC((hn, g.mp), jnp.float32))

      def body(idx, x_smem, c_smem, *rest):    # rest: [scales,] acc_ref
        *s_smem, acc_ref = rest
        sc = g.dq_step(bufs, idx[0], si) if plan.dq else s_smem[0].at[:, rows]
        g.step(acc_ref, x_smem, c_smem.at[rows], sc, tile_n=hn, lut=lut, idx=idx[0])
        return acc_ref

      get_pipeline(body, compute_context)(*parts, allocations=allocs)

    ignore = lambda *_, **__: None
    pl.run_scoped(
        scope,
        get_pipeline(ignore, ignore).get_allocations(*parts),
        g.out_scratch(hn, (2,)),
        *(g.dq_scratch(hn, (2,)) if plan.dq else []),
        *(g.lut_scratch() if plan.lut else []),
        collective_axes="wg")

  return g.call(kernel, x2, codes, scales, n_out, raw, num_threads=3, thread_name="wg")


def _dequant(codes, scales, *, k: int, blocksize: int, plan: MgpuPlan):
  """nf4_dequantize_mgpu's kernel: per program tile_n rows of W over K / split, each step's code
  words decoded 64 columns at a time by `_decode_gather` (x's order; plan.dq and plan.lut as in
  the swap kernels) into wgmma's register layout and stored to a swizzled shared tile that the
  pipeline copies to W [n_pad, K] bf16 by TMA."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  tn, tk = plan.tile_n, plan.tile_k
  # no x: m, mp and m_tiles are placeholders
  g = _SwapGeom(m=1, k=k, mp=8, m_tiles=1, steps=k // tk // plan.split, plan=plan)
  n_pad = codes.shape[0]
  n_in = len(scales)
  span = g.steps * tk       # K columns per program

  def kernel(c_gmem, *refs):
    s_in, (o_gmem, *scratch) = refs[:n_in], refs[n_in:]
    ni, si = lax.axis_index("n"), lax.axis_index("s")
    s_in, scratch, lut, lut_bar = g.lut_load(s_in, scratch)
    bufs = g.dq_load(s_in, scratch, ni * tn, si, tn) if plan.dq else None
    if plan.lut:
      plgpu.barrier_wait(lut_bar.at[0])

    def body(idx, c_smem, *rest):
      *s_smem, o_smem = rest
      sc = g.dq_step(bufs, idx[0], si) if plan.dq else s_smem[0]
      for j in range(tk // 64):
        o_smem[:, pl.ds(j * 64, 64)] = _decode_gather(
            c_smem, sc, tile_n=tn, tile_k=tk, col0=j * 64, cols=64, lut=lut)

    # (g.parts gives the same slices, computed as si * steps * tk: kept apart so that the kernel
    # stays the one measured in run s13_r5)
    parts = [c_gmem.at[pl.ds(ni * tn, tn), pl.ds(si * span // 8, span // 8)]]
    if not plan.dq:
      blocks = span // blocksize
      parts.append(s_in[0].at[pl.ds(si * blocks, blocks), pl.ds(ni * tn, tn)])
    plgpu.emit_pipeline(
        body, grid=(g.steps,), max_concurrent_steps=min(plan.stages, g.steps),
        in_specs=g.in_specs(blocksize),
        out_specs=[plgpu.BlockSpec((tn, tk), lambda s: (0, s), transforms=_Layouts(tk).bf16)],
    )(*parts, o_gmem.at[pl.ds(ni * tn, tn), pl.ds(si * span, span)])

  f = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((n_pad, k), jnp.bfloat16),
      grid=(n_pad // tn, plan.split), grid_names=("n", "s"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      scratch_types=(g.dq_scratch(tn) if plan.dq else []) + (g.lut_scratch() if plan.lut else []))
  return f(_code_words(codes), *scales)


DEQUANT_PLAN = MgpuPlan(tile_n=64, tile_k=256, stages=2, split=2, swap=True, gather=True, dq=True,
                        dequant=True)


def nf4_dequantize_mgpu(w: NF4, plan: MgpuPlan = DEQUANT_PLAN) -> jax.Array:
  """W [N, K] bf16 through the swap kernels' decode (`_decode_gather`, with plan.dq and plan.lut
  as there), written to HBM for a cuBLAS dot (plan.dequant: nf4_matmul_mgpu's large-M route).
  Each value is bf16(bf16(code) * bf16(scale)), as the Mosaic forward kernels decode it, not
  dequantize_nf4's one rounding of the f32 product."""
  _check_call("nf4_dequantize_mgpu", w, jnp.bfloat16, plan)
  if not plan.dequant:
    raise ValueError("nf4_dequantize_mgpu: the plan must have dequant")
  _check_dq("nf4_dequantize_mgpu", w, plan)
  codes, scales = _operands(w, plan)
  return _dequant(codes, scales, k=w.shape[1], blocksize=w.blocksize, plan=plan)[:w.shape[0]]


def _dq_inputs(w: NF4, n_pad: int, rows: int):
  """plan.dq's kernel inputs: the absmax codes u8 [n_pad, K / 64], the nested absmax, the
  256-entry map, the offset [1]. The nested absmax is zero-padded (by 32 past the padded rows'
  last, for whole 128-byte copies) only where W's rows are padded or it is shorter than one copy
  of `rows` W rows: elsewhere `dq_load` moves the last copies back, so that no XLA pass runs on it
  (run s16_r1: ~1.6 us per call at M = 16)."""
  nb = w.shape[1] // w.blocksize
  ne = w.nested_absmax
  if n_pad != w.shape[0] or ne.shape[0] < _ne_len(rows, nb):
    ne = jnp.pad(ne, (0, n_pad * nb // 256 + 32 - ne.shape[0]))
  return (_pad_rows(w.absmax, n_pad), ne, jnp.asarray(_quant().DYNAMIC_MAP, jnp.float32),
          w.absmax_offset.reshape(1).astype(jnp.float32))


def _dq_problem(k: int, plan: MgpuPlan) -> str | None:
  """None if plan.dq (split resolved) can load its absmax tiles, else why not: a program's
  K / 64 / split absmax bytes per row must be a multiple of 16 and at most 256 (one copy), and
  K / 64 a multiple of 16 (aligned rows)."""
  kr = k // 64 // max(plan.split, 1)
  if (k // 64) % 16 or kr % 16 or kr > 256:
    return (f"dq needs K / 64 and K / 64 / split multiples of 16, the latter <= 256 (K={k}, "
            f"split={plan.split})")
  return None


def _scales_bf16(w: NF4, n_pad: int):
  """absmax (double quant undone) -> bf16 [K / blocksize, n_pad] (the swap kernels' scales)."""
  return _pad_rows(_quant().dequantize_absmax(w), n_pad).astype(jnp.bfloat16).T


def _scale_pairs(w: NF4, n_pad: int):
  """`_scales_bf16` as uint32 (bf16 s, bf16 s) pairs, [K / blocksize, n_pad]."""
  bits = lax.bitcast_convert_type(_scales_bf16(w, n_pad), jnp.uint16).astype(jnp.uint32)
  return bits | (bits << 16)


def _forward(x2, codes, pairs, *, n_out, blocksize, plan: MgpuPlan):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  m, k = x2.shape
  tm, tn, tk = plan.tile_m, plan.tile_n, plan.tile_k
  m_pad = -(-m // tm) * tm
  n_pad = codes.shape[0]
  x2 = _pad_rows(x2, m_pad)
  steps = k // tk // plan.split
  ch = plan.chunk
  split = plan.split
  out_dtype = jnp.float32 if split > 1 else x2.dtype
  out_size = jnp.dtype(out_dtype).itemsize
  lay = _Layouts(tk)
  x_tr = w_tr = lay.bf16
  o_tr = _transforms(_swizzle(tn * out_size), out_size)

  def kernel(x_gmem, c_gmem, s_gmem, o_gmem, w_smem, o_smem):
    mi = lax.axis_index("m")
    ni = lax.axis_index("n")
    si = lax.axis_index("s")

    def compute(acc_ref):
      def step(idx, x_smem, c_smem, s_smem):
        if plan.overlap:
          # buffer k % 2 was last read by step k-2's wgmma, done: each step leaves <= 1 in flight
          w_buf = w_smem.at[lax.rem(idx[0], 2)]
          if not plan.skip_decode:
            _decode_tile(c_smem, s_smem, w_buf, tile_n=tn, tile_k=tk, blocksize=blocksize)
            plgpu.commit_smem()
          plgpu.wgmma(acc_ref, x_smem, w_buf.T)
          plgpu.wgmma_wait(1)
          return
        for j in range(tk // ch):   # decode chunk j while chunk j-1's wgmma runs
          if not plan.skip_decode:
            _decode_tile(c_smem, s_smem, w_smem, tile_n=tn, tile_k=tk, blocksize=blocksize,
                         col0=j * ch, cols=ch)
            plgpu.commit_smem()
          cs = pl.ds(j * ch, ch)
          plgpu.wgmma(acc_ref, x_smem.at[:, cs], w_smem.at[:, cs].T)
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          step, grid=(steps,), max_concurrent_steps=min(plan.stages, steps),
          in_specs=[
              plgpu.BlockSpec((tm, tk), lambda s: (0, s), transforms=x_tr,
                              delay_release=1 if plan.overlap else 0),
              plgpu.BlockSpec((tn, tk // 2), lambda s: (0, s), transforms=lay.codes),
              plgpu.BlockSpec((tk // blocksize, tn), lambda s: (s, 0)),
          ],
      )(x_gmem.at[pl.ds(mi * tm, tm), pl.ds(si * steps * tk, steps * tk)],
        c_gmem.at[pl.ds(ni * tn, tn), pl.ds(si * steps * tk // 2, steps * tk // 2)],
        s_gmem.at[pl.ds(si * steps * tk // blocksize, steps * tk // blocksize), pl.ds(ni * tn, tn)])
      plgpu.wgmma_wait(0)
      return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((tm, tn), jnp.float32))
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)])
    plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((split, m_pad, n_pad), out_dtype),
      grid=(m_pad // tm, n_pad // tn, split), grid_names=("m", "n", "s"),
      scratch_types=[plgpu.SMEM(((2,) if plan.overlap else ()) + (tn, tk), jnp.bfloat16,
                                transforms=w_tr),
                      plgpu.SMEM((tm, tn), out_dtype, transforms=o_tr)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )
  y = f(x2, codes, pairs)
  y = y[0] if split == 1 else y.sum(0).astype(x2.dtype)
  return y[:m, :n_out]


def _forward_ws(x2, codes, pairs, *, n_out, blocksize, plan: MgpuPlan):
  """The warp-specialized kernel (plan.ws): per program a [tile_m, tile_n] tile of y; warpgroup w
  of the two compute warpgroups owns W rows [w * tile_n / 2, (w + 1) * tile_n / 2) of the tile:
  it decodes them into its own shared buffer and runs wgmma against the whole x tile, so each
  decoded weight serves tile_m rows of x and the warpgroups never wait for each other; the third
  warpgroup only issues the TMA copies."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  m, k = x2.shape
  tm, tn, tk = plan.tile_m, plan.tile_n, plan.tile_k
  hn = tn // 2
  m_pad = -(-m // tm) * tm
  n_pad = codes.shape[0]
  x2 = _pad_rows(x2, m_pad)
  steps = k // tk
  lay = _Layouts(tk)
  x_tr = w_tr = lay.bf16
  o_tr = _transforms(_swizzle(hn * 2), 2)

  def kernel(x_gmem, c_gmem, s_gmem, o_gmem):
    mi = lax.axis_index("m")
    ni = lax.axis_index("n")

    er = plan.epi_rows or (64 if plan.overlap or plan.stages >= 5 else tm)
    epi_slots = 1 if er == tm or plan.stages >= 5 else 2  # (5 stages of a 256-row tile: 1)
    delay = 1 if plan.overlap else 0   # x's tile is read by a wgmma still in flight (and the
                                       # pipeline releases every input of a step together)

    def get_pipeline(body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(steps,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((tm, tk), lambda s: (0, s), transforms=x_tr, delay_release=delay),
              plgpu.BlockSpec((tn, tk // 2), lambda s: (0, s), transforms=lay.codes,
                              delay_release=delay),
              plgpu.BlockSpec((tk // blocksize, tn), lambda s: (s, 0), delay_release=delay),
          ],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=min(plan.stages, steps),
          compute_context=compute_context)

    ignore = lambda *_, **__: None

    def scope(allocs, w_smem, o_smem):
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * hn, hn)

      def compute_context(eval_pipeline):
        def acc_scope(acc_ref):
          eval_pipeline(acc_ref)
          plgpu.wgmma_wait(0)
          acc = acc_ref[...]
          # epilogue in pieces of er rows through epi_slots slots per warpgroup
          for i in range(tm // er):
            slot = i % epi_slots
            plgpu.wait_smem_to_gmem(epi_slots - 1, wait_read_only=True)
            o_smem[wg, slot] = acc[i * er:(i + 1) * er].astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                o_smem.at[wg, slot],
                o_gmem.at[pl.ds(mi * tm + i * er, er), pl.ds(ni * tn + wg * hn, hn)])
          plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(acc_scope, plgpu.ACC((tm, hn), jnp.float32))

      def body(idx, x_smem, c_smem, s_smem, acc_ref):
        # overlap: buffer k % 2 was last read by step k-2's wgmma, done (<= 1 in flight)
        w_buf = w_smem.at[wg, lax.rem(idx[0], 2) if plan.overlap else 0]
        if not plan.skip_decode:
          _decode_tile(c_smem.at[rows], s_smem.at[:, rows], w_buf, tile_n=hn, tile_k=tk,
                       blocksize=blocksize)
          plgpu.commit_smem()
        if not plan.skip_mma:
          plgpu.wgmma(acc_ref, x_smem, w_buf.T)
        plgpu.wgmma_wait(1 if plan.overlap else 0)
        return acc_ref

      get_pipeline(body, compute_context)(
          x_gmem.at[pl.ds(mi * tm, tm)], c_gmem.at[pl.ds(ni * tn, tn)],
          s_gmem.at[:, pl.ds(ni * tn, tn)], allocations=allocs)

    pl.run_scoped(
        scope,
        get_pipeline(ignore, ignore).get_allocations(x_gmem, c_gmem, s_gmem),
        plgpu.SMEM((2, 2 if plan.overlap else 1, hn, tk), jnp.bfloat16, transforms=w_tr),
        plgpu.SMEM((2, epi_slots, er, hn), x2.dtype, transforms=o_tr),
        collective_axes="wg")

  f = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m_pad, n_pad), x2.dtype),
      grid=(m_pad // tm, n_pad // tn), grid_names=("m", "n"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )
  return f(x2, codes, pairs)[:m, :n_out]


def _dec_smem(plan: MgpuPlan, cs: int) -> int:
  """plan.decoder's shared memory in bytes with cs code slots: x's stages, the code words and
  bf16 scales of a pass per slot, 2 d W buffers, the table."""
  d, tm, tn, tk = int(plan.decoder), plan.tile_m, plan.tile_n, plan.tile_k
  return (plan.stages * tm * tk * 2 + cs * (tn * d * tk // 2 + d * tk // 64 * tn * 2)
          + 2 * d * tn * tk * 2 + plan.lut * 256 * 4)


def _dec_code_stages(plan: MgpuPlan) -> int:
  """plan.decoder's code slots: 2 stages / d, fewer (down to 2) where shared memory runs out."""
  cs = max(2, 2 * plan.stages // int(plan.decoder))
  while cs > 2 and _dec_smem(plan, cs) > SMEM - 2048:
    cs -= 1
  return cs


def _forward_dec(x2, codes, scales, *, n_out, blocksize, plan: MgpuPlan):
  """plan.decoder = d: per program a [tile_m, tile_n] tile of y from three warpgroups, over K
  steps of tile_k.
  - wg 2 decodes d steps' W tiles per pass (`_decode_gather`, stored to swizzled bf16 tiles; with
    plan.lut through the table, copied to shared memory first): pass p into buffers (d p + s) % 2d
    once pass p - 2's steps are done. It also copies the code words and bf16 scales of a pass
    (`_dec_code_stages` slots, each refilled as soon as it has decoded it) and x's [tile_m,
    tile_k] tiles (`stages` slots, step j's copy issued once both compute warpgroups are done
    with step j - stages, checked a pass behind: hence stages >= 2 d).
  - wg 0 and 1 each run wgmma on W rows [wg * tile_n / 2, ...) of step i's decoded tile against
    x's tile (wgmma m64 n=tile_m k16: y.T's rows, x's rows as N), one wgmma in flight, and write
    their [tile_m, tile_n / 2] of y through a transposed store via x's slot wg (after both are
    done: the same shape and swizzle as the output tile).
  Barriers: x_bar / c_bar (copies landed), full (a step's tile decoded), done (both compute
  warpgroups finished a step: its x slot and W buffer are free), fin (both finished). No
  setmaxnreg: ptxas compiles every warpgroup's code within the launch's 168 registers per thread
  (a fourth warpgroup for the x copies leaves 128, too few for the m64n256 accumulator: ptxas
  asked for 154, run s14_r1)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  m, k = x2.shape
  d = int(plan.decoder)
  tm, tn, tk = plan.tile_m, plan.tile_n, plan.tile_k
  hn = tn // 2
  xs = plan.stages
  cs = _dec_code_stages(plan)
  wb = 2 * d                       # W buffers, one step each
  nb = tk // blocksize
  m_pad = -(-m // tm) * tm
  n_pad = codes.shape[0]
  x2 = _pad_rows(x2, m_pad)
  steps = k // tk
  passes = steps // d
  lay = _Layouts(tk)
  rem = lax.rem
  # its table scratch and load, and the transposed store of y at split 1
  g = _SwapGeom(m=m, k=k, mp=tm, m_tiles=m_pad // tm, steps=steps, plan=plan)
  n_in = len(scales)

  def kernel(x_gmem, c_gmem, *refs):
    s_in, (o_gmem, x_smem, c_smem, s_smem, w_smem, x_bar, c_bar, full, done, fin,
           *lut_scratch) = refs[:n_in], refs[n_in:]
    s_gmem = s_in[0]
    mi, ni, wg = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("wg")

    def load_x(i):
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(mi * tm, tm), pl.ds(i * tk, tk)],
                              x_smem.at[rem(i, xs)], x_bar.at[rem(i, xs)])

    def load_codes(p):
      slot = rem(p, cs)
      plgpu.copy_gmem_to_smem(
          c_gmem.at[pl.ds(ni * tn, tn), pl.ds(p * (d * tk // 8), d * tk // 8)],
          c_smem.at[slot], c_bar.at[slot])
      plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(p * d * nb, d * nb), pl.ds(ni * tn, tn)],
                              s_smem.at[slot], c_bar.at[slot])

    @pl.when(wg == 2)
    def _decode():
      _, _, lut, lut_bar = g.lut_load(s_in, lut_scratch)
      for p in range(min(cs, passes)):
        load_codes(p)
      for i in range(min(xs, steps)):
        load_x(i)
      if plan.lut:
        plgpu.barrier_wait(lut_bar.at[0])

      def body(p, carry):
        slot = rem(p, cs)
        plgpu.barrier_wait(c_bar.at[slot])

        @pl.when(p >= 2)
        def _():
          for s in range(d):       # pass p - 2's steps: their W buffers and x slots are free
            j = (p - 2) * d + s
            plgpu.barrier_wait(done.at[rem(j, xs)])

            @pl.when(j + xs < steps)
            def _():
              load_x(j + xs)
        for s in range(d):
          if not plan.skip_decode:
            _decode_gather(c_smem.at[slot], s_smem.at[slot], tile_n=tn, tile_k=d * tk,
                           col0=s * tk, cols=tk, out=w_smem.at[rem(p * d + s, wb)], lut=lut,
                           swizzled=False)
        plgpu.commit_smem()
        for s in range(d):
          plgpu.barrier_arrive(full.at[rem(p * d + s, wb)])

        @pl.when(p + cs < passes)
        def _():
          load_codes(p + cs)
        return carry
      lax.fori_loop(0, passes, body, 0)

    rows = pl.ds(wg * hn, hn)

    @pl.when(wg < 2)
    def _compute():
      def acc_scope(acc_ref):
        def body(i, carry):
          slot, b = rem(i, xs), rem(i, wb)
          plgpu.barrier_wait(x_bar.at[slot])
          plgpu.barrier_wait(full.at[b])
          if not plan.skip_mma:
            plgpu.wgmma(acc_ref, w_smem.at[b, rows], x_smem.at[slot].T)
          plgpu.wgmma_wait(1)      # step i - 1's wgmma done: its x slot and W buffer are free

          @pl.when(i >= 1)
          def _():
            plgpu.barrier_arrive(done.at[rem(i - 1, xs)])
          return carry
        lax.fori_loop(0, steps, body, 0)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((hn, tm), jnp.float32))
      plgpu.barrier_arrive(fin.at[0])   # both done with every x slot: slot wg takes the output
      plgpu.barrier_wait(fin.at[0])
      g.store(acc, x_smem.at[wg], o_gmem, mi, ni, 0, wg * hn, hn)

  f = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((m_pad, n_pad), x2.dtype),
      grid=(m_pad // tm, n_pad // tn), grid_names=("m", "n"),
      num_threads=3, thread_name="wg",
      scratch_types=[
          plgpu.SMEM((xs, tm, tk), jnp.bfloat16, transforms=lay.bf16),
          plgpu.SMEM((cs, tn, d * tk // 8), jnp.uint32),
          plgpu.SMEM((cs, d * nb, tn), jnp.bfloat16),
          plgpu.SMEM((wb, tn, tk), jnp.bfloat16, transforms=lay.bf16),
          plgpu.Barrier(num_barriers=xs),
          plgpu.Barrier(num_arrivals=2, num_barriers=cs),
          plgpu.Barrier(num_barriers=wb),
          plgpu.Barrier(num_arrivals=2, num_barriers=xs),
          plgpu.Barrier(num_arrivals=2, num_barriers=1)]
      + (g.lut_scratch() if plan.lut else []),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )
  return f(x2, _code_words(codes), *scales)[:m, :n_out]


def check_supported(k: int, blocksize: int, x_dtype, plan: MgpuPlan) -> str | None:
  """None if the kernel runs x [M, K] @ W [N, K].T with this blocksize and plan, else why not."""
  if jnp.dtype(x_dtype) != jnp.bfloat16:
    return f"x must be bfloat16 (got {jnp.dtype(x_dtype)})"
  if blocksize != 64:
    return f"blocksize must be 64 (got {blocksize})"
  if plan.tile_k % blocksize or plan.tile_k < 64 or plan.tile_k & (plan.tile_k - 1):
    return f"tile_k must be a power-of-two multiple of the blocksize >= 64 (got {plan.tile_k})"
  if k % (plan.tile_k * max(plan.split, 1)):
    return f"K={k} must be a multiple of tile_k * split = {plan.tile_k * max(plan.split, 1)}"
  if plan.ws and plan.epi_rows and (plan.epi_rows % 64 or plan.tile_m % plan.epi_rows):
    return f"epi_rows must be a multiple of 64 dividing tile_m (got {plan.epi_rows})"
  if plan.epi_rows and (plan.swap or not plan.ws):
    return "epi_rows takes ws without swap (the swap kernels store y's tile whole)"
  if plan.ws and not plan.swap and (plan.split > 1 or plan.tile_n % 128):
    return "ws takes no split, and tile_n a multiple of 128 (chunk is ignored)"
  if plan.dq and not plan.swap:
    return "dq takes swap"
  if plan.gather and (not plan.swap or plan.tile_m > 256):
    return "gather takes swap, and tile_m <= 256 (x's rows are wgmma's N)"
  if plan.skip_mma and (plan.swap or not (plan.ws or plan.decoder)):
    return "skip_mma takes ws or decoder without swap (the large-M warp-specialized kernels)"
  if plan.swap and (plan.overlap or (plan.ws and plan.tile_n % 128)):
    return "swap takes no overlap, and with ws tile_n a multiple of 128"
  if (plan.stream or plan.reduce) and (not plan.swap or plan.ws or plan.stream < 0):
    return "stream and reduce take swap without ws"
  if plan.finish and (not plan.swap or plan.ws or plan.stream or plan.reduce or plan.dequant):
    return "finish takes swap without ws, stream, reduce or dequant"
  if plan.lut and (not (plan.swap or plan.decoder) or (plan.ws and not plan.gather)
                   or plan.lut not in (8, 16, 32)):
    return ("lut takes swap (with ws: and gather) or decoder, and 8, 16 or 32 copies of the "
            "table")
  if plan.dequant and (not plan.gather or plan.ws or plan.tile_n != 64 or plan.split < 1
                       or plan.reduce or plan.stream):
    return "dequant takes swap and gather, tile_n 64 and split >= 1 (no ws, reduce or stream)"
  if plan.lut and plan.gather and not plan.ws and plan.tile_k < 256:
    return "lut with gather takes tile_k >= 256 (code rows of >= 128 bytes, swizzled)"
  if plan.decoder and (plan.swap or plan.ws or plan.split != 1 or plan.tile_n != 128
                       or plan.tile_m > 256 or plan.stages < max(3, 2 * int(plan.decoder))
                       or plan.dq or plan.tile_k != 64 or plan.decoder not in (1, 2)):
    # (stages >= 2 d: step j + stages' x copy is issued in pass j / d + 2, which must come)
    return ("decoder (1 or 2 steps per pass) takes tile_n 128, tile_m <= 256, tile_k 64, split 1 "
            "and stages >= max(3, 2 x decoder) (no swap, ws or dq)")
  if plan.decoder and _dec_smem(plan, 2) > SMEM - 2048:
    return (f"this decoder plan needs {_dec_smem(plan, 2)} bytes of shared memory, over "
            f"{SMEM - 2048}: take fewer stages or copies of the table")
  if plan.decoder and (k // plan.tile_k) % int(plan.decoder):
    return f"decoder={int(plan.decoder)} needs K / tile_k a multiple of it (K={k})"
  if plan.lag and (not (plan.swap and plan.ws and plan.gather) or plan.stages < 2):
    return ("lag takes swap, ws and gather, and stages >= 2 (a step's buffers are released a "
            "step late)")
  if plan.overlap and plan.stages < 2:
    return "overlap needs stages >= 2 (x's tile is released a step late)"
  if plan.chunk % 64 or plan.tile_k % plan.chunk:
    return f"chunk must be a multiple of 64 dividing tile_k (got {plan.chunk})"
  if plan.tile_m % 64 or plan.tile_n % 64:
    return f"tile_m and tile_n must be multiples of 64 (got {plan.tile_m}, {plan.tile_n})"
  return None


def _check_call(name: str, w: NF4, x_dtype, plan: MgpuPlan):
  """The checks both entry points make: the backend, a Hopper GPU, one layer's valid weight, the
  plan supported for its K and blocksize."""
  if not available():
    raise RuntimeError(f"{name}: this JAX has no Pallas Mosaic GPU backend")
  from pallas_kernels import _common
  cc = _common.compute_capability()
  if cc is not None and cc[0] != 9:
    raise RuntimeError(f"{name}: needs a Hopper GPU (sm_90, wgmma); this one is "
                       f"sm_{cc[0]}{cc[1]}: use pallas_kernels.nf4_matmul.nf4_matmul")
  if w.stacked_dims:
    raise ValueError(f"{name}: w is stacked over leading dims {w.stacked_dims}; pass one layer's "
                     "weight")
  w.validate(f"{name}: w")
  why = check_supported(w.shape[1], w.blocksize, x_dtype, plan)
  if why:
    raise ValueError(f"{name}: {why}")


def _check_dq(name: str, w: NF4, plan: MgpuPlan):
  """plan.dq (split resolved) needs a double-quant w whose absmax its programs can load."""
  if plan.dq and (not w.double_quant or _dq_problem(w.shape[1], plan)):
    raise ValueError(f"{name}: {_dq_problem(w.shape[1], plan) or 'dq needs a double-quant w'}")


def nf4_matmul_mgpu(x: jax.Array, w: NF4, plan: MgpuPlan = MgpuPlan()) -> jax.Array:
  """x [..., K] bf16 @ dequant(w).T -> [..., N] bf16 on a Hopper GPU (forward only)."""
  _check_call("nf4_matmul_mgpu", w, x.dtype, plan)
  n, k = w.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  if plan.swap and x2.shape[0] > 64 and not plan.gather:
    raise ValueError(f"nf4_matmul_mgpu: the swap plan without gather takes M <= 64 rows of x "
                     f"(got {x2.shape[0]})")
  if plan.split == 0:
    auto = _swap_split if plan.swap else _auto_split
    plan = dataclasses.replace(plan, split=auto(x2.shape[0], n, k, plan))
  _check_dq("nf4_matmul_mgpu", w, plan)
  if plan.stream and _swap_smem_over(x2.shape[0], k, plan):
    need = _swap_smem(x2.shape[0], k, plan)
    raise ValueError(f"nf4_matmul_mgpu: this stream plan needs {need} bytes of shared memory per "
                     f"program (x's rows of the K range are resident), over {SMEM - 1024}: take a "
                     "larger split or fewer stages")
  codes, scales = _operands(w, plan)
  if plan.dequant:
    wd = _dequant(codes, scales, k=k, blocksize=w.blocksize, plan=plan)[:n]
    return _dot(x2, wd.T).reshape(*lead, n)
  y = _forward_of(plan)(x2, codes, scales, n_out=n, blocksize=w.blocksize, plan=plan)
  return y.reshape(*lead, n)


def _kernel_modules(plan: MgpuPlan, m: int, n: int, k: int) -> list[str]:
  """The Mosaic GPU modules (debug info stripped) that nf4_matmul_mgpu lowers to for x [m, k] bf16
  and an NF4 W [n, k], on any host (no GPU): for the tests and bench/diag/mgpu_lowering_hashes.py.
  Lowering errors propagate."""
  import jax.experimental.mosaic.gpu.core as core
  captured, serde = [], core._run_serde_pass   # every kernel module passes here

  def spy(module, *args, **kwargs):
    captured.append(module.operation.get_asm(enable_debug_info=False))
    return serde(module, *args, **kwargs)

  w = jax.eval_shape(lambda: _quant().quantize_nf4(jnp.zeros((n, k), jnp.float32)))
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  core._run_serde_pass = spy
  try:
    jax.jit(lambda x, w: nf4_matmul_mgpu(x, w, plan)).trace(x, w).lower(
        lowering_platforms=("cuda",))
  finally:
    core._run_serde_pass = serde
  return captured


def _forward_of(plan: MgpuPlan):
  """The kernel function that runs `plan`."""
  if plan.decoder:
    return _forward_dec
  if plan.swap:
    if plan.stream:
      return _forward_swap_stream
    return _forward_swap_ws if plan.ws else _forward_swap
  return _forward_ws if plan.ws else _forward


def _operands(w: NF4, plan: MgpuPlan):
  """W's inputs to `_forward_of(plan)`: the codes with rows padded to tile_n, and the scales
  (bf16 pairs; bf16 for swap plans, or with plan.dq `_dq_inputs`)."""
  rows = plan.tile_n * max(plan.stream, 1)     # W rows per program
  n_pad = -(-w.shape[0] // rows) * rows
  codes = _pad_rows(w.codes, n_pad)
  if not (plan.swap or plan.decoder):
    return codes, _scale_pairs(w, n_pad)
  scales = _dq_inputs(w, n_pad, rows) if plan.dq else (_scales_bf16(w, n_pad),)
  return codes, scales + ((jnp.asarray(lut_table(plan.lut)),) if plan.lut else ())
