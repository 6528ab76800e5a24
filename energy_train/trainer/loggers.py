"""Metrics to Weights & Biases or TensorBoard as well as metrics.jsonl (``run.log``).

    run.log = "none"          metrics.jsonl only (the default)
    run.log = "wandb"         also wandb (``pip install energy-train[wandb]``); project and mode
                              from the usual W&B environment (WANDB_PROJECT, WANDB_MODE=offline
                              works without a network); files under <run>/wandb/
    run.log = "tensorboard"   also TensorBoard event files under <run>/tensorboard/
                              (``pip install energy-train[tensorboard]``)

Each record is logged with the keys of metrics.jsonl, unchanged ("l1", "energy_loss",
"rank_acc", "probe_l1", "time_step", ...), against its ``step`` (-1 is the probe before
training). Neither package is a dependency: asking for one that is not installed is a clear
error at start-up. Only the main process logs.
"""
from __future__ import annotations

import uuid
from pathlib import Path

LOGGERS = ("none", "wandb", "tensorboard")


class NullLogger:
    def log(self, records: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def _scalars(record: dict) -> dict[str, float]:
    """The record's numeric values but ``step``."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbLogger:
    """One W&B run per run directory: its id is kept in ``<run>/wandb_id.txt`` so that a
    ``--resume`` continues the same W&B run. ``step`` is logged as a metric and used as the
    x-axis of every other key (so step -1 is accepted)."""

    def __init__(self, run_dir: Path, config: dict, resume: bool):
        import wandb
        self.wandb = wandb
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(dir=str(run_dir), name=run_dir.name, id=run_id, config=config,
                              resume="allow")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, records: list[dict]) -> None:
        for r in records:
            self.run.log({"step": int(r["step"]), **_scalars(r)})

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    """``SummaryWriter(<run>/tensorboard)``; a resume at step k purges the events logged at
    steps >= k by the run before (they are recomputed)."""

    def __init__(self, run_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, records: list[dict]) -> None:
        for r in records:
            step = int(r["step"])
            for k, v in _scalars(r).items():
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_logger(kind: str, run_dir, config: dict, resume_step: int | None = None):
    """The logger of ``run.log``: NullLogger, WandbLogger or TensorBoardLogger.
    ``resume_step``: the step a ``--resume`` continues from (None for a fresh run)."""
    if kind == "none":
        return NullLogger()
    run_dir = Path(run_dir)
    try:
        if kind == "wandb":
            return WandbLogger(run_dir, config, resume_step is not None)
        if kind == "tensorboard":
            return TensorBoardLogger(run_dir, resume_step)
    except ImportError as e:
        extra = "wandb" if kind == "wandb" else "tensorboard"
        raise RuntimeError(f"run.log = {kind!r}: {e.name or extra} is not installed (pip install "
                           f"'energy-train[{extra}]')") from None
    raise ValueError(f"run.log: expected one of {LOGGERS}, got {kind!r}")


__all__ = ["open_logger", "LOGGERS", "NullLogger", "WandbLogger", "TensorBoardLogger"]
