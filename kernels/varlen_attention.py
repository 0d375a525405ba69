"""Variable-length (packed) attention, forward and backward, in Triton.

Drop-in for flash-attn's ``flash_attn_varlen_func`` (FlashAttention-2, Dao 2023, arXiv:2307.08691):
q (total_q, num_heads, head_dim), k/v (total_k, num_kv_heads, head_dim), int32 ``cu_seqlens``; grouped-
query attention by fewer KV heads (never expanded, not even in the backward); causal masks are bottom-
right aligned like flash-attn when a segment's query and key lengths differ. Used for the packed LLM
samples and for the Qwen2.5-VL ViT's 64-patch windows and whole-image segments.

Design: a flat, heaviest-first list of (segment, block) tiles per call (cached per cu_seqlens tensor, see
``_tiles.py``) rather than a grid padded to the longest segment; the key loop is split into an unmasked
part and a masked part that covers only the diagonal and the segment tail; exp2 with log2(e) folded into
the scale; the log-sum-exp (log2 units) is kept for the backward. A head dim that is not a power of two is
split into two power-of-two parts (80 = 64 + 16) rather than padded to the next power of two.
Backward: FA2's split into a dK/dV kernel (one program per key tile and KV head, looping over the query
heads of its group, so GQA needs neither expanded K/V nor atomics) and a dQ kernel.
Segment starts are 64-bit offsets; offsets inside a segment are 32-bit, so one segment may hold up to
2^31 / (heads * head_dim) tokens (about 600k for 28 x 128).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._counts import count_launch
from ._tiles import cached_tiles

# ---- tuning constants ----------------------------------------------------------------------------
# Not yet tuned on a GPU (none was available when this was written); starting points from the Triton
# flash-attention tutorial and FA2 for Hopper with head dims <= 128.
# Forward: 128 query rows x 64 keys per step keeps the Q tile and the fp32 accumulator in registers with
# 8 warps for hd128; a 64-row tile when no segment is longer than 64 (ViT windows) halves the waste.
FWD_BLOCK_M, FWD_BLOCK_M_SHORT, FWD_BLOCK_N = 128, 64, 64
FWD_NUM_WARPS_HD128, FWD_NUM_WARPS_SMALL, FWD_NUM_STAGES = 8, 4, 3
# Backward: 64x64 tiles; the dK/dV kernel keeps K, V, dK, dV (4 x 64 x hd) on chip while streaming Q/dO.
BWD_BLOCK_M, BWD_BLOCK_N, BWD_NUM_WARPS, BWD_NUM_STAGES = 64, 64, 4, 2
# Rows per program of the delta = rowsum(dO * O) preprocessing kernel (memory-bound).
DELTA_BLOCK_T = 64
# Tests set this to a dict {"fwd_m", "fwd_n", "bwd_m", "bwd_n"} to exercise other tilings.
BLOCK_OVERRIDE: dict | None = None

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- reference (the specification) ------------------------------------------------------------------
def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale=None, causal=False):
    """Plain torch, fp32 math, one segment at a time. Output in q's dtype, differentiable.

    Segment s: queries q[cu_q[s]:cu_q[s+1]], keys/values k, v[cu_k[s]:cu_k[s+1]]; query head h uses KV head
    h // (num_heads // num_kv_heads). Causal (bottom-right): query i sees key j iff j <= i + len_k - len_q.
    A query that sees no key (empty key segment, or causal with len_q > len_k) outputs 0, as in flash-attn;
    tokens outside every segment output 0. max_seqlen_* are accepted for signature parity and unused.
    """
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = []
    if cu_q[0] > 0:
        pieces.append(q.new_zeros(cu_q[0], num_heads, head_dim, dtype=torch.float32))
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].float().transpose(0, 1)  # (heads, len_q, head_dim)
        ks = k[cu_k[s]:cu_k[s + 1]].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[cu_k[s]:cu_k[s + 1]].float().repeat_interleave(group, dim=1).transpose(0, 1)
        len_q, len_k = qs.shape[1], ks.shape[1]
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # (heads, len_q, len_k)
        visible = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
        if causal:
            i = torch.arange(len_q, device=q.device)[:, None]
            j = torch.arange(len_k, device=q.device)[None, :]
            visible = j <= i + (len_k - len_q)
        has_key = visible.any(dim=1, keepdim=True)  # (len_q, 1)
        scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1) * has_key
        pieces.append(torch.matmul(probs, vs).transpose(0, 1))  # (len_q, heads, head_dim)
    if total_q > cu_q[-1]:
        pieces.append(q.new_zeros(total_q - cu_q[-1], num_heads, head_dim, dtype=torch.float32))
    out = torch.cat(pieces, dim=0) if pieces else q.new_zeros(q.shape, dtype=torch.float32)
    return out.to(q.dtype)


# ---- Triton kernels -------------------------------------------------------------------------------
@triton.jit
def _load_2d(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """tl.load with only the masks that can be false (keeps unmasked loads vectorised)."""
    if ROW_MASK:
        if COL_MASK:
            return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if COL_MASK:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _seg_bounds(CU_Q, CU_K, seg):
    q_start = tl.load(CU_Q + seg)
    len_q = tl.load(CU_Q + seg + 1) - q_start
    k_start = tl.load(CU_K + seg)
    len_k = tl.load(CU_K + seg + 1) - k_start
    return q_start, len_q, k_start, len_k


@triton.jit
def _key_ranges(mblk, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys a query tile visits: [0, full_end) needs no mask, [full_end, hi) is the diagonal/tail.

    Bottom-right causal: row i sees key j iff j <= i + (len_k - len_q).
    """
    if CAUSAL:
        off = len_k - len_q
        hi = tl.minimum(len_k, (mblk + 1) * BLOCK_M + off)
        hi = tl.maximum(hi, 0)
        first_row_end = tl.maximum(mblk * BLOCK_M + off + 1, 0)  # keys [0, this) seen by every row
        full_end = (tl.minimum(len_k, first_row_end) // BLOCK_N) * BLOCK_N
    else:
        hi = len_k
        full_end = (len_k // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _fwd_inner(acc_a, acc_b, m_i, l_i, q_a, q_b, k_ptrs_a, k_ptrs_b, v_ptrs_a, v_ptrs_b,
               stride_kt, stride_vt, start_n, end_n, len_k, rows_shifted, offs_n, dmask_a, dmask_b,
               qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_B: tl.constexpr,
               DA_MASK: tl.constexpr, DB_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online softmax over keys [start_n, end_n): s = q k^T * scale * log2(e); m, l, acc updated with exp2.

    q_a (BLOCK_M, D_A), k^T tile (D_A, BLOCK_N), v tile (BLOCK_N, D_A); the _b parts hold dims D_A:D.
    rows_shifted = query row + (len_k - len_q), the last key index that row may see when causal.
    """
    for start in range(start_n, end_n, BLOCK_N):
        cols = start + offs_n  # (BLOCK_N,)
        col_ok = cols < len_k
        kt_a = _load_2d(k_ptrs_a + start * stride_kt, dmask_a, col_ok, DA_MASK, MASKED)  # (D_A, BLOCK_N)
        s = tl.dot(q_a, kt_a, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        if HAS_B:
            kt_b = _load_2d(k_ptrs_b + start * stride_kt, dmask_b, col_ok, DB_MASK, MASKED)
            s = tl.dot(q_b, kt_b, s, input_precision=DOT_PREC)
        s = s * qk_scale
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows_shifted[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row with no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_a = _load_2d(v_ptrs_a + start * stride_vt, col_ok, dmask_a, MASKED, DA_MASK)  # (BLOCK_N, D_A)
        acc_a = tl.dot(p.to(v_a.dtype), v_a, acc_a * alpha[:, None], input_precision=DOT_PREC)
        if HAS_B:
            v_b = _load_2d(v_ptrs_b + start * stride_vt, col_ok, dmask_b, MASKED, DB_MASK)
            acc_b = tl.dot(p.to(v_b.dtype), v_b, acc_b * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc_a, acc_b, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # Q, O (total_q, H, D); K, V (total_k, H_kv, D); LSE (H, total_q) fp32, log2 units
    CU_Q, CU_K, TILE_SEG, TILE_BLK,  # int32: (S + 1,), (S + 1,), (num_tiles,), (num_tiles,)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_q, qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """O = softmax(Q K^T * scale) V per segment and head; LSE = log2(sum_j exp2(s_ij)) (+inf if no key).

    One program per (tile, query head); heads vary fastest so the GQA heads sharing a KV head run
    side by side and reuse K/V from L2.
    """
    pid = tl.program_id(0)
    tile = pid // NUM_HEADS
    head = pid % NUM_HEADS
    seg = tl.load(TILE_SEG + tile)
    if seg < 0:
        return
    mblk = tl.load(TILE_BLK + tile)
    q_start, len_q, k_start, len_k = _seg_bounds(CU_Q, CU_K, seg)
    kv_head = head // GROUP
    DA_MASK: tl.constexpr = D_A > HEAD_DIM
    DB_MASK: tl.constexpr = D_A + D_B > HEAD_DIM

    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) row index inside the segment
    row_ok = rows < len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, D_A)
    offs_db = D_A + tl.arange(0, D_B)  # D_B is a placeholder 16 when not HAS_B
    dmask_a = offs_da < HEAD_DIM
    dmask_b = offs_db < HEAD_DIM

    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    q_a = _load_2d(q_base + rows[:, None] * stride_qt + offs_da[None, :], row_ok, dmask_a, True, DA_MASK)
    k_ptrs_a = k_base + offs_n[None, :] * stride_kt + offs_da[:, None]  # (D_A, BLOCK_N): K^T
    v_ptrs_a = v_base + offs_n[:, None] * stride_vt + offs_da[None, :]  # (BLOCK_N, D_A)
    acc_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    if HAS_B:
        q_b = _load_2d(q_base + rows[:, None] * stride_qt + offs_db[None, :], row_ok, dmask_b, True, DB_MASK)
        k_ptrs_b = k_base + offs_n[None, :] * stride_kt + offs_db[:, None]
        v_ptrs_b = v_base + offs_n[:, None] * stride_vt + offs_db[None, :]
        acc_b = tl.zeros([BLOCK_M, D_B], dtype=tl.float32)
    else:  # placeholders, never read
        q_b, k_ptrs_b, v_ptrs_b, acc_b = q_a, k_ptrs_a, v_ptrs_a, acc_a
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    rows_shifted = rows + (len_k - len_q)

    full_end, hi = _key_ranges(mblk, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc_a, acc_b, m_i, l_i = _fwd_inner(
        acc_a, acc_b, m_i, l_i, q_a, q_b, k_ptrs_a, k_ptrs_b, v_ptrs_a, v_ptrs_b, stride_kt, stride_vt,
        0, full_end, len_k, rows_shifted, offs_n, dmask_a, dmask_b, qk_scale,
        False, CAUSAL, HAS_B, DA_MASK, DB_MASK, BLOCK_N, DOT_PREC)
    acc_a, acc_b, m_i, l_i = _fwd_inner(
        acc_a, acc_b, m_i, l_i, q_a, q_b, k_ptrs_a, k_ptrs_b, v_ptrs_a, v_ptrs_b, stride_kt, stride_vt,
        full_end, hi, len_k, rows_shifted, offs_n, dmask_a, dmask_b, qk_scale,
        True, CAUSAL, HAS_B, DA_MASK, DB_MASK, BLOCK_N, DOT_PREC)

    has_key = l_i > 0.0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    o_base = O + q_start.to(tl.int64) * stride_ot + head * stride_oh
    o_a = (acc_a * inv_l[:, None]).to(O.dtype.element_ty)
    tl.store(o_base + rows[:, None] * stride_ot + offs_da[None, :], o_a, mask=row_ok[:, None] & dmask_a[None, :])
    if HAS_B:
        o_b = (acc_b * inv_l[:, None]).to(O.dtype.element_ty)
        tl.store(o_base + rows[:, None] * stride_ot + offs_db[None, :], o_b,
                 mask=row_ok[:, None] & dmask_b[None, :])
    tl.store(LSE + head.to(tl.int64) * total_q + q_start + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_q,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA[h, t] = sum_d O[t, h, d] * dO[t, h, d] in fp32; DELTA (H, total_q)."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total_q + rows, delta, mask=rows < total_q)


@triton.jit
def _bwd_dkdv_inner(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_ptrs_a, q_ptrs_b, do_ptrs_a, do_ptrs_b,
                    lse_ptrs, delta_ptrs, stride_qt, stride_dot, start_m, end_m, len_q, cols_shifted,
                    offs_m, dmask_a, dmask_b, qk_scale,
                    MASKED: tl.constexpr, HAS_B: tl.constexpr, DA_MASK: tl.constexpr, DB_MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dV += P^T dO and dK += dS^T Q over query rows [start_m, end_m) for one key tile.

    P^T = exp2(K Q^T * qk_scale - LSE) (BLOCK_N, BLOCK_M); dS^T = P^T * (V dO^T - DELTA).
    Rows past len_q load q = dO = 0, LSE = +inf, DELTA = 0, so they contribute exactly 0 without a mask.
    MASKED applies the causal mask (row i sees key j iff i >= j - (len_k - len_q) = cols_shifted).
    """
    for start in range(start_m, end_m, BLOCK_M):
        rows = start + offs_m  # (BLOCK_M,)
        row_ok = rows < len_q
        q_a = _load_2d(q_ptrs_a + start * stride_qt, row_ok, dmask_a, True, DA_MASK)  # (BLOCK_M, D_A)
        do_a = _load_2d(do_ptrs_a + start * stride_dot, row_ok, dmask_a, True, DA_MASK)
        lse = tl.load(lse_ptrs + start + offs_m, mask=row_ok, other=float("inf"))  # (BLOCK_M,)
        delta = tl.load(delta_ptrs + start + offs_m, mask=row_ok, other=0.0)
        qkt = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        if HAS_B:
            q_b = _load_2d(q_ptrs_b + start * stride_qt, row_ok, dmask_b, True, DB_MASK)
            do_b = _load_2d(do_ptrs_b + start * stride_dot, row_ok, dmask_b, True, DB_MASK)
            qkt = tl.dot(k_b, tl.trans(q_b), qkt, input_precision=DOT_PREC)
        pt = tl.exp2(qkt * qk_scale - lse[None, :])
        if MASKED:
            pt = tl.where(rows[None, :] >= cols_shifted[:, None], pt, 0.0)
        dv_a = tl.dot(pt.to(do_a.dtype), do_a, dv_a, input_precision=DOT_PREC)
        dpt = tl.dot(v_a, tl.trans(do_a), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        if HAS_B:
            dv_b = tl.dot(pt.to(do_b.dtype), do_b, dv_b, input_precision=DOT_PREC)
            dpt = tl.dot(v_b, tl.trans(do_b), dpt, input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q_a.dtype)
        dk_a = tl.dot(dst, q_a, dk_a, input_precision=DOT_PREC)
        if HAS_B:
            dk_b = tl.dot(dst, q_b, dk_b, input_precision=DOT_PREC)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,  # Q, DO (total_q, H, D); K, V, DK, DV (total_k, H_kv, D); LSE, DELTA (H, total_q)
    CU_Q, CU_K, TILE_SEG, TILE_BLK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_q, qk_scale, sm_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dV = sum over the group's query heads of P^T dO; dK = sm_scale * sum of dS^T Q.

    One program per (key tile, KV head); it loops over the GROUP query heads sharing that KV head, so
    dK/dV are written once, with no atomics and no expanded K/V.
    """
    pid = tl.program_id(0)
    tile = pid // NUM_KV_HEADS
    kv_head = pid % NUM_KV_HEADS
    seg = tl.load(TILE_SEG + tile)
    if seg < 0:
        return
    nblk = tl.load(TILE_BLK + tile)
    q_start, len_q, k_start, len_k = _seg_bounds(CU_Q, CU_K, seg)
    DA_MASK: tl.constexpr = D_A > HEAD_DIM
    DB_MASK: tl.constexpr = D_A + D_B > HEAD_DIM

    cols = nblk * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key index inside the segment
    col_ok = cols < len_k
    offs_m = tl.arange(0, BLOCK_M)
    offs_da = tl.arange(0, D_A)
    offs_db = D_A + tl.arange(0, D_B)
    dmask_a = offs_da < HEAD_DIM
    dmask_b = offs_db < HEAD_DIM
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    k_a = _load_2d(k_base + cols[:, None] * stride_kt + offs_da[None, :], col_ok, dmask_a, True, DA_MASK)
    v_a = _load_2d(v_base + cols[:, None] * stride_vt + offs_da[None, :], col_ok, dmask_a, True, DA_MASK)
    dk_a = tl.zeros([BLOCK_N, D_A], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, D_A], dtype=tl.float32)
    if HAS_B:
        k_b = _load_2d(k_base + cols[:, None] * stride_kt + offs_db[None, :], col_ok, dmask_b, True, DB_MASK)
        v_b = _load_2d(v_base + cols[:, None] * stride_vt + offs_db[None, :], col_ok, dmask_b, True, DB_MASK)
        dk_b = tl.zeros([BLOCK_N, D_B], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, D_B], dtype=tl.float32)
    else:  # placeholders, never read
        k_b, v_b, dk_b, dv_b = k_a, v_a, dk_a, dv_a

    # Query rows that see this key tile: i >= j - off for some j in it; rows past full_start see all of it.
    if CAUSAL:
        off = len_k - len_q
        lo = tl.maximum(nblk * BLOCK_N - off, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_start = tl.maximum(nblk * BLOCK_N + BLOCK_N - 1 - off, 0)
        full_start = ((full_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        masked_end = tl.minimum(full_start, ((len_q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)  # >= lo
    else:
        lo = 0
        masked_end = 0
    cols_shifted = cols - (len_k - len_q)

    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        do_base = DO + q_start.to(tl.int64) * stride_dot + head * stride_doh
        q_ptrs_a = q_base + offs_m[:, None] * stride_qt + offs_da[None, :]
        do_ptrs_a = do_base + offs_m[:, None] * stride_dot + offs_da[None, :]
        q_ptrs_b = q_base + offs_m[:, None] * stride_qt + offs_db[None, :]
        do_ptrs_b = do_base + offs_m[:, None] * stride_dot + offs_db[None, :]
        lse_ptrs = LSE + head.to(tl.int64) * total_q + q_start
        delta_ptrs = DELTA + head.to(tl.int64) * total_q + q_start
        dk_a, dk_b, dv_a, dv_b = _bwd_dkdv_inner(
            dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_ptrs_a, q_ptrs_b, do_ptrs_a, do_ptrs_b,
            lse_ptrs, delta_ptrs, stride_qt, stride_dot, lo, masked_end, len_q, cols_shifted, offs_m,
            dmask_a, dmask_b, qk_scale, True, HAS_B, DA_MASK, DB_MASK, BLOCK_M, DOT_PREC)
        dk_a, dk_b, dv_a, dv_b = _bwd_dkdv_inner(
            dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_ptrs_a, q_ptrs_b, do_ptrs_a, do_ptrs_b,
            lse_ptrs, delta_ptrs, stride_qt, stride_dot, masked_end, len_q, len_q,
            cols_shifted, offs_m, dmask_a, dmask_b, qk_scale, False, HAS_B, DA_MASK, DB_MASK, BLOCK_M,
            DOT_PREC)

    dk_base = DK + k_start.to(tl.int64) * stride_dkt + kv_head * stride_dkh
    dv_base = DV + k_start.to(tl.int64) * stride_dvt + kv_head * stride_dvh
    tl.store(dk_base + cols[:, None] * stride_dkt + offs_da[None, :], (dk_a * sm_scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & dmask_a[None, :])
    tl.store(dv_base + cols[:, None] * stride_dvt + offs_da[None, :], dv_a.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & dmask_a[None, :])
    if HAS_B:
        tl.store(dk_base + cols[:, None] * stride_dkt + offs_db[None, :],
                 (dk_b * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & dmask_b[None, :])
        tl.store(dv_base + cols[:, None] * stride_dvt + offs_db[None, :], dv_b.to(DV.dtype.element_ty),
                 mask=col_ok[:, None] & dmask_b[None, :])


@triton.jit
def _bwd_dq_inner(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_ptrs_a, k_ptrs_b, v_ptrs_a, v_ptrs_b,
                  stride_kt, stride_vt, start_n, end_n, len_k, rows_shifted, offs_n, dmask_a, dmask_b,
                  qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_B: tl.constexpr,
                  DA_MASK: tl.constexpr, DB_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """dQ += dS K over keys [start_n, end_n), dS = P * (dO V^T - DELTA), P = exp2(Q K^T * qk_scale - LSE)."""
    for start in range(start_n, end_n, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < len_k
        k_a = _load_2d(k_ptrs_a + start * stride_kt, col_ok, dmask_a, MASKED, DA_MASK)  # (BLOCK_N, D_A)
        v_a = _load_2d(v_ptrs_a + start * stride_vt, col_ok, dmask_a, MASKED, DA_MASK)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PREC)
        if HAS_B:
            k_b = _load_2d(k_ptrs_b + start * stride_kt, col_ok, dmask_b, MASKED, DB_MASK)
            v_b = _load_2d(v_ptrs_b + start * stride_vt, col_ok, dmask_b, MASKED, DB_MASK)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PREC)
            dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows_shifted[:, None])
            p = tl.where(visible, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a = tl.dot(ds, k_a, dq_a, input_precision=DOT_PREC)
        if HAS_B:
            dq_b = tl.dot(ds, k_b, dq_b, input_precision=DOT_PREC)
    return dq_a, dq_b


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,  # Q, DO, DQ (total_q, H, D); K, V (total_k, H_kv, D); LSE, DELTA (H, total_q)
    CU_Q, CU_K, TILE_SEG, TILE_BLK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_q, qk_scale, sm_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_A: tl.constexpr, D_B: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dQ = sm_scale * dS K with dS recomputed from the saved LSE; one program per (query tile, head)."""
    pid = tl.program_id(0)
    tile = pid // NUM_HEADS
    head = pid % NUM_HEADS
    seg = tl.load(TILE_SEG + tile)
    if seg < 0:
        return
    mblk = tl.load(TILE_BLK + tile)
    q_start, len_q, k_start, len_k = _seg_bounds(CU_Q, CU_K, seg)
    kv_head = head // GROUP
    DA_MASK: tl.constexpr = D_A > HEAD_DIM
    DB_MASK: tl.constexpr = D_A + D_B > HEAD_DIM

    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, D_A)
    offs_db = D_A + tl.arange(0, D_B)
    dmask_a = offs_da < HEAD_DIM
    dmask_b = offs_db < HEAD_DIM
    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    do_base = DO + q_start.to(tl.int64) * stride_dot + head * stride_doh
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    q_a = _load_2d(q_base + rows[:, None] * stride_qt + offs_da[None, :], row_ok, dmask_a, True, DA_MASK)
    do_a = _load_2d(do_base + rows[:, None] * stride_dot + offs_da[None, :], row_ok, dmask_a, True, DA_MASK)
    k_ptrs_a = k_base + offs_n[:, None] * stride_kt + offs_da[None, :]  # (BLOCK_N, D_A)
    v_ptrs_a = v_base + offs_n[:, None] * stride_vt + offs_da[None, :]
    dq_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    if HAS_B:
        q_b = _load_2d(q_base + rows[:, None] * stride_qt + offs_db[None, :], row_ok, dmask_b, True, DB_MASK)
        do_b = _load_2d(do_base + rows[:, None] * stride_dot + offs_db[None, :], row_ok, dmask_b, True,
                        DB_MASK)
        k_ptrs_b = k_base + offs_n[:, None] * stride_kt + offs_db[None, :]
        v_ptrs_b = v_base + offs_n[:, None] * stride_vt + offs_db[None, :]
        dq_b = tl.zeros([BLOCK_M, D_B], dtype=tl.float32)
    else:  # placeholders, never read
        q_b, do_b, k_ptrs_b, v_ptrs_b, dq_b = q_a, do_a, k_ptrs_a, v_ptrs_a, dq_a
    lse = tl.load(LSE + head.to(tl.int64) * total_q + q_start + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + head.to(tl.int64) * total_q + q_start + rows, mask=row_ok, other=0.0)
    rows_shifted = rows + (len_k - len_q)

    full_end, hi = _key_ranges(mblk, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq_a, dq_b = _bwd_dq_inner(
        dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_ptrs_a, k_ptrs_b, v_ptrs_a, v_ptrs_b,
        stride_kt, stride_vt, 0, full_end, len_k, rows_shifted, offs_n, dmask_a, dmask_b, qk_scale,
        False, CAUSAL, HAS_B, DA_MASK, DB_MASK, BLOCK_N, DOT_PREC)
    dq_a, dq_b = _bwd_dq_inner(
        dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_ptrs_a, k_ptrs_b, v_ptrs_a, v_ptrs_b,
        stride_kt, stride_vt, full_end, hi, len_k, rows_shifted, offs_n, dmask_a, dmask_b, qk_scale,
        True, CAUSAL, HAS_B, DA_MASK, DB_MASK, BLOCK_N, DOT_PREC)

    dq_base = DQ + q_start.to(tl.int64) * stride_dqt + head * stride_dqh
    tl.store(dq_base + rows[:, None] * stride_dqt + offs_da[None, :], (dq_a * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & dmask_a[None, :])
    if HAS_B:
        tl.store(dq_base + rows[:, None] * stride_dqt + offs_db[None, :],
                 (dq_b * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & dmask_b[None, :])


# ---- launchers ------------------------------------------------------------------------------------
def _split_head_dim(head_dim: int) -> tuple[int, int, bool]:
    """(D_A, D_B, HAS_B): head dims as one or two power-of-two parts, e.g. 128 -> (128, -), 80 -> (64, 16).

    tl.dot needs power-of-two blocks of at least 16; a remainder below 16 (e.g. 72 = 64 + 8) is padded
    to 16 with masking, and a dim below 16 is padded to 16.
    """
    d_a = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d_a
    if rest <= 0:
        return d_a, 16, False
    d_b = max(16, triton.next_power_of_2(rest))
    return d_a, d_b, True


def _blocks(head_dim: int, max_seqlen_q: int) -> dict:
    if BLOCK_OVERRIDE is not None:
        return dict(BLOCK_OVERRIDE)
    fwd_m = FWD_BLOCK_M_SHORT if max_seqlen_q <= FWD_BLOCK_M_SHORT else FWD_BLOCK_M
    return {"fwd_m": fwd_m, "fwd_n": FWD_BLOCK_N, "bwd_m": BWD_BLOCK_M, "bwd_n": BWD_BLOCK_N}


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"varlen_attention: {name} must be a 3-D tensor (tokens, heads, head_dim), "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"varlen_attention: {name} has dtype {t.dtype}; expected fp16, bf16 or fp32")
        if t.stride(-1) != 1:
            raise ValueError(f"varlen_attention: {name} must have a contiguous last dim (stride(-1) == 1), "
                             f"got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"varlen_attention: {name} is on {t.device}, q on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"varlen_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if k.shape != v.shape:
        raise ValueError(f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"varlen_attention: head_dim of q ({q.shape[2]}) and k ({k.shape[2]}) differ")
    if q.shape[2] > 256 or q.shape[2] % 8 != 0:
        raise ValueError(f"varlen_attention: head_dim must be a multiple of 8 up to 256, got {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"varlen_attention: num_heads of q ({q.shape[1]}) must be a multiple of "
                         f"num_kv_heads of k ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"varlen_attention: {name} must be a 1-D int32 tensor of length num_segments + 1")
        if cu.device != q.device:
            raise ValueError(f"varlen_attention: {name} is on {cu.device}, q on {q.device}")
        if not cu.is_contiguous():
            raise ValueError(f"varlen_attention: {name} must be contiguous")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"varlen_attention: cu_seqlens_q has {cu_seqlens_q.numel()} entries, "
                         f"cu_seqlens_k {cu_seqlens_k.numel()}")
    if not q.is_cuda:  # free to check here; on GPU it would cost a host sync, so flash-attn's contract applies
        for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
            if cu[0] < 0 or cu[-1] > total or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"varlen_attention: {name} must be non-decreasing within [0, {total}]")


def _common(q, k, dtype):
    d_a, d_b, has_b = _split_head_dim(q.shape[2])
    return dict(GROUP=q.shape[1] // k.shape[1], HEAD_DIM=q.shape[2], D_A=d_a, D_B=d_b, HAS_B=has_b,
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32")


def _attn_forward(q, k, v, cu_q, cu_k, max_seqlen_q, scale, causal):
    """Returns o (total_q, H, D) in q's dtype and lse (H, total_q) fp32 in log2 units."""
    total_q, num_heads, head_dim = q.shape
    o = torch.zeros_like(q)
    lse = torch.full((num_heads, total_q), float("inf"), dtype=torch.float32, device=q.device)
    if total_q == 0 or cu_q.numel() < 2:
        return o, lse
    blocks = _blocks(head_dim, max_seqlen_q)
    tiles = cached_tiles(cu_q, cu_k, blocks["fwd_m"], total_q, "causal_q" if causal else "full")
    grid = (tiles.shape[1] * num_heads,)
    count_launch("attention_fwd")
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_q, cu_k, tiles[0], tiles[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        total_q, scale * _LOG2E,
        NUM_HEADS=num_heads, CAUSAL=causal, BLOCK_M=blocks["fwd_m"], BLOCK_N=blocks["fwd_n"],
        num_warps=FWD_NUM_WARPS_HD128 if head_dim > 64 else FWD_NUM_WARPS_SMALL, num_stages=FWD_NUM_STAGES,
        **_common(q, k, q.dtype))
    return o, lse


def _attn_backward(do, q, k, v, o, lse, cu_q, cu_k, max_seqlen_q, scale, causal):
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if total_q == 0 or total_k == 0 or cu_q.numel() < 2:
        return dq, dk, dv
    delta = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
    count_launch("attention_bwd")  # the delta, dK/dV and dQ kernels below
    _attn_bwd_delta_kernel[(triton.cdiv(total_q, DELTA_BLOCK_T), num_heads)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), total_q,
        HEAD_DIM=head_dim, BLOCK_T=DELTA_BLOCK_T, BLOCK_D=triton.next_power_of_2(head_dim))
    blocks = _blocks(head_dim, max_seqlen_q)
    common = _common(q, k, q.dtype)
    qk_scale = scale * _LOG2E
    k_tiles = cached_tiles(cu_k, cu_q, blocks["bwd_n"], total_k, "causal_k" if causal else "full")
    _attn_bwd_dkdv_kernel[(k_tiles.shape[1] * num_kv_heads,)](
        q, k, v, do, dk, dv, lse, delta, cu_q, cu_k, k_tiles[0], k_tiles[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), total_q, qk_scale, scale,
        NUM_KV_HEADS=num_kv_heads, CAUSAL=causal, BLOCK_M=blocks["bwd_m"], BLOCK_N=blocks["bwd_n"],
        num_warps=BWD_NUM_WARPS, num_stages=BWD_NUM_STAGES, **common)
    q_tiles = cached_tiles(cu_q, cu_k, blocks["bwd_m"], total_q, "causal_q" if causal else "full")
    _attn_bwd_dq_kernel[(q_tiles.shape[1] * num_heads,)](
        q, k, v, do, dq, lse, delta, cu_q, cu_k, q_tiles[0], q_tiles[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), total_q, qk_scale, scale,
        NUM_HEADS=num_heads, CAUSAL=causal, BLOCK_M=blocks["bwd_m"], BLOCK_N=blocks["bwd_n"],
        num_warps=BWD_NUM_WARPS, num_stages=BWD_NUM_STAGES, **common)
    return dq, dk, dv


# ---- autograd ------------------------------------------------------------------------------------
class VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        o, lse = _attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen_q, ctx.softmax_scale, ctx.causal = max_seqlen_q, softmax_scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, cu_q, cu_k, ctx.max_seqlen_q, ctx.softmax_scale,
                                    ctx.causal)
        return dq, dk, dv, None, None, None, None, None, None


# ---- public API ----------------------------------------------------------------------------------
def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                     causal=False):
    """Packed variable-length attention with flash-attn's ``flash_attn_varlen_func`` call and layout.

    q (total_q, num_heads, head_dim); k, v (total_k, num_kv_heads, head_dim), num_heads a multiple of
    num_kv_heads; cu_seqlens_q/k int32 (num_segments + 1,) on q's device; head_dim a multiple of 8 up to
    256; fp16/bf16 (fp32 accepted; fp32 accumulation always). ``max_seqlen_q`` only selects the tile height
    (a wrong value costs speed, never correctness); ``max_seqlen_k`` is unused. Returns (total_q, num_heads, head_dim).
    Tokens outside every segment get output 0 and gradient 0. On a GPU, cu_seqlens must be
    non-decreasing within [0, total] (checked on CPU only, to avoid a host sync).
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    return VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                         int(max_seqlen_k), scale, bool(causal))
