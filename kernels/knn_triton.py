"""Triton k-NN: a fused "score tile + running top-k" kernel, exact in fp32, plus provably exact fp16/bf16/tf32 passes.

:func:`knn_triton` is the Triton counterpart of ``knn._knn_torch``: same arguments, same result
``(scores [Q, k] fp32, index [Q, k] int64)`` in the total order ``(-score, index)`` (ties -> smaller key index).
It is imported lazily by :func:`.knn.knn` through :mod:`._dispatch`, so the package imports without Triton.

Kernel
======
Grid: one program per block of ``BLOCK_Q`` queries.  Each program walks the key bank in tiles of ``BLOCK_N`` keys;
per tile it computes the ``[BLOCK_Q, BLOCK_N]`` score tile with ``tl.dot`` (a loop over ``BLOCK_D`` slices of the
dimension, so D = 2048 needs no large register tile) and folds it into a running top-k that lives in registers:
``K_PAD`` slots per row (``K_PAD`` = next power of two >= the slots asked for; the slots beyond it are inert +inf
padding).  The ``Q x N`` score matrix never exists in memory; the kernel writes ``[Q, slots]`` scores and indices.

Top-k method: a replace-the-worst buffer instead of a sort.  Per row, ``theta`` = the worst score held.  For each
tile::

    m = rowmax(tile)                                  # 1 op / element, done for every tile
    while any row has m > theta:                      # uniform branch; most tiles skip it entirely
        j = smallest column with tile == m            # per-row argmax, ties -> smaller key index
        rows with m > theta: replace their worst slot by (m, j)
        theta = min(buffer); tile[:, j] = -inf; m = rowmax(tile)

Why this is right (ties included): keys are visited in increasing index order (tiles in order, and inside a tile
the extraction order is (-score, index)), so every candidate has a larger index than everything already in the
buffer.  Under the order (-score, index) a candidate therefore beats the worst held entry iff its score is
*strictly* greater -- an fp32 compare, no packed 64-bit keys needed.  The worst entry is the smallest score and,
among equal smallest scores, the largest index (unique: indices are distinct, empty slots carry distinct negative
indices).  At most ``slots`` replacements per row per tile, so the loop is bounded.  Elements removed from the tile
without being inserted were <= theta, and theta never decreases, so they could never be inserted later.

Why not sort: a bitonic ``tl.sort`` of every tile costs ~log2(BLOCK_N)^2/2 compare-swaps of 64-bit keys per score
(~30 x the tile-max test), and with 64-128 query rows per program some row improves in a large fraction of tiles
(a row's top-k changes ~k*ln(N/k) times), so "sort when anything improves" would dominate the matmul.  The
replace-the-worst loop costs ~6 ops per score per *inserted element* and nothing extra for tiles that do not
improve any row.  (``tl.sort``/``tl.topk`` are not used at all, so their semantics across Triton versions and in the
interpreter do not matter; everything here exists in Triton 3.6.)

Across key chunks (launches) the running k-th score of every row is passed in (``init``): a launch only keeps
candidates strictly better than it (later chunks have larger indices, so an equal score loses), which keeps later
chunks as cheap as the tail of one big launch.  Chunk results are merged on the host with a canonical sort.

Exactness
=========
``precision="fp32"`` (default): the dot runs with ``input_precision="ieee"`` (true fp32 FMA, no TF32; the argument
has this name and value in Triton 3.6 and 3.8) on fp32 copies of the rows (cosine: normalised exactly like the
torch path, zero rows stay zero).  The result equals :func:`.knn.knn_reference` up to fp32 summation order: same
indices wherever scores are not within a few ulps of each other, scores within ~1e-6; exact ties (duplicate rows,
integer data) are resolved to the smaller index exactly as the reference does.

Fast path (``precision="fp16"``, ``"bf16"`` or ``"tf32"``):

1. the same kernel on fp16/bf16 copies (or fp32 with ``input_precision="tf32"``) keeps ``K' > k`` candidates per
   row (default :func:`default_candidates`: ``next_pow2(1.5 k)``, ``next_pow2(3 k)`` for bf16; at least 16, and
   at least 64 from D = 1024 on);
2. the candidates' fp32 scores are recomputed on the host side (torch gather + elementwise dot, never TF32) and
   sorted by (-score, index);
3. each row is proven complete or not (below); unproven rows get a second pass with ``4 K'`` candidates, and what
   is still unproven is recomputed by the exact fp32 kernel.  The answer is exact whatever the data.

The bound.  Let ``q, x`` be the fp32 rows the exact path uses (cosine: normalised, ``||q||, ||x|| <= 1 + eta``,
``eta = (D+4) 2^-23`` covers the fp32 normalisation) and ``q^, x^`` their roundings to the pass-1 format:
``|q^_i - q_i| <= u |q_i| + a`` with unit roundoff ``u`` and ``a`` = half the subnormal spacing: fp16 ``u = 2^-11,
a = 2^-25``; bf16 ``u = 2^-8, a = 2^-134`` (torch rounds to nearest even); tf32 ``u = 2^-10, a = 2^-134`` (a full
ulp: the tensor cores may truncate).  Then

* rounding:     ``|sum q^_i x^_i - sum q_i x_i| <= (2u + u^2) sum|q_i x_i| + a (1+u) (||q||_1 + ||x||_1) + D a^2``;
* accumulation: products of fp16/bf16/tf32 values are exact in fp32; tensor-core fp32 accumulation may truncate,
  so ``|A - sum q^_i x^_i| <= g_acc sum|q^_i x^_i|`` with ``g_acc = 2 (D+2) 2^-23`` (twice the usual gamma_D,
  whatever the summation order);
* re-rank:      the fp32 score ``S`` computed on the host has ``|S - sum q_i x_i| <= g_ref sum|q_i x_i|``,
  ``g_ref = 2 (D+2) 2^-24``;
* preparation:  the kernel's and the re-rank's normalised copies of a row are computed separately and may differ
  by the rounding of the fp32 norm, ``(D+2) 2^-24`` relative per side: ``g_prep = 2 (D+2) 2^-24`` (0 for ip);
* hardware assumption: fp32 MMA accumulation loses at most 2^-22 per addition (truncating fp32 adders, as
  measured for fp16/bf16/tf32 tensor cores up to Hopper; NOT true of fp8 MMA, which is not used);
* Cauchy-Schwarz: ``sum|q_i x_i| <= ||q|| ||x||`` (<= 1 for unit vectors) and ``||v||_1 <= sqrt(D) ||v||``.

Hence ``|A_j - S_j| <= E = (2u + u^2 + (1+u)^2 g_acc + g_ref + g_prep) ||q|| ||x_j|| + a (1+u)(1+g_acc) sqrt(D)
(||q|| + ||x_j||) + D a^2 (1+g_acc) + 4 D 2^-149`` (the last term: fp32 underflow).  For cosine ``E ~= 2u``:
fp16 0.0010 / 0.0017, tf32 0.0020 / 0.0027, bf16 0.0079 / 0.0086 at D = 128 / 2048.  For ``metric="ip"`` the
same formula uses the real norms, ``||q||`` per query and ``max_j ||x_j||`` over the bank (banks whose norms vary a
lot get a loose bound and more fallback rows, never a wrong answer; fp16 overflow, |x| > 65504, gives non-finite
scores and therefore the fallback).

The rule.  The K' candidates are the top-K' by approximate score; let ``A'`` be the K'-th (smallest) of them and
``T`` the k-th best *exact* score among the candidates (a lower bound on the true k-th score).  Every non-candidate
``j`` has ``A_j <= A'``, hence ``S_j <= A' + E``.  If ``A' + E < T`` (strict, in float64) no non-candidate can
reach the top-k -- not even by a tie, which would need ``S_j = T`` -- so the exact top-k of the candidates is the
exact top-k.  Since ``T >= a_k - E`` (``a_k`` = approximate k-th score) this is implied by the simpler rule
"threshold = a_k - 2E; the row is complete when the K'-th candidate is below it", and is never weaker.  Rows that
fail (more near-ties inside the margin than K', e.g. hundreds of near-duplicate keys), rows with non-finite values
and zero query rows take the next pass.  ``K' >= N`` makes every row complete.

Which format: the margin ``2E`` must hold fewer than ``K' - k`` keys.  Measured on CPU with N = 200k (D = 128) /
40k (D = 2048), k = 21, unit vectors (random Gaussian and a clustered mixture), fraction of rows proven complete
with K' = 32 / 64 / 128: fp16 1.0 / 1.0 / 1.0 (D = 128) and 0.2-0.3 / 1.0 / 1.0 (D = 2048); bf16 0.02-0.15 / 1.0 /
1.0 (D = 128) and 0 / 0 / 0-1.0 (D = 2048).  So fp16 is the fast mode to use (same tensor-core speed as bf16,
8x tighter margin); bf16 is fine at D = 128 but at D = 2048 most rows would need the second pass or the fallback.

Memory plan (one 80 GB H100; ``k = 21``; ImageNet-1k N = 1,281,167, ImageNet-21k N = 14,197,122; Q = N)
=========================================================================================================
Bank bytes (N x D); "16-bit" is the fp16/bf16 copy the fast path makes:

=============  ==========  ============  ===========  =============
N              D=128 fp32  D=128 16-bit  D=2048 fp32  D=2048 16-bit
=============  ==========  ============  ===========  =============
1.28M          0.66 GB     0.33 GB       10.5 GB      5.2 GB
14.2M          7.3 GB      3.6 GB        116 GB       58 GB
=============  ==========  ============  ===========  =============

Output ``[Q, k]`` fp32 + int64 = 252 B per query: 0.32 GB (1.28M), 3.6 GB (14.2M).  Fast-path candidates exist
only per query chunk (K' = 32: 384 B per query, i.e. 1 GB for a 2.6M-query chunk); the re-rank gathers
``rows x K' x D`` fp32 in slices of <= 256 MB.

Per program (on chip; sizes checked by compiling for sm_90a with Triton 3.8 and ``ptxas -v``): exact path
``BLOCK_Q = BLOCK_N = 64``, ``BLOCK_D = 16``: fp32 operand tiles 2 x 4 KB per pipeline stage (16 KB of shared
memory allocated), the ``64 x 64`` score tile and the ``64 x K_PAD`` buffer (fp32 score + int32 index:
16 KB at K_PAD = 32) in registers.  fp16/bf16 fast path with K_PAD <= 32 (k = 21 in fp16): ``128 x 128`` score tile,
``BLOCK_D = 64``: operand tiles 16 + 16 KB per stage (96 KB shared memory, wgmma), score tile 64 KB and buffer
32 KB of registers over 8 warps (217 registers / thread with D = 128 compiled as a constant, 241 with a runtime D;
no spills); with K_PAD = 64 ``BLOCK_Q = 64`` (72 KB shared, 167 registers at D = 2048).  D is zero-padded to a
multiple of 16 in the prepared copies (D = 100 -> 112: 189 registers, no spills; unpadded it used all 255 and
spilled 224 bytes), and up to ``MAX_CONST_DIM`` it is a compile-time constant whose slices ``BLOCK_D`` divide it
(no D masks, constant strides, the D loop still pipelined).  ``python -m benchmarks.kernel_resources`` prints these
numbers.  Nothing on chip scales with N or D.

Chunking: the prepared copies (fp32 or 16-bit, normalised for cosine) are made per key chunk of at most 8 GiB on
CUDA (256 MiB on CPU), and per query chunk likewise; a bank that is one chunk is prepared once.  Launches after
the first start from the running threshold, so chunking costs little extra.  Then:

* 1.28M x 128 and 1.28M x 2048: everything fits one GPU (2048: 10.5 GB fp32 input + a 5.2 GB 16-bit copy).
* 14.2M x 128: fits (7.3 GB input + 3.6 GB 16-bit copy; queries in chunks).
* 14.2M x 2048: the fp32 bank alone (116 GB) does not fit one GPU: shard the keys over ranks with
  :func:`.knn.knn_sharded` (8 GPUs: 14.5 GB fp32 slice + 7.3 GB 16-bit copy per rank; every rank searches all
  queries, in query chunks, against its slice; one all-gather of ``[Q, k]`` candidates).  With fewer GPUs, call
  this per key chunk moved to the GPU and merge the ``[Q, k]`` results with ``knn._merge_topk`` (chunks in index
  order), so the bank never has to be resident at once.

Expected speed (H100; NOT measured -- no GPU in this session): the fp16 pass is a tensor-core GEMM
(2 Q N D = 4.2e14 flop at N = 1.28M, D = 128; ~0.45 s at 900 TFLOP/s) plus an epilogue of ~1 op per score when no
row improves and ~6 ops per score per insertion round; the kernel holds 217 registers / thread, so one program
per SM and no overlap between programs' epilogues and MMAs: expect ~0.7-1.5 s at D = 128 (target <= 1.0 s) and
~9-13 s at D = 2048 (target <= 12 s, GEMM-bound), plus the re-rank, which is memory-bound (gather + normalise
+ dot of Q K' D fp32 values: 21 GB at D = 128, ~0.03 s; 335 GB at D = 2048, ~0.3-0.5 s).  The exact fp32
path is bound by fp32 FMA throughput (~60 TFLOP/s): >= 7 s at D = 128, >= 110 s at D = 2048.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .knn import _canonical_order, _check_inputs, _check_k, _knn_torch, _prepare

__all__ = ["knn_triton", "knn_triton_stats", "PRECISIONS", "error_bound", "default_candidates"]

PRECISIONS = ("fp32", "fp16", "bf16", "tf32")
# Largest buffer the kernel keeps per row (registers: BLOCK_Q x K_PAD x 8 bytes); larger k uses the torch path.
MAX_K_PAD = 1024
_INT64_MAX = torch.iinfo(torch.int64).max
_RERANK_BYTES = 1 << 28  # gathered fp32 rows per re-rank slice
# Prepared copies have D padded to a multiple of this (16 elements: 32-byte fp16 / 64-byte fp32 rows).
D_ALIGN = 16
# Largest (padded) D compiled as a constant (unrolled D loop, no masks); larger D loops over a runtime bound.
MAX_CONST_DIM = 256
# Precisions whose kernel loads the query tile once per program (power-of-two D <= 128: one slice).  Off until
# timed on a GPU: compiled for sm_90a (Triton 3.8) fp16 D=128 then needs 190 registers instead of 217 and no
# L2 re-reads of the query tile, but its key loads are no longer software-pipelined (64 KB of shared memory, one
# stage: the key loop holds the insertion while-loop, which Triton's pipeliner skips), where the default pipelines
# the D loop over 3 stages (96 KB).  benchmarks/gpu_check.py times both.
Q_ONCE = {"fp16": False, "bf16": False, "tf32": False, "fp32": False}


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #
@triton.jit
def _knn_kernel(q_ptr, k_ptr, init_ptr, out_s_ptr, out_i_ptr,
                n_q, n_k, dim, n_slots,
                stride_q, stride_k, stride_o,
                HAS_INIT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
                DIM: tl.constexpr, Q_ONCE: tl.constexpr):
    """``DIM`` > 0: the (padded, row-contiguous) dimension as a compile-time constant, a multiple of ``BLOCK_D``:
    the D loop is unrolled without masks and the row strides are constants.  ``Q_ONCE`` (needs ``BLOCK_D == DIM``):
    the query tile is loaded once per program instead of once per key tile.  ``DIM == 0``: runtime ``dim``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < n_q
    rows64 = rows.to(tl.int64)  # Q * D can exceed 2**31 (1.28M x 2048)
    slots = tl.arange(0, K_PAD)
    d_offs = tl.arange(0, BLOCK_D)
    n_offs = tl.arange(0, BLOCK_N)

    # Running top-k: real slots start empty (score = the row's entry threshold, -inf without one; distinct negative
    # indices so exactly one slot is "the worst"); padding slots hold +inf and are never the worst.
    if HAS_INIT:
        start = tl.load(init_ptr + rows64, mask=row_ok, other=float("-inf"))
    else:
        start = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    real = (slots < n_slots)[None, :] & (rows >= 0)[:, None]
    buf_s = tl.where(real, start[:, None], float("inf"))
    buf_i = tl.zeros([BLOCK_Q, K_PAD], tl.int32) - 1 - slots[None, :]
    # theta: the worst score held; +inf for rows past the end so they never take the insertion loop.
    theta = tl.where(row_ok, start, float("inf"))

    if Q_ONCE:
        q_all = tl.load(q_ptr + rows64[:, None] * DIM + d_offs[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q_all = q_all.to(tl.float32)
    for n0 in range(0, n_k, BLOCK_N):
        cols = n0 + n_offs
        col_ok = cols < n_k
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
        if Q_ONCE:
            x = tl.load(k_ptr + cols64[None, :] * DIM + d_offs[:, None], mask=col_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            acc = tl.dot(q_all, x, acc, input_precision=INPUT_PRECISION)
        elif DIM > 0:
            # Constant trip count and strides, no D mask (BLOCK_D divides DIM); still a loop, so it is pipelined.
            for d0 in range(0, DIM, BLOCK_D):
                q = tl.load(q_ptr + rows64[:, None] * DIM + (d0 + d_offs)[None, :], mask=row_ok[:, None], other=0.0)
                x = tl.load(k_ptr + cols64[None, :] * DIM + (d0 + d_offs)[:, None], mask=col_ok[None, :],
                            other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    x = x.to(tl.float32)
                acc = tl.dot(q, x, acc, input_precision=INPUT_PRECISION)
        else:
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + d_offs
                d_ok = d < dim
                q = tl.load(q_ptr + rows64[:, None] * stride_q + d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                # [BLOCK_D, BLOCK_N]: the key tile loaded transposed, so the dot is q @ keys^T.
                x = tl.load(k_ptr + cols64[None, :] * stride_k + d[:, None],
                            mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    # Triton's interpreter multiplies the raw bits of bf16 dot operands; bf16 -> fp32 is exact and a
                    # bf16 x bf16 product is exact in fp32, so this computes the same numbers as a bf16 tensor-core
                    # dot.
                    q = q.to(tl.float32)
                    x = x.to(tl.float32)
                acc = tl.dot(q, x, acc, input_precision=INPUT_PRECISION)
        # Keys past the end score -inf; "+ 0.0" also turns a -0.0 score into +0.0.
        s = acc + tl.where(col_ok, 0.0, float("-inf"))[None, :]

        m = tl.max(s, axis=1)
        go = tl.max((m > theta).to(tl.int32), axis=0)
        while go > 0:
            upd = m > theta
            j = tl.min(tl.where(s == m[:, None], cols[None, :], 2147483647), axis=1)
            worst_i = tl.max(tl.where(buf_s == theta[:, None], buf_i, -2147483647), axis=1)
            evict = (buf_i == worst_i[:, None]) & upd[:, None]
            buf_s = tl.where(evict, m[:, None], buf_s)
            buf_i = tl.where(evict, j[:, None], buf_i)
            theta = tl.where(row_ok, tl.min(buf_s, axis=1), float("inf"))
            s = tl.where(cols[None, :] == j[:, None], float("-inf"), s)
            m = tl.max(s, axis=1)
            go = tl.max((m > theta).to(tl.int32), axis=0)

    out_off = rows64[:, None] * stride_o + slots[None, :]
    out_mask = row_ok[:, None] & (slots < n_slots)[None, :]
    tl.store(out_s_ptr + out_off, buf_s, mask=out_mask)
    tl.store(out_i_ptr + out_off, buf_i, mask=out_mask)


# --------------------------------------------------------------------------- #
# Launch
# --------------------------------------------------------------------------- #
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _config(on_cuda: bool, precision: str, dim: int, k_pad: int) -> dict:
    """Tile shapes and launch options.

    GPU numbers were checked by compiling for sm_90a (Triton 3.8, ``ptxas -v``; no GPU was available to time them):
    all pipeline the D loop with ``num_stages=3`` when D is a multiple of 16 (Triton specialises that; otherwise the
    loads cannot be vectorised into async copies) and none spills more than a few bytes (k <= 512).  Registers are
    the constraint: the score tile, the loads in flight and the ``BLOCK_Q x K_PAD`` buffer share one file, hence
    the smaller ``BLOCK_Q`` for large ``K_PAD``.  The interpreter prefers few, large numpy ops.
    """
    small_d = max(16, _next_pow2(dim))
    if not on_cuda:
        return dict(BLOCK_Q=64, BLOCK_N=128, BLOCK_D=min(128, small_d), num_warps=4, num_stages=1)
    block_q = 64 if k_pad <= 64 else max(16, 4096 // k_pad)
    if precision in ("bf16", "fp16"):
        # 128 x 128 wgmma tiles, 96 KB of shared memory, 217 registers / thread at K_PAD <= 32 and D = 128.
        return dict(BLOCK_Q=128 if k_pad <= 32 else block_q, BLOCK_N=128, BLOCK_D=min(64, small_d),
                    num_warps=8, num_stages=3)
    if precision == "tf32":
        if k_pad <= 32:
            return dict(BLOCK_Q=128, BLOCK_N=64, BLOCK_D=min(16, small_d), num_warps=8, num_stages=3)
        return dict(BLOCK_Q=block_q, BLOCK_N=128, BLOCK_D=min(32, small_d), num_warps=8, num_stages=3)
    # fp32 "ieee": FMA, not tensor cores; a thin D slice keeps the operand registers of the FMA dot small.
    return dict(BLOCK_Q=block_q, BLOCK_N=64, BLOCK_D=16, num_warps=8, num_stages=3)


def _launch(q: Tensor, x: Tensor, slots: int, precision: str, init: Tensor | None,
            on_cuda: bool | None = None) -> tuple[Tensor, Tensor]:
    """Unsorted top-``slots`` of ``q @ x.T`` per row: (scores fp32, local index int32; negative = empty slot).

    ``q`` and ``x`` must be row-contiguous (unit stride along D: vectorised, pipelined loads).  ``on_cuda``
    overrides which tile configuration is used (``benchmarks/kernel_resources.py`` compiles the CUDA one from
    meta tensors on a machine without a GPU)."""
    assert q.stride(1) == 1 and x.stride(1) == 1
    n_q, dim = q.shape
    n_k = x.shape[0]
    k_pad = max(16, _next_pow2(slots))
    cfg = _config(q.is_cuda if on_cuda is None else on_cuda, precision, dim, k_pad)
    out_s = torch.empty((n_q, slots), dtype=torch.float32, device=q.device)
    out_i = torch.empty((n_q, slots), dtype=torch.int32, device=q.device)
    if n_q == 0:
        return out_s, out_i
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    # Constant D (<= MAX_CONST_DIM, row-contiguous): unrolled D loop without masks; the slice must divide D.
    const_dim = dim if (dim <= MAX_CONST_DIM and q.stride(0) == dim and x.stride(0) == dim) else 0
    if const_dim:
        cfg["BLOCK_D"] = min(cfg["BLOCK_D"], dim & -dim)
    q_once = bool(const_dim) and Q_ONCE.get(precision, False) and dim <= 128 and dim & (dim - 1) == 0
    if q_once:
        cfg["BLOCK_D"] = dim  # one slice: the whole query tile, loaded before the key loop
    grid = (triton.cdiv(n_q, cfg["BLOCK_Q"]),)
    _knn_kernel[grid](
        q, x, init if init is not None else out_s, out_s, out_i,
        n_q, n_k, dim, slots,
        q.stride(0), x.stride(0), out_s.stride(0),
        HAS_INIT=init is not None, UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if precision == "tf32" else "ieee",
        K_PAD=k_pad, DIM=const_dim, Q_ONCE=q_once, num_warps=num_warps, num_stages=num_stages, **cfg)
    return out_s, out_i


def _cast(x: Tensor, precision: str) -> Tensor:
    """The kernel's input for ``precision`` (round to nearest even; fp32/tf32 stay fp32, tf32 rounds in the dot),
    row-contiguous, with D zero-padded to a multiple of ``D_ALIGN``: zero columns add exact zeros to every dot
    product, and aligned rows let the loads vectorise and pipeline (D = 100 spilled 224 bytes unpadded)."""
    x = {"bf16": x.bfloat16, "fp16": x.half}.get(precision, lambda: x)()
    pad = -x.shape[1] % D_ALIGN
    if pad:
        return torch.nn.functional.pad(x, (0, pad))
    return x.contiguous()


def _scan(queries: Tensor, keys: Tensor, slots: int, metric: str, precision: str, key_chunk: int,
          prepared_keys: Tensor | None) -> tuple[Tensor, Tensor]:
    """Top-``slots`` of every query over all keys, canonical (-score, index) order, global int64 indices.

    Scores are fp32 (precision="fp32") or approximate (fp16/bf16/tf32 inputs).  Rows that end with an empty slot (only
    possible with -inf/NaN scores) keep score -inf and index INT64_MAX there; callers check.
    """
    n_keys = keys.shape[0]
    q = _cast(_prepare(queries, metric), precision)
    best_s = best_i = None
    for k0 in range(0, n_keys, key_chunk):
        x = prepared_keys if prepared_keys is not None else _cast(_prepare(keys[k0:k0 + key_chunk], metric), precision)
        chunk_slots = min(slots, x.shape[0])
        init = None
        if best_s is not None and best_s.shape[1] == slots:
            # Later chunks only need keys strictly better than the current slots-th best (equal scores lose:
            # their indices are larger).  Rows without a full list yet start from -inf.
            init = torch.where(best_i[:, -1] != _INT64_MAX, best_s[:, -1], float("-inf")).contiguous()
        s, i = _launch(q, x, chunk_slots, precision, init)
        i = i.long()
        empty = i < 0
        s = s.masked_fill(empty, float("-inf"))
        i = (i + k0).masked_fill(empty, _INT64_MAX)
        if best_s is None:
            best_s, best_i = _canonical_order(s, i)
        else:
            best_s, best_i = _canonical_order(torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1))
            best_s, best_i = best_s[:, :slots], best_i[:, :slots]
    return best_s.contiguous(), best_i.contiguous()


def _budget(device: torch.device) -> int:
    """Bytes allowed for one prepared (fp32 / 16-bit, normalised) copy of a query or key chunk."""
    return (8 << 30) if device.type == "cuda" else (256 << 20)


def _chunks(queries: Tensor, keys: Tensor, precision: str, chunk_size: int | None,
            query_chunk_size: int | None) -> tuple[int, int]:
    elem = 2 if precision in ("bf16", "fp16") else 4
    row_bytes = max(1, keys.shape[1] * elem)
    per = max(1, _budget(keys.device) // row_bytes)
    key_chunk = chunk_size or min(keys.shape[0], per)
    query_chunk = query_chunk_size or max(1, min(queries.shape[0], per))
    return key_chunk, query_chunk


# --------------------------------------------------------------------------- #
# Exact path
# --------------------------------------------------------------------------- #
def _exact(queries: Tensor, keys: Tensor, k: int, metric: str, key_chunk: int, query_chunk: int,
           prepared_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    n_q = queries.shape[0]
    out_s = torch.empty((n_q, k), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    if prepared_keys is None and key_chunk >= keys.shape[0]:
        prepared_keys = _cast(_prepare(keys, metric), "fp32")
    for q0 in range(0, n_q, query_chunk):
        s, i = _scan(queries[q0:q0 + query_chunk], keys, k, metric, "fp32", key_chunk, prepared_keys)
        out_s[q0:q0 + query_chunk], out_i[q0:q0 + query_chunk] = s, i
    _fix_nonfinite(queries, keys, k, metric, out_s, out_i)
    return out_s, out_i


def _fix_nonfinite(queries, keys, k, metric, out_s, out_i) -> None:
    """Rows with inf/NaN scores (non-finite or overflowing inputs) are redone by the torch path, in place."""
    bad = ~torch.isfinite(out_s).all(dim=1) | (out_i == _INT64_MAX).any(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero(as_tuple=True)[0]
        s, i = _knn_torch(queries[rows], keys, k, metric, min(keys.shape[0], 8192), 2048)
        out_s[rows], out_i[rows] = s, i


# --------------------------------------------------------------------------- #
# Fast path: low-precision candidates, fp32 re-rank, proof of completeness
# --------------------------------------------------------------------------- #
# Unit roundoff u and absolute rounding error a (half the subnormal spacing) of the candidate pass's input format.
# tf32: the tensor cores may truncate the fp32 inputs instead of rounding, so u is the full spacing 2^-10.
_ROUNDING = {"bf16": (2.0 ** -8, 2.0 ** -134), "fp16": (2.0 ** -11, 2.0 ** -25),
             "tf32": (2.0 ** -10, 2.0 ** -134)}


def error_bound(precision: str, dim: int, q_norm: Tensor, x_norm_max: float) -> Tensor:
    """Float64 bound ``E`` on ``|approximate score - fp32 re-ranked score|`` (derivation in the module docstring).

    ``q_norm``: per-query upper bounds on ``||q||`` (float64); ``x_norm_max``: upper bound on every key norm.
    """
    u, a = _ROUNDING[precision]
    g_acc = 2.0 * (dim + 2) * 2.0 ** -23
    g_ref = 2.0 * (dim + 2) * 2.0 ** -24
    g_prep = 2.0 * (dim + 2) * 2.0 ** -24
    rel = 2.0 * u + u * u + (1.0 + u) ** 2 * g_acc + g_ref + g_prep
    absolute = a * (1.0 + u) * math.sqrt(dim) * (1.0 + g_acc)
    tiny = dim * a * a * (1.0 + g_acc) + 4.0 * dim * 2.0 ** -149
    return rel * q_norm * x_norm_max + absolute * (q_norm + x_norm_max) + tiny


def _norm_bounds(queries: Tensor, keys: Tensor, metric: str, key_chunk: int) -> tuple[Tensor, float]:
    dim = keys.shape[1]
    if metric == "cosine":
        one = 1.0 + (dim + 4) * 2.0 ** -23  # fp32 normalisation leaves norms within eta of 1
        return torch.full((queries.shape[0],), one, dtype=torch.float64, device=queries.device), one
    slack = 1.0 + 2.0 ** -40  # float64 norms of fp32 data: relative error ~D * 2^-53

    def norms(x: Tensor) -> Tensor:  # float64 norms, a chunk at a time (no float64 copy of the whole bank)
        return torch.cat([x[r:r + key_chunk].double().norm(dim=1) for r in range(0, x.shape[0], key_chunk)])

    x_max = float(norms(keys).max()) if keys.shape[0] else 0.0
    return norms(queries) * slack, x_max * slack


def _rerank(queries: Tensor, keys: Tensor, cand: Tensor, metric: str) -> Tensor:
    """fp32 scores of the candidate keys: ``[Q, K']`` (elementwise product + sum: never TF32)."""
    n_q, n_c = cand.shape
    dim = keys.shape[1]
    out = torch.empty((n_q, n_c), dtype=torch.float32, device=queries.device)
    rows = max(1, _RERANK_BYTES // max(1, n_c * dim * 4))
    for r0 in range(0, n_q, rows):
        q = _prepare(queries[r0:r0 + rows], metric)
        idx = cand[r0:r0 + rows]
        x = _prepare(keys[idx.reshape(-1)], metric).view(idx.shape[0], n_c, dim)
        out[r0:r0 + rows] = (x * q.unsqueeze(1)).sum(dim=-1)
    return out


def default_candidates(k: int, precision: str, dim: int = 0) -> int:
    """K' for the first candidate pass: enough for nearly every row on embedding-like data (see the module
    docstring); a row that needs more gets a second pass with 4 K', then the exact kernel.  From D = 1024 on at
    least 64: the error bound grows with D, and at D = 2048 K' = 32 proved only 20-30 % of the rows (K' = 64:
    all of them), so 32 would send most rows through a second pass."""
    factor = 3 if precision == "bf16" else 1.5  # bf16's margin is ~4-8x wider than fp16's / tf32's
    floor = 64 if dim >= 1024 else 16
    return max(floor, _next_pow2(math.ceil(factor * k)))


def _fast(queries: Tensor, keys: Tensor, k: int, metric: str, precision: str, key_chunk: int, query_chunk: int,
          candidates: int | None, exact_chunks: tuple[int, int]) -> tuple[Tensor, Tensor, dict]:
    """Exact top-k via low-precision candidates.  Stats: how many rows each pass proved, and how many were redone
    by the exact fp32 kernel."""
    n_q, n_keys = queries.shape[0], keys.shape[0]
    dim = keys.shape[1]
    first = min(n_keys, MAX_K_PAD, max(k, candidates or default_candidates(k, precision, dim)))
    passes = [first]
    if first < min(n_keys, MAX_K_PAD):
        passes.append(min(n_keys, MAX_K_PAD, 4 * first))
    out_s = torch.empty((n_q, k), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    stats = {"rows": n_q, "candidates": passes, "proved": [], "exact": 0}
    if n_q == 0:
        return out_s, out_i, stats
    q_norm, x_max = _norm_bounds(queries, keys, metric, key_chunk)
    prepared = _cast(_prepare(keys, metric), precision) if key_chunk >= n_keys else None
    todo = torch.arange(n_q, device=queries.device)
    for n_cand in passes:
        left = []
        for c0 in range(0, todo.numel(), query_chunk):
            rows = todo[c0:c0 + query_chunk]
            qs = queries[rows]
            approx, cand = _scan(qs, keys, n_cand, metric, precision, key_chunk, prepared)
            valid = cand != _INT64_MAX
            exact = _rerank(qs, keys, cand.masked_fill(~valid, 0), metric).masked_fill(~valid, float("-inf"))
            s, i = _canonical_order(exact, cand)
            finite = torch.isfinite(approx).all(dim=1) & torch.isfinite(exact).all(dim=1)
            if n_cand >= n_keys:  # every key is a candidate
                complete = finite
            else:
                # A' + E < T: no non-candidate can reach the k-th exact score (module docstring).
                bound = error_bound(precision, dim, q_norm[rows], x_max)
                complete = finite & (approx[:, -1].double() + bound < s[:, k - 1].double())
            done = rows[complete]
            out_s[done], out_i[done] = s[complete, :k], i[complete, :k]
            left.append(rows[~complete])
        todo = torch.cat(left)
        stats["proved"].append(n_q - sum(stats["proved"]) - todo.numel())
        if todo.numel() == 0:
            break
    if todo.numel():
        s, i = _exact(queries[todo], keys, k, metric, *exact_chunks)
        out_s[todo], out_i[todo] = s, i
    stats["exact"] = int(todo.numel())
    return out_s, out_i, stats


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #
@torch.no_grad()
def knn_triton(queries: Tensor, keys: Tensor, k: int, metric: str = "cosine", chunk_size: int | None = None,
               query_chunk_size: int | None = None, precision: str = "fp32",
               candidates: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact k-NN with the Triton kernel: ``(scores [Q, k] fp32, index [Q, k] int64)`` in (-score, index) order.

    Args:
        queries, keys, k, metric: as :func:`.knn.knn`.  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
        chunk_size: keys per kernel launch (default: as many as fit an 8 GiB prepared copy on CUDA).
        query_chunk_size: queries per launch (same default).
        precision: ``"fp32"`` (IEEE fp32 dot), or a fast candidate pass in ``"fp16"`` (recommended: the tightest
            provable margin at tensor-core speed), ``"bf16"`` or ``"tf32"``, followed by an fp32 re-rank and a
            proof of completeness per row (rows it cannot prove are redone in fp32).  All return the exact answer.
        candidates: K' of the first candidate pass (default :func:`default_candidates`).
    """
    return knn_triton_stats(queries, keys, k, metric, chunk_size, query_chunk_size, precision, candidates)[:2]


@torch.no_grad()
def knn_triton_stats(queries, keys, k, metric="cosine", chunk_size=None, query_chunk_size=None, precision="fp32",
                     candidates=None) -> tuple[Tensor, Tensor, dict]:
    """:func:`knn_triton` plus a dict saying how the rows were resolved: ``candidates`` (K' of each fast pass),
    ``proved`` (rows proven complete by each pass) and ``exact`` (rows computed by the fp32 kernel; all of them
    for ``precision="fp32"``)."""
    _check_inputs(queries, keys, metric)
    k = _check_k(k, keys.shape[0])
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, value in (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size),
                        ("candidates", candidates)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    key_chunk, query_chunk = _chunks(queries, keys, precision, chunk_size, query_chunk_size)
    exact_chunks = _chunks(queries, keys, "fp32", chunk_size, query_chunk_size)
    n_q = queries.shape[0]
    if _next_pow2(k) > MAX_K_PAD:
        # The per-row buffer would not fit in registers; the torch path is exact too.
        s, i = _knn_torch(queries, keys, k, metric, min(keys.shape[0], 8192), max(1, (1 << 24) // 8192))
        return s, i, {"rows": n_q, "candidates": [], "proved": [], "exact": 0, "torch": n_q}
    if precision == "fp32":
        s, i = _exact(queries, keys, k, metric, *exact_chunks)
        return s, i, {"rows": n_q, "candidates": [], "proved": [], "exact": n_q}
    return _fast(queries, keys, k, metric, precision, key_chunk, query_chunk, candidates, exact_chunks)


# --------------------------------------------------------------------------- #
# First-use self-check (see _selfcheck.py)
# --------------------------------------------------------------------------- #
def check_key(dim: int, k: int, precision: str) -> tuple:
    """What selects the compiled kernels of a call: precision (operand format, tiles), D and the buffer size."""
    return (precision, int(dim), max(16, _next_pow2(k)))


def self_check(dim: int, k: int, precision: str, device: torch.device) -> str | None:
    """Run a small search of the same specialisation (same D, k and precision, on ``device``) and compare it with
    an exact float64 brute force.  None when identical, else what differed; exceptions propagate.

    The data are small integers (|x| <= 8), exact in fp16/bf16/tf32 with integer dot products exact in fp32, so
    the right answer is unique, tie rule included (integer scores tie often: ties go to the smaller index), and
    must come back bit for bit.  Ties also push rows through the fast path's second pass and the exact fallback,
    so every kernel variant that precision can use is compiled and run here.
    """
    gen = torch.Generator().manual_seed(4321)
    n_keys = max(300, 4 * k + 37)  # several key tiles with a partial last one
    n_queries = 70
    keys = torch.randint(-8, 9, (n_keys, dim), generator=gen).float()
    queries = torch.randint(-8, 9, (n_queries, dim), generator=gen).float()
    queries[3] = keys[5]  # a query that is also a key
    ref = torch.sort(queries.double() @ keys.double().T, dim=1, descending=True, stable=True)
    ref_s, ref_i = ref.values[:, :k].float(), ref.indices[:, :k]
    s, i, _ = knn_triton_stats(queries.to(device), keys.to(device), k, "ip", precision=precision)
    s, i = s.cpu(), i.cpu()
    if not torch.equal(i, ref_i):
        rows = int((i != ref_i).any(dim=1).sum())
        return f"{rows} of {n_queries} rows have other neighbours than the exact brute force"
    if not torch.equal(s, ref_s):
        return f"scores differ from the exact integer scores by up to {float((s - ref_s).abs().max()):.3g}"
    return None
