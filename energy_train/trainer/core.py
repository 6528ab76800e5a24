"""The Trainer: parameters, optimizers, the building blocks of a step, and the loop.

theta = backbone + action head (AdamW #1), phi = energy model (AdamW #2); the two sets must
be disjoint. A :class:`~energy_train.trainer.strategies.Strategy` composes one step from the
blocks below; the loop never looks at the strategy's name.

The two phases (what two_phase runs, and what every other strategy rearranges):

- :meth:`Trainer.phase_theta` - backbone forward WITH grad, action rows -> head -> L1,
  backward, step theta.
- :meth:`Trainer.phase_phi` - backbone forward under no_grad with the CURRENT theta (hooks
  keep only the action rows of each layer and the context rows), negatives from the current
  head (``ops.layer_actions``), energy loss, backward, step phi. Nothing here can reach theta:
  its inputs carry no graph.

Both are plain functions of (trainer, micro-batches). On CUDA (``overlap=True``) phase_phi
runs on a side stream beside the next step's phase_theta, ordered by events
(:mod:`energy_train.trainer.overlap`); on the CPU, or with overlap off, the same code runs in
order. Nothing inside a step synchronises with the host: metrics stay on the device until
:meth:`Trainer.flush`, which (like the probe and checkpoints) drains the side stream first.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import losses
from ..config import TrainConfig
from ..capture import CapturedStates, HiddenStateCapture, gather_hidden_states
from ..data import Batch, TaskData
from ..distributed import LOCAL, clip_grad_norm, grad_norm
from ..models import EnergyModel, L1RegressionActionHead, TinyVLA
from ..ops import build_action_index, layer_actions
from ..telemetry import GpuTelemetry
from .metrics import Meter, PhaseTimer
from .overlap import PhaseStreams


@dataclass
class Forward:
    """One backbone forward of a micro-batch."""
    last_hidden: torch.Tensor | None  # (B, T, D); carries the graph when run with grad
    captured: CapturedStates | None   # action rows (L+1, B, H*Da, D) + context (B, S, D), detached
    action_index: torch.Tensor        # (B, H*Da) int64
    pad_mask: torch.Tensor            # (B, S) bool, True = ignore


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} asked for, but CUDA is not available")
    return dev


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def build_models(cfg: TrainConfig, device: torch.device):
    """The embedded default's models, initialised from cfg.seed."""
    torch.manual_seed(cfg.seed)
    model = TinyVLA(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                    image_size=cfg.image_size, patch_size=cfg.patch_size, chunk=cfg.chunk,
                    action_dim=cfg.action_dim, mlp_ratio=cfg.mlp_ratio)
    head = L1RegressionActionHead(input_dim=cfg.d_model, hidden_dim=cfg.head_hidden,
                                  action_dim=cfg.action_dim, num_actions_chunk=cfg.chunk)
    energy = EnergyModel(cfg.d_model, cfg.action_dim, hidden=cfg.energy_hidden,
                         heads=cfg.energy_heads, output=cfg.energy_output)
    return model.to(device), head.to(device), energy.to(device)


def _run(model, *inputs):
    return model(*inputs)


def _run_hidden_states(model, *inputs):
    return model(*inputs, output_hidden_states=True)


def _predict_action(head, rows):
    return head.predict_action(rows)


