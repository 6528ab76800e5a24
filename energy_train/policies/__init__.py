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
import inspect
import os
import sys
import traceback
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


class FactoryError(ValueError):
    """A policy factory (``run.policy``) that cannot be imported, called or whose result is
    not a :class:`Setup`: the message names it and what to fix."""


_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # energy_train/


def _raised(e: BaseException) -> str:
    """``Type: message (at file:line)`` of an error raised in a user's code: the innermost
    frame of the user's own files (not this package's, not an installed library's)."""
    msg = " ".join(str(e).split())
    mine = [f for f in traceback.extract_tb(e.__traceback__)
            if not f.filename.startswith((_OURS, "<")) and "site-packages" not in f.filename
            and os.sep + "lib" + os.sep + "python" not in f.filename]
    at = f" (at {mine[-1].filename}:{mine[-1].lineno})" if mine and not isinstance(e, SyntaxError) else ""
    return f"{type(e).__name__}: {msg}{at}"


def resolve_factory(name: str) -> Callable:
    """The factory of a registered policy, or of ``module:factory``; a clear error naming
    ``run.policy`` (``--policy``) when it cannot be imported (whatever its module raises:
    an ImportError, a SyntaxError, a NameError, ...) or is not ``factory(cfg, device)``."""
    target = REGISTRY.get(name, name)
    if not isinstance(name, str) or ":" not in target:
        raise FactoryError(f"run.policy (--policy): expected one of {tuple(REGISTRY)} or "
                           f"module:factory, got {name!r}")
    module, _, attr = target.rpartition(":")
    try:
        fn = getattr(_import(module), attr)
    except Exception as e:  # noqa: BLE001 - the module's own code may raise anything
        hint = "" if module.endswith(".py") or not isinstance(e, ImportError) else (
            "; the module must be importable (PYTHONPATH), or give a file: path/to/file.py:factory")
        raise FactoryError(f"run.policy (--policy): cannot import {target!r} "
                           f"({_raised(e)}){hint}") from None
    if not callable(fn):
        raise FactoryError(f"run.policy (--policy): {target!r} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without a signature: called as it is
        return fn
    try:
        sig.bind(None, None)
    except TypeError:
        raise FactoryError(f"run.policy (--policy): {target!r} is called as factory(cfg, device) "
                           f"-> energy_train.policies.Setup; its signature is {attr}{sig}") from None
    return fn


def make_setup(name: str, cfg, device: torch.device, *, need_data: bool = True) -> Setup:
    """``factory(cfg, device)`` of run.policy, its result checked: a :class:`Setup` of a
    Policy, data (may be None when the caller brings its own: ``need_data=False``), a probe
    batch dict (or None) and an EnergyModel (or None). Whatever the factory raises becomes a
    FactoryError naming it (and where in its code)."""
    fn = resolve_factory(name)
    where = f"run.policy (--policy) {name!r}"
    try:
        setup = fn(cfg, device)
    except Exception as e:  # noqa: BLE001 - a user's factory may raise anything
        raise FactoryError(f"{where}: the factory raised {_raised(e)}") from e
    if not isinstance(setup, Setup):
        raise FactoryError(f"{where}: the factory must return energy_train.policies.Setup(policy, "
                           f"data, probe=None, energy=None), got {_kind(setup)}")
    if not isinstance(setup.policy, Policy):
        raise FactoryError(f"{where}: Setup.policy: expected an energy_train.Policy (subclass it: "
                           f"backbone, action_head, forward, layout, expert), got {_kind(setup.policy)}")
    if (setup.data is None and need_data) or isinstance(setup.data, (str, bytes, dict, torch.Tensor)):
        raise FactoryError(f"{where}: Setup.data: expected a step-indexed source (batch(step, "
                           "rank, world), probe()) or an iterable of batch dicts (a DataLoader; "
                           f"energy_train.data.TaskData is one), got {_kind(setup.data)}")
    if setup.probe is not None and not isinstance(setup.probe, dict):
        raise FactoryError(f"{where}: Setup.probe: expected a batch dict or None, got "
                           f"{_kind(setup.probe)}")
    if setup.energy is not None and not isinstance(setup.energy, EnergyModel):
        raise FactoryError(f"{where}: Setup.energy: expected an energy_train.EnergyModel or None "
                           f"(None: built from the [energy] section), got {_kind(setup.energy)}")
    return setup


def _kind(v) -> str:
    if isinstance(v, tuple):
        return f"a tuple of {len(v)} ({', '.join(type(x).__name__ for x in v[:4])})"
    return "None" if v is None else type(v).__name__


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


__all__ = ["Setup", "REGISTRY", "FactoryError", "resolve_factory", "make_setup", "options_class", "available", "default_energy"]
