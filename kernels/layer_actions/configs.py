"""The shipped configs of the all-layer action-head pass, one source for its launcher and for the
sm_90 resource report: the gather-table kernel's, and the ``ln_linear`` launches it makes at the
production shapes (M = 33 layers x B 8 x H 8 = 2112 rows, D = hidden = 4096; Da = 7 for LIBERO
and BRIDGE, 14 for ALOHA), through ln_linear's own pickers (kernels/mlp/configs.py)."""
from __future__ import annotations

import torch

from ..mlp.configs import gemm_resource, stats_resource
from .fused import _layer_actions_offsets_kernel


def offsets_config() -> dict:
    return dict(BLOCK=256, num_warps=4, num_stages=1)


def resource_configs() -> list:
    M, D = 2112, 4096
    cfg = offsets_config()
    out = [dict(name="la.offsets", kernel=_layer_actions_offsets_kernel,
                args=dict(table_ptr="*i64", index_ptr="*i64", seg_ptr="*i64", n_batch=8,
                          n_tok=56, stride_ib=56, zero_off=2 ** 40),
                constexprs=dict(BLOCK=cfg["BLOCK"]), num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])]
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for da in (7, 14):
            out.append(stats_resource(f"la.stats.fc1.{tag}.Da{da}", M, da * D, dtype, nseg=da))
            out.append(gemm_resource(f"la.fc1.{tag}.Da{da}.relu", M, D, da * D, dtype, nseg=da))
        out.append(gemm_resource(f"la.fc1.{tag}.Da7.silu", M, D, 7 * D, dtype, nseg=7,
                                 activation="silu"))
        out.append(stats_resource(f"la.stats.block.{tag}", M, D, dtype))
        out.append(gemm_resource(f"la.block.{tag}.relu", M, D, D, dtype, residual=True))
        out.append(gemm_resource(f"la.block.{tag}.silu", M, D, D, dtype, residual=True,
                                 activation="silu"))
        for da in (7, 14):
            out.append(gemm_resource(f"la.ln2_fc2.{tag}.Da{da}", M, da, D, dtype,
                                     activation="none"))
    # fp32 heads: tf32 dot
    fp32 = torch.float32
    out.append(stats_resource("la.stats.fc1.fp32.Da7", M, 7 * D, fp32, nseg=7))
    out.append(gemm_resource("la.fc1.fp32.Da7.relu", M, D, 7 * D, fp32, nseg=7))
    out.append(gemm_resource("la.block.fp32.relu", M, D, D, fp32, residual=True))
    out.append(gemm_resource("la.ln2_fc2.fp32.Da7", M, 7, D, fp32, activation="none"))
    return out
