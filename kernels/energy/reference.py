"""Eager oracles of the energy kernels, written for clarity (float64-friendly); they share no
helper with the fused path.

- ``energy_attention_reference(q, k, v, pad_mask, heads)``: the masked cross-attention that
  ``_energy_attn_*_kernel`` compute, shapes as in attention.py (q (1 or B, Q, E), k/v (B, S, E)).
- ``energy_scores_reference(model, context, pad_mask, candidates)``: the whole scoring, i.e.
  ``EnergyModel.score`` (energy_train/models/energy.py), the issue's oracle.
"""
from __future__ import annotations

import math

import torch


def energy_attention_reference(q, k, v, pad_mask, heads):
    B, S, E = k.shape
    q = q.expand(B, -1, -1)
    Q, dh = q.shape[1], E // heads
    qh = q.reshape(B, Q, heads, dh).permute(0, 2, 1, 3)
    kh = k.reshape(B, S, heads, dh).permute(0, 2, 1, 3)
    vh = v.reshape(B, S, heads, dh).permute(0, 2, 1, 3)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(dh)            # (B, heads, Q, S)
    out = torch.zeros_like(qh)
    for b in range(B):  # plain loop: a sample with no valid key keeps its zero output
        keep = torch.ones(S, dtype=torch.bool, device=k.device) if pad_mask is None else ~pad_mask[b]
        if bool(keep.any()):
            p = torch.softmax(scores[b][..., keep], dim=-1)
            out[b] = p @ vh[b][:, keep]
    return out.permute(0, 2, 1, 3).reshape(B, Q, E)


def energy_scores_reference(model, context, pad_mask, candidates):
    return model.score(context, pad_mask, candidates)
