"""Device-side metrics, phase timers and the run's wall clock: nothing here synchronises
inside a step.

A step's metrics are 0-d device tensors, meant over its micro-batches by :class:`Mean`;
:class:`Meter` keeps them and ``flush()`` stacks every value of the interval and reads them
back in ONE transfer (the only host sync, once per log interval). Phase times use CUDA events on a GPU, recorded on the CURRENT stream (phase 2
on the side stream when the phases overlap) and resolved at flush time, and
``time.perf_counter`` on the CPU (where the work is synchronous anyway).
"""
from __future__ import annotations

import contextlib
import math
import time

import torch


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


class WallClock:
    """Wall seconds of a run over all its parts: a resumed run continues the count."""

    def __init__(self):
        self.offset, self._t0 = 0.0, None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def seconds(self) -> float:
        return self.offset + (0.0 if self._t0 is None else time.perf_counter() - self._t0)


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[int, str, object, object]] = []
        self._step = 0
        self.history: list | None = None  # set to a list to keep (step, name, stream, start, end)

    def set_step(self, step: int) -> None:
        self._step = step

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream()
            start.record(stream)
            yield
            end.record(stream)
            self._pending.append((self._step, name, start, end))
        else:
            stream = None
            t0 = time.perf_counter()
            yield
            self._pending.append((self._step, name, t0, time.perf_counter()))
        if self.history is not None:
            self.history.append((self._step, name, stream, *self._pending[-1][2:]))

    def flush(self) -> dict[int, dict[str, float]]:
        """{step: {"time_<name>": seconds}}; on CUDA waits for the recorded events (their
        streams may differ, so every end event is waited for; once per log interval)."""
        out: dict[int, dict[str, float]] = {}
        if self.cuda:
            for p in self._pending:
                p[3].synchronize()
        for step, name, a, b in self._pending:
            sec = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            d = out.setdefault(step, {})
            d[f"time_{name}"] = d.get(f"time_{name}", 0.0) + sec
        self._pending = []
        return out

    def discard(self) -> None:
        """Forget the recorded events without resolving them (no sync)."""
        self._pending = []


class Meter:
    """Collects {name: 0-d tensor or float} per step; ``flush`` reads them back at once."""

    def __init__(self):
        self._steps: list[tuple[int, dict]] = []
        self.reduce = None  # e.g. the mean over ranks (one all_reduce per flush)

    def add(self, step: int, values: dict) -> None:
        self._steps.append((step, values))

    def discard(self) -> None:
        """Forget the kept values without reading them back (no sync)."""
        self._steps = []

    def flush(self) -> list[dict]:
        names, tensors = [], []
        for i, (_, vals) in enumerate(self._steps):
            for k, v in vals.items():
                if isinstance(v, torch.Tensor):
                    names.append((i, k))
                    tensors.append(v.detach().float().reshape(()))
        host = []
        if tensors:
            stacked = torch.stack(tensors)
            host = (stacked if self.reduce is None else self.reduce(stacked)).cpu().tolist()
        records = [{"step": s, **{k: v for k, v in vals.items() if not isinstance(v, torch.Tensor)}}
                   for s, vals in self._steps]
        for (i, k), v in zip(names, host):
            records[i][k] = v
        self._steps = []
        return records


LOSS_KEYS = ("l1", "energy_loss")


def check_finite_records(records: list[dict]) -> None:
    """Raise a clear error when a loss read back at the log interval is NaN/inf."""
    bad = [r["step"] for r in records for k in LOSS_KEYS
           if k in r and not math.isfinite(r[k])]
    if bad:
        raise FloatingPointError(
            f"non-finite loss at step(s) {sorted(set(bad))[:10]} (read back at the log interval); "
            "check the data of those steps for NaN/inf (config check_data=true checks it on the "
            "host) or lower the learning rates")
