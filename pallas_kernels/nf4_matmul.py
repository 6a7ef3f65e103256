"""y = x @ dequant(W).T for a frozen NF4 weight W [N, K] (`jaxsloth.quant.NF4`): kernels + dispatch.

Dims: M rows of x (all leading dims flattened), K in features, N out features, B = K / blocksize
quantization blocks per row, P = blocksize / 2 code bytes per block. Codes are [N, K/2] uint8, two
per byte with the even k in the high nibble; absmax [N, B] (f32 after undoing double quant).

The backward gives dx = dy @ dequant(W) only: W is frozen, its NF4 leaves get zero (float0 for the
integer leaves) cotangents. Dequantized weights are never saved for the backward.

Implementations (`implementation=`):
  "xla"     dequantize in XLA through a 256-entry byte -> (hi, lo) table, then a cuBLAS dot.
            The reference path and the default off-GPU.
  "pallas"  portable Pallas kernels (Triton lowering on GPU, interpreter on CPU). Every kernel
            reads the stored absmax (uint8 + double-quant state) and decodes the scales of its
            tile in registers: no XLA pass writes an f32 absmax first.
            - fused (M <= 256): reads 4-bit codes, decodes in registers, never writes W:
              fwd grid (N / bn, split-K), each program loops over its K range `chunk`
              quantization blocks per step ([bn, chunk, P] code tiles, optionally the next
              step's tiles prefetched): tensor-core dots of x's even/odd columns with the
              decoded high/low-nibble tiles (or of x's columns with the tile interleaved back
              into W's order), or (gemv, M <= 16) CUDA-core multiplies and row
              sums. bwd grid (B, split-N): dx's even/odd columns of one block, looping over N.
              Decode by PTX byte permutes / select tree / bf16-pair table / f32 table (Plan).
            - dequant (large M): a bandwidth-bound kernel writes W [N, K] in x.dtype once, then
              cuBLAS does the dot (the fused kernel cannot match cuBLAS's GEMM at training sizes).
  None      the measured-fastest per device and M (`TUNED`, `_auto_plan`); "xla" off-GPU. For f32 x
            the plans keep the exact f32 codebook (the measured ones round it to bf16). On Hopper
            with bf16 x the forward goes to `pallas_kernels.nf4_mgpu` (Mosaic GPU, W decoded into
            wgmma's register operand) where it was measured faster (`_mgpu_plan`): M <= 16 on
            the larger weights, M = 256-2048 (to 4096 on weights of >= 2^27 elements; the
            gather kernel with the table decode and, with 256-row x tiles, each step's wgmma
            under the next step's decode, since session 18); above that, on double-quant
            weights of >= 2^25 elements, W decoded to HBM by `nf4_dequantize_mgpu` for cuBLAS,
            in the forward and (`MGPU_DEQUANT_BWD`) the backward; other backwards stay here.
Requirements: K % blocksize == 0 (checked by NF4 itself), blocksize a power of two >= 32 for the
Pallas kernels; M and N are free (padded inside to the kernels' tiles).

Where it stands (H100, bench/RESULTS.md "NF4 matmul"; forward against the bf16 dot, medians of 3
interleaved rounds). Session 12, the Mosaic swap kernel with the table decode (dispatched): M=1
70B gate/up 0.400, down 0.391, q/o 0.516, 8B down 0.668; M=4-16 70B gate/up and down 0.405-0.428,
q/o 0.51-0.54, 8B gate/up 0.54-0.56, down 0.67-0.68, q/o 0.74-0.83. Session 13, from M=9 with x
unpermuted and the split-K sum in the kernel: M=16 70B gate/up 0.411, down 0.408, q/o 0.515, 8B
gate/up 0.511, down 0.648, q/o 0.733. Session 8, this module's
kernels (where they are still the dispatch: off Hopper, the k/v weights, M=1 on the smaller ones):
M=1, the GEMV with the byte-permute decode runs 1.2-2.0x faster
on the 8B/70B q/o, gate/up, down and 70B k/v weights (8B k/v, 2 MB of codes: 1.34x slower), bound
by the integer (ALU) pipe the decode runs on. M=16: tensor-core dots with the decoded W as the left
operand, both tiles scaled in bf16 by one PTX block ("prmt_bf16"), K split to ~1024 programs (~512
for N <= 4096): 1.13-1.46x faster on the q/o, gate/up and down weights, level on 70B k/v, 1.46x
slower on 8B k/v. fwd+bwd at M <= 16 (backward on tensor cores, M=1 included): 0.67-0.87x the bf16
dot's time on the q/o (70B), gate/up and down weights. M=256: W interleaved into column order,
1.3-1.8x the bf16 dot. Large M: a dequant pass + cuBLAS (session 7, the Pallas dequant kernel:
1.17-1.26x at M=2048, 1.09-1.12x at 4096, 0.79-1.03x at 16384; session 13, on Hopper the Mosaic
decode to HBM, `nf4_mgpu.nf4_dequantize_mgpu`, on the weights of >= 2^25 elements: 1.19-1.24x at
2048, 1.05-1.14x at 4096; session 15, the backward's W through the same decode: fwd+bwd at
M=2048 1.20-1.23x against 1.24-1.30x with the Pallas dequant kernel): the pass is a fixed cost per
call that only a fused kernel removes (a Triton-lowered one measured 2.3x). Session 17, nf4_mgpu's
gather kernel with the table decode: M=2048 on the N <= K weights 1.11-1.21x against 1.20-1.29x
for the decode to HBM (runs s17_r3/r4; dispatched there); on the gate/up weights level (1.17-1.25x
against 1.18-1.33x over three runs), at 4096 mostly behind (1.11-1.36x against 1.10-1.20x).
Session 18, that kernel with each step's wgmma left running under the next step's decode
(`plan.lag`): M=2048 1.03-1.17x on every weight against 1.21-1.34x for the decode to HBM (runs
s18_r3/r5; dispatched there), M=4096 1.03-1.09x on the 70B MLP weights against 1.12-1.25x.
Session 20, M <= 16 (run s20_r3, one run over every 8B and 70B shape at M = 1 and 16): 70B down
0.386 / 0.394, gate/up 0.397 / 0.404, q/o 0.465 / 0.437, 8B gate/up 0.555 / 0.476, down 0.574 /
0.570 (K split in 14 at tile_k 256: 0.623 / 0.600 before), q/o 0.605 / 0.656; the k/v weights stay
on this module's kernels (8B 1.34 / 1.47, 70B 0.80 / 1.03).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

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
  """How one call runs, for fwd and bwd: "xla" | "dequant" (Pallas dequant + dot) | "fused"; the
  fwd also "mgpu" (the Mosaic GPU kernel of nf4_mgpu with the MgpuPlan in `mgpu`, Hopper only).

  The tuning knobs are for the benchmark; `_auto_plan` picks them for real calls.
  """
  fwd: str = "xla"
  bwd: str = "xla"
  decode: str = "f32"        # "f32": two 16-entry f32 lookups per byte; "pair": one u32 lookup of
                             # two bf16-rounded values per byte; "select": a where-tree, no lookup;
                             # "prmt": PTX byte permutes to the "pair" words, no table (fused);
                             # "prmt_bf16": the same permutes, and the tensor-core kernels get
                             # both tiles from one PTX block already scaled, in bf16 (bf16 x;
                             # elsewhere it decodes as "prmt")
  bn: int = 64               # fused fwd: rows of W per program
  split: int = 0             # fused fwd split-K / bwd split-N (0: enough programs for 2 per SM)
  chunk: int = 1             # fused fwd: quantization blocks per loop step ([bn, chunk, P] tile)
  unroll: int = 2            # fused fwd: loop steps unrolled
  prefetch: bool = False     # fused fwd: load step t+1's tiles before step t's math
  bwd_bn: int = 64           # fused bwd: rows of W per loop step
  dq_bn: int = 32            # dequant kernel: rows per program
  dq_blocks: int = 8         # dequant kernel: quantization blocks per program
  num_warps: int = 4
  num_stages: int = 3
  x_split: bool = False      # fused fwd: x's even/odd columns split in XLA (contiguous loads)
                             # instead of stride-2 loads in the kernel
  gemv: bool = False         # fused, M <= GEMV_MAX_M (bwd: M == 1): CUDA-core multiplies and
                             # reductions, no tensor-core dot
  bwd_decode: str | None = None     # the bwd's own decode / num_warps / gemv (None: as
  bwd_num_warps: int | None = None  # the fwd)
  bwd_gemv: bool | None = None
  bwd_row_acc: bool = False  # fused bwd GEMV (M == 1): per-row products accumulated elementwise,
                             # one reduction over the rows at the end instead of one per step
  fwd_programs: int = 0      # fused fwd with split=0: split K until this many programs (0: 2 per
                             # SM); the latency-bound tensor-core kernel at M=16 wants ~8 per SM
  narrow_programs: int = 0   # the same for weights of N <= NARROW_N rows (0: fwd_programs)
  gemv_fma: bool = False     # fused fwd GEMV at M == 1: FMAs into a [bn, chunk, P] accumulator
                             # across steps (explicit fma.rn.f32), reduced once at the end
  w_lhs: bool = False        # fused fwd, tensor cores: y.T = W @ x.T, the decoded W the dot's left
                             # operand (Hopper's wgmma may take it from registers; as the right
                             # operand it must be staged through shared memory)
  mgpu: Any = None           # fwd == "mgpu": the nf4_mgpu.MgpuPlan
  interleave: bool = False   # fused fwd, tensor cores: the decoded high/low-nibble tiles are
                             # interleaved into W's column order in registers, so x is read as is
                             # (no stride-2 loads, no XLA even/odd split of x)


FUSED_MAX_M = 256            # the fused kernels keep all of x's rows in one tile
NARROW_N = 4096              # Plan.narrow_programs applies up to this many rows of W

# Measured dispatch on the GPU, by M bucket: "m1" (M == 1), "small" (M <= 16), "mid", "large".
# bench/nf4_matmul.py --sweep measures the candidates and may override these in-process.
# Sweeps of 2026-11-27 (sessions 6 and 7, H100, bench/RESULTS.md "NF4 matmul"), 8B gate/up
# 14336x4096:
# M=1: the CUDA-core GEMV with [16, 8, 32] code tiles, PTX byte-permute decode, the next tile
# prefetched, 0.0238 ms (f32 table 0.031; FMA-accumulating GEMV 0.0251; bf16 dot 0.043; XLA
# dequant+dot 0.125); its backward steps over 128 rows, bf16-pair table, products accumulated
# elementwise and summed over rows once: fwd+bwd 0.066 ms (a row sum every step: 0.084).
# M=16: tensor-core dots with the decoded W as the left operand over [64, 2 x 32] tiles,
# byte-permute decode, 4 warps, K split until ~1024 programs: 0.0387 ms (unsplit 0.0458; session 4's
# select tree with W as the right operand 0.0955; bf16 dot 0.0474; XLA 0.128). The split rule was
# chosen on all eight 8B/70B weights, medians of 3 interleaved rounds (run `nf4_splits`): mean
# ratio to the bf16 dot 0.958 for ~1024 programs, 0.970 for ~2048, 0.976 for ~512, 0.986 for a
# fixed 8-way split (a single timing on this weight had preferred 2048: 0.0380 vs 0.0395).
# Backward: 256-row steps, byte permutes.
# Session 8 (runs `nf4_decode2`, `rope_splits`): "prmt_bf16" (both tiles scaled in bf16 by the PTX
# block) took M=16 to 0.0363 ms (0.87-0.96x session 7's time on every 8B/70B weight), and the
# tensor-core backward with it beat the M=1 GEMV backward: fwd+bwd 0.0589 vs 0.0664 ms (0.83-0.98x
# on all weights but 70B k/v, 1.06x). Split rule re-measured: ~1024 programs still best on average,
# ~512 better for N <= 4096 (8B q/o 0.89 vs 0.99 of the bf16 dot, also in session 7).
# 16 < M <= 256 ("mid", measured at 256): the same with x in one [256, K] tile, one quantization
# block per step and the decoded tile interleaved into W's column order (x read as is): 0.0874 ms
# (x split into even/odd columns by XLA 0.18; the Pallas dequant + cuBLAS 0.1259; bf16 dot 0.055);
# its backward (tensor cores, 64-row steps) fwd+bwd 0.188 ms (dequant + cuBLAS 0.216); with
# "prmt_bf16" (session 8) the same, 0.191. The forward keeps "prmt": "prmt_bf16" cannot interleave
# (_kernel_decode) and without the interleave took 0.176 ms at best (x split by XLA).
# M > 256: the Pallas dequant (f32 table, 16 rows x 4 blocks per program) + cuBLAS, within 0.3% of
# 32 x 8 at M=4096 (session 4). The fused kernel with a grid over x's rows (session 7, commit
# f2d09f9, best of 10 tilings) took 0.695 ms at M=2048 and 1.38 ms at M=4096 against 0.367 / 0.665
# for dequant + cuBLAS: Triton's dots with W decoded per M tile run far below cuBLAS.
# Session 9: the Mosaic GPU kernel (pallas_kernels/nf4_mgpu.py: TMA pipeline, decode into shared
# memory, wgmma) is correct but lost everywhere. Warp-specialized (a TMA warpgroup, two compute
# warpgroups each decoding its half of W's rows against a 256-row x tile): 1.41-1.46x the bf16 dot
# at M=2048 and 4096 (its skeleton without the decode: 0.95-1.05x, so the decode is the gap; one
# warpgroup: ~1.96x); M=16 0.81-0.84x on the large weights (vs 0.70-0.73x here). Not dispatched;
# bench/RESULTS.md "Session 9 runs".
TUNED: dict[str, Plan] = {
    "m1": Plan("fused", "fused", decode="prmt", gemv=True, bn=16, chunk=8, unroll=1,
               prefetch=True, bwd_bn=256, bwd_decode="prmt_bf16", bwd_gemv=False,
               bwd_num_warps=4),
    "small": Plan("fused", "fused", decode="prmt_bf16", bn=64, chunk=2, unroll=1, x_split=True,
                  w_lhs=True, prefetch=True, num_warps=4, fwd_programs=1024, narrow_programs=512,
                  bwd_bn=256, bwd_decode="prmt_bf16", bwd_num_warps=4),
    "mid": Plan("fused", "fused", decode="prmt", bn=64, chunk=1, unroll=1, w_lhs=True,
                interleave=True, num_warps=4, bwd_bn=64, bwd_decode="prmt_bf16",
                bwd_num_warps=4),
    "large": Plan("dequant", "dequant", decode="f32", dq_bn=16, dq_blocks=4),
}


# Session 10 (run s10_swap3, H100, M=16, medians of 3 interleaved rounds, ratio to the bf16 dot):
# nf4_mgpu's swap kernel (y.T = W @ x.T, the decoded W wgmma's register operand, x's 16 rows its N;
# 64 rows of W per program over 512-column steps, 2 stages, K split by its wave model) beat the
# "small" plan above on the 70B weights: gate/up 0.542 vs 0.703, down 0.556 vs 0.720, q/o 0.707
# vs 0.738, and lost on the smaller ones (8B gate/up 0.810 vs 0.750, down 0.827 vs 0.789, q/o
# 0.924 vs 0.851, k/v 1.87 vs 1.39; 70B k/v 1.20 vs 1.05): it pays three small XLA passes (scales,
# x's K permutation, the split-K sum) and its skeleton streams ~1.8 TB/s. So for 2 <= M <= 16 on
# Hopper the forward of weights of at least MGPU_MIN_WEIGHT elements runs it (bwd unchanged), and
# at M=1 on those with K > N.
# Dispatched (run s10_final, same job): gate/up 0.537 vs 0.691 for the Triton plan, down 0.553 vs
# 0.719, q/o 0.719 vs 0.731; fwd+bwd 0.70 / 0.75 / 0.81 of the bf16 dot's. Run s10_small_m: at
# M=4 and 8 gate/up 0.578 / 0.586 vs 0.692 / 0.702, down 0.554 / 0.546 vs 0.718 / 0.730, q/o
# 0.759 / 0.722 vs 0.752 / 0.745. At M=1 the GEMV stays, except on 70B down (K > N): swap 0.548
# vs the GEMV's 0.610 (run s10_swap1 too: 0.546 vs 0.594); gate/up 0.591 vs 0.505, q/o 0.726 vs
# 0.544, 8B down 0.825 vs 0.788 (not taken: below MGPU_MIN_WEIGHT).
# Session 11 (run s11_r9, same job): with plan.dq (the double quant undone in the kernel, no XLA
# pre-pass writing bf16 scales) the swap kernel at M=16 took 70B gate/up 0.517 (0.541 without),
# down 0.548 (0.558), q/o 0.620 (0.719), and beat the Triton plan on 8B gate/up (0.631 vs 0.720)
# and down (0.775 vs 0.800) but not q/o (0.875 vs 0.864); at M=4 70B gate/up 0.511 (dispatch
# 0.586), 8B gate/up 0.706 (0.739), 8B down 0.753 (0.788). So 2 <= M <= 16 took it on weights of
# at least 2^25 elements (the 8B gate/up and down too; MGPU_LUT_MIN_WEIGHT since session 12); a
# weight without double quant, or whose K and split leave the absmax copies unaligned, falls back
# to the bf16-scale kernel on weights of at least MGPU_MIN_WEIGHT. M=1 (70B down) keeps the
# bf16-scale kernel it was measured with.
# Session 12 (runs s12_r5, r6): plan.lut (each code byte's bf16 pair loaded from a per-lane
# shared-memory table, 4 instructions per 2 weights where the byte permutes took ~9; Nsight Compute
# on 70B gate/up at M=16: 30.0M warp-instructions against 45.7M) cut the swap kernel's time by
# 15-25%. r6, M=16, dq + lut (32 copies), tile_k 256 / 512, against the dispatch of the time:
# 70B gate/up 0.434 / 0.512 vs 0.527, down 0.438 / 0.425 vs 0.556, q/o 0.505 / 0.506 vs 0.628,
# 8B gate/up 0.523 / 0.528 vs 0.651, down 0.708 / 0.665 vs 0.766, q/o 0.766 / 0.778 vs 0.867
# (the Triton plan); 16 copies (two lanes per bank) were slower on all six. So tile_k 512 where K
# > N (down), else 256, and 2 <= M <= 16 takes it from 4096 x 4096 (8B q/o) up. M=1 (r5, r6,
# tile_k 256): 70B gate/up 0.412 vs the GEMV's 0.503, q/o 0.512 vs 0.563, down 0.423 vs 0.538
# (the bf16-scale swap kernel), 8B down 0.705 vs 0.773; the GEMV kept 8B gate/up (0.538 vs 0.567),
# q/o (0.607 vs 0.700) and k/v. So M=1 takes it on weights of at least MGPU_MIN_WEIGHT, and on
# those of at least MGPU_M1_DOWN_MIN_WEIGHT with K > N. Session 20 (run s20_r2): the Llama 3.2
# down projections at M=1, the swap kernel (tile_k 512) against the GEMV: 3B down (3072 x 8192)
# 0.729 vs 0.788, 1B down (2048 x 8192) 0.695 vs 0.753; so K > N takes it from 2048 x 8192 (s20_r3
# times the dispatched plan, tile_k 256, there).
MGPU_MIN_WEIGHT = 1 << 26     # N * K: 8192 x 8192 (70B q/o) and up
MGPU_M1_DOWN_MIN_WEIGHT = 1 << 24  # K > N, M=1: the swap kernel from 2048 x 8192 (1B down) up
MGPU_LUT_MIN_WEIGHT = 1 << 24  # 4096 x 4096 (8B q/o) and up: 2 <= M <= 16 with plan.lut


# Session 13 (runs s13_r1 and s13_r3, H100, medians of 3 interleaved rounds, ratio to the bf16
# dot): at M=16, x in its own order (plan.gather: no XLA pass permuting x's K) and the split-K
# partials TMA-added into one zeroed y.T (plan.reduce: no XLA sum of [split, N, M] partials) beat
# the plan without them in both runs except 70B q/o, level: r3 70B gate/up 0.423 vs 0.431, down
# 0.407 vs 0.424, q/o 0.508 vs 0.505 (r1 0.505 vs 0.507), 8B gate/up 0.495 vs 0.514, down 0.639
# vs 0.679, q/o 0.756 vs 0.764. At M=4 they were mixed (70B down 0.381 vs 0.401, 8B down 0.678 vs
# 0.665), at M=1 level or slower, so M <= 8 keeps the plan without them.
MGPU_GATHER_MIN_M = 9
# Session 16 (runs s16_r2 and s16_r3, H100, M=16, medians of 3 and 5 interleaved rounds): where the
# wave model splits K in 2, the last K range's program adding the other's partial and writing y in
# bf16 (plan.finish: no zeroed buffer, no XLA transpose) beat plan.reduce: 70B q/o 25.0 / 24.6 us
# vs 26.6 / 26.6 (0.450 vs 0.485 of the bf16 dot in r3), 8B down 28.8 / 28.7 vs 29.6 / 29.6; at
# split 4 it lost on 70B gate/up (71.2 / 71.4 vs 68.7 / 69.6) and was level on 70B down and 8B q/o.
# So from MGPU_GATHER_MIN_M the plan takes finish at split 2 and reduce above.
MGPU_FINISH_MAX_SPLIT = 2
# Session 20 (run s20_r1, H100, medians of 5 interleaved rounds, ratio to the bf16 dot): on 8B down
# (4096 x 14336) tile_k 256 with K split in 7 or 14 (3.4-6.8 programs per SM) beat tile_k 512
# split 2 (one program per SM): M=16 0.564 / 0.565 vs 0.597, M=12 0.609 / 0.605 vs 0.673, M=4
# 0.616 (split 14) vs 0.638; tile_k 512 split 7 was level (0.590). 70B down (8192 x 28672, 2-4
# programs per SM already at tile_k 512) is at 0.39-0.40 and keeps tile_k 512 (session 10).
MGPU_SWAP_TK512_MIN_WEIGHT = 1 << 27   # N * K, K > N: tile_k 512 from here (70B down), else 256


def _mgpu_small_plan(dq: bool = True, n: int = 0, k: int = 0, m: int = 1):
  """The swap kernel's plan at small M: 64 W rows per program, 2 stages of tile_k 512 where K > N
  on weights of at least MGPU_SWAP_TK512_MIN_WEIGHT (70B down) else 256, K split by the wave model,
  the table decode (plan.lut); from MGPU_GATHER_MIN_M rows of x with dq, x unpermuted and the
  partials added in the kernel."""
  from pallas_kernels import nf4_mgpu
  fold = dq and m >= MGPU_GATHER_MIN_M
  tk = 512 if k > n and n * k >= MGPU_SWAP_TK512_MIN_WEIGHT else 256
  return nf4_mgpu.MgpuPlan(tile_n=64, tile_k=tk, stages=2, split=0, chunk=64,
                           swap=True, dq=dq, lut=32, gather=fold, reduce=fold)


# Session 11 (run s11_r4, H100, medians of 3 interleaved rounds, ratio to the bf16 dot): the swap
# kernel for any M (plan.gather: x in its own order, each thread gathering its operand's code
# bytes; warp-specialized, two compute warpgroups of 64 W rows each against a 256- or 128-row x
# tile, wgmma N = x's rows) beat this module's plans at M = 256-1024 on the 8B and 70B gate/up,
# down and q/o weights: M=256 8B gate/up 1.220 vs 1.663 ("mid", fused Triton), 8B down 1.244 vs
# 1.353, 8B q/o 1.191 vs 1.311, 70B gate/up 1.227 vs 2.099, 70B q/o 1.345 vs 1.537; M=512 1.259
# vs 1.726, 1.586 vs 1.866, 1.604 vs 1.665, 1.399 vs 1.916, 1.305 vs 1.863 (dequant + cuBLAS);
# M=1024 8B down 1.241 vs 1.463, q/o 1.273 vs 1.380, 70B gate/up 1.335 vs 1.519, q/o 1.269 vs
# 1.456, and lost on 8B gate/up, 1.523 vs 1.425. 256-row x tiles unsplit where they make >= 100
# programs, else 128-row tiles with K split by the wave model (32-64 programs: 8B down at 256 2.72
# vs 1.24). At M=2048 it is level (runs s11_r2/r3: 1.18-1.39 vs 1.22-1.28) and at 4096 behind
# (1.21-1.34 vs 1.10-1.21), so larger M keeps dequant + cuBLAS; k/v weights (N = 1024) were not
# measured and stay. The backward is unchanged. Run s11_r5 (the dispatch, same job as the plans it
# replaced) agreed on 23 of 24 weight x M, 70B down included (M=512 1.336 vs 2.028), and again lost
# 8B gate/up at M=1024 (1.514 vs 1.453): there 448 programs fill 3.39 waves of the 132 SMs, the
# last 39% full, where dequant + cuBLAS has caught up; above M=512 the kernel is taken only if its
# waves are >= 90% full (the other M=1024 weights: 0.97).
#
# Session 17 (runs s17_r2 and s17_r3, H100, medians of 3 interleaved rounds, ratio to the bf16
# dot): the same kernel with the table decode (plan.lut, as at small M: 16 copies with 256-row x
# tiles, tile_k 64 and 4 stages, so that the 16 KB table fits beside them; 32 copies with the
# 128-row tiles) beat it on every weight x M measured: M=512 8B gate/up 1.207 vs 1.301, 70B
# gate/up 1.302 vs 1.372, 70B q/o 1.118 vs 1.214; M=1024 8B down 1.156 vs 1.266, 70B gate/up
# 1.210 vs 1.325, 70B q/o 1.219 vs 1.346, 8B q/o 1.198 vs 1.265; the 128-row plan at M=256 8B
# down 1.122 vs 1.272, q/o 1.066 vs 1.178, at M=512 1.303 vs 1.625 and 1.313 vs 1.516. At M=2048
# it also beat W decoded to HBM + cuBLAS on the weights with N <= K (8B down 1.156 vs 1.219 and
# 1.175 vs 1.221 in r2, 70B q/o 1.205 vs 1.239, 8B q/o 1.114 vs 1.196) but not on the gate/up
# weights (8B 1.248 vs 1.188, 70B 1.251 vs 1.207; r2 1.220 vs 1.182 and 1.165 vs 1.327), nor at
# M=4096 on most (8B gate/up 1.359 vs 1.202, 8B down 1.174 vs 1.116, 70B q/o 1.196 vs 1.141). So
# the mid range reached M=2048 on weights with N <= K (until session 18).
#
# Session 18 (runs s18_r2-r6, H100, medians of 3 or 5 interleaved rounds): the 256-row plan with
# plan.lag (each step's wgmma left in flight under the next step's decode, the two steps' register
# operands kept apart by two branches) against the same plan without it, M=2048 (r2): 8B gate/up
# 1.129 vs 1.212, 70B gate/up 1.103 vs 1.201, 70B q/o 1.174 vs 1.227, 8B down 1.109 vs 1.062.
# As the dispatch against W decoded to HBM + cuBLAS (DEQUANT_PLAN), M=2048 (r3): 8B gate/up 1.157
# vs 1.230, 8B down 1.155 vs 1.257, 70B q/o 1.087 vs 1.213, 70B gate/up 1.169 vs 1.340, 70B down
# 1.067 vs 1.231, 8B q/o 1.095 vs 1.210; so the range now runs to 2048 on every weight. M=4096
# (r3, r4): 70B gate/up 1.087 / 1.085 vs 1.253 / 1.189, 70B down 1.031 / 1.087 vs 1.115 / 1.166,
# but 8B gate/up 1.116 vs 1.104 and 70B q/o 1.155 vs 1.136: to 4096 on weights of >= 2^27
# elements. M=16384 70B down: 1.019 vs 1.021
# (r6, level), so larger M keeps DEQUANT_PLAN. 8B gate/up at M=1024 (3.39 waves, the rule that
# kept it on DEQUANT_PLAN until now): 1.233 vs 1.384 (r2), 1.295 vs 1.390 (r4), so no waves rule.
# The same kernel timed twice in one job differed by up to 0.07 (r1: 8B down M=1024 1.135 as the
# dispatch, 1.206 as an explicit plan), so single differences under ~0.05 are not read as wins.
# The 128-row plan stays without lag (8B down M=256: 1.175 vs 1.097, r2).
#
# Session 19 (runs s19_r1 and s19_r2, H100, medians of 3 interleaved rounds): the k/v weights
# (N = 1024), which no fused plan took above M=256 (their default is the Pallas dequant kernel +
# cuBLAS), on the 128-row plan below: 8B k/v at M=2048 57.0 vs 81.8 us (r1), 51.8 vs 70.4 (r2);
# there its 128 x tiles of 128 rows fill 0.97 of a wave of the 132 SMs. Elsewhere it lost: 8B k/v
# at M=1024 (64 tiles) 88.3 vs 35.1, at 4096 (256 tiles) 68.7 vs 55.6; 70B k/v (K = 8192) at 2048
# 60.5 vs 57.8 (r1: 64.6 vs 59.3). M=256 was level within one run's noise (17.7 vs 20.3 us on 8B,
# 24.2 vs 27.2 on 70B; the fused Triton plan stays). So k/v-sized weights with K = 4096 (the one
# K where it won; smaller K, as in Llama 3.2, was not measured) take it where their 128-row tiles
# fill 90-100% of one wave: M = 1793-2048 at N = 1024.
MGPU_MID_M = (256, 2048)
MGPU_MID_MAX_M_LARGE = 4096         # ... and to this M on weights of >= MGPU_MID_LARGE_WEIGHT
MGPU_MID_LARGE_WEIGHT = 1 << 27     # elements (the 70B MLP weights)
MGPU_MID_MIN_N = 4096
MGPU_KV_K = 4096                    # narrower weights: the 128-row plan at one full wave, this K


def _kv_one_wave(m: int, n: int, k: int) -> bool:
  """Whether a weight narrower than MGPU_MID_MIN_N with K = MGPU_KV_K takes the 128-row gather
  plan at this M: its tiles of 128 x 128 fill 90-100% of one wave of the SMs."""
  from pallas_kernels import nf4_mgpu
  tiles = -(-m // 128) * -(-n // 128)
  return (n < MGPU_MID_MIN_N and k == MGPU_KV_K and m > FUSED_MAX_M
          and 0.9 * nf4_mgpu.SMS <= tiles <= nf4_mgpu.SMS)


def _mgpu_mid_plan(m: int, n: int):
  """The gather kernel's plan at mid M (see above)."""
  from pallas_kernels import nf4_mgpu
  wide = nf4_mgpu.MgpuPlan(tile_m=256, tile_n=128, tile_k=64, stages=4, split=1, swap=True,
                           ws=True, gather=True, lut=16, lag=True)
  programs = -(-m // 256) * -(-n // 128)
  if programs < 100:
    return dataclasses.replace(wide, tile_m=128, tile_k=128, stages=3, split=0, lut=32, lag=False)
  return wide


# Session 13 (run s13_r5, H100, medians of 3 interleaved rounds): W decoded to HBM by the swap
# kernels' decode (nf4_mgpu.nf4_dequantize_mgpu, DEQUANT_PLAN: 64 rows per program, K split in 2,
# the double quant undone in the kernel) took less time than the Pallas dequant kernel of the
# "large" plan on the weights of >= 2^25 elements: 8B gate/up 67.0 vs 71.7 us, 8B down 70.3 vs
# 76.3, 70B gate/up 241.0 vs 295.6, 70B q/o 75.0 vs 83.6 (8B q/o 45.8 vs 33.1: too few programs).
# With the same dot after it, M=2048 / 4096 against the bf16 dot: 70B gate/up 1.205 / 1.110 vs
# 1.242 / 1.137, 70B q/o 1.196 / 1.155 vs 1.212 / 1.153, 8B gate/up 1.243 / 1.111 vs 1.199 /
# 1.108, 8B down 1.268 / 1.119 vs 1.239 / 1.125 (the dot's share varies by a few percent between
# rounds). Run s13_r6 (this dispatch against the one before, 5 rounds), M=2048 / 4096: 70B down
# 1.195 / 1.094 vs 1.255 / 1.104, 70B gate/up 1.217 / 1.138 vs 1.219 / 1.115, 70B q/o 1.187 /
# 1.046 vs 1.327 / 1.097, 8B gate/up 1.237 / 1.125 vs 1.252 / 1.117, 8B down 1.223 / 1.133 vs
# 1.250 / 1.135. The decode differs from dequantize_nf4's in rounding the codebook value to bf16
# first, as every Mosaic kernel here does (within bf16 rounding).
MGPU_DEQUANT_MIN_WEIGHT = 1 << 25


def _mgpu_plan(m: int, w, dtype):
  """The nf4_mgpu plan of the default dispatch's forward for this call, or None: the swap kernel
  (plan.dq and plan.lut; from MGPU_GATHER_MIN_M rows also plan.gather, and plan.reduce, or
  plan.finish where K is split in at most MGPU_FINISH_MAX_SPLIT) at
  2 <= M <= 16 on weights of at least MGPU_LUT_MIN_WEIGHT elements, at
  M == 1 on those of at least MGPU_MIN_WEIGHT, or of MGPU_M1_DOWN_MIN_WEIGHT with K > N (where
  the GEMV is weakest); the bf16-scale swap kernel where dq cannot run, on weights of at least
  MGPU_MIN_WEIGHT; the gather kernel (with the table) at MGPU_MID_M on weights of at least
  MGPU_MID_MIN_N rows and columns, and up to MGPU_MID_MAX_M_LARGE on those of at least
  MGPU_MID_LARGE_WEIGHT elements; on narrower weights (k/v) where `_kv_one_wave`; elsewhere
  above FUSED_MAX_M, W decoded to HBM by nf4_dequantize_mgpu before the dot, on double-quant
  weights of at least MGPU_DEQUANT_MIN_WEIGHT elements."""
  if jnp.dtype(dtype) != jnp.bfloat16 or _common.compute_capability() != (9, 0):
    return None
  n, k = w.shape
  from pallas_kernels import nf4_mgpu
  if 1 <= m <= 16:
    if m == 1 and n * k < MGPU_MIN_WEIGHT and not (k > n and
                                                   n * k >= MGPU_M1_DOWN_MIN_WEIGHT):
      return None
    if n * k < MGPU_LUT_MIN_WEIGHT:
      return None
    # split resolved here: whether dq can load its absmax depends on it
    plan = _mgpu_small_plan(n=n, k=k, m=m)
    plan = dataclasses.replace(plan, split=nf4_mgpu._swap_split(m, n, k, plan))
    if plan.reduce and 1 < plan.split <= MGPU_FINISH_MAX_SPLIT:   # (split 1: y written directly)
      plan = dataclasses.replace(plan, reduce=False, finish=True)
    if not w.double_quant or nf4_mgpu._dq_problem(k, plan):
      if n * k < MGPU_MIN_WEIGHT:
        return None
      plan = _mgpu_small_plan(dq=False, n=n, k=k)
  elif (min(n, k) >= MGPU_MID_MIN_N and MGPU_MID_M[0] <= m and (
      m <= MGPU_MID_M[1] or (m <= MGPU_MID_MAX_M_LARGE and n * k >= MGPU_MID_LARGE_WEIGHT))
        or _kv_one_wave(m, n, k)):
    plan = _mgpu_mid_plan(m, n)
  else:
    plan = None
  if (plan is None and m > FUSED_MAX_M and n * k >= MGPU_DEQUANT_MIN_WEIGHT and w.double_quant
      and not nf4_mgpu._dq_problem(k, nf4_mgpu.DEQUANT_PLAN)):
    plan = nf4_mgpu.DEQUANT_PLAN
  if plan is None:
    return None
  if not nf4_mgpu.available() or nf4_mgpu.check_supported(k, w.blocksize, dtype, plan):
    return None
  return plan


def _dispatch_plan(m: int, w, implementation: str | None, dtype) -> Plan:
  """The default plan of a call with M rows of x on weight w."""
  plan = _auto_plan(m, implementation, dtype)
  if implementation != "xla" and plan.fwd in ("fused", "dequant"):
    mgpu = _mgpu_plan(m, w, dtype)
    if mgpu is not None:
      plan = dataclasses.replace(plan, fwd="mgpu", mgpu=mgpu)
  return plan


def _bucket(m: int) -> str:
  # "mid" (16 < M <= FUSED_MAX_M): the fused kernels with x in one tile
  return "m1" if m == 1 else "small" if m <= 16 else "mid" if m <= FUSED_MAX_M else "large"


# Decodes that round the 16 codebook values to bf16 ("pair", "prmt", "prmt_bf16"; the value times
# its absmax is then rounded again to the operand's dtype): within bf16's rounding for 16-bit x, but
# a 2^-9 relative error per weight for f32 x, where the XLA reference keeps the codebook in f32.
_BF16_CODEBOOK_DECODES = ("pair", "prmt", "prmt_bf16")


def _auto_plan(m: int, impl: str | None, dtype=jnp.bfloat16) -> Plan:
  if impl == "xla" or (impl is None and not (_common.on_gpu() and _common.pallas_supported())):
    return Plan("xla", "xla")
  plan = TUNED[_bucket(m)]
  if impl == "pallas":  # a Pallas kernel for both passes, whatever the measurement preferred
    plan = dataclasses.replace(
        plan, fwd="dequant" if plan.fwd == "xla" else plan.fwd,
        bwd="dequant" if plan.bwd == "xla" else plan.bwd)
  if jnp.dtype(dtype).itemsize > 2:   # f32 x: the exact f32 codebook in both passes
    exact = lambda d: "f32" if d in _BF16_CODEBOOK_DECODES else d
    plan = dataclasses.replace(plan, decode=exact(plan.decode),
                               bwd_decode=exact(plan.bwd_decode or plan.decode))
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
  if decode in ("select", "prmt", "prmt_bf16"):
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
  if decode in ("pair", "prmt"):
    v = lut_ref[ci] if decode == "pair" else _decode_prmt(c)
    hi = jax.lax.bitcast_convert_type(v & jnp.uint32(0xFFFF0000), jnp.float32)
    lo = jax.lax.bitcast_convert_type(v << 16, jnp.float32)
    return hi, lo
  return _select_tree(ci >> 4), _select_tree(ci & 15)


# ----------------------------------------------------------------------------- byte-permute decode
# decode="prmt" (fused kernels): the 16 NF4 values rounded to bf16 and split into a low-byte and a
# high-byte plane of 16 bytes (4 words each). PTX `prmt` picks 4 bytes out of 8 by 4 selector
# nibbles, using 3 index bits (a set 4th bit means sign replication), so one plane lookup of 4
# nibbles is two prmt (codes 0-7 and 8-15, by the index bits) and a third choosing each byte from
# one or the other by the nibble's bit 3. The low 16 bits of a code word are already 4 selector
# nibbles: (lo, hi) of byte 0, then of byte 1. Two more prmt interleave the planes into one word per
# code byte, (bf16 of the high nibble) << 16 | (bf16 of the low nibble), the layout of the "pair"
# table. About 25 instructions per 8 values, against a 256-entry table gather (address arithmetic
# and a load per byte) or a 4-level select tree (15 selects per value).
# (One output only: Pallas' lowering of a multi-result inline asm returns one value in jax 0.10.)
# Off the GPU (interpret mode) the same lookups run through `_prmt` in jnp, so the tables and the
# selector arithmetic are tested on CPU; the PTX string itself only on the GPU.


@functools.cache
def _prmt_planes():
  """(low-byte plane, high-byte plane): 4 little-endian words each, word j = codes 4j..4j+3."""
  b16 = _quant().NF4_CODE.astype(jnp.bfloat16).view(np.uint16)
  words = lambda plane: [int.from_bytes(bytes(int(v) for v in plane[4 * j:4 * j + 4]), "little")
                         for j in range(4)]
  return words(b16 & 0xFF), words(b16 >> 8)


@functools.cache
def _prmt_asm() -> str:
  """PTX: 4 code bytes in $4 -> one word per byte in $0..$3 (high-nibble bf16 in the upper half)."""
  lo, hi = _prmt_planes()
  regs = ".reg .b32 s, t, u, a, b, L, H, l0, l1, l2, l3, h0, h1, h2, h3;"
  consts = " ".join(f"mov.b32 l{j}, {lo[j]:#010x}; mov.b32 h{j}, {hi[j]:#010x};" for j in range(4))
  body = ["shr.b32 u, $4, 16;"]   # the input is read before any output is written
  for src, outs in (("$4", ("$0", "$1")), ("u", ("$2", "$3"))):
    body.append(f"and.b32 s, {src}, 0x7777; shr.b32 t, {src}, 1; and.b32 t, t, 0x4444; "
                "or.b32 t, t, 0x3210;")
    body.append("prmt.b32 a, l0, l1, s; prmt.b32 b, l2, l3, s; prmt.b32 L, a, b, t;")
    body.append("prmt.b32 a, h0, h1, s; prmt.b32 b, h2, h3, s; prmt.b32 H, a, b, t;")
    body.append(f"prmt.b32 {outs[0]}, L, H, 0x5140; prmt.b32 {outs[1]}, L, H, 0x7362;")
  return "{ " + regs + " " + consts + " " + " ".join(body) + " }"


def _prmt(a, b, sel):
  """PTX prmt.b32 (default mode) on uint32 arrays: 4 bytes of {b, a} chosen by sel's nibbles."""
  out = jnp.zeros_like(a)
  for i in range(4):
    nib = (sel >> (4 * i)) & 15
    idx = nib & 7
    src = jnp.where(idx < 4, a, b)
    byte = (src >> (8 * (idx & 3))) & 0xFF
    byte = jnp.where(nib & 8, jnp.where(byte & 0x80, jnp.uint32(0xFF), jnp.uint32(0)), byte)
    out = out | (byte << (8 * i))
  return out


def _prmt_lookups_emulated(c):
  """The PTX's plane lookups in jnp, one code byte at a time: (low-byte plane word, high-byte plane
  word), byte 0 for the low nibble, byte 1 for the high nibble; and a constant-word maker."""
  lo, hi = _prmt_planes()
  u = lambda v: jnp.full(c.shape, v, jnp.uint32)
  r = c.astype(jnp.uint32)                      # nibble 0 = low nibble, nibble 1 = high nibble
  s = r & 0x77
  t = ((r >> 1) & 0x44) | 0x10
  lp = _prmt(_prmt(u(lo[0]), u(lo[1]), s), _prmt(u(lo[2]), u(lo[3]), s), t)
  hp = _prmt(_prmt(u(hi[0]), u(hi[1]), s), _prmt(u(hi[2]), u(hi[3]), s), t)
  return lp, hp, u


def _prmt_decode_emulated(c):
  """The PTX's lookups in jnp, one code byte at a time: uint32 words as `_decode_prmt` gives."""
  lp, hp, u = _prmt_lookups_emulated(c)
  return _prmt(lp, hp, u(0x5140))


def _decode_prmt(c):
  """uint8 codes -> uint32 words (bf16 of the high nibble << 16 | bf16 of the low nibble): the
  PTX on the GPU, its jnp emulation in interpret mode."""
  if _common.interpret():
    return _prmt_decode_emulated(c)
  from jax.experimental.pallas import triton as pltriton
  # (Triton's op takes signless integers: the result is declared int32 and reinterpreted)
  [w] = pltriton.elementwise_inline_asm(
      _prmt_asm(), args=[c], constraints="=r,=r,=r,=r,r", pack=4,
      result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.int32)])
  return jax.lax.bitcast_convert_type(w, jnp.uint32)


