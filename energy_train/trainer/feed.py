"""The trainer's data: batches as dicts of tensors, moved to the device in one place.

Two kinds of data:

- a **step-indexed source**: ``batch(step, rank, world) -> list of micro-batch dicts`` and
  ``probe() -> dict`` (and optionally ``check()``, a start-up data check). The batch of a
  step is a pure function of the step, so a resumed run is exactly the uninterrupted one;
- any **iterable of batch dicts** (e.g. a PyTorch DataLoader): each step takes
  ``run.grad_accum`` batches from it, a new pass starts when one ends, and a resume at step k
  skips the k * grad_accum batches consumed before (exact only if the iterable replays the
  same order; under torchrun each rank's iterable yields that rank's own batches).

A micro-batch becomes a :class:`Micro`: its tensors on the device (non_blocking; CPU tensors
are pinned first, so the copy is asynchronous), its layout and expert chunk computed once,
and the sample ids (``batch["ids"]``, read on the host BEFORE the move) for the strategies
that key state by sample. A policy forward of it is a :class:`Forward`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..capture import CapturedStates
from ..policy import BatchLayout, Policy
from .validate import PolicyError


@dataclass
class Micro:
    """One micro-batch on the device, with what the trainer derives from it once."""
    batch: dict                  # the policy's batch: tensors on the device, other fields as given
    layout: BatchLayout
    expert: torch.Tensor         # (B, H, Da)
    index: int                   # which micro-batch of its step
    last: bool                   # the step's last micro-batch (gradients are all-reduced there)
    ids_host: list[int] | None   # sample ids, when the batch has "ids"

    @property
    def size(self) -> int:
        return self.expert.shape[0]

    @property
    def ids(self) -> torch.Tensor | None:
        return self.batch.get("ids")

    def static_fields(self) -> tuple:
        """What a part of a step (trainer/graphs.py) reads of this micro-batch: its batch dict,
        layout tensors and expert chunk, and which micro-batch of the step it is."""
        lay = self.layout
        return (self.batch, lay.action_index, lay.context_index, lay.pad_mask, self.expert,
                self.index, self.last)

    def with_fields(self, fields: tuple) -> "Micro":
        """This micro-batch with :meth:`static_fields` replaced (e.g. by static buffers)."""
        batch, action_index, context_index, pad_mask, expert, index, last = fields
        return Micro(batch, BatchLayout(action_index, context_index, pad_mask), expert, index,
                     last, self.ids_host)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every device tensor this micro-batch holds (for record_stream under overlap)."""
        yield from (v for v in self.batch.values() if isinstance(v, torch.Tensor))
        yield from (self.layout.action_index, self.layout.context_index, self.layout.pad_mask,
                    self.expert)


@dataclass
class Forward:
    """One policy forward of a micro-batch."""
    mb: Micro
    last_hidden: torch.Tensor | None  # (B, T, D); carries the graph when run with grad
    captured: CapturedStates | None   # action rows (L+1, B, H*Da, D) + context (B, S, D), detached


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device``: CPU tensors pinned, then copied non_blocking
    (on CUDA); other fields passed through."""
    if not isinstance(batch, dict):
        raise TypeError(f"data: expected a batch dict of tensors, got {type(batch).__name__}")
    cuda = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.device != device:
            if cuda and v.device.type == "cpu":
                v = v.pin_memory()
            v = v.to(device, non_blocking=cuda)
        out[k] = v
    return out


def sample_ids(batch: dict) -> list[int] | None:
    """The batch's sample ids as host ints, read while they are still on the CPU (no sync);
    None when the batch has no CPU "ids" tensor."""
    ids = batch.get("ids")
    if isinstance(ids, torch.Tensor) and ids.device.type == "cpu":
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [int(i) for i in ids]
    return None


def prepare(policy: Policy, batch: dict, device: torch.device, index: int, last: bool) -> Micro:
    ids_host = sample_ids(batch)
    policy.check_batch(batch)  # before the move: host reads of a CPU batch need no sync
    batch = to_device(batch, device)
    return Micro(batch, _read(policy.layout, batch), _read(policy.expert, batch), index, last,
                 ids_host)


def check_shapes(mbs: list[Micro], step: int, shard: tuple[int, int], run) -> None:
    """A step-indexed source's micro-batches of ``step`` on rank/world ``shard``: run.grad_accum
    of run.batch_size / world samples each (shapes only: no device read), else a PolicyError."""
    (rank, world), rows = shard, [mb.expert.shape[0] for mb in mbs]
    want = run.batch_size // world
    if len(rows) != run.grad_accum or any(r != want for r in rows):
        raise PolicyError(f"data.batch({step}, {rank}, {world}): expected run.grad_accum = "
                          f"{run.grad_accum} micro-batches of run.batch_size / world = "
                          f"{want} samples, got {rows}")


def _read(method, batch: dict):
    """Policy.layout / Policy.expert of ``batch``; a missing key is an error naming the method
    and the keys the batch has."""
    try:
        return method(batch)
    except KeyError as e:
        raise PolicyError(f"Policy.{method.__name__}(batch): the batch has no key {e}; it has "
                          f"{', '.join(map(str, batch))}") from e


class Feed:
    """``batch(step, rank, world)`` -> the step's micro-batch dicts; ``probe()`` -> one dict."""

    def __init__(self, data: Any, grad_accum: int, probe: dict | None = None):
        self.data, self.grad_accum, self._probe = data, int(grad_accum), probe
        self.step_indexed = callable(getattr(data, "batch", None))
        if not self.step_indexed and not hasattr(data, "__iter__"):
            raise TypeError("data: expected a step-indexed source (batch(step, rank, world), "
                            f"probe()) or an iterable of batch dicts, got {type(data).__name__}")
        self._it, self._consumed, self._passes = None, 0, 0

    @property
    def exact_resume(self) -> bool:
        return self.step_indexed

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[dict]:
        if self.step_indexed:
            out = self.data.batch(step, rank, world)
            if not isinstance(out, (list, tuple)) or not out:
                raise TypeError(f"data.batch({step}, {rank}, {world}): expected a non-empty list "
                                f"of micro-batch dicts, got {type(out).__name__}")
            return list(out)
        want = step * self.grad_accum
        while self._consumed < want:  # a resume: skip what the run before consumed
            self._next()
        return [self._next() for _ in range(self.grad_accum)]

    def probe(self) -> dict:
        if self._probe is None:
            if self.step_indexed and callable(getattr(self.data, "probe", None)):
                self._probe = self.data.probe()
            else:  # the first batch of a fresh pass, taken once
                first = next(iter(self.data), None)
                if first is None:
                    raise ValueError("data: the iterable yielded no batch")
                self._probe = first
        return self._probe

    def check(self) -> None:
        check = getattr(self.data, "check", None)
        if callable(check):
            check()

    def _next(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it, self._passes = iter(self.data), self._passes + 1
            try:
                item = next(self._it)
                self._consumed += 1
                return item
            except StopIteration:
                self._it = None
        raise ValueError(f"data: the iterable ran out after {self._consumed} batches (pass "
                         f"{self._passes} yielded none); give a re-iterable (e.g. a DataLoader) "
                         "or a step-indexed source")
