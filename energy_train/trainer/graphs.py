"""``run.cuda_graphs``: the parts of a step as CUDA graphs, replayed from static buffers.

A step's phases are built from device-only *parts* (:class:`~.core.Trainer`)::

    phase 1:  "theta"      policy fwd WITH grad, head, L1, backward, clip   -> metrics, grads
              (W: wait until phase 2(k-1) stopped reading theta: an event, outside any graph)
              "opt_theta"  theta's AdamW step on those grads (+ zero_grad)
    phase 2:  "phi_read"   no-grad policy fwd (hook capture), negatives    -> context, negatives
              (D: phase 2 stopped reading theta: an event, outside any graph)
              "phi"        energy fwd/bwd per micro-batch, clip, phi's AdamW step -> metrics

A part's body reads only its arguments (device tensors) and the modules and optimizers, and
changes nothing on the host that a replay would have to repeat: what the host must know (that
a side stepped, the events, the timers) the trainer does around the calls. Per part, for each
input signature (shapes, dtypes, strides of the tensor arguments; the other arguments' values):

1. ``WARMUP`` eager calls on the capture stream (a side stream; phase 2 under the overlap is
   already on one): lazy state (AdamW's moments, cuBLAS workspaces, Triton compiles and the
   kernels' per-shape tables, the capture buffers of both step parities) exists before capture;
2. capture: the arguments are copied into static buffers and the body is captured (nothing
   runs), in its own memory pool; then replayed once: the step is done. ``torch.cuda.graph``
   synchronises the device once here (exempt from ``set_sync_debug_mode``: by design, once
   per part and signature; a synchronisation inside the body fails the capture);
3. each later call: the arguments are copied into the static buffers (skipped for a tensor
   that IS the static one - the "opt_theta" grads are "theta"'s outputs, the "phi" inputs
   "phi_read"'s), one replay, and the metrics (the first output, a dict) copied out (the next
   replay overwrites them; the other outputs are the graph's own, valid until its next replay).

The eager calls and the replays launch the same kernels on the same values (the optimizers
are capturable on CUDA either way, :mod:`.optim`), so the metrics are bitwise those of
``cuda_graphs = "off"``. What prevents capture - no CUDA device, data parallelism (DDP/FSDP's
collectives are not captured), a policy that does not declare itself capturable
(``Policy.capturable``: its forward keeps its shapes and never synchronises with the host),
more than ``MAX_SIGNATURES`` input signatures of a part (dynamic shapes), a capture that raised
(e.g. a host synchronisation inside a body) - is named: ``"auto"`` runs that part eagerly and
warns once, ``"on"`` raises :class:`CaptureError`. A step whose host values a graph would bake
in runs eagerly (the trainer's ``eligible``: the energy loss's warm-up weight below 1, phi's
skipped steps). ``"auto"`` ignores the option off CUDA; ``"on"`` there is an error.

``ET_GPU_STANDIN=1`` (the gpu-check dry run, tests) replaces torch.cuda.CUDAGraph by
:class:`StandinGraph` on the CPU: "capture" keeps the body, a "replay" runs it on the static
buffers and copies its results into the first replay's outputs - the static-buffer plumbing
runs for real, the kernels eagerly.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

MODES = ("auto", "on", "off")
WARMUP = 2
MAX_SIGNATURES = 4
STANDIN_ENV = "ET_GPU_STANDIN"
PARTS = ("theta", "opt_theta", "phi_read", "phi")


class CaptureError(RuntimeError):
    """run.cuda_graphs = "on" and something prevents a capture (the message names it)."""


def standin() -> bool:
    return os.environ.get(STANDIN_ENV, "0") == "1"


def blockers(policy, strategy, cfg) -> dict[str, str | None]:
    """What prevents each part's capture from the start (None: nothing): a strategy whose step
    is not built from the phases (the joint loop), a policy that does not declare
    ``capturable`` (its forward is in "theta" and "phi_read")."""
    if not getattr(strategy, "phases", False):
        why = (f"run.strategy = {strategy.name!r}: its step is the joint loop, not the phases' "
               "parts (two_phase, shared_forward and alternating are)")
        return dict.fromkeys(PARTS, why)
    out = dict.fromkeys(PARTS)
    if not getattr(policy, "capturable", False):
        out["theta"] = out["phi_read"] = (
            f"the policy ({type(policy).__name__}) does not declare Policy.capturable = True "
            "(a capturable forward keeps its shapes and never synchronises with the host)")
    return out


# --------------------------------------------------------------------------------------------
# the arguments of a part: tensors in nested lists / tuples / dicts / micro-batches
# --------------------------------------------------------------------------------------------
def flatten(x, out: list) -> object:
    """The tensors of ``x`` appended to ``out``; returns the hashable signature of ``x``."""
    if isinstance(x, torch.Tensor):
        out.append(x)
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x.requires_grad)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(flatten(v, out) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, flatten(v, out)) for k, v in x.items()))
    if hasattr(x, "static_fields"):  # a Micro: its tensors, and what the host knows of it
        return (type(x).__name__, flatten(x.static_fields(), out))
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))  # an unhashable value: a new signature per object
    return ("V", x)


def rebuild(x, tensors):
    """``x`` with its tensors replaced, in :func:`flatten`'s order, from the iterator."""
    if isinstance(x, torch.Tensor):
        return next(tensors)
    if isinstance(x, (list, tuple)):
        return type(x)(rebuild(v, tensors) for v in x)
    if isinstance(x, dict):
        return {k: rebuild(v, tensors) for k, v in x.items()}
    if hasattr(x, "static_fields"):
        return x.with_fields(rebuild(x.static_fields(), tensors))
    return x


