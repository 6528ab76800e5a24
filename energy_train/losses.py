"""Contrastive energy losses, negatives and test-time correction, built on ops.energy_scores.

Every loss returns ``EnergyLoss(loss, energies, target)``: the scalar loss, the (B, C)
energies it was computed from (for metrics, e.g. :func:`ranking_accuracy`) and the (B,)
column of the positive candidate. Nothing here synchronises with the host.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .checks import check_tensor
from .ops import energy_scores


class EnergyLoss(NamedTuple):
    loss: torch.Tensor      # () scalar
    energies: torch.Tensor  # (B, C)
    target: torch.Tensor    # (B,) int64, the column of the positive


def ranking_accuracy(out: EnergyLoss) -> torch.Tensor:
    """Fraction of samples whose positive gets the lowest energy among its candidates (tensor)."""
    return (out.energies.argmin(dim=1) == out.target).float().mean()


def infonce_from_energies(energies: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy over logits -E / tau (in fp32 at least; fp64 stays fp64)."""
    if energies.dtype in (torch.float16, torch.bfloat16):
        energies = energies.float()
    return F.cross_entropy(-energies / tau, target)


def swap_infonce(energy_model, context, pad_mask, expert, *, tau: float = 0.5,
                 all_expert: torch.Tensor | None = None, offset: int | torch.Tensor = 0,
                 backend: str = "auto") -> EnergyLoss:
    """In-batch swap InfoNCE (the fork's active loss): sample i scores every expert chunk;
    its own is the positive. logits = -E / tau.

    expert (B, H, Da). For negatives gathered across ranks pass ``all_expert`` (N, H, Da), the
    chunks of every rank, and ``offset``, where this rank's chunks start in it.
    """
    check_tensor("expert", expert, ndim=3, floating=True)
    B = expert.shape[0]
    pool = expert if all_expert is None else all_expert
    check_tensor("all_expert", pool, ndim=3, shape={1: expert.shape[1], 2: expert.shape[2]},
                 floating=True)
    candidates = pool.unsqueeze(0).expand(B, *pool.shape)  # a view: no copy per sample
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    target = torch.arange(B, device=expert.device) + offset
    return EnergyLoss(infonce_from_energies(energies, target, tau), energies, target)


def explicit_infonce(energy_model, context, pad_mask, expert, negatives, *, tau: float = 0.5,
                     backend: str = "auto") -> EnergyLoss:
    """InfoNCE with explicit negatives: candidate 0 is the expert (B, H, Da), then the
    negatives (B, M, H, Da)."""
    check_tensor("expert", expert, ndim=3, floating=True)
    check_tensor("negatives", negatives, ndim=4, shape={0: expert.shape[0], 2: expert.shape[1],
                                                        3: expert.shape[2]}, floating=True)
    candidates = torch.cat([expert.unsqueeze(1), negatives.to(expert.dtype)], dim=1)
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    target = torch.zeros(expert.shape[0], dtype=torch.int64, device=expert.device)
    return EnergyLoss(infonce_from_energies(energies, target, tau), energies, target)


def margin_ranking(energy_model, context, pad_mask, expert, negatives, *, m0: float = 1.0,
                   kappa: float = 0.6, detach_positive: bool = True,
                   backend: str = "auto") -> EnergyLoss:
    """mean over (b, m) of relu(m0 + kappa * |A_neg - A*| + E_pos - E_neg), |.| the L2 norm of
    the flattened chunk. ``detach_positive`` (the fork's choice) stops the gradient through
    E_pos, so only the negatives are pushed up."""
    check_tensor("expert", expert, ndim=3, floating=True)
    check_tensor("negatives", negatives, ndim=4, shape={0: expert.shape[0], 2: expert.shape[1],
                                                        3: expert.shape[2]}, floating=True)
    candidates = torch.cat([expert.unsqueeze(1), negatives.to(expert.dtype)], dim=1)
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    e_pos, e_neg = energies[:, :1], energies[:, 1:]
    if detach_positive:
        e_pos = e_pos.detach()
    dist = (negatives - expert.unsqueeze(1)).flatten(2).norm(dim=-1).to(energies.dtype)
    loss = F.relu(m0 + kappa * dist + e_pos - e_neg).mean()
    target = torch.zeros(expert.shape[0], dtype=torch.int64, device=expert.device)
    return EnergyLoss(loss, energies, target)


