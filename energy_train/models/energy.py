"""The energy model E_phi(context, action chunk) of the public energy fork, names intact.

Parameter names follow HuskyKingdom/openvla-oft-yhs ``vla-scripts/energy/energy_model.py``:
``state_linear`` (MLPResNet, 1 block, state_dim -> hidden -> hidden), ``action_linear``
(MLPResNet, 1 block, act_dim -> hidden -> hidden), ``pe_layer`` (sinusoidal table over the H
steps, a non-persistent buffer), ``cross`` (``nn.MultiheadAttention(hidden, heads,
batch_first=True)``: encoded actions are the queries, the encoded context the keys/values),
``prediction_head`` (MLPResNet, 2 blocks, hidden -> hidden -> 1) applied per step, the mean
over the H steps, then the output transform.

Deviations from the fork, on purpose:
- the positional encoding has no dropout (the fork's 0.2 makes energies stochastic; the fused
  kernels compute deterministic energies and must equal this module);
- ``gate_a`` (a parameter the fork defines and leaves unused, its action residual commented
  out) is a persistent *buffer* here unless ``action_residual=True``: fork state_dicts still
  load with strict=True either way, and no unused parameter trips DDP;
- a sample whose pad mask hides every key attends to nothing: its attention output is zero
  (``nn.MultiheadAttention`` returns NaN there). ``validate=True`` in the ops raises instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_same_device, check_tensor
from .mlp import MLPResNet

OUTPUTS = ("unbounded", "sigmoid", "softplus")


class PositionalEncoding(nn.Module):
    """x + P[:H]: P[t, 2i] = sin(t / 10000^(2i/hidden)), P[t, 2i+1] = cos(same)."""

    def __init__(self, hidden: int, max_len: int = 512):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        freq = torch.pow(10000.0, torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
        table = torch.zeros(max_len, hidden, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos / freq)
        table[:, 1::2] = torch.cos(pos / freq)[:, : hidden // 2]
        # kept in float64 until the module is cast; used in the dtype of x
        self.register_buffer("P", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = x.shape[-2]
        if H > self.P.shape[0]:
            raise ValueError(f"actions: at most {self.P.shape[0]} chunk steps, got {H}")
        return x + self.P[:H].to(x.dtype)


def output_transform(raw: torch.Tensor, output: str) -> torch.Tensor:
    if output == "unbounded":
        return raw
    if output == "sigmoid":  # the fork's first choice: flattens, went NaN for its authors
        return torch.sigmoid(0.5 * raw) * 2 + 0.1
    if output == "softplus":
        return F.softplus(raw) + 1e-6
    raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")


class EnergyModel(nn.Module):
    """forward(context (B, S, D), actions (B, H, Da), pad_mask (B, S) bool True=ignore) -> (B, 1).

    ``score(context, pad_mask, candidates (B, C, H, Da)) -> (B, C)`` encodes each context once
    (state encoder and K/V projections) and scores all C candidates against it; ``forward`` is
    ``score`` with C = 1.

    ``action_residual=True`` is the fork's ``gate_a`` path: the prediction head reads
    ``attention output + gate_a * encoded action`` (gate_a a learnable scalar, 0.1 at
    init), so the energy still depends on the candidate when the attention weights are
    uniform (e.g. after the backbone's context rows collapse); without it the action reaches
    the energy ONLY through the attention weights. Off by default (the fork's active code);
    the fused kernels do not implement it (``ops.energy_scores`` runs such a model eagerly).
    """

    def __init__(self, state_dim: int, act_dim: int, hidden: int = 512, heads: int = 8,
                 activation: str = "silu", output: str = "unbounded", max_steps: int = 512,
                 action_residual: bool = False):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden: expected a multiple of heads={heads}, got {hidden}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.state_dim, self.act_dim, self.hidden, self.heads = state_dim, act_dim, hidden, heads
        self.output = output
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.pe_layer = PositionalEncoding(hidden, max_steps)
        self.state_linear = MLPResNet(1, state_dim, hidden, hidden, activation)
        self.action_linear = MLPResNet(1, act_dim, hidden, hidden, activation)
        self.prediction_head = MLPResNet(2, hidden, hidden, 1, activation)
        self.action_residual = bool(action_residual)
        if self.action_residual:
            self.gate_a = nn.Parameter(torch.tensor(0.1))
        else:  # same state_dict key: checkpoints load strictly either way
            self.register_buffer("gate_a", torch.tensor(0.1))

    @property
    def dtype(self) -> torch.dtype:
        return self.cross.in_proj_weight.dtype

    # -- the three stages, written plainly; ops.energy_scores(backend="eager") is `score` --
    def encode_context(self, context: torch.Tensor):
        """(B, S, D) -> k, v: (B, heads, S, hidden/heads) each. Done once per sample."""
        c = self.state_linear(context.to(self.dtype))
        w, b = self.cross.in_proj_weight, self.cross.in_proj_bias
        E = self.hidden
        k = F.linear(c, w[E:2 * E], b[E:2 * E])
        v = F.linear(c, w[2 * E:], b[2 * E:])
        return self._split(k), self._split(v)

    def action_features(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, C, H, Da) -> encoded actions with the positional encoding: (B, C*H, hidden)."""
        B, C, H, _ = actions.shape
        return self.pe_layer(self.action_linear(actions.to(self.dtype))).reshape(B, C * H, self.hidden)

    def encode_actions(self, actions: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, Da) -> q: (B, heads, C*H, hidden/heads) (from ``features`` when given)."""
        a = self.action_features(actions) if features is None else features
        E = self.hidden
        return self._split(F.linear(a, self.cross.in_proj_weight[:E], self.cross.in_proj_bias[:E]))

    def attend(self, q, k, v, pad_mask):
        """Scaled dot-product attention with a key padding mask; all-masked rows give zero."""
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, h, C*H, S)
        if pad_mask is None:
            p = torch.softmax(scores, dim=-1)
        else:
            valid = ~pad_mask
            any_valid = valid.any(dim=-1)  # (B,) - stays on the device, no sync
            keep = valid | ~any_valid[:, None]
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
            p = torch.softmax(scores, dim=-1) * any_valid[:, None, None, None].to(scores.dtype)
        z = p @ v  # (B, h, C*H, dh)
        B, h, Q, dh = z.shape
        return self.cross.out_proj(z.transpose(1, 2).reshape(B, Q, h * dh))

    def readout(self, z: torch.Tensor, C: int) -> torch.Tensor:
        """(B, C*H, hidden) -> energies (B, C): head per step, mean over H, output transform."""
        B = z.shape[0]
        raw = self.prediction_head(z).reshape(B, C, -1).mean(dim=-1)
        return output_transform(raw, self.output)

    def check_inputs(self, context, pad_mask, candidates) -> None:
        """Shape/dtype/device checks (metadata only, no host sync)."""
        check_tensor("context", context, ndim=3, shape={2: self.state_dim}, floating=True)
        B, S = context.shape[:2]
        check_tensor("candidates", candidates, ndim=4, shape={0: B, 3: self.act_dim}, floating=True)
        if candidates.shape[2] > self.pe_layer.P.shape[0]:  # both backends index the table
            raise ValueError(f"candidates: at most {self.pe_layer.P.shape[0]} chunk steps (dim 2), "
                             f"got shape {tuple(candidates.shape)}")
        if pad_mask is not None:
            check_tensor("pad_mask", pad_mask, ndim=2, shape={0: B, 1: S}, dtype=torch.bool)
        check_same_device(context=context, pad_mask=pad_mask, candidates=candidates)

    def score(self, context, pad_mask, candidates) -> torch.Tensor:
        self.check_inputs(context, pad_mask, candidates)
        k, v = self.encode_context(context)
        a = self.action_features(candidates)
        z = self.attend(self.encode_actions(candidates, a), k, v, pad_mask)
        if self.action_residual:
            z = z + self.gate_a.to(z.dtype) * a
        return self.readout(z, candidates.shape[1])

    def forward(self, context, actions, pad_mask=None) -> torch.Tensor:
        check_tensor("actions", actions, ndim=3, floating=True)
        return self.score(context, pad_mask, actions.unsqueeze(1))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, N, E = x.shape
        return x.reshape(B, N, self.heads, E // self.heads).transpose(1, 2)
