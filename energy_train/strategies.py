"""Training strategies: each decides what one optimizer step does, from the trainer's blocks,
and declares its options beside it - the one registry of strategies (:data:`STRATEGIES`).

| name              | one step                                                  | options              |
|-------------------|-----------------------------------------------------------|----------------------|
| joint             | one forward; context detached, negatives under no_grad    | detach_context       |
|                   | (the public loop); both losses, both backward, both steps;|                      |
|                   | detach_context=False: the leak                            |                      |
| two_phase         | phase_theta, then phase_phi (a fresh no_grad forward with | phase2_every         |
|                   | the UPDATED theta) on every ``phase2_every``-th step      |                      |
| shared_forward    | phase_theta keeping its forward's context + negatives     |                      |
|                   | (detached, before theta moves); phase_phi on them         |                      |
| alternating       | N steps phase_theta only, then N steps phase_phi only     | alternate_every      |
| adaptive_weights  | joint, loss weights from the variance of recent losses    | adaptive_window      |
| cached_negatives  | joint, negatives cached per sample id, refreshed after K  | cache_refresh        |

A strategy's ``Options`` (a dataclass of :func:`~energy_train.knobs.knob` keys) are its keys
of the config's [strategy] section (:data:`StrategyConfig`: every strategy's options, each
key once), as a policy factory's ``options`` are the [policy] section; ``check(cfg)`` checks
it against the other sections. A strategy sees the trainer only through :class:`Blocks`, and
only inside the ``step`` it is handed it for: none keeps it. Which sides a step moved is what
it stepped (``step_theta``/``step_phi``): only those sides' schedulers advance. Nothing here
synchronises with the host: adaptive weights are device tensors (torch.where), the negative
cache's bookkeeping uses the sample ids the host already knows.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from .knobs import knob
from .tensors import index_tensor


class Objective(Protocol):
    """The energy side a strategy composes (energy_train.trainer.objective.EnergyObjective)."""

    def context(self, fwd, detach: bool = True) -> torch.Tensor: ...  # (B, S, D)
    def negatives(self, fwd) -> torch.Tensor | None: ...  # (L, B, H, Da) layer actions
    def loss(self, context, mb, negs, step: int): ...  # -> losses.EnergyLoss
    def stats(self, out) -> dict: ...
    def weight(self, step: int) -> float: ...
    def joint_backward(self, e_loss, l1_loss, *, detached: bool, audit: bool): ...


class Blocks(Protocol):
    """The building blocks a strategy composes (implemented by energy_train.trainer.Trainer)."""
    device: torch.device
    dp: object  # data-parallel hooks: .mean(tensor) (averaged over ranks)
    objective: Objective

    def accumulate(self, batch: list, sides: tuple, micro: Callable): ...  # -> metrics.Mean
    def forward_l1(self, mb, *, capture: bool = False): ...  # -> (l1, Forward)
    def step_theta(self) -> torch.Tensor | None: ...
    def step_phi(self) -> torch.Tensor | None: ...
    def phase_theta(self, batch: list, take: list | None = None) -> dict: ...
    def phase_phi(self, batch: list, taken: list | None = None) -> dict: ...


class Strategy:
    """One step's schedule. ``options``: the [strategy] section (this strategy reads its own
    keys). ``phases``: its step is built from phase_theta / phase_phi only (whose parts a CUDA
    graph can replay, run.cuda_graphs)."""
    name = "base"
    phases = False

    @dataclass
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    @classmethod
    def check(cls, cfg) -> None:
        """Checks against the other config sections (a ValueError naming the keys)."""

    def step(self, t: Blocks, batch: list, step: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, device) -> None:
        pass


def joint_step(t: Blocks, batch: list, step: int, *, detach_context: bool, l1_weight=1.0,
               energy_weight=1.0, negatives: Callable | None = None) -> dict:
    """The public joint loop: one forward with grad, both losses, both backward, both steps.
    The energy backward runs first, while theta's grads are empty, so the audit
    (``energy_grad_theta``, on the first micro-batch) is exactly what it deposits into theta.
    ``negatives(fwd)``: where the negatives come from (default: the current head)."""
    obj = t.objective
    negatives = negatives or obj.negatives

    def micro(mb, m):
        l1, fwd = t.forward_l1(mb, capture=True)
        negs = negatives(fwd)
        out = obj.loss(obj.context(fwd, detach=detach_context), mb, negs, step)
        d = obj.joint_backward(energy_weight * obj.weight(step) * out.loss / m.n,
                               l1_weight * l1 / m.n, detached=detach_context, audit=mb.index == 0)
        if d is not None:
            m.set(energy_grad_theta=d)
        m.add(l1=l1, **obj.stats(out))

    m = t.accumulate(batch, ("theta", "phi"), micro)
    m.set(grad_norm_theta=t.step_theta(), grad_norm_phi=t.step_phi())
    return m.values


class Joint(Strategy):
    name = "joint"

    @dataclass
    class Options:
        detach_context: bool = knob(True)  # False = the leaky diagnostic variant

    def step(self, t, batch, step):
        return joint_step(t, batch, step, detach_context=self.options.detach_context)


class TwoPhase(Strategy):
    name = "two_phase"
    phases = True

    @dataclass
    class Options:
        phase2_every: int = knob(1, ge=1)  # phase 2 on every k-th step (its batch)

    def step(self, t, batch, step):
        m = t.phase_theta(batch)                          # phase 1: theta_k -> theta_k+1 (L1)
        if step % self.options.phase2_every == 0:         # phase 2: from theta_k+1, phi step
            m.update(t.phase_phi(batch))
        return m


class SharedForward(Strategy):
    """One forward; the energy phase runs on detached snapshots taken before theta moves."""
    name = "shared_forward"
    phases = True

    def step(self, t, batch, step):
        taken = []  # per micro-batch: (context, negatives) of theta_k, detached
        m = t.phase_theta(batch, take=taken)
        return {**m, **t.phase_phi(batch, taken=taken)}  # no second forward


class Alternating(Strategy):
    name = "alternating"
    phases = True

    @dataclass
    class Options:
        alternate_every: int = knob(10, ge=1)  # N theta steps, then N phi steps

    def step(self, t, batch, step):
        if (step // self.options.alternate_every) % 2 == 0:
            return t.phase_theta(batch)
        return t.phase_phi(batch)


class AdaptiveWeights(Strategy):
    """Weights from the variance of the last W losses (device tensors): fewer than W losses
    seen: (l1, energy) = (1, 0.1); var(L1) > 0.01: (0.5, 1); else var(E) > 0.1: (1, 0.3);
    else (1, 1)."""
    name = "adaptive_weights"

    @dataclass
    class Options:
        adaptive_window: int = knob(10, ge=2)  # losses in the variance window

    def __init__(self, options):
        super().__init__(options)
        self.hist = None  # (2, W) recent (l1, energy) losses, on the device
        self.count = 0    # losses recorded (host int: no sync to know it)

    def step(self, t, batch, step):
        W = self.options.adaptive_window
        if self.hist is None:
            self.hist = torch.zeros(2, W, device=t.device)
        if self.count < W:
            wl, we = torch.ones((), device=t.device), torch.full((), 0.1, device=t.device)
        else:
            var_l1, var_e = self.hist.var(dim=1).unbind()
            one = torch.ones((), device=t.device)
            wl = torch.where(var_l1 > 0.01, 0.5 * one, one)
            we = torch.where(var_l1 > 0.01, one, torch.where(var_e > 0.1, 0.3 * one, one))
        m = joint_step(t, batch, step, detach_context=True, l1_weight=wl, energy_weight=we)
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

    @dataclass
    class Options:
        cache_refresh: int = knob(64, ge=1)  # refresh an entry after K steps

    def __init__(self, options):
        super().__init__(options)
        self.cache = None                            # (L, N, H, Da) on the device
        self.made = np.zeros(0, dtype=np.int64)      # step each entry was made (host)
        self.refreshed = 0

    @classmethod
    def check(cls, cfg) -> None:
        if not cfg.energy.theta_negatives():
            raise ValueError(
                "run.strategy: cached_negatives caches the negatives made from the policy's "
                "weights (energy.layer_picks, energy.own_prediction of the explicit or margin "
                f"loss), got energy.loss={cfg.energy.loss!r}, energy.layer_picks="
                f"{cfg.energy.layer_picks!r}, energy.own_prediction={cfg.energy.own_prediction}:"
                " none to cache")

    def step(self, t, batch, step):
        self.refreshed = 0
        fresh = t.objective.negatives
        m = joint_step(t, batch, step, detach_context=True,
                       negatives=lambda fwd: self.lookup(fwd, fresh, step, t.device))
        m["cache_refresh_frac"] = self.refreshed / sum(mb.size for mb in batch)
        return m

    def lookup(self, fwd, fresh: Callable, step: int, device: torch.device) -> torch.Tensor:
        """(L, B, H, Da) cached negatives of the forward's samples; the entries older than K
        steps are made again by ``fresh(fwd)`` first."""
        mb = fwd.mb
        if mb.ids_host is None:
            raise ValueError("strategy cached_negatives: the batch needs sample ids (an int64 "
                             "CPU tensor batch['ids'], (B,)) to key the cache")
        self._grow(max(mb.ids_host) + 1)
        refresh = self.options.cache_refresh
        stale = [i for i, sid in enumerate(mb.ids_host) if step - self.made[sid] >= refresh]
        if stale:
            new = fresh(fwd)
            if self.cache is None:
                self.cache = torch.zeros(new.shape[0], len(self.made), *new.shape[2:],
                                         device=new.device, dtype=new.dtype)
            pos = index_tensor(stale, device)
            rows = index_tensor([mb.ids_host[i] for i in stale], device)
            self.cache.index_copy_(1, rows, new.index_select(1, pos))
            self.made[[mb.ids_host[i] for i in stale]] = step
        self.refreshed += len(stale)
        ids = mb.ids if isinstance(mb.ids, torch.Tensor) else index_tensor(mb.ids_host, device)
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

    def state_dict(self):
        return {"cache": self.cache, "made": self.made.copy()}

    def load_state_dict(self, state, device):
        self.cache = None if state["cache"] is None else state["cache"].to(device)
        self.made = np.asarray(state["made"]).copy()


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (Joint, TwoPhase, SharedForward, Alternating, AdaptiveWeights,
                        CachedNegatives)}


def _section() -> type:
    """The [strategy] config section: the options of every registered strategy, each key once."""
    spec, owner = [], {}
    for name, s in STRATEGIES.items():
        for f in fields(s.Options):
            if f.name in owner:
                raise TypeError(f"strategy option {f.name!r}: declared by {owner[f.name]} and {name}")
            owner[f.name] = name
            spec.append((f.name, f.type, field(default=f.default, metadata=f.metadata)))
    section = make_dataclass("StrategyConfig", spec)
    section.__module__ = __name__  # pickled by reference, like a class written here
    return section


StrategyConfig = _section()


def make_strategy(name: str, options) -> Strategy:
    """The strategy ``name`` (run.strategy) with the [strategy] section ``options``."""
    if name not in STRATEGIES:
        raise ValueError(f"run.strategy: expected one of {tuple(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name](options)


__all__ = ["STRATEGIES", "Strategy", "Blocks", "Objective", "StrategyConfig", "make_strategy", "joint_step",
           "Joint", "TwoPhase", "SharedForward", "Alternating", "AdaptiveWeights",
           "CachedNegatives"]
