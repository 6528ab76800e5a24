"""The shipped tile configs of ``ln_linear``'s kernels, one source for the launchers and for the
sm_90 resource report (``python -m bench.resources``): the ops that launch these kernels list
their production shapes with :func:`gemm_resource`, :func:`stats_resource` and
:func:`bwd_resources`, which call the same pickers as the launchers.

Fixed heuristics per shape (no autotuning): every rank of a distributed job and every CUDA-graph
capture runs the same kernel. Under the interpreter: small tiles (speed of the CPU tests).
"""
from __future__ import annotations

import torch

from .._utils import ACTIVATIONS, interpreting
from .fused import (_ln_linear_act_bwd_kernel, _ln_linear_bwd_dw_kernel, _ln_linear_bwd_dx_kernel,
                    _ln_linear_fwd_kernel, _ln_linear_stats_kernel)

_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def gemm_config(N: int, dtype: torch.dtype, seg_len: int | None = None,
                interpret: bool | None = None) -> dict:
    """Block sizes, warps and stages of ``_ln_linear_fwd_kernel`` for an output N wide and
    weights of ``dtype``. ``seg_len``: a K tile must not straddle two gathered segments."""
    interpret = interpreting() if interpret is None else interpret
    small_n = N <= 16
    if interpret:
        cfg = dict(BLOCK_M=32, BLOCK_N=16 if small_n else 32, BLOCK_K=32, GROUP_M=4,
                   num_warps=4, num_stages=1)
    elif small_n:  # e.g. the final LN + fc2 of an action head (N = Da): one N tile, stats inline
        cfg = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128 if dtype != torch.float32 else 64,
                   GROUP_M=1, num_warps=4, num_stages=3)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if seg_len is not None:
        cfg["BLOCK_K"] = segment_block_k(cfg["BLOCK_K"], seg_len)
    return cfg


def stats_config(seg_len: int | None = None, interpret: bool | None = None) -> dict:
    """``_ln_linear_stats_kernel``'s config (BLOCK_K divides ``seg_len`` when rows are gathered
    in segments)."""
    interpret = interpreting() if interpret is None else interpret
    cfg = (dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1) if interpret else
           dict(BLOCK_M=16, BLOCK_K=256, num_warps=4, num_stages=2))
    if seg_len is not None:
        cfg["BLOCK_K"] = segment_block_k(cfg["BLOCK_K"], seg_len)
    return cfg


def segment_block_k(block_k: int, seg_len: int) -> int:
    while seg_len % block_k:
        block_k //= 2
    if block_k < 16:
        raise ValueError(f"segment_offsets: segment length K/NSEG must be a multiple of 16, "
                         f"got {seg_len}")
    return block_k


