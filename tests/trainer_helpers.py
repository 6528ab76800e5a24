"""Tiny configs and helpers shared by the trainer/CLI tests (CPU, a few steps)."""
from __future__ import annotations

import copy

import torch

from energy_train.config import TrainConfig, apply
from energy_train.data import TaskData
from energy_train.trainer import Trainer, build_models

TINY = dict(d_model=32, n_layers=2, n_heads=2, head_hidden=32, energy_hidden=32, energy_heads=2,
            batch_size=4, dataset_size=32, probe_size=6, image_size=8, patch_size=4, steps=4,
            warmup_steps=1, log_every=2, probe_every=0, progress=False, energy_loss="explicit")


def tiny_cfg(**kw) -> TrainConfig:
    return apply(TrainConfig(), {**TINY, **kw}, "test").validate()


def make_trainer(cfg: TrainConfig) -> Trainer:
    dev = torch.device("cpu")
    data = TaskData(cfg.seed, cfg.dataset_size, cfg.probe_size, num_objects=cfg.num_objects,
                    image_size=cfg.image_size, chunk=cfg.chunk, device=dev)
    return Trainer(cfg, *build_models(cfg, dev), data, dev)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def deepcopy_theta(t: Trainer):
    return copy.deepcopy(t.model), copy.deepcopy(t.head)
