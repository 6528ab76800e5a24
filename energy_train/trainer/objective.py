"""The energy objective: what phi is trained on, from a policy forward of a micro-batch.

- what the energy model reads: the context rows (B, S, D) and their pad mask
  (``energy.context``), in the dtype ``energy.precision`` asks for;
- the negatives that come from theta: the CURRENT head on every layer's captured action rows
  (``Policy.layer_actions``, the final norm on intermediate layers with ``energy.logit_lens``),
  picked by ``energy.layer_picks``, with the noise / amplitude / sign-flip negatives of the
  [energy] section (a generator seeded by seed, step, micro-batch and rank: no host sync);
- the loss (``energy.loss``: swap InfoNCE, explicit InfoNCE or margin ranking) inside phi's
  data-parallel wrapper, its metrics, its warm-up weight, and its backward, audited: the
  gradient norm it deposits into theta (0 exactly when it has no path into theta).

It holds no optimizer; it reaches the backbone only through the Policy interface.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import losses
from ..config import TrainConfig, parse_floats
from ..distributed import LOCAL
from ..grads import grad_norm
from ..modes import module_mode
from ..policy import Policy
from ..tensors import bf16_autocast, gather_rows, upcast
from .feed import Forward, Micro
from .metrics import Mean


class EnergyObjective:
    def __init__(self, cfg: TrainConfig, policy: Policy, energy: nn.Module, theta: list,
                 device: torch.device, dp=LOCAL):
        self.cfg, self.policy, self.energy, self.theta, self.device = cfg, policy, energy, theta, device
        self.dp = dp  # data-parallel hooks (Trainer.use_parallel installs them under torchrun)
        self.theta_negatives = cfg.energy.theta_negatives()  # the negatives made from theta
        self._gen = torch.Generator(device=device)  # re-seeded per micro-batch (no sync)

    # ---- what the energy model reads -------------------------------------------------------------
    def context(self, fwd: Forward, detach: bool = True) -> torch.Tensor:
        """(B, S, D) context rows (energy.context = "all": the whole last hidden state, S = T);
        ``detach=False`` keeps the graph into theta."""
        if self.cfg.energy.context == "all":
            return fwd.last_hidden.detach() if detach else fwd.last_hidden
        if detach or fwd.last_hidden is None:
            return fwd.captured.context
        return gather_rows(fwd.last_hidden, fwd.mb.layout.context_index)

    def pad_mask(self, mb: Micro) -> torch.Tensor | None:
        """The energy model's key padding mask: the policy's, or none with energy.context="all"."""
        return None if self.cfg.energy.context == "all" else mb.layout.pad_mask

    @torch.no_grad()
    def layer_actions(self, fwd: Forward) -> torch.Tensor:
        """(L, B, H, Da) actions of the CURRENT head on every layer's captured action rows
        (Policy.layer_actions; the final norm on intermediate layers with energy.logit_lens)."""
        norm = self.dp.final_norm(self.policy.decoder()[1]) if self.cfg.energy.logit_lens else None
        # a no-grad forward: eval mode, restored after (joint's backward follows in train mode)
        with bf16_autocast(self.device, self.cfg.run.precision == "bf16"), \
                module_mode(self.policy.modules().values(), False):
            return self.policy.layer_actions(list(fwd.captured.action_rows), norm)

    def negatives(self, fwd: Forward) -> torch.Tensor | None:
        """The layer actions when the energy loss uses them (explicit, margin), else None."""
        return self.layer_actions(fwd) if self.theta_negatives else None

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

    def draws(self, mb: Micro, step: int) -> tuple | None:
        """The random numbers of this micro-batch's structured negatives at ``step`` (noise,
        sign-flip uniforms; losses.negative_draws) from a generator seeded by seed, step,
        micro-batch and rank; None for the swap loss, which draws none. Made before the energy
        loss, so a CUDA graph of it takes them as an input."""
        e = self.cfg.energy
        if e.loss == "swap":
            return None
        g = self._gen.manual_seed((self.cfg.run.seed * 1_000_003 + step) * 1024 +
                                  mb.index + 1_000_000_007 * self.dp.rank)
        return losses.negative_draws(mb.expert, e.noise_sigma, e.sign_flip, g)

    def structured_negatives(self, mb: Micro, negs: torch.Tensor | None, step: int,
                             draws: tuple | None = None) -> torch.Tensor:
        """(B, M, H, Da): the [energy] section's negatives for this micro-batch of ``step``
        (``draws``: :meth:`draws`' numbers, made here when not given)."""
        e = self.cfg.energy
        draws = self.draws(mb, step) if draws is None else draws
        negs = negs if self.theta_negatives else None
        picks = self.layer_picks(negs.shape[0]) if negs is not None else None
        return losses.structured_negatives(
            mb.expert, negs, layer_picks=picks,
            own_prediction=e.own_prediction, sigma=e.noise_sigma,
            amplitudes=parse_floats(e.amplitudes), sign_flip=e.sign_flip, draws=draws)

    # ---- the loss --------------------------------------------------------------------------------
    def loss(self, context: torch.Tensor, mb: Micro, negs, step: int,
             draws: tuple | None = None) -> losses.EnergyLoss:
        """The configured energy loss of a micro-batch of ``step``, run inside phi's
        data-parallel wrapper (what a backward follows); ``draws``: see :meth:`draws`."""
        return self.dp.call("phi", self.evaluate, context, mb, negs, step, draws)

    def evaluate(self, context: torch.Tensor, mb: Micro, negs, step: int,
                 draws: tuple | None = None) -> losses.EnergyLoss:
        """The same loss outside any wrapper (the diagnostics: no backward). fp32 unless
        energy.precision is bf16 (autocast) or bf16_weights (the model casts the context)."""
        e = self.cfg.energy
        with bf16_autocast(self.device, e.precision == "bf16"):
            context = upcast(context) if e.precision == "fp32" else context
            pad, expert = self.pad_mask(mb), mb.expert
            if e.loss == "swap":  # global negatives: the expert chunks of every rank
                pool, offset = self.dp.gather(expert) if self.cfg.dist.global_negatives else (None, 0)
                return losses.swap_infonce(self.energy, context, pad, expert, tau=e.tau,
                                           all_expert=pool, offset=offset)
            cand = self.structured_negatives(mb, negs, step, draws)
            if e.loss == "explicit":
                return losses.explicit_infonce(self.energy, context, pad, expert, cand, tau=e.tau)
            return losses.margin_ranking(self.energy, context, pad, expert, cand)

    def stats(self, out: losses.EnergyLoss) -> dict:
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

    def weight(self, step: int) -> float:
        """The energy loss's warm-up weight at ``step``: 0 -> 1 over energy.warmup_steps."""
        w = self.cfg.energy.warmup_steps
        return 1.0 if w <= 0 else min(1.0, (step + 1) / w)

    # ---- backward --------------------------------------------------------------------------------
    def micro(self, context: torch.Tensor, mb: Micro, negs, m: Mean, step: int,
              draws: tuple | None = None) -> None:
        """One micro-batch of an energy-only phase: the loss (warm-up weighted, divided by the
        micro-batch count), its backward (audited on the first micro-batch), its metrics."""
        out = self.loss(context, mb, negs, step, draws)
        d = self.backward(self.weight(step) * out.loss / m.n, audit=mb.index == 0)
        if d is not None:
            m.set(energy_grad_theta=d)
        m.add(**self.stats(out))

    def backward(self, loss: torch.Tensor, *, audit: bool, retain_graph: bool = False):
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
            d = self.backward(e_loss, audit=audit, retain_graph=not detached)
            l1_loss.backward()
            return d
        d = self.dp.deposit(e_loss, self.theta) if audit else None
        (e_loss + l1_loss).backward()
        return d
