"""Hidden-state capture without the full stack: forward hooks that keep only what the energy
phase needs, in preallocated buffers.

The energy phase needs the action-token rows of every hidden state (the negatives) and the
context rows of the last one. ``output_hidden_states=True`` keeps L+1 full (B, T, D) tensors
alive for that; :class:`HiddenStateCapture` copies just those rows as each layer finishes::

    cap = HiddenStateCapture.for_decoder(*policy.decoder())   # or .for_model(model)
    with cap.armed(action_index, context_index, slot=("phase2", k % 2)) as got:
        model(...)                                # no output_hidden_states
    got.action_rows   # (L+1, B, N, D): row j of state l = state_l[b, action_index[b, j]]
    got.context       # (B, S, D): row s = the last state's row context_index[b, s]

The L+1 capture points follow the Hugging Face ``output_hidden_states`` convention, so the
rows are bitwise the ones :func:`gather_hidden_states` takes from that tuple:

- a model with ``hidden_state_modules()`` (TinyVLA): the OUTPUT of each of those modules;
- a decoder (a ModuleList of layers beside a final norm: ``model.layers`` + ``model.norm``,
  ``model.model.layers``, ``transformer.h`` + ``ln_f``, ...; found by :func:`find_decoder` or
  given): state 0 = the INPUT of layer 0 (the embeddings), state i = the output of layer i-1
  (a tensor, or a tuple whose item 0 is the hidden state) for i < L, state L = the final
  norm's output.

Arming is per call: ``armed`` makes one object that the hooks write through; outside it (and
on any thread but the arming one - e.g. an activation-checkpoint recompute inside the
autograd engine) the hooks do nothing. Each point must fire exactly once per armed forward,
else ``armed`` raises on exit. With ``slot=`` the buffers are allocated once per slot and
reused (the trainer double-buffers: slot parity = step % 2); ``slot=None`` allocates fresh
ones (results stay valid after later forwards). Copies run on the current CUDA stream.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Hashable, Sequence

import torch
from torch import nn

from .tensors import gather_rows

NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


class CapturedStates:
    """What one armed forward captured (filled while the forward runs)."""
    __slots__ = ("action_rows", "context")

    def __init__(self, action_rows: torch.Tensor | None = None, context: torch.Tensor | None = None):
        self.action_rows = action_rows  # (L+1, B, N, D)
        self.context = context          # (B, S, D)

    def __iter__(self):  # unpacks like the former NamedTuple
        return iter((self.action_rows, self.context))


def find_decoder(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """(layers, final norm) of an HF-style decoder: the longest ModuleList whose parent also
    holds a final norm (``norm``, ``final_layernorm``, ``ln_f``, ...)."""
    best = None
    for name, parent in model.named_modules():
        norm = next((getattr(parent, n) for n in NORM_NAMES
                     if isinstance(getattr(parent, n, None), nn.Module)), None)
        if norm is None:
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and (best is None or len(child) > len(best[0])):
                best = (child, norm)
    if best is None:
        raise ValueError(f"capture: found no decoder in {type(model).__name__} (a ModuleList of "
                         f"layers beside a final norm named one of {NORM_NAMES}); pass "
                         "layers= and norm= explicitly")
    return best


def layer_output(out) -> torch.Tensor:
    """A layer's (B, T, D) hidden state from its forward's output (a tensor or a tuple led by it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Armed:
    __slots__ = ("index", "context_index", "out", "fired", "thread", "slot")

    def __init__(self, index, context_index, out, slot):
        self.index, self.context_index, self.out, self.slot = index, context_index, out, slot
        self.fired = []
        self.thread = threading.get_ident()


class HiddenStateCapture:
    """Forward hooks at the L+1 capture points (see the module docstring).

    points: (module, "input" | "output") pairs, in hidden-state order.
    """

    def __init__(self, points: Sequence[tuple[nn.Module, str]]):
        if not points:
            raise ValueError("capture: expected at least one capture point")
        self.points = list(points)
        self._armed: _Armed | None = None
        self._pool: dict[Hashable, CapturedStates] = {}
        self._handles = []
        for i, (module, where) in enumerate(self.points):
            if where == "output":
                self._handles.append(module.register_forward_hook(self._out_hook(i)))
            elif where == "input":
                self._handles.append(module.register_forward_pre_hook(self._in_hook(i), with_kwargs=True))
            else:
                raise ValueError(f"capture point {i}: expected 'input' or 'output', got {where!r}")

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: nn.Module, *, layers: Sequence[nn.Module] | None = None,
                  norm: nn.Module | None = None) -> "HiddenStateCapture":
        if layers is None and hasattr(model, "hidden_state_modules"):
            return cls([(m, "output") for m in model.hidden_state_modules()])
        if layers is None or norm is None:
            found_layers, found_norm = find_decoder(model)
            layers = found_layers if layers is None else layers
            norm = found_norm if norm is None else norm
        return cls.for_decoder(layers, norm)

    @classmethod
    def for_decoder(cls, layers: Sequence[nn.Module], norm: nn.Module) -> "HiddenStateCapture":
        layers = list(layers)
        return cls([(layers[0], "input"), *[(m, "output") for m in layers[:-1]], (norm, "output")])

    @property
    def num_states(self) -> int:
        return len(self.points)

    # ---- hooks ----------------------------------------------------------------------------
    def _active(self) -> _Armed | None:
        a = self._armed
        return a if a is not None and a.thread == threading.get_ident() else None

    def _out_hook(self, i: int):
        def hook(module, inputs, out):
            a = self._active()
            if a is not None:
                self._store(a, i, layer_output(out))
        return hook

    def _in_hook(self, i: int):
        def hook(module, args, kwargs):
            a = self._active()
            if a is not None:
                self._store(a, i, args[0] if args else kwargs["hidden_states"])
        return hook

    def _store(self, a: _Armed, i: int, h: torch.Tensor) -> None:
        if a.out.action_rows is None:
            self._allocate(a, h)
        with torch.no_grad():
            gather_rows(h, a.index, a.out.action_rows[i])
            if i == self.num_states - 1:
                gather_rows(h, a.context_index, a.out.context)
        a.fired.append(i)

    def _allocate(self, a: _Armed, h: torch.Tensor) -> None:
        """Buffers shaped from the first captured state (its dtype, device and D)."""
        (B, N), S = a.index.shape, a.context_index.shape[1]
        shapes = ((self.num_states, B, N, h.shape[-1]), (B, S, h.shape[-1]))
        if a.slot is not None:
            buf = self._pool.get(a.slot)
            if buf is None or (tuple(buf.action_rows.shape), tuple(buf.context.shape)) != shapes \
                    or buf.context.dtype != h.dtype or buf.context.device != h.device:
                buf = CapturedStates(*(torch.empty(s, dtype=h.dtype, device=h.device) for s in shapes))
                self._pool[a.slot] = buf
        else:
            buf = CapturedStates(*(torch.empty(s, dtype=h.dtype, device=h.device) for s in shapes))
        a.out.action_rows, a.out.context = buf.action_rows, buf.context

    # ---- arming ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def armed(self, action_index: torch.Tensor, context_index: torch.Tensor | int,
              dtype: torch.dtype | None = None, d_model: int | None = None, *,
              slot: Hashable | None = None):
        """Capture during the forward(s) run inside; yields a :class:`CapturedStates`.
        action_index (B, N) int64 positions; context_index (B, S) int64 positions of the
        context rows (an int S: the first S rows). ``dtype``/``d_model`` given: allocate now
        (else from the first captured state). ``slot``: reuse that slot's buffers (overwritten
        by the next forward armed with the same slot)."""
        if self._active() is not None:
            raise RuntimeError("capture: already armed on this thread (nested forwards?)")
        a = _Armed(action_index, _context_index(context_index, action_index), CapturedStates(), slot)
        if dtype is not None and d_model is not None:
            self._allocate(a, torch.empty(0, d_model, dtype=dtype, device=action_index.device))
        self._armed = a
        try:
            yield a.out
        except BaseException:
            self._armed = None
            raise
        self._armed = None
        if sorted(a.fired) != list(range(self.num_states)):
            raise RuntimeError(f"capture: expected each of the {self.num_states} capture points to "
                               f"fire once in the armed forward, got {sorted(a.fired)}")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pool.clear()


def _context_index(context_index, action_index: torch.Tensor) -> torch.Tensor:
    if isinstance(context_index, torch.Tensor):
        return context_index
    B = action_index.shape[0]
    return torch.arange(int(context_index), device=action_index.device).expand(B, int(context_index))


def gather_hidden_states(hidden_states: Sequence[torch.Tensor], action_index: torch.Tensor,
                         context_index: torch.Tensor | int) -> CapturedStates:
    """The ``output_hidden_states`` path: the same rows taken from L+1 full (B, T, D) states."""
    cidx = _context_index(context_index, action_index)
    with torch.no_grad():
        rows = torch.stack([gather_rows(h, action_index) for h in hidden_states])
        return CapturedStates(rows, gather_rows(hidden_states[-1], cidx))
