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
from .fused import (_linear_dx_kernel, _linear_tiled_kernel, _ln_bwd_rows_kernel,
                    _stack_bwd_kernel, _stack_dgamma_kernel, _stack_dw_kernel, _stack_fwd_kernel)

_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def stack_config(kind: str, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """Tiles of the layer-stack launches. ``kind``: "fwd" / "bwd" / "bwd_x" (a chain of layers,
    each program its BLOCK_M rows), "tiled" / "dx" / "rows" (one layer over thousands of rows:
    ``_linear_tiled_kernel``, ``_linear_dx_kernel``, ``_ln_bwd_rows_kernel``), "tiled_head" /
    "dx_head", "tiled_pool" / "dx_pool" (the same kernels on the energy head's and pool's few
    hundred / few dozen rows: the v5 variant, ``chains="tiled"``), "dw" (the
    grouped weight-gradient GEMMs), "dgamma". Fixed per dtype (no
    autotuning: every rank and every CUDA-graph capture runs the same kernels); chosen on the
    sm_90 compile (``make resources``) as the largest tiles without a spill. Under the
    interpreter: small tiles (speed of the CPU tests)."""
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    fp32 = dtype == torch.float32
    # a chain program walks its rows through every layer one small tile at a time: 16 rows
    # (twice the programs of 32 on a few hundred rows) and 2 stages, so the next tile's loads
    # overlap this one's MMAs (H200, commit 0a20d77: 32 x 64 tiles at 1 stage were latency-bound)
    chain = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)
    return {
        "fwd": chain,
        "bwd": chain,
        # the backward of a chain whose first layer's dx reads X (an MLPResNet input that needs
        # a gradient)
        "bwd_x": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=1),
        "tiled": (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
                  if fp32 else
                  dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)),
        # v5 (energy chains="tiled"): the head's (B*C*H, a few hundred rows) and the pool's
        # (Bq*C*H, a few dozen) layers as tiled launches: small row tiles so that each layer
        # gives many programs (512 rows x N 512: 128 programs of 32 x 64; 64 rows: 32 of
        # 16 x 64), each a short K loop (mma.sync: BLOCK_M < 64), instead of a chain program
        # walking every layer's N x K tiles in order (H200, 683d510: ~65% of the time)
        "tiled_head": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32 if fp32 else 64, GROUP_M=8,
                           num_warps=4, num_stages=3),
        # (BLOCK_K 32 for bf16 too: at 64 the pool's fc1 (K = Da = 7) keeps an 8-byte stack
        # frame on sm_90, bench/results/energy-launches-tiled-sm90.md)
        "tiled_pool": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4,
                           num_stages=3),
        # _linear_dx_kernel: BLOCK_K output columns, BLOCK_N the reduction step
        "dx_head": dict(BLOCK_M=32, BLOCK_N=32 if fp32 else 64, BLOCK_K=64, GROUP_M=8,
                        num_warps=4, num_stages=3),
        "dx_pool": dict(BLOCK_M=16, BLOCK_N=32 if fp32 else 64, BLOCK_K=64, GROUP_M=8,
                        num_warps=4, num_stages=3),
        "dx": (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
               if fp32 else
               dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)),
        "rows": dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=2),
        "dw": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
        "dgamma": dict(BLOCK_K=256, num_warps=4, num_stages=1),
    }[kind]


