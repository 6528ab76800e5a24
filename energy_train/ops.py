"""The one place that dispatches between each op's eager reference
(``kernels/<op>/reference.py``) and its fused Triton path. Both take tensors: the ops here take
the modules and map them through the one walker, :mod:`energy_train.models.weights`.

``backend``: ``"auto"`` runs what :data:`AUTO` says for the op and the device class - the
path a committed GPU measurement showed faster, never one no figure shows winning;
``"eager"`` forces the PyTorch path; ``"triton"`` forces the kernel (on a CPU tensor only under
``TRITON_INTERPRET=1``; otherwise a clear error). Benchmarks time every provider regardless.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .checks import check_bool, check_finite, check_int, check_same_device, check_tensor
from .kernels._utils import interpreting
from .kernels.energy import energy_scores_reference, energy_scores_triton
from .kernels.layer_actions import layer_actions_reference, layer_actions_triton
from .models import EnergyModel, L1RegressionActionHead
from .models.weights import action_head_weights, energy_weights

BACKENDS = ("auto", "eager", "triton")

#: What ``backend="auto"`` runs, per (op, device class, dtype), and the measurement that put
#: it there. Device classes: "cpu", "cuda"; dtype: the head's / energy model's ("*": any).
#: A Triton path is chosen only where a committed GPU figure (bench/results/) shows it faster
#: than the eager path on the same inputs in the same run. torch.compile is not a backend
#: here: compiling the caller's eager loss is the user's choice (on the H200 it beat both paths
#: of the energy op at commit 683d510: 4.96 ms fp32 512/8, 4.87 ms bf16; NOTES.md).
AUTO = {
    ("layer_actions", "cpu", "*"): ("eager", "the Triton path runs only under the interpreter"),
    ("energy", "cpu", "*"): ("eager", "the Triton path runs only under the interpreter"),
    ("layer_actions", "cuda", "*"): (
        "triton", "H200, commit 683d510 (bench/results/layer_actions-h200.md): production "
        "shape, bf16 head: eager batched 5.44 ms, torch.compile 1.147 ms, triton 1.25 ms, with "
        "cuBLAS GEMMs 1.140 ms (the CUDA default, kernels/layer_actions/op.py)"),
    ("energy", "cuda", "*"): (
        "eager", "H200, commit 683d510 (bench/results/energy-h200.md): swap fwd+bwd, fp32 "
        "model: 512/8 eager 5.83 ms, triton 10.1 ms; 1024/16 eager 8.03, triton 30.5 ms"),
    ("energy", "cuda", "bfloat16"): (
        "triton", "H200, commit 683d510 (bench/results/energy-h200.md): swap fwd+bwd, bf16 "
        "model, 512/8: eager 5.83 ms (p20-p80 5.70-6.12), triton 5.61 ms (5.60-5.62)"),
}


def auto_backend(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What ``backend="auto"`` runs for ``op`` on ``device`` with weights of ``dtype``
    (:data:`AUTO`; the "*" entry where the dtype has none; eager where the table has none)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    name = str(dtype).split(".")[-1] if dtype is not None else "*"
    entry = AUTO.get((op, kind, name)) or AUTO.get((op, kind, "*"), ("eager", ""))
    return entry[0]


#: the ops with a fused path: (reference, fused) each
_PATHS = {"layer_actions": (layer_actions_reference, layer_actions_triton),
          "energy": (energy_scores_reference, energy_scores_triton)}


def resolve_backend(op: str, backend: str, device: torch.device,
                    dtype: torch.dtype | None = None) -> str:
    """'eager' or 'triton' for ``op`` on ``device`` (weights of ``dtype``); raises a clear
    error when impossible."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return "eager"
    available = op in _PATHS
    if backend == "auto":
        return auto_backend(op, device, dtype) if available else "eager"
    if not available:
        raise NotImplementedError(f"{op}: no Triton kernel for this op; use backend='eager'")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (got {device}); on the CPU set "
            "TRITON_INTERPRET=1 to run the kernel under the Triton interpreter")
    return "triton"


