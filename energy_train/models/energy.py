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

import torch
from torch import nn

from ..checks import check_choice, check_int, check_multiple, check_nonempty, check_same_device, check_tensor
from ..kernels.energy.reference import (OUTPUTS, energy_scores_reference,  # noqa: F401
                                        output_transform)
from .mlp import MLPResNet
from .weights import energy_weights


class PositionalEncoding(nn.Module):
    """x + P[:H]: P[t, 2i] = sin(t / 10000^(2i/hidden)), P[t, 2i+1] = cos(same)."""

    def __init__(self, hidden: int, max_len: int = 512):
        super().__init__()
        check_int("hidden", hidden, low=1)
        check_int("max_len", max_len, low=1)
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
        for name, v in (("state_dim", state_dim), ("act_dim", act_dim), ("hidden", hidden),
                        ("heads", heads), ("max_steps", max_steps)):
            check_int(name, v, low=1)
        check_multiple("hidden", hidden, "heads", heads)
        check_choice("output", output, OUTPUTS)
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

    def check_chunks(self, name: str, t, ndim: int, batch: int | None = None) -> None:
        """``t`` holds action chunks (B, H, Da) (ndim 3) or (B, C, H, Da) (ndim 4) for this model:
        floating, Da = act_dim, 1 <= H <= the positional table's length, B = ``batch``."""
        check_tensor(name, t, ndim=ndim, shape={0: batch, ndim - 1: self.act_dim}, floating=True)
        check_nonempty(name, t, ndim - 2, "chunk step")
        if t.shape[-2] > self.pe_layer.P.shape[0]:  # both backends index the table
            raise ValueError(f"{name}: at most {self.pe_layer.P.shape[0]} chunk steps "
                             f"(dim {ndim - 2}), got shape {tuple(t.shape)}")

    def check_inputs(self, context, pad_mask, candidates) -> None:
        """Shape/dtype/device checks (metadata only, no host sync). No sample (B = 0) or no
        candidate (C = 0) gives an empty (B, C) result; no context key (S = 0) or no chunk step
        (H = 0) is an error."""
        check_tensor("context", context, ndim=3, shape={2: self.state_dim}, floating=True)
        check_nonempty("context", context, 1, "key")
        B, S = context.shape[:2]
        self.check_chunks("candidates", candidates, 4, B)
        if pad_mask is not None:
            check_tensor("pad_mask", pad_mask, ndim=2, shape={0: B, 1: S}, dtype=torch.bool)
        check_same_device(context=context, pad_mask=pad_mask, candidates=candidates)

    def score(self, context, pad_mask, candidates) -> torch.Tensor:
        """Energies (B, C): the maths is ``energy_scores_reference`` (kernels/energy), on this
        module's weights."""
        self.check_inputs(context, pad_mask, candidates)
        return energy_scores_reference(energy_weights(self), context, pad_mask, candidates)

    def forward(self, context, actions, pad_mask=None) -> torch.Tensor:
        check_tensor("context", context, ndim=3)
        self.check_chunks("actions", actions, 3, context.shape[0])
        return self.score(context, pad_mask, actions.unsqueeze(1))
