"""@triton.jit kernels of ``ln_linear``: ``y = act(LN(a) @ W^T + b) (+ res)`` forward and backward.

    y[m, n] = act( sum_k LN(a)[m, k] * W[n, k] + b[n] ) (+ res[m, n])
    LN(a)[m, k] = (a[m, k] - mean[m]) * rstd[m] * gamma[k] + beta[k]

Forward: ``_ln_linear_stats_kernel`` (per-row LayerNorm statistics, a chunked Chan/Welford merge:
one read, no E[x^2]-E[x]^2 cancellation) and ``_ln_linear_fwd_kernel`` (the GEMM, the A tile
normalised on the fly in fp32 and rounded to the dot dtype, as an eager LayerNorm's output would
be; statistics inline when the grid has one N tile). Folding gamma/beta into W instead was
measured worse on rows with |mean| >> std (NOTES.md).

The A operand is a strided matrix (x[m, k] at x + m*sxm + k*sxk) or a *segment gather*: row m
is NSEG segments of SEG_LEN elements, segment j starting ``seg[m, j]`` (int64) elements past
x's first element, ``a[m, j*SEG_LEN + d] = x[seg[m, j] + d*sxk]`` (NSEG = 1 with
seg = row_index * sxm is a row gather). Plain address arithmetic: it runs compiled and under
the interpreter, unlike pointers loaded from memory.

Backward (deterministic, no atomics; h = the pre-activation, recomputed by the forward GEMM):
  ``_ln_linear_act_bwd_kernel``  dh = dy * act'(h)
  ``_ln_linear_bwd_dw_kernel``   dW = dh^T @ LN(x) (LN recomputed from mean/rstd in the operand
                                 load), db = sum_m dh; one program per (N tile, K tile), looping
                                 over every row
  ``_ln_linear_bwd_dx_kernel``   da = dh @ W, then through the LayerNorm,
                                 dx = rstd * (da*g - mean_k(da*g) - xhat * mean_k(da*g*xhat)),
                                 one program per row block (pass 1: da, row sums, an fp32 scratch;
                                 pass 2: dx); per-row-block partials of dgamma and dbeta
Optional operands are ``None`` pointers; ``flags_from_pointers`` (a ``@triton.heuristics``)
derives their constexpr flags.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._utils import ACT_RELU, ACT_SILU, dot, flags_from_pointers


@triton.jit
def _segment_base(seg_ptr, rows, row_mask, j, GATHER: tl.constexpr, NSEG: tl.constexpr,
                  SEG_ALIGN: tl.constexpr):
    """(BLOCK_M,) int64 element offset of segment j of each row (0 without GATHER).
    SEG_ALIGN: every offset is a multiple of it (the launcher checked), so the A loads can be
    vectorised and pipelined (cp.async needs >= 4-byte aligned vectors)."""
    if GATHER:
        base = tl.load(seg_ptr + rows * NSEG + j, mask=row_mask, other=0)
        if SEG_ALIGN > 1:
            base = tl.multiple_of(base, SEG_ALIGN)
    else:
        base = tl.zeros_like(rows)
    return base


@triton.jit
def _load_a_tile(x_ptr, base, rows, row_mask, j, kk0, K, stride_xm, stride_xk,
                 GATHER: tl.constexpr, SEG_LEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) tile of A at columns j*SEG_LEN + kk0 + [0, BLOCK_K) (raw dtype; 0
    outside the matrix), its column indices and mask. The caller loops over segments j
    outside and kk0 inside, so inside a segment the addresses are affine in kk0 (the software
    pipeliner can prefetch them) and a tile never straddles two segments (with NSEG > 1 the
    launcher makes SEG_LEN a multiple of BLOCK_K; with NSEG = 1, SEG_LEN = K)."""
    kk = kk0 + tl.arange(0, BLOCK_K)
    ks = j * SEG_LEN + kk
    k_mask = ks < K
    mask = row_mask[:, None] & k_mask[None, :]
    if GATHER:
        ptrs = x_ptr + base[:, None] + kk[None, :].to(tl.int64) * stride_xk
    else:
        ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :].to(tl.int64) * stride_xk
    a = tl.load(ptrs, mask=mask, other=0.0)
    return a, ks, k_mask