def _path(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None):
    """The function that computes ``op``: its reference (eager) or its fused path."""
    reference, fused = _PATHS[op]
    return fused if resolve_backend(op, backend, device, dtype) == "triton" else reference


# --------------------------------------------------------------------------------------------
# action index
# --------------------------------------------------------------------------------------------
def build_action_index(*, num_tokens: int, mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, action_token_begin_idx: int | None = None,
                       start: int | torch.Tensor | None = None, batch_size: int | None = None,
                       offset: int = 0, device=None, validate: bool = False) -> torch.Tensor:
    """The (B, num_tokens) int64 positions of the action tokens, in chunk order. Computed once
    per batch and shared by every layer; no host synchronisation (no ``nonzero``).

    Give exactly one layout:
      - ``mask`` (B, T) bool, True at the action tokens (exactly ``num_tokens`` per row);
      - ``labels`` (B, T) with action tokens ``> action_token_begin_idx`` (OFT's convention);
      - ``start`` (int or (B,) tensor): the action tokens are ``start .. start+num_tokens-1``.
    ``offset`` is added to every position (OFT gathers from ``hidden[:, num_patches:-1]`` with a
    mask on ``labels[:, 1:]``; with the full labels that is ``offset = num_patches - 1``).
    ``validate=True`` checks (with a host sync) that every row holds ``num_tokens`` of them.
    """
    given = [x is not None for x in (mask, labels, start)]
    if sum(given) != 1:
        raise ValueError("build_action_index: give exactly one of mask=, labels=, start=")
    check_int("num_tokens", num_tokens, low=1)
    check_int("offset", offset)
    check_bool("validate", validate)
    if labels is not None:
        if action_token_begin_idx is None:
            raise ValueError("build_action_index: labels= needs action_token_begin_idx=")
        check_int("action_token_begin_idx", action_token_begin_idx)
        check_tensor("labels", labels, ndim=2, integer=True)
        mask = labels > action_token_begin_idx
    if mask is not None:
        check_tensor("mask", mask, ndim=2, dtype=torch.bool)
        if num_tokens > mask.shape[1]:
            raise ValueError(f"num_tokens: expected <= {mask.shape[1]} (mask width), got {num_tokens}")
        if validate:
            counts = mask.sum(dim=1)
            if bool((counts != num_tokens).any()):
                raise ValueError(f"mask: expected {num_tokens} action tokens per row, got "
                                 f"{counts.tolist()}")
        # stable sort of (not action) puts the action positions first, in increasing order
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        return order[:, :num_tokens].to(torch.int64) + offset
    if isinstance(start, torch.Tensor):
        check_tensor("start", start, ndim=1, integer=True)
        base = start.to(torch.int64)[:, None]
        dev = start.device
    else:
        if batch_size is None:
            raise ValueError("build_action_index: start=<int> needs batch_size=")
        check_int("start", start, low=0)
        check_int("batch_size", batch_size, low=0)
        base = torch.full((batch_size, 1), int(start), dtype=torch.int64, device=device)
        dev = base.device
    return base + torch.arange(num_tokens, device=dev, dtype=torch.int64)[None, :] + offset


# --------------------------------------------------------------------------------------------
# layer actions (the negatives)
# --------------------------------------------------------------------------------------------
def _as_layers(hidden_states) -> Sequence[torch.Tensor]:
    if isinstance(hidden_states, torch.Tensor):
        check_tensor("hidden_states", hidden_states, ndim=4)
        return hidden_states.unbind(0)
    if not isinstance(hidden_states, (list, tuple)) or not hidden_states:
        raise TypeError("hidden_states: expected a non-empty tuple/list of (B, T, D) tensors or "
                        f"an (L+1, B, T, D) tensor, got {type(hidden_states).__name__}")
    return hidden_states


