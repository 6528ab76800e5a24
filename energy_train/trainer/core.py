"""The Trainer: theta and phi, their optimizers, the building blocks of a step, and the loop.

theta = the policy's trainable parameters (backbone + action head + extras that require grad;
AdamW #1), phi = the energy model (AdamW #2); the two sets must be disjoint. The trainer
reaches the backbone only through the :class:`~energy_train.policy.Policy` interface. A
:class:`~energy_train.trainer.strategies.Strategy` composes one step from the blocks below;
the loop never looks at the strategy's name.

The two phases (what two_phase runs, and what every other strategy rearranges):

- :meth:`Trainer.phase_theta` - policy forward WITH grad, action rows -> head -> L1,
  backward, step theta.
- :meth:`Trainer.phase_phi` - policy forward under no_grad with the CURRENT theta (hooks keep
  only the action rows of each layer and the context rows), negatives from the current head,
  energy loss, backward, step phi. Nothing here can reach theta: its inputs carry no graph.

Diagnostics beside the steps (never inside them): :meth:`Trainer.probe` (held-out L1, the
training energy loss on a fixed batch, drift, context row diversity) every run.probe_every
steps, and :meth:`Trainer.lag_effect` (the one-step lag of the energy loss's inputs) every
run.lag_every steps.

On CUDA (``run.overlap``) phase_phi runs on a side stream beside the next step's phase_theta,
ordered by events (:mod:`energy_train.trainer.overlap`); on the CPU, or with overlap off, the
same code runs in order. Nothing inside a step synchronises with the host: metrics stay on
the device until :meth:`Trainer.flush`, which (like the probe and checkpoints) drains the
side stream first.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..capture import CapturedStates, HiddenStateCapture, gather_hidden_states
from ..config import TrainConfig, parse_floats
from ..distributed import LOCAL
from ..grads import grad_norm
from ..models import L1RegressionActionHead
from ..ops import layer_actions
from ..policy import Policy, hidden
from ..telemetry import GpuTelemetry
from .feed import Feed, Micro, prepare
from .metrics import Meter, PhaseTimer
from .overlap import PhaseStreams
from .validate import PolicyError, decoder_of


@dataclass
class Forward:
    """One policy forward of a micro-batch."""
    mb: Micro
    last_hidden: torch.Tensor | None  # (B, T, D); carries the graph when run with grad
    captured: CapturedStates | None   # action rows (L+1, B, H*Da, D) + context (B, S, D), detached


class WallClock:
    """Wall seconds of a run over all its parts: a resumed run continues the count."""

    def __init__(self):
        self.offset, self._t0 = 0.0, None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def seconds(self) -> float:
        return self.offset + (0.0 if self._t0 is None else time.perf_counter() - self._t0)


class Mean:
    """A step's metrics: ``add`` means over the n micro-batches (device tensors), ``set`` once."""

    def __init__(self, n: int):
        self.n, self.values = n, {}

    def add(self, **values) -> None:
        for k, v in values.items():
            v = v.detach() if isinstance(v, torch.Tensor) else v
            self.values[k] = self.values.get(k, 0.0) + v / self.n

    def set(self, **values) -> None:
        self.values.update(values)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (losses and norms of autocast outputs); fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device: {name!r} asked for, but CUDA is not available")
    return dev


def lr_lambda(cfg: TrainConfig):
    o, steps = cfg.optim, cfg.run.steps

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


