"""Tiny configs and helpers shared by the trainer/CLI tests (CPU, a few steps)."""
from __future__ import annotations

import copy

import torch

from energy_train.config import TrainConfig, default_config
from energy_train.trainer import Trainer, build_trainer

TINY = dict(d_model=32, n_layers=2, n_heads=2, head_hidden=32, energy_hidden=32, energy_heads=2,
            batch_size=4, dataset_size=32, probe_size=6, image_size=8, patch_size=4, steps=4,
            warmup_steps=1, log_every=2, probe_every=0, progress=False, energy_loss="explicit")


def tiny_cfg(**kw) -> TrainConfig:
    return default_config(**{**TINY, **kw})


def make_trainer(cfg: TrainConfig, **kw) -> Trainer:
    return build_trainer(cfg, torch.device(cfg.run.device if cfg.run.device != "auto" else "cpu"), **kw)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def spy_isolation(t: Trainer) -> list[bool]:
    """Wrap ``t.phase_phi``, ``t.step_phi`` and ``t.objective.backward``: each call appends to the
    returned list whether it left theta (resp. theta's gradients) bitwise unchanged."""
    seen: list[bool] = []
    phase_phi, step_phi, energy_backward = t.phase_phi, t.step_phi, t.objective.backward

    def spy_phase_phi(batch, **kw):
        before = snapshot(t.theta)
        out = phase_phi(batch, **kw)
        seen.append(same(before, snapshot(t.theta)))
        return out

    def spy_step_phi():
        before = snapshot(t.theta)
        out = step_phi()
        seen.append(same(before, snapshot(t.theta)))
        return out

    def spy_backward(loss, *, audit, retain_graph=False):
        before = grads(t.theta)
        out = energy_backward(loss, audit=audit, retain_graph=retain_graph)
        seen.append(all((a is None and b is None) or torch.equal(a, b)
                        for a, b in zip(before, grads(t.theta))))
        return out

    t.phase_phi, t.step_phi, t.objective.backward = spy_phase_phi, spy_step_phi, spy_backward
    return seen


def deepcopy_policy(t: Trainer):
    """A frozen copy of theta_k: the policy with copies of its modules."""
    return copy.deepcopy(t.policy)
