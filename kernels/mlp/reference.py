"""Eager oracles of ``ln_linear`` and of the MLPResNet built on it (readable maths,
float64-friendly). They share no helper with the fused path: the LayerNorm is torch's, the
gather is indexing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..weights import MLPResNetWeights


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


def mlp_resnet_reference(x: torch.Tensor, w: MLPResNetWeights) -> torch.Tensor:
    """MLPResNet (..., K) -> (..., N): x = act(fc1(ln1 x)); per block x = x + act(fc(ln x));
    fc2(ln2 x). Differentiable; computes in the weights' dtype (x must be in it)."""
    act = {"relu": torch.relu, "silu": F.silu}[w.activation]

    def ln_linear(x, lin):
        x = F.layer_norm(x, (x.shape[-1],), lin.ln_weight, lin.ln_bias, lin.ln_eps)
        return F.linear(x, lin.weight, lin.bias)

    x = act(ln_linear(x, w.fc1))
    for block in w.blocks:
        x = x + act(ln_linear(x, block))
    return ln_linear(x, w.fc2)