class Trainer:
    def __init__(self, cfg: TrainConfig, policy: Policy, energy: nn.Module, data, device: torch.device,
                 *, probe: dict | None = None):
        from .strategies import make_strategy

        self.cfg, self.policy, self.energy, self.device = cfg, policy, energy, device
        if cfg.energy.action_residual != getattr(energy, "action_residual", cfg.energy.action_residual):
            raise ValueError(f"energy.action_residual: the config says {cfg.energy.action_residual}, "
                             f"the energy model was built with {energy.action_residual}")
        if cfg.energy.precision == "bf16_weights":
            energy.to(torch.bfloat16)  # the fork's first recipe: bf16 weights, AdamW on them
        self.feed = data if isinstance(data, Feed) else Feed(data, cfg.run.grad_accum, probe)
        self.theta = [p for _, p in policy.named_trainable()]
        self.phi = [p for p in energy.parameters() if p.requires_grad]
        if not self.theta:
            raise ValueError("theta: the policy has no parameter that requires grad (backbone, "
                             "action_head and extras are all frozen)")
        shared = {id(p) for p in self.theta} & {id(p) for p in self.phi}
        if shared:
            raise ValueError(f"theta (the policy's trainable parameters) and phi (the energy "
                             f"model) must be disjoint parameter sets; {len(shared)} tensor(s) "
                             "are in both")
        o = cfg.optim
        # AdamW: foreach kernels on the current stream (phi's only ever on the side stream)
        self.opt_theta = torch.optim.AdamW(self.theta, lr=o.lr, weight_decay=o.weight_decay)
        self.opt_phi = torch.optim.AdamW(self.phi, lr=o.energy_lr, weight_decay=o.energy_weight_decay)
        self.sched_theta = torch.optim.lr_scheduler.LambdaLR(self.opt_theta, lr_lambda(cfg))
        self.sched_phi = torch.optim.lr_scheduler.LambdaLR(self.opt_phi, lr_lambda(cfg))
        self.capture = (HiddenStateCapture.for_decoder(*decoder_of(policy))
                        if cfg.run.capture == "hooks" else None)
        self.strategy = make_strategy(cfg)
        self.timer = PhaseTimer(device)
        self.streams = PhaseStreams(device, cfg.run.overlap)
        self.telemetry = GpuTelemetry(device)
        self._gen = torch.Generator(device=device)  # re-seeded per micro-batch (no sync)
        self.meter = Meter()
        self.clock = WallClock()
        self.dp = LOCAL                  # data-parallel hooks; distributed.Parallel under torchrun
        self.step = 0                    # optimizer steps done
        self._probe: Micro | None = None
        self._probe_prev = None
        self._probe_step = None
        self._lag_ref = None  # (step, context, negatives) of theta_s on batch s: the lag effect

    # ---- precision ----------------------------------------------------------------------------
    def autocast(self):
        """The policy's forwards (both phases, the head, the negatives): bf16 autocast or none."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.run.precision == "bf16")

    def _energy_autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.energy.precision == "bf16")

    def _energy_input(self, context: torch.Tensor) -> torch.Tensor:
        """The context in the dtype the energy model reads: fp32 unless energy.precision is
        bf16 (autocast) or bf16_weights (the model casts it to its own dtype)."""
        return upcast(context) if self.cfg.energy.precision == "fp32" else context

    # ---- micro-batches ----------------------------------------------------------------------
    def batch(self, step: int) -> list[Micro]:
        """This rank's micro-batches of optimizer step ``step``, on the device."""
        dicts = self.feed.batch(step, *self.dp.shard)
        n = len(dicts)
        mbs = [prepare(self.policy, d, self.device, i, i == n - 1) for i, d in enumerate(dicts)]
        if self.feed.step_indexed:  # shapes only: no device read
            rank, world = self.dp.shard
            rows, want = [mb.expert.shape[0] for mb in mbs], self.cfg.run.batch_size // world
            if len(rows) != self.cfg.run.grad_accum or any(r != want for r in rows):
                raise PolicyError(f"data.batch({step}, {rank}, {world}): expected run.grad_accum = "
                                  f"{self.cfg.run.grad_accum} micro-batches of run.batch_size / world = "
                                  f"{want} samples, got {rows}")
        return mbs

    def micro(self, batch: list[Micro], *sides: str) -> Iterator[Micro]:
        """The accumulation loop: yields each micro-batch inside ``no_sync`` of the given sides
        ("theta", "phi") but the last, so gradients are all-reduced once per step."""
        for mb in batch:
            with self.dp.no_sync(*sides, sync=mb.last):
                yield mb

    # ---- building blocks -----------------------------------------------------------------------
    def _forward(self, mb: Micro, *, grad: bool, capture: bool, reuse: bool = True) -> Forward:
        """Policy forward; with ``capture`` the hooks keep the action rows of every layer and the
        context rows in buffers reused per (grad, step parity, micro-batch) when ``reuse``
        (fresh ones otherwise), or run.capture="hidden_states" gathers them from the tuple."""
        lay = mb.layout
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
            h = fwd.last_hidden
            rows = h.gather(1, mb.layout.action_index[:, :, None].expand(-1, -1, h.shape[-1]))
            with self.autocast():
                pred = self.policy.predict_action(rows)
            return F.l1_loss(upcast(pred), upcast(mb.expert)), fwd
        return self.dp.call("theta", run)

    def observe(self, mb: Micro, reuse: bool = True) -> Forward:
        """No-grad forward with the CURRENT theta, capturing the rows the energy phase reads
        (on the bare modules: no data-parallel reducer is engaged)."""
        return self._forward(mb, grad=False, capture=True, reuse=reuse)

    def context(self, fwd: Forward, detach: bool = True) -> torch.Tensor:
        """(B, S, D) context rows (energy.context = "all": the whole last hidden state, S = T);
        ``detach=False`` keeps the graph into theta."""
        if self.cfg.energy.context == "all":
            return fwd.last_hidden.detach() if detach else fwd.last_hidden
        if detach or fwd.last_hidden is None:
            return fwd.captured.context
        h, idx = fwd.last_hidden, fwd.mb.layout.context_index
        return h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1]))

    def pad_mask(self, mb: Micro) -> torch.Tensor | None:
        """The energy model's key padding mask: the policy's, or none with energy.context="all"."""
        return None if self.cfg.energy.context == "all" else mb.layout.pad_mask

    def layer_picks(self, num_layers: int) -> list[int]:
        """energy.layer_picks resolved against the number of layer actions."""
        where = {"first": 0, "middle": num_layers // 2, "last": num_layers - 1}
        picks = []
        for p in self.cfg.energy.picks():
            i = where[p] if p in where else int(p)
            if not -num_layers <= i < num_layers:
                raise ValueError(f"energy.layer_picks: {p!r} is out of range for the "
                                 f"{num_layers} layer actions of this policy")
            picks.append(i % num_layers)
        return picks

    @property
    def theta_negatives(self) -> int:
        """How many of the structured negatives come from the policy's weights."""
        return self.cfg.energy.theta_negatives()

    @property
    def needs_negatives(self) -> bool:
        return self.theta_negatives > 0

    @torch.no_grad()
    def layer_actions(self, fwd: Forward) -> torch.Tensor:
        """(L, B, H, Da) actions of the CURRENT head on every layer's captured action rows
        (the embeddings, state 0, skipped; the final norm on intermediate layers with
        energy.logit_lens)."""
        rows = list(fwd.captured.action_rows)
        norm = self.dp.final_norm(self.policy.decoder()[1]) if self.cfg.energy.logit_lens else None
        head = self.policy.action_head
        with self.autocast():
            if isinstance(head, L1RegressionActionHead):
                return layer_actions(rows, None, head, final_norm=norm)
            # any other head: the eager batched path through the policy's predict_action
            picked = [(norm(r) if norm is not None and i < len(rows) - 1 else r)
                      for i, r in enumerate(rows) if i > 0]
            stacked = torch.stack(picked)
            L, B = stacked.shape[:2]
            out = self.policy.predict_action(stacked.reshape(L * B, *stacked.shape[2:]))
            return out.reshape(L, B, *out.shape[1:])

    def negatives(self, fwd: Forward) -> torch.Tensor | None:
        """The layer actions when the energy loss uses them (explicit, margin), else None."""
        return self.layer_actions(fwd) if self.needs_negatives else None

    def energy_loss(self, context: torch.Tensor, mb: Micro, negs) -> losses.EnergyLoss:
        """The configured energy loss, run inside phi's data-parallel wrapper (fp32 unless
        energy.precision = bf16)."""
        return self.dp.call("phi", self._energy_loss, context, mb, negs)

    def _energy_loss(self, context, mb: Micro, negs) -> losses.EnergyLoss:
        e = self.cfg.energy
        with self._energy_autocast():
            context = self._energy_input(context)
            pad, expert = self.pad_mask(mb), mb.expert
            if e.loss == "swap":  # global negatives: the expert chunks of every rank
                pool, offset = self.dp.gather(expert) if self.cfg.dist.global_negatives else (None, 0)
                return losses.swap_infonce(self.energy, context, pad, expert, tau=e.tau,
                                           all_expert=pool, offset=offset)
            cand = self.structured_negatives(mb, negs)
            if e.loss == "explicit":
                return losses.explicit_infonce(self.energy, context, pad, expert, cand, tau=e.tau)
            return losses.margin_ranking(self.energy, context, pad, expert, cand)

    def structured_negatives(self, mb: Micro, negs: torch.Tensor | None) -> torch.Tensor:
        """(B, M, H, Da): the [energy] section's negatives for this micro-batch (the random
        ones drawn from a generator seeded by seed, step, micro-batch and rank)."""
        e = self.cfg.energy
        g = self._gen.manual_seed((self.cfg.run.seed * 1_000_003 + self.step) * 1024 +
                                  mb.index + 1_000_000_007 * self.dp.rank)
        negs = negs if self.needs_negatives else None
        picks = self.layer_picks(negs.shape[0]) if negs is not None else None
        return losses.structured_negatives(
            mb.expert, negs, layer_picks=picks,
            own_prediction=e.own_prediction, sigma=e.noise_sigma,
            amplitudes=parse_floats(e.amplitudes), sign_flip=e.sign_flip, generator=g)

    def energy_stats(self, out: losses.EnergyLoss) -> dict:
        """The metrics of one energy loss (device tensors): the loss, ranking accuracy (ties
        counted as ties), tie rate, the spread of the logits over the candidates (~0: the
        energy ignores the candidate), and for explicit/margin the InfoNCE weight of the
        theta-dependent negatives (layer actions, own prediction) and their mean energy gap
        above the positive."""
        tau = self.cfg.energy.tau
        res = {"energy_loss": out.loss, "rank_acc": losses.ranking_accuracy(out),
               "tie_rate": losses.tie_rate(out), "energy_spread": losses.energy_spread(out, tau),
               "chance": 1.0 / out.energies.shape[1]}
        n = self.theta_negatives
        if n:
            E = out.energies.float()
            res["neg_weight_theta"] = losses.candidate_weight(out, slice(1, 1 + n), tau)
            res["neg_gap_theta"] = (E[:, 1:1 + n] - E[:, :1]).mean()
        return res

    def energy_micro(self, context: torch.Tensor, mb: Micro, negs, m: Mean) -> None:
        """One micro-batch of an energy-only phase: the loss (warm-up weighted, divided by the
        micro-batch count), its backward (audited on the first micro-batch), its metrics."""
        out = self.energy_loss(context, mb, negs)
        d = self.energy_backward(self.energy_weight() * out.loss / m.n, audit=mb.index == 0)
        if d is not None:
            m.set(energy_grad_theta=d)
        m.add(**self.energy_stats(out))

    def energy_weight(self) -> float:
        w = self.cfg.energy.warmup_steps
        return 1.0 if w <= 0 else min(1.0, (self.step + 1) / w)

    def energy_backward(self, loss: torch.Tensor, *, audit: bool, retain_graph: bool = False):
        """Backward of a (weighted) energy loss; with ``audit`` returns the gradient norm it
        deposited into theta (0 exactly when the energy loss has no path into theta). Audit
        while theta's grads are None: before any L1 backward of the step."""
        loss.backward(retain_graph=retain_graph)
        if not audit:
            return None
        deposit = grad_norm(self.theta)
        return deposit if deposit is not None else torch.zeros((), device=self.device)

    def joint_backward(self, e_loss, l1_loss, *, detached: bool, audit: bool):
        """Both losses of one forward: the energy backward first (audited), then L1. The leaky
        variant (context not detached) under DDP takes ONE backward of the sum (a DDP forward
        allows one backward) and audits with autograd.grad (no .grad written)."""
        if detached or not self.dp.active:
            d = self.energy_backward(e_loss, audit=audit, retain_graph=not detached)
            l1_loss.backward()
            return d
        d = self.dp.deposit(e_loss, self.theta) if audit else None
        (e_loss + l1_loss).backward()
        return d

    def step_theta(self) -> torch.Tensor | None:
        """Optimizer step on theta; returns its grad norm (a device tensor)."""
        norm = self.dp.clip_grad_norm(self.theta, self.cfg.optim.grad_clip)  # FSDP: sharded grads
        with self.timer("opt_theta"):
            self.streams.before_theta_write()  # phase 2 of the previous step has read theta
            self.opt_theta.step()
        self.opt_theta.zero_grad(set_to_none=True)
        return norm

    def step_phi(self) -> torch.Tensor | None:
        """Optimizer step on phi, its grad norm clipped to optim.energy_grad_clip; during the
        first optim.energy_skip_steps steps no step: the grads are dropped (the fork's
        energy_warm_steps)."""
        from ..grads import clip_grad_norm
        norm = clip_grad_norm(self.phi, self.cfg.optim.energy_grad_clip)
        if self.step < self.cfg.optim.energy_skip_steps:
            self.opt_phi.zero_grad(set_to_none=True)
            return norm
        self.opt_phi.step()
        self.opt_phi.zero_grad(set_to_none=True)
        return norm

    # ---- the two phases --------------------------------------------------------------------------
    def phase_theta(self, batch: list[Micro]) -> dict:
        """Phase 1: L1 on theta. phi is untouched."""
        m = Mean(len(batch))
        with self.timer("phase1"):
            for mb in self.micro(batch, "theta"):
                l1, _ = self.forward_l1(mb)
                (l1 / m.n).backward()
                m.add(l1=l1)
            m.set(grad_norm_theta=self.step_theta())
        return m.values

    def phase_phi(self, batch: list[Micro]) -> dict:
        """Phase 2: a no_grad forward with the CURRENT theta, negatives from the CURRENT head,
        energy loss on phi. theta is only read. On CUDA with overlap: on the side stream."""
        m = Mean(len(batch))
        with self.streams.phase2(batch), self.timer("phase2"):
            for mb in self.micro(batch, "phi"):
                with self.timer("phase2_read"):  # the part that reads theta
                    fwd = self.observe(mb)
                    negs = self.negatives(fwd)
                if mb.last:
                    self.streams.theta_released()  # the last read of theta in this phase
                self.energy_micro(self.context(fwd), mb, negs, m)
            m.set(grad_norm_phi=self.step_phi())
        return m.values

    # ---- the loop ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step as the strategy schedules it; metrics stay on the device."""
        self.timer.set_step(self.step)
        batch = self.batch(self.step)
        lag = self.lag_due()
        if lag:
            self.lag_snapshot(batch)
        with self.timer("step"):
            metrics = self.strategy.step(self, batch, self.step)
        metrics = {k: v for k, v in metrics.items() if v is not None}
        metrics["lr"] = self.sched_theta.get_last_lr()[0]
        metrics["energy_lr"] = self.sched_phi.get_last_lr()[0]
        with warnings.catch_warnings():  # a strategy may skip an optimizer in a step (alternating)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched_theta.step()
            self.sched_phi.step()
        self.step += 1
        if lag:
            metrics.update(self.lag_effect())
        if self.cfg.run.probe_every and self.step % self.cfg.run.probe_every == 0:
            metrics.update(self.probe())
        self.meter.add(self.step - 1, metrics)
        return metrics

    def probe_batch(self) -> Micro:
        """The held-out probe micro-batch on the device (prepared once)."""
        if self._probe is None:
            self._probe = prepare(self.policy, self.feed.probe(), self.device, 0, True)
        return self._probe

    @torch.no_grad()
    def probe(self) -> dict:
        """Held-out metrics on the fixed probe batch: L1, the TRAINING energy loss and its
        ranking accuracy (the same candidate set), the context's row diversity (~0: the
        context rows collapsed), and the drift: relative change per step of the context and of
        the layer actions since the last probe (what phi has to chase)."""
        self.streams.drain()  # phi is read here, on the main stream
        mb = self.probe_batch()
        fwd = self.observe(mb, reuse=False)  # kept as the next drift reference
        ctx, negs = self.context(fwd), self.layer_actions(fwd)
        with self.autocast():
            pred = self.policy.predict_action(fwd.captured.action_rows[-1])
        l1 = F.l1_loss(upcast(pred), upcast(mb.expert))
        out = self._energy_loss(ctx, mb, negs if self.needs_negatives else None)
        res = {"probe_l1": l1, "probe_energy_loss": out.loss,
               "probe_rank_acc": losses.ranking_accuracy(out),
               "probe_tie_rate": losses.tie_rate(out), "probe_chance": 1.0 / out.energies.shape[1],
               "context_diversity": row_diversity(ctx, self.pad_mask(mb))}
        if self._probe_prev is not None and self.step > self._probe_step:
            pc, pn = self._probe_prev
            dt = self.step - self._probe_step
            res["drift_context"] = upcast(ctx - pc).norm() / upcast(pc).norm().clamp_min(1e-12) / dt
            res["drift_negatives"] = upcast(negs - pn).norm() / upcast(pn).norm().clamp_min(1e-12) / dt
        self._probe_prev, self._probe_step = (ctx, negs), self.step
        return res

    # ---- the one-step lag effect (run.lag_every) --------------------------------------------------
    def lag_due(self) -> bool:
        every = self.cfg.run.lag_every
        return bool(every) and self.feed.exact_resume and self.step % every == 0

    @torch.no_grad()
    def _lag_inputs(self, mb: Micro):
        fwd = self.observe(mb, reuse=False)
        return self.context(fwd), (self.negatives(fwd) if self.needs_negatives else None)

    @torch.no_grad()
    def lag_snapshot(self, batch: list[Micro]) -> None:
        """Before step s: the context and negatives of theta_s on batch s (its first micro-batch)."""
        self.streams.drain()
        self._lag_ref = (self.step, batch[0], *self._lag_inputs(batch[0]))

    @torch.no_grad()
    def lag_effect(self) -> dict:
        """After step s (theta_s+1, phi_s+1): how much the energy loss (the training loss, no
        grad) moves when its inputs switch from theta_s to theta_s+1 on batch s - what
        two_phase changes against joint - and, for scale, when the batch switches from s to
        s+1 under theta_s+1. {"lag_theta": |L(th_s+1, b_s) - L(th_s, b_s)|, "lag_batch":
        |L(th_s+1, b_s+1) - L(th_s+1, b_s)|} (device tensors)."""
        s, mb, ctx0, negs0 = self._lag_ref
        self._lag_ref = None
        if s != self.step - 1:
            return {}
        self.streams.drain()
        nxt = self.batch(self.step)[0]
        l_old = self._energy_loss(ctx0, mb, negs0).loss
        ctx_new, negs_new = self._lag_inputs(mb)
        l_new = self._energy_loss(ctx_new, mb, negs_new).loss
        ctx_next, negs_next = self._lag_inputs(nxt)
        l_next = self._energy_loss(ctx_next, nxt, negs_next).loss
        return {"lag_theta": (l_new - l_old).abs(), "lag_batch": (l_next - l_new).abs()}

    def flush(self) -> list[dict]:
        """Read back the metrics of the interval (the one host sync) and merge phase times;
        GPU telemetry (when NVML is there) goes into the interval's last record."""
        self.drain()
        records = self.meter.flush()
        times = self.timer.flush()
        for r in records:
            r.update(times.get(r["step"], {}))
        if records:
            records[-1].update(self.telemetry.sample())
        return records

    def discard_metrics(self) -> None:
        """Drop the kept metrics and phase events without reading them back (no sync)."""
        self.meter.discard()
        self.timer.discard()

    def drain(self) -> None:
        """Join the side stream into the main one (overlap); a no-op otherwise."""
        self.streams.drain()

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the weights: optimizers, schedulers, RNG, strategy, drift reference."""
        self.drain()
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "opt_theta": self.opt_theta.state_dict(),
                "opt_phi": self.opt_phi.state_dict(), "sched_theta": self.sched_theta.state_dict(),
                "sched_phi": self.sched_phi.state_dict(), "rng": rng,
                "strategy": self.strategy.state_dict(), "config": self.cfg.to_dict(),
                "wall_seconds": self.clock.seconds(),
                # the drift reference, so the first drift after a resume is the uninterrupted one
                "probe_prev": (None if self._probe_prev is None else
                               {"context": self._probe_prev[0], "negatives": self._probe_prev[1],
                                "step": self._probe_step})}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (opt_theta is loaded with the weights, by
        energy_train/trainer/checkpoint.py, which knows how theta is sharded)."""
        self.opt_phi.load_state_dict(state["opt_phi"])
        self.sched_theta.load_state_dict(state["sched_theta"])
        self.sched_phi.load_state_dict(state["sched_phi"])
        torch.set_rng_state(state["rng"]["torch"].cpu())  # CPU ByteTensors, wherever loaded
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.strategy.load_state_dict(state["strategy"], self.device)
        self.step = int(state["step"])
        self.clock.offset = float(state.get("wall_seconds", 0.0))
        prev = state.get("probe_prev")
        if prev is not None:
            self._probe_prev = (prev["context"].to(self.device), prev["negatives"].to(self.device))
            self._probe_step = int(prev["step"])
