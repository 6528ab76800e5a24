"""Launchers of ``ln_linear``'s kernels (fused.py): validate, allocate, pick the config
(configs.py), launch. Not differentiable; op.py wraps them in autograd.

    ln_linear(x, weight, bias=None, *, ln_weight=None, ln_bias=None, ln_eps=1e-5,
              normalize=False, activation="none", residual=None, out=None, out_dtype=None,
              row_index=None, segment_offsets=None, segment_align=1, input_precision=None,
              stats=None, return_stats=False) -> y | (y, mean, rstd)

- x (M, K) fp16/bf16/fp32 (any strides); weight (N, K) like ``nn.Linear``; bias (N,).
  x is first rounded to ``weight.dtype`` (as ``x.to(weight.dtype)`` would), the dot runs in
  weight.dtype with fp32 accumulation.
- ``normalize=True``: LayerNorm over K with optional ``ln_weight``/``ln_bias`` (K,) and
  ``ln_eps``; statistics in fp32 (a pre-pass kernel, or inline when N fits one tile).
  ``stats=(mean, rstd)`` (M,) fp32 reuses statistics already computed (no pre-pass);
  ``return_stats=True`` returns ``(y, mean, rstd)`` for a backward pass to reuse.
- ``activation`` in {"none", "relu", "silu"}, applied after the bias and before the residual.
- ``residual`` (M, N), added last (may be ``out`` itself).
- ``out`` (M, N) preallocated output; else one of ``out_dtype`` (default weight.dtype).
- ``row_index`` (M,) int64: A[m] = x[row_index[m]] (x is then (R, K) with any R).
- ``segment_offsets`` (M, NSEG) int64: row m of A is NSEG segments of K/NSEG elements, segment
  j starting ``segment_offsets[m, j]`` elements past ``x``'s first element (stride along a
  segment: x.stride(-1)). Offsets may reach into other tensors of x's dtype (one address
  space); the caller keeps them alive. K/NSEG must be a multiple of 16. ``segment_align``: a
  number every offset is a multiple of (the caller's promise); > 1 lets the kernel vectorise
  and pipeline the gathered loads.
- ``input_precision`` for fp32 operands: "ieee" or "tf32" (default: ``default_precision``).

``ln_stats(x, ...)`` -> (mean, rstd) of the rows alone. ``ln_linear_backward(dy, x, weight, ...)``
-> (dx, dW, db, dgamma, dbeta). On CUDA tensors the kernels run compiled; on CPU tensors only
under TRITON_INTERPRET=1 (a clear error otherwise).
"""
from __future__ import annotations

import torch
import triton

from .._utils import (ACTIVATIONS, DTYPES, TL_DTYPES, check_runnable, check_tensor, dot_precision,
                      empty, resolve_precision, upcast_dot)
from .configs import bwd_config, gemm_config, stats_config
from .fused import (_ln_linear_act_bwd_kernel, _ln_linear_bwd_dw_kernel, _ln_linear_bwd_dx_kernel,
                    _ln_linear_fwd_kernel, _ln_linear_stats_kernel)


