"""The tensors the ops take: plain named tuples of weights, biases and LayerNorm parameters.

The references and the fused paths read these, never a module. ``energy_train.models.weights``
fills them from the ``nn.Module`` trees (the one place that knows the modules' attribute
paths). Custom ops take flat tensor lists: :meth:`MLPResNetWeights.flat` /
:meth:`MLPResNetWeights.from_flat` convert.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

Tensor = torch.Tensor


class LNLinear(NamedTuple):
    """``LN(x) @ weight^T + bias``: weight (N, K), bias (N,), LayerNorm over K with
    ln_weight/ln_bias (K,) (each may be None) and ln_eps."""
    weight: Tensor
    bias: Optional[Tensor]
    ln_weight: Optional[Tensor]
    ln_bias: Optional[Tensor]
    ln_eps: float


class MLPResNetWeights(NamedTuple):
    """MLPResNet: ``x = act(fc1(x)); x = x + act(block(x)) per block; fc2(x)``, each layer an
    :class:`LNLinear` (its LayerNorm first)."""
    fc1: LNLinear
    blocks: tuple
    fc2: LNLinear
    activation: str

    @property
    def layers(self) -> list:
        return [self.fc1, *self.blocks, self.fc2]

    def flat(self) -> list:
        """[ln_weight, ln_bias, weight, bias] per layer (fc1, blocks, fc2); None -> empty (0,)."""
        out = []
        for layer in self.layers:
            for t in (layer.ln_weight, layer.ln_bias, layer.weight, layer.bias):
                out.append(t if t is not None else layer.weight.new_empty((0,)))
        return out

    def eps(self) -> list:
        return [float(layer.ln_eps) for layer in self.layers]

    @classmethod
    def from_flat(cls, flat, eps, activation: str) -> "MLPResNetWeights":
        def opt(t):
            return t if t.numel() else None
        layers = [LNLinear(flat[i + 2], opt(flat[i + 3]), opt(flat[i]), opt(flat[i + 1]), e)
                  for i, e in zip(range(0, len(flat), 4), eps)]
        return cls(layers[0], tuple(layers[1:-1]), layers[-1], activation)


class ActionHeadWeights(NamedTuple):
    """OFT's L1-regression head: ``mlp`` over the Da concatenated rows (Da*D) of each of the
    H chunk steps -> (H, Da)."""
    mlp: MLPResNetWeights
    num_actions_chunk: int
    action_dim: int


class EnergyWeights(NamedTuple):
    """The energy model: state encoder (context rows -> hidden E), action encoder (Da -> E) +
    positional table ``pe`` (max_steps, E), the attention's packed q|k|v projection
    ``in_proj_weight`` (3E, E) / ``in_proj_bias`` (3E,) and ``out_proj``, the per-step
    prediction head (E -> 1); ``heads`` attention heads; ``output`` transform; ``gate_a``
    (0-d) when the model adds the action residual ``gate_a * encoded action`` to the attention
    output before the head (None: no residual; the fused kernels implement only that case)."""
    state: MLPResNetWeights
    action: MLPResNetWeights
    head: MLPResNetWeights
    in_proj_weight: Tensor
    in_proj_bias: Tensor
    out_proj_weight: Tensor
    out_proj_bias: Tensor
    pe: Tensor
    heads: int
    output: str
    gate_a: Tensor | None = None

    @property
    def hidden(self) -> int:
        return self.in_proj_weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.in_proj_weight.dtype


def check_weights(name: str, w, kind: type) -> None:
    if not isinstance(w, kind):
        raise TypeError(f"{name}: expected {kind.__name__} (energy_train.models.weights fills "
                        f"one from a module), got {type(w).__name__}")
