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
- Phase 2 issues every micro-batch's read (forward + negatives) before any energy loss, so
  D(k) follows the last READ: opt_theta(k+1) never waits for an energy step of phase 2(k).
- Why not a snapshot of theta for phase 2 instead of W: a copy of theta per step (the ~1B
  backbone's 2 GB: ~1 ms at the H200's 4.3 TB/s, plus 2 GB held; OFT's LoRA + head ~0.5 GB)
  would remove a wait that does not bind: W is reached after P1(k+1)'s forward and backward,
  which take longer than P2(k)'s read (a no-grad forward: ~1/3 of a forward + backward); on
  the H200 (~1B backbone) opt_theta took 11.84 ms overlapped and 11.84 ms sequential. W costs
  only when the read outlasts a whole forward + backward.
- What W does not explain (the H200 timeline: main idle ~30 ms per step, phase 1(k+1)
  starting ~5 ms after phase 2(k)'s read ended) is the HOST: it issues every launch in the
  sequential order, so phase 1(k+1)'s first kernel is issued only after all of phase 2(k)'s;
  with the launch queue full (the host runs ahead of a busy GPU), that is when the GPU has
  drained phase 2(k) to the queue's depth. run.cuda_graphs makes phase 2 two graph launches
  ("phi_read", "phi"; trainer/graphs.py), so the host reaches phase 1(k+1) at once; with a
  policy that is not capturable, "phi" (the energy loss and phi's step) is still one launch.
- phi's learning rate is a device tensor on CUDA (trainer/optim.py); its schedule fills it on
  the side stream (:meth:`on_phase2_stream`), after phase 2(k)'s optimizer step has read it.
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
        self._phase2_ran = False  # phase 2 of the current step ran on the side stream

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
        self._in_phase2 = self._phase2_ran = True
        try:
            with torch.cuda.stream(self.side):
                yield
        finally:
            self._in_phase2 = False

    def new_step(self) -> None:
        self._phase2_ran = False

    def theta_released(self) -> None:
        """Phase 2 has issued its last read of theta (forward + negatives): record D(k)."""
        if self.enabled and self._in_phase2:
            self._theta_read = self.side.record_event()

    def before_theta_write(self) -> None:
        """Before an optimizer step writes theta in place: main waits D(k) (W)."""
        if self.enabled and self._theta_read is not None:
            torch.cuda.current_stream(self.device).wait_event(self._theta_read)
            self._theta_read = None

    def on_phase2_stream(self):
        """The stream phase 2 ran on in this step (the side stream under overlap): phi's
        schedule fills its device lr there, after phi's step read it."""
        if self.enabled and self._phase2_ran:
            return torch.cuda.stream(self.side)
        return contextlib.nullcontext()

    def drain(self) -> None:
        """Main waits for all side-stream work (no host sync)."""
        if self.enabled:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