def stack_resources(prefix: str, D: int) -> list:
    """The layer-stack kernels as the launchers configure them, per model dtype at the launched
    precision (fp32: "tf32x3"; bf16): the chains, the tiled launches of the context's layers
    (fc1 with K = D, a residual block, the K|V projection), the dx GEMM and row pass of their
    backward, the grouped dW: the resource report's entries."""
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
        t, launch = tiles("tiled")
        for name, K, N, in_x, ln, act, res in (("fc1", D, 512, True, True, "silu", False),
                                               ("block", 512, 512, False, True, "silu", True),
                                               ("kv", 512, 1024, False, False, "none", False)):
            out.append(dict(
                name=f"{prefix}.linear_tiled.{name}.{dt}", kernel=_linear_tiled_kernel,
                args=dict(X="*bf16", PAD="*u8" if in_x else None, P=p, WS="*fp32", M=4800, N=N,
                          K=K, sx=D if in_x else 0, in_off=4096, w_off=3 * D, b_off=77,
                          g_off=5, beta_off=D + 5, out_off=1024, pre_off=D * 1024, mu_off=3,
                          rstd_off=7, eps=1e-5, OUT=None, PE=None, pe_rows=1),
                constexprs=dict(IN_X=in_x, HAS_LN=ln, ACT=ACTIVATIONS[act], HAS_RES=res,
                                GROUP_M=8, **dot, **t),
                expect_wgmma=True, **launch))
        # v5 (energy chains="tiled"): the head's and the pool's layers, small row tiles
        # (mma.sync: BLOCK_M < 64), the head's last layer (N = 1) to the external output, the
        # pool's fc2 adding pe
        for kind, name, M, N, ln, act, res, pe, ext in (
                ("tiled_head", "head.block", 512, 512, True, "silu", True, False, False),
                ("tiled_head", "head.out", 512, 1, True, "none", False, False, True),
                ("tiled_pool", "pool.fc1", 64, 512, True, "silu", False, False, False),
                ("tiled_pool", "pool.fc2", 64, 512, True, "none", False, True, False),
                ("tiled_pool", "pool.q", 64, 512, False, "none", False, False, False)):
            t, launch = tiles(kind)
            out.append(dict(
                name=f"{prefix}.linear_tiled.{name}.{dt}", kernel=_linear_tiled_kernel,
                args=dict(X="*fp32", PAD=None, P=p, WS="*fp32", M=M, N=N,
                          K=7 if name == "pool.fc1" else 512, sx=0,
                          in_off=4096, w_off=3 * D, b_off=77, g_off=5, beta_off=D + 5,
                          out_off=1024, pre_off=D * 1024, mu_off=3, rstd_off=7, eps=1e-5,
                          OUT=p if ext else None, PE=p if pe else None, pe_rows=8),
                constexprs=dict(IN_X=False, HAS_LN=ln, ACT=ACTIVATIONS[act], HAS_RES=res,
                                GROUP_M=8, **dot, **t),
                expect_wgmma=False, **launch))
        for kind, M in (("dx_head", 512), ("dx_pool", 64)):
            t, launch = tiles(kind)
            out.append(dict(name=f"{prefix}.linear_{kind}.{dt}", kernel=_linear_dx_kernel,
                            args=dict(P=p, WB="*fp32", M=M, N=512, K=512, dpre_off=4096,
                                      w_off=3 * D, g_off=5, out_off=1024),
                            constexprs=dict(GROUP_M=8, **dot, **t), expect_wgmma=False,
                            **launch))
        t, launch = tiles("dx")
        out.append(dict(name=f"{prefix}.linear_dx.{dt}", kernel=_linear_dx_kernel,
                        args=dict(P=p, WB="*fp32", M=4800, N=1024, K=512, dpre_off=4096,
                                  w_off=3 * D, g_off=5, out_off=1024),
                        constexprs=dict(GROUP_M=8, **dot, **t), expect_wgmma=True, **launch))
        c = stack_config("rows", dtype, interpret=False)
        out.append(dict(name=f"{prefix}.ln_bwd_rows.{dt}", kernel=_ln_bwd_rows_kernel,
                        args=dict(X="*bf16", PAD=None, WS="*fp32", WB="*fp32", DX="*fp32",
                                  M=4800, K=512, sx=0, in_off=4096, mu_off=3, rstd_off=7,
                                  scr_off=1024, dy_off=2048, dx_off=1024, pre_off=512,
                                  dpre_off=8192),
                        constexprs=dict(IN_X=False, HAS_LN=True, HAS_RES=True, DX_EXT=False,
                                        ACT_NEXT=ACTIVATIONS["silu"], BLOCK_M=c["BLOCK_M"],
                                        BLOCK_K=c["BLOCK_K"]),
                        num_warps=c["num_warps"], num_stages=c["num_stages"]))
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
