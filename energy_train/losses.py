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
from .modes import eval_mode
from .ops import energy_scores, is_layer_actions


class EnergyLoss(NamedTuple):
    loss: torch.Tensor      # () scalar
    energies: torch.Tensor  # (B, C)
    target: torch.Tensor    # (B,) int64, the column of the positive


TIE_TOL = 1e-4  # |E_c - E_pos| <= TIE_TOL * max(1, |E_pos|): a tie


def _ties(out: EnergyLoss):
    """(E (B, C), E_pos (B, 1), tie (B, C) bool with the positive's own column False)."""
    E = out.energies
    pos = E.gather(1, out.target[:, None])
    tol = TIE_TOL * pos.abs().clamp_min(1.0)
    tie = (E - pos).abs() <= tol
    own = torch.zeros_like(tie).scatter_(1, out.target[:, None], True)
    return E, pos, tie & ~own, tol


def ranking_accuracy(out: EnergyLoss) -> torch.Tensor:
    """Fraction of samples whose positive gets the lowest energy among its candidates, ties
    counted as ties: a positive tied with k others (|E_c - E_pos| <= 1e-4 * max(1, |E_pos|))
    and below the rest scores 1 / (k + 1), what a random tie-break gets. A model that cannot
    tell the candidates apart scores chance (1 / C), not 1. At least 2 candidates (with one
    it would be 1.0 whatever the model). (tensor, no host sync)"""
    if out.energies.dim() != 2 or out.energies.shape[1] < 2:
        raise ValueError(f"ranking_accuracy: expected energies (B, C) of at least 2 candidates, "
                         f"got shape {tuple(out.energies.shape)}: with one candidate the accuracy "
                         "is 1.0 whatever the model (chance = 1 / C); score the positive against "
                         "negatives")
    E, pos, tie, tol = _ties(out)
    lower = (E < pos - tol).any(dim=1)  # another candidate strictly below the positive
    return ((~lower).float() / (1 + tie.sum(dim=1)).float()).mean()


def tie_rate(out: EnergyLoss) -> torch.Tensor:
    """Fraction of the (sample, negative) pairs whose energy ties with the positive's."""
    _, _, tie, _ = _ties(out)
    return tie.float().sum() / max(1, tie.numel() - tie.shape[0])


def energy_spread(out: EnergyLoss, tau: float = 1.0) -> torch.Tensor:
    """Mean over samples of the standard deviation of the energies over the candidates,
    divided by ``tau`` (the spread of the InfoNCE logits). ~0: the energy does not depend on
    the candidate (the loss sits at its uniform value)."""
    return (out.energies.float().std(dim=1) / tau).mean()


def candidate_weight(out: EnergyLoss, columns: slice, tau: float) -> torch.Tensor:
    """Mean over samples of the softmax(-E / tau) mass on ``columns`` of the candidates: the
    weight those candidates carry in the InfoNCE loss (and its gradient)."""
    p = torch.softmax(-out.energies.float() / tau, dim=1)
    return p[:, columns].sum(dim=1).mean()


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


def _check_negatives(energy_model, context, expert, negatives, loss: str) -> None:
    """negatives (B, M, H, Da), M >= 1 - not layer_actions' (L, B, H, Da), whose shape is the
    same when L == B (it carries a mark: :func:`energy_train.ops.is_layer_actions`)."""
    if is_layer_actions(negatives):
        raise ValueError(f"negatives: got the output of layer_actions, laid out (L, B, H, Da) "
                         f"(layers first, shape {tuple(negatives.shape)}); {loss} takes negatives "
                         "(B, M, H, Da): pass structured_negatives(expert, layer_actions) or "
                         "layer_actions.transpose(0, 1)")
    _check_chunks(energy_model, context, "negatives", negatives, 4)
    check_tensor("negatives", negatives, shape={2: expert.shape[1]})
    if negatives.shape[1] < 1:
        raise ValueError(f"negatives: expected at least 1 negative(s) (dim 1), got shape "
                         f"{tuple(negatives.shape)}: with the expert alone {loss} is a constant "
                         "with zero gradient; give negatives (structured_negatives) or use "
                         "swap_infonce (the other samples' chunks)")


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
    if pool.shape[0] < 2:
        raise ValueError(f"expert: the swap InfoNCE scores each sample against every chunk of the "
                         f"batch (or all_expert); got one chunk, shape {tuple(pool.shape)}: the "
                         "loss would be exactly 0 and the ranking accuracy 1.0 (chance); use a "
                         "batch of at least 2 samples, all_expert= (other ranks' chunks) or "
                         "explicit_infonce with negatives")
    candidates = pool.unsqueeze(0).expand(B, *pool.shape)  # a view: no copy per sample
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    target = torch.arange(B, device=expert.device) + offset
    return EnergyLoss(infonce_from_energies(energies, target, tau), energies, target)


