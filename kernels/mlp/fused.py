"""@triton.jit kernels of the layer stack: a sequence of LN-linear layers, each
``y = act(LN(x) @ W^T + b) [+ x] [+ pe]``, driven by a table (launch.py builds it), forward and
backward, in a handful of launches whatever the number of layers: the MLPResNets of the energy
model (and any MLPResNet, op.py) run through them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._utils import ACT_NONE, ACT_RELU, ACT_SILU, flags_from_pointers, mm


# ============================================================================================
# The layer stack: a sequence of LN-linear layers driven by a table (the energy model's
# encoders and head), forward and backward, in a handful of launches.
#
# A layer i (one row of the int64 table T, columns COL_*; eps in EPS[i]):
#     y = act(LN(x) @ W^T + b) [+ x] [+ pe[row % pe_rows]]       x (M, K), y (M, N)
# x is the layer input: rows of the fp32 workspace WS (at T[i, IN] >= 0, row stride K) or, in a
# launch compiled with HAS_X, the external X (IN = -1; rows masked by PAD: a padded row reads
# as zeros). Every saved tensor lives in WS (fp32): the output, the pre-activation (PRE, when
# act), the row statistics (MU, RSTD: the LayerNorm's, or 0 and 1 for a layer without one,
# whose gamma/beta point at constant ones/zeros in P: ONE code path in every K loop).
# Parameters are offsets into ONE flat tensor P (the model's parameters concatenated), their
# gradients the same offsets into G. The backward scratch (dy, dpre, dx) lives in WB (fp32).
#
#   _stack_fwd_kernel    one program per BLOCK_M rows runs layers [l0, l0 + n) in order (a
#                        barrier between layers: each program owns its rows in every layer);
#                        a single layer may also split its N tiles over grid axis 1
#   _stack_bwd_kernel    the same rows, the layers in reverse: dpre = dy * act'(pre) (kept for
#                        the weight gradients), dx = LN_bwd(dpre @ W) [+ dy] (the next layer's dy)
#   _stack_dw_kernel     weight gradients, one program per (layer, N tile, K tile) of a work
#                        table: G = dpre^T @ xhat (xhat recomputed from x and the saved
#                        statistics), dW = G * gamma + db beta^T, db = sum_m dpre, and per-N-tile
#                        partials of dgamma = sum_n W * G, dbeta = sum_n W * db (the identity that
#                        needs no dx GEMM: the context's dx is never computed)
#   _stack_dgamma_kernel sums those partials in a fixed order (deterministic, no atomics)
# ============================================================================================
#: the table's columns (host side: launch.py builds rows with these indices)
STACK_COLS = {"K": 0, "N": 1, "M": 2, "IN": 3, "OUT": 4, "PRE": 5, "MU": 6, "RSTD": 7, "W": 8, "B": 9, "G": 10, "BETA": 11, "ACT": 12, "RES": 13, "PE": 14, "DY": 15, "DPRE": 16, "DX": 17, "SCR": 18, "GW": 19, "GB": 20, "GG": 21, "GBETA": 22, "PART": 23, "LN": 24}
NCOL = tl.constexpr(len(STACK_COLS))
COL_K = tl.constexpr(STACK_COLS["K"])
COL_N = tl.constexpr(STACK_COLS["N"])
COL_M = tl.constexpr(STACK_COLS["M"])
COL_IN = tl.constexpr(STACK_COLS["IN"])
COL_OUT = tl.constexpr(STACK_COLS["OUT"])
COL_PRE = tl.constexpr(STACK_COLS["PRE"])
COL_MU = tl.constexpr(STACK_COLS["MU"])
COL_RSTD = tl.constexpr(STACK_COLS["RSTD"])
COL_W = tl.constexpr(STACK_COLS["W"])
COL_B = tl.constexpr(STACK_COLS["B"])
COL_G = tl.constexpr(STACK_COLS["G"])
COL_BETA = tl.constexpr(STACK_COLS["BETA"])
COL_ACT = tl.constexpr(STACK_COLS["ACT"])
COL_RES = tl.constexpr(STACK_COLS["RES"])
COL_PE = tl.constexpr(STACK_COLS["PE"])
COL_DY = tl.constexpr(STACK_COLS["DY"])
COL_DPRE = tl.constexpr(STACK_COLS["DPRE"])
COL_DX = tl.constexpr(STACK_COLS["DX"])
COL_SCR = tl.constexpr(STACK_COLS["SCR"])
COL_GW = tl.constexpr(STACK_COLS["GW"])
COL_GB = tl.constexpr(STACK_COLS["GB"])
COL_GG = tl.constexpr(STACK_COLS["GG"])
COL_GBETA = tl.constexpr(STACK_COLS["GBETA"])
COL_PART = tl.constexpr(STACK_COLS["PART"])
COL_LN = tl.constexpr(STACK_COLS["LN"])


@triton.jit
def _col(T, li, c):
    return tl.load(T + li * NCOL + c)


@triton.jit
def _in_tile(WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, HAS_X: tl.constexpr,
             HAS_PAD: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 tile of a layer input: WS rows (in_off >= 0, row stride K) or,
    with HAS_X, X rows (in_off < 0; a padded row reads as zeros)."""
    mask = row_ok[:, None] & k_ok[None, :]
    if HAS_X:
        if in_off >= 0:
            a = tl.load(WS + in_off + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
        else:
            if HAS_PAD:
                keep = tl.load(PAD + rows, mask=row_ok, other=1) == 0
                mask = mask & keep[:, None]
            a = tl.load(X + rows[:, None] * sx + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        a = tl.load(WS + in_off + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
    return a


@triton.jit
def _in_stats(WS, X, PAD, in_off, rows, row_ok, K, sx, eps, HAS_X: tl.constexpr,
              HAS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row mean and 1/sqrt(var + eps) of the layer input over K (fp32, a chunk-wise
    Chan/Welford merge: one read, no E[x^2] - E[x]^2 cancellation)."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _in_tile(WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, HAS_X, HAS_PAD)
        n_a = k0 * 1.0
        n_b = tl.minimum(K - k0, BLOCK_K) * 1.0
        c_mean = tl.sum(a, axis=1) / n_b
        d = tl.where(k_ok[None, :], a - c_mean[:, None], 0.0)
        c_m2 = tl.sum(d * d, axis=1)
        delta = c_mean - mean
        n = n_a + n_b
        mean = mean + delta * (n_b / n)
        m2 = m2 + c_m2 + delta * delta * (n_a * n_b / n)
    return mean, 1.0 / tl.sqrt(m2 / K + eps)


@flags_from_pointers(HAS_PAD="PAD")
@triton.jit
def _stack_fwd_kernel(T, EPS, P, WS, X, PAD, PE, OUT, layer0, n_layers, sx, pe_rows,
                      HAS_X: tl.constexpr, HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Layers [layer0, layer0 + n_layers) on rows pid_m*BLOCK_M..; grid axis 1 splits the N
    tiles (only with one layer). An output at OUT = -1 goes to the external OUT (its dtype)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for li in range(layer0, layer0 + n_layers):
        K = _col(T, li, COL_K)
        N = _col(T, li, COL_N)
        in_off = _col(T, li, COL_IN)
        w_off = _col(T, li, COL_W)
        g_off = _col(T, li, COL_G)
        beta_off = _col(T, li, COL_BETA)
        row_ok = rows < _col(T, li, COL_M)
        if _col(T, li, COL_LN) != 0:
            mean, rstd = _in_stats(WS, X, PAD, in_off, rows, row_ok, K, sx, tl.load(EPS + li),
                                   HAS_X, HAS_PAD, BLOCK_M, BLOCK_K)
        else:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            rstd = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if pid_n == 0:
            tl.store(WS + _col(T, li, COL_MU) + rows, mean, mask=row_ok)
            tl.store(WS + _col(T, li, COL_RSTD) + rows, rstd, mask=row_ok)
        n_tiles = tl.cdiv(N, BLOCK_N)
        per = tl.cdiv(n_tiles, n_split)
        t_lo = pid_n * per
        t_hi = tl.minimum(t_lo + per, n_tiles)
        for t in range(t_lo, t_hi):
            cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                a = _in_tile(WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, HAS_X, HAS_PAD)
                g = tl.load(P + g_off + ks, mask=k_ok, other=0.0).to(tl.float32)
                be = tl.load(P + beta_off + ks, mask=k_ok, other=0.0).to(tl.float32)
                a = (a - mean[:, None]) * (rstd[:, None] * g[None, :]) + be[None, :]
                w = tl.load(P + w_off + cols[:, None] * K + ks[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc = mm(a, tl.trans(w), acc, DOT_DTYPE, UPCAST, PREC)
            _stack_epilogue(acc, T, li, P, WS, X, PAD, PE, OUT, rows, row_ok, cols, col_ok, in_off,
                            K, N, sx, pe_rows, HAS_X, HAS_PAD)
        tl.debug_barrier()  # the next layer reads this layer's rows, written by other threads


@triton.jit
def _activation(h, act):
    """act(h) for the runtime code ``act`` (none / relu / silu), without control flow."""
    return tl.where(act == ACT_RELU, tl.maximum(h, 0.0),
                    tl.where(act == ACT_SILU, h * tl.sigmoid(h), h))


@triton.jit
def _activation_grad(dy, h, act):
    """dy * act'(h) for the runtime code ``act``, without control flow."""
    sig = tl.sigmoid(h)
    return tl.where(act == ACT_RELU, tl.where(h > 0.0, dy, 0.0),
                    tl.where(act == ACT_SILU, dy * sig * (1.0 + h * (1.0 - sig)), dy))


@triton.jit
def _stack_epilogue(acc, T, li, P, WS, X, PAD, PE, OUT, rows, row_ok, cols, col_ok, in_off, K,
                    N, sx, pe_rows, HAS_X: tl.constexpr, HAS_PAD: tl.constexpr):
    """+ b, the pre-activation saved (act), act, + the layer input (res), + pe, stored: the
    per-layer options are masks, not branches (one code path for every layer)."""
    acc += tl.load(P + _col(T, li, COL_B) + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    act = _col(T, li, COL_ACT)
    tl.store(WS + _col(T, li, COL_PRE) + rows[:, None] * N + cols[None, :], acc,
             mask=out_mask & (act != 0))
    acc = _activation(acc, act)
    res = _in_tile(WS, X, PAD, in_off, rows, row_ok & (_col(T, li, COL_RES) != 0), cols, col_ok,
                   K, sx, HAS_X, HAS_PAD)  # the block's input, same columns (K == N)
    pe = tl.load(PE + (rows % pe_rows)[:, None] * N + cols[None, :],
                 mask=out_mask & (_col(T, li, COL_PE) != 0), other=0.0).to(tl.float32)
    acc = acc + res + pe
    out_off = _col(T, li, COL_OUT)
    tl.store(WS + out_off + rows[:, None] * N + cols[None, :], acc, mask=out_mask & (out_off >= 0))
    tl.store(OUT + rows[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=out_mask & (out_off < 0))


@triton.jit
def _dy_tile(WB, DY, dy_off, rows, cols, mask, N):
    if dy_off >= 0:
        dy = tl.load(WB + dy_off + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    else:
        dy = tl.load(DY + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return dy


@triton.jit
def _store_dx(WB, DX, dx_off, rows, ks, mask, K, dx):
    if dx_off >= 0:
        tl.store(WB + dx_off + rows[:, None] * K + ks[None, :], dx, mask=mask)
    else:
        tl.store(DX + rows[:, None] * K + ks[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@flags_from_pointers(HAS_PAD="PAD")
@triton.jit
def _stack_bwd_kernel(T, P, WS, WB, X, PAD, DY, DX, layer_last, n_layers, sx,
                      HAS_X: tl.constexpr, HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Layers layer_last, layer_last - 1, ... (n_layers of them) on rows pid*BLOCK_M..:
    dpre = dy * act'(pre) -> WB[DPRE]; then, unless DX = -2, dx = LN_bwd(dpre @ W) [+ dy]:
    dxhat = (dpre @ W) * gamma (kept in WB[SCR]), dx = rstd * (dxhat - mean_k(dxhat) -
    xhat * mean_k(dxhat * xhat)) (a layer without LayerNorm: dxhat itself). dy comes from
    WB[DY] (DY = -1: the external DY), dx goes to WB[DX] (DX = -1: the external DX, in its
    dtype; a padded X row gets exact zeros)."""
    pid_m = tl.program_id(0).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for i in range(0, n_layers):
        li = layer_last - i
        K = _col(T, li, COL_K)
        N = _col(T, li, COL_N)
        row_ok = rows < _col(T, li, COL_M)
        pre_off = _col(T, li, COL_PRE)
        act = _col(T, li, COL_ACT)
        dy_off = _col(T, li, COL_DY)
        dpre_off = _col(T, li, COL_DPRE)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            dp = _dy_tile(WB, DY, dy_off, rows, cols, mask, N)
            h = tl.load(WS + pre_off + rows[:, None] * N + cols[None, :], mask=mask & (act != 0),
                        other=0.0)
            dp = _activation_grad(dp, h, act)
            tl.store(WB + dpre_off + rows[:, None] * N + cols[None, :], dp, mask=mask)
        tl.debug_barrier()
        dx_off = _col(T, li, COL_DX)
        if dx_off != -2:
            _stack_dx(T, li, P, WS, WB, X, PAD, DY, DX, rows, row_ok, K, N, sx, dy_off, dpre_off,
                      dx_off, HAS_X, HAS_PAD, DOT_DTYPE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.debug_barrier()


@triton.jit
def _dxhat_tile(P, WB, dpre_off, w_off, g_off, rows, row_ok, ks, k_ok, N, K,
                DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(dpre @ W)[rows, ks] * gamma[ks], fp32 (BLOCK_M, BLOCK_K): dpre (M, N) in WB at
    dpre_off, W (N, K) and gamma (K,) in P; the chain's and the tiled dx share it."""
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dp = tl.load(WB + dpre_off + rows[:, None] * N + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(P + w_off + cols[:, None] * K + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = mm(dp, w, acc, DOT_DTYPE, UPCAST, PREC)
    return acc * tl.load(P + g_off + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _ln_dx_tile(WB, scr_off, WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, mean, rstd,
                c1, c2, ln, HAS_X: tl.constexpr, HAS_PAD: tl.constexpr):
    """The LayerNorm backward of one (rows, ks) tile: dxhat from the scratch at scr_off, and
    with ``ln`` rstd * (dxhat - c1 - xhat * c2) (c1, c2: the row means of dxhat and
    dxhat * xhat); the chain's and the row pass's second sweep."""
    mask = row_ok[:, None] & k_ok[None, :]
    dx = tl.load(WB + scr_off + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
    if ln:
        x = _in_tile(WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, HAS_X, HAS_PAD)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = rstd[:, None] * (dx - c1[:, None] - xhat * c2[:, None])
    return dx


@triton.jit
def _stack_dx(T, li, P, WS, WB, X, PAD, DY, DX, rows, row_ok, K, N, sx, dy_off, dpre_off,
              dx_off, HAS_X: tl.constexpr, HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx of layer li for this program's rows (two passes over K: dxhat and its row sums, then
    the LayerNorm backward; without LayerNorm mean 0 / rstd 1 / gamma 1 make it dxhat + 0)."""
    in_off = _col(T, li, COL_IN)
    w_off = _col(T, li, COL_W)
    g_off = _col(T, li, COL_G)
    scr_off = _col(T, li, COL_SCR)
    res = _col(T, li, COL_RES)
    ln = _col(T, li, COL_LN) != 0
    mean = tl.load(WS + _col(T, li, COL_MU) + rows, mask=row_ok, other=0.0)
    rstd = tl.load(WS + _col(T, li, COL_RSTD) + rows, mask=row_ok, other=0.0)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        kmask = row_ok[:, None] & k_ok[None, :]
        dxh = _dxhat_tile(P, WB, dpre_off, w_off, g_off, rows, row_ok, ks, k_ok, N, K,
                          DOT_DTYPE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        if ln:
            x = _in_tile(WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, HAS_X, HAS_PAD)
            xhat = tl.where(kmask, (x - mean[:, None]) * rstd[:, None], 0.0)
            c1 += tl.sum(dxh, 1)
            c2 += tl.sum(dxh * xhat, 1)
        tl.store(WB + scr_off + rows[:, None] * K + ks[None, :], dxh, mask=kmask)
    tl.debug_barrier()
    c1 = c1 / K
    c2 = c2 / K
    keep = row_ok
    if HAS_PAD:
        keep = keep & ((tl.load(PAD + rows, mask=row_ok, other=1) == 0) | (in_off >= 0))
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        kmask = row_ok[:, None] & k_ok[None, :]
        dx = _ln_dx_tile(WB, scr_off, WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, mean,
                         rstd, c1, c2, ln, HAS_X, HAS_PAD)
        if res != 0:
            dx += _dy_tile(WB, DY, dy_off, rows, ks, kmask, N)
        dx = tl.where(keep[:, None], dx, 0.0)
        _store_dx(WB, DX, dx_off, rows, ks, kmask, K, dx)


@flags_from_pointers(HAS_PAD="PAD")
@triton.jit
def _stack_dw_kernel(T, WORK, P, WS, WB, X, PAD, G, PART, sx,
                     HAS_X: tl.constexpr, HAS_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (layer, N tile, K tile) of WORK per program: G = dpre^T @ xhat over the layer's M
    rows (fp32 accumulation; xhat = (x - mu) * rstd from the saved statistics, x itself for a
    layer without LayerNorm), then dW = G * gamma + db beta^T, db = sum_m dpre (written by K
    tile 0), and for a LayerNorm layer this N tile's partial dgamma = sum_n W * G and dbeta =
    sum_n W * db into PART (summed by _stack_dgamma_kernel)."""
    pid = tl.program_id(0).to(tl.int64)
    li = tl.load(WORK + pid * 3)
    nt = tl.load(WORK + pid * 3 + 1)
    kt = tl.load(WORK + pid * 3 + 2)
    K = _col(T, li, COL_K)
    N = _col(T, li, COL_N)
    M = _col(T, li, COL_M)
    in_off = _col(T, li, COL_IN)
    mu_off = _col(T, li, COL_MU)
    rstd_off = _col(T, li, COL_RSTD)
    dpre_off = _col(T, li, COL_DPRE)
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < N
    k_ok = ks < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < M
        dp = tl.load(WB + dpre_off + rows[:, None] * N + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = _in_tile(WS, X, PAD, in_off, rows, row_ok, ks, k_ok, K, sx, HAS_X, HAS_PAD)
        mean = tl.load(WS + mu_off + rows, mask=row_ok, other=0.0)
        rstd = tl.load(WS + rstd_off + rows, mask=row_ok, other=0.0)
        xhat = tl.where(row_ok[:, None] & k_ok[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        acc = mm(tl.trans(dp), xhat, acc, DOT_DTYPE, UPCAST, PREC)
        db += tl.sum(dp, 0)
    wmask = col_ok[:, None] & k_ok[None, :]
    g = tl.load(P + _col(T, li, COL_G) + ks, mask=k_ok, other=0.0).to(tl.float32)
    be = tl.load(P + _col(T, li, COL_BETA) + ks, mask=k_ok, other=0.0).to(tl.float32)
    if _col(T, li, COL_LN) != 0:
        w = tl.load(P + _col(T, li, COL_W) + cols[:, None] * K + ks[None, :], mask=wmask,
                    other=0.0).to(tl.float32)
        part = PART + _col(T, li, COL_PART)
        n_tiles = tl.cdiv(N, BLOCK_N)
        tl.store(part + nt * K + ks, tl.sum(w * acc, 0), mask=k_ok)
        tl.store(part + (n_tiles + nt) * K + ks, tl.sum(w * db[:, None], 0), mask=k_ok)
    acc = acc * g[None, :] + db[:, None] * be[None, :]
    tl.store(G + _col(T, li, COL_GW) + cols[:, None] * K + ks[None, :],
             acc.to(G.dtype.element_ty), mask=wmask)
    gb = _col(T, li, COL_GB)
    if (kt == 0) & (gb >= 0):
        tl.store(G + gb + cols, db.to(G.dtype.element_ty), mask=col_ok)


@triton.jit
def _stack_dgamma_kernel(T, WORK, PART, G, BLOCK_N_DW, BLOCK_K: tl.constexpr):
    """One (LN layer, K tile) of WORK per program: dgamma, dbeta = the sums of that layer's
    per-N-tile partials, in tile order."""
    pid = tl.program_id(0).to(tl.int64)
    li = tl.load(WORK + pid * 2)
    kt = tl.load(WORK + pid * 2 + 1)
    K = _col(T, li, COL_K)
    n_tiles = tl.cdiv(_col(T, li, COL_N), BLOCK_N_DW)
    part = PART + _col(T, li, COL_PART)
    ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    dg = tl.zeros([BLOCK_K], dtype=tl.float32)
    dbeta = tl.zeros([BLOCK_K], dtype=tl.float32)
    for t in range(0, n_tiles):
        dg += tl.load(part + t * K + ks, mask=k_ok, other=0.0)
        dbeta += tl.load(part + (n_tiles + t) * K + ks, mask=k_ok, other=0.0)
    tl.store(G + _col(T, li, COL_GG) + ks, dg.to(G.dtype.element_ty), mask=k_ok)
    tl.store(G + _col(T, li, COL_GBETA) + ks, dbeta.to(G.dtype.element_ty), mask=k_ok)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows, cols) of this program's tile; GROUP_M row tiles share a column tile in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % group) % size_m).to(tl.int64)
    pid_n = ((pid % group) // size_m).to(tl.int64)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_n


@flags_from_pointers(HAS_PAD="PAD", HAS_PE="PE", OUT_EXT="OUT")
@triton.jit
def _linear_tiled_kernel(X, PAD, P, WS, M, N, K, sx, in_off, w_off, b_off, g_off, beta_off,
                         out_off, pre_off, mu_off, rstd_off, eps, OUT, PE, pe_rows,
                         IN_X: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr,
                         ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_PE: tl.constexpr,
                         OUT_EXT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One layer of a plan over many rows, compiled for it (every option a constexpr): a tiled
    grid over (rows, N), grouped ordering. Input: X (IN_X; a padded row reads as zeros) or WS
    rows at in_off (row stride K). With HAS_LN the row statistics over K are computed first by
    every program (pid_n == 0 stores them) and the A tile is normalised in fp32 in the K loop.
    Epilogue: bias, the pre-activation saved (ACT), act, + the input (HAS_RES, K == N), + PE
    (HAS_PE: pe (pe_rows, N) at row % pe_rows); out to WS at out_off (row stride N), or to the
    external OUT in its dtype (OUT_EXT: a chain's last layer, e.g. the head's N = 1)."""
    rows, cols, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row_ok = rows < M
    col_ok = cols < N
    src = -1 if IN_X else in_off
    if HAS_LN:
        mean, rstd = _in_stats(WS, X, PAD, src, rows, row_ok, K, sx, eps, IN_X, HAS_PAD,
                               BLOCK_M, BLOCK_K)
    else:  # the statistics the weight-gradient launch reads for every layer: 0 and 1
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if pid_n == 0:
        tl.store(WS + mu_off + rows, mean, mask=row_ok)
        tl.store(WS + rstd_off + rows, rstd, mask=row_ok)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _in_tile(WS, X, PAD, src, rows, row_ok, ks, k_ok, K, sx, IN_X, HAS_PAD)
        if HAS_LN:
            g = tl.load(P + g_off + ks, mask=k_ok, other=0.0).to(tl.float32)
            be = tl.load(P + beta_off + ks, mask=k_ok, other=0.0).to(tl.float32)
            a = (a - mean[:, None]) * (rstd[:, None] * g[None, :]) + be[None, :]
        w = tl.load(P + w_off + cols[:, None] * K + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = mm(a, tl.trans(w), acc, DOT_DTYPE, UPCAST, PREC)
    acc += tl.load(P + b_off + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ACT != ACT_NONE:
        tl.store(WS + pre_off + rows[:, None] * N + cols[None, :], acc, mask=mask)
        if ACT == ACT_RELU:
            acc = tl.maximum(acc, 0.0)
        else:
            acc = acc * tl.sigmoid(acc)
    if HAS_RES:
        acc += _in_tile(WS, X, PAD, src, rows, row_ok, cols, col_ok, K, sx, IN_X, HAS_PAD)
    if HAS_PE:
        acc += tl.load(PE + (rows % pe_rows)[:, None] * N + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    if OUT_EXT:
        tl.store(OUT + rows[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(WS + out_off + rows[:, None] * N + cols[None, :], acc, mask=mask)


@triton.jit
def _linear_dx_kernel(P, WB, M, N, K, dpre_off, w_off, g_off, out_off,
                      DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """The input-side GEMM of one layer's backward, tiled over (rows, K): out (M, K) =
    (dpre @ W) * gamma (fp32 into WB at out_off; gamma at g_off: constant ones for a layer
    without LayerNorm); dpre (M, N) in WB. A layer with a LayerNorm still needs its row pass
    (``_ln_bwd_rows_kernel``); for one without, ``out`` is its dx."""
    rows, ks, _ = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    row_ok = rows < M
    k_ok = ks < K
    acc = _dxhat_tile(P, WB, dpre_off, w_off, g_off, rows, row_ok, ks, k_ok, N, K,
                      DOT_DTYPE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(WB + out_off + rows[:, None] * K + ks[None, :], acc,
             mask=row_ok[:, None] & k_ok[None, :])


@flags_from_pointers(HAS_PAD="PAD")
@triton.jit
def _ln_bwd_rows_kernel(X, PAD, WS, WB, DX, M, K, sx, in_off, mu_off, rstd_off, scr_off, dy_off,
                        dx_off, pre_off, dpre_off,
                        IN_X: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr,
                        HAS_RES: tl.constexpr, DX_EXT: tl.constexpr, ACT_NEXT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row pass of a layer's backward, BLOCK_M rows per program: with HAS_LN (two passes
    over K) dx = rstd * (dxhat - mean_k(dxhat) - xhat * mean_k(dxhat * xhat)), else dx = dxhat;
    [+ dy]; dxhat at scr_off (``_linear_dx_kernel``'s output; dx may overwrite it in place); dx
    to WB at dx_off (the previous layer's dy) or the external DX (DX_EXT: a padded X row gets
    exact zeros); and, for the previous layer, its dpre = dx * act'(pre) at dpre_off (ACT_NEXT:
    its activation, pre-activation at pre_off)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    src = -1 if IN_X else in_off
    mean = tl.load(WS + mu_off + rows, mask=row_ok, other=0.0)
    rstd = tl.load(WS + rstd_off + rows, mask=row_ok, other=0.0)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LN:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            mask = row_ok[:, None] & k_ok[None, :]
            dxh = tl.load(WB + scr_off + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
            x = _in_tile(WS, X, PAD, src, rows, row_ok, ks, k_ok, K, sx, IN_X, HAS_PAD)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            c1 += tl.sum(dxh, 1)
            c2 += tl.sum(dxh * xhat, 1)
        c1 = c1 / K
        c2 = c2 / K
    keep = row_ok
    if IN_X:
        if HAS_PAD:
            keep = keep & (tl.load(PAD + rows, mask=row_ok, other=1) == 0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        mask = row_ok[:, None] & k_ok[None, :]
        dx = _ln_dx_tile(WB, scr_off, WS, X, PAD, src, rows, row_ok, ks, k_ok, K, sx, mean,
                         rstd, c1, c2, HAS_LN, IN_X, HAS_PAD)
        if HAS_RES:
            dx += tl.load(WB + dy_off + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
        dx = tl.where(keep[:, None], dx, 0.0)
        if DX_EXT:
            tl.store(DX + rows[:, None] * K + ks[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        else:
            tl.store(WB + dx_off + rows[:, None] * K + ks[None, :], dx, mask=mask)
        if ACT_NEXT != ACT_NONE:
            h = tl.load(WS + pre_off + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
            if ACT_NEXT == ACT_RELU:
                dp = tl.where(h > 0.0, dx, 0.0)
            else:
                sig = tl.sigmoid(h)
                dp = dx * sig * (1.0 + h * (1.0 - sig))
            tl.store(WB + dpre_off + rows[:, None] * K + ks[None, :], dp, mask=mask)
