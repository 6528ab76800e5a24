"""Training strategies: each decides what one optimizer step does, from the Trainer's blocks.

| name              | one step                                                                 |
|-------------------|--------------------------------------------------------------------------|
| joint             | one forward; context detached, negatives under no_grad (the public loop); |
|                   | both losses, both backward, both steps. detach_context=False: the leak    |
| two_phase         | phase_theta, then phase_phi (fresh no_grad forward with the UPDATED theta) |
|                   | - phase_phi on every ``phase2_every``-th step only                        |
| shared_forward    | one forward; context + negatives snapshotted (detached) before theta       |
|                   | moves; L1 step, then the energy step on the snapshot; no extra forward     |
| alternating       | N steps phase_theta only, then N steps phase_phi only                      |
| adaptive_weights  | joint, loss weights from the variance of recent losses                     |
| cached_negatives  | joint, negatives cached per sample id, refreshed after K steps             |

A strategy sees the trainer only through :class:`Blocks`. Nothing here synchronises with the
host: adaptive weights are device tensors (torch.where), the negative cache's bookkeeping
uses the sample ids the host already knows.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from .. import losses
from ..config import TrainConfig
from ..tensors import index_tensor as to_device
from .feed import Micro


class Blocks(Protocol):
    """The building blocks a strategy composes (implemented by :class:`Trainer`)."""
    device: torch.device
    timer: Callable
    dp: object   # data-parallel hooks: .mean(tensor) (averaged over ranks)

    def micro(self, batch: list[Micro], *sides: str) -> Iterator[Micro]: ...
    def forward_l1(self, mb: Micro, *, capture: bool = False): ...    # -> (l1, Forward)
    def context(self, fwd, detach: bool = True) -> torch.Tensor: ...
    def negatives(self, fwd) -> torch.Tensor | None: ...
    def energy_loss(self, context, mb: Micro, negs) -> losses.EnergyLoss: ...
    def energy_micro(self, context, mb: Micro, negs, m) -> None: ...
    def energy_stats(self, out: losses.EnergyLoss) -> dict: ...  # metrics of one energy loss
    def energy_weight(self) -> float: ...
    def energy_backward(self, loss, *, audit: bool, retain_graph: bool = False): ...
    def joint_backward(self, e_loss, l1_loss, *, detached: bool, audit: bool): ...
    def step_theta(self) -> torch.Tensor | None: ...
    def step_phi(self) -> torch.Tensor | None: ...
    def phase_theta(self, batch: list[Micro]) -> dict: ...
    def phase_phi(self, batch: list[Micro]) -> dict: ...


class Strategy:
    name = "base"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def step(self, t: Blocks, batch: list[Micro], step: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, device) -> None:
        pass


def one_forward_step(t: Blocks, batch: list[Micro], *, detach_context: bool, l1_weight=1.0,
                     energy_weight=1.0, negatives=None) -> dict:
    """The public joint loop: one forward with grad, both losses, both backward, both steps.
    The energy backward runs first, while theta's grads are empty, so the audit
    (``energy_grad_theta``, on the first micro-batch) is exactly what it deposits into theta."""
    from .core import Mean
    m = Mean(len(batch))
    for mb in t.micro(batch, "theta", "phi"):
        l1, fwd = t.forward_l1(mb, capture=True)
        negs = (negatives or t.negatives)(fwd)
        out = t.energy_loss(t.context(fwd, detach=detach_context), mb, negs)
        d = t.joint_backward(energy_weight * t.energy_weight() * out.loss / m.n,
                             l1_weight * l1 / m.n, detached=detach_context, audit=mb.index == 0)
        if d is not None:
            m.set(energy_grad_theta=d)
        m.add(l1=l1, **t.energy_stats(out))
    m.set(grad_norm_theta=t.step_theta(), grad_norm_phi=t.step_phi())
    return m.values


class Joint(Strategy):
    name = "joint"

    def step(self, t, batch, step):
        return one_forward_step(t, batch, detach_context=self.cfg.strategy.detach_context)


class TwoPhase(Strategy):
    name = "two_phase"

    def step(self, t, batch, step):
        m = t.phase_theta(batch)                        # phase 1: theta_k -> theta_k+1 (L1)
        if step % self.cfg.strategy.phase2_every == 0:  # phase 2: from theta_k+1, phi step
            m.update(t.phase_phi(batch))
        return m


class SharedForward(Strategy):
    """One forward; the energy phase runs on detached snapshots taken before theta moves."""
    name = "shared_forward"

    def step(self, t, batch, step):
        from .core import Mean
        m, snaps = Mean(len(batch)), []
        with t.timer("phase1"):
            for mb in t.micro(batch, "theta"):
                l1, fwd = t.forward_l1(mb, capture=True)
                snaps.append((t.context(fwd), t.negatives(fwd)))  # head_theta_k, detached
                (l1 / m.n).backward()
                m.add(l1=l1)
            m.set(grad_norm_theta=t.step_theta())
        with t.timer("phase2"):
            for mb, (ctx, negs) in zip(t.micro(batch, "phi"), snaps):  # micro() first: it ends the zip
                t.energy_micro(ctx, mb, negs, m)
            m.set(grad_norm_phi=t.step_phi())
        return m.values


class Alternating(Strategy):
    name = "alternating"

    def step(self, t, batch, step):
        if (step // self.cfg.strategy.alternate_every) % 2 == 0:
            return t.phase_theta(batch)
        return t.phase_phi(batch)


class AdaptiveWeights(Strategy):
    """Weights from the variance of the last W losses (device tensors): fewer than W losses
    seen: (l1, energy) = (1, 0.1); var(L1) > 0.01: (0.5, 1); else var(E) > 0.1: (1, 0.3);
    else (1, 1)."""
    name = "adaptive_weights"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.hist = None  # (2, W) recent (l1, energy) losses, on the device
        self.count = 0    # losses recorded (host int: no sync to know it)

    def step(self, t, batch, step):
        W = self.cfg.strategy.adaptive_window
        if self.hist is None:
            self.hist = torch.zeros(2, W, device=t.device)
        if self.count < W:
            wl, we = torch.ones((), device=t.device), torch.full((), 0.1, device=t.device)
        else:
            var_l1, var_e = self.hist.var(dim=1).unbind()
            one = torch.ones((), device=t.device)
            wl = torch.where(var_l1 > 0.01, 0.5 * one, one)
            we = torch.where(var_l1 > 0.01, one, torch.where(var_e > 0.1, 0.3 * one, one))
        m = one_forward_step(t, batch, detach_context=True, l1_weight=wl, energy_weight=we)
        # the window holds the losses averaged over ranks (one small all_reduce, no host sync),
        # so every rank weighs its losses alike
        self.hist[:, self.count % W] = t.dp.mean(torch.stack([m["l1"], m["energy_loss"]]).float())
        self.count += 1
        return {**m, "weight_l1": wl, "weight_energy": we}

    def state_dict(self):
        return {"hist": self.hist, "count": self.count}

    def load_state_dict(self, state, device):
        self.hist = None if state["hist"] is None else state["hist"].to(device)
        self.count = state["count"]


class CachedNegatives(Strategy):
    """Layer actions cached per sample id (``batch["ids"]``); an entry is recomputed when it
    is K = strategy.cache_refresh steps old (or new). Otherwise the joint loop. The cache grows
    with the largest id seen."""
    name = "cached_negatives"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cache = None                            # (L, N, H, Da) on the device
        self.made = np.zeros(0, dtype=np.int64)      # step each entry was made (host)
        self.refreshed = 0
        self.t = None

    def negatives(self, fwd):
        t, mb, step = self.t, fwd.mb, self.t.step
        if mb.ids_host is None:
            raise ValueError("strategy cached_negatives: the batch needs sample ids (an int64 "
                             "CPU tensor batch['ids'], (B,)) to key the cache")
        self._grow(max(mb.ids_host) + 1)
        stale = [i for i, sid in enumerate(mb.ids_host) if step - self.made[sid] >= self.cfg.strategy.cache_refresh]
        if stale:
            fresh = t.negatives(fwd)
            if self.cache is None:
                self.cache = torch.zeros(fresh.shape[0], len(self.made), *fresh.shape[2:],
                                         device=fresh.device, dtype=fresh.dtype)
            pos = to_device(stale, t.device)
            rows = to_device([mb.ids_host[i] for i in stale], t.device)
            self.cache.index_copy_(1, rows, fresh.index_select(1, pos))
            self.made[[mb.ids_host[i] for i in stale]] = step
        self.refreshed += len(stale)
        ids = mb.ids if isinstance(mb.ids, torch.Tensor) else to_device(mb.ids_host, t.device)
        return self.cache.index_select(1, ids)

    def _grow(self, n: int) -> None:
        if n <= len(self.made):
            return
        n = max(n, 2 * len(self.made))
        self.made = np.concatenate([self.made, np.full(n - len(self.made), -(1 << 40))])
        if self.cache is not None:
            grown = self.cache.new_zeros(self.cache.shape[0], n, *self.cache.shape[2:])
            grown[:, : self.cache.shape[1]] = self.cache
            self.cache = grown

    def step(self, t, batch, step):
        self.t, self.refreshed = t, 0
        m = one_forward_step(t, batch, detach_context=True, negatives=self.negatives)
        m["cache_refresh_frac"] = self.refreshed / sum(mb.size for mb in batch)
        return m

    def state_dict(self):
        return {"cache": self.cache, "made": self.made.copy()}

    def load_state_dict(self, state, device):
        self.cache = None if state["cache"] is None else state["cache"].to(device)
        self.made = np.asarray(state["made"]).copy()


STRATEGIES = {s.name: s for s in (Joint, TwoPhase, SharedForward, Alternating, AdaptiveWeights,
                                  CachedNegatives)}


def make_strategy(cfg: TrainConfig) -> Strategy:
    if cfg.run.strategy not in STRATEGIES:
        raise ValueError(f"run.strategy: expected one of {tuple(STRATEGIES)}, got {cfg.run.strategy!r}")
    return STRATEGIES[cfg.run.strategy](cfg)
