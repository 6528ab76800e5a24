"""The shipped configs of the all-layer action-head pass, one source for its launcher and for
the sm_90 resource report: the row kernel (gather + LayerNorm, or LayerNorm + fc2) and the
persistent TMA GEMM, at the production shapes (M = 33 layers x B 8 x H 8 = 2112 rows, D =
hidden = 4096; Da = 7 for LIBERO and BRIDGE, 14 for ALOHA).

GEMM tiles: 64 x 256 x 64 for bf16/fp16 (M = 2112 = 33 x 64 and N = 4096 = 16 x 256: 528 tiles,
exactly 4 per SM on 132 SMs, no partial wave), two warpgroups (8 warps: at 4 warps the
block GEMM's residual epilogue spills 136 B), 4 stages of TMA loads; fp32 heads 64 x 128 x 32. Fixed, not autotuned (every rank and every
CUDA-graph capture runs the same kernel); the GPU bench times them (NOTES.md).
"""
from __future__ import annotations

import torch
import triton

from .._utils import ACTIVATIONS, interpreting
from .fused import _la_gemm_kernel, _la_norm_kernel


def norm_config(D: int, dtype: torch.dtype = torch.bfloat16,
                interpret: bool | None = None) -> dict:
    """``_la_norm_kernel``: one program per row, BLOCK elements per chunk (fp32 rows at 8 warps
    spill 8 B on sm_90: 4 there)."""
    interpret = interpreting() if interpret is None else interpret
    block = min(1024, triton.next_power_of_2(D))
    if interpret:  # fewer, wider numpy steps; and several chunks per segment at the tests' D
        block = max(16, block // 2)
    warps = 4 if (block <= 512 or dtype == torch.float32) else 8
    return dict(BLOCK=max(block, 16), num_warps=warps)


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype,
                interpret: bool | None = None) -> dict:
    """``_la_gemm_kernel``'s tiles for ``dtype`` weights (module docstring)."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


def resource_configs() -> list:
    """The kernels as launched at the production shape (bf16 and fp16 heads at Da 7 and 14,
    an fp32 head with "tf32x3" dots)."""
    M, D = 2112, 4096
    out = []
    for dtype, tag, prec in ((torch.bfloat16, "bf16", "tf32"), (torch.float16, "fp16", "tf32"),
                             (torch.float32, "fp32", "tf32x3")):
        p = f"*{tag}"
        n = norm_config(D, dtype, interpret=False)
        for da in (7, 14):
            out.append(dict(name=f"la.norm.{tag}.Da{da}", kernel=_la_norm_kernel,
                            args=dict(X=p, INDEX="*i64", G=p, BETA=p, OUT=p, W2=p, B2=p,
                                      n_batch=8, n_chunk=8, n_tok=600, D=D, stride_l=8 * 600 * D,
                                      stride_b=600 * D, stride_t=D, stride_ib=8 * da, N2=1,
                                      eps=1e-5),
                            constexprs=dict(NSEG=da, FC2=False, ROUND=tag, BLOCK=n["BLOCK"],
                                            BLOCK_N2=16), num_warps=n["num_warps"], num_stages=1))
        out.append(dict(name=f"la.ln2_fc2.{tag}", kernel=_la_norm_kernel,
                        args=dict(X=p, INDEX=None, G=p, BETA=p, OUT=p, W2=p, B2=p, n_batch=M,
                                  n_chunk=1, n_tok=1, D=D, stride_l=M * D, stride_b=D,
                                  stride_t=D, stride_ib=0, N2=7, eps=1e-5),
                        constexprs=dict(NSEG=1, FC2=True, ROUND=tag, BLOCK=n["BLOCK"],
                                        BLOCK_N2=16), num_warps=n["num_warps"], num_stages=1))
        for name, K, res in (("fc1.Da7", 7 * D, False), ("block", D, True)):
            cfg = gemm_config(M, D, K, dtype, interpret=False)
            out.append(dict(
                name=f"la.gemm.{name}.{tag}", kernel=_la_gemm_kernel,
                args=dict(a_desc=f"tensordesc<{tag}[{cfg['BLOCK_M']}, {cfg['BLOCK_K']}]>",
                          w_desc=f"tensordesc<{tag}[{cfg['BLOCK_N']}, {cfg['BLOCK_K']}]>",
                          B=p, R=p if res else None, Y=p, M=M, N=D, K=K, NUM_PROGRAMS=132),
                constexprs=dict(ACT=ACTIVATIONS["relu"], DOT_DTYPE=tag, UPCAST=False, PREC=prec,
                                **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                       "GROUP_M")}),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], expect_wgmma=True))
    return out