# decode="prmt_bf16" (the tensor-core kernels, bf16 operands): one PTX block does the same lookups
# for 4 code bytes and hands out both tiles ready for the dot: the bf16 values of the high nibbles
# and of the low nibbles, each multiplied by its absmax (rounded to bf16) with bf16x2 FMAs. That
# replaces, per value, the split of the pair word into an f32 (an integer op), an f32 multiply
# and a conversion back to bf16: ~3.5 instead of ~5.6 instructions per value, most of the saving
# on the integer pipe that bounds these kernels. Each weight is rounded three times (codebook,
# absmax, product: within ~1.5 bf16 ulp of the f32 dequantization instead of 0.5).
# Pallas' public inline-asm op returns one result, so the two-result op is a small primitive of
# ours lowered to the same Triton op (`_asm2_p`, internal Pallas-Triton API, jax 0.10 - 0.11).


@functools.cache
def _prmt_bf16_asm() -> str:
  """PTX: 4 code bytes in $4 and their bf16 scales as pairs in $5 (bytes 0, 1) and $6 (bytes 2, 3)
  -> the scaled bf16 values of the high nibbles in $0 (bytes 0, 1) and $1 (2, 3), of the low
  nibbles in $2 and $3; the first byte's value in the low half of each word."""
  lo, hi = _prmt_planes()
  regs = ".reg .b32 c, p, q, s, t, u, a, b, L, H, z, l0, l1, l2, l3, h0, h1, h2, h3;"
  consts = " ".join(f"mov.b32 l{j}, {lo[j]:#010x}; mov.b32 h{j}, {hi[j]:#010x};" for j in range(4))
  body = ["mov.b32 c, $4; mov.b32 p, $5; mov.b32 q, $6; shr.b32 u, c, 16;",   # inputs first: an
          "mov.b32 z, 0x80008000;"]        # output may share an input's register; -0.0 addends
  for src, sc, (oh, ol) in (("c", "p", ("$0", "$2")), ("u", "q", ("$1", "$3"))):
    body.append(f"and.b32 s, {src}, 0x7777; shr.b32 t, {src}, 1; and.b32 t, t, 0x4444; "
                "or.b32 t, t, 0x3210;")
    body.append("prmt.b32 a, l0, l1, s; prmt.b32 b, l2, l3, s; prmt.b32 L, a, b, t;")
    body.append("prmt.b32 a, h0, h1, s; prmt.b32 b, h2, h3, s; prmt.b32 H, a, b, t;")
    body.append(f"prmt.b32 a, L, H, 0x7351; prmt.b32 b, L, H, 0x6240; "
                f"fma.rn.bf16x2 {oh}, a, {sc}, z; fma.rn.bf16x2 {ol}, b, {sc}, z;")
  return "{ " + regs + " " + consts + " " + " ".join(body) + " }"


