"""theta's and phi's optimizers and learning-rate schedules.

theta (the policy's trainable parameters) and phi (the energy model) each have an AdamW and a
LambdaLR (linear warm-up over ``optim.warmup_steps``, then cosine to ``optim.min_lr_ratio``
over ``run.steps``, or constant). The two parameter sets must be disjoint.

A schedule counts its own optimizer's steps: :meth:`Optimizers.step` records which side
stepped, and :meth:`Optimizers.advance` (once per trainer step) moves only those schedulers.
A strategy that skips an optimizer in a step (alternating, two_phase with
``strategy.phase2_every`` > 1) leaves that side's learning rate where it was.
"""
from __future__ import annotations

import math

import torch


def lr_lambda(o, steps: int):
    """The schedule of the [optim] section ``o`` over ``steps``: step -> factor of the lr."""
    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def check_disjoint(theta: list, phi: list) -> None:
    """theta is not empty and shares no tensor with phi (a clear error naming both)."""
    if not theta:
        raise ValueError("theta: the policy has no parameter that requires grad (backbone, "
                         "action_head and extras are all frozen)")
    shared = {id(p) for p in theta} & {id(p) for p in phi}
    if shared:
        raise ValueError(f"theta (the policy's trainable parameters) and phi (the energy "
                         f"model) must be disjoint parameter sets; {len(shared)} tensor(s) "
                         "are in both")


class Optimizers:
    """``opt_theta``/``opt_phi`` (AdamW: foreach kernels on the current stream, so phi's run on
    the side stream when the phases overlap) and ``sched_theta``/``sched_phi``."""

    def __init__(self, theta: list, phi: list, o, steps: int):
        check_disjoint(theta, phi)
        self.opt_theta = torch.optim.AdamW(theta, lr=o.lr, weight_decay=o.weight_decay)
        self.opt_phi = torch.optim.AdamW(phi, lr=o.energy_lr, weight_decay=o.energy_weight_decay)
        self.sched_theta = torch.optim.lr_scheduler.LambdaLR(self.opt_theta, lr_lambda(o, steps))
        self.sched_phi = torch.optim.lr_scheduler.LambdaLR(self.opt_phi, lr_lambda(o, steps))
        self.stepped: set[str] = set()  # the sides ("theta", "phi") stepped since advance()

    def step(self, side: str) -> None:
        """Step ``side``'s optimizer ("theta" or "phi") and clear its gradients."""
        opt = self.opt_theta if side == "theta" else self.opt_phi
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.stepped.add(side)

    def drop(self, side: str) -> None:
        """Clear ``side``'s gradients without a step (its schedule does not move)."""
        (self.opt_theta if side == "theta" else self.opt_phi).zero_grad(set_to_none=True)

    def advance(self) -> dict:
        """End of a trainer step: the learning rates the step used ({"lr", "energy_lr"}, host
        floats), then the schedulers of the sides that stepped move one step."""
        lrs = {"lr": self.sched_theta.get_last_lr()[0], "energy_lr": self.sched_phi.get_last_lr()[0]}
        for side, sched in (("theta", self.sched_theta), ("phi", self.sched_phi)):
            if side in self.stepped:
                sched.step()
        self.stepped.clear()
        return lrs

    def state_dict(self) -> dict:
        return {"opt_theta": self.opt_theta.state_dict(), "opt_phi": self.opt_phi.state_dict(),
                "sched_theta": self.sched_theta.state_dict(),
                "sched_phi": self.sched_phi.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """phi's optimizer and both schedulers (theta's optimizer is loaded with the weights by
        energy_train/trainer/checkpoint.py, which knows how theta is sharded)."""
        self.opt_phi.load_state_dict(state["opt_phi"])
        self.sched_theta.load_state_dict(state["sched_theta"])
        self.sched_phi.load_state_dict(state["sched_phi"])
