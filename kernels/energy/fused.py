"""Triton kernels of the energy model's cross-attention: the C*H candidate queries of a
sample attend to that sample's S context keys, K/V shared by all candidates (never copied).

Layout (no transposes anywhere): q (Bq, Q, E), k and v (B, S, E) (any strides in the first two
dims, unit stride in the last; fp32 in the energy path's workspace), head h owns columns
h*dh:(h+1)*dh. ``Bq`` is B, or 1 when all samples score one shared candidate pool (stride 0
over the batch: the swap loss). Every tile is rounded to DOT_DTYPE (the model's dtype) as it is
loaded: the products are what the model's dtype gives, accumulated in fp32.
A key is valid when it is in range and not padded (pad byte 0); an invalid key's K and V are
never loaded (masked loads), so whatever it holds contributes nothing, forward or backward.
Rows whose keys are all padded give a zero output and lse = +inf (every backward probability
is 0).

Forward: one program per (query block, sample, head); online softmax in base 2; the S x Q
score matrix never leaves registers; lse (log2 domain) saved for the backward.
Backward (FlashAttention-2 split, deterministic, no atomics; delta = rowsum(dO * O) computed
where it is used, no pre-pass):
  ``_energy_attention_bwd_dq_kernel``   dQ, one program per (query block, head[, sample]); with
                                        a shared pool it sums over the samples itself
  ``_energy_attention_bwd_dkdv_kernel`` dK, dV, one program per (key block, sample, head),
                                        looping over every query block of the sample
``PAD`` is an optional pointer (``None``: no padding); ``flags_from_pointers`` derives HAS_PAD.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._utils import flags_from_pointers, mm

_has_pad = flags_from_pointers(HAS_PAD="PAD")


@triton.jit
def _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn, stride_vb,
                  stride_vn, stride_pb, HAS_PAD: tl.constexpr):
    """K and V tiles (BLOCK_N, BLOCK_D) of keys ``offs_n`` of sample ``b`` in the head's columns
    ``col``, and which of those keys are valid (in range and not padded). A padded key is never
    read: its K and V rows load as zeros, so NaN or inf stored there cannot reach a product."""
    valid = offs_n < n_k
    if HAS_PAD:
        pad = tl.load(PAD + b * stride_pb + offs_n, mask=valid, other=1)
        valid = valid & (pad == 0)
    kv_mask = valid[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + offs_n[:, None] * stride_kn + col[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vn + col[None, :],
                mask=kv_mask, other=0.0)
    return k, v, valid


@triton.jit
def _rows_tile(Q, qb, rows, m_ok, col, d_ok, stride_qb, stride_qm):
    """(BLOCK_M, BLOCK_D) tile of rows ``rows`` of sample ``qb`` in the head's columns."""
    return tl.load(Q + qb * stride_qb + rows[:, None] * stride_qm + col[None, :],
                   mask=m_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _delta(O, DO, b, rows, m_ok, col, d_ok, stride_ob, stride_om, stride_dob, stride_dom):
    """delta = rowsum(dO * O) over the head's columns (fp32)."""
    o = _rows_tile(O, b, rows, m_ok, col, d_ok, stride_ob, stride_om).to(tl.float32)
    do = _rows_tile(DO, b, rows, m_ok, col, d_ok, stride_dob, stride_dom).to(tl.float32)
    return tl.sum(o * do, 1), do


@_has_pad
@triton.jit
def _energy_attention_fwd_kernel(
    Q, K, V, PAD, O, LSE,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_pb,
    stride_ob, stride_om,
    n_heads, n_q, n_k, head_dim, qk_scale,
    HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    col = h * head_dim + offs_d
    q = _rows_tile(Q, b, offs_m, m_ok, col, d_ok, stride_qb, stride_qm)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, valid = _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn,
                                    stride_vb, stride_vn, stride_pb, HAS_PAD)
        s = mm(q, tl.trans(k), None, DOT_DTYPE, UPCAST, PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mm(p, v, acc * alpha[:, None], DOT_DTYPE, UPCAST, PREC)
        m_i = m_new
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # acc is 0 where no key is valid: zero output
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
    tl.store(O + b * stride_ob + offs_m[:, None] * stride_om + col[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * n_q + offs_m, lse, mask=m_ok)


@_has_pad
@triton.jit
def _energy_attention_bwd_dq_kernel(
    Q, K, V, PAD, O, DO, LSE, DQ,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_pb,
    stride_ob, stride_om, stride_dob, stride_dom, stride_dqb, stride_dqm,
    n_batch, n_heads, n_q, n_k, head_dim, qk_scale, sm_scale,
    SHARED_Q: tl.constexpr, HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = scale * sum_keys dS K, dS = P * (dP - delta), dP = dO V^T. With SHARED_Q the grid's
    second axis is the head only and the program sums dQ over the samples (deterministic)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_1 = tl.program_id(1).to(tl.int64)
    if SHARED_Q:
        h = pid_1
        b_lo = 0
        b_hi = n_batch
        qb = 0
    else:
        h = pid_1 % n_heads
        b_lo = pid_1 // n_heads
        b_hi = b_lo + 1
        qb = b_lo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    col = h * head_dim + offs_d
    q = _rows_tile(Q, qb, offs_m, m_ok, col, d_ok, stride_qb, stride_qm)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for b32 in range(b_lo, b_hi):
        b = pid_1 * 0 + b32  # int64 (pid_1 is), also under the interpreter where b32 is an int
        row = (b * n_heads + h) * n_q
        lse = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf"))
        delta, do = _delta(O, DO, b, offs_m, m_ok, col, d_ok, stride_ob, stride_om, stride_dob,
                           stride_dom)
        for start_n in range(0, n_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, valid = _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn,
                                        stride_vb, stride_vn, stride_pb, HAS_PAD)
            s = mm(q, tl.trans(k), None, DOT_DTYPE, UPCAST, PREC) * qk_scale
            p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = mm(do, tl.trans(v), None, DOT_DTYPE, UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dq = mm(ds, k, dq, DOT_DTYPE, UPCAST, PREC)
    dq = dq * sm_scale
    tl.store(DQ + qb * stride_dqb + offs_m[:, None] * stride_dqm + col[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@_has_pad
@triton.jit
def _energy_attention_bwd_dkdv_kernel(
    Q, K, V, PAD, O, DO, LSE, DK, DV,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_pb,
    stride_ob, stride_om, stride_dob, stride_dom, stride_dkb, stride_dkn, stride_dvb,
    stride_dvn,
    n_heads, n_q, n_k, head_dim, qk_scale, sm_scale,
    HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dV = P^T dO, dK = scale * dS^T Q for one key block, summed over all C*H queries of the
    sample in a fixed order (deterministic). Padded keys get exact zeros."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col = h * head_dim + offs_d
    kv_mask = (offs_n < n_k)[:, None] & d_ok[None, :]  # for the dK/dV stores
    k, v, valid = _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn,
                                stride_vb, stride_vn, stride_pb, HAS_PAD)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row = pid_bh * n_q
    for start_m in range(0, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_q
        q = _rows_tile(Q, b, offs_m, m_ok, col, d_ok, stride_qb, stride_qm)
        delta, do = _delta(O, DO, b, offs_m, m_ok, col, d_ok, stride_ob, stride_om, stride_dob,
                           stride_dom)
        lse = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf"))
        s_t = mm(k, tl.trans(q), None, DOT_DTYPE, UPCAST, PREC) * qk_scale  # (N, M)
        p_t = tl.where(valid[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dv = mm(p_t, do, dv, DOT_DTYPE, UPCAST, PREC)
        dp_t = mm(v, tl.trans(do), None, DOT_DTYPE, UPCAST, PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mm(ds_t, q, dk, DOT_DTYPE, UPCAST, PREC)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + offs_n[:, None] * stride_dkn + col[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + offs_n[:, None] * stride_dvn + col[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)
