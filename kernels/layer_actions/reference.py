"""Eager oracle of the all-layer action-head pass (readable maths, float64-friendly): gather the
action rows of each layer, the optional final norm, the head's MLPResNet. It shares no helper
with the fused path.
"""
from __future__ import annotations

import torch

from ..mlp.reference import mlp_resnet_reference
from ..weights import ActionHeadWeights


@torch.no_grad()
def layer_actions_reference(states, action_index, head: ActionHeadWeights, final_norm=None,
                            norm_mask=None) -> torch.Tensor:
    """states: L' tensors (B, T, D); action_index (B, H*Da) integer or None (then T == H*Da:
    the rows are already gathered, in chunk order); ``final_norm`` (a callable) applied to the
    gathered rows of the layers where ``norm_mask`` is True. -> (L', B, H, Da) in the head's
    dtype. An index outside [0, T) reads a zero row (the fused path does the same)."""
    H, Da = head.num_actions_chunk, head.action_dim
    dtype = head.mlp.fc1.weight.dtype
    norm_mask = norm_mask or [False] * len(states)
    rows = []
    for h, use_norm in zip(states, norm_mask):
        B, T, D = h.shape
        if action_index is not None:
            inside = (action_index >= 0) & (action_index < T)
            idx = action_index.clamp(0, max(T - 1, 0)).to(torch.int64)
            h = h.gather(1, idx[:, :, None].expand(-1, -1, D))        # (B, H*Da, D)
            h = torch.where(inside[:, :, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        if use_norm:
            h = final_norm(h)
        rows.append(h.to(dtype))
    x = torch.stack(rows)                                              # (L', B, H*Da, D)
    Lp, B = x.shape[:2]
    return mlp_resnet_reference(x.reshape(Lp, B, H, Da * x.shape[-1]), head.mlp)  # (L', B, H, Da)