@functools.cache
def _asm2_p():
  """A two-result `tt.elementwise_inline_asm` for Pallas' Triton lowering (GPU only)."""
  from jax._src import core as jax_core
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import lowering as triton_lowering
  from jax.interpreters import mlir

  prim = jax_core.Primitive("jaxsloth_elementwise_inline_asm2")
  prim.multiple_results = True

  @prim.def_abstract_eval
  def _abstract(*avals, asm, constraints, pack, result_shape_dtypes):
    del asm, constraints, pack
    if any(a.shape != avals[0].shape for a in avals):
      raise ValueError("elementwise inline asm: all arguments must have one shape")
    return [jax_core.ShapedArray(r.shape, r.dtype) for r in result_shape_dtypes]

  @triton_lowering.register_lowering(prim)
  def _lower(ctx, *args, asm, constraints, pack, result_shape_dtypes):
    del result_shape_dtypes
    op = tt_dialect.ElementwiseInlineAsmOp(
        [mlir.aval_to_ir_type(ctx.context.mlir_ctx, a) for a in ctx.avals_out], asm,
        constraints=constraints, pure=True, packed_element=pack, args=list(args))
    return list(op.results)

  return prim


def _asm2_available() -> bool:
  """Whether this JAX still has the internal Pallas-Triton API `_asm2_p` builds on (else the
  kernels decode "prmt_bf16" as "prmt")."""
  try:
    _asm2_p()
    return True
  except (ImportError, AttributeError):
    return False


