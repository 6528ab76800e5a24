"""@triton.jit kernels of the all-layer action-head pass (M = L'*B*H rows through OFT's head).

``_la_norm_kernel``  one program per row: the row's K = NSEG * D elements gathered from a
                     strided (L', B, T, D) layer stack (segment j of row m = (l, b, h) is token
                     ``action_index[b, h*NSEG + j]`` of layer l; NSEG = 1 for a plain matrix),
                     rounded to the head's dtype as ``rows.to(head dtype)`` would, the LayerNorm
                     statistics in fp32 (sums shifted by the first chunk's mean), then either
                       NORM: LN(x) * gamma + beta rounded to the head's dtype -> a compact
                             (M, K) row buffer (what an eager LayerNorm outputs), or
                       FC2:  the head's last LayerNorm + fc2 (N = Da <= 16 outputs): the
                             rounded LN output times W2 (Da, K) accumulated in fp32, + b2.
                     An index outside [0, T) reads a row of zeros (never another sample's row).
``_la_gemm_kernel``  persistent (one program per SM) grouped-order GEMM over the compact rows:
                     y = act(A @ W^T + b) [+ R], A (M, K) and W (N, K) loaded by TMA tensor
                     descriptors, bias / activation / residual in the fp32 epilogue, one rounding
                     to the output dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._utils import ACT_NONE, ACT_RELU, mm


@triton.jit
def _segment_ptrs(X, INDEX, layer, b, h, j, d, d_ok, n_tok, stride_l, stride_b, stride_t,
                  stride_ib, NSEG: tl.constexpr, HAS_INDEX: tl.constexpr):
    """Pointers and mask of elements d of segment j of row (layer, b, h)."""
    if HAS_INDEX:
        tok = tl.load(INDEX + b * stride_ib + h * NSEG + j).to(tl.int64)
    else:
        tok = h * NSEG + j
    inside = (tok >= 0) & (tok < n_tok)
    tok = tl.where(inside, tok, 0)
    ptrs = X + layer * stride_l + b * stride_b + tok * stride_t + d
    return ptrs, d_ok & inside


@triton.jit
def _load_chunk(X, INDEX, layer, b, h, j, d0, D, n_tok, stride_l, stride_b, stride_t,
                stride_ib, NSEG: tl.constexpr, HAS_INDEX: tl.constexpr, ROUND: tl.constexpr,
                BLOCK: tl.constexpr):
    """Elements d0..d0+BLOCK of segment j of row (layer, b, h), rounded to ROUND, in fp32
    (0 outside the row), their offsets d and mask."""
    d = d0 + tl.arange(0, BLOCK)
    d_ok = d < D
    ptrs, ok = _segment_ptrs(X, INDEX, layer, b, h, j, d, d_ok, n_tok, stride_l, stride_b,
                             stride_t, stride_ib, NSEG, HAS_INDEX)
    return tl.load(ptrs, mask=ok, other=0.0).to(ROUND).to(tl.float32), d, d_ok


@triton.heuristics({"HAS_INDEX": lambda a: a["INDEX"] is not None})
@triton.jit
def _la_norm_kernel(X, INDEX, G, BETA, OUT, W2, B2, n_batch, n_chunk, n_tok, D, stride_l,
                    stride_b, stride_t, stride_ib, N2, eps,
                    NSEG: tl.constexpr, HAS_INDEX: tl.constexpr, FC2: tl.constexpr,
                    ROUND: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N2: tl.constexpr):
    """Row m = (layer, b, h) of the M = L' * n_batch * n_chunk rows; K = NSEG * D."""
    m = tl.program_id(0).to(tl.int64)
    h = m % n_chunk
    b = (m // n_chunk) % n_batch
    layer = m // (n_chunk * n_batch)
    K = NSEG * D
    # shifted sums: the shift is the first chunk's mean, so a row with |mean| >> std loses
    # nothing to cancellation in E[(x-s)^2] - E[x-s]^2
    x, d, d_ok = _load_chunk(X, INDEX, layer, b, h, 0, 0, D, n_tok, stride_l, stride_b,
                             stride_t, stride_ib, NSEG, HAS_INDEX, ROUND, BLOCK)
    shift = tl.sum(x, 0) / tl.sum(d_ok.to(tl.float32), 0)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, NSEG):
        for d0 in range(0, D, BLOCK):
            x, d, d_ok = _load_chunk(X, INDEX, layer, b, h, j, d0, D, n_tok, stride_l, stride_b,
                                     stride_t, stride_ib, NSEG, HAS_INDEX, ROUND, BLOCK)
            c = tl.where(d_ok, x - shift, 0.0)
            s1 += c
            s2 += c * c
    mean_c = tl.sum(s1, 0) / K
    m2 = tl.maximum(tl.sum(s2, 0) - K * mean_c * mean_c, 0.0)
    mean = shift + mean_c
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    n2 = tl.arange(0, BLOCK_N2)
    acc = tl.zeros([BLOCK_N2], dtype=tl.float32)
    for j in range(0, NSEG):
        for d0 in range(0, D, BLOCK):
            x, d, d_ok = _load_chunk(X, INDEX, layer, b, h, j, d0, D, n_tok, stride_l, stride_b,
                                     stride_t, stride_ib, NSEG, HAS_INDEX, ROUND, BLOCK)
            k = j * D + d
            g = tl.load(G + k, mask=d_ok, other=0.0).to(tl.float32)
            be = tl.load(BETA + k, mask=d_ok, other=0.0).to(tl.float32)
            y = ((x - mean) * rstd * g + be).to(ROUND)
            if FC2:
                w = tl.load(W2 + n2[:, None] * K + k[None, :],
                            mask=(n2 < N2)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * y.to(tl.float32)[None, :], 1)
            else:
                tl.store(OUT + m * K + k, y, mask=d_ok)
    if FC2:
        acc += tl.load(B2 + n2, mask=n2 < N2, other=0.0).to(tl.float32)
        tl.store(OUT + m * N2 + n2, acc.to(OUT.dtype.element_ty), mask=n2 < N2)


@triton.jit
def _tile_pid(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.heuristics({"HAS_RES": lambda a: a["R"] is not None})
@triton.jit
def _la_gemm_kernel(a_desc, w_desc, B, R, Y, M, N, K, NUM_PROGRAMS,
                    ACT: tl.constexpr, HAS_RES: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y (M, N) = act(A @ W^T + b) [+ R]; A, W through TMA descriptors (block shapes
    [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K]); R and y row-major with stride N."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_pid(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kt in range(k_tiles):
            a = a_desc.load([off_m, kt * BLOCK_K])
            w = w_desc.load([off_n, kt * BLOCK_K])
            acc = mm(a, w.T, acc, DOT_DTYPE, UPCAST, PREC)
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = off_n + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        acc += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if ACT == ACT_RELU:
            acc = tl.maximum(acc, 0.0)
        elif ACT != ACT_NONE:
            acc = acc * tl.sigmoid(acc)
        if HAS_RES:
            acc += tl.load(R + rows[:, None] * N + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        tl.store(Y + rows[:, None] * N + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)
