"""@triton.jit kernels of the fused MLP building block: a LayerNorm-prologue GEMM with a
bias / activation / residual epilogue, and the per-row LayerNorm statistics pre-pass.

    y[m, n] = act( sum_k LN(a)[m, k] * W[n, k] + b[n] ) (+ res[m, n])
    LN(a)[m, k] = (a[m, k] - mean[m]) * rstd[m] * gamma[k] + beta[k]

The A operand is read either as a plain strided matrix (x[m, k] at x + m*sxm + k*sxk) or
through a *segment gather*: row m is NSEG segments of SEG_LEN elements, segment j starting at
the element offset ``seg[m, j]`` (int64) from x's first element:
    a[m, j*SEG_LEN + d] = x[seg[m, j] + d*sxk]
(NSEG=1 and seg = row_index * sxm is a row gather; the layer-actions op uses NSEG = Da and
offsets that reach into every selected layer's tensor: plain address arithmetic, so it runs
compiled and under the interpreter, unlike pointers loaded from memory.)

LayerNorm strategy: statistics first (a pre-pass kernel, or an inline first pass over K when
the grid has a single N tile), then the A tile is normalised on the fly in registers before
the dot, in fp32, and rounded to the dot dtype as an eager LayerNorm output would be. Folding
gamma/beta into W was measured worse on outlier-heavy rows (see NOTES.md).
Row statistics use a chunked Chan/Welford merge (one read, no E[x^2]-E[x]^2 cancellation).
"""
from __future__ import annotations

import triton
import triton.language as tl

ACT_NONE, ACT_RELU, ACT_SILU = 0, 1, 2


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


@triton.jit
def _ln_stats_fwd_kernel(x_ptr, seg_ptr, mean_ptr, rstd_ptr, M, K, stride_xm, stride_xk, eps,
                         GATHER: tl.constexpr, NSEG: tl.constexpr, SEG_LEN: tl.constexpr,
                         SEG_ALIGN: tl.constexpr, ROUND_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """mean, rstd (M,) fp32 of the rows of A (after rounding to ROUND_DTYPE)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    mean, rstd = _row_stats(x_ptr, seg_ptr, rows, row_mask, K, stride_xm, stride_xk, eps,
                            GATHER, NSEG, SEG_LEN, SEG_ALIGN, ROUND_DTYPE, BLOCK_M, BLOCK_K)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _ln_gemm_fwd_kernel(
        x_ptr, seg_ptr, w_ptr, b_ptr, g_ptr, beta_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr,
        M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
        stride_ym, stride_yn, eps,
        GATHER: tl.constexpr, NSEG: tl.constexpr, SEG_LEN: tl.constexpr, SEG_ALIGN: tl.constexpr,
        NORMALIZE: tl.constexpr, STATS_INLINE: tl.constexpr, WRITE_STATS: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr, HAS_RES: tl.constexpr, DOT_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of y = act(LN(A) @ W^T + b) (+ res). W is (N, K).

    A is rounded to DOT_DTYPE on load (as ``x.to(weight.dtype)``), normalised in fp32, rounded
    to DOT_DTYPE again (an eager LayerNorm's output dtype) and fed to tl.dot with fp32
    accumulation. UPCAST (interpreter only) feeds fp32 operands instead (its bf16 dot is wrong).
    Statistics come from mean_ptr/rstd_ptr, or with STATS_INLINE from a first pass over K
    (written back by the pid_n == 0 programs when WRITE_STATS).
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
            if WRITE_STATS:
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
                acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = acc * tl.sigmoid(acc)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn,
                      mask=out_mask, other=0.0)
        acc = acc + res.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=out_mask)
