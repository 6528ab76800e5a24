"""The energy model E_phi(context, action chunk) of the public energy fork, names intact.

Parameter names follow HuskyKingdom/openvla-oft-yhs ``vla-scripts/energy/energy_model.py``:
``state_linear`` (MLPResNet, 1 block, state_dim -> hidden -> hidden), ``action_linear``
(MLPResNet, 1 block, act_dim -> hidden -> hidden), ``pe_layer`` (sinusoidal table over the H
steps, a non-persistent buffer), ``cross`` (``nn.MultiheadAttention(hidden, heads,
batch_first=True)``: encoded actions are the queries, the encoded context the keys/values),
``prediction_head`` (MLPResNet, 2 blocks, hidden -> hidden -> 1) applied per step, the output
transform per step, then the mean over the H steps (the fork's final model)::

    E(c, a) = 1/H sum_h  f(head(z_h)),    z_h = out_proj(attention(q_h, K(c), V(c)))

    f: unbounded x | sigmoid  sigmoid(0.5 x) * 2 + 0.1 (the fork's, in (0.1, 2.1))
                   | softplus softplus(x) + 1e-6

``fork_version=`` builds the state_dict layout and forward of one published version of the
fork (:data:`FORK_VERSIONS`: ``gate_a`` only in the 7-9 Sep 2025 versions, where the forward
pools the attention output over the steps and applies the head once); such a model loads that
version's checkpoints strictly and computes its energies. :func:`load_fork_energy` builds the
model from a checkpoint.

Deviations from the fork, on purpose:
- the positional encoding has no dropout (the fork's 0.2 makes energies stochastic in train
  mode; the fork's energies in eval mode are what this module computes);
- a sample whose pad mask hides every key attends to nothing: its attention output is zero
  (``nn.MultiheadAttention`` returns NaN there; the fork raises). ``validate=True`` in the
  ops raises instead;
- ``action_residual=True`` (this package's, not a fork forward: the fork's ``gate_a * encoded
  action`` line is commented out in every version) adds ``gate_a * encoded action`` to the
  attention output before the head; ``gate_a`` is then a learnable parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_int, check_multiple, check_nonempty, check_same_device, check_tensor
from ..kernels.energy.reference import (OUTPUTS, energy_attention_reference,  # noqa: F401
                                        energy_scores_reference, output_transform)
from ..kernels.mlp.reference import mlp_resnet_reference
from .mlp import MLPResNet
from .weights import energy_weights


# --------------------------------------------------------------------------------------------
# the fork's published versions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForkVersion:
    """One forward of the fork's ``EnergyModel`` (nn.MultiheadAttention layout), as published.

    ``pool``: where the mean over the H steps is taken - ``"energy"`` (head and transform per
    step, then the mean: the final model), ``"raw"`` (head per step, mean of the raw outputs,
    then the transform) or ``"attention"`` (mean of the attention outputs z_h, head once,
    transform). ``clip``: ``clip * tanh(raw / clip)`` before the transform (None: none).
    ``output``: the transform (``"logistic"`` = sigmoid(x) + 1e-6, only in versions of
    9 Sep 2025). ``masked``: whether the forward passes the pad mask to the attention (two
    versions of 7-8 Sep ignore it). ``gate_a``: whether the state_dict holds ``gate_a`` (no
    version uses it in the forward). ``commits``: the fork's commits of energy_model.py with
    this forward, oldest first; ``dates``: when (UTC+8)."""
    commits: tuple
    dates: str
    pool: str
    output: str
    clip: float | None = None
    masked: bool = True
    gate_a: bool = False

    @property
    def fused(self) -> bool:
        """True when the package's standard path (and the fused kernels) compute it."""
        return (self.pool == "energy" and self.clip is None and self.masked
                and self.output in OUTPUTS)


FORK_OUTPUTS = OUTPUTS + ("logistic",)
POOLS = ("energy", "raw", "attention")