def bwd_config(interpret: bool | None = None) -> dict:
    """The backward kernels' config (act', dW/db, dx)."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)


# --------------------------------------------------------------------------------------------
# entries of the sm_90 resource report (bench/resources.py documents the format)
# --------------------------------------------------------------------------------------------
def gemm_resource(name: str, M: int, N: int, K: int, dtype: torch.dtype, *, nseg: int | None = None,
                  activation: str = "relu", residual: bool = False) -> dict:
    """``_ln_linear_fwd_kernel`` (LayerNorm with affine, bias) as the launcher configures it:
    rows gathered in ``nseg`` segments of K/nseg (None: a plain matrix), one N tile -> inline
    statistics."""
    dt = _TAGS[dtype]
    ptr = f"*{dt}"
    seg_len = K // nseg if nseg else None
    cfg = gemm_config(N, dtype, seg_len, interpret=False)
    inline = N <= cfg["BLOCK_N"]
    return dict(
        name=name, kernel=_ln_linear_fwd_kernel,
        args=dict(x_ptr=ptr, seg_ptr="*i64" if nseg else None, w_ptr=ptr, b_ptr=ptr, g_ptr=ptr,
                  beta_ptr=ptr, res_ptr=ptr if residual else None, y_ptr=ptr, mean_ptr="*fp32",
                  rstd_ptr="*fp32", M=M, N=N, K=K, stride_xm=0 if nseg else K, stride_xk=1,
                  stride_wn=K, stride_wk=1, stride_rm=N if residual else 0, stride_rn=1,
                  stride_ym=N, stride_yn=1, eps=1e-5),
        constexprs=dict(NSEG=nseg or 1, SEG_LEN=seg_len or K, SEG_ALIGN=16 if nseg else 1,
                        STATS_INLINE=inline, ACT=ACTIVATIONS[activation], DOT_DTYPE=dt,
                        UPCAST=False, INPUT_PRECISION="tf32",
                        **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], expect_wgmma=True)


def stats_resource(name: str, M: int, K: int, dtype: torch.dtype, *,
                   nseg: int | None = None) -> dict:
    """``_ln_linear_stats_kernel`` as the launcher configures it."""
    dt = _TAGS[dtype]
    seg_len = K // nseg if nseg else None
    cfg = stats_config(seg_len, interpret=False)
    return dict(
        name=name, kernel=_ln_linear_stats_kernel,
        args=dict(x_ptr=f"*{dt}", seg_ptr="*i64" if nseg else None, mean_ptr="*fp32",
                  rstd_ptr="*fp32", M=M, K=K, stride_xm=0 if nseg else K, stride_xk=1, eps=1e-5),
        constexprs=dict(NSEG=nseg or 1, SEG_LEN=seg_len or K, SEG_ALIGN=16 if nseg else 1,
                        ROUND_DTYPE=dt, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def bwd_resources(prefix: str, M: int, N: int, K_dw: int, K_dx: int,
                  dtypes=(torch.bfloat16, torch.float32)) -> list:
    """The backward kernels as the launcher configures them: the SiLU act' pass (M, N), dW of a
    layer with K_dw inputs, dx of a layer with K_dx inputs (LayerNorm with affine, bias)."""
    cfg = bwd_config(interpret=False)
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = [dict(name=f"{prefix}_act_bwd.silu", kernel=_ln_linear_act_bwd_kernel,
                args=dict(DY="*fp32", H="*fp32", DH="*fp32", M=M, N=N, stride_dym=N,
                          stride_hm=N, stride_dhm=N),
                constexprs=dict(ACT=ACTIVATIONS["silu"], BLOCK_M=cfg["BLOCK_M"],
                                BLOCK_N=cfg["BLOCK_N"]), **launch)]
    for dtype in dtypes:
        dt = _TAGS[dtype]
        p = f"*{dt}"
        common = dict(DOT_DTYPE=dt, UPCAST=False, INPUT_PRECISION="tf32", **blocks)
        out.append(dict(
            name=f"{prefix}_bwd_dw.{dt}.K{K_dw}", kernel=_ln_linear_bwd_dw_kernel,
            args=dict(DH="*fp32", X=p, MEAN="*fp32", RSTD="*fp32", G=p, BETA=p, DW=p, DB=p,
                      M=M, N=N, K=K_dw, stride_dhm=N, stride_xm=K_dw, stride_xk=1,
                      stride_dwn=K_dw),
            constexprs=common, expect_wgmma=True, **launch))
        out.append(dict(
            name=f"{prefix}_bwd_dx.{dt}.K{K_dx}", kernel=_ln_linear_bwd_dx_kernel,
            args=dict(DH="*fp32", W=p, X=p, MEAN="*fp32", RSTD="*fp32", G=p, DX=p,
                      SCRATCH="*fp32", DG_PART="*fp32", DBETA_PART="*fp32", M=M, N=N,
                      K=K_dx, stride_dhm=N, stride_wn=K_dx, stride_wk=1, stride_xm=K_dx,
                      stride_xk=1, stride_dxm=K_dx, stride_sm=K_dx),
            constexprs=common, expect_wgmma=True, **launch))
    return out
