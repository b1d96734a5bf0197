"""Triton kernels for the per-rank local terms of the SCAN loss (forward and backward).

:func:`local_terms` is the Triton counterpart of ``scan_loss._local_terms_torch``: for logits ``a``, ``n`` of shape
``[H, B, C]`` (fp32 / bf16 / fp16) it returns, in fp32,

* ``consistency_sum[h] = sum_b -log <softmax(a_hb), softmax(n_hb)>``
* ``prob_sum[h, c]     = sum_b softmax(a_hb)[c]``

and is differentiable w.r.t. both inputs.  Everything else in the loss (the optional all-reduce and the entropy
term, which only touch ``[H]`` / ``[H, C]`` tensors) stays in ``scan_loss.py`` and is shared with the torch path.

Numerics: log space throughout.  Per row we form ``lse_a = logsumexp(a)``, ``lse_n = logsumexp(n)`` and
``log_dot = log <p, q> = logsumexp(log p + log q)`` with running-max (online) logsumexps, so logits of any magnitude
(+-1e4 in fp32) give finite, exact results and C is unbounded (chunks of ``BLOCK_C`` columns).  Accumulation is
fp32 whatever the input dtype.  Backward recomputes the probabilities from the logits and per-row fp32 scalars
saved by the forward; no ``[B, C]`` probability tensor is ever stored.  Each logsumexp is saved as its two parts,
the row max ``m`` and ``log s`` (``s = sum exp(x - m)``), i.e. ``6 * H * B`` floats rather than the three sums
``m + log s``: for logits of 1e4 the sum ``m + log s`` is only known to ulp(1e4) = 1e-3 in fp32, and
``exp(a - lse_a)`` would then be off by 0.1 % (measured: prob_sum error 7e-4 instead of 3e-7), whereas
``exp((a - m) - log s)`` is exact to fp32 rounding.  The extra 12 bytes per row are < 1 % of the logits' bytes.

Memory traffic (the kernels are bandwidth-bound on H100):

* ``C <= MAX_FUSED_C`` (one column block holds a whole row): forward reads ``a`` and ``n`` exactly once, backward
  reads them once and writes the two gradients once.
* larger C (overclustering, e.g. 20,000 classes): forward reads ``n`` once and ``a`` twice (a second kernel sums
  the probabilities with the saved row statistics); backward reads ``a`` twice when ``prob_sum`` has a gradient.

Determinism: no atomics.  Each program owns a fixed slice of the batch and writes its fp32 partial sums to its
own slot of a small ``[H, splits, ...]`` buffer; ``torch.sum`` over the ``splits`` axis finishes the reduction.
The split count depends only on the shape (not on the device), so a run is bit-for-bit repeatable.

This module is imported lazily by ``scan_loss.scan_loss`` through ``_dispatch`` so the package imports without
Triton.  It only uses Triton APIs that exist in Triton 3.6 (``tl.load/store/max/sum/exp/log/where``,
``tl.multiple_of``, constexpr branches, ``@triton.jit`` helpers).
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _selfcheck

__all__ = ["MAX_FUSED_C", "local_terms"]

# Largest C handled by the single-pass (fused) kernels: a [BLOCK_B, next_pow2(C)] fp32 tile per tensor must fit in
# registers.  2048 keeps ~16 fp32 values per thread per live tile at 8 warps.
MAX_FUSED_C = 2048
# Column chunk of the multi-pass path (C > MAX_FUSED_C).
CHUNK_C = 1024
# Elements per [BLOCK_B, BLOCK_C] tile: 4096 elements = 8 KiB of bf16 per input per iteration, 16 fp32 values per
# thread at 8 warps.  Enough bytes in flight per SM to saturate HBM with a few resident programs.
TILE_ELEMS = 4096
# Programs per launch aimed at (summed over heads).  H100 has 132 SMs, each holding several of these 4-8 warp
# programs, so ~1024 programs fill the machine in about one wave while keeping the partial-sum buffers small
# (H * splits * C fp32 = 4 MB for the benchmark shapes, ~2-3 % of the input bytes).  A constant, not the SM count,
# so the reduction order -- and therefore the bits -- do not depend on which GPU runs it.
TARGET_PROGRAMS = 1024
# Software-pipelining depth of the streaming loops (``tl.range(..., num_stages=)``, as in Triton's fused-softmax
# tutorial): the next tiles' loads are issued (cp.async into shared memory) while the current tile is reduced, so a
# program keeps bytes in flight during its cross-warp reductions.  3 stages of a 16 KB bf16 tile pair = 32 KB of
# shared memory per program, two programs per SM (register-bound at ~100 registers x 256 threads).  Not tuned on
# hardware yet: measure with benchmarks/bench_scan_loss.py.
NUM_STAGES = 3


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _row_offsets(h, rows, stride_h, stride_b, VEC: tl.constexpr):
    # int64: H * B * C can exceed 2**31 (e.g. B=65536, C=20000, H=10).  The host guarantees both strides are
    # multiples of VEC, so the hint lets the compiler emit 128-bit loads along the contiguous class axis.
    off = h.to(tl.int64) * stride_h + rows.to(tl.int64) * stride_b
    return tl.multiple_of(off, VEC)


# Row statistics saved for backward, one [H, B] fp32 plane each (plane k at stats_ptr + k * H * B):
#   0: m_a = max_c a      1: log s_a = log sum_c exp(a - m_a)         (lse_a = m_a + log s_a)
#   2: m_n = max_c n      3: log s_n = log sum_c exp(n - m_n)         (lse_n = m_n + log s_n)
#   4: m_x = max_c x      5: log s_x = log sum_c exp(x - m_x),  x = (a - m_a) + (n - m_n)
# so log <p, q> = m_x + log s_x - log s_a - log s_n.
N_STATS = 6


@triton.jit
def _store_stats(stats_ptr, idx, HB, rmask, m_a, log_s_a, m_n, log_s_n, m_x, log_s_x):
    tl.store(stats_ptr + idx, m_a, mask=rmask)
    tl.store(stats_ptr + HB + idx, log_s_a, mask=rmask)
    tl.store(stats_ptr + 2 * HB + idx, m_n, mask=rmask)
    tl.store(stats_ptr + 3 * HB + idx, log_s_n, mask=rmask)
    tl.store(stats_ptr + 4 * HB + idx, m_x, mask=rmask)
    tl.store(stats_ptr + 5 * HB + idx, log_s_x, mask=rmask)


@triton.jit
def _fwd_fused_kernel(a_ptr, n_ptr, stats_ptr, part_cs_ptr, part_ps_ptr,
                      B, HB, rows_per_prog, n_splits,
                      a_sh, a_sb, n_sh, n_sb,
                      C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                      VEC_A: tl.constexpr, VEC_N: tl.constexpr, STAGES: tl.constexpr):
    """Single pass for C <= BLOCK_C.  Grid (H, splits); program (h, s) owns rows [s*rows_per_prog, ...).

    C is a constexpr on purpose: the column mask ``cols < C`` must have a known alignment for the loads to be
    vectorised (a runtime C of 1000 would force 16-bit loads).  One compile per class count is cheap: C is fixed
    for a model.
    """
    h = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    row_begin = s * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, B)
    # Per-program accumulators live in registers across the row loop: one cross-warp reduction at the end
    # instead of one per row block.
    acc_ps = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    acc_cs = tl.zeros([BLOCK_B], dtype=tl.float32)
    for r0 in tl.range(row_begin, row_end, BLOCK_B, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < row_end
        # Tail rows re-read the last valid row instead of being masked to -inf: every loaded row is then a real
        # row, nothing computes -inf - (-inf) = NaN, and the results of these rows are simply not stored / summed.
        rows_ld = tl.minimum(rows, row_end - 1)
        a_off = _row_offsets(h, rows_ld, a_sh, a_sb, VEC_A)
        n_off = _row_offsets(h, rows_ld, n_sh, n_sb, VEC_N)
        a = tl.load(a_ptr + a_off[:, None] + cols[None, :], mask=cmask[None, :], other=-float("inf")).to(tl.float32)
        n = tl.load(n_ptr + n_off[:, None] + cols[None, :], mask=cmask[None, :], other=-float("inf")).to(tl.float32)

        m_a = tl.max(a, axis=1)
        sa = a - m_a[:, None]  # <= 0, -inf on padding
        e_a = tl.exp(sa)
        s_a = tl.sum(e_a, axis=1)  # in [1, C]
        m_n = tl.max(n, axis=1)
        sn = n - m_n[:, None]
        s_n = tl.sum(tl.exp(sn), axis=1)
        # log p + log q = (sa + sn) - log s_a - log s_n.  Taking the logsumexp of the *shifted* sum (<= 0) instead
        # of a + n keeps the huge row maxima out of it: no overflow, and for confidently disjoint p, q (logits of
        # 1e4) the result is the exact, large negative number instead of log(0).
        x = sa + sn
        m_x = tl.max(x, axis=1)
        s_x = tl.sum(tl.exp(x - m_x[:, None]), axis=1)
        log_s_a = tl.log(s_a)
        log_s_n = tl.log(s_n)
        log_s_x = tl.log(s_x)
        _store_stats(stats_ptr, h * B + rows, HB, rmask, m_a, log_s_a, m_n, log_s_n, m_x, log_s_x)

        log_dot = m_x + log_s_x - log_s_a - log_s_n
        acc_cs += tl.where(rmask, -log_dot, 0.0)
        p = e_a * (1.0 / s_a)[:, None]
        acc_ps += tl.where(rmask[:, None], p, 0.0)

    slot = h * n_splits + s
    tl.store(part_cs_ptr + slot, tl.sum(acc_cs, axis=0))
    tl.store(part_ps_ptr + slot.to(tl.int64) * C + cols, tl.sum(acc_ps, axis=0), mask=cmask)


@triton.jit
def _fwd_stats_chunked_kernel(a_ptr, n_ptr, stats_ptr, part_cs_ptr,
                              B, HB, rows_per_prog, n_splits,
                              a_sh, a_sb, n_sh, n_sb,
                              C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                              VEC_A: tl.constexpr, VEC_N: tl.constexpr, STAGES: tl.constexpr):
    """Pass 1 for C > MAX_FUSED_C: online (running-max) logsumexps over column chunks.  Grid (H, splits).

    Per row we keep (m_a, s_a), (m_n, s_n) with s = sum exp(x - m), and (m_x, s_x) for the logsumexp of
    ``x = (a - m_a) + (n - m_n)`` taken relative to the *current* maxima, as in the fused kernel.  Summing the
    shifted values rather than ``a + n`` matters for huge logits: ``a + n`` of two 1e4-sized numbers is already
    rounded by ~ulp(2e4) = 2e-3 before any logsumexp.  When a chunk raises m_a or m_n by d_a + d_n, everything
    summed so far is re-expressed relative to the new maxima by lowering m_x by that amount (the ``s`` scale
    factors are handled by the usual exp(m_old - m_new) rescale).  At the first chunk the old maxima are -inf:
    m_x becomes -inf - inf = -inf and s_x * exp(-inf) = 0, never a NaN.
    """
    h = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    row_begin = s * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, B)
    acc_cs = tl.zeros([BLOCK_B], dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < row_end
        rows_ld = tl.minimum(rows, row_end - 1)
        a_off = _row_offsets(h, rows_ld, a_sh, a_sb, VEC_A)
        n_off = _row_offsets(h, rows_ld, n_sh, n_sb, VEC_N)
        m_a = tl.full([BLOCK_B], -float("inf"), tl.float32)
        s_a = tl.zeros([BLOCK_B], dtype=tl.float32)
        m_n = tl.full([BLOCK_B], -float("inf"), tl.float32)
        s_n = tl.zeros([BLOCK_B], dtype=tl.float32)
        m_x = tl.full([BLOCK_B], -float("inf"), tl.float32)
        s_x = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
            cc = c0 + cols
            cm = cc < C
            a = tl.load(a_ptr + a_off[:, None] + cc[None, :], mask=cm[None, :], other=-float("inf")).to(tl.float32)
            n = tl.load(n_ptr + n_off[:, None] + cc[None, :], mask=cm[None, :], other=-float("inf")).to(tl.float32)
            # The first chunk of a row always has a real column, so the maxima are finite after it.
            m_a_new = tl.maximum(m_a, tl.max(a, axis=1))
            m_n_new = tl.maximum(m_n, tl.max(n, axis=1))
            sa = a - m_a_new[:, None]  # -inf on padding
            sn = n - m_n_new[:, None]
            s_a = s_a * tl.exp(m_a - m_a_new) + tl.sum(tl.exp(sa), axis=1)
            s_n = s_n * tl.exp(m_n - m_n_new) + tl.sum(tl.exp(sn), axis=1)
            x = sa + sn
            m_x_old = m_x - ((m_a_new - m_a) + (m_n_new - m_n))
            m_x = tl.maximum(m_x_old, tl.max(x, axis=1))
            s_x = s_x * tl.exp(m_x_old - m_x) + tl.sum(tl.exp(x - m_x[:, None]), axis=1)
            m_a = m_a_new
            m_n = m_n_new
        log_s_a = tl.log(s_a)
        log_s_n = tl.log(s_n)
        log_s_x = tl.log(s_x)
        _store_stats(stats_ptr, h * B + rows, HB, rmask, m_a, log_s_a, m_n, log_s_n, m_x, log_s_x)
        acc_cs += tl.where(rmask, -(m_x + log_s_x - log_s_a - log_s_n), 0.0)
    tl.store(part_cs_ptr + h * n_splits + s, tl.sum(acc_cs, axis=0))


@triton.jit
def _prob_sum_chunked_kernel(a_ptr, stats_ptr, part_ps_ptr,
                             B, HB, rows_per_prog, n_splits,
                             a_sh, a_sb,
                             C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, VEC_A: tl.constexpr,
                             STAGES: tl.constexpr):
    """Pass 2 for C > MAX_FUSED_C: prob partial sums.  Grid (H, cdiv(C, BLOCK_C), splits).

    One program per (head, class block, batch slice) loops over its rows with p = exp((a - m_a) - log s_a) and
    writes one [BLOCK_C] partial row: a [B, C] slice too wide for registers is reduced without atomics.
    """
    h = tl.program_id(0)
    cb = tl.program_id(1)
    s = tl.program_id(2)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row_begin = s * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, B)
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for r0 in tl.range(row_begin, row_end, BLOCK_B, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < row_end
        rows_ld = tl.minimum(rows, row_end - 1)
        a_off = _row_offsets(h, rows_ld, a_sh, a_sb, VEC_A)
        m_a = tl.load(stats_ptr + h * B + rows_ld)
        log_s_a = tl.load(stats_ptr + HB + h * B + rows_ld)
        a = tl.load(a_ptr + a_off[:, None] + cols[None, :], mask=cmask[None, :], other=-float("inf")).to(tl.float32)
        p = tl.exp((a - m_a[:, None]) - log_s_a[:, None])
        acc += tl.where(rmask[:, None], p, 0.0)
    tl.store(part_ps_ptr + (h * n_splits + s).to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=cmask)


# Backward.  Per row b of head h, with p = softmax(a_b), q = softmax(n_b), r = softmax(a_b + n_b) and the
# upstream gradients g_cs = dL/dconsistency_sum[h], g = dL/dprob_sum[h, :]:
#
#   consistency_sum = sum_b (lse(a_b) + lse(n_b) - lse(a_b + n_b))     since <p, q> = exp(lse(a+n) - lse(a) - lse(n))
#   d lse(a_b) / d a_bc = p_bc,  d lse(n_b) / d n_bc = q_bc,  d lse(a_b + n_b) / d a_bc = d .../ d n_bc = r_bc
#   => d consistency_sum / d a_bc = p_bc - r_bc,   d consistency_sum / d n_bc = q_bc - r_bc
#
#   prob_sum_c' = sum_b p_bc',  d p_bc' / d a_bc = p_bc' (delta_cc' - p_bc)          (softmax Jacobian)
#   => sum_c' g_c' d p_bc' / d a_bc = p_bc (g_c - sum_c' p_bc' g_c')                 (prob_sum is independent of n)
#
#   d a_bc = -g_cs (r_bc - p_bc) + p_bc (g_c - sum_c' p_bc' g_c')
#   d n_bc = -g_cs (r_bc - q_bc)
#
# (Checked numerically against torch autograd of the reference in tests/test_scan_loss_triton.py.)
# All three distributions come back from the logits and the saved row statistics in log space, with
# sa = a - m_a, sn = n - m_n (row maxima subtracted first, so these are exact to fp32 rounding for any magnitude):
#   log p = sa - log s_a,   log q = sn - log s_n,
#   log r = log p + log q - log <p, q> = (sa + sn - m_x) - log s_x          (r = p q / <p, q>)
# so nothing overflows or divides by an underflowed <p, q>, whatever the logit magnitude.
@triton.jit
def _bwd_tile(a_ptr, n_ptr, da_ptr, dn_ptr, a_off, n_off, da_off, dn_off, cc, cm, rmask,
              m_a, log_s_a, m_n, log_s_n, m_x, log_s_x, g_cs, g, pg,
              NEED_DA: tl.constexpr, NEED_DN: tl.constexpr, HAS_GCS: tl.constexpr, HAS_GPS: tl.constexpr,
              PG_FROM_TILE: tl.constexpr):
    """Gradients for one [BLOCK_B, BLOCK_C] tile; ``pg`` = sum_c p g per row, or computed here if the tile is the
    whole row (PG_FROM_TILE)."""
    smask = rmask[:, None] & cm[None, :]
    a = tl.load(a_ptr + a_off[:, None] + cc[None, :], mask=cm[None, :], other=-float("inf")).to(tl.float32)
    sa = a - m_a[:, None]
    p = tl.exp(sa - log_s_a[:, None])  # 0 on padding
    if HAS_GCS:
        n = tl.load(n_ptr + n_off[:, None] + cc[None, :], mask=cm[None, :], other=-float("inf")).to(tl.float32)
        sn = n - m_n[:, None]
        r = tl.exp((sa + sn - m_x[:, None]) - log_s_x[:, None])
        if NEED_DN:
            dn = g_cs * (tl.exp(sn - log_s_n[:, None]) - r)
            tl.store(dn_ptr + dn_off[:, None] + cc[None, :], dn.to(dn_ptr.dtype.element_ty), mask=smask)
        if NEED_DA:
            da = g_cs * (p - r)
            if HAS_GPS:
                if PG_FROM_TILE:
                    pg = tl.sum(p * g[None, :], axis=1)
                da += p * (g[None, :] - pg[:, None])
            tl.store(da_ptr + da_off[:, None] + cc[None, :], da.to(da_ptr.dtype.element_ty), mask=smask)
    else:
        # Only prob_sum has a gradient (host guarantees HAS_GPS and NEED_DA here): n is never read.
        if PG_FROM_TILE:
            pg = tl.sum(p * g[None, :], axis=1)
        da = p * (g[None, :] - pg[:, None])
        tl.store(da_ptr + da_off[:, None] + cc[None, :], da.to(da_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _bwd_kernel(a_ptr, n_ptr, stats_ptr, gcs_ptr, gps_ptr, da_ptr, dn_ptr,
                B, HB, rows_per_prog,
                a_sh, a_sb, n_sh, n_sb, da_sh, da_sb, dn_sh, dn_sb,
                C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
                NEED_DA: tl.constexpr, NEED_DN: tl.constexpr, HAS_GCS: tl.constexpr, HAS_GPS: tl.constexpr,
                VEC_A: tl.constexpr, VEC_N: tl.constexpr, VEC_DA: tl.constexpr, VEC_DN: tl.constexpr,
                ROW_STAGES: tl.constexpr, STAGES: tl.constexpr):
    """Grid (H, splits), same row slicing as the forward.  Rows are independent, so no reduction is needed and
    the result is deterministic by construction; looping over row blocks lets the single-pass path load the
    head's g = dL/dprob_sum[h] once per program instead of once per row block."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    row_begin = s * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, B)
    if HAS_GCS:
        g_cs = tl.load(gcs_ptr + h)
    else:
        g_cs = 0.0
    if SINGLE:
        cm0 = cols < C
        if HAS_GPS:
            g0 = tl.load(gps_ptr + h * C + cols, mask=cm0, other=0.0)
        else:
            g0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Pipeline the innermost streaming loop: the row loop on the single-pass path, the chunk loops otherwise
    # (ROW_STAGES = 1 there).
    for r0 in tl.range(row_begin, row_end, BLOCK_B, num_stages=ROW_STAGES):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < row_end
        rows_ld = tl.minimum(rows, row_end - 1)
        idx = h * B + rows_ld
        m_a = tl.load(stats_ptr + idx)
        log_s_a = tl.load(stats_ptr + HB + idx)
        m_n = tl.load(stats_ptr + 2 * HB + idx)
        log_s_n = tl.load(stats_ptr + 3 * HB + idx)
        m_x = tl.load(stats_ptr + 4 * HB + idx)
        log_s_x = tl.load(stats_ptr + 5 * HB + idx)
        a_off = _row_offsets(h, rows_ld, a_sh, a_sb, VEC_A)
        n_off = _row_offsets(h, rows_ld, n_sh, n_sb, VEC_N)
        da_off = _row_offsets(h, rows_ld, da_sh, da_sb, VEC_DA)
        dn_off = _row_offsets(h, rows_ld, dn_sh, dn_sb, VEC_DN)
        pg = tl.zeros([BLOCK_B], dtype=tl.float32)
        if SINGLE:
            _bwd_tile(a_ptr, n_ptr, da_ptr, dn_ptr, a_off, n_off, da_off, dn_off, cols, cm0, rmask,
                      m_a, log_s_a, m_n, log_s_n, m_x, log_s_x, g_cs, g0, pg,
                      NEED_DA, NEED_DN, HAS_GCS, HAS_GPS, True)
        else:
            if NEED_DA:  # nested, not `and`: plain constexpr conditions are the safest form across versions
                if HAS_GPS:
                    # Extra pass over a (and g) for sum_c p g: the price of C not fitting one block.
                    for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
                        cc = c0 + cols
                        cm = cc < C
                        a = tl.load(a_ptr + a_off[:, None] + cc[None, :], mask=cm[None, :],
                                    other=-float("inf")).to(tl.float32)
                        g = tl.load(gps_ptr + h * C + cc, mask=cm, other=0.0)
                        p = tl.exp((a - m_a[:, None]) - log_s_a[:, None])
                        pg += tl.sum(p * g[None, :], axis=1)
            for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
                cc = c0 + cols
                cm = cc < C
                if HAS_GPS:
                    g = tl.load(gps_ptr + h * C + cc, mask=cm, other=0.0)
                else:
                    g = tl.zeros([BLOCK_C], dtype=tl.float32)
                _bwd_tile(a_ptr, n_ptr, da_ptr, dn_ptr, a_off, n_off, da_off, dn_off, cc, cm, rmask,
                          m_a, log_s_a, m_n, log_s_n, m_x, log_s_x, g_cs, g, pg,
                          NEED_DA, NEED_DN, HAS_GCS, HAS_GPS, False)