#: Every published forward of the fork's cross-attention EnergyModel (commits of
#: vla-scripts/energy/energy_model.py in HuskyKingdom/openvla-oft-yhs), by its first commit.
#: Commits whose code cannot run (d06f869, 01359d9, a65df8f: a name used before it is
#: assigned; fce172a: its __init__ reads an undefined name) wrote no checkpoint. Earlier
#: layouts (before 2025-09-07 14:31: ``energy_bc`` relative-attention stacks, or
#: ``action_proj``/``model`` MLPs) are other architectures: :func:`load_fork_energy` names them.
FORK_VERSIONS = {
    # 98565ff and 3eba774 also round the encoded context and actions to bf16 before the
    # attention (the model was cast to bf16 then): a bf16 EnergyModel computes the same formula
    "98565ff": ForkVersion(("98565ff", "3eba774", "e3c3c27"), "2025-09-07 14:31-15:16",
                           pool="attention", output="unbounded", masked=False, gate_a=True),
    "0112fc2": ForkVersion(("0112fc2", "1263de0", "8572cc1"), "2025-09-08 10:06-13:39",
                           pool="attention", output="softplus", masked=False, gate_a=True),
    "d88aa38": ForkVersion(("d88aa38", "0d94f80"), "2025-09-08 13:42-23:02",
                           pool="attention", output="softplus", gate_a=True),
    "0872bb8": ForkVersion(("0872bb8",), "2025-09-09 09:28",
                           pool="attention", output="softplus", clip=30.0, gate_a=True),
    "1476b25": ForkVersion(("1476b25", "8ce81be", "3b2d27b", "d1e1552", "add300b", "fcf0a90",
                            "93f335b", "c7699c3", "4efe6f0"), "2025-09-09 13:57-16:13",
                           pool="attention", output="logistic"),
    "cb32c95": ForkVersion(("cb32c95",), "2025-09-09 15:12",
                           pool="attention", output="logistic", clip=30.0),
    "a160fc3": ForkVersion(("a160fc3",), "2025-09-09 15:28", pool="raw", output="logistic"),
    "08a0296": ForkVersion(("08a0296",), "2025-09-09 15:43", pool="energy", output="logistic"),
    "1ce7b69": ForkVersion(("1ce7b69",), "2025-09-10 14:42", pool="attention", output="sigmoid"),
    # the final model (unchanged since; finetune_Energy.py trained it)
    "e161e36": ForkVersion(("e161e36", "f552e94", "bbfa16a", "499f82e", "761d5bf"),
                           "2025-09-10 15:26-2025-09-13 (final)", pool="energy", output="sigmoid"),
}
FORK_ALIASES = {"final": "e161e36"}
FORK_BROKEN = ("d06f869", "01359d9", "a65df8f", "fce172a")


def resolve_fork_version(name: str) -> tuple[str, ForkVersion]:
    """(key, version) of ``name``: a key of :data:`FORK_VERSIONS`, ``"final"``, or any commit
    (7 or more hex digits) listed in a version's ``commits``."""
    if not isinstance(name, str):
        raise TypeError(f"fork_version: expected a str (a key of FORK_VERSIONS, 'final' or a "
                        f"fork commit), got {type(name).__name__}")
    key = FORK_ALIASES.get(name, name)
    if key in FORK_VERSIONS:
        return key, FORK_VERSIONS[key]
    if len(name) >= 7:
        for k, v in FORK_VERSIONS.items():
            if name[:7] in v.commits:
                return k, v
        if name[:7] in FORK_BROKEN:
            raise ValueError(f"fork_version: commit {name!r} of the fork cannot run (its "
                             "forward or __init__ reads an undefined name): it wrote no checkpoint")
    raise ValueError(f"fork_version: expected 'final', one of {sorted(FORK_VERSIONS)} or a "
                     f"commit they list, got {name!r}")


def fork_transform(raw: torch.Tensor, output: str, clip: float | None = None) -> torch.Tensor:
    """A fork version's transform: ``clip * tanh(raw / clip)`` first when ``clip``, then
    :func:`output_transform` or ``logistic`` (sigmoid(x) + 1e-6). Elementwise."""
    if clip is not None:
        raw = clip * torch.tanh(raw / clip)
    if output == "logistic":
        return torch.sigmoid(raw) + 1e-6
    return output_transform(raw, output)


