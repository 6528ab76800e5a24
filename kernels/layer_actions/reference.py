"""Eager oracle of the all-layer action-head pass (readable maths, float64-friendly).

Written out step by step (gather, optional final norm, the MLPResNet's LayerNorms, linears
and activations) with torch.nn.functional; it shares no helper with the fused path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _act(x, name):
    return torch.relu(x) if name == "relu" else F.silu(x)


def _ln(x, mod):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


@torch.no_grad()
def layer_actions_reference(states, action_index, head, final_norm=None, norm_mask=None,
                            dtype=None):
    """states: L' tensors (B, T, D); action_index (B, H*Da) or None (T == H*Da).
    -> (L', B, H, Da) in ``dtype`` (default: the head's; torch.float64 for the oracle, with
    the head cast to float64 too)."""
    m = head.model
    dtype = m.fc1.weight.dtype if dtype is None else dtype
    H, Da = head.num_actions_chunk, head.action_dim
    norm_mask = norm_mask or [False] * len(states)
    out = []
    for h, use_norm in zip(states, norm_mask):
        B = h.shape[0]
        if action_index is not None:
            h = torch.stack([h[b, action_index[b]] for b in range(B)])  # (B, H*Da, D)
        if use_norm:
            h = final_norm(h)
        x = h.to(m.fc1.weight.dtype).to(dtype).reshape(B, H, -1)  # (B, H, Da*D)
        x = _act(F.linear(_ln(x, m.layer_norm1), m.fc1.weight, m.fc1.bias), m.activation)
        for blk in m.mlp_resnet_blocks:
            x = x + _act(F.linear(_ln(x, blk.ffn[0]), blk.ffn[1].weight, blk.ffn[1].bias),
                         m.activation)
        out.append(F.linear(_ln(x, m.layer_norm2), m.fc2.weight, m.fc2.bias).reshape(B, H, Da))
    return torch.stack(out)