@triton.jit
def _row_stats(x_ptr, seg_ptr, rows, row_mask, K, stride_xm, stride_xk, eps,
               GATHER: tl.constexpr, NSEG: tl.constexpr, SEG_LEN: tl.constexpr,
               SEG_ALIGN: tl.constexpr,
               ROUND_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row mean and 1/sqrt(var + eps) over K (fp32), chunk-wise Chan/Welford merge."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(0, NSEG):
        base = _segment_base(seg_ptr, rows, row_mask, j, GATHER, NSEG, SEG_ALIGN)
        for kk0 in range(0, SEG_LEN, BLOCK_K):
            a, ks, k_mask = _load_a_tile(x_ptr, base, rows, row_mask, j, kk0, K, stride_xm,
                                         stride_xk, GATHER, SEG_LEN, BLOCK_K)
            a = a.to(ROUND_DTYPE).to(tl.float32)
            k0 = j * SEG_LEN + kk0
            n_a = k0 * 1.0
            n_b = tl.minimum(K - k0, BLOCK_K) * 1.0
            c_mean = tl.sum(a, axis=1) / n_b
            d = tl.where(k_mask[None, :], a - c_mean[:, None], 0.0)
            c_m2 = tl.sum(d * d, axis=1)
            delta = c_mean - mean
            n = n_a + n_b
            mean = mean + delta * (n_b / n)
            m2 = m2 + c_m2 + delta * delta * (n_a * n_b / n)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    return mean, rstd


@flags_from_pointers(GATHER="seg_ptr")
@triton.jit
def _ln_linear_stats_kernel(x_ptr, seg_ptr, mean_ptr, rstd_ptr, M, K, stride_xm, stride_xk, eps,
                            GATHER: tl.constexpr, NSEG: tl.constexpr, SEG_LEN: tl.constexpr,
                            SEG_ALIGN: tl.constexpr, ROUND_DTYPE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """mean, rstd (M,) fp32 of the rows of A (after rounding to ROUND_DTYPE)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    mean, rstd = _row_stats(x_ptr, seg_ptr, rows, row_mask, K, stride_xm, stride_xk, eps,
                            GATHER, NSEG, SEG_LEN, SEG_ALIGN, ROUND_DTYPE, BLOCK_M, BLOCK_K)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@flags_from_pointers(GATHER="seg_ptr", HAS_BIAS="b_ptr", NORMALIZE="mean_ptr", HAS_GAMMA="g_ptr",
                     HAS_BETA="beta_ptr", HAS_RES="res_ptr")
@triton.jit
def _ln_linear_fwd_kernel(
        x_ptr, seg_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr,
        M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
        stride_ym, stride_yn, eps,
        GATHER: tl.constexpr, NSEG: tl.constexpr, SEG_LEN: tl.constexpr, SEG_ALIGN: tl.constexpr,
        NORMALIZE: tl.constexpr, STATS_INLINE: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr, HAS_RES: tl.constexpr, DOT_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of y = act(LN(A) @ W^T + b) (+ res). W is (N, K).

    A is rounded to DOT_DTYPE on load (as ``x.to(weight.dtype)``), normalised in fp32, rounded
    to DOT_DTYPE again and fed to tl.dot with fp32 accumulation. UPCAST (interpreter only) feeds
    fp32 operands instead. Statistics come from mean_ptr/rstd_ptr, or with STATS_INLINE from a
    first pass over K (then written there by the pid_n == 0 programs).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share each W column tile while it is in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = (first_pid_m + ((pid % num_pid_in_group) % group_size_m)).to(tl.int64)
    pid_n = ((pid % num_pid_in_group) // group_size_m).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N

    if NORMALIZE:
        if STATS_INLINE:
            mean, rstd = _row_stats(x_ptr, seg_ptr, rows, row_mask, K, stride_xm, stride_xk,
                                    eps, GATHER, NSEG, SEG_LEN, SEG_ALIGN, DOT_DTYPE, BLOCK_M,
                                    BLOCK_K)
            if pid_n == 0:
                tl.store(mean_ptr + rows, mean, mask=row_mask)
                tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        else:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in range(0, NSEG):
        base = _segment_base(seg_ptr, rows, row_mask, j, GATHER, NSEG, SEG_ALIGN)
        for kk0 in range(0, SEG_LEN, BLOCK_K):
            a, ks, k_mask = _load_a_tile(x_ptr, base, rows, row_mask, j, kk0, K, stride_xm,
                                         stride_xk, GATHER, SEG_LEN, BLOCK_K)
            a = a.to(DOT_DTYPE)
            if NORMALIZE:
                af = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
                if HAS_GAMMA:
                    g = tl.load(g_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
                    af = af * g[None, :]
                if HAS_BETA:
                    be = tl.load(beta_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
                    af = af + be[None, :]
                af = tl.where(k_mask[None, :], af, 0.0)
                a = af.to(DOT_DTYPE)
            w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None].to(tl.int64) * stride_wk,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = dot(a, w, acc, INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if ACT == ACT_RELU:
        acc = tl.maximum(acc, 0.0)
    elif ACT == ACT_SILU:
        acc = acc * tl.sigmoid(acc)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn,
                      mask=out_mask, other=0.0)
        acc = acc + res.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _ln_linear_act_bwd_kernel(DY, H, DH, M, N, stride_dym, stride_hm, stride_dhm,
                              ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dh = dy * act'(h), fp32 out."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + rows[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACT == ACT_RELU:
        dh = tl.where(h > 0.0, dy, 0.0)
    else:
        sig = tl.sigmoid(h)
        dh = dy * sig * (1.0 + h * (1.0 - sig))
    tl.store(DH + rows[:, None] * stride_dhm + cols[None, :], dh, mask=mask)


@triton.jit
def _ln_tile(X, MEAN, RSTD, G, BETA, rows, ks, M, K, stride_xm, stride_xk,
             NORMALIZE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
             DOT_DTYPE: tl.constexpr):
    """(xhat, a): x rounded to the dot dtype as the forward did, normalised (fp32), and
    a = xhat * gamma + beta (fp32). Without NORMALIZE both are x."""
    r_ok = rows < M
    k_ok = ks < K
    x = tl.load(X + rows[:, None] * stride_xm + ks[None, :].to(tl.int64) * stride_xk,
                mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    x = x.to(DOT_DTYPE).to(tl.float32)
    if NORMALIZE:
        mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]
        a = xhat
        if HAS_GAMMA:
            a = a * tl.load(G + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BETA:
            a = a + tl.load(BETA + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    else:
        xhat = x
        a = x
    return xhat, a


@flags_from_pointers(NORMALIZE="MEAN", HAS_GAMMA="G", HAS_BETA="BETA", HAS_BIAS="DB")
@triton.jit
def _ln_linear_bwd_dw_kernel(
    DH, X, MEAN, RSTD, G, BETA, DW, DB,
    M, N, K, stride_dhm, stride_xm, stride_xk, stride_dwn,
    NORMALIZE: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[n, k] = sum_m dh[m, n] * a[m, k]; db[n] = sum_m dh[m, n] (programs with K tile 0)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = cols < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        dh = tl.load(DH + rows[:, None] * stride_dhm + cols[None, :],
                     mask=(rows < M)[:, None] & n_ok[None, :], other=0.0)
        _, a = _ln_tile(X, MEAN, RSTD, G, BETA, rows, ks, M, K, stride_xm, stride_xk,
                        NORMALIZE, HAS_GAMMA, HAS_BETA, DOT_DTYPE)
        if HAS_BIAS:
            db += tl.sum(dh, 0)
        if UPCAST:
            acc = dot(tl.trans(dh), a, acc, INPUT_PRECISION)
        else:
            acc = dot(tl.trans(dh.to(DOT_DTYPE)), a.to(DOT_DTYPE), acc, INPUT_PRECISION)
    tl.store(DW + cols[:, None] * stride_dwn + ks[None, :], acc.to(DW.dtype.element_ty),
             mask=n_ok[:, None] & (ks < K)[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=n_ok)


@flags_from_pointers(NORMALIZE="MEAN", HAS_GAMMA="G", NEED_DX="DX", NEED_PARTS="DG_PART")
@triton.jit
def _ln_linear_bwd_dx_kernel(
    DH, W, X, MEAN, RSTD, G, DX, SCRATCH, DG_PART, DBETA_PART,
    M, N, K, stride_dhm, stride_wn, stride_wk, stride_xm, stride_xk, stride_dxm,
    stride_sm,
    NORMALIZE: tl.constexpr, HAS_GAMMA: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_PARTS: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """da = dh @ W; dx through the LayerNorm; per-row-block partials of dgamma and dbeta."""
    pid_m = tl.program_id(0).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < M
    c1 = tl.zeros([BLOCK_M], tl.float32)
    c2 = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        da = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            n_ok = cols < N
            dh = tl.load(DH + rows[:, None] * stride_dhm + cols[None, :],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(W + cols[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                da = dot(dh, w.to(tl.float32), da, INPUT_PRECISION)
            else:
                da = dot(dh.to(DOT_DTYPE), w, da, INPUT_PRECISION)
        if NORMALIZE:
            xhat, _ = _ln_tile(X, MEAN, RSTD, G, G, rows, ks, M, K, stride_xm, stride_xk,
                               True, False, False, DOT_DTYPE)
            if NEED_PARTS:
                tl.store(DG_PART + pid_m * K + ks, tl.sum(da * xhat, 0), mask=k_ok)
                tl.store(DBETA_PART + pid_m * K + ks, tl.sum(da, 0), mask=k_ok)
            if NEED_DX:
                dxhat = da
                if HAS_GAMMA:
                    dxhat = da * tl.load(G + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                c1 += tl.sum(dxhat, 1)
                c2 += tl.sum(dxhat * xhat, 1)
                tl.store(SCRATCH + rows[:, None] * stride_sm + ks[None, :], dxhat,
                         mask=r_ok[:, None] & k_ok[None, :])
        else:
            tl.store(DX + rows[:, None] * stride_dxm + ks[None, :], da.to(DX.dtype.element_ty),
                     mask=r_ok[:, None] & k_ok[None, :])
    if NORMALIZE:
        if NEED_DX:
            tl.debug_barrier()
            c1 = c1 / K
            c2 = c2 / K
            rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask = r_ok[:, None] & (ks < K)[None, :]
                xhat, _ = _ln_tile(X, MEAN, RSTD, G, G, rows, ks, M, K, stride_xm, stride_xk,
                                   True, False, False, DOT_DTYPE)
                dxhat = tl.load(SCRATCH + rows[:, None] * stride_sm + ks[None, :], mask=mask,
                                other=0.0)
                dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
                tl.store(DX + rows[:, None] * stride_dxm + ks[None, :], dx.to(DX.dtype.element_ty),
                         mask=mask)
