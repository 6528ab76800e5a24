"""Built-in policies and the registry behind ``energy-train train --policy NAME``.

A policy factory is ``factory(cfg: TrainConfig, device) -> Setup``; its optional attribute
``options`` is the dataclass of its ``[policy]`` config section (keys declared with
:func:`energy_train.config.knob`, checked like every other key). ``--policy module:factory``
(an importable module) or ``--policy path/to/file.py:factory`` names a user's own factory; its
``[policy]`` table is free-form unless it declares ``options``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..models import EnergyModel
from ..policy import Policy

REGISTRY = {
    "tiny": "energy_train.policies.tiny:build",
    "oft-standin": "energy_train.integrations.openvla_oft.options:build_standin",
}


@dataclass
class Setup:
    """What a policy factory returns: the policy, its data, and optionally a held-out probe
    batch and an energy model (default: built from the [energy] section and the policy's
    sizes)."""
    policy: Policy
    data: Any                        # a step-indexed source or an iterable of batch dicts
    probe: dict | None = None        # a held-out batch (default: data.probe() or the first batch)
    energy: nn.Module | None = None


def resolve_factory(name: str) -> Callable:
    """The factory of a registered policy, or of ``module:factory``; a clear error naming
    ``run.policy`` (``--policy``) when it cannot be imported."""
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise ValueError(f"run.policy (--policy): expected one of {tuple(REGISTRY)} or "
                         f"module:factory, got {name!r}")
    module, _, attr = target.rpartition(":")
    try:
        fn = getattr(_import(module), attr)
    except (ImportError, AttributeError, OSError) as e:
        hint = "" if module.endswith(".py") else (
            "; the module must be importable (PYTHONPATH), or give a file: path/to/file.py:factory")
        raise ValueError(f"run.policy (--policy): cannot import {target!r} "
                         f"({type(e).__name__}: {e}){hint}") from None
    if not callable(fn):
        raise ValueError(f"run.policy (--policy): {target!r} is not callable")
    return fn


def _import(module: str):
    """A module by its import name, or a ``.py`` file by its path (loaded once per path)."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = os.path.abspath(module)
    name = "energy_train_policy_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or not os.path.isfile(path):
            raise ImportError(f"no file {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def options_class(name: str):
    """The options dataclass of a policy's [policy] section, or None (free-form)."""
    return getattr(resolve_factory(name), "options", None)


def available() -> Iterable[str]:
    return tuple(REGISTRY)


def default_energy(cfg, policy: Policy, device: torch.device) -> nn.Module:
    """The energy model of the [energy] section for the policy's hidden size and action dim."""
    _, Da = policy.chunk_shape
    return EnergyModel(policy.hidden_size, Da, hidden=cfg.energy.hidden, heads=cfg.energy.heads,
                       output=cfg.energy.output,
                       action_residual=cfg.energy.action_residual).to(device)


__all__ = ["Setup", "REGISTRY", "resolve_factory", "options_class", "available", "default_energy"]