def _prmt_bf16_emulated(c, s):
  """The PTX block in jnp, one code byte at a time: (high-nibble, low-nibble) bf16 values times
  the bf16 scales s (an exact product rounded once, as fma.rn with a -0.0 addend)."""
  lp, hp, u = _prmt_lookups_emulated(c)
  value = lambda perm: jax.lax.bitcast_convert_type(
      (_prmt(lp, hp, u(perm)) & 0xFFFF).astype(jnp.uint16), jnp.bfloat16)
  scaled = lambda v: (v.astype(jnp.float32) * s.astype(jnp.float32)).astype(jnp.bfloat16)
  return scaled(value(0x7351)), scaled(value(0x6240))


def _decode_prmt_bf16(c, a):
  """uint8 codes [..., P] and f32 scales broadcastable to them -> (high-nibble, low-nibble) values
  times the scales, bf16 [..., P]: the PTX on the GPU, its jnp emulation in interpret mode."""
  s = jnp.broadcast_to(a.astype(jnp.bfloat16), c.shape)
  if _common.interpret():
    return _prmt_bf16_emulated(c, s)
  out = jax.ShapeDtypeStruct(c.shape, jnp.bfloat16)
  hi, lo = _asm2_p().bind(c, s, asm=_prmt_bf16_asm(), constraints="=r,=r,=r,=r,r,r,r", pack=4,
                          result_shape_dtypes=(out, out))
  return hi, lo


