"""Backward of the fused MLP block ``y = act(LN(x) @ W^T + b) [+ residual]`` (kernels/mlp).

``ln_linear_backward(dy, x, weight, ...)`` -> (dx, dW, db, dgamma, dbeta), all deterministic
(no atomics: every reduction is a fixed-order loop inside one program, or per-program partials
summed afterwards):
  ``_act_bwd_kernel``            dh = dy * act'(h)   (h = the pre-activation, recomputed by
                                 the forward GEMM from the saved LayerNorm statistics)
  ``_ln_gemm_bwd_dw_kernel``     dW = dh^T @ LN(x) (LN recomputed in the B-operand load from
                                 mean/rstd), db = sum_m dh; one program per (N tile, K tile),
                                 looping over all M rows
  ``_ln_gemm_bwd_dx_kernel``     da = dh @ W, then through the LayerNorm:
                                 dx = rstd * (da*g - mean_k(da*g) - xhat * mean_k(da*g*xhat)),
                                 one program per row block (pass 1 over K: da, row sums, an fp32
                                 dxhat scratch; pass 2: dx); dgamma/dbeta partials per row block
``ln_linear_autograd`` (the custom ops ``energy_train::ln_linear_fwd`` / ``ln_linear_bwd``, with
registered fakes and autograd) runs ``ln_linear`` forward (saving mean/rstd) and this backward.
``residual`` is added in the forward, so its gradient is dy itself.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

ACT_NONE, ACT_RELU, ACT_SILU = 0, 1, 2
ACT_CODES = {"none": ACT_NONE, "relu": ACT_RELU, "silu": ACT_SILU}
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _act_bwd_kernel(DY, H, DH, M, N, stride_dym, stride_hm, stride_dhm,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dh = dy * act'(h), fp32 out."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + rows[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:
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


@triton.jit
def _ln_gemm_bwd_dw_kernel(
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
            acc += tl.dot(tl.trans(dh), a, input_precision=INPUT_PRECISION)
        else:
            acc += tl.dot(tl.trans(dh.to(DOT_DTYPE)), a.to(DOT_DTYPE),
                          input_precision=INPUT_PRECISION)
    tl.store(DW + cols[:, None] * stride_dwn + ks[None, :], acc.to(DW.dtype.element_ty),
             mask=n_ok[:, None] & (ks < K)[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=n_ok)


@triton.jit
def _ln_gemm_bwd_dx_kernel(
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
                da += tl.dot(dh, w.to(tl.float32), input_precision=INPUT_PRECISION)
            else:
                da += tl.dot(dh.to(DOT_DTYPE), w, input_precision=INPUT_PRECISION)
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


def bwd_config(interpret: bool | None = None) -> dict:
    interpret = _interpreting() if interpret is None else interpret
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)


def ln_linear_backward(dy, x, weight, bias=None, *, ln_weight=None, ln_bias=None,
                       normalize=False, mean=None, rstd=None, h=None, activation="none",
                       needs_dx=True, input_precision="ieee"):
    """Gradients of y = act(LN(x) @ W^T + b): x (M, K), weight (N, K), dy (M, N); mean/rstd
    (M,) fp32 (normalize); h (M, N) the pre-activation (activation != "none").
    -> (dx or None, dW, db or None, dgamma or None, dbeta or None), dx in x.dtype, the others in
    their parameter's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    dev = x.device
    cfg = bwd_config()
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dot_dtype = TL_DTYPES[weight.dtype]
    upcast = _interpreting() and weight.dtype in (torch.bfloat16, torch.float16)
    prec = input_precision if weight.dtype == torch.float32 else "tf32"
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    if activation != "none":
        dh = torch.empty((M, N), dtype=torch.float32, device=dev)
        _act_bwd_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            dy, h, dh, M, N, dy.stride(0), h.stride(0), dh.stride(0),
            ACT=ACT_CODES[activation], BLOCK_M=BM, BLOCK_N=BN, **launch)
    else:
        dh = dy
    dummy = dh
    g = ln_weight if ln_weight is not None else dummy
    be = ln_bias if ln_bias is not None else dummy
    mu = mean if mean is not None else dummy
    rs = rstd if rstd is not None else dummy

    dw = torch.empty((N, K), dtype=weight.dtype, device=dev)
    db = torch.empty((N,), dtype=bias.dtype, device=dev) if bias is not None else None
    _ln_gemm_bwd_dw_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        dh, x, mu, rs, g, be, dw, db if db is not None else dummy,
        M, N, K, dh.stride(0), x.stride(0), x.stride(1), dw.stride(0),
        NORMALIZE=normalize, HAS_GAMMA=ln_weight is not None, HAS_BETA=ln_bias is not None,
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, UPCAST=upcast, INPUT_PRECISION=prec,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **launch)

    need_parts = normalize and (ln_weight is not None or ln_bias is not None)
    if not (needs_dx or need_parts):
        return None, dw, db, None, None
    n_mb = triton.cdiv(M, BM)
    dx = torch.empty((M, K), dtype=x.dtype, device=dev) if needs_dx else None
    scratch = None
    if normalize and needs_dx:
        scratch = dx if dx.dtype == torch.float32 else torch.empty((M, K), dtype=torch.float32,
                                                                     device=dev)
    parts = (torch.empty((2, n_mb, K), dtype=torch.float32, device=dev) if need_parts else None)
    out = dx if dx is not None else dummy
    scr = scratch if scratch is not None else dummy
    _ln_gemm_bwd_dx_kernel[(n_mb,)](
        dh, weight, x, mu, rs, g, out, scr,
        parts[0] if parts is not None else dummy, parts[1] if parts is not None else dummy,
        M, N, K, dh.stride(0), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
        out.stride(0) if dx is not None else 0, scr.stride(0) if scratch is not None else 0,
        NORMALIZE=normalize, HAS_GAMMA=ln_weight is not None, NEED_DX=needs_dx,
        NEED_PARTS=need_parts, DOT_DTYPE=dot_dtype, UPCAST=upcast, INPUT_PRECISION=prec,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **launch)
    dg = dbeta = None
    if need_parts:  # fixed-order sums of the per-row-block partials: deterministic
        # two separate sums: dgamma and dbeta must not be views of one buffer (a custom op's
        # outputs may not alias each other)
        dg = parts[0].sum(dim=0).to(ln_weight.dtype) if ln_weight is not None else None
        dbeta = parts[1].sum(dim=0).to(ln_bias.dtype) if ln_bias is not None else None
    return dx, dw, db, dg, dbeta


