"""Overlap of the two phases on CUDA streams, ordered by events.

Phase 2 of step k (no-grad forward with theta_k+1, negatives, energy fwd/bwd/step on phi)
runs on a SIDE stream while phase 1 of step k+1 runs on the MAIN stream::

    host issues:  P1(k) ......... P2(k) ........ P1(k+1) ..................... P2(k+1)
                                                 (no host wait anywhere)

    main  | fwd+bwd(k) | opt_theta(k) |R(k)| fwd+bwd(k+1)           |W| opt_theta(k+1) |R(k+1)| ...
    side  |                                  |wait R(k)| fwd(k) negs(k) |D(k)| energy f/b, opt_phi(k) | ...
                                                                         |     ^
               R(k) = event recorded on main right after opt_theta(k)    |     |
               D(k) = event recorded on side after phase 2(k)'s last read of theta
               W    = main waits D(k) before opt_theta(k+1) writes theta in place

- theta_k+1 is read by P2(k) only after R(k) (so it sees exactly what the sequential loop
  sees) and overwritten by opt_theta(k+1) only after D(k) (so nothing it reads changes).
  P1(k+1)'s forward/backward only READS theta_k+1: it may run beside P2(k).
- phi, its grads and opt_phi's state are touched only on the side stream (AdamW's foreach
  kernels and clip_grad_norm_ run on the current stream; state is allocated there).
- The host issues every kernel in the sequential order, so host-side state (p.grad is None,
  the lr floats, the seeded generator) is identical with and without overlap; the two runs
  launch the same kernels on the same inputs and give the same numbers.
- Tensors made on main and read on side (the micro-batches) are ``record_stream``-ed to the
  side stream, so the caching allocator does not hand their memory to main before phase 2(k)
  is done with it; batch k's objects also stay referenced by phase 2's metrics/trace.
- Side-stream results (phase 2 metrics, phi) are read on main only after :meth:`drain`
  (main waits for side: a device-side wait, no host sync). The trainer drains before the
  probe, the metric read-back, checkpoints and the end of a run.

With ``enabled=False`` (overlap=False, or a CPU device) every method is a no-op and
``phase2()`` is a null context: the SAME code runs in order.
"""
from __future__ import annotations

import contextlib

import torch


class PhaseStreams:
    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = bool(enabled) and device.type == "cuda"
        self.device = device
        self.side = torch.cuda.Stream(device) if self.enabled else None
        self._theta_read: torch.cuda.Event | None = None  # D(k): phase 2 stopped reading theta
        self._in_phase2 = False

    @contextlib.contextmanager
    def phase2(self, batch=()):
        """Run phase 2 on the side stream after everything issued on main so far (R(k))."""
        if not self.enabled:
            yield
            return
        main = torch.cuda.current_stream(self.device)
        self.side.wait_event(main.record_event())  # R(k): after opt_theta(k) and batch k
        for mb in batch:
            for t in mb.tensors():
                t.record_stream(self.side)
        self._in_phase2 = True
        try:
            with torch.cuda.stream(self.side):
                yield
        finally:
            self._in_phase2 = False

    def theta_released(self) -> None:
        """Phase 2 has issued its last read of theta (forward + negatives): record D(k)."""
        if self.enabled and self._in_phase2:
            self._theta_read = self.side.record_event()

    def before_theta_write(self) -> None:
        """Before an optimizer step writes theta in place: main waits D(k) (W)."""
        if self.enabled and self._theta_read is not None:
            torch.cuda.current_stream(self.device).wait_event(self._theta_read)
            self._theta_read = None

    def drain(self) -> None:
        """Main waits for all side-stream work (no host sync)."""
        if self.enabled:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
