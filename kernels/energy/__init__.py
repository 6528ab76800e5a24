"""Fused energy scoring: many candidates against a context encoded once (issue 5).

``energy_scores_triton(model, context, pad_mask, candidates)`` -> energies (B, C), the
Triton path behind ``energy_train.ops.energy_scores(..., backend="triton")``. Differentiable
w.r.t. every energy-model parameter, the candidates (when they require grad) and the context
(when it requires grad; the trainer detaches it, so then nothing is computed for it).

Pipeline (E = hidden, Q = C*H queries per sample):
  context (B, S, D) -> state encoder MLPResNet -> one K|V projection (B, S, 2E)   once per sample
  candidates -> action encoder MLPResNet -> + positional table -> Q projection (Bq, Q, E)
  cross-attention (Triton, flash-style, K/V read in place for all C candidates) -> (B, Q, E)
  out projection -> prediction head MLPResNet -> mean over H -> output transform -> (B, C)

Shared candidate pool: when ``candidates`` is an expanded view with stride 0 over the batch
(``pool.unsqueeze(0).expand(B, ...)``, what ``losses.swap_infonce`` passes), the C chunks are
encoded ONCE (Bq = 1) instead of B times, and the attention kernels read one Q for all samples.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .attention import default_precision, energy_attention  # noqa: F401

__all__ = ["energy_scores_triton", "energy_attention", "is_shared_pool"]


def is_shared_pool(candidates: torch.Tensor) -> bool:
    """True when every sample sees the same candidates (an expand: stride 0 over the batch)."""
    return candidates.shape[0] > 1 and candidates.stride(0) == 0


def _mlp_resnet(m, x: torch.Tensor) -> torch.Tensor:
    """MLPResNet forward: ln1 -> fc1 -> act -> blocks (x + act(fc(ln x))) -> ln2 -> fc2."""
    return m(x)


def _output_transform(raw: torch.Tensor, output: str) -> torch.Tensor:
    if output == "unbounded":
        return raw
    if output == "sigmoid":
        return torch.sigmoid(0.5 * raw) * 2 + 0.1
    if output == "softplus":
        return F.softplus(raw) + 1e-6
    raise ValueError(f"output: unknown transform {output!r}")


def energy_scores_triton(model, context: torch.Tensor, pad_mask: Optional[torch.Tensor],
                         candidates: torch.Tensor, *,
                         input_precision: Optional[str] = None) -> torch.Tensor:
    """Energies (B, C) of candidates (B, C, H, Da) against context (B, S, D); pad_mask (B, S)
    bool, True = ignore. Inputs are checked by ops.energy_scores (model.check_inputs)."""
    B, C, H, Da = candidates.shape
    E, heads, dt = model.hidden, model.heads, model.dtype
    if input_precision is None:
        input_precision = default_precision(dt)
    pool = candidates[:1] if is_shared_pool(candidates) else candidates  # (Bq, C, H, Da)
    Bq = pool.shape[0]

    w, bias = model.cross.in_proj_weight, model.cross.in_proj_bias
    c = _mlp_resnet(model.state_linear, context.to(dt))                # (B, S, E)
    kv = F.linear(c, w[E:], bias[E:])                                  # (B, S, 2E): K | V
    k, v = kv[..., :E], kv[..., E:]                                    # views, no copy

    a = _mlp_resnet(model.action_linear, pool.to(dt).reshape(Bq * C, H, Da))
    a = a + model.pe_layer.P[:H].to(dt)
    q = F.linear(a, w[:E], bias[:E]).reshape(Bq, C * H, E)

    z = energy_attention(q, k, v, pad_mask, heads, input_precision)     # (B, C*H, E)
    z = model.cross.out_proj(z)
    raw = _mlp_resnet(model.prediction_head, z).reshape(B, C, H).mean(dim=-1)
    return _output_transform(raw, model.output)
