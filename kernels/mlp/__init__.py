"""The fused MLP building block: a LayerNorm-prologue GEMM with a bias / activation / residual
epilogue, ``y = act(LN(x) @ W^T + b) [+ residual]`` (forward only; the backward lives in
``kernels/mlp/backward.py``, written by the energy-kernel work).

API (host launcher)::

    ln_linear(x, weight, bias=None, *, ln_weight=None, ln_bias=None, ln_eps=1e-5,
              normalize=False, activation="none", residual=None, out=None, out_dtype=None,
              row_index=None, segment_offsets=None, input_precision=None,
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
- ``segment_offsets`` (M, NSEG) int64 (advanced; the layer-actions path): row m of A is NSEG
  segments of K/NSEG elements, segment j starting ``segment_offsets[m, j]`` elements past
  ``x``'s first element (stride along a segment: x.stride(-1)). Offsets may reach into other
  tensors of x's dtype (one address space); the caller keeps them alive. K/NSEG must be a
  multiple of 16. ``segment_align``: a number every offset is a multiple of (the caller's
  promise, e.g. 16 for 32-byte aligned bf16 rows); > 1 lets the kernel vectorise and
  pipeline the gathered loads.
- ``input_precision`` for fp32 operands: "ieee" or "tf32"; default follows
  ``torch.backends.cuda.matmul.allow_tf32``.

On CUDA tensors the kernels run compiled; on CPU tensors only under TRITON_INTERPRET=1 (a clear
error otherwise). ``ln_linear_reference`` (reference.py) is the eager oracle.
Config: fixed heuristics per shape (see ``pick_gemm_config``), identical on every rank.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from energy_train.checks import check_tensor

from .fused import (ACT_NONE, ACT_RELU, ACT_SILU, _ln_gemm_fwd_kernel, _ln_stats_fwd_kernel)

ACTIVATIONS = {"none": ACT_NONE, "relu": ACT_RELU, "silu": ACT_SILU}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PRECISIONS = ("ieee", "tf32")

__all__ = ["ln_linear", "ln_stats", "pick_gemm_config", "pick_stats_config", "ACTIVATIONS"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_runnable(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{name}: the Triton kernel needs CUDA tensors (got {t.device}); on the "
                           "CPU set TRITON_INTERPRET=1 to run it under the Triton interpreter")


def pick_gemm_config(M: int, N: int, K: int, dtype: torch.dtype, seg_len: int | None = None,
                     interpret: bool | None = None) -> dict:
    """Block sizes, warps and stages for the GEMM kernel (the shipped configs; see
    ``RESOURCE_CONFIGS`` in kernels/layer_actions/fused.py for the sm_90 report)."""
    interpret = _interpreting() if interpret is None else interpret
    small_n = N <= 16
    if interpret:
        cfg = dict(BLOCK_M=32, BLOCK_N=16 if small_n else 32, BLOCK_K=32, GROUP_M=4,
                   num_warps=4, num_stages=1)
    elif small_n:  # the row-wise final LN + fc2 (N = Da): one N tile, stats inline
        cfg = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128 if dtype != torch.float32 else 64,
                   GROUP_M=1, num_warps=4, num_stages=3)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if seg_len is not None:  # a K tile must not straddle two gathered segments
        while seg_len % cfg["BLOCK_K"]:
            cfg["BLOCK_K"] //= 2
        if cfg["BLOCK_K"] < 16:
            raise ValueError(f"segment_offsets: segment length K/NSEG must be a multiple of 16, "
                             f"got {seg_len}")
    return cfg


def pick_stats_config(interpret: bool | None = None) -> dict:
    interpret = _interpreting() if interpret is None else interpret
    if interpret:
        return dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_K=256, num_warps=4, num_stages=2)


def _a_operand(x, weight, row_index, segment_offsets):
    """Validate the A operand -> (M, K, seg or None, nseg, seg_len, stride_xm, stride_xk)."""
    check_tensor("weight", weight, ndim=2, dtype=DTYPES)
    N, K = weight.shape
    check_tensor("x", x, floating=True)
    if x.dtype not in DTYPES:
        raise TypeError(f"x: expected dtype {DTYPES}, got {x.dtype}")
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


def ln_stats(x, *, K: int | None = None, eps: float = 1e-5, round_dtype=None, row_index=None,
             segment_offsets=None):
    """(mean, rstd) (M,) fp32 of the rows of A (x, gathered as in ``ln_linear``) after rounding
    to ``round_dtype`` (default x.dtype)."""
    round_dtype = x.dtype if round_dtype is None else round_dtype
    if K is None:
        K = x.shape[-1] if segment_offsets is None else None
    w_like = torch.empty((1, K), dtype=round_dtype, device=x.device)
    M, K, seg, nseg, seg_len, sxm, sxk = _a_operand(x, w_like, row_index, segment_offsets)
    _check_runnable("x", x)
    return _launch_stats(x, seg, M, K, nseg, seg_len, sxm, sxk, eps, round_dtype)


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
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return mean, rstd
    cfg = pick_stats_config()
    block_k = cfg["BLOCK_K"]
    if seg is not None and nseg > 1:
        while seg_len % block_k:
            block_k //= 2
    dummy_seg = seg if seg is not None else torch.empty(1, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _ln_stats_fwd_kernel[grid](
        x, dummy_seg, mean, rstd, M, K, sxm, sxk, float(eps),
        GATHER=seg is not None, NSEG=nseg, SEG_LEN=seg_len, SEG_ALIGN=align,
        ROUND_DTYPE=TL_DTYPES[round_dtype],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=block_k, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return mean, rstd


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
    _check_runnable("x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if input_precision is None:
        input_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision: expected one of {PRECISIONS}, got {input_precision!r}")
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
        out = torch.empty((M, N), dtype=out_dtype, device=dev)
    else:
        check_tensor("out", out, ndim=2, shape={0: M, 1: N}, dtype=DTYPES, device=dev)
    cfg = pick_gemm_config(M, N, K, weight.dtype, seg_len if (seg is not None and nseg > 1) else None)
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
            mean = torch.empty(M, dtype=torch.float32, device=dev)
            rstd = torch.empty(M, dtype=torch.float32, device=dev)
        else:
            mean, rstd = _launch_stats(x, seg, M, K, nseg, seg_len, sxm, sxk, ln_eps, weight.dtype,
                                       align)
    if M == 0 or N == 0:
        return (out, mean, rstd) if return_stats else out

    fdummy = out
    seg_arg = seg if seg is not None else torch.empty(1, dtype=torch.int64, device=dev)
    res = residual if residual is not None else out
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _ln_gemm_fwd_kernel[grid](
        x, seg_arg, weight,
        bias if bias is not None else fdummy,
        ln_weight if ln_weight is not None else fdummy,
        ln_bias if ln_bias is not None else fdummy,
        res, out,
        mean if mean is not None else fdummy, rstd if rstd is not None else fdummy,
        M, N, K, sxm, sxk, weight.stride(0), weight.stride(1), res.stride(0), res.stride(1),
        out.stride(0), out.stride(1), float(ln_eps),
        GATHER=seg is not None, NSEG=nseg, SEG_LEN=seg_len, SEG_ALIGN=align,
        NORMALIZE=bool(normalize),
        STATS_INLINE=stats_inline, WRITE_STATS=stats_inline,
        HAS_GAMMA=ln_weight is not None, HAS_BETA=ln_bias is not None, HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation], HAS_RES=residual is not None,
        DOT_DTYPE=TL_DTYPES[weight.dtype],
        UPCAST=_interpreting() and weight.dtype == torch.bfloat16,
        INPUT_PRECISION=input_precision if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (out, mean, rstd) if return_stats else out
