"""The shipped tile configs of the layer-stack kernels, one source for the launchers and for
the sm_90 resource report (``python -m bench.resources``): :func:`stack_config` per launch kind,
:func:`stack_resources` the report's entries. Fixed per dtype (no autotuning: every rank of a
distributed job and every CUDA-graph capture runs the same kernel), chosen on the sm_90
compile as the largest tiles without a spill. Under the interpreter: small tiles (speed of the
CPU tests).
"""
from __future__ import annotations

import torch

from .._utils import ACTIVATIONS, interpreting
from .fused import (_linear_wide_kernel, _stack_bwd_kernel, _stack_dgamma_kernel,
                    _stack_dw_kernel, _stack_fwd_kernel)

_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def stack_config(kind: str, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """Tiles of the layer-stack launches. ``kind``: "fwd" / "bwd" / "bwd_x" (a chain of layers,
    each program its BLOCK_M rows), "wide" (``_linear_wide_kernel``: one wide layer, the context's
    first Linear), "dw" (the grouped weight-gradient GEMMs), "dgamma". Fixed per dtype (no
    autotuning: every rank and every CUDA-graph capture runs the same kernels); chosen on the
    sm_90 compile (``make resources``) as the largest tiles without a spill. Under the
    interpreter: small tiles (speed of the CPU tests)."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        t = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
        return dict(t, BLOCK_K=32) if kind == "dgamma" else t
    fp32 = dtype == torch.float32
    chain = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=1)
    return {
        "fwd": chain,
        "bwd": chain,
        # the backward of a chain whose first layer's dx reads X (a context that needs a
        # gradient): 64-wide N tiles spill 16 B there
        "bwd_x": dict(chain, BLOCK_N=32),
        "wide": (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
                 if fp32 else
                 dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)),
        "dw": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
        "dgamma": dict(BLOCK_K=256, num_warps=4, num_stages=1),
    }[kind]


def stack_resources(prefix: str, D: int) -> list:
    """The layer-stack kernels as the launchers configure them, per model dtype at the launched
    precision (fp32: "tf32x3"; bf16), with the context's first Linear (K = D) as the wide
    layer: the resource report's entries."""
    out = []
    for dtype, prec in ((torch.float32, "tf32x3"), (torch.bfloat16, "tf32")):
        dt = _TAGS[dtype]
        p = f"*{dt}"
        dot = dict(DOT_DTYPE=dt, UPCAST=False, PREC=prec)

        def tiles(kind):
            c = stack_config(kind, dtype, interpret=False)
            return ({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c},
                    dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
        for has_x in (False, True):
            t, launch = tiles("fwd")
            out.append(dict(name=f"{prefix}.stack_fwd.{dt}{'.x' if has_x else ''}",
                            kernel=_stack_fwd_kernel,
                            args=dict(T="*i64", EPS="*fp32", P=p, WS="*fp32", X="*bf16",
                                      PAD="*u8" if has_x else None, PE=p, OUT=p, layer0=3,
                                      n_layers=2, sx=D, pe_rows=8),
                            constexprs=dict(HAS_X=has_x, **dot, **t), **launch))
            t, launch = tiles("bwd_x" if has_x else "bwd")
            out.append(dict(name=f"{prefix}.stack_bwd.{dt}{'.x' if has_x else ''}",
                            kernel=_stack_bwd_kernel,
                            args=dict(T="*i64", P=p, WS="*fp32", WB="*fp32", X="*bf16",
                                      PAD="*u8" if has_x else None, DY=p, DX="*bf16",
                                      layer_last=3, n_layers=2, sx=D),
                            constexprs=dict(HAS_X=has_x, **dot, **t), **launch))
        t, launch = tiles("wide")
        out.append(dict(name=f"{prefix}.linear_wide.{dt}.K{D}", kernel=_linear_wide_kernel,
                        args=dict(X="*bf16", PAD="*u8", P=p, WS="*fp32", M=4800, N=512, K=D,
                                  sx=D, w_off=3 * D, b_off=77, g_off=5, beta_off=D + 5,
                                  out_off=1024, pre_off=D * 1024, mu_off=3, rstd_off=7,
                                  eps=1e-5),
                        constexprs=dict(ACT=ACTIVATIONS["silu"], GROUP_M=8, **dot, **t),
                        expect_wgmma=True, **launch))
        t, launch = tiles("dw")
        out.append(dict(name=f"{prefix}.stack_dw.{dt}", kernel=_stack_dw_kernel,
                        args=dict(T="*i64", WORK="*i64", P=p, WS="*fp32", WB="*fp32",
                                  X="*bf16", PAD="*u8", G=p, PART="*fp32", sx=D),
                        constexprs=dict(HAS_X=True, **dot, **t), expect_wgmma=True, **launch))
    g = stack_config("dgamma", torch.float32, interpret=False)
    out.append(dict(name=f"{prefix}.stack_dgamma", kernel=_stack_dgamma_kernel,
                    args=dict(T="*i64", WORK="*i64", PART="*fp32", G="*fp32", BLOCK_N_DW=64),
                    constexprs=dict(BLOCK_K=g["BLOCK_K"]), num_warps=g["num_warps"],
                    num_stages=1))
    return out


def resource_configs() -> list:
    """The layer-stack kernels as the energy path launches them (the wide layer: its context's
    first Linear, K = D = 4096), both model dtypes."""
    return stack_resources("stack", D=4096)
