"""Eager oracles of the energy scoring (readable maths, float64-friendly), sharing no helper with
the fused path (the output transform, an elementwise function applied after the kernels, is the
one piece both use).

- ``energy_scores_reference(weights, context, pad_mask, candidates)`` -> (B, C): the energy
  model's maths, each context encoded once. ``EnergyModel`` computes with it.
- ``energy_attention_reference(q, k, v, pad_mask, heads)``: the masked cross-attention of the
  ``_energy_attention_*`` kernels, shapes as in op.py.
A key the pad mask hides contributes exactly nothing, forward and backward: its context row is
replaced by zeros before the encoder and its k, v before the attention (a select, never a
multiplication by 0, so NaN or inf there cannot leak). A sample whose keys are all masked
attends to nothing (zero attention output).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..mlp.reference import mlp_resnet_reference
from ..weights import EnergyWeights

OUTPUTS = ("unbounded", "sigmoid", "softplus")


def output_transform(raw: torch.Tensor, output: str) -> torch.Tensor:
    """The energy from the raw head output: ``unbounded`` (as is), ``sigmoid``
    (sigmoid(0.5 x) * 2 + 0.1) or ``softplus`` (softplus(x) + 1e-6)."""
    if output == "unbounded":
        return raw
    if output == "sigmoid":
        return torch.sigmoid(0.5 * raw) * 2 + 0.1
    if output == "softplus":
        return F.softplus(raw) + 1e-6
    raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")


def energy_attention_reference(q, k, v, pad_mask, heads: int) -> torch.Tensor:
    """q (1 or B, Q, E), k and v (B, S, E), pad_mask (B, S) bool (True = ignore) or None ->
    (B, Q, E): per head (E/heads columns) softmax(q k^T / sqrt(dh)) v over the valid keys."""
    B, S, E = k.shape
    dh = E // heads

    def split(x):  # (B, N, E) -> (B, heads, N, dh)
        return x.reshape(x.shape[0], x.shape[1], heads, dh).transpose(1, 2)

    qh, kh, vh = split(q.expand(B, -1, -1)), split(k), split(v)
    if pad_mask is not None:
        hidden = pad_mask[:, None, :, None]                       # (B, 1, S, 1)
        kh, vh = kh.masked_fill(hidden, 0.0), vh.masked_fill(hidden, 0.0)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(dh)            # (B, heads, Q, S)
    if pad_mask is not None:
        # a sample with no valid key hides nothing: its keys are zero, so its output is zero
        hide = pad_mask & (~pad_mask).any(dim=1, keepdim=True)
        scores = scores.masked_fill(hide[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vh                      # (B, heads, Q, dh)
    return out.transpose(1, 2).reshape(B, q.shape[1], E)


def energy_scores_reference(w: EnergyWeights, context: torch.Tensor,
                            pad_mask: torch.Tensor | None,
                            candidates: torch.Tensor) -> torch.Tensor:
    """Energies (B, C) of candidates (B, C, H, Da) against context (B, S, D); pad_mask (B, S)
    bool, True = ignore. Context -> state encoder -> k, v (once per sample); candidates ->
    action encoder + positional table -> q; attention; out projection (+ ``gate_a`` times the
    encoded action, when the weights carry one); prediction head per step; output transform
    per step; mean over the H steps (the fork's order). Computes in the weights' dtype."""
    B, C, H, _ = candidates.shape
    E, dt = w.hidden, w.dtype
    W, b = w.in_proj_weight, w.in_proj_bias
    x = context.to(dt)
    if pad_mask is not None:
        x = x.masked_fill(pad_mask[:, :, None], 0.0)
    c = mlp_resnet_reference(x, w.state)                                  # (B, S, E)
    k = F.linear(c, W[E:2 * E], b[E:2 * E])
    v = F.linear(c, W[2 * E:], b[2 * E:])
    a = mlp_resnet_reference(candidates.to(dt), w.action) + w.pe[:H].to(dt)  # (B, C, H, E)
    q = F.linear(a, W[:E], b[:E]).reshape(B, C * H, E)
    z = energy_attention_reference(q, k, v, pad_mask, w.heads)          # (B, C*H, E)
    z = F.linear(z, w.out_proj_weight, w.out_proj_bias)
    if w.gate_a is not None:  # the action residual: the head also reads the encoded action
        z = z + w.gate_a.to(dt) * a.reshape(B, C * H, E)
    raw = mlp_resnet_reference(z, w.head).reshape(B, C, H)               # per step
    return output_transform(raw, w.output).mean(dim=-1)                # transform, then mean