def fork_scores(w, context: torch.Tensor, pad_mask: torch.Tensor | None,
                candidates: torch.Tensor, version: ForkVersion) -> torch.Tensor:
    """Energies (B, C) of candidates (B, C, H, Da) against context (B, S, D) as ``version``
    computes them, on the weights ``w`` (:class:`EnergyWeights`; ``gate_a`` ignored, as every
    version ignores it): the encoders and the attention are those of
    ``energy_scores_reference`` (a masked key contributes nothing; the version's ``masked``
    False drops the mask), then the version's pooling and transform. Eager, in the weights'
    dtype. For a version with ``fused`` True this equals ``energy_scores_reference``."""
    B, C, H, _ = candidates.shape
    E, dt = w.hidden, w.dtype
    if not version.masked:
        pad_mask = None
    W, b = w.in_proj_weight, w.in_proj_bias
    x = context.to(dt)
    if pad_mask is not None:
        x = x.masked_fill(pad_mask[:, :, None], 0.0)
    c = mlp_resnet_reference(x, w.state)                                      # (B, S, E)
    k, v = F.linear(c, W[E:2 * E], b[E:2 * E]), F.linear(c, W[2 * E:], b[2 * E:])
    a = mlp_resnet_reference(candidates.to(dt), w.action) + w.pe[:H].to(dt)  # (B, C, H, E)
    q = F.linear(a, W[:E], b[:E]).reshape(B, C * H, E)
    z = energy_attention_reference(q, k, v, pad_mask, w.heads)
    z = F.linear(z, w.out_proj_weight, w.out_proj_bias).reshape(B, C, H, E)
    if version.pool == "attention":                  # pool the steps, head once
        return fork_transform(mlp_resnet_reference(z.mean(dim=2), w.head)[..., 0],
                              version.output, version.clip)
    raw = mlp_resnet_reference(z, w.head)[..., 0]                               # (B, C, H)
    if version.pool == "raw":
        return fork_transform(raw.mean(dim=-1), version.output, version.clip)
    return fork_transform(raw, version.output, version.clip).mean(dim=-1)