# --------------------------------------------------------------------------------------------
# the differentiable op: torch.library custom ops with registered fakes and autograd
# --------------------------------------------------------------------------------------------
# Why custom_op + register_fake (not triton_op): torch.compile (any backend) traces a user's
# code with fake tensors; a custom op is then one node whose output metadata comes from the
# registered fake, so the graph has no break and the kernels run only on real tensors. That
# works on CUDA (the Triton kernels compiled) and on the CPU (the same kernels under
# TRITON_INTERPRET=1), so the CPU tests check compile-traceability of exactly the op that runs on
# the GPU. A triton_op's automatic fake re-runs the launcher under fake tensors, which under the
# interpreter reaches the data pointers (design section 8). APIs used: torch 2.4+.
def _none_if_empty(t, present: bool):
    return t if present else None


@torch.library.custom_op("energy_train::ln_linear_fwd", mutates_args=())
def ln_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], ln_eps: float, normalize: bool,
                     activation: str, input_precision: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K), residual (M, N) -> y (M, N) in weight.dtype, mean and rstd (M,) fp32 (empty
    (0,) without ``normalize``)."""
    from . import ln_linear
    kw = dict(ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, normalize=normalize,
              activation=activation, residual=residual, input_precision=input_precision)
    if normalize:
        return ln_linear(x, weight, bias, return_stats=True, **kw)
    y = ln_linear(x, weight, bias, **kw)
    none = x.new_empty((0,), dtype=torch.float32)
    return y, none, none.clone()


@ln_linear_fwd_op.register_fake
def _ln_linear_fwd_fake(x, weight, bias, ln_weight, ln_bias, residual, ln_eps, normalize,
                        activation, input_precision):
    M, N = x.shape[0], weight.shape[0]
    stats = x.new_empty((M if normalize else 0,), dtype=torch.float32)
    return x.new_empty((M, N), dtype=weight.dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("energy_train::ln_linear_bwd", mutates_args=())
def ln_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                     ln_bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                     ln_eps: float, normalize: bool, activation: str, needs_dx: bool,
                     input_precision: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, K), dW, db, dgamma, dbeta; an absent gradient is an empty (0,) tensor (custom
    ops return tensors only). The pre-activation is recomputed from the saved statistics."""
    from . import ln_linear
    h = None
    if activation != "none":  # recompute the pre-activation (the forward GEMM again)
        h = ln_linear(x, weight, bias, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps,
                      normalize=normalize, input_precision=input_precision,
                      out_dtype=torch.float32, stats=(mean, rstd) if normalize else None)
    grads = ln_linear_backward(
        dy, x, weight, bias, ln_weight=ln_weight, ln_bias=ln_bias, normalize=normalize,
        mean=mean if normalize else None, rstd=rstd if normalize else None, h=h,
        activation=activation, needs_dx=needs_dx, input_precision=input_precision)
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)  # a fresh one each: no aliasing