def explicit_infonce(energy_model, context, pad_mask, expert, negatives, *, tau: float = 0.5,
                     backend: str = "auto") -> EnergyLoss:
    """InfoNCE with explicit negatives: candidate 0 is the expert (B, H, Da), then the
    negatives (B, M, H, Da), M >= 1 (layer_actions' (L, B, H, Da) output is refused: pass it
    through structured_negatives)."""
    tau = check_real("tau", tau, low=0, low_open=True)
    _check_chunks(energy_model, context, "expert", expert)
    _check_negatives(energy_model, context, expert, negatives, "explicit_infonce")
    candidates = torch.cat([expert.unsqueeze(1), negatives.to(expert.dtype)], dim=1)
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    target = torch.zeros(expert.shape[0], dtype=torch.int64, device=expert.device)
    return EnergyLoss(infonce_from_energies(energies, target, tau), energies, target)


def margin_from_energies(energies: torch.Tensor, dist: torch.Tensor, *, m0: float = 1.0,
                         kappa: float = 0.6, detach_positive: bool = False) -> torch.Tensor:
    """mean over (b, m) of relu(m0 + kappa * dist[b, m] + E[b, 0] - E[b, 1 + m]).

    energies (B, 1 + M): column 0 the positive; dist (B, M). With the positive's energy in the
    graph the loss depends on energy DIFFERENCES only, so shifting every energy by the same
    amount changes neither the loss nor (summed over the candidates) its gradient.
    ``detach_positive=True`` is the fork's choice: the gradient then pushes only the negatives
    up, and the loss falls by raising every energy together - it collapses (energies grow
    without bound, their spread across candidates goes to 0)."""
    e_pos, e_neg = energies[:, :1], energies[:, 1:]
    if detach_positive:
        e_pos = e_pos.detach()
    return F.relu(m0 + kappa * dist.to(energies.dtype) + e_pos - e_neg).mean()


def margin_ranking(energy_model, context, pad_mask, expert, negatives, *, m0: float = 1.0,
                   kappa: float = 0.6, detach_positive: bool = False,
                   backend: str = "auto") -> EnergyLoss:
    """Margin ranking of the expert (B, H, Da) against negatives (B, M, H, Da):
    :func:`margin_from_energies` with dist = |A_neg - A*|, the L2 norm of the flattened chunk
    difference. The positive stays in the graph unless ``detach_positive`` (the fork's choice,
    which collapses: see :func:`margin_from_energies`). m0 >= 0, kappa >= 0, M >= 1."""
    m0 = check_real("m0", m0, low=0)
    kappa = check_real("kappa", kappa, low=0)
    check_bool("detach_positive", detach_positive)
    _check_chunks(energy_model, context, "expert", expert)
    _check_negatives(energy_model, context, expert, negatives, "margin_ranking")
    candidates = torch.cat([expert.unsqueeze(1), negatives.to(expert.dtype)], dim=1)
    energies = energy_scores(energy_model, context, pad_mask, candidates, backend=backend)
    dist = (negatives - expert.unsqueeze(1)).flatten(2).norm(dim=-1)
    loss = margin_from_energies(energies, dist, m0=m0, kappa=kappa, detach_positive=detach_positive)
    target = torch.zeros(expert.shape[0], dtype=torch.int64, device=expert.device)
    return EnergyLoss(loss, energies, target)