def _kernel_decode(decode: str, cdtype, gemv: bool, interleave: bool = False) -> str:
  """The decode a kernel runs: "prmt_bf16" only where its bf16 products feed a tensor-core dot
  of bf16 operands; elsewhere (GEMV bodies, f16 x, the dequant kernel) the "prmt" lookups.
  Not with `interleave` either: joining the two results of the PTX block into W's column order
  came out wrong on the GPU (H100 and H200, jax 0.11.2: relative errors ~1, matching no swap of
  the nibbles; bench/diag/prmt_bf16_interleave.py), while each result fed to its own dot is right,
  so that combination keeps the "prmt" decode. So does a JAX without the internal API the
  two-result op builds on."""
  if decode == "prmt_bf16" and (gemv or interleave or jnp.dtype(cdtype) != jnp.bfloat16
                                or not _asm2_available()):
    return "prmt"
  return decode


def _fma(a, b, c):
  """a * b + c in f32 as one fma.rn.f32 on the GPU (the Triton path here does not contract
  mul + add: an ncu profile of the GEMV counted 0 fused of 15.5M FP32 instructions)."""
  a, b, c = jnp.broadcast_arrays(a, b, c)
  if _common.interpret():
    return a * b + c
  from jax.experimental.pallas import triton as pltriton
  [d] = pltriton.elementwise_inline_asm(
      "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
  return d


def _call(kernel, out_shape, grid, plan: Plan, name: str):
  return _common.pallas_call(kernel, out_shape=out_shape, grid=grid, num_warps=plan.num_warps,
                             num_stages=plan.num_stages, name=name)


def _largest_divisor(n: int, cap: int) -> int:
  cap = max(1, min(n, cap))
  return max(d for d in range(1, cap + 1) if n % d == 0)


def _pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two dividing n, at most cap (a tile dim: Triton needs powers of 2)."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def _pad_rows(a, rows: int):
  return a if a.shape[0] == rows else jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _check_kernel_blocksize(w: NF4):
  bs = w.blocksize
  if bs < 32 or bs & (bs - 1):
    raise ValueError(f"nf4_matmul: the Pallas kernels need a power-of-two blocksize >= 32, "
                     f"got {bs}; use implementation='xla'")


# ----------------------------------------------------------------------------- scales (absmax)
# Every kernel takes the absmax as stored (uint8 codes with double quant, else f32) plus the
# double-quant state, and decodes the tile it needs in registers: no separate XLA pass writes an
# f32 absmax for the whole weight before each call (a kernel launch and 4 bytes per block each way).

def _scale_inputs(w: NF4, rows: int):
  """(absmax [rows, B], dynamic map [256] f32, nested absmax [>=1] f32, offset [1] f32)."""
  absmax = _pad_rows(w.absmax, rows)
  if w.double_quant:
    return (absmax, jnp.asarray(_quant().DYNAMIC_MAP, jnp.float32),
            w.nested_absmax.astype(jnp.float32), w.absmax_offset.reshape(1).astype(jnp.float32))
  zero = jnp.zeros((1,), jnp.float32)
  return absmax.astype(jnp.float32), zero, zero, zero


def _scales(sc, r0, bn: int, b0, c: int, nb: int, dq: bool):
  """f32 absmax [bn, c] of rows r0.. and blocks b0.. (double quant undone as dequantize_absmax)."""
  return _scale_values(sc, sc[0][pl.ds(r0, bn), pl.ds(b0, c)], r0, bn, b0, c, nb, dq)


def _scale_values(sc, a, r0, bn: int, b0, c: int, nb: int, dq: bool):
  """_scales from the already loaded stored absmax tile `a` [bn, c]."""
  _, dmap_ref, nested_ref, off_ref = sc
  if not dq:
    return a.astype(jnp.float32)
  code = dmap_ref[a.astype(jnp.int32)]
  flat = ((r0 + jax.lax.broadcasted_iota(jnp.int32, (bn, c), 0)) * nb
          + b0 + jax.lax.broadcasted_iota(jnp.int32, (bn, c), 1))
  # padded rows (N up to the row tile) would index past the nested state: clamp (they are cut off)
  idx = jnp.minimum(jax.lax.shift_right_logical(flat, 8), nested_ref.shape[0] - 1)
  scaled = code * nested_ref[idx]
  scaled = jnp.where(code >= -2, scaled, jnp.float32(0))   # no FMA contraction: see quant.py
  return scaled + off_ref[0]


def _prepared(w: NF4, rows: int):
  """(codes [rows, K/2] u8, scale inputs) with N padded to `rows` (padded rows are cut off)."""
  return _pad_rows(w.codes, rows), _scale_inputs(w, rows)


def _n_programs_target():
  return 264  # 2 per SM on an H100 (132 SMs)


def _split_for(programs: int, steps: int, split: int, target: int | None = None) -> int:
  """Split factor: `split` if given, else enough to reach `target` programs (default: 2 per SM);
  divides steps."""
  target = target or _n_programs_target()
  return _largest_divisor(steps, split or max(1, target // programs))


# ----------------------------------------------------------------------------- dequant kernel

def _dequant_kernel(codes_ref, *refs, bn, nblk, p, nb, dq, decode, dtype):
  *sc, lut_ref, o_ref = refs
  r0 = pl.program_id(0) * bn
  rows = pl.ds(r0, bn)
  for u in range(nblk):
    b = pl.program_id(1) * nblk + u
    c = codes_ref[rows, pl.ds(b * p, p)]
    a = _scales(sc, r0, bn, b, 1, nb, dq)
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
  codes, sc = _prepared(w, n_pad)
  decode = _kernel_decode(plan.decode, dtype, True)
  kernel = functools.partial(_dequant_kernel, bn=bn, nblk=nblk, p=p, nb=nb, dq=w.double_quant,
                             decode=decode, dtype=jnp.dtype(dtype))
  out = _call(kernel, jax.ShapeDtypeStruct((n_pad, k // 2, 2), dtype), (n_pad // bn, nb // nblk),
              plan, "nf4_dequant")(codes, *sc, _tables(decode))
  return out.reshape(n_pad, k)[:n]


# ----------------------------------------------------------------------------- fused kernels
# Forward, both bodies: grid (N / bn, split-K); a program owns bn rows of W and loops over its
# share of K, `chunk` quantization blocks per step, codes loaded as a [bn, chunk, P] tile.

def _fused_fwd_kernel(*refs, bn, chunk, p, nb, steps, unroll, dq, decode, cdtype, gemv, m,
                      x_split, prefetch, w_lhs, gemv_fma, interleave):
  """y[:, rows] over this program's K range.

  gemv=False: tensor-core dots of x's even/odd columns with the decoded high/low-nibble tiles
    (x [Mp, K] read with stride 2, or split into even/odd columns by XLA when x_split).
  gemv=True: CUDA-core multiplies and row sums, one accumulator per row of x (M <= GEMV_MAX_M);
    x is [M * B, blocksize] (row i * B + b: block b of x's row i), read with stride 2.
  interleave: one dot of x's contiguous columns with the W tile put in column order.
  """
  if x_split:
    xe_ref, xo_ref, codes_ref, *refs = refs
  else:
    x_ref, codes_ref, *refs = refs
  *sc, lut_ref, o_ref = refs
  r0 = pl.program_id(0) * bn
  s = pl.program_id(1)
  dims = (((1,), (1,)), ((), ()))
  width = chunk * p

  def tile(t):
    """Step t's raw operands: codes [bn, chunk, P] and stored absmax [bn, chunk]."""
    b0 = (s * steps + t) * chunk
    return (codes_ref[pl.ds(r0, bn), pl.ds(b0, chunk), :],
            sc[0][pl.ds(r0, bn), pl.ds(b0, chunk)])

  def compute(t, acc, c, a_raw):
    b0 = (s * steps + t) * chunk
    a = _scale_values(sc, a_raw, r0, bn, b0, chunk, nb, dq)            # [bn, chunk] f32
    if decode == "prmt_bf16":   # tensor-core bodies only: both tiles scaled, in bf16, from the PTX
      return acc + dots(b0, *_decode_prmt_bf16(c, a[:, :, None]))
    hi, lo = _decode(c, lut_ref, decode)
    if gemv and gemv_fma:   # M == 1: elementwise FMAs into [bn, chunk, P], one reduction at the end
      xe = x_ref[pl.ds(b0, chunk), pl.ds(0, p, stride=2)].astype(jnp.float32)
      xo = x_ref[pl.ds(b0, chunk), pl.ds(1, p, stride=2)].astype(jnp.float32)
      return (_fma(_fma(hi, xe[None], lo * xo[None]), a[:, :, None], acc[0]),)
    if gemv:
      new = []
      for i in range(m):
        xb = pl.ds(i * nb + b0, chunk)
        xe = x_ref[xb, pl.ds(0, p, stride=2)].astype(jnp.float32)
        xo = x_ref[xb, pl.ds(1, p, stride=2)].astype(jnp.float32)
        part = jnp.sum(hi * xe[None] + lo * xo[None], axis=2)           # [bn, chunk]
        new.append(acc[i] + jnp.sum(part * a, axis=1))
      return tuple(new)
    scaled = lambda v: (v * a[:, :, None]).astype(cdtype)
    return acc + dots(b0, scaled(hi), scaled(lo))

  def dots(b0, whi, wlo):
    """x times the step's scaled high/low-nibble tiles [bn, chunk, P] (cdtype), blocks b0..:
    [bn, Mp] (w_lhs) or [Mp, bn]."""
    dot = lambda u, v: jax.lax.dot_general(*((u, v) if w_lhs else (v, u)), dims,
                                           preferred_element_type=jnp.float32)
    if interleave:   # [bn, chunk, P, 2] -> W's columns b0 * 2P .. in order
      wt = jnp.stack([whi, wlo], axis=-1)
      return dot(wt.reshape(bn, 2 * width), x_ref[:, pl.ds(b0 * 2 * p, 2 * width)])
    if x_split:
      xe, xo = xe_ref[:, pl.ds(b0 * p, width)], xo_ref[:, pl.ds(b0 * p, width)]
    else:
      xe = x_ref[:, pl.ds(b0 * 2 * p, width, stride=2)]
      xo = x_ref[:, pl.ds(b0 * 2 * p + 1, width, stride=2)]
    return dot(whi.reshape(bn, width), xe) + dot(wlo.reshape(bn, width), xo)

  def loop(acc):
    if prefetch:   # the next step's loads are issued before this step's math: latency hidden
      def body(t, carry):
        acc, c, a_raw = carry
        nxt = tile(jnp.minimum(t + 1, steps - 1))
        return (compute(t, acc, c, a_raw),) + nxt
      return jax.lax.fori_loop(0, steps, body, (acc,) + tile(0))[0]

    def body(t, acc):
      for u in range(unroll):
        acc = compute(t * unroll + u, acc, *tile(t * unroll + u))
      return acc
    return jax.lax.fori_loop(0, steps // unroll, body, acc)

  rows = pl.ds(r0, bn)
  if gemv and gemv_fma:
    acc = loop((jnp.zeros((bn, chunk, p), jnp.float32),))
    o_ref[s, 0, rows] = jnp.sum(acc[0], axis=(1, 2)).astype(o_ref.dtype)
  elif gemv:
    acc = loop(tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m)))
    for i in range(m):
      o_ref[s, i, rows] = acc[i].astype(o_ref.dtype)
  elif w_lhs:   # acc is y.T's tile: stored transposed
    acc = loop(jnp.zeros((bn, o_ref.shape[1]), jnp.float32))
    o_ref[s, :, rows] = acc.T.astype(o_ref.dtype)
  else:
    acc = loop(jnp.zeros((o_ref.shape[1], bn), jnp.float32))
    o_ref[s, :, rows] = acc.astype(o_ref.dtype)


GEMV_MAX_M = 16     # the CUDA-core body keeps one accumulator per row of x


def _fwd_split(n: int, row_tiles: int, steps: int, plan: Plan) -> int:
  """The fused forward's K split: plan.split, else until about plan.fwd_programs programs
  (plan.narrow_programs for weights of N <= NARROW_N rows); divides the loop's steps."""
  programs = plan.narrow_programs if plan.narrow_programs and n <= NARROW_N else plan.fwd_programs
  return _split_for(row_tiles, steps, plan.split, programs)


def _fused_fwd(x2, w: NF4, plan: Plan):
  _check_kernel_blocksize(w)
  m, k = x2.shape
  n = w.shape[0]
  p = w.blocksize // 2
  nb = k // w.blocksize
  gemv = plan.gemv and m <= GEMV_MAX_M
  bn = min(plan.bn, max(16 if not gemv else 1, _common.next_pow2(n)))
  n_pad = -(-n // bn) * bn
  chunk = _pow2_divisor(nb, plan.chunk)   # [bn, chunk, P] tiles: K = 192 (B = 3) gives 1
  codes, sc = _prepared(w, n_pad)
  codes = codes.reshape(n_pad, nb, p)
  interleave = plan.interleave and not gemv
  x_split = plan.x_split and not gemv and not interleave
  w_lhs = plan.w_lhs and not gemv
  decode = _kernel_decode(plan.decode, x2.dtype, gemv, interleave)
  if gemv:
    mp = m
    xs = (x2.reshape(m * nb, 2 * p),)
  else:
    mp = max(16, _common.next_pow2(m))
    xp = _pad_rows(x2, mp)
    xs = (xp[:, 0::2], xp[:, 1::2]) if x_split else (xp,)
  split = _fwd_split(n, n_pad // bn, nb // chunk, plan)
  steps = nb // chunk // split
  unroll = _largest_divisor(steps, plan.unroll)
  kernel = functools.partial(_fused_fwd_kernel, bn=bn, chunk=chunk, p=p, nb=nb, steps=steps,
                             unroll=unroll, dq=w.double_quant, decode=decode,
                             cdtype=x2.dtype, gemv=gemv, m=m, x_split=x_split,
                             prefetch=plan.prefetch, w_lhs=w_lhs,
                             gemv_fma=plan.gemv_fma and gemv and m == 1, interleave=interleave)
  # one K split: the program writes y in x's dtype; else f32 partials that XLA sums
  out_dtype = x2.dtype if split == 1 else jnp.float32
  part = _call(kernel, jax.ShapeDtypeStruct((split, mp, n_pad), out_dtype),
               (n_pad // bn, split), plan, "nf4_matmul_fused_fwd")(*xs, codes, *sc,
                                                                    _tables(decode))
  y = part[0] if split == 1 else part.sum(0)
  return y[:m, :n].astype(x2.dtype)


def _fused_bwd_kernel(dy_ref, codes_ref, *refs, bn, p, nb, rows_per_prog, dq, decode, cdtype,
                      gemv, row_acc):
  """dx's even/odd columns of quantization block b (program_id 0), looping over this program's
  rows of W: tensor-core dots, or (gemv, M == 1) CUDA-core multiplies and column sums (row_acc:
  elementwise into [bn, P] accumulators, summed over the rows once at the end)."""
  *sc, lut_ref, oe_ref, oo_ref = refs
  b = pl.program_id(0)
  s = pl.program_id(1)
  cols = pl.ds(b * p, p)
  mp = dy_ref.shape[0]

  def step(t, carry):
    acc_e, acc_o = carry
    r0 = s * rows_per_prog + t * bn
    c = codes_ref[pl.ds(r0, bn), cols]
    a = _scales(sc, r0, bn, b, 1, nb, dq)                                # [bn, 1]
    if decode == "prmt_bf16":   # tensor-core body only: both tiles scaled, in bf16, from the PTX
      whi, wlo = _decode_prmt_bf16(c, a)
    else:
      hi, lo = _decode(c, lut_ref, decode)
      if gemv:
        g = dy_ref[0, pl.ds(r0, bn)].astype(jnp.float32)
        ga = g[:, None] * a
        if row_acc:
          return acc_e + hi * ga, acc_o + lo * ga
        return acc_e + jnp.sum(hi * ga, axis=0), acc_o + jnp.sum(lo * ga, axis=0)
      whi, wlo = (hi * a).astype(cdtype), (lo * a).astype(cdtype)
    g = dy_ref[:, pl.ds(r0, bn)]
    return (acc_e + jnp.dot(g, whi, preferred_element_type=jnp.float32),
            acc_o + jnp.dot(g, wlo, preferred_element_type=jnp.float32))

  zeros = jnp.zeros(((bn, p) if row_acc else (p,)) if gemv else (mp, p), jnp.float32)
  acc_e, acc_o = jax.lax.fori_loop(0, rows_per_prog // bn, step, (zeros, zeros))
  if gemv and row_acc:
    acc_e, acc_o = jnp.sum(acc_e, axis=0), jnp.sum(acc_o, axis=0)
  if gemv:
    oe_ref[s, 0, cols] = acc_e
    oo_ref[s, 0, cols] = acc_o
  else:
    oe_ref[s, :, cols] = acc_e
    oo_ref[s, :, cols] = acc_o


def _fused_bwd(dy2, w: NF4, plan: Plan):
  _check_kernel_blocksize(w)
  m, n = dy2.shape
  k = w.shape[1]
  p = w.blocksize // 2
  nb = k // w.blocksize
  gemv = (plan.gemv if plan.bwd_gemv is None else plan.bwd_gemv) and m == 1
  mp = 1 if gemv else max(16, _common.next_pow2(m))
  bn = min(plan.bwd_bn, max(16, _common.next_pow2(n)))
  n_pad = -(-n // bn) * bn
  split = _split_for(nb, n_pad // bn, plan.split)
  codes, sc = _prepared(w, n_pad)
  decode = _kernel_decode(plan.bwd_decode or plan.decode, dy2.dtype, gemv)
  plan = dataclasses.replace(plan, num_warps=plan.bwd_num_warps or plan.num_warps)
  kernel = functools.partial(_fused_bwd_kernel, bn=bn, p=p, nb=nb, rows_per_prog=n_pad // split,
                             dq=w.double_quant, decode=decode, cdtype=dy2.dtype, gemv=gemv,
                             row_acc=gemv and plan.bwd_row_acc)
  g = jnp.pad(dy2, ((0, mp - m), (0, n_pad - n)))
  shape = jax.ShapeDtypeStruct((split, mp, k // 2), jnp.float32)
  oe, oo = _call(kernel, (shape, shape), (nb, split), plan, "nf4_matmul_fused_bwd")(
      g, codes, *sc, _tables(decode))
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
  if plan.fwd == "mgpu":
    from pallas_kernels import nf4_mgpu
    return nf4_mgpu.nf4_matmul_mgpu(x2, w, plan.mgpu)
  if plan.fwd == "fused":
    return _fused_fwd(x2, w, plan)
  wd = _dense(w, x2.dtype, plan.fwd, plan)
  return _dot(x2, wd.T)


# Session 15: where the forward decodes W to HBM by nf4_mgpu (plan.mgpu.dequant), the backward's
# dx = dy @ W takes the same decode instead of the Pallas dequant kernel (session 13 timed that
# decode alone: 7-18% less time on the weights of >= 2^25 elements, run s13_r5). Run s15_r7 (H100,
# bench/diag/s15_bwd_dequant.py, 3 interleaved rounds), fwd+bwd at M=2048 against the bf16 dot's:
# 8B gate/up 1.234 vs 1.240, 70B gate/up 1.227 vs 1.300, 8B down 1.200 vs 1.284; dx within
# 3.4e-3-4.7e-3 of max |dx| (2.2e-3-3.4e-3 with the Pallas kernel: one more bf16 rounding, as in
# the forward). False: the bucket's backward.
MGPU_DEQUANT_BWD = True


def _backward(dy2, w: NF4, plan: Plan):
  if plan.bwd == "fused":
    return _fused_bwd(dy2, w, plan)
  if MGPU_DEQUANT_BWD and plan.fwd == "mgpu" and plan.mgpu.dequant:
    from pallas_kernels import nf4_mgpu
    return _dot(dy2, nf4_mgpu.nf4_dequantize_mgpu(w, plan.mgpu))
  wd = _dense(w, dy2.dtype, plan.bwd, dataclasses.replace(plan, decode=plan.bwd_decode or
                                                            plan.decode))
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
    plan = _dispatch_plan(m, w, implementation, x.dtype)
  if "fused" in (plan.fwd, plan.bwd) and m > FUSED_MAX_M:
    plan = dataclasses.replace(plan, fwd=plan.fwd.replace("fused", "dequant"),
                               bwd=plan.bwd.replace("fused", "dequant"))
  y = _matmul2d(x.reshape(m, k), w, plan)
  return y.reshape(lead + (n,))
