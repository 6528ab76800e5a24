"""MLPResNet, the building block of OpenVLA-OFT's action head and of the energy fork.

Submodule names are exactly the public ones so that state_dicts load with strict=True:
``layer_norm1, fc1, mlp_resnet_blocks.{i}.ffn.{0: LayerNorm, 1: Linear, 2: act}, layer_norm2,
fc2``. The activation holds no parameters, so its attribute name does not reach the
state_dict.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}") from None


class MLPResNetBlock(nn.Module):
    """x + act(fc(LayerNorm(x))), pre-LN. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, activation: str = "relu"):
        super().__init__()
        self.dim = check_int("dim", dim, low=1)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), make_activation(activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LN -> fc1 -> act -> num_blocks x block -> LN -> fc2. (..., input_dim) -> (..., output_dim)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int,
                 activation: str = "relu"):
        super().__init__()
        check_int("num_blocks", num_blocks, low=0)
        for name, d in (("input_dim", input_dim), ("hidden_dim", hidden_dim),
                        ("output_dim", output_dim)):
            check_int(name, d, low=1)
        self.activation = activation
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.act = make_activation(activation)
        self.mlp_resnet_blocks = nn.ModuleList(
            MLPResNetBlock(hidden_dim, activation) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))
