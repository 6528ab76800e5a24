"""The public code's formulations, kept ONLY for tests (to prove equality) and benchmarks (to
measure the saving). Nothing in energy_train imports this module.

- ``public_layer_actions_loop``: OpenVLA-OFT energy fork's negatives - a Python loop of one
  ``predict_action`` per hidden state, each after a boolean-mask gather (a host sync per layer
  on CUDA).
- ``replicated_energy_scores`` / ``replicated_swap_infonce`` / ``replicated_explicit_infonce``:
  the fork's energies - the context copied once per candidate ((B*C, S, D)) and pushed through
  the whole model each time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def public_layer_actions_loop(hidden_states, action_mask: torch.Tensor, head) -> torch.Tensor:
    """hidden_states: L+1 tensors (B, T, D); action_mask (B, T) bool with H*Da Trues per row.
    -> (L+1, B, H, Da), one predict_action per layer."""
    B = action_mask.shape[0]
    out = []
    for h in hidden_states:
        rows = h[action_mask].reshape(B, head.num_actions_chunk * head.action_dim, -1)
        out.append(head.predict_action(rows.to(head.model.fc1.weight.dtype)))
    return torch.stack(out)


def replicated_energy_scores(energy_model, context, pad_mask, candidates) -> torch.Tensor:
    """(B, C) energies with the context repeated C times: E(ctx_b, cand_bc) for every pair."""
    B, C, H, Da = candidates.shape
    S, D = context.shape[1:]
    ctx = context.unsqueeze(1).expand(B, C, S, D).reshape(B * C, S, D)
    pm = None if pad_mask is None else pad_mask.unsqueeze(1).expand(B, C, S).reshape(B * C, S)
    return energy_model(ctx, candidates.reshape(B * C, H, Da), pm).view(B, C)


def replicated_swap_infonce(energy_model, context, pad_mask, expert, tau: float = 0.5):
    """The fork's energy_inbatch_swap_infonce: (B*B, S, D) copies of the context."""
    B = expert.shape[0]
    S, D = context.shape[1:]
    h_rep = context.unsqueeze(1).expand(B, B, S, D).reshape(B * B, S, D)
    a_rep = expert.unsqueeze(0).expand(B, *expert.shape).reshape(B * B, *expert.shape[1:])
    pm = None if pad_mask is None else pad_mask.unsqueeze(1).expand(B, B, S).reshape(B * B, S)
    E = energy_model(h_rep, a_rep, pm).view(B, B)
    return F.cross_entropy(-E / tau, torch.arange(B, device=E.device)), E


def replicated_explicit_infonce(energy_model, context, pad_mask, expert, negatives, tau: float = 0.5):
    """The fork's energy_infonce_loss: positives, then the context repeated M times."""
    B, M = negatives.shape[:2]
    e_pos = energy_model(context, expert, pad_mask).view(B, 1)
    h_rep = context.repeat_interleave(M, dim=0)
    pm = None if pad_mask is None else pad_mask.repeat_interleave(M, dim=0)
    e_neg = energy_model(h_rep, negatives.reshape(B * M, *negatives.shape[2:]), pm).view(B, M)
    E = torch.cat([e_pos, e_neg], dim=1)
    return F.cross_entropy(-E / tau, torch.zeros(B, dtype=torch.long, device=E.device)), E
