"""Baselines that the benchmarks time and the tests prove equal to the fused ops.

Energy (issue 5): the public energy fork's literal formulation, which pushes a copy of the
context through the WHOLE energy model for every (sample, candidate) pair (B*B copies for the
swap loss, B*(1+M) for explicit negatives): ``EnergyModel.forward`` on the replicated batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def energies_replicated(energy_model, context, pad_mask, candidates):
    """(B, C) energies, context (B, S, D) repeated C times: E(ctx_b, cand_bc) one row each."""
    B, C, H, Da = candidates.shape
    ctx = context.repeat_interleave(C, dim=0)                      # (B*C, S, D): a real copy
    pad = None if pad_mask is None else pad_mask.repeat_interleave(C, dim=0)
    return energy_model(ctx, candidates.reshape(B * C, H, Da), pad).reshape(B, C)


def swap_infonce_replicated(energy_model, context, pad_mask, expert, tau=0.5):
    """The fork's in-batch swap InfoNCE: every sample against every expert chunk."""
    B = expert.shape[0]
    cand = expert.unsqueeze(0).expand(B, *expert.shape)
    energies = energies_replicated(energy_model, context, pad_mask, cand)
    target = torch.arange(B, device=expert.device)
    return F.cross_entropy(-energies.float() / tau if energies.dtype in (torch.float16, torch.bfloat16)
                           else -energies / tau, target), energies


def explicit_infonce_replicated(energy_model, context, pad_mask, expert, negatives, tau=0.5):
    """InfoNCE over [expert, negatives (B, M, H, Da)], the context copied 1+M times."""
    cand = torch.cat([expert.unsqueeze(1), negatives.to(expert.dtype)], dim=1)
    energies = energies_replicated(energy_model, context, pad_mask, cand)
    target = torch.zeros(expert.shape[0], dtype=torch.int64, device=expert.device)
    return F.cross_entropy(-energies.float() / tau if energies.dtype in (torch.float16, torch.bfloat16)
                           else -energies / tau, target), energies
