"""theta's and phi's optimizers and learning-rate schedules.

theta (the policy's trainable parameters) and phi (the energy model) each have an AdamW and a
LambdaLR (linear warm-up over ``optim.warmup_steps``, then cosine to ``optim.min_lr_ratio``
over ``run.steps``, or constant). The two parameter sets must be disjoint.

A schedule counts its own optimizer's steps: :meth:`Optimizers.step` records which side
stepped, and :meth:`Optimizers.advance` (once per trainer step) moves only those schedulers.
A strategy that skips an optimizer in a step (alternating, two_phase with
``strategy.phase2_every`` > 1) leaves that side's learning rate where it was.

On CUDA both AdamWs are fused and capturable, with the learning rate a device tensor the
schedule fills (no host sync): their step can be captured in a CUDA graph
(``run.cuda_graphs``), and the eager steps around a graph (warm-up, fallback, cuda_graphs =
"off") run the same kernels, so graphed and ungraphed runs give the same numbers. On the CPU
they are the plain (foreach) AdamW.
"""
from __future__ import annotations

import contextlib
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


def adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on ``params``: fused and capturable on CUDA (module docstring), else the default."""
    cuda = bool(params) and all(p.is_cuda for p in params)
    if not cuda:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, capturable=True)
    opt._warned_capturable_if_run_uncaptured = True  # eager steps are expected (warm-up, off)
    return opt


def device_lr(opt: torch.optim.Optimizer) -> None:
    """A capturable optimizer's learning rate as a 0-d fp32 tensor on its parameters' device
    (a graph reads it; the schedule fills it in place); a no-op for the others."""
    for group in opt.param_groups:
        if group.get("capturable") and group["params"]:
            lr, dev = group["lr"], group["params"][0].device
            if not (isinstance(lr, torch.Tensor) and lr.device == dev):
                group["lr"] = torch.full((), float(lr), dtype=torch.float32, device=dev)


class Optimizers:
    """``opt_theta``/``opt_phi`` (AdamW: kernels on the current stream, so phi's run on the side
    stream when the phases overlap) and ``sched_theta``/``sched_phi``."""

    def __init__(self, theta: list, phi: list, o, steps: int):
        check_disjoint(theta, phi)
        self.opt_theta = adamw(theta, o.lr, o.weight_decay)
        self.opt_phi = adamw(phi, o.energy_lr, o.energy_weight_decay)
        self.sched_theta = torch.optim.lr_scheduler.LambdaLR(self.opt_theta, lr_lambda(o, steps))
        self.sched_phi = torch.optim.lr_scheduler.LambdaLR(self.opt_phi, lr_lambda(o, steps))
        for opt in (self.opt_theta, self.opt_phi):
            device_lr(opt)  # after the schedulers read the float lrs as their base
        self.stepped: set[str] = set()  # the sides ("theta", "phi") stepped since advance()

    def step(self, side: str) -> None:
        """Step ``side``'s optimizer ("theta" or "phi") and clear its gradients."""
        self.update(side)
        self.stepped.add(side)

    def update(self, side: str) -> None:
        """The device part of :meth:`step` (what a CUDA graph replays): the optimizer's step,
        then its gradients cleared; the caller records that ``side`` stepped."""
        opt = self.opt_theta if side == "theta" else self.opt_phi
        opt.step()
        opt.zero_grad(set_to_none=True)

    def drop(self, side: str) -> None:
        """Clear ``side``'s gradients without a step (its schedule does not move)."""
        (self.opt_theta if side == "theta" else self.opt_phi).zero_grad(set_to_none=True)

    def advance(self, where: dict | None = None) -> dict:
        """End of a trainer step: the learning rates the step used ({"lr", "energy_lr"}, host
        floats), then the schedulers of the sides that stepped move one step. ``where``: side
        -> a context to move that side's schedule in (on CUDA the stream its optimizer step ran
        on: the device lr that step reads is filled after it, in stream order)."""
        lrs = {"lr": host_lr(self.sched_theta), "energy_lr": host_lr(self.sched_phi)}
        for side, sched in (("theta", self.sched_theta), ("phi", self.sched_phi)):
            if side in self.stepped:
                with (where or {}).get(side) or contextlib.nullcontext():
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
        for opt in (self.opt_theta, self.opt_phi):  # a loaded lr is the saved (CPU) one
            device_lr(opt)


def host_lr(sched) -> float:
    """The learning rate of a LambdaLR's first group as a host float: what get_last_lr() says
    for a float lr, computed the same way (no read of a device lr)."""
    return sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch)
