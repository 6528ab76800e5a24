"""What the loop measures beside the steps, never inside them - called around each step as
torchtitan's loop calls its validator:

- the held-out probe (every ``run.probe_every`` steps, and once before training): on a fixed
  batch, L1, the TRAINING energy loss and its ranking accuracy (the same candidate set), the
  context's row diversity (~0: the context rows collapsed) and the drift - relative change
  per step of the context and of the layer actions since the last probe (what phi chases);
- the one-step lag effect (every ``run.lag_every`` steps, step-indexed data): how much the
  energy loss moves when its inputs switch from theta_s to theta_s+1 on batch s.

Each call drains the side stream first (phi is read on the main stream). It keeps its own
references (the probe batch, the drift reference, the lag snapshot) and no trainer: the
trainer hands itself to each call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import losses
from ..modes import module_mode
from ..tensors import upcast
from .feed import Micro, prepare


def row_diversity(context: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """How different a sample's context rows are: sqrt(sum_s |c_s - mean_s c|^2 / sum_s |c_s|^2)
    over the rows the pad mask keeps, averaged over samples. context (B, S, D), pad_mask (B, S)
    True = ignored. 0 = every row the same (a collapsed context: attention over it is uniform),
    1 = rows with no common component."""
    x = context.float()
    w = torch.ones(x.shape[:2], device=x.device) if pad_mask is None else (~pad_mask).float()
    mean = (x * w[..., None]).sum(1) / w.sum(1).clamp_min(1.0)[:, None]
    spread = ((x - mean[:, None]).square().sum(-1) * w).sum(1)
    return (spread / (x.square().sum(-1) * w).sum(1).clamp_min(1e-12)).sqrt().mean()


def _relative(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return upcast(new - old).norm() / upcast(old).norm().clamp_min(1e-12)


class Diagnostics:
    def __init__(self, probe_every: int, lag_every: int):
        self.probe_every, self.lag_every = probe_every, lag_every
        self._probe: Micro | None = None  # the probe micro-batch on the device (prepared once)
        self._prev = None                 # (step, context, negatives) at the last probe
        self._lag = None                  # (step, micro-batch, context, negatives) before step s

    # ---- around a step ---------------------------------------------------------------------------
    def before(self, t, batch: list[Micro]) -> None:
        """Before step s: when the lag effect is due, the context and negatives of theta_s on
        batch s (its first micro-batch)."""
        if self.lag_every and t.feed.exact_resume and t.step % self.lag_every == 0:
            t.drain()
            self._lag = (t.step, batch[0], *self.lag_inputs(t, batch[0]))

    def after(self, t) -> dict:
        """After the step (t.step = s + 1): the lag effect when its snapshot was taken, the
        probe when due (device tensors)."""
        out = {}
        if self._lag is not None:
            out.update(self.lag_effect(t))
        if self.probe_every and t.step % self.probe_every == 0:
            out.update(self.probe(t))
        return out

    # ---- the held-out probe ------------------------------------------------------------------------
    def probe_batch(self, t) -> Micro:
        """The held-out probe micro-batch on the device (prepared once)."""
        if self._probe is None:
            self._probe = prepare(t.policy, t.feed.probe(), t.device, 0, True)
        return self._probe

    def probe(self, t) -> dict:
        """Held-out metrics on the fixed probe batch (see the module docstring); the energy
        model scores in eval mode (restored after), as every no-grad forward runs."""
        with module_mode([t.energy], False):
            return self._run_probe(t)

    @torch.no_grad()
    def _run_probe(self, t) -> dict:
        t.drain()
        obj, mb = t.objective, self.probe_batch(t)
        fwd = t.observe(mb, reuse=False)  # kept as the next drift reference
        ctx, negs = obj.context(fwd), obj.layer_actions(fwd)
        with t.autocast():
            pred = t.policy.predict_action(fwd.captured.action_rows[-1])
        l1 = F.l1_loss(upcast(pred), upcast(mb.expert))
        out = obj.evaluate(ctx, mb, negs if obj.theta_negatives else None, t.step)
        res = {"probe_l1": l1, "probe_energy_loss": out.loss,
               "probe_rank_acc": losses.ranking_accuracy(out),
               "probe_tie_rate": losses.tie_rate(out), "probe_chance": 1.0 / out.energies.shape[1],
               "context_diversity": row_diversity(ctx, obj.pad_mask(mb))}
        if self._prev is not None and t.step > self._prev[0]:
            step, pc, pn = self._prev
            res["drift_context"] = _relative(ctx, pc) / (t.step - step)
            res["drift_negatives"] = _relative(negs, pn) / (t.step - step)
        self._prev = (t.step, ctx, negs)
        return res

    # ---- the one-step lag effect -------------------------------------------------------------------
    @torch.no_grad()
    def lag_inputs(self, t, mb: Micro):
        """The energy loss's inputs (context, negatives) with the CURRENT theta on ``mb``."""
        fwd = t.observe(mb, reuse=False)
        return t.objective.context(fwd), t.objective.negatives(fwd)

    def lag_effect(self, t) -> dict:
        with module_mode([t.energy], False):  # no-grad scoring: eval mode, restored after
            return self._run_lag_effect(t)

    @torch.no_grad()
    def _run_lag_effect(self, t) -> dict:
        """After step s (theta_s+1, phi_s+1): how much the energy loss (the training loss, no
        grad) moves when its inputs switch from theta_s to theta_s+1 on batch s - what
        two_phase changes against joint - and, for scale, when the batch switches from s to
        s+1 under theta_s+1. {"lag_theta": |L(th_s+1, b_s) - L(th_s, b_s)|, "lag_batch":
        |L(th_s+1, b_s+1) - L(th_s+1, b_s)|} (device tensors)."""
        s, mb, ctx0, negs0 = self._lag
        self._lag = None
        if s != t.step - 1:
            return {}
        t.drain()
        evaluate = t.objective.evaluate
        nxt = t.batch(t.step)[0]
        l_old = evaluate(ctx0, mb, negs0, t.step).loss
        ctx, negs = self.lag_inputs(t, mb)
        l_new = evaluate(ctx, mb, negs, t.step).loss
        ctx, negs = self.lag_inputs(t, nxt)
        l_next = evaluate(ctx, nxt, negs, t.step).loss
        return {"lag_theta": (l_new - l_old).abs(), "lag_batch": (l_next - l_new).abs()}

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The drift reference, so the first drift after a resume is the uninterrupted one."""
        if self._prev is None:
            return {"probe_prev": None}
        step, ctx, negs = self._prev
        return {"probe_prev": {"context": ctx, "negatives": negs, "step": step}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        prev = state.get("probe_prev")
        if prev is not None:
            self._prev = (int(prev["step"]), prev["context"].to(device),
                          prev["negatives"].to(device))