def structured_negatives(expert: torch.Tensor, layer_actions: torch.Tensor | None = None, *,
                         layer_picks: Sequence[int] | None = None, sigma: float = 0.3,
                         amplitudes: Sequence[float] = (0.3, 1.7), sign_flip: bool = True,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Negatives (B, M, H, Da) around the expert chunk (B, H, Da), in this order:
    the picked layer actions (from ``layer_actions`` (L', B, H, Da); default picks the first
    and the middle layer), Gaussian noise (sigma), each amplitude scaling, and a sign flip of
    one action dimension per sample. Defaults give M = 6 with layer actions.

    The flipped dimension is drawn with probability proportional to its mean magnitude over
    the chunk, so a dimension that is always zero (e.g. an unused rotation axis) is never
    "flipped" into an exact copy of the expert.

    Caveat (the energy fork's architecture, kept for state_dict compatibility): its action
    encoder starts with a LayerNorm over each step's Da values, so the energy is invariant to
    a positive rescaling (and a shift) of every step: the amplitude negatives (x0.3, x1.7) tie
    with the expert by construction. They are kept because the design lists them; they carry
    signal only for an energy model without that normalisation."""
    check_tensor("expert", expert, ndim=3, floating=True)
    B, H, Da = expert.shape
    negs = []
    if layer_actions is not None:
        check_tensor("layer_actions", layer_actions, ndim=4, shape={1: B, 2: H, 3: Da}, floating=True)
        picks = layer_picks if layer_picks is not None else (0, layer_actions.shape[0] // 2)
        negs += [layer_actions[p].to(expert.dtype) for p in picks]
    noise = torch.randn(expert.shape, generator=generator, device=expert.device,
                        dtype=torch.float32).to(expert.dtype)
    negs.append(expert + sigma * noise)
    negs += [expert * a for a in amplitudes]
    if sign_flip:
        # Gumbel-max draw, proportional to each dimension's mean magnitude: no host sync and,
        # unlike torch.multinomial, no value check that would raise on a NaN batch (the
        # trainer reports those at read-back with the step number).
        weight = expert.detach().abs().float().mean(dim=1) + 1e-12  # (B, Da)
        u = torch.rand(weight.shape, generator=generator, device=expert.device).clamp_min(1e-20)
        dim = (weight.log() - (-u.log()).log()).argmax(dim=1)
        flip = 1 - 2 * F.one_hot(dim, Da).to(expert.dtype)  # (B, Da): -1 at the flipped dim
        negs.append(expert * flip[:, None, :])
    return torch.stack(negs, dim=1)


def correct_actions(energy_model, context, pad_mask, actions, *, alpha: float = 0.1,
                    steps: int = 1, clip_frac: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """Test-time correction: ``steps`` times A <- A - alpha * dE/dA, each step's norm clipped
    to ``clip_frac`` of |A| (per sample, over the flattened chunk, as the fork does).
    actions (B, H, Da) -> corrected (B, H, Da), detached. Context gets no gradient."""
    check_tensor("actions", actions, ndim=3, floating=True)
    context = context.detach()
    a = actions.detach()
    with torch.enable_grad():
        for _ in range(steps):
            a = a.clone().requires_grad_(True)
            e = energy_scores(energy_model, context, pad_mask, a.unsqueeze(1), backend=backend)
            (grad,) = torch.autograd.grad(e.sum(), a)
            step = alpha * grad
            step_norm = step.flatten(1).norm(dim=-1) + 1e-6
            base_norm = a.detach().flatten(1).norm(dim=-1) + 1e-6
            coef = torch.clamp(clip_frac * base_norm / step_norm, max=1.0)
            a = (a - step * coef[:, None, None]).detach()
    return a