def _a_operand(x, weight, row_index, segment_offsets):
    """Validate the A operand -> (M, K, seg or None, nseg, seg_len, stride_xm, stride_xk)."""
    check_tensor("weight", weight, ndim=2, dtype=DTYPES)
    N, K = weight.shape
    check_tensor("x", x, dtype=DTYPES)
    if segment_offsets is not None:
        if row_index is not None:
            raise ValueError("ln_linear: give row_index= or segment_offsets=, not both")
        check_tensor("segment_offsets", segment_offsets, ndim=2, dtype=torch.int64,
                     device=x.device)
        M, nseg = segment_offsets.shape
        if K % nseg:
            raise ValueError(f"segment_offsets: K={K} must be a multiple of NSEG={nseg}")
        return (M, K, segment_offsets.contiguous(), nseg, K // nseg, 0, x.stride(-1))
    check_tensor("x", x, ndim=2, shape={1: K})
    if row_index is not None:
        check_tensor("row_index", row_index, ndim=1, integer=True, device=x.device)
        seg = (row_index.to(torch.int64) * x.stride(0))[:, None].contiguous()
        return (row_index.shape[0], K, seg, 1, K, 0, x.stride(1))
    return (x.shape[0], K, None, 1, K, x.stride(0), x.stride(1))


def _seg_align(x, row_index, segment_offsets, segment_align) -> int:
    """What every gathered row offset is a multiple of (elements), known on the host."""
    if segment_offsets is not None:
        if segment_align < 1:
            raise ValueError(f"segment_align: expected a positive int, got {segment_align}")
        return int(segment_align) if x.data_ptr() % (segment_align * x.element_size()) == 0 else 1
    if row_index is not None:
        aligned = x.stride(0) % 16 == 0 and x.data_ptr() % (16 * x.element_size()) == 0
        return 16 if aligned else 1
    return 1


def _launch_stats(x, seg, M, K, nseg, seg_len, sxm, sxk, eps, round_dtype, align=1):
    mean = empty(M, torch.float32, x.device)
    rstd = empty(M, torch.float32, x.device)
    if M == 0:
        return mean, rstd
    cfg = stats_config(seg_len if (seg is not None and nseg > 1) else None)
    _ln_linear_stats_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x, seg, mean, rstd, M, K, sxm, sxk, float(eps),
        NSEG=nseg, SEG_LEN=seg_len, SEG_ALIGN=align, ROUND_DTYPE=TL_DTYPES[round_dtype],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return mean, rstd


def ln_stats(x, *, K: int | None = None, eps: float = 1e-5, round_dtype=None, row_index=None,
             segment_offsets=None):
    """(mean, rstd) (M,) fp32 of the rows of A (x, gathered as in ``ln_linear``) after rounding
    to ``round_dtype`` (default x.dtype)."""
    round_dtype = x.dtype if round_dtype is None else round_dtype
    if K is None:
        K = x.shape[-1] if segment_offsets is None else None
    w_like = torch.empty((1, K), dtype=round_dtype, device=x.device)
    M, K, seg, nseg, seg_len, sxm, sxk = _a_operand(x, w_like, row_index, segment_offsets)
    check_runnable("x", x)
    return _launch_stats(x, seg, M, K, nseg, seg_len, sxm, sxk, eps, round_dtype)


def ln_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None,
              ln_eps: float = 1e-5, normalize: bool = False, activation: str = "none",
              residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, row_index: torch.Tensor | None = None,
              segment_offsets: torch.Tensor | None = None, segment_align: int = 1,
              input_precision: str | None = None, stats: tuple | None = None,
              return_stats: bool = False):
    """y (M, N) = act(LN(x) @ weight^T + bias) [+ residual]; see the module docstring."""
    M, K, seg, nseg, seg_len, sxm, sxk = _a_operand(x, weight, row_index, segment_offsets)
    align = _seg_align(x, row_index, segment_offsets, segment_align)
    N = weight.shape[0]
    dev = x.device
    check_runnable("x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    input_precision = resolve_precision(input_precision, weight.dtype)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, shape={0: N}, floating=True, device=dev)
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            if not normalize:
                raise ValueError(f"{name}: given but normalize=False")
            check_tensor(name, t, ndim=1, shape={0: K}, floating=True, device=dev)
    if (return_stats or stats is not None) and not normalize:
        raise ValueError("return_stats/stats: only with normalize=True")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, shape={0: M, 1: N}, floating=True, device=dev)
    if out is None:
        out_dtype = weight.dtype if out_dtype is None else out_dtype
        if out_dtype not in DTYPES:
            raise TypeError(f"out_dtype: expected one of {DTYPES}, got {out_dtype}")
        out = empty((M, N), out_dtype, dev)
    else:
        check_tensor("out", out, ndim=2, shape={0: M, 1: N}, dtype=DTYPES, device=dev)
    cfg = gemm_config(N, weight.dtype, seg_len if (seg is not None and nseg > 1) else None)
    single_n_tile = N <= cfg["BLOCK_N"]

    mean = rstd = None
    stats_inline = False
    if normalize:
        if stats is not None:
            mean, rstd = stats
            check_tensor("stats[0] (mean)", mean, ndim=1, shape={0: M}, dtype=torch.float32)
            check_tensor("stats[1] (rstd)", rstd, ndim=1, shape={0: M}, dtype=torch.float32)
        elif single_n_tile:  # one program per row block: no redundant statistics passes
            stats_inline = True
            mean = empty(M, torch.float32, dev)
            rstd = empty(M, torch.float32, dev)
        else:
            mean, rstd = _launch_stats(x, seg, M, K, nseg, seg_len, sxm, sxk, ln_eps, weight.dtype,
                                       align)
    if M == 0 or N == 0:
        return (out, mean, rstd) if return_stats else out

    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    res_strides = residual.stride() if residual is not None else (0, 0)
    _ln_linear_fwd_kernel[grid](
        x, seg, weight, bias, ln_weight, ln_bias, residual, out, mean, rstd,
        M, N, K, sxm, sxk, weight.stride(0), weight.stride(1), *res_strides,
        out.stride(0), out.stride(1), float(ln_eps),
        NSEG=nseg, SEG_LEN=seg_len, SEG_ALIGN=align, STATS_INLINE=stats_inline,
        ACT=ACTIVATIONS[activation], DOT_DTYPE=TL_DTYPES[weight.dtype],
        UPCAST=upcast_dot(weight.dtype),
        INPUT_PRECISION=dot_precision(weight.dtype, input_precision),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (out, mean, rstd) if return_stats else out


def ln_linear_backward(dy, x, weight, bias=None, *, ln_weight=None, ln_bias=None,
                       normalize=False, mean=None, rstd=None, h=None, activation="none",
                       needs_dx=True, input_precision="ieee"):
    """Gradients of y = act(LN(x) @ W^T + b): x (M, K), weight (N, K), dy (M, N); mean/rstd
    (M,) fp32 (normalize); h (M, N) the pre-activation (activation != "none").
    -> (dx or None, dW, db or None, dgamma or None, dbeta or None), dx in x.dtype, the others in
    their parameter's dtype. Every reduction is a fixed-order loop or per-program partials
    summed afterwards: deterministic."""
    M, K = x.shape
    N = weight.shape[0]
    dev = x.device
    cfg = bwd_config()
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    kw = dict(DOT_DTYPE=TL_DTYPES[weight.dtype], UPCAST=upcast_dot(weight.dtype),
              INPUT_PRECISION=dot_precision(weight.dtype, input_precision),
              BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **launch)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    if activation != "none":
        dh = empty((M, N), torch.float32, dev)
        _ln_linear_act_bwd_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            dy, h, dh, M, N, dy.stride(0), h.stride(0), dh.stride(0),
            ACT=ACTIVATIONS[activation], BLOCK_M=BM, BLOCK_N=BN, **launch)
    else:
        dh = dy
    if not normalize:
        mean = rstd = ln_weight = ln_bias = None

    dw = empty((N, K), weight.dtype, dev)
    db = empty((N,), bias.dtype, dev) if bias is not None else None
    _ln_linear_bwd_dw_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        dh, x, mean, rstd, ln_weight, ln_bias, dw, db,
        M, N, K, dh.stride(0), x.stride(0), x.stride(1), dw.stride(0), **kw)

    need_parts = normalize and (ln_weight is not None or ln_bias is not None)
    if not (needs_dx or need_parts):
        return None, dw, db, None, None
    n_mb = triton.cdiv(M, BM)
    dx = empty((M, K), x.dtype, dev) if needs_dx else None
    scratch = None
    if normalize and needs_dx:
        scratch = dx if dx.dtype == torch.float32 else empty((M, K), torch.float32, dev)
    parts = empty((2, n_mb, K), torch.float32, dev) if need_parts else None
    _ln_linear_bwd_dx_kernel[(n_mb,)](
        dh, weight, x, mean, rstd, ln_weight, dx, scratch,
        parts[0] if parts is not None else None, parts[1] if parts is not None else None,
        M, N, K, dh.stride(0), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
        dx.stride(0) if dx is not None else 0, scratch.stride(0) if scratch is not None else 0,
        **kw)
    dg = dbeta = None
    if need_parts:  # fixed-order sums of the per-row-block partials: deterministic
        # two separate sums: dgamma and dbeta must not be views of one buffer (a custom op's
        # outputs may not alias each other)
        dg = parts[0].sum(dim=0).to(ln_weight.dtype) if ln_weight is not None else None
        dbeta = parts[1].sum(dim=0).to(ln_bias.dtype) if ln_bias is not None else None
    return dx, dw, db, dg, dbeta
