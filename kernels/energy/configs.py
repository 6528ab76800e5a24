"""The shipped configs of the energy kernels, one source for the launchers and for the sm_90
resource report: the attention tiles (:func:`attn_config`) and the report's entries at the
production shapes (B=8, S=600, C*H=64 queries, E=512/8 or 1024/16 heads -> dh=64), plus the
layer-stack kernels the energy path launches (kernels/mlp/configs.py).
"""
from __future__ import annotations

import os

import torch
import triton

from .._utils import interpreting
from .fused import (_energy_attention_bwd_dkdv_kernel, _energy_attention_bwd_dq_kernel,
                    _energy_attention_fwd_kernel)


def attn_config(head_dim: int, dtype: torch.dtype = torch.bfloat16, precision: str = "tf32",
                interpret: bool | None = None) -> dict:
    """Per kernel ("fwd", "dq", "dkdv"): BLOCK_M (queries), BLOCK_N (keys), num_warps,
    num_stages; and BLOCK_D. The largest tiles that compile for sm_90 without a spill at the
    launched precision (bf16; fp32 "tf32x3" holds three times the operands of "tf32"). Small
    tiles under the interpreter (speed of the CPU tests, S not a multiple of the tile).
    ``ENERGY_ATTN_BLOCK_M`` / ``ENERGY_ATTN_BLOCK_N`` override every kernel's (every rank the
    same config)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    small = interpreting() if interpret is None else interpret
    if small:
        k = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        cfg = dict(fwd=k, dq=k, dkdv=k)
    elif dtype != torch.float32:
        cfg = dict(fwd=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                   dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
                   dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1))
    elif precision == "tf32x3":
        cfg = dict(fwd=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
                   dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
                   dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1))
    else:  # tf32, ieee
        cfg = dict(fwd=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                   dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
                   dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3))
    for k in cfg.values():
        for env, key in (("ENERGY_ATTN_BLOCK_M", "BLOCK_M"), ("ENERGY_ATTN_BLOCK_N", "BLOCK_N")):
            if os.environ.get(env):
                k[key] = int(os.environ[env])
    return dict(cfg, BLOCK_D=block_d)


def _attention_resources() -> list:
    """The attention kernels at the production shapes, at the precision they are launched
    with: bf16 models; fp32 models with "tf32x3" (the default) and "tf32" (torch allows TF32)."""
    B, S, Q, dh = 8, 600, 64, 64
    out = []
    for dtype, dt, prec in ((torch.bfloat16, "bf16", "tf32"), (torch.float32, "fp32", "tf32x3"),
                            (torch.float32, "fp32", "tf32")):
        cfg = attn_config(dh, dtype, prec, interpret=False)

        def tiles(kernel):
            c = cfg[kernel]
            return (dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"]),
                    dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
        for E, heads in ((512, 8), (1024, 16)):
            f = "*fp32"  # q, k|v, z and their gradients live in the fp32 workspaces
            dot = dict(DOT_DTYPE=dt, UPCAST=False, PREC=prec)
            q = dict(stride_qb=Q * E, stride_qm=E)
            kv = dict(stride_kb=S * 2 * E, stride_kn=2 * E, stride_vb=S * 2 * E, stride_vn=2 * E,
                      stride_pb=608)
            o = dict(stride_ob=Q * E, stride_om=E)
            dout = dict(stride_dob=Q * E, stride_dom=E)
            scales = dict(qk_scale=0.18, sm_scale=0.125)
            tag = f"{dt}.{prec}.E{E}h{heads}"
            out.append(dict(
                name=f"energy.attn_fwd.{tag}", kernel=_energy_attention_fwd_kernel,
                args=dict(Q=f, K=f, V=f, PAD="*u8", O=f, LSE="*fp32", **q, **kv, **o,
                          n_heads=heads, n_q=Q, n_k=S, head_dim=dh, qk_scale=0.18),
                constexprs=dict(**dot, **tiles("fwd")[0]), expect_wgmma=True, **tiles("fwd")[1]))
            for shared in (True, False):
                out.append(dict(
                    name=f"energy.attn_bwd_dq.{tag}.{'shared' if shared else 'per_sample'}",
                    kernel=_energy_attention_bwd_dq_kernel,
                    args=dict(Q=f, K=f, V=f, PAD="*u8", O=f, DO=f, LSE="*fp32", DQ=f, **q, **kv,
                              **o, **dout, stride_dqb=Q * E, stride_dqm=E, n_batch=B,
                              n_heads=heads, n_q=Q, n_k=S, head_dim=dh, **scales),
                    constexprs=dict(SHARED_Q=shared, **dot, **tiles("dq")[0]), expect_wgmma=True,
                    **tiles("dq")[1]))
            out.append(dict(
                name=f"energy.attn_bwd_dkdv.{tag}", kernel=_energy_attention_bwd_dkdv_kernel,
                args=dict(Q=f, K=f, V=f, PAD="*u8", O=f, DO=f, LSE="*fp32", DK=f, DV=f, **q, **kv,
                          **o, **dout, stride_dkb=S * 2 * E, stride_dkn=2 * E,
                          stride_dvb=S * 2 * E, stride_dvn=2 * E, n_heads=heads, n_q=Q, n_k=S,
                          head_dim=dh, **scales),
                constexprs=dict(**dot, **tiles("dkdv")[0]), expect_wgmma=True,
                **tiles("dkdv")[1]))
    return out


def resource_configs() -> list:
    """The attention kernels at the production shapes and the launched precisions (the
    layer-stack kernels the energy path launches are kernels/mlp's entries)."""
    return _attention_resources()