@ln_linear_bwd_op.register_fake
def _ln_linear_bwd_fake(dy, x, weight, bias, ln_weight, ln_bias, mean, rstd, ln_eps, normalize,
                        activation, needs_dx, input_precision):
    empty = x.new_empty((0,))
    dx = torch.empty_like(x) if needs_dx else empty
    db = torch.empty_like(bias) if bias is not None else empty.clone()
    dg = torch.empty_like(ln_weight) if (normalize and ln_weight is not None) else empty.clone()
    dbeta = torch.empty_like(ln_bias) if (normalize and ln_bias is not None) else empty.clone()
    return dx, torch.empty_like(weight), db, dg, dbeta


def _ln_linear_setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, residual, ln_eps, normalize, activation, prec = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, ln_weight, ln_bias, mean, rstd)
    ctx.cfg = (ln_eps, normalize, activation, prec)
    ctx.present = (bias is not None, ln_weight is not None, ln_bias is not None,
                   residual is not None)


def _ln_linear_backward(ctx, dy, dmean, drstd):
    x, weight, bias, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    ln_eps, normalize, activation, prec = ctx.cfg
    has_b, has_g, has_beta, has_res = ctx.present
    needs_dx = ctx.needs_input_grad[0]
    dx, dw, db, dg, dbeta = ln_linear_bwd_op(dy.contiguous(), x, weight, bias, ln_weight, ln_bias,
                                             mean, rstd, ln_eps, normalize, activation, needs_dx,
                                             prec)
    return (_none_if_empty(dx, needs_dx), dw, _none_if_empty(db, has_b),
            _none_if_empty(dg, has_g), _none_if_empty(dbeta, has_beta),
            dy if has_res else None, None, None, None, None)


ln_linear_fwd_op.register_autograd(_ln_linear_backward, setup_context=_ln_linear_setup_context)


def ln_linear_autograd(x, weight, bias=None, *, ln_weight=None, ln_bias=None, ln_eps=1e-5,
                       normalize=False, activation="none", residual=None, input_precision="ieee"):
    """Differentiable ``ln_linear``: y (..., N) = act(LN(x) @ W^T + b) [+ residual], x (..., K).

    Forward: the Triton ``ln_linear`` (saving the LayerNorm mean/rstd). Backward: the
    pre-activation is recomputed from the saved statistics (no (M, N) activation kept alive),
    then ``ln_linear_backward``. Gradients for every tensor input that requires one; the
    residual's is dy. Traceable by torch.compile with fullgraph=True (one op node each way).
    """
    K, N = x.shape[-1], weight.shape[0]
    res2 = residual.reshape(-1, N) if residual is not None else None
    y, _, _ = ln_linear_fwd_op(x.reshape(-1, K), weight, bias, ln_weight, ln_bias, res2,
                               float(ln_eps), bool(normalize), activation, input_precision)
    return y.reshape(*x.shape[:-1], N)
