"""Module modes (``train()`` / ``eval()``): who sets them, and when.

The trainer owns the modes of the modules it runs, whatever mode they come in (a model loaded
with ``from_pretrained`` is in eval mode; a freshly built one in train mode):

- **train mode** for the forward that is trained: phase 1's policy forward (and the joint
  strategies' one forward), and the energy model in the energy loss that is backpropagated;
- **eval mode** for every forward without grad: phase 2's policy forward, the negatives (the
  head on every layer's rows), the held-out probe and the lag effect, the start-up check, and
  at test time (``OFTPolicy.act``, ``correct_actions``, ``rerank``, ``export_verifier``);
- the modes the modules came in are **restored** when training ends (or fails), and after
  each test-time call.

A mode is set on the module roots with ``module.train(mode)`` (so a module that overrides
``train`` is honoured) and restored attribute by attribute (a mix of modes comes back as it
was). A mode stays set between the forward and its backward (activation checkpointing
recomputes the forward in the backward, in the mode of the forward).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from torch import nn


def _modules(roots: Iterable[nn.Module]) -> list[nn.Module]:
    seen, out = set(), []
    for root in roots:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


def saved_modes(roots: Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    """(module, training) of every module under ``roots``, each once."""
    return [(m, m.training) for m in _modules(roots)]


def restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    for m, training in saved:
        m.training = training


def set_mode(roots: Iterable[nn.Module], train: bool) -> None:
    for root in roots:
        root.train(train)


@contextlib.contextmanager
def module_mode(roots: Iterable[nn.Module], train: bool) -> Iterator[None]:
    """``roots`` in train (or eval) mode inside the block; their modes restored after."""
    roots = [r for r in roots if isinstance(r, nn.Module)]
    saved = saved_modes(roots)
    set_mode(roots, train)
    try:
        yield
    finally:
        restore_modes(saved)


def eval_mode(*roots: nn.Module):
    """``roots`` in eval mode inside the block (test time, no-grad forwards); restored after."""
    return module_mode(roots, False)


__all__ = ["module_mode", "eval_mode", "saved_modes", "restore_modes", "set_mode"]
