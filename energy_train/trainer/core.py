"""The Trainer: theta and phi, the forwards, the two phases, the step, and the state a resume
needs.

theta = the policy's trainable parameters (backbone + action head + extras that require grad),
phi = the energy model; each has its own optimizer (:mod:`.optim`) and the two sets must be
disjoint. The trainer reaches the backbone only through the :class:`~energy_train.policy.Policy`
interface and the energy side only through the :class:`~.objective.EnergyObjective`. One step,
top to bottom (:meth:`Trainer.train_step`)::

    batch = self.batch(step)                    the step's micro-batches, on the device
    diagnostics.before(self, batch)             the lag effect's reference, when due
    strategy.step(self, batch, step)            the schedule: the phases below, or the joint loop
    optim.advance()                             the schedulers of the sides that stepped
    diagnostics.after(self)                     the lag effect and the held-out probe, when due

The two phases (what two_phase runs, and what every other strategy rearranges):

- :meth:`Trainer.phase_theta` - policy forward WITH grad, action rows -> head -> L1,
  backward, step theta.
- :meth:`Trainer.phase_phi` - policy forward under no_grad with the CURRENT theta (hooks keep
  only the action rows of each layer and the context rows), negatives from the current head,
  energy loss, backward, step phi. Nothing here can reach theta: its inputs carry no graph.

Every pass over a step's micro-batches is :meth:`Trainer.accumulate`. Each phase is built from
device-only parts (phase 1: "theta" then "opt_theta"; phase 2: "phi_read" - every micro-batch's
forward and negatives - then "phi" - every micro-batch's energy loss, then phi's step), each
run through :attr:`Trainer.graphs`: eagerly, or on CUDA (``run.cuda_graphs``) as a CUDA graph
replayed from static buffers (:mod:`.graphs`). On CUDA (``run.overlap``) phase_phi runs on a
side stream beside the next step's phase_theta, ordered by events (:mod:`.overlap`) recorded
between the parts; on the CPU, or with overlap off, the same code runs in order. Nothing inside
a step synchronises with the host (but the one capture of a part, once per run): metrics stay
on the device until :meth:`Trainer.flush`, which (like the diagnostics and checkpoints) drains
the side stream first.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import HiddenStateCapture, gather_hidden_states
from ..config import TrainConfig
from ..distributed import LOCAL
from ..grads import clip_grad_norm
from ..modes import restore_modes, saved_modes, set_mode
from ..policy import Policy, hidden
from ..strategies import make_strategy
from ..telemetry import GpuTelemetry
from ..tensors import bf16_autocast, gather_rows, upcast
from .diagnostics import Diagnostics
from .feed import Feed, Forward, Micro, check_shapes, prepare
from .graphs import Graphs, blockers
from .metrics import Mean, Meter, PhaseTimer, WallClock
from .objective import EnergyObjective
from .optim import Optimizers
from .overlap import PhaseStreams
from .state import TrainerState
from .validate import decoder_of


class Trainer(TrainerState):
    """theta, phi and the blocks a step is built from (see the module docstring); the read-back
    and the resume state come from :class:`~.state.TrainerState`. ``data``: a Feed, a
    step-indexed source or an iterable of batch dicts; ``probe``: a held-out batch."""

    def __init__(self, cfg: TrainConfig, policy: Policy, energy: nn.Module, data, device: torch.device,
                 *, probe: dict | None = None):
        self.cfg, self.policy, self.energy, self.device = cfg, policy, energy, device
        if cfg.energy.action_residual != getattr(energy, "action_residual", cfg.energy.action_residual):
            raise ValueError(f"energy.action_residual: the config says {cfg.energy.action_residual}, "
                             f"the energy model was built with {energy.action_residual}")
        if cfg.energy.precision == "bf16_weights" and any(
                p.dtype != torch.bfloat16 for p in energy.parameters()):
            energy.to(torch.bfloat16)  # the fork's first recipe: bf16 weights, AdamW on them
        self.feed = data if isinstance(data, Feed) else Feed(data, cfg.run.grad_accum, probe)
        self.theta = [p for _, p in policy.named_trainable()]
        self.phi = [p for p in energy.parameters() if p.requires_grad]
        self.optim = Optimizers(self.theta, self.phi, cfg.optim, cfg.run.steps)
        self.dp = LOCAL  # data-parallel hooks; distributed.Parallel under torchrun (use_parallel)
        self.objective = EnergyObjective(cfg, policy, energy, self.theta, device, self.dp)
        self.strategy = make_strategy(cfg.run.strategy, cfg.strategy)
        self.diagnostics = Diagnostics(cfg.run.probe_every, cfg.run.lag_every)
        self.capture = (HiddenStateCapture.for_decoder(*decoder_of(policy))
                        if cfg.run.capture == "hooks" else None)
        self.timer = PhaseTimer(device)
        self.streams = PhaseStreams(device, cfg.run.overlap)
        self.graphs = Graphs(cfg.run.cuda_graphs, device, blockers(policy, self.strategy, cfg),
                             on_failure=self._drop_grads, quiet=not self.strategy.phases)
        self.telemetry = GpuTelemetry(device)
        self.meter, self.clock = Meter(), WallClock()
        self.step = 0  # optimizer steps done
        # the modes the modules came in (energy_train/modes.py: the trainer owns them while it
        # runs; train() restores these when it ends)
        self._modes = saved_modes([*policy.modules().values(), energy])
        energy.train()  # phi trains in train mode; the diagnostics score in eval mode

    def use_parallel(self, dp) -> None:
        """Install data-parallel hooks (distributed.Parallel): the DDP wrappers the L1 forward and
        the energy loss run in, and the mean over ranks of the metrics at read-back."""
        self.dp = self.objective.dp = dp
        self.meter.reduce = dp.mean
        if dp.active:
            self.graphs.refuse("data parallelism (torchrun): DDP's and FSDP's collectives are "
                               "not captured")

    def autocast(self):
        """The policy's forwards (both phases, the head, the negatives): bf16 autocast or none."""
        return bf16_autocast(self.device, self.cfg.run.precision == "bf16")

    def restore_modes(self) -> None:
        """Every module back in the mode it came in (train() calls it at the end); while it runs
        the trainer owns the modes (:mod:`energy_train.modes`)."""
        restore_modes(self._modes)

    # ---- micro-batches -----------------------------------------------------------------------------
    def batch(self, step: int) -> list[Micro]:
        """This rank's micro-batches of optimizer step ``step``, on the device."""
        dicts = self.feed.batch(step, *self.dp.shard)
        n = len(dicts)
        mbs = [prepare(self.policy, d, self.device, i, i == n - 1) for i, d in enumerate(dicts)]
        if self.feed.step_indexed:  # shapes only: no device read
            check_shapes(mbs, step, self.dp.shard, self.cfg.run)
        return mbs

    def accumulate(self, batch: list[Micro], sides: tuple[str, ...],
                   micro: Callable[[Micro, Mean], None]) -> Mean:
        """The one micro-batch loop: ``micro(mb, m)`` for each micro-batch, inside ``no_sync`` of
        ``sides`` ("theta", "phi") but on the last, so gradients are all-reduced once per step;
        ``m`` means the metrics over the micro-batches."""
        m = Mean(len(batch))
        for mb in batch:
            with self.dp.no_sync(*sides, sync=mb.last):
                micro(mb, m)
        return m

    # ---- forwards ----------------------------------------------------------------------------------
    def _forward(self, mb: Micro, *, grad: bool, capture: bool, reuse: bool = True) -> Forward:
        """Policy forward; with ``capture`` the hooks keep the action rows of every layer and the
        context rows in buffers reused per (grad, step parity, micro-batch) when ``reuse``
        (fresh ones otherwise), or run.capture="hidden_states" gathers them from the tuple."""
        lay = mb.layout
        set_mode(self.policy.modules().values(), grad)  # train mode with grad, else eval (modes.py)
        with torch.set_grad_enabled(grad), self.autocast():
            if not capture:
                return Forward(mb, hidden(self.policy.forward(mb.batch)), None)
            keep = grad or self.cfg.energy.context == "all"  # "all": the context IS the last state
            if self.capture is None:
                out = self.policy.forward(mb.batch, output_hidden_states=True)
                cap = gather_hidden_states(out.hidden_states, lay.action_index, lay.context_index)
                return Forward(mb, out.last_hidden_state if keep else None, cap)
            slot = (grad, self.step % 2, mb.index) if reuse else None
            with self.capture.armed(lay.action_index, lay.context_index, slot=slot) as cap:
                last = hidden(self.policy.forward(mb.batch))
        return Forward(mb, last if keep else None, cap)

    def forward_l1(self, mb: Micro, *, capture: bool = False) -> tuple[torch.Tensor, Forward]:
        """Policy forward WITH grad, the head on its action rows, the L1 loss against the expert
        - all inside theta's data-parallel wrapper. ``capture``: also keep the rows the energy
        phase reads (detached)."""
        def run():
            fwd = self._forward(mb, grad=True, capture=capture)
            rows = gather_rows(fwd.last_hidden, mb.layout.action_index)
            with self.autocast():
                pred = self.policy.predict_action(rows)
            return F.l1_loss(upcast(pred), upcast(mb.expert)), fwd
        return self.dp.call("theta", run)

    def observe(self, mb: Micro, reuse: bool = True) -> Forward:
        """No-grad forward with the CURRENT theta, capturing the rows the energy phase reads
        (on the bare modules: no data-parallel reducer is engaged)."""
        return self._forward(mb, grad=False, capture=True, reuse=reuse)

    # ---- optimizer steps ---------------------------------------------------------------------------
    def step_theta(self) -> torch.Tensor | None:
        """Optimizer step on theta, its grads clipped to optim.grad_clip first; returns its grad
        norm (a device tensor)."""
        with self.timer("opt_theta"):
            self.streams.before_theta_write()  # phase 2 of the previous step has read theta
            out, = self.graphs.run("opt_theta", self._theta_update, [p.grad for p in self.theta])
        for p in self.theta:
            p.grad = None  # as zero_grad left them (a replay does not run it)
        self.optim.stepped.add("theta")
        return out["grad_norm_theta"]

    def step_phi(self) -> torch.Tensor | None:
        """Optimizer step on phi, its grad norm clipped to optim.energy_grad_clip; during the
        first optim.energy_skip_steps steps no step: the grads are dropped (the fork's
        energy_warm_steps) and phi's schedule does not move."""
        norm = clip_grad_norm(self.phi, self.cfg.optim.energy_grad_clip)
        if self.step < self.cfg.optim.energy_skip_steps:
            self.optim.drop("phi")
        else:
            self.optim.step("phi")
        return norm

    # ---- the two phases ----------------------------------------------------------------------------
    def phase_theta(self, batch: list[Micro], take: list | None = None) -> dict:
        """Phase 1: L1 on theta; phi is untouched. ``take``: a list that receives, per
        micro-batch, the context and negatives of this forward (theta before its step,
        detached): what shared_forward's energy phase reads."""
        with self.timer("phase1"):
            m, grads, kept = self.graphs.run("theta", self._theta_grads, batch, take is not None)
            if take is not None:
                take.extend(kept)
            for p, g in zip(self.theta, grads):
                p.grad = g  # a replay's outputs (host only; eagerly they are these already)
            m = {**m, "grad_norm_theta": self.step_theta()}
        return m

    def phase_phi(self, batch: list[Micro], taken: list | None = None) -> dict:
        """Phase 2: energy loss on phi; theta is only read. Its inputs: a no_grad forward with
        the CURRENT theta and negatives from the CURRENT head for every micro-batch first (on
        CUDA with overlap: on the side stream; then theta is released), or ``taken``, the
        (context, negatives) per micro-batch a phase_theta kept (no forward: on the main
        stream); then the energy loss of every micro-batch and phi's step."""
        obj, step = self.objective, self.step
        side = self.streams.phase2(batch) if taken is None else contextlib.nullcontext()
        skip = step < self.cfg.optim.energy_skip_steps
        with side, self.timer("phase2"):
            if taken is None:
                with self.timer("phase2_read"):  # the part that reads theta
                    _, taken = self.graphs.run("phi_read", self._phi_read, batch)
                self.streams.theta_released()  # phase 2's last read of theta is issued
            draws = [obj.draws(mb, step) for mb in batch]
            m, = self.graphs.run("phi", self._phi_step, batch, taken, draws,
                                 eligible=obj.weight(step) == 1.0 and not skip)
        if not skip:
            self.optim.stepped.add("phi")
        return m

    # ---- the parts (device only: what a CUDA graph replays; see graphs.py) ------------------------
    def _theta_grads(self, batch: list[Micro], keep: bool):
        """Forward with grad, L1, backward of every micro-batch -> (metrics, theta's grads,
        per micro-batch (context, negatives) when ``keep``)."""
        kept = []

        def micro(mb: Micro, m: Mean) -> None:
            l1, fwd = self.forward_l1(mb, capture=keep)
            if keep:
                kept.append((self.objective.context(fwd), self.objective.negatives(fwd)))
            (l1 / m.n).backward()
            m.add(l1=l1)

        m = self.accumulate(batch, ("theta",), micro)
        return m.values, [p.grad for p in self.theta], kept

    def _theta_update(self, grads: list):
        """theta's grads (its own .grad, or a graphed part's outputs) clipped, its optimizer
        step -> ({"grad_norm_theta": norm},)."""
        for p, g in zip(self.theta, grads):
            p.grad = g
        norm = self.dp.clip_grad_norm(self.theta, self.cfg.optim.grad_clip)  # FSDP: sharded
        self.optim.update("theta")
        return ({"grad_norm_theta": norm},)

    def _phi_read(self, batch: list[Micro]):
        """The no-grad forward with the current theta and the negatives of every micro-batch
        -> ({}, [(context, negatives)] per micro-batch)."""
        reads = []
        for mb in batch:
            fwd = self.observe(mb)
            reads.append((self.objective.context(fwd), self.objective.negatives(fwd)))
        return {}, reads

    def _phi_step(self, batch: list[Micro], reads: list, draws: list):
        """The energy loss of every micro-batch on its (context, negatives) and random draws,
        then :meth:`step_phi` -> (metrics,)."""
        obj = self.objective

        def micro(mb: Micro, m: Mean) -> None:
            ctx, negs = reads[mb.index]
            obj.micro(ctx, mb, negs, m, self.step, draws[mb.index])

        m = self.accumulate(batch, ("phi",), micro)
        m.set(grad_norm_phi=self.step_phi())
        return (m.values,)

    def _drop_grads(self) -> None:
        """After a failed capture: the gradients a half-captured backward left are dropped
        (the part then runs eagerly from None gradients)."""
        for p in (*self.theta, *self.phi):
            p.grad = None

    # ---- the step ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step as the strategy schedules it, with the diagnostics due around it;
        metrics stay on the device (read back by :meth:`flush`)."""
        step = self.step
        self.timer.set_step(step)
        batch = self.batch(step)
        self.diagnostics.before(self, batch)
        self.streams.new_step()
        with self.timer("step"):
            metrics = self.strategy.step(self, batch, step)
        metrics = {k: v for k, v in metrics.items() if v is not None}
        # the lrs this step used; the stepped sides move on, phi's where its step ran
        metrics.update(self.optim.advance({"phi": self.streams.on_phase2_stream()}))
        self.step += 1
        metrics.update(self.diagnostics.after(self))
        self.meter.add(step, metrics)
        return metrics

