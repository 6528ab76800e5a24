"""The Policy interface: everything the trainer, the strategies, hook capture, the overlap and
data parallelism know about a backbone.

A policy owns the trainable modules of theta - the backbone, the L1 action head and optional
extras (e.g. a proprio projector) - and answers four questions about a batch (a dict of
tensors, plus non-tensor fields that are passed through)::

    forward(batch)  -> (B, T, D)   the last hidden state, the one the action head reads
    layout(batch)   -> BatchLayout where the action rows and the context rows are, + pad mask
    expert(batch)   -> (B, H, Da)  the expert action chunk (the L1 target, the positive)
    decoder()       -> (layers, final norm), for hook capture, the logit lens and FSDP

and, with defaults, ``predict_action(rows)`` (the head on one set of action rows) and
``layer_actions(rows, final_norm)`` (the head on every layer's action rows: the negatives).

A plain Hugging Face decoder needs about 30 lines (see the README, "Bring your own policy").
The trainer calls ``forward`` with or without grad and under autocast as configured; every
tensor of the batch is already on the device. Nothing in these methods may synchronise with
the host (no ``.item()``, ``nonzero``, boolean-mask indexing): positions come from tensor ops.

theta = the parameters that require grad in backbone + head + extras: a frozen base with
LoRA adapters trains (and checkpoints) only the adapters.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .capture import find_decoder
from .models import L1RegressionActionHead
from .ops import check_final_norm, layer_actions, mark_layer_actions


@dataclass
class BatchLayout:
    """Where the energy phase's rows sit in the (B, T, D) hidden states of ONE batch."""
    action_index: torch.Tensor   # (B, H*Da) int64: the action-token rows, in chunk order
    context_index: torch.Tensor  # (B, S) int64: the context rows (S may change per batch)
    pad_mask: torch.Tensor       # (B, S) bool: True = the energy model ignores that row


def prefix_context(batch_size: int, context_len: int, device) -> torch.Tensor:
    """(B, S) context index of the first S rows of every sample."""
    return torch.arange(context_len, device=device).expand(batch_size, context_len)


class Policy(abc.ABC):
    """Subclasses set ``backbone`` and ``action_head`` (and ``extras``) and implement
    :meth:`forward`, :meth:`layout` and :meth:`expert`.

    The action head needs ``predict_action(rows (B, H*Da, D)) -> (B, H, Da)``; the chunk
    shape (H, Da) and the hidden size D are read from the head's ``num_actions_chunk``,
    ``action_dim`` and ``input_dim`` unless a subclass overrides :attr:`chunk_shape` and
    :attr:`hidden_size` (OFT's own head reads H from a global: its adapter overrides them).
    """
    backbone: nn.Module
    action_head: nn.Module
    #: True when :meth:`forward` (with or without grad, under the trainer's autocast) can be
    #: captured in a CUDA graph: the same shapes for the same batch shapes, no host
    #: synchronisation, no allocation outside torch's allocator (``run.cuda_graphs``). The
    #: default is False: such a policy's forward runs eagerly, the rest of phase 2 is graphed.
    capturable: bool = False

    @property
    def extras(self) -> dict[str, nn.Module]:
        """Optional trainable modules beside backbone and head, by name (e.g. a proprio
        projector): this policy's own dict, empty unless set."""
        return self.__dict__.setdefault("_extras", {})

    @extras.setter
    def extras(self, modules: dict[str, nn.Module]) -> None:
        self.__dict__["_extras"] = modules

    # ---- what a batch means ------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, batch: dict) -> torch.Tensor:
        """(B, T, D) last hidden state. With ``output_hidden_states=True`` (only for the trainer's
        ``capture = "hidden_states"`` option) return an object with ``.last_hidden_state`` and
        ``.hidden_states`` (L+1 tensors (B, T, D), the Hugging Face convention)."""

    @abc.abstractmethod
    def layout(self, batch: dict) -> BatchLayout:
        """The action index, context index and pad mask of this batch (device tensors)."""

    @abc.abstractmethod
    def expert(self, batch: dict) -> torch.Tensor:
        """(B, H, Da) expert action chunk."""

    # ---- structure (defaults) ----------------------------------------------------------------
    def decoder(self) -> tuple[Sequence[nn.Module], nn.Module]:
        """(decoder layers, final norm) of the backbone; default: :func:`capture.find_decoder`."""
        return find_decoder(self.backbone)

    def predict_action(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, H*Da, D) action rows -> (B, H, Da)."""
        return self.action_head.predict_action(rows)

    def layer_actions(self, rows: Sequence[torch.Tensor],
                      final_norm: nn.Module | None = None) -> torch.Tensor:
        """The head on every layer's action rows, the embeddings (entry 0) skipped: L+1 tensors
        (B, H*Da, D) -> (L, B, H, Da). ``final_norm`` (the logit lens): applied to every layer
        but the last (which the backbone has normalised). The trainer calls it under no_grad
        and the policy's autocast. Default: this package's head runs the fused op
        (:func:`energy_train.ops.layer_actions`, all layers in one pass); any other head runs
        ``predict_action`` once on the layers stacked along the batch. Override it to give
        another head a faster path."""
        if isinstance(self.action_head, L1RegressionActionHead):
            return layer_actions(list(rows), None, self.action_head, final_norm=final_norm)
        check_final_norm(final_norm, rows[-1].shape[-1])
        picked = [(final_norm(r) if final_norm is not None and i < len(rows) - 1 else r)
                  for i, r in enumerate(rows) if i > 0]
        stacked = torch.stack(picked)
        L, B = stacked.shape[:2]
        out = self.predict_action(stacked.reshape(L * B, *stacked.shape[2:]))
        return mark_layer_actions(out.reshape(L, B, *out.shape[1:]))

    def check_batch(self, batch: dict) -> None:
        """Optional: check a batch as the data gives it, before the trainer moves it to the
        device (a DataLoader's batch is still on the CPU: host reads cost no device sync).
        Raise a ValueError naming the key; default: no check."""

    def save_extra(self, run_dir, step: int, theta: dict, phi: dict) -> None:
        """Optional: called on the main process after each trainer checkpoint of ``run_dir``
        at ``step``, with the saved tensors (``theta``: trainable tensors by checkpoint name,
        ``phi``: the energy model's state_dict), to write files in the policy's own layout
        (e.g. OpenVLA-OFT's). Default: nothing."""

    @property
    def chunk_shape(self) -> tuple[int, int]:
        """(H, Da) of the action chunk."""
        return int(self.action_head.num_actions_chunk), int(self.action_head.action_dim)

    @property
    def hidden_size(self) -> int:
        """D, the width of the hidden states the head reads."""
        return int(self.action_head.input_dim)

    # ---- derived (not meant to be overridden) --------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Every module of theta by checkpoint prefix: backbone, action_head, extras.<name>."""
        out = {"backbone": self.backbone, "action_head": self.action_head}
        out.update({f"extras.{k}": m for k, m in self.extras.items()})
        return out

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(checkpoint name, parameter) of theta: the parameters that require grad, each once."""
        seen = set()
        for prefix, module in self.modules().items():
            for name, p in module.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield f"{prefix}.{name}", p

    def root(self) -> nn.ModuleDict:
        """theta's modules under one root (what data parallelism wraps)."""
        return nn.ModuleDict({"backbone": self.backbone, "action_head": self.action_head,
                              "extras": nn.ModuleDict(self.extras)})


def hidden(out) -> torch.Tensor:
    """The last hidden state of what :meth:`Policy.forward` returned."""
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state