def static_copy(t: torch.Tensor) -> torch.Tensor:
    """A buffer for ``t``'s values: the same strides where they do not overlap (an expanded
    view becomes contiguous, the same values)."""
    return t.detach().clone()


def copy_in(static: list, live: list) -> None:
    """static[i] <- live[i], skipping a tensor that is its static buffer; one foreach launch
    per dtype."""
    groups: dict = {}
    for s, t in zip(static, live):
        if s is t or (s.data_ptr() == t.data_ptr() and s.stride() == t.stride()):
            continue
        groups.setdefault(s.dtype, ([], []))
        groups[s.dtype][0].append(s)
        groups[s.dtype][1].append(t.detach())
    for dst, src in groups.values():
        torch._foreach_copy_(dst, src)


def copy_out(metrics: dict) -> dict:
    """The metrics' tensors copied (one stack per dtype), other values as they are."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = dict(metrics)
    by: dict = {}
    for k in keys:
        by.setdefault((metrics[k].dtype, metrics[k].device), []).append(k)
    for ks in by.values():
        for k, v in zip(ks, torch.stack([metrics[k].detach().reshape(()) for k in ks]).unbind()):
            out[k] = v.reshape(metrics[k].shape)
    return out


def record(tensors, stream) -> None:
    for t in tensors:
        if t.device.type == "cuda":
            t.record_stream(stream)


# --------------------------------------------------------------------------------------------
# graphs: CUDA's, or the CPU stand-in
# --------------------------------------------------------------------------------------------
class CudaGraph:
    """torch.cuda.CUDAGraph of ``fn(*args)`` captured on ``stream`` in its own memory pool."""

    def __init__(self, fn: Callable, args: tuple, stream):
        self.graph = torch.cuda.CUDAGraph()
        debug = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)  # the capture's one synchronize is by design
        try:
            with torch.cuda.graph(self.graph, pool=torch.cuda.graph_pool_handle(),
                                  stream=stream, capture_error_mode="thread_local"):
                self.out = fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode(debug)

    def replay(self):
        self.graph.replay()
        return self.out


class StandinGraph:
    """The CPU stand-in (module docstring): nothing runs at capture; a replay runs the body on
    the static buffers and writes its tensors into the first replay's outputs."""

    def __init__(self, fn: Callable, args: tuple, stream=None):
        self.fn, self.args, self.out = fn, args, None

    def replay(self):
        out = self.fn(*self.args)
        if self.out is None:
            self.out = out
            return out
        new: list = []
        flatten(out, new)
        old: list = []
        flatten(self.out, old)
        with torch.no_grad():
            for o, n in zip(old, new):
                if o is not n:
                    o.copy_(n)
        return self.out


@dataclass
class _Part:
    reason: str | None = None                       # what prevents capture (None: nothing)
    seen: dict = field(default_factory=dict)        # signature -> eager calls so far
    graphs: dict = field(default_factory=dict)      # signature -> (graph, static tensors)
    warned: bool = False


