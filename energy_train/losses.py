"""Contrastive energy losses, negatives and test-time correction, built on ops.energy_scores.

Every loss returns ``EnergyLoss(loss, energies, target)``: the scalar loss, the (B, C)
energies it was computed from (for metrics, e.g. :func:`ranking_accuracy`) and the (B,)
column of the positive candidate. Nothing here synchronises with the host.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .checks import check_bool, check_int, check_nonempty, check_real, check_tensor
from .models import EnergyModel
from .ops import energy_scores


class EnergyLoss(NamedTuple):
    loss: torch.Tensor      # () scalar
    energies: torch.Tensor  # (B, C)
    target: torch.Tensor    # (B,) int64, the column of the positive


def ranking_accuracy(out: EnergyLoss) -> torch.Tensor:
    """Fraction of samples whose positive gets the lowest energy among its candidates (tensor)."""
    return (out.energies.argmin(dim=1) == out.target).float().mean()


def _check_chunks(energy_model, context, name: str, t, ndim: int = 3,
                  allow_empty: bool = False) -> None:
    """The chunks a loss scores, named as the caller passed them: expert/actions (B, H, Da) or
    negatives (B, M, H, Da), B = the context's batch (at least one sample unless
    ``allow_empty``)."""
    if not isinstance(energy_model, EnergyModel):
        raise TypeError(f"energy_model: expected an EnergyModel, got {type(energy_model).__name__}")
    check_tensor("context", context, ndim=3)
    energy_model.check_chunks(name, t, ndim, context.shape[0])
    if not allow_empty:
        check_nonempty(name, t, 0, "sample")


def _check_negatives(energy_model, context, expert, negatives, at_least: int) -> None:
    _check_chunks(energy_model, context, "negatives", negatives, 4)
    check_tensor("negatives", negatives, shape={2: expert.shape[1]})
    if negatives.shape[1] < at_least:
        raise ValueError(f"negatives: expected at least {at_least} negative(s) (dim 1), got "
                         f"shape {tuple(negatives.shape)}")


def infonce_from_energies(energies: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy over logits -E / tau (in fp32 at least; fp64 stays fp64); tau > 0."""
    tau = check_real("tau", tau, low=0, low_open=True)
    if energies.dtype in (torch.float16, torch.bfloat16):
        energies = energies.float()
    return F.cross_entropy(-energies / tau, target)


def swap_infonce(energy_model, context, pad_mask, expert, *, tau: float = 0.5,
                 all_expert: torch.Tensor | None = None, offset: int | torch.Tensor = 0,
                 backend: str = "auto") -> EnergyLoss:
    """In-batch swap InfoNCE (the fork's active loss): sample i scores every expert chunk;
    its own is the positive. logits = -E / tau.

    expert (B, H, Da). For negatives gathered across ranks pass ``all_expert`` (N, H, Da), the
    chunks of every rank, and ``offset``, where this rank's chunks start in it (an int in
    [0, N - B]; a tensor offset is taken as given: checking its value would sync the host).
    """
    tau = check_real("tau", tau, low=0, low_open=True)
    _check_chunks(energy_model, context, "expert", expert)
    B = expert.shape[0]
    pool = expert
    if all_expert is not None:
        check_tensor("all_expert", all_expert, ndim=3,
                     shape={1: expert.shape[1], 2: expert.shape[2]}, floating=True)
        pool = all_expert
    if isinstance(offset, torch.Tensor):
        check_tensor("offset", offset, ndim=0, integer=True)
    else:
        check_int("offset", offset, low=0, high=pool.shape[0] - B)
    candidates = pool.unsqueeze(0).expand(B, *pool.shape)  # a view: no copy per sample
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    target = torch.arange(B, device=expert.device) + offset
    return EnergyLoss(infonce_from_energies(energies, target, tau), energies, target)


def explicit_infonce(energy_model, context, pad_mask, expert, negatives, *, tau: float = 0.5,
                     backend: str = "auto") -> EnergyLoss:
    """InfoNCE with explicit negatives: candidate 0 is the expert (B, H, Da), then the
    negatives (B, M, H, Da), M >= 0."""
    tau = check_real("tau", tau, low=0, low_open=True)
    _check_chunks(energy_model, context, "expert", expert)
    _check_negatives(energy_model, context, expert, negatives, at_least=0)
    candidates = torch.cat([expert.unsqueeze(1), negatives.to(expert.dtype)], dim=1)
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    target = torch.zeros(expert.shape[0], dtype=torch.int64, device=expert.device)
    return EnergyLoss(infonce_from_energies(energies, target, tau), energies, target)


def margin_ranking(energy_model, context, pad_mask, expert, negatives, *, m0: float = 1.0,
                   kappa: float = 0.6, detach_positive: bool = True,
                   backend: str = "auto") -> EnergyLoss:
    """mean over (b, m) of relu(m0 + kappa * |A_neg - A*| + E_pos - E_neg), |.| the L2 norm of
    the flattened chunk. ``detach_positive`` (the fork's choice) stops the gradient through
    E_pos, so only the negatives are pushed up. m0 >= 0, kappa >= 0, M >= 1."""
    m0 = check_real("m0", m0, low=0)
    kappa = check_real("kappa", kappa, low=0)
    check_bool("detach_positive", detach_positive)
    _check_chunks(energy_model, context, "expert", expert)
    _check_negatives(energy_model, context, expert, negatives, at_least=1)
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
    with the expert by construction. They are kept as the fork's negatives; they carry signal
    only for an energy model without that normalisation."""
    check_tensor("expert", expert, ndim=3, floating=True)
    B, H, Da = expert.shape
    sigma = check_real("sigma", sigma, low=0)
    amplitudes = [check_real(f"amplitudes[{i}]", a) for i, a in enumerate(amplitudes)]
    check_bool("sign_flip", sign_flip)
    negs = []
    if layer_actions is None:
        if layer_picks is not None:
            raise ValueError("layer_picks: given without layer_actions")
    else:
        check_tensor("layer_actions", layer_actions, ndim=4, shape={1: B, 2: H, 3: Da}, floating=True)
        L = layer_actions.shape[0]
        check_nonempty("layer_actions", layer_actions, 0, "layer")
        picks = layer_picks if layer_picks is not None else (0, L // 2)
        for i, p in enumerate(picks):
            check_int(f"layer_picks[{i}]", p, low=-L, high=L - 1)
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
    actions (B, H, Da) -> corrected (B, H, Da), detached (B = 0: an empty result). Context gets
    no gradient. alpha >= 0, steps an int >= 0, clip_frac > 0."""
    alpha = check_real("alpha", alpha, low=0)
    steps = check_int("steps", steps, low=0)
    clip_frac = check_real("clip_frac", clip_frac, low=0, low_open=True)
    _check_chunks(energy_model, context, "actions", actions, allow_empty=True)
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
