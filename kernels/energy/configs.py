"""The shipped configs of the energy kernels, one source for the launchers and for the sm_90
resource report: the attention tiles (:func:`attn_config`) and the report's entries at the
production shapes (B=8, S=600, C*H=64 queries, E=512/8 or 1024/16 heads -> dh=64), plus the
``ln_linear`` backward launches the energy path makes (kernels/mlp/configs.py), at the state
encoder's first Linear (M = B*S = 4800 rows, K = D = 4096 -> N = E = 512).
"""
from __future__ import annotations

import os

import torch
import triton

from .._utils import interpreting
from ..mlp.configs import bwd_resources
from .fused import (_energy_attention_bwd_dkdv_kernel, _energy_attention_bwd_dq_kernel,
                    _energy_attention_bwd_preprocess_kernel, _energy_attention_fwd_kernel)


def attn_config(head_dim: int, dtype: torch.dtype = torch.bfloat16,
                interpret: bool | None = None) -> dict:
    """Tile sizes and launch options. Small tiles under the interpreter (speed of the CPU
    tests, and S not a multiple of the tile); 64 x 64 on the GPU (dh = 64 at 512/8, 1024/16).
    ``ENERGY_ATTN_BLOCK_M`` / ``ENERGY_ATTN_BLOCK_N`` override (every rank the same config)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    small = interpreting() if interpret is None else interpret
    bm = int(os.environ.get("ENERGY_ATTN_BLOCK_M", 16 if small else 64))
    bn = int(os.environ.get("ENERGY_ATTN_BLOCK_N", 16 if small else 64))
    # fp32 dK/dV and dQ at 4 warps need 255 registers + 32 B of stack on sm_90 (dQ since its
    # tf32 operands are rounded to nearest): 8 warps; dQ then still spills 8 B at 2 stages,
    # none at 3 (bench/results/resources-sm90.md)
    fp32 = dtype == torch.float32
    bwd_warps = 8 if fp32 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=4, num_stages=3 if fp32 else 2,
                dkdv_warps=bwd_warps, dq_warps=bwd_warps)


def _attention_resources() -> list:
    B, S, Q, dh = 8, 600, 64, 64
    out = []
    for dtype, dt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cfg = attn_config(dh, dtype, interpret=False)
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
        launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        for E, heads in ((512, 8), (1024, 16)):
            p = f"*{dt}"
            common = dict(UPCAST=False, INPUT_PRECISION="tf32", **blocks)
            q = dict(stride_qb=Q * E, stride_qm=E)
            kv = dict(stride_kb=S * 2 * E, stride_kn=2 * E, stride_vb=S * 2 * E, stride_vn=2 * E,
                      stride_pb=608)
            dout = dict(stride_dob=Q * E, stride_dom=E)
            scales = dict(qk_scale=0.18, sm_scale=0.125)
            tag = f"{dt}.E{E}h{heads}"
            out.append(dict(
                name=f"energy.attn_fwd.{tag}", kernel=_energy_attention_fwd_kernel,
                args=dict(Q=p, K=p, V=p, PAD="*u8", O=p, LSE="*fp32", **q, **kv,
                          stride_ob=Q * E, stride_om=E, n_heads=heads, n_q=Q, n_k=S,
                          head_dim=dh, qk_scale=0.18),
                constexprs=common, expect_wgmma=True, **launch))
            out.append(dict(
                name=f"energy.attn_bwd_pre.{tag}", kernel=_energy_attention_bwd_preprocess_kernel,
                args=dict(O=p, DO=p, DELTA="*fp32", stride_ob=Q * E, stride_om=E, **dout,
                          n_heads=heads, n_q=Q, head_dim=dh),
                constexprs=dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"]), **launch))
            for shared in (True, False):
                out.append(dict(
                    name=f"energy.attn_bwd_dq.{tag}.{'shared' if shared else 'per_sample'}",
                    kernel=_energy_attention_bwd_dq_kernel,
                    args=dict(Q=p, K=p, V=p, PAD="*u8", DO=p, LSE="*fp32", DELTA="*fp32", DQ=p,
                              **q, **kv, **dout, stride_dqb=Q * E, stride_dqm=E, n_batch=B,
                              n_heads=heads, n_q=Q, n_k=S, head_dim=dh, **scales),
                    constexprs=dict(SHARED_Q=shared, **common), expect_wgmma=True,
                    num_warps=cfg["dq_warps"], num_stages=cfg["num_stages"]))
            out.append(dict(
                name=f"energy.attn_bwd_dkdv.{tag}", kernel=_energy_attention_bwd_dkdv_kernel,
                args=dict(Q=p, K=p, V=p, PAD="*u8", DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p,
                          **q, **kv, **dout, stride_dkb=S * E, stride_dkn=E, stride_dvb=S * E,
                          stride_dvn=E, n_heads=heads, n_q=Q, n_k=S, head_dim=dh, **scales),
                constexprs=common, num_warps=cfg["dkdv_warps"], num_stages=cfg["num_stages"],
                expect_wgmma=True))
    return out


def resource_configs() -> list:
    return _attention_resources() + bwd_resources("energy.mlp", M=4800, N=512, K_dw=4096,
                                                  K_dx=512)