class Graphs:
    """The parts' graphs of one trainer (module docstring). ``blockers``: part -> what prevents
    its capture (None: nothing); ``on_failure()``: called after a capture raised (the trainer
    drops the gradients a half-captured backward left); ``quiet``: "auto" names the blockers in
    :meth:`status` only (no warning: a strategy whose step has no parts)."""

    def __init__(self, mode: str, device: torch.device, blockers: dict[str, str | None],
                 on_failure: Callable[[], None] = lambda: None, quiet: bool = False):
        if mode not in MODES:
            raise ValueError(f"run.cuda_graphs: expected one of {MODES}, got {mode!r}")
        self.mode, self.device, self.on_failure = mode, device, on_failure
        self.standin = device.type != "cuda" and standin()
        self.enabled = mode != "off" and (device.type == "cuda" or self.standin)
        if mode == "on" and not self.enabled:
            raise CaptureError(f"run.cuda_graphs = \"on\": CUDA graphs need a CUDA device, "
                               f"run.device is {device.type} (\"auto\" ignores the option off "
                               "CUDA; \"off\" turns it off)")
        # quiet: "auto" does not warn about the blockers (a strategy that has no parts)
        self.parts = {p: _Part(blockers.get(p), warned=quiet) for p in PARTS}
        if self.enabled and mode == "on":
            for name, part in self.parts.items():
                if part.reason is not None:
                    raise CaptureError(f"run.cuda_graphs = \"on\": part {name!r}: {part.reason}")
        self.graph_cls = StandinGraph if self.standin else CudaGraph
        self._stream = None  # the capture stream of the parts that run on the default stream
        self._owned: set[int] = set()  # data_ptr of the graphs' outputs (stable buffers)

    def refuse(self, reason: str, parts=PARTS) -> None:
        """Something found after construction prevents capture (e.g. data parallelism): named
        once for all ``parts``."""
        if self.mode == "on" and self.enabled:
            raise CaptureError(f"run.cuda_graphs = \"on\": {reason}")
        news = [name for name in parts if not self.parts[name].warned]
        for name in parts:
            part = self.parts[name]
            part.graphs.clear()
            part.reason, part.warned = reason, True
        self._owned.clear()
        if self.enabled and news:
            warnings.warn(f"run.cuda_graphs: parts {', '.join(news)} run eagerly: {reason}",
                          RuntimeWarning, stacklevel=2)

    def reset(self) -> None:
        """Forget every graph (their static state no longer matches: e.g. a loaded optimizer
        state); the parts warm up and capture again."""
        for part in self.parts.values():
            part.graphs.clear()
            part.seen.clear()
        self._owned.clear()

    def status(self) -> dict[str, str]:
        """part -> "graphed (n)", "eager: <why>", "warming up", "off"."""
        out = {}
        for name, p in self.parts.items():
            out[name] = ("off" if not self.enabled else f"eager: {p.reason}" if p.reason
                         else f"graphed ({len(p.graphs)})" if p.graphs else "warming up")
        return out

    # ---- the call ----------------------------------------------------------------------------
    def run(self, name: str, fn: Callable, *args, eligible: bool = True):
        """``fn(*args)`` (a tuple whose first item is a metrics dict): eagerly, or warmed up,
        captured and replayed as the module docstring says."""
        part = self.parts[name]
        if not (self.enabled and eligible) or part.reason is not None:
            if self.enabled and part.reason is not None and not part.warned:
                self._block(name, part.reason)  # named once, at its first call
            return fn(*args)
        live: list = []
        sig = flatten(args, live)
        if sig in part.graphs:
            graph, static = part.graphs[sig]
            copy_in(static, live)
            out = graph.replay()
            return (copy_out(out[0]), *out[1:])
        count = part.seen.get(sig, 0)
        if count < WARMUP:
            if len(part.seen) >= MAX_SIGNATURES * WARMUP and sig not in part.seen:
                self._block(name, f"dynamic shapes: more than {len(part.seen)} input signatures "
                                  "(shapes, dtypes, strides) seen")
                return fn(*args)
            part.seen[sig] = count + 1
            return self._warm(fn, args, live)
        if len(part.graphs) >= MAX_SIGNATURES:
            self._block(name, f"dynamic shapes: more than {MAX_SIGNATURES} input signatures "
                              "(shapes, dtypes, strides) to capture")
            return fn(*args)
        # a tensor another graph owns (its output) is stable: read in place, not copied
        static = [t if t.data_ptr() in self._owned else static_copy(t) for t in live]
        sargs = rebuild(args, iter(static))
        try:
            graph = self.graph_cls(fn, sargs, self._capture_stream())
        except Exception as e:  # noqa: BLE001 - named, then eager (auto) or raised (on)
            self.on_failure()
            self._block(name, f"its capture raised {type(e).__name__}: {str(e).strip()[:300]} "
                              "(a host synchronisation, a data-dependent shape or an allocation "
                              "that is not allowed while capturing)")
            return fn(*args)
        part.graphs[sig] = (graph, static)
        out = graph.replay()
        produced: list = []
        flatten(out[1:], produced)
        self._owned.update(t.data_ptr() for t in produced if t.numel())
        return (copy_out(out[0]), *out[1:])

    # ---- helpers -----------------------------------------------------------------------------
    def _block(self, name: str, reason: str) -> None:
        part = self.parts[name]
        part.reason = reason
        if self.mode == "on":
            raise CaptureError(f"run.cuda_graphs = \"on\": part {name!r}: {reason}")
        if self.enabled and not part.warned:
            part.warned = True
            warnings.warn(f"run.cuda_graphs: part {name!r} runs eagerly: {reason}",
                          RuntimeWarning, stacklevel=3)

    def _capture_stream(self):
        """Where a part is warmed up and captured: the current stream unless it is the default
        one (capture needs a side stream), then one side stream of our own."""
        if self.standin:
            return None
        cur = torch.cuda.current_stream(self.device)
        if cur != torch.cuda.default_stream(self.device):
            return cur
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _warm(self, fn: Callable, args: tuple, live: list):
        """One eager call on the capture stream, ordered against the current one both ways."""
        stream = self._capture_stream()
        if stream is None or stream == torch.cuda.current_stream(self.device):
            return fn(*args)
        cur = torch.cuda.current_stream(self.device)
        stream.wait_stream(cur)
        record(live, stream)
        with torch.cuda.stream(stream):
            out = fn(*args)
        cur.wait_stream(stream)
        produced: list = []
        flatten(out, produced)
        record(produced, cur)
        return out
