"""OpenVLA-OFT's L1-regression action head (prismatic/models/action_heads.py), names intact."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..checks import check_int, check_tensor
from .mlp import MLPResNet


class L1RegressionActionHead(nn.Module):
    """MLPResNet over the Da concatenated action-token rows of each chunk step.

    ``predict_action(h)``: h (B, H*Da, D) -> actions (B, H, Da). The rows are in chunk order
    (step-major: the Da rows of step 0, then of step 1, ...), as OFT lays them out.
    """

    def __init__(self, input_dim: int = 4096, hidden_dim: int = 4096, action_dim: int = 7,
                 num_actions_chunk: int = 8, num_blocks: int = 2, activation: str = "relu"):
        super().__init__()
        self.input_dim = check_int("input_dim", input_dim, low=1)
        self.hidden_dim = check_int("hidden_dim", hidden_dim, low=1)
        self.action_dim = check_int("action_dim", action_dim, low=1)
        self.num_actions_chunk = check_int("num_actions_chunk", num_actions_chunk, low=1)
        self.model = MLPResNet(num_blocks, input_dim * action_dim, hidden_dim, action_dim, activation)

    @property
    def activation(self) -> str:
        return self.model.activation

    def predict_action(self, actions_hidden_states: torch.Tensor) -> torch.Tensor:
        H, Da, D = self.num_actions_chunk, self.action_dim, self.input_dim
        h = actions_hidden_states
        check_tensor("actions_hidden_states", h, ndim=3, shape={1: H * Da, 2: D}, floating=True)
        return self.model(h.reshape(h.shape[0], H, Da * D))

    forward = predict_action


def strip_module_prefix(state_dict: Mapping) -> dict:
    """Drop the ``module.`` prefix that DDP adds (OFT saves its checkpoints from inside DDP).
    A state dict that holds a key both with and without the prefix is an error (which of the
    two tensors is meant cannot be told)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    out = {}
    for k, v in state_dict.items():
        name = k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k
        if name in out:
            raise ValueError(f"state_dict: holds both {name!r} and 'module.{name}'; keep one")
        out[name] = v
    return out


def load_oft_state_dict(module: nn.Module, state_dict: Mapping, strict: bool = True, *,
                        where: str = "state_dict"):
    """Load an OFT (or energy-fork) checkpoint, with or without the DDP ``module.`` prefix. A
    floating tensor holding NaN or inf is refused (``where`` names the file in the error): it
    would load silently and every output would be NaN."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    sd = strip_module_prefix(state_dict)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            bad = int((~torch.isfinite(v)).sum())
            if bad:
                raise ValueError(f"{where}[{k!r}]: holds {bad} non-finite value(s) (NaN/inf) of "
                                 f"{v.numel()}; the checkpoint is corrupt or its training "
                                 "diverged: load another")
    return module.load_state_dict(sd, strict=strict)
