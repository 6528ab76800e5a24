"""Training strategies: each decides what one optimizer step does, from the Trainer's blocks.

| name              | one step                                                                 |
|-------------------|--------------------------------------------------------------------------|
| joint             | one forward; context detached, negatives under no_grad (the public loop); |
|                   | both losses, both backward, both steps. detach_context=False: the leak    |
| two_phase         | phase_theta, then phase_phi (fresh no_grad forward with the UPDATED theta) |
| shared_forward    | one forward; context + negatives snapshotted (detached) before theta       |
|                   | moves; L1 step, then the energy step on the snapshot; no extra forward     |
| alternating       | N steps phase_theta only, then N steps phase_phi only                      |
| adaptive_weights  | joint, loss weights from the variance of recent losses (seed solution 3)   |
| cached_negatives  | joint, negatives cached per sample id, refreshed after K steps (solution 4)|

Nothing here synchronises with the host: adaptive weights are device tensors (torch.where),
the negative cache's bookkeeping uses the sample ids the host already knows.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import losses
from ..config import TrainConfig
from ..data import to_device


class Strategy:
    name = "base"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def step(self, t, batch, step: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, device) -> None:
        pass


def one_forward_step(t, batch, *, detach_context: bool, l1_weight=1.0, energy_weight=1.0,
                     negatives_fn=None) -> dict:
    """The public joint loop: one forward with grad, both losses, both backward, both steps.

    The energy backward runs first, while theta's grads are still empty, so the audit
    (``energy_grad_theta``, measured on the first micro-batch) is exactly the gradient the
    energy loss deposits into theta. Under DDP the leaky variant (context not detached) takes
    ONE backward of both losses instead (a DDP forward allows one backward; see
    energy_train/distributed.py) and audits with autograd.grad.
    """
    n, l1_sum, e_sum, acc, deposit = len(batch), 0.0, 0.0, 0.0, None
    for i, mb in enumerate(batch):
        with t.dp.no_sync(t.model, t.head, t.energy, sync=i == n - 1):
            fwd = t.forward(mb, grad=True)
            l1 = t.l1_loss(fwd, mb)
            negs = (negatives_fn or (lambda t, f, b: t.negatives(f)))(t, fwd, mb) if t.needs_negatives else None
            out = t.energy_loss(t.context(fwd, detach=detach_context), fwd.pad_mask, mb, negs)
            e_loss = energy_weight * t.energy_weight() * out.loss / n
            if detach_context or not t.dp.active:
                d = t.energy_backward(e_loss, retain_graph=not detach_context)
                (l1_weight * l1 / n).backward()
            else:
                d = t.dp.deposit(e_loss, t.theta) if deposit is None else None
                (e_loss + l1_weight * l1 / n).backward()
        deposit = d if deposit is None else deposit
        l1_sum, e_sum = l1_sum + l1.detach() / n, e_sum + out.loss.detach() / n
        acc = acc + losses.ranking_accuracy(out) / n
    return {"l1": l1_sum, "energy_loss": e_sum, "rank_acc": acc, "energy_grad_theta": deposit,
            "grad_norm_theta": t.step_theta(), "grad_norm_phi": t.step_phi()}


class Joint(Strategy):
    name = "joint"

    def step(self, t, batch, step):
        return one_forward_step(t, batch, detach_context=self.cfg.detach_context)


class TwoPhase(Strategy):
    name = "two_phase"

    def step(self, t, batch, step):
        m = t.phase_theta(batch)        # phase 1: theta_k -> theta_k+1 (L1)
        m.update(t.phase_phi(batch))    # phase 2: negatives/context from theta_k+1, phi step
        return m


class SharedForward(Strategy):
    """One forward; the energy phase runs on detached snapshots taken before theta moves."""
    name = "shared_forward"

    def step(self, t, batch, step):
        n, snaps, l1_sum = len(batch), [], 0.0
        with t.timer("phase1"):
            for i, mb in enumerate(batch):
                with t.dp.no_sync(t.model, t.head, sync=i == n - 1):
                    fwd = t.forward(mb, grad=True)
                    negs = t.negatives(fwd) if t.needs_negatives else None  # head_theta_k, no grad
                    snaps.append((fwd.captured.context, fwd.pad_mask, mb, negs))
                    loss = t.l1_loss(fwd, mb) / n
                    loss.backward()
                l1_sum = l1_sum + loss.detach()
            gt = t.step_theta()
        with t.timer("phase2"):
            e_sum, acc, deposit = 0.0, 0.0, None
            for i, (ctx, pad, mb, negs) in enumerate(snaps):
                with t.dp.no_sync(t.energy, sync=i == n - 1):
                    out = t.energy_loss(ctx, pad, mb, negs)
                    d = t.energy_backward(t.energy_weight() * out.loss / n)
                deposit = d if deposit is None else deposit
                e_sum, acc = e_sum + out.loss.detach() / n, acc + losses.ranking_accuracy(out) / n
            gp = t.step_phi()
        return {"l1": l1_sum, "energy_loss": e_sum, "rank_acc": acc, "energy_grad_theta": deposit,
                "grad_norm_theta": gt, "grad_norm_phi": gp}


class Alternating(Strategy):
    name = "alternating"

    def step(self, t, batch, step):
        if (step // self.cfg.alternate_every) % 2 == 0:
            return t.phase_theta(batch)
        return t.phase_phi(batch)


class AdaptiveWeights(Strategy):
    """Seed solution 3: weights from the variance of the last W losses (device tensors):
    fewer than W losses seen: (l1, energy) = (1, 0.1); var(L1) > 0.01: (0.5, 1);
    else var(E) > 0.1: (1, 0.3); else (1, 1)."""
    name = "adaptive_weights"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.hist = None  # (2, W) recent (l1, energy) losses, on the device
        self.count = 0    # losses recorded (host int: no sync to know it)

    def step(self, t, batch, step):
        W = self.cfg.adaptive_window
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
    """Seed solution 4: layer actions cached per sample id; an entry is recomputed when it is
    K = cache_refresh steps old (or new). Otherwise the joint loop."""
    name = "cached_negatives"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cache = None                                   # (L, N, H, Da) on the device
        self.made = np.full(cfg.dataset_size, -(1 << 40))   # step each entry was made (host)
        self.refreshed = 0

    def negatives(self, t, fwd, mb):
        stale = [i for i, sid in enumerate(mb.ids_host) if mb.step - self.made[sid] >= self.cfg.cache_refresh]
        if stale:
            fresh = t.negatives(fwd)
            if self.cache is None:
                self.cache = torch.zeros(fresh.shape[0], self.cfg.dataset_size, *fresh.shape[2:],
                                         device=fresh.device, dtype=fresh.dtype)
            pos = to_device(stale, t.device)
            rows = to_device([mb.ids_host[i] for i in stale], t.device)
            self.cache.index_copy_(1, rows, fresh.index_select(1, pos))
            self.made[[mb.ids_host[i] for i in stale]] = mb.step
        self.refreshed += len(stale)
        return self.cache.index_select(1, mb.ids)

    def step(self, t, batch, step):
        self.refreshed = 0
        m = one_forward_step(t, batch, detach_context=True, negatives_fn=self.negatives)
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
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {tuple(STRATEGIES)}, got {cfg.strategy!r}")
    return STRATEGIES[cfg.strategy](cfg)
