"""What a :class:`~.core.Trainer` hands out between steps: the metrics read back once per log
interval, and the state a resume needs. A mixin of the Trainer (it uses the Trainer's meter,
timer, telemetry, streams, optimizers, strategy, diagnostics, clock and graphs); nothing here
runs inside a step."""
from __future__ import annotations

import torch


class TrainerState:
    """:meth:`flush` / :meth:`discard_metrics` / :meth:`drain` and :meth:`state_dict` /
    :meth:`load_state_dict` of the Trainer."""

    def flush(self) -> list[dict]:
        """Read back the metrics of the interval (the one host sync) and merge phase times;
        GPU telemetry (when NVML is there) goes into the interval's last record."""
        self.drain()
        records = self.meter.flush()
        times = self.timer.flush()
        for r in records:
            r.update(times.get(r["step"], {}))
        if records:
            records[-1].update(self.telemetry.sample())
        return records

    def discard_metrics(self) -> None:
        """Drop the kept metrics and phase events without reading them back (no sync)."""
        self.meter.discard()
        self.timer.discard()

    def drain(self) -> None:
        """Join the side stream into the main one (overlap); a no-op otherwise."""
        self.streams.drain()

    def state_dict(self) -> dict:
        """Everything but the weights: optimizers, schedulers, RNG, strategy, drift reference."""
        self.drain()
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, **self.optim.state_dict(), "rng": rng,
                "strategy": self.strategy.state_dict(), "config": self.cfg.to_dict(),
                "wall_seconds": self.clock.seconds(), **self.diagnostics.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (opt_theta is loaded with the weights, by
        energy_train/trainer/checkpoint.py, which knows how theta is sharded)."""
        self.optim.load_state_dict(state)
        torch.set_rng_state(state["rng"]["torch"].cpu())  # CPU ByteTensors, wherever loaded
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.strategy.load_state_dict(state["strategy"], self.device)
        self.step = int(state["step"])
        self.clock.offset = float(state.get("wall_seconds", 0.0))
        self.diagnostics.load_state_dict(state, self.device)
        self.graphs.reset()  # the loaded optimizer states are new tensors
