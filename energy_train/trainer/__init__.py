"""The lean trainer: two optimizers over disjoint parameter sets, one loop, strategy objects.

    core.py         Trainer: the forwards, the two phases, the step, its state
    objective.py    the energy objective: context, negatives, loss, metrics, audited backward
    optim.py        theta's and phi's optimizers and schedules
    diagnostics.py  the held-out probe and the lag effect, called around a step
    feed.py         data -> micro-batches on the device (Micro, Forward)
    overlap.py      phase 2 on a CUDA side stream, ordered by events
    metrics.py      device-side metrics, phase timers, the wall clock
    validate.py     the start-up check of a policy against its data
    checkpoint.py   checkpoint files, atomic, sharded theta gathered
    run.py          train(): the policy, energy model and data built and checked, the loop
    rundir.py       the run directory: created or reopened, locked, metrics.jsonl, error.txt
    summary.py      the summary of a finished run
    loggers.py      W&B / TensorBoard beside metrics.jsonl

The strategies (energy_train/strategies.py) sit a floor below: they drive a Trainer through
their Blocks interface.
"""
from ..strategies import STRATEGIES, Blocks, Strategy, make_strategy
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, split_theta
from .core import Trainer
from .feed import Feed, Forward, Micro
from .run import (RunError, RunResult, build_trainer, is_complete, read_metrics, resolve_device,
                  summarize, summary_table, train)
from .validate import PolicyError

__all__ = ["Trainer", "Forward", "Feed", "Micro", "resolve_device", "train", "build_trainer",
           "RunResult", "RunError", "is_complete", "read_metrics", "summarize", "summary_table",
           "STRATEGIES", "Strategy", "Blocks", "make_strategy", "save_checkpoint",
           "load_checkpoint", "split_theta", "CheckpointError", "PolicyError"]
