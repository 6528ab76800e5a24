"""Live bytes of a step under fake tensors: every storage an op creates is counted (rounded up
to the CUDA caching allocator's 512-byte blocks, as ``torch.cuda.max_memory_allocated`` counts
it) until it is freed, and the peak is kept per region of the step (the trainer's phase timers).

:class:`LiveBytes` is a ``TorchDispatchMode`` pushed above a ``FakeTensorMode``: it sees each op
before the fake mode makes its (storage-less) outputs, then registers every new storage with a
weak reference whose callback subtracts it when the storage dies. Views, in-place ops and
``nn.Parameter`` share a storage and count once.

What a fused op allocates and frees inside its own launcher is invisible to the fake mode (its
registered fake returns the outputs only): :data:`SCRATCH` adds it, as a transient at the op,
from the kernels' own plans (kernels/energy/launch.py: the backward's ``wb``; kernels/
layer_actions/launch.py: the materialised rows and the hidden buffers).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

BLOCK = 512  # the CUDA caching allocator's rounding (c10/cuda/CUDACachingAllocator.cpp)


def rounded(nbytes: int) -> int:
    return 0 if nbytes <= 0 else BLOCK * math.ceil(nbytes / BLOCK)


def _energy_bwd_scratch(args) -> int:
    """energy_train::energy_bwd: the fp32 scratch ``wb`` of its plan (launch.energy_backward)."""
    from ..kernels.energy.op import _plan
    draw, context, pad, pool, flat, ws, dims, eps, activation, precision, dctx, dpool = args[:12]
    _, ep = _plan(context, dims, eps, activation, flat.dtype, dctx, dpool)
    return rounded(4 * max(ep.plan.wb, 1))


def _layer_actions_scratch(args) -> int:
    """energy_train::layer_actions: its launcher's LayerNorm'd rows (M, Da*D) and hidden
    buffers (M, hidden) x 4 (x, normed, spare, cuBLAS's output), M = L' * B * H, in the head's
    dtype (kernels/layer_actions/launch.py)."""
    states, params, H = args[0], args[2], args[6]
    fc1 = params[2]
    hid, k1 = fc1.shape
    M = len(states) * states[0].shape[0] * H
    return rounded(fc1.element_size() * (M * k1 + 4 * M * hid))


#: op name -> bytes its launcher allocates and frees inside (not in the fake's outputs)
SCRATCH = {"energy_train::energy_bwd": _energy_bwd_scratch,
           "energy_train::layer_actions": _layer_actions_scratch}


class LiveBytes(TorchDispatchMode):
    """Counts live storage bytes; ``with tracker.region(name)`` marks a part of the step."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.stack: list[str] = []
        self.region_peak: dict[str, int] = {}  # region (innermost or enclosing) -> peak live
        self.inner_peak: dict[str, int] = {}   # innermost region -> peak live
        self._seen = WeakIdKeyDictionary()
        self.scratch_ops: dict[str, int] = {}

    # ---- counting ------------------------------------------------------------------------------
    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
        for r in self.stack:
            if self.live > self.region_peak.get(r, 0):
                self.region_peak[r] = self.live
        if self.stack and self.live > self.inner_peak.get(self.stack[-1], 0):
            self.inner_peak[self.stack[-1]] = self.live

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = rounded(st.nbytes())
        self._seen[st] = n
        import weakref
        weakref.finalize(st, self._free, n)
        self._add(n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name if hasattr(func, "_schema") else str(func)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        extra = SCRATCH.get(name)
        if extra is not None:
            n = extra(args)
            self.scratch_ops[name] = max(self.scratch_ops.get(name, 0), n)
            self._add(n)   # allocated inside the launcher...
            self._free(n)  # ...and freed before it returns
        return out

    # ---- regions -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def region(self, name: str):
        self.stack.append(name)
        self._add(0)
        try:
            yield
        finally:
            self.stack.pop()

    def reset_peaks(self) -> int:
        """Start a new measurement: peaks from the bytes live now, which are returned."""
        self.peak = self.live
        self.region_peak, self.inner_peak = {}, {}
        return self.live


class RegionTimer:
    """The trainer's PhaseTimer interface, marking the tracker's regions instead of timing."""
    history = None

    def __init__(self, tracker: LiveBytes):
        self.tracker = tracker

    def __call__(self, name: str):
        return self.tracker.region(name)

    def set_step(self, step: int) -> None:
        pass

    def flush(self) -> dict:
        return {}

    def discard(self) -> None:
        pass