def structured_negatives(expert: torch.Tensor, layer_actions: torch.Tensor | None = None, *,
                         layer_picks: Sequence[int] | None = None, own_prediction: bool = False,
                         sigma: float = 0.3, amplitudes: Sequence[float] = (),
                         sign_flip: bool = True,
                         generator: torch.Generator | None = None,
                         draws: tuple | None = None) -> torch.Tensor:
    """Negatives (B, M, H, Da) around the expert chunk (B, H, Da), in this order:

    1. the picked layer actions, ``layer_actions[p]`` for p in ``layer_picks`` (from
       ``layer_actions`` (L', B, H, Da); default: the first and the middle layer);
    2. with ``own_prediction``, the policy's own prediction ``layer_actions[-1]`` (the head on
       the last hidden state);
    3. Gaussian noise ``expert + sigma * N(0, 1)`` (none when sigma = 0);
    4. each amplitude scaling ``expert * a``;
    5. with ``sign_flip``, a sign flip of one action dimension per sample.

    Groups 1-2 depend on the policy's weights (theta); 3-5 only on the expert. M = len(picks)
    + own_prediction + (sigma > 0) + len(amplitudes) + sign_flip.

    The flipped dimension is drawn with probability proportional to its mean magnitude over
    the chunk, so a dimension that is always zero (e.g. an unused rotation axis) is never
    "flipped" into an exact copy of the expert.

    Amplitudes are off by default: the energy fork's action encoder (kept for state_dict
    compatibility) starts with a LayerNorm over each step's Da values, so its energy is
    invariant to a positive rescaling (and a shift) of every step - an amplitude negative
    TIES with the expert (to ~1e-5) and only adds a floor of log(1 + ties) to the InfoNCE loss.
    The defaults give candidates that an energy model can tell apart.

    ``draws``: the random numbers of groups 3 and 5 made beforehand by :func:`negative_draws`
    (the same ``generator`` calls in the same order, so the same negatives): what a CUDA graph
    of the energy phase takes as an input instead of re-seeding a generator inside it."""
    check_tensor("expert", expert, ndim=3, floating=True)
    B, H, Da = expert.shape
    sigma = check_real("sigma", sigma, low=0)
    amplitudes = [check_real(f"amplitudes[{i}]", a) for i, a in enumerate(amplitudes)]
    check_bool("sign_flip", sign_flip)
    check_bool("own_prediction", own_prediction)
    negs = []
    if layer_actions is None:
        if layer_picks is not None:
            raise ValueError("layer_picks: given without layer_actions")
        if own_prediction:
            raise ValueError("own_prediction: needs layer_actions (its last entry is the "
                             "policy's own prediction)")
    else:
        check_tensor("layer_actions", layer_actions, ndim=4, shape={1: B, 2: H, 3: Da}, floating=True)
        L = layer_actions.shape[0]
        check_nonempty("layer_actions", layer_actions, 0, "layer")
        picks = layer_picks if layer_picks is not None else (0, L // 2)
        for i, p in enumerate(picks):
            check_int(f"layer_picks[{i}]", p, low=-L, high=L - 1)
        negs += [layer_actions[p].to(expert.dtype) for p in picks]
        if own_prediction:
            negs.append(layer_actions[-1].to(expert.dtype))
    noise, u = negative_draws(expert, sigma, sign_flip, generator) if draws is None else draws
    if sigma > 0:
        negs.append(expert + sigma * noise.to(expert.dtype))
    negs += [expert * a for a in amplitudes]
    if sign_flip:
        # Gumbel-max draw, proportional to each dimension's mean magnitude: no host sync and,
        # unlike torch.multinomial, no value check that would raise on a NaN batch (the
        # trainer reports those at read-back with the step number).
        weight = expert.detach().abs().float().mean(dim=1) + 1e-12  # (B, Da)
        dim = (weight.log() - (-u.log()).log()).argmax(dim=1)
        flip = 1 - 2 * F.one_hot(dim, Da).to(expert.dtype)  # (B, Da): -1 at the flipped dim
        negs.append(expert * flip[:, None, :])
    if not negs:
        raise ValueError("structured_negatives: every kind of negative is off (no layer "
                         "actions, sigma = 0, no amplitudes, no sign flip)")
    return torch.stack(negs, dim=1)


def negative_draws(expert: torch.Tensor, sigma: float, sign_flip: bool,
                   generator: torch.Generator | None = None) -> tuple:
    """(noise (B, H, Da) fp32 or None, u (B, Da) fp32 or None): the random numbers
    :func:`structured_negatives` reads - N(0, 1) noise when ``sigma`` > 0, then the uniforms of
    the sign flip's Gumbel-max draw when ``sign_flip`` - in that order from ``generator``."""
    B, H, Da = expert.shape
    noise = (torch.randn(expert.shape, generator=generator, device=expert.device,
                         dtype=torch.float32) if sigma > 0 else None)
    u = (torch.rand((B, Da), generator=generator, device=expert.device).clamp_min(1e-20)
         if sign_flip else None)
    return noise, u


def correct_actions(energy_model, context, pad_mask, actions, *, alpha: float = 0.1,
                    steps: int = 1, clip_frac: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """Test-time correction: ``steps`` times A <- A - alpha * dE/dA, each step's norm clipped
    to ``clip_frac`` of |A| (per sample, over the flattened chunk, as the fork does), the
    energy model in eval mode (its mode restored after).
    actions (B, H, Da) -> corrected (B, H, Da), detached (B = 0: an empty result). Context gets
    no gradient. alpha >= 0, steps an int >= 0, clip_frac > 0."""
    alpha = check_real("alpha", alpha, low=0)
    steps = check_int("steps", steps, low=0)
    clip_frac = check_real("clip_frac", clip_frac, low=0, low_open=True)
    _check_chunks(energy_model, context, "actions", actions, allow_empty=True)
    context = context.detach()
    a = actions.detach()
    with torch.enable_grad(), eval_mode(energy_model):  # test time: eval mode, restored after
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
