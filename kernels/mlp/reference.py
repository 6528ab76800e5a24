"""Eager oracle of the fused MLP building block (readable maths, float64-friendly).

Shares no helper with the fused path: the LayerNorm is torch's, the gather is indexing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ln_linear_reference(x, weight, bias=None, *, ln_weight=None, ln_bias=None, ln_eps=1e-5,
                        normalize=False, activation="none", residual=None, row_index=None,
                        compute_dtype=None, return_stats=False):
    """y = act(LN(x[row_index]) @ weight^T + bias) [+ residual], all in ``compute_dtype``
    (default: weight.dtype; pass torch.float64 with float64-cast arguments for the oracle).
    With return_stats, also the per-row mean and rstd (biased variance) of the LN input."""
    dt = weight.dtype if compute_dtype is None else compute_dtype
    a = x if row_index is None else x[row_index]
    a = a.to(weight.dtype).to(dt)  # the kernel rounds x to the weight dtype first
    mean = a.mean(dim=-1)
    rstd = torch.rsqrt(a.var(dim=-1, unbiased=False) + ln_eps)
    if normalize:
        a = F.layer_norm(a, (a.shape[-1],), None if ln_weight is None else ln_weight.to(dt),
                         None if ln_bias is None else ln_bias.to(dt), ln_eps)
    y = F.linear(a, weight.to(dt), None if bias is None else bias.to(dt))
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "silu":
        y = F.silu(y)
    elif activation != "none":
        raise ValueError(f"activation: {activation!r}")
    if residual is not None:
        y = y + residual.to(dt)
    return (y, mean, rstd) if return_stats else y