def select_layers(n_states: int, layers: Iterable[int] | None, include_embeddings: bool) -> list[int]:
    """Indices into the L+1 hidden states. Default: every layer; entry 0 (the embeddings, which
    OFT zeroes at the action positions, so its action is constant) only if asked for."""
    if layers is None:
        return list(range(0 if include_embeddings else 1, n_states)) or [0]
    out = []
    for i, l in enumerate(layers):
        check_int(f"layers[{i}]", l)
        if not -n_states <= l < n_states:
            raise ValueError(f"layers: index {l} out of range for {n_states} hidden states")
        out.append(int(l) % n_states)
    if not out:
        raise ValueError("layers: expected at least one layer")
    return out


def check_final_norm(final_norm, D: int) -> None:
    """``final_norm`` (the logit lens: the backbone's final norm on intermediate layers) is None
    or a module normalising width D (a LayerNorm's normalized_shape, an RMSNorm's weight)."""
    if final_norm is None:
        return
    if not callable(final_norm):
        raise TypeError(f"final_norm: expected the backbone's final norm (a module) or None, got "
                        f"{type(final_norm).__name__}")
    shape = getattr(final_norm, "normalized_shape", None)
    w = getattr(final_norm, "weight", None)
    width = (tuple(shape) if shape is not None else
             tuple(w.shape) if isinstance(w, torch.Tensor) and w.dim() == 1 else None)
    if width is not None and width != (D,):
        raise ValueError(f"final_norm: normalises shape {width} ({type(final_norm).__name__}), the "
                         f"hidden states have D = {D}: pass the backbone's own final norm "
                         "(Policy.decoder()[1])")


_LAYER_AXES = "_energy_train_layer_actions"  # marks (L, B, H, Da) outputs (losses refuse them)


