"""The embedded default as a policy: the tiny VLA (``model.py``) with OFT's L1 action head, on
the procedural task (``task.py``). ``--policy tiny``.

Its ``[policy]`` section (:class:`TinyOptions`) holds the task's and the models' sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checks import check_multiple
from ...knobs import knob
from ...models import EnergyModel, L1RegressionActionHead
from ...ops import build_action_index
from ...policy import BatchLayout, Policy, prefix_context
from .. import Setup
from .model import TinyVLA
from .task import PAD, TaskData


@dataclass
class TinyOptions:
    dataset_size: int = knob(1024, ge=1)
    probe_size: int = knob(32, ge=1)
    num_objects: int = knob(3, ge=1, le=6)
    image_size: int = knob(16, ge=1)
    patch_size: int = knob(4, ge=1)
    chunk: int = knob(8, ge=1)           # H
    action_dim: int = knob(7, choices=(7,), what="7 (the task's action dimensions)")  # Da
    d_model: int = knob(64, ge=1)
    n_layers: int = knob(4, ge=1)
    n_heads: int = knob(4, ge=1)
    mlp_ratio: int = knob(2, ge=1)
    head_hidden: int = knob(128, ge=1)

    def validate(self, cfg) -> None:
        check_multiple("policy.d_model", self.d_model, "policy.n_heads", self.n_heads)
        check_multiple("policy.image_size", self.image_size, "policy.patch_size", self.patch_size)
        need = cfg.run.batch_size * cfg.run.grad_accum
        if need > self.dataset_size:
            raise ValueError(f"policy.dataset_size: expected >= run.batch_size * run.grad_accum"
                             f" = {need}, got {self.dataset_size}")


class TinyPolicy(Policy):
    """The tiny VLA (or any backbone with its interface: ``layout`` and ``forward(images,
    proprio, tokens, output_hidden_states)``): tokens [patches | proprio | instruction |
    H*Da action slots | stop]; context = patches + proprio + instruction (instruction PADs
    masked). Decoder layers and final norm: found by :func:`capture.find_decoder`. Its forward
    is capturable (static shapes, no host sync)."""
    capturable = True

    def __init__(self, model: TinyVLA, head: L1RegressionActionHead):
        self.backbone, self.action_head, self.extras = model, head, {}

    def forward(self, batch: dict, output_hidden_states: bool = False):
        out = self.backbone(batch["images"], batch["proprio"], batch["tokens"],
                            output_hidden_states=output_hidden_states)
        return out if output_hidden_states else out.last_hidden_state

    def layout(self, batch: dict) -> BatchLayout:
        lay, tokens = self.backbone.layout, batch["tokens"]
        B, dev = tokens.shape[0], tokens.device
        index = build_action_index(num_tokens=lay.num_action_tokens, start=lay.action_start,
                                   batch_size=B, device=dev)
        head = torch.zeros(B, lay.context_len - tokens.shape[1], dtype=torch.bool, device=dev)
        return BatchLayout(index, prefix_context(B, lay.context_len, dev),
                           torch.cat([head, tokens == PAD], dim=1))

    def expert(self, batch: dict) -> torch.Tensor:
        return batch["actions"]


def build(cfg, device: torch.device) -> Setup:
    """The tiny VLA, its head and an energy model, initialised from run.seed, and the task."""
    o: TinyOptions = cfg.policy
    torch.manual_seed(cfg.run.seed)
    model = TinyVLA(d_model=o.d_model, n_layers=o.n_layers, n_heads=o.n_heads,
                    image_size=o.image_size, patch_size=o.patch_size, chunk=o.chunk,
                    action_dim=o.action_dim, mlp_ratio=o.mlp_ratio)
    head = L1RegressionActionHead(input_dim=o.d_model, hidden_dim=o.head_hidden,
                                  action_dim=o.action_dim, num_actions_chunk=o.chunk)
    energy = EnergyModel(o.d_model, o.action_dim, hidden=cfg.energy.hidden,
                         heads=cfg.energy.heads, output=cfg.energy.output,
                         action_residual=cfg.energy.action_residual)
    data = TaskData(cfg.run.seed, o.dataset_size, o.probe_size, batch_size=cfg.run.batch_size,
                    grad_accum=cfg.run.grad_accum, num_objects=o.num_objects,
                    image_size=o.image_size, chunk=o.chunk, device=device)
    return Setup(TinyPolicy(model.to(device), head.to(device)), data, energy=energy.to(device))


build.options = TinyOptions