class Trainer:
    def __init__(self, cfg: TrainConfig, model: TinyVLA, head: L1RegressionActionHead,
                 energy: EnergyModel, data: TaskData, device: torch.device):
        from .strategies import make_strategy

        self.cfg, self.model, self.head, self.energy, self.data = cfg, model, head, energy, data
        self.device = device
        self.theta = [*model.parameters(), *head.parameters()]
        self.phi = list(energy.parameters())
        shared = {id(p) for p in self.theta} & {id(p) for p in self.phi}
        if shared:
            raise ValueError(f"theta (backbone + action head) and phi (energy model) must be "
                             f"disjoint parameter sets; {len(shared)} tensor(s) are in both")
        # AdamW: foreach kernels on the current stream (phi's only ever on the side stream)
        self.opt_theta = torch.optim.AdamW(self.theta, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt_phi = torch.optim.AdamW(self.phi, lr=cfg.energy_lr,
                                         weight_decay=cfg.energy_weight_decay)
        self.sched_theta = torch.optim.lr_scheduler.LambdaLR(self.opt_theta, lr_lambda(cfg))
        self.sched_phi = torch.optim.lr_scheduler.LambdaLR(self.opt_phi, lr_lambda(cfg))
        self.capture = HiddenStateCapture.for_model(model)  # TinyVLA or any HF-style decoder
        self.layout = model.layout
        self.strategy = make_strategy(cfg)
        self.timer = PhaseTimer(device)
        self.streams = PhaseStreams(device, cfg.overlap)
        self.telemetry = GpuTelemetry(device)
        self._gen = torch.Generator(device=device)  # re-seeded per micro-batch (no sync)
        self.meter = Meter()
        self.dp = LOCAL                  # data-parallel hooks; distributed.Parallel under torchrun
        self.step = 0                    # optimizer steps done
        self.trace: dict | None = None   # tests set a dict: phases record what they used
        self._probe_prev = None
        self._probe_step = None

    # ---- building blocks -----------------------------------------------------------------------
    def forward(self, mb: Batch, grad: bool, *, capture: bool = True, reuse: bool = True) -> Forward:
        """Backbone forward; with ``capture`` the hooks keep the action rows of every layer and
        the context rows, in buffers reused per (grad, step parity, micro-batch) when ``reuse``
        (fresh ones otherwise), or cfg.capture="hidden_states" gathers them from the full tuple."""
        index = build_action_index(num_tokens=self.layout.num_action_tokens,
                                   start=self.layout.action_start, batch_size=mb.size,
                                   device=self.device)
        S, cap = self.layout.context_len, None
        hidden_states = capture and self.cfg.capture == "hidden_states"
        fn = _run_hidden_states if hidden_states else _run
        inputs = (mb.images, mb.proprio, mb.tokens)
        with torch.set_grad_enabled(grad):
            # with grad through the DDP wrapper (its reducer is armed); without grad on the bare
            # module, so phase 2's forward never engages the data-parallel reducer
            call = ((lambda: self.dp.call(self.model, fn, *inputs)) if grad
                    else (lambda: fn(self.model, *inputs)))
            if capture and not hidden_states:
                slot = (grad, self.step % 2, mb.micro) if reuse else None
                with self.capture.armed(index, S, slot=slot) as cap:
                    out = call()
            else:
                out = call()
                if hidden_states:
                    cap = gather_hidden_states(out.hidden_states, index, S)
        return Forward(out.last_hidden_state if grad else None, cap, index, mb.pad_mask(S))

    def l1_loss(self, fwd: Forward, mb: Batch) -> torch.Tensor:
        h = fwd.last_hidden
        rows = h.gather(1, fwd.action_index[:, :, None].expand(-1, -1, h.shape[-1]))
        return F.l1_loss(self.dp.call(self.head, _predict_action, rows), mb.expert)

    def context(self, fwd: Forward, detach: bool = True) -> torch.Tensor:
        """(B, S, D) last-layer context rows; ``detach=False`` keeps the graph into theta."""
        if detach or fwd.last_hidden is None:
            return fwd.captured.context
        return fwd.last_hidden[:, : self.layout.context_len]

    @torch.no_grad()
    def negatives(self, fwd: Forward) -> torch.Tensor:
        """Layer actions (L, B, H, Da) from the CURRENT head on every layer's action rows."""
        norm = self.dp.final_norm(self.model) if self.cfg.logit_lens else None
        return layer_actions(list(fwd.captured.action_rows), None, self.head, final_norm=norm)

    @property
    def needs_negatives(self) -> bool:
        return self.cfg.energy_loss != "swap"

    def energy_loss(self, context, pad_mask, mb: Batch, negs) -> losses.EnergyLoss:
        """The configured energy loss, run inside phi's data-parallel wrapper."""
        return self.dp.call(self.energy, self._energy_loss, context, pad_mask, mb, negs)

    def _energy_loss(self, energy, context, pad_mask, mb: Batch, negs) -> losses.EnergyLoss:
        cfg = self.cfg
        if cfg.energy_loss == "swap":  # global negatives: the expert chunks of every rank
            pool, offset = self.dp.gather(mb.expert) if cfg.global_negatives else (None, 0)
            return losses.swap_infonce(energy, context, pad_mask, mb.expert, tau=cfg.tau,
                                       all_expert=pool, offset=offset)
        g = self._gen.manual_seed(
            (cfg.seed * 1_000_003 + mb.step) * 1024 + mb.micro + 1_000_000_007 * self.dp.rank)
        cand = losses.structured_negatives(mb.expert, negs, generator=g)
        if cfg.energy_loss == "explicit":
            return losses.explicit_infonce(energy, context, pad_mask, mb.expert, cand, tau=cfg.tau)
        return losses.margin_ranking(energy, context, pad_mask, mb.expert, cand)

    def energy_weight(self) -> float:
        w = self.cfg.energy_warmup_steps
        return 1.0 if w <= 0 else min(1.0, (self.step + 1) / w)

    def energy_backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Backward of a (weighted) energy loss -> the gradient norm it deposited into theta
        (the gradient-path audit). Call it while theta's grads are None (before any L1
        backward of the step); 0 exactly when the energy loss has no path into theta."""
        loss.backward(retain_graph=retain_graph)
        deposit = grad_norm(self.theta)
        return deposit if deposit is not None else torch.zeros((), device=self.device)

    def step_theta(self) -> torch.Tensor | None:
        """Optimizer step on theta (backbone + head); returns its grad norm (a device tensor)."""
        norm = self.dp.clip_grad_norm(self.theta, self.cfg.grad_clip)  # FSDP: sharded grads
        with self.timer("opt_theta"):
            self.streams.before_theta_write()  # phase 2 of the previous step has read theta
            self.opt_theta.step()
        self.opt_theta.zero_grad(set_to_none=True)
        return norm

    def step_phi(self) -> torch.Tensor | None:
        """Optimizer step on phi (energy model), its grad norm clipped to energy_grad_clip."""
        norm = clip_grad_norm(self.phi, self.cfg.energy_grad_clip)
        self.opt_phi.step()
        self.opt_phi.zero_grad(set_to_none=True)
        return norm

    # ---- the two phases --------------------------------------------------------------------------
    def phase_theta(self, batch: list[Batch]) -> dict:
        """Phase 1: L1 on theta (backbone + head). phi is untouched."""
        with self.timer("phase1"):
            l1 = 0.0
            for i, mb in enumerate(batch):  # all-reduce on the last micro-batch only
                with self.dp.no_sync(self.model, self.head, sync=i == len(batch) - 1):
                    loss = self.l1_loss(self.forward(mb, grad=True, capture=False), mb) / len(batch)
                    loss.backward()
                l1 = l1 + loss.detach()
            gnorm = self.step_theta()
        return {"l1": l1, "grad_norm_theta": gnorm}

    def phase_phi(self, batch: list[Batch]) -> dict:
        """Phase 2: a no_grad forward with the CURRENT theta, negatives from the CURRENT head,
        energy loss on phi. theta is only read. On CUDA with overlap: on the side stream."""
        with self.streams.phase2(batch), self.timer("phase2"):
            eloss, acc, deposit = 0.0, 0.0, None
            for i, mb in enumerate(batch):
                with self.timer("phase2_read"):  # the part that reads theta
                    fwd = self.forward(mb, grad=False)
                    negs = self.negatives(fwd) if self.needs_negatives else None
                if i == len(batch) - 1:
                    self.streams.theta_released()  # the last read of theta in this phase
                with self.dp.no_sync(self.energy, sync=i == len(batch) - 1):
                    out = self.energy_loss(fwd.captured.context, fwd.pad_mask, mb, negs)
                    d = self.energy_backward(self.energy_weight() * out.loss / len(batch))
                deposit = d if deposit is None else deposit
                eloss = eloss + out.loss.detach() / len(batch)
                acc = acc + losses.ranking_accuracy(out) / len(batch)
                if self.trace is not None:
                    self.trace.setdefault("phase_phi", []).append(
                        {"negatives": negs, "context": fwd.captured.context.clone(), "batch": mb})
            gnorm = self.step_phi()
        return {"energy_loss": eloss, "rank_acc": acc, "energy_grad_theta": deposit,
                "grad_norm_phi": gnorm}

    # ---- the loop ----------------------------------------------------------------------------------
    def batch(self, step: int) -> list[Batch]:
        # this rank's shard of the global batch (the whole batch in one process); the data is
        # checked once at start-up (cfg.check_data, in run.train): no check here
        return self.data.batch(step, self.cfg.batch_size, self.cfg.grad_accum, *self.dp.shard)

    def train_step(self) -> dict:
        """One optimizer step as the strategy schedules it; metrics stay on the device."""
        self.timer.set_step(self.step)
        batch = self.batch(self.step)
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
        if self.cfg.probe_every and self.step % self.cfg.probe_every == 0:
            metrics.update(self.probe())
        self.meter.add(self.step - 1, metrics)
        return metrics

    @torch.no_grad()
    def probe(self) -> dict:
        """Held-out metrics and drift on a fixed probe batch: relative change per step of the
        context and of the layer actions since the last probe (what phi has to chase)."""
        self.streams.drain()  # phi is read here, on the main stream
        mb = self.data.probe()
        fwd = self.forward(mb, grad=False, reuse=False)  # kept as the next drift reference
        ctx, negs = fwd.captured.context, self.negatives(fwd)
        rows = fwd.captured.action_rows[-1]
        l1 = F.l1_loss(self.head.predict_action(rows), mb.expert)
        out = losses.swap_infonce(self.energy, ctx, fwd.pad_mask, mb.expert, tau=self.cfg.tau)
        res = {"probe_l1": l1, "probe_rank_acc": losses.ranking_accuracy(out)}
        if self._probe_prev is not None and self.step > self._probe_step:
            pc, pn = self._probe_prev
            dt = self.step - self._probe_step
            res["drift_context"] = (ctx - pc).norm() / pc.norm().clamp_min(1e-12) / dt
            res["drift_negatives"] = (negs - pn).norm() / pn.norm().clamp_min(1e-12) / dt
        self._probe_prev, self._probe_step = (ctx, negs), self.step
        return res

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

    def drain(self) -> None:
        """Join the side stream into the main one (overlap); a no-op otherwise."""
        self.streams.drain()

    # ---- state ---------------------------------------------------------------------------------
    def weights(self) -> tuple[dict, dict]:
        self.drain()
        theta = {f"vla.{k}": v for k, v in self.model.state_dict().items()}
        theta.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return theta, dict(self.energy.state_dict())

    def state_dict(self) -> dict:
        self.drain()
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "data_position": self.step, "opt_theta": self.opt_theta.state_dict(),
                "opt_phi": self.opt_phi.state_dict(), "sched_theta": self.sched_theta.state_dict(),
                "sched_phi": self.sched_phi.state_dict(), "rng": rng,
                "strategy": self.strategy.state_dict(), "config": self.cfg.to_dict(),
                # the drift reference, so the first drift after a resume is the uninterrupted one
                "probe_prev": (None if self._probe_prev is None else
                               {"context": self._probe_prev[0], "negatives": self._probe_prev[1],
                                "step": self._probe_step})}

    def load(self, theta: dict, phi: dict, state: dict) -> None:
        self.dp.load_theta(self, theta, state["opt_theta"])  # FSDP: into the shards
        self.energy.load_state_dict(phi)
        self.opt_phi.load_state_dict(state["opt_phi"])
        self.sched_theta.load_state_dict(state["sched_theta"])
        self.sched_phi.load_state_dict(state["sched_phi"])
        # RNG states must be CPU ByteTensors: run.py loads the state with map_location=device,
        # which moves them to the GPU on CUDA ("RNG state must be a torch.ByteTensor")
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.strategy.load_state_dict(state["strategy"], self.device)
        self.step = int(state["step"])
        prev = state.get("probe_prev")
        if prev is not None:
            self._probe_prev = (prev["context"].to(self.device), prev["negatives"].to(self.device))
            self._probe_step = int(prev["step"])
        elif self.cfg.probe_every:  # older checkpoints: re-seed from the restored weights
            self.probe()