def mark_layer_actions(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as layer actions (L, B, H, Da), layers first: the losses that take negatives
    (B, M, H, Da) refuse it even when L == B (same shape, axes swapped)."""
    if not torch.compiler.is_compiling():
        setattr(t, _LAYER_AXES, True)
    return t


def is_layer_actions(t) -> bool:
    if torch.compiler.is_compiling():  # a traced tensor carries no mark (none is set either)
        return False
    return isinstance(t, torch.Tensor) and getattr(t, _LAYER_AXES, False) is True


@torch.no_grad()
def layer_actions(hidden_states, action_index: torch.Tensor | None, head: L1RegressionActionHead,
                  layers: Iterable[int] | None = None, *, include_embeddings: bool = False,
                  final_norm: torch.nn.Module | None = None, backend: str = "auto",
                  validate: bool = False) -> torch.Tensor:
    """Run the action head on the action-token rows of every selected layer -> (L', B, H, Da).

    hidden_states: L+1 tensors (B, T, D) (the ``output_hidden_states`` convention) or one
      (L+1, B, T, D) tensor. Rows are gathered straight from each layer by ``action_index``
      (B, H*Da) (see :func:`build_action_index`); with ``action_index=None`` every layer must
      already hold just the H*Da action rows in chunk order (T = H*Da, e.g. hook capture).
    layers: indices into hidden_states; default every layer but the embeddings (entry 0),
      unless ``include_embeddings``.
    final_norm: the backbone's final norm, applied "logit-lens" style to every selected layer
      except the last hidden state (which the backbone has already normalised).
    Runs under no_grad; output dtype is the head's; B = 0 gives an empty (L', 0, H, Da) result.
    An ``action_index`` entry outside [0, T) reads a row of zeros, on both backends (the fused
    path bounds its loads: it never reads outside that sample's row of that layer);
    ``validate=True`` raises instead (a host sync).
    """
    if not isinstance(head, L1RegressionActionHead):
        raise TypeError(f"head: expected an L1RegressionActionHead, got {type(head).__name__}")
    check_bool("include_embeddings", include_embeddings)
    check_bool("validate", validate)
    states = _as_layers(hidden_states)
    H, Da, D = head.num_actions_chunk, head.action_dim, head.input_dim
    B = states[0].shape[0] if states[0].dim() == 3 else None
    for i, h in enumerate(states):
        check_tensor(f"hidden_states[{i}]", h, ndim=3, shape={0: B, 2: D}, floating=True)
    if action_index is None:
        for i, h in enumerate(states):
            check_tensor(f"hidden_states[{i}] (action_index=None: rows already gathered)", h,
                         shape={1: H * Da})
    else:
        check_tensor("action_index", action_index, ndim=2, shape={0: B, 1: H * Da}, integer=True)
        check_same_device(hidden_states=states[0], action_index=action_index)
        if validate:
            T = states[0].shape[1]
            if bool(((action_index < 0) | (action_index >= T)).any()):
                raise ValueError(f"action_index: positions must lie in [0, {T})")
    check_final_norm(final_norm, D)
    idx = select_layers(len(states), layers, include_embeddings)
    norm_mask = [final_norm is not None and l != len(states) - 1 for l in idx]
    fn = _path("layer_actions", backend, states[0].device)
    return mark_layer_actions(fn([states[l] for l in idx], action_index, action_head_weights(head),
                                 final_norm=final_norm, norm_mask=norm_mask))


# --------------------------------------------------------------------------------------------
# energies of many candidates against a context encoded once
# --------------------------------------------------------------------------------------------
def check_energy_inputs(energy_model, context, pad_mask, candidates, validate: bool = False):
    if not isinstance(energy_model, EnergyModel):
        raise TypeError(f"energy_model: expected an EnergyModel, got {type(energy_model).__name__}")
    energy_model.check_inputs(context, pad_mask, candidates)
    if check_bool("validate", validate):
        check_finite("context", context)
        check_finite("candidates", candidates)
        if pad_mask is not None and bool(pad_mask.all(dim=1).any()):
            rows = pad_mask.all(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"pad_mask: samples {rows} mask every key (True = ignore); "
                             "their attention output would be zero")


def energy_scores(energy_model: EnergyModel, context: torch.Tensor, pad_mask: torch.Tensor | None,
                  candidates: torch.Tensor, *, backend: str = "auto",
                  validate: bool = False) -> torch.Tensor:
    """Energies (B, C) of candidates (B, C, H, Da) against context (B, S, D).

    Each context is encoded once (state encoder + K/V projections), whatever C is.
    pad_mask (B, S) bool, True = ignore that key. A sample with every key masked attends to
    nothing (its attention output is zero); ``validate=True`` raises instead, and also checks
    context and candidates for NaN/inf (these value checks synchronise with the host).
    A model with ``action_residual=True`` or a historic ``fork_version`` (one whose forward
    pools or transforms otherwise than the final fork's) runs eagerly: the fused kernels
    compute only the standard model.
    """
    check_energy_inputs(energy_model, context, pad_mask, candidates, validate)
    if not energy_model.fused:
        # the fused kernels have no action-residual term (z + gate_a * encoded action) and only
        # the per-step transform: such a model runs its eager maths under "auto"; an explicit
        # "triton" is an error
        if backend == "triton":
            what = ("EnergyModel(action_residual=True)" if energy_model.action_residual else
                    f"EnergyModel(fork_version={energy_model.fork_version!r})")
            raise NotImplementedError(f"energy_scores: backend='triton' does not implement "
                                      f"{what}; use 'auto' or 'eager'")
        resolve_backend("energy", backend, context.device)  # a bad name is still an error
        if not energy_model.action_residual:
            return energy_model.score(context, pad_mask, candidates)
        backend = "eager"
    w = energy_weights(energy_model)
    return _path("energy", backend, context.device, w.dtype)(w, context, pad_mask, candidates)