# --------------------------------------------------------------------------- #
# Host side
# --------------------------------------------------------------------------- #
def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def _row_block(block_c: int, batch: int, cap: int = 64) -> int:
    # Rows per tile so a tile holds ~TILE_ELEMS elements; never more rows than the batch has (tiny batches).
    return max(1, min(cap, TILE_ELEMS // block_c, triton.next_power_of_2(max(batch, 1))))


def _num_warps(block_b: int, block_c: int) -> int:
    return 8 if block_b * block_c >= 4096 else 4


def _splits(heads: int, batch: int, block_b: int, programs: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(rows_per_prog, n_splits): batch slices per head so that heads * n_splits ~ programs, whole row blocks each.

    Depends only on the shape, so the partial-sum order (and the bits) are the same on every run and device.
    """
    want = max(1, min(triton.cdiv(programs, max(heads, 1)), triton.cdiv(batch, block_b)))
    rows_per_prog = triton.cdiv(triton.cdiv(batch, want), block_b) * block_b
    return rows_per_prog, triton.cdiv(batch, rows_per_prog)


def _vec(t: Tensor) -> int:
    """Largest power of two (<= 16 elements) dividing the head and batch strides that are actually used."""
    g = 0
    for size, stride in zip(t.shape[:2], t.stride()[:2]):
        if size > 1:
            g = math.gcd(g, stride)
    return 16 if g == 0 else min(16, g & -g)


def _prep(t: Tensor) -> Tensor:
    # The kernels take head/batch strides but assume unit stride over classes (vectorised, coalesced rows), so a
    # permuted [B, H, C] -> [H, B, C] view (or an expanded one) is read in place; anything else is copied.
    return t if (t.shape[2] <= 1 or t.stride(2) == 1) else t.contiguous()


def _device_ctx(t: Tensor):
    # Triton launches on the *current* CUDA device; make it the tensors' one (multi-GPU processes).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(a: Tensor, n: Tensor, max_fused_c: int) -> tuple[Tensor, Tensor, Tensor]:
    heads, batch, classes = a.shape
    f32 = {"dtype": torch.float32, "device": a.device}
    stats = torch.empty((N_STATS, heads, batch), **f32)
    if a.numel() == 0:  # empty local batch (a rank without samples): nothing to launch
        return torch.zeros(heads, **f32), torch.zeros(heads, classes, **f32), stats
    vec_a, vec_n = _vec(a), _vec(n)
    hb = heads * batch
    with _device_ctx(a):
        if classes <= max_fused_c:
            block_c = triton.next_power_of_2(classes)
            block_b = _row_block(block_c, batch)
            rows_per_prog, n_splits = _splits(heads, batch, block_b)
            part_cs = torch.empty((heads, n_splits), **f32)
            part_ps = torch.empty((heads, n_splits, classes), **f32)
            _fwd_fused_kernel[(heads, n_splits)](
                a, n, stats, part_cs, part_ps, batch, hb, rows_per_prog, n_splits,
                a.stride(0), a.stride(1), n.stride(0), n.stride(1),
                C=classes, BLOCK_B=block_b, BLOCK_C=block_c, VEC_A=vec_a, VEC_N=vec_n, STAGES=NUM_STAGES,
                num_warps=_num_warps(block_b, block_c))
        else:
            block_c = min(CHUNK_C, _pow2_floor(max_fused_c))
            block_b = _row_block(block_c, batch, cap=16)
            rows_per_prog, n_splits = _splits(heads, batch, block_b)
            part_cs = torch.empty((heads, n_splits), **f32)
            _fwd_stats_chunked_kernel[(heads, n_splits)](
                a, n, stats, part_cs, batch, hb, rows_per_prog, n_splits,
                a.stride(0), a.stride(1), n.stride(0), n.stride(1),
                C=classes, BLOCK_B=block_b, BLOCK_C=block_c, VEC_A=vec_a, VEC_N=vec_n, STAGES=NUM_STAGES,
                num_warps=_num_warps(block_b, block_c))
            # Column-block programs: 256 classes x 16 rows per tile, batch slices sized so that all
            # (head, class block, slice) programs together are ~TARGET_PROGRAMS.
            pb_c = min(256, block_c)
            pb_b = _row_block(pb_c, batch)
            class_blocks = triton.cdiv(classes, pb_c)
            pb_rows, pb_splits = _splits(heads * class_blocks, batch, pb_b)
            part_ps = torch.empty((heads, pb_splits, classes), **f32)
            _prob_sum_chunked_kernel[(heads, class_blocks, pb_splits)](
                a, stats, part_ps, batch, hb, pb_rows, pb_splits, a.stride(0), a.stride(1),
                C=classes, BLOCK_B=pb_b, BLOCK_C=pb_c, VEC_A=vec_a, STAGES=NUM_STAGES,
                num_warps=_num_warps(pb_b, pb_c))
    # Fixed-order second stage of the reduction (torch.sum has no atomics): deterministic.
    return part_cs.sum(dim=1), part_ps.sum(dim=1), stats


def _backward(a: Tensor, n: Tensor, stats: Tensor, g_cs: Tensor | None, g_ps: Tensor | None, need_da: bool,
              need_dn: bool, max_fused_c: int) -> tuple[Tensor | None, Tensor | None]:
    heads, batch, classes = a.shape
    # d n depends only on g_cs; d a on either.  Missing upstream gradients (outputs not used) are zeros.
    run_dn = need_dn and g_cs is not None
    run_da = need_da and (g_cs is not None or g_ps is not None)
    # empty_like keeps the input's layout (e.g. a permuted view) and dtype; the kernel writes through strides.
    da = torch.empty_like(a) if run_da else (torch.zeros_like(a) if need_da else None)
    dn = torch.empty_like(n) if run_dn else (torch.zeros_like(n) if need_dn else None)
    if not (run_da or run_dn) or a.numel() == 0:  # nothing to compute (or an empty local batch): no launch
        return da, dn
    g_cs_k = g_cs.detach().to(torch.float32).contiguous() if g_cs is not None else stats  # dummy pointer
    g_ps_k = g_ps.detach().to(torch.float32).contiguous() if g_ps is not None else stats
    single = classes <= max_fused_c
    block_c = triton.next_power_of_2(classes) if single else min(CHUNK_C, _pow2_floor(max_fused_c))
    block_b = _row_block(block_c, batch, cap=64 if single else 16)
    rows_per_prog, n_splits = _splits(heads, batch, block_b)
    da_k = da if run_da else a  # dummy pointers for the outputs not written (NEED_* = False)
    dn_k = dn if run_dn else n
    with _device_ctx(a):
        _bwd_kernel[(heads, n_splits)](
            a, n, stats, g_cs_k, g_ps_k, da_k, dn_k, batch, heads * batch, rows_per_prog,
            a.stride(0), a.stride(1), n.stride(0), n.stride(1),
            da_k.stride(0), da_k.stride(1), dn_k.stride(0), dn_k.stride(1),
            C=classes, BLOCK_B=block_b, BLOCK_C=block_c, SINGLE=single,
            NEED_DA=run_da, NEED_DN=run_dn, HAS_GCS=g_cs is not None, HAS_GPS=g_ps is not None,
            VEC_A=_vec(a), VEC_N=_vec(n), VEC_DA=_vec(da_k), VEC_DN=_vec(dn_k),
            ROW_STAGES=NUM_STAGES if single else 1, STAGES=NUM_STAGES,
            num_warps=_num_warps(block_b, block_c))
    return da, dn


class _LocalTerms(torch.autograd.Function):
    """(anchor_logits, neighbor_logits) -> (consistency_sum [H], prob_sum [H, C]), Triton forward and backward."""

    @staticmethod
    def forward(ctx, anchor_logits: Tensor, neighbor_logits: Tensor, max_fused_c: int,  # type: ignore[override]
                guarded: bool):
        a, n = _prep(anchor_logits), _prep(neighbor_logits)
        consistency_sum, prob_sum, stats = _forward(a, n, max_fused_c)
        # Only the logits (already alive in the caller's graph; a copy only if they were not class-contiguous)
        # and N_STATS fp32 scalars per row are kept for backward.
        ctx.save_for_backward(a, n, stats)
        ctx.max_fused_c = max_fused_c
        ctx.guarded = guarded
        # Unused outputs arrive as None instead of zero tensors, so their terms are skipped, not multiplied by 0.
        ctx.set_materialize_grads(False)
        return consistency_sum, prob_sum

    @staticmethod
    def backward(ctx, g_cs: Tensor | None, g_ps: Tensor | None):  # type: ignore[override]
        a, n, stats = ctx.saved_tensors
        need_da, need_dn = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.guarded:
            # The backward kernel compiles at the first backward, after the forward returned: guard it here so a
            # failure falls back to the reference gradients instead of killing the training step.
            try:
                da, dn = _backward(a, n, stats, g_cs, g_ps, need_da, need_dn, ctx.max_fused_c)
            except Exception as exc:  # noqa: BLE001
                if _selfcheck.is_oom(exc):
                    raise
                _selfcheck.fail("scan_loss", a.device, f"backward raised {type(exc).__name__}: "
                                f"{str(exc).strip()[:300]}")
                da, dn = _reference_grads(a, n, g_cs, g_ps, need_da, need_dn)
            return da, dn, None, None
        da, dn = _backward(a, n, stats, g_cs, g_ps, need_da, need_dn, ctx.max_fused_c)
        return da, dn, None, None


def _reference_grads(a: Tensor, n: Tensor, g_cs: Tensor | None, g_ps: Tensor | None, need_da: bool,
                     need_dn: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the local terms by autograd through the torch reference (the guarded backward's fallback)."""
    from .scan_loss import _local_terms_torch

    with torch.enable_grad():
        x = a.detach().requires_grad_(need_da)
        y = n.detach().requires_grad_(need_dn)
        cs, ps = _local_terms_torch(x, y)
        outs = [(cs, g_cs), (ps, g_ps)]
        outs = [(o, g) for o, g in outs if g is not None]
        inputs = [t for t, need in ((x, need_da), (y, need_dn)) if need]
        if not outs or not inputs:
            return (torch.zeros_like(a) if need_da else None), (torch.zeros_like(n) if need_dn else None)
        grads = iter(torch.autograd.grad([o for o, _ in outs], inputs, [g for _, g in outs], allow_unused=True,
                                         materialize_grads=True))
        return (next(grads) if need_da else None), (next(grads) if need_dn else None)


def local_terms(anchor_logits: Tensor, neighbor_logits: Tensor, *,
                max_fused_c: int = MAX_FUSED_C, guarded: bool = False) -> tuple[Tensor, Tensor]:
    """Per-rank SCAN sums ``(consistency_sum [H], prob_sum [H, C])`` in fp32, differentiable, Triton kernels.

    Inputs: ``[H, B, C]`` fp32/bf16/fp16 logits on CUDA (or CPU under ``TRITON_INTERPRET=1``); shapes are checked
    by the caller (``scan_loss``).  Gradients come back in each input's dtype and layout.  ``max_fused_c`` is the
    largest C served by the single-pass kernels (a test hook to force the chunked path on small C).  ``guarded``:
    a backward that raises falls back to the reference gradients and switches the family off (``_selfcheck``).
    """
    if anchor_logits.dtype == torch.float64 or neighbor_logits.dtype == torch.float64:
        raise TypeError("the Triton SCAN loss takes fp32/bf16/fp16 logits; float64 goes through the torch path")
    if max_fused_c < 1:
        raise ValueError(f"max_fused_c must be >= 1, got {max_fused_c}")
    return _LocalTerms.apply(anchor_logits, neighbor_logits, int(max_fused_c), bool(guarded))


# --------------------------------------------------------------------------- #
# First-use self-check (see _selfcheck.py)
# --------------------------------------------------------------------------- #
# Rows of the check case: more than one 64-row block (the largest BLOCK_B) plus a tail, so the check compiles the
# kernels with the same BLOCK_B as any real batch of >= 64 rows and runs the masked-tail code.
CHECK_ROWS = 67
# Output tolerance of the check (relative, and absolute times max(1, |reference|)): fp32 sums of 2 x 67 rows agree
# to ~1e-6 whatever the order; gradients use _CHECK_GRAD_TOL per dtype (they are stored in the input dtype).
_CHECK_OUT_TOL = 2e-5
_CHECK_GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def check_key(anchor_logits: Tensor, neighbor_logits: Tensor) -> tuple:
    """What selects the compiled kernels of a call: the dtypes and the class count (constexpr C, fused or chunked)."""
    classes = anchor_logits.shape[2]
    return (anchor_logits.dtype, neighbor_logits.dtype, classes, "fused" if classes <= MAX_FUSED_C else "chunked")


def self_check(anchor_logits: Tensor, neighbor_logits: Tensor) -> str | None:
    """Run a small case of the same specialisation as this call (2 heads, CHECK_ROWS rows, same C and dtypes,
    same device) forward and backward, against autograd of the torch reference.  None when it agrees, else what
    differed.  Exceptions (compile errors) propagate to the caller, ``_selfcheck.ensure``."""
    from .scan_loss import _local_terms_torch

    classes, device = anchor_logits.shape[2], anchor_logits.device
    gen = torch.Generator().manual_seed(1234)
    shape = (2, CHECK_ROWS, classes)
    base = 3.0 * torch.randn(shape, generator=gen)
    a = base.to(device=device, dtype=anchor_logits.dtype)
    n = (base + 2.0 * torch.randn(shape, generator=gen)).to(device=device, dtype=neighbor_logits.dtype)
    g_cs = torch.randn(2, generator=gen).to(device)
    g_ps = torch.randn(2, classes, generator=gen).to(device)

    def run(fn):
        x = a.detach().clone().requires_grad_(True)
        y = n.detach().clone().requires_grad_(True)
        cs, ps = fn(x, y)
        ga, gn = torch.autograd.grad((cs * g_cs).sum() + (ps * g_ps).sum(), (x, y))
        return cs.detach(), ps.detach(), ga, gn

    got = run(local_terms)
    ref = run(_local_terms_torch)
    for name, g, r in zip(("consistency_sum", "prob_sum"), got[:2], ref[:2]):
        bad = _mismatch(g, r, _CHECK_OUT_TOL, _CHECK_OUT_TOL * max(1.0, float(r.abs().max())))
        if bad:
            return f"forward {name}: {bad}"
    for name, g, r, dtype in (("d anchor", got[2], ref[2], a.dtype), ("d neighbor", got[3], ref[3], n.dtype)):
        rtol, rel_atol = _CHECK_GRAD_TOL[dtype]
        bad = _mismatch(g, r, rtol, rel_atol * float(r.double().abs().max()) + 1e-30)
        if bad:
            return f"backward {name}: {bad}"
    return None


def _mismatch(got: Tensor, ref: Tensor, rtol: float, atol: float) -> str | None:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} instead of {tuple(ref.shape)} {ref.dtype}"
    g, r = got.double(), ref.double()
    if not bool(torch.isfinite(g).all()):
        return "non-finite values"
    err = (g - r).abs()
    allowed = atol + rtol * r.abs()
    if bool((err > allowed).any()):
        return f"max abs error {float(err.max()):.3g} (allowed {atol:.3g} + {rtol:g} * |reference|)"
    return None