class PositionalEncoding(nn.Module):
    """x + P[:H]: P[t, 2i] = sin(t / 10000^(2i/hidden)), P[t, 2i+1] = cos(same)."""

    def __init__(self, hidden: int, max_len: int = 512):
        super().__init__()
        check_int("hidden", hidden, low=1)
        check_int("max_len", max_len, low=1)
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        freq = torch.pow(10000.0, torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
        table = torch.zeros(max_len, hidden, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos / freq)
        table[:, 1::2] = torch.cos(pos / freq)[:, : hidden // 2]
        # kept in float64 until the module is cast; used in the dtype of x
        self.register_buffer("P", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = x.shape[-2]
        if H > self.P.shape[0]:
            raise ValueError(f"actions: at most {self.P.shape[0]} chunk steps, got {H}")
        return x + self.P[:H].to(x.dtype)


class EnergyModel(nn.Module):
    """forward(context (B, S, D), actions (B, H, Da), pad_mask (B, S) bool True=ignore) -> (B, 1).

    ``score(context, pad_mask, candidates (B, C, H, Da)) -> (B, C)`` encodes each context once
    (state encoder and K/V projections) and scores all C candidates against it; ``forward`` is
    ``score`` with C = 1. Energy = mean over the H steps of ``output(head(z_h))`` (the module
    docstring's formula; the fork's final model with ``output="sigmoid"``).

    ``fork_version``: one of :data:`FORK_VERSIONS` (or ``"final"``, or a fork commit): the
    state_dict layout (``gate_a`` only where that version has it, as a buffer: no version's
    forward reads it) and the forward (pooling, clip, transform, pad mask) of that version;
    ``output`` then defaults to the version's and may not differ. Versions other than the
    final one run eagerly (``ops.energy_scores`` sends them to :meth:`score`).

    ``action_residual=True`` (this package's, no fork version): the prediction head reads
    ``attention output + gate_a * encoded action`` (gate_a a learnable scalar, 0.1 at init),
    so the energy still depends on the candidate when the attention weights are uniform (e.g.
    after the backbone's context rows collapse); without it the action reaches the energy ONLY
    through the attention weights. The fused kernels do not implement it
    (``ops.energy_scores`` runs such a model eagerly).
    """

    def __init__(self, state_dim: int, act_dim: int, hidden: int = 512, heads: int = 8,
                 activation: str = "silu", output: str | None = None, max_steps: int = 512,
                 action_residual: bool = False, fork_version: str | None = None):
        super().__init__()
        for name, v in (("state_dim", state_dim), ("act_dim", act_dim), ("hidden", hidden),
                        ("heads", heads), ("max_steps", max_steps)):
            check_int(name, v, low=1)
        check_multiple("hidden", hidden, "heads", heads)
        self.fork_version, self.version = None, None
        if fork_version is not None:
            self.fork_version, self.version = resolve_fork_version(fork_version)
            if output is not None and output != self.version.output:
                raise ValueError(f"output: fork_version={fork_version!r} computes "
                                 f"{self.version.output!r}, got {output!r}")
            if action_residual:
                raise ValueError(f"action_residual: no fork version uses gate_a in its forward "
                                 f"(fork_version={fork_version!r}); expected False, got True")
            output = self.version.output
        output = "unbounded" if output is None else output
        check_choice("output", output, FORK_OUTPUTS if self.version is not None else OUTPUTS)
        self.state_dim, self.act_dim, self.hidden, self.heads = state_dim, act_dim, hidden, heads
        self.output = output
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.pe_layer = PositionalEncoding(hidden, max_steps)
        self.state_linear = MLPResNet(1, state_dim, hidden, hidden, activation)
        self.action_linear = MLPResNet(1, act_dim, hidden, hidden, activation)
        self.prediction_head = MLPResNet(2, hidden, hidden, 1, activation)
        self.action_residual = bool(action_residual)
        if self.action_residual:
            self.gate_a = nn.Parameter(torch.tensor(0.1))
        elif self.version is not None and self.version.gate_a:
            # the fork's unused nn.Parameter: a buffer here (same key, no unused parameter for DDP)
            self.register_buffer("gate_a", torch.tensor(0.1))
        else:
            self.gate_a = None

    @property
    def dtype(self) -> torch.dtype:
        return self.cross.in_proj_weight.dtype

    @property
    def fused(self) -> bool:
        """True when the standard path computes this model (``energy_scores_reference`` and
        the fused kernels): not a historic fork forward, no action residual."""
        return (self.version is None or self.version.fused) and not self.action_residual

    def extra_repr(self) -> str:
        fv = f", fork_version={self.fork_version!r}" if self.fork_version else ""
        return (f"output={self.output!r}, action_residual={self.action_residual}{fv}")

    def check_chunks(self, name: str, t, ndim: int, batch: int | None = None) -> None:
        """``t`` holds action chunks (B, H, Da) (ndim 3) or (B, C, H, Da) (ndim 4) for this model:
        floating, Da = act_dim, 1 <= H <= the positional table's length, B = ``batch``."""
        check_tensor(name, t, ndim=ndim, shape={0: batch, ndim - 1: self.act_dim}, floating=True)
        check_nonempty(name, t, ndim - 2, "chunk step")
        if t.shape[-2] > self.pe_layer.P.shape[0]:  # both backends index the table
            raise ValueError(f"{name}: at most {self.pe_layer.P.shape[0]} chunk steps "
                             f"(dim {ndim - 2}), got shape {tuple(t.shape)}")

    def check_inputs(self, context, pad_mask, candidates) -> None:
        """Shape/dtype/device checks (metadata only, no host sync). No sample (B = 0) or no
        candidate (C = 0) gives an empty (B, C) result; no context key (S = 0) or no chunk step
        (H = 0) is an error."""
        check_tensor("context", context, ndim=3, shape={2: self.state_dim}, floating=True)
        check_nonempty("context", context, 1, "key")
        B, S = context.shape[:2]
        self.check_chunks("candidates", candidates, 4, B)
        if pad_mask is not None:
            check_tensor("pad_mask", pad_mask, ndim=2, shape={0: B, 1: S}, dtype=torch.bool)
        check_same_device(context=context, pad_mask=pad_mask, candidates=candidates)
        w = next(self.parameters(), None)
        if w is not None and w.device != context.device:
            raise ValueError(f"context: on {context.device}, the energy model's weights on "
                             f"{w.device}; move the inputs to the model's device (or the model: "
                             "energy_model.to(device))")

    def score(self, context, pad_mask, candidates) -> torch.Tensor:
        """Energies (B, C): the maths is ``energy_scores_reference`` (kernels/energy), on this
        module's weights; a historic fork version's forward: :func:`fork_scores`."""
        self.check_inputs(context, pad_mask, candidates)
        if self.version is not None and not self.version.fused:
            return fork_scores(energy_weights(self), context, pad_mask, candidates, self.version)
        return energy_scores_reference(energy_weights(self), context, pad_mask, candidates)

    def forward(self, context, actions, pad_mask=None) -> torch.Tensor:
        check_tensor("context", context, ndim=3)
        self.check_chunks("actions", actions, 3, context.shape[0])
        return self.score(context, pad_mask, actions.unsqueeze(1))


# prefixes of the fork's layouts that are other architectures than this module's
_OTHER_LAYOUTS = {"energy_bc.": "a relative-attention stack (energy_bc, before 2025-09-07 14:31)",
                  "action_proj.": "an MLP over [context, action] (August-early September 2025)",
                  "model.": "an MLP over [context, action] (August-early September 2025)",
                  "cls_token": "a CLS-token self-attention stack (2025-09-06/07)"}


def load_fork_energy(state_dict: Mapping | str, fork_version: str = "final", *, heads: int = 8,
                     **kwargs) -> EnergyModel:
    """An :class:`EnergyModel` built for ``fork_version`` with the sizes of a fork checkpoint
    (a state_dict or the path of one, e.g. ``energy_model--{step}_checkpoint.pt``; a DDP
    ``module.`` prefix is dropped), its weights loaded strictly. ``heads`` is not in the
    state_dict: the fork's is 8. ``gate_a`` in the checkpoint and in the version must agree
    (the error names the versions that have it). ``kwargs`` go to EnergyModel (e.g.
    ``max_steps``)."""
    from .action_head import strip_module_prefix
    if isinstance(state_dict, (str, bytes)) or hasattr(state_dict, "__fspath__"):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    sd = strip_module_prefix(state_dict)
    for prefix, what in _OTHER_LAYOUTS.items():
        if any(k.startswith(prefix) for k in sd):
            raise ValueError(f"state_dict: keys {prefix!r}... are the fork's {what}, another "
                             "architecture than EnergyModel (cross, state_linear, action_linear, "
                             "prediction_head)")
    need = ("state_linear.layer_norm1.weight", "action_linear.layer_norm1.weight",
            "cross.in_proj_weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"state_dict: expected the fork's EnergyModel keys, missing {missing}")
    key, version = resolve_fork_version(fork_version)
    has_gate = "gate_a" in sd
    if has_gate != version.gate_a:
        gated = sorted(k for k, v in FORK_VERSIONS.items() if v.gate_a)
        raise ValueError(
            f"fork_version: {fork_version!r} ({version.dates}) has "
            f"{'a' if version.gate_a else 'no'} 'gate_a', the checkpoint "
            f"{'has one' if has_gate else 'has none'}; the versions with gate_a are {gated} "
            f"(7-9 Sep 2025), the others have none")
    model = EnergyModel(int(sd["state_linear.layer_norm1.weight"].shape[0]),
                        int(sd["action_linear.layer_norm1.weight"].shape[0]),
                        hidden=int(sd["cross.in_proj_weight"].shape[1]), heads=heads,
                        fork_version=key, **kwargs)
    model.load_state_dict(sd, strict=True)
    return model
