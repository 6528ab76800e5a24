"""``train()``: a training run - the policy, energy model and data built and checked, the loop
(steps, metrics read back once per log interval, checkpoints), the summary at the end - in its
run directory (rundir.py lists what it holds).

Under torchrun (WORLD_SIZE > 1) every rank runs the loop on its shard of each global batch;
rank 0 alone writes the run directory (checkpoints after every rank's state is gathered;
every rank waits at a barrier), every rank resumes from the same files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..config import TrainConfig, canonical
from ..files import atomic_write_text
from ..plots import plot_run
from ..policies import default_energy, make_setup
from ..policy import Policy
from . import checkpoint
from .core import Trainer
from .feed import Feed
from .loggers import NullLogger, open_logger
from .metrics import check_finite_records
from .rundir import (RunError, append_metrics, is_complete, keep_metrics_before, prepare_run_dir,
                     read_metrics, record_error, retire_error, unlock)
from .summary import chance_level, summarize, summary_table
from .validate import check_policy, check_sizes


def resolve_device(name: str) -> torch.device:
    """run.device ("auto", "cpu", "cuda", "cuda:N") -> a torch.device; a clear error when CUDA
    is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device: {name!r} asked for, but CUDA is not available")
    return dev


@dataclass
class RunResult:
    run_dir: Path
    complete: bool
    summary: dict | None
    trainer: Trainer


def train(cfg: TrainConfig, out=None, *, policy: Policy | None = None, energy=None, data=None,
          probe: dict | None = None, resume: bool = False, overrides: dict | None = None,
          echo=print) -> RunResult:
    """Run (or resume) a training run in its directory ``out``.

    policy/energy/data: the user's own (``data`` a step-indexed source or an iterable of
    batch dicts, ``probe`` an optional held-out batch); by default the policy named by
    ``cfg.run.policy`` is built by its registered factory, which also gives the data (a
    ``data=`` given alone replaces the factory's). ``energy`` defaults to the factory's or an
    EnergyModel of the [energy] section. ``overrides`` ({"section.key": value}) is what a
    ``--resume`` may change (the resumable keys). Returns a RunResult; raises on error,
    leaving error.txt (and never complete.json) in the run directory.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected an energy_train.config.TrainConfig (default_config(...) "
                        f"or config.resolve(...)), got {type(cfg).__name__}")
    ov = canonical(overrides or {}, cfg.run.policy, "command line")
    if policy is not None and data is None:
        raise ValueError("data: train(policy=...) needs data= (a step-indexed source or an "
                         "iterable of batch dicts)")
    device_name = ov.get("run.device", cfg.run.device)
    resolve_device(device_name)  # fail before any directory exists
    ctx = distributed.setup(device_name, float(ov.get("dist.timeout", cfg.dist.timeout)))
    run_dir = None
    try:
        if ctx is None:
            run_dir, cfg = prepare_run_dir(cfg.validate(), out, resume, ov)
        else:  # rank 0 decides (its clock names the default dir); its error stops every rank
            run_dir, cfg = distributed.run_on_main(
                lambda: prepare_run_dir(cfg.validate(), out, resume, ov))
        distributed.check_config(cfg, 1 if ctx is None else ctx.world_size)
    except BaseException:
        if run_dir is not None:
            unlock(run_dir)
        distributed.teardown(ctx)
        raise
    threads = torch.get_num_threads()
    device = resolve_device(cfg.run.device) if ctx is None else ctx.device
    if cfg.run.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.run.threads)
    trainer = None
    try:
        trainer = build_trainer(cfg, device, ctx, policy=policy, energy=energy, data=data,
                                probe=probe)
        return _train(trainer, run_dir, resume, echo, ctx, keep_stop="run.stop_after" in ov)
    except BaseException as e:
        e2 = e if ctx is None else distributed.explain(e, ctx, cfg.dist.timeout)
        if ctx is None or ctx.rank == 0:
            record_error(run_dir, resume, e2)
        if e2 is not e:
            raise e2 from e
        raise
    finally:
        if trainer is not None:
            trainer.restore_modes()  # the modules' modes as they came in (energy_train/modes.py)
        unlock(run_dir)
        torch.set_num_threads(threads)
        distributed.teardown(ctx)


def build_trainer(cfg: TrainConfig, device: torch.device, ctx=None, *, policy=None, energy=None,
                  data=None, probe=None) -> Trainer:
    """The policy (the user's, or built by run.policy's factory), the energy model and the
    data in a Trainer, checked once (data, policy outputs) and distributed under torchrun."""
    if policy is None:
        setup = make_setup(cfg.run.policy, cfg, device, need_data=data is None)  # checked
        policy, data = setup.policy, data if data is not None else setup.data
        energy = energy if energy is not None else setup.energy
        probe = probe if probe is not None else setup.probe
    if not isinstance(policy, Policy):
        raise TypeError(f"policy: expected an energy_train.Policy (subclass it: backbone, "
                        f"action_head, forward, layout, expert), got {type(policy).__name__}")
    check_sizes(policy)
    if energy is None:
        energy = default_energy(cfg, policy, device)
    feed = Feed(data, cfg.run.grad_accum, probe)
    if cfg.run.check_data:
        feed.check()  # the data is checked once, here: no check (no sync) inside a step
    if ctx is not None and cfg.dist.fsdp:
        distributed.shard_backbone(policy)  # before the optimizers are built
    trainer = Trainer(cfg, policy, energy, feed, device)
    check_policy(trainer)
    if ctx is not None:
        distributed.distribute(trainer, ctx)  # DDP/FSDP; metrics: mean over ranks
    return trainer


def _train(trainer: Trainer, run_dir: Path, resume: bool, echo, ctx, keep_stop: bool = False) -> RunResult:
    """The loop: the resume (or the probe before training), the steps, a read-back every
    run.log_every steps, checkpoints, then the summary."""
    trainer.clock.start()
    main = ctx is None or ctx.rank == 0
    if not main:
        echo = lambda *a, **k: None  # noqa: E731 - rank 0 speaks for the run
    loaded = _resume(trainer, run_dir, echo, main, keep_stop) if resume else None
    cfg = trainer.cfg
    if loaded is None and cfg.run.probe_every:
        trainer.meter.add(-1, trainer.diagnostics.probe(trainer))  # before training: step -1
    logger = (open_logger(cfg.run.log, run_dir, cfg.to_dict(), trainer.step if resume else None)
              if main else NullLogger())  # W&B / TensorBoard beside metrics.jsonl (run.log)
    target = cfg.run.stop_after or cfg.run.steps
    bar = tqdm(total=cfg.run.steps, initial=trainer.step, disable=not (cfg.run.progress and main),
               desc=cfg.run.strategy, dynamic_ncols=True, leave=False)
    while trainer.step < target:
        trainer.train_step()
        ckpt_due = (bool(cfg.run.ckpt_every) and trainer.step % cfg.run.ckpt_every == 0
                    and trainer.step != target)
        # flush before a checkpoint too: a resume from it keeps only the records written so far
        if trainer.step % cfg.run.log_every == 0 or trainer.step == target or ckpt_due:
            records = trainer.flush()  # under torchrun: a collective (mean over ranks)
            if main:
                append_metrics(run_dir / "metrics.jsonl", records)
                logger.log(records)
            check_finite_records(records)
            last = {k: v for r in records for k, v in r.items() if k in ("l1", "energy_loss", "rank_acc")}
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()}, refresh=False)
            bar.update(trainer.step - bar.n)
        if ckpt_due:
            checkpoint.save(trainer, run_dir)
    bar.close()
    logger.close()
    checkpoint.save(trainer, run_dir)
    if trainer.step < cfg.run.steps:
        echo(f"stopped after step {trainer.step} of {cfg.run.steps} (checkpointed); continue with "
             f"`energy-train train --resume --out {run_dir}`")
        return RunResult(run_dir, False, None, trainer)
    return _finish(trainer, run_dir, echo) if main else RunResult(run_dir, True, None, trainer)


def _resume(trainer: Trainer, run_dir: Path, echo, main: bool, keep_stop: bool):
    """--resume: the newest intact checkpoint loaded on every rank (None: the run died before
    its first one and starts over); on rank 0 the directory made consistent with it."""
    loaded = None
    try:
        loaded = checkpoint.restore(trainer, run_dir)  # every rank
    except checkpoint.CheckpointError as e:
        if any((run_dir / "checkpoints").glob("step_*")):
            raise  # checkpoints exist but none is intact: never start over silently
        # the run died before its first checkpoint: nothing to lose, start it over
        echo(f"{e}; the run died before its first checkpoint: starting it over from step 0 "
             "with its saved config")
    trainer.dp.barrier()  # every rank has read the files before rank 0 rewrites any
    step, cfg = (0 if loaded is None else loaded.step), trainer.cfg
    for why in (loaded.skipped if loaded is not None else []):
        echo(f"warning: skipped a newer checkpoint: {why}")
    # the --resume rule (rundir.prepare_run_dir): to run.steps, or to a --stop-after the command
    # gives; a target at or before the checkpoint is refused before anything is rewritten
    where = f"its checkpoint {loaded.dir.name}" if loaded is not None else "no checkpoint"
    if cfg.run.steps < step:
        raise RunError(f"run.steps (--steps) = {cfg.run.steps}: the run is already at step {step} "
                       f"({where}); give --steps >= {step}, or leave it out")
    if keep_stop and 0 < cfg.run.stop_after <= step:
        raise RunError(f"run.stop_after (--stop-after) = {cfg.run.stop_after}: the run is already "
                       f"at step {step} ({where}); give a later step, or 0 to run to run.steps = "
                       f"{cfg.run.steps}")
    if main:
        (run_dir / "complete.json").unlink(missing_ok=True)
        retire_error(run_dir)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
        moved = keep_metrics_before(run_dir, step if loaded is not None else -1)
        if moved:
            echo(f"moved {moved} metrics row(s) after step {step} to metrics.discarded.jsonl")
    note = "" if trainer.feed.exact_resume else (" (iterable data: the consumed batches are "
                                                 "skipped; exact only if it replays its order)")
    echo(f"resumed {run_dir} at step {step}{note}")
    return loaded


def _finish(trainer: Trainer, run_dir: Path, echo) -> RunResult:
    """A finished run (rank 0): the summary, the curves, complete.json last."""
    cfg = trainer.cfg
    records = read_metrics(run_dir)
    summary = summarize(cfg, records, trainer.clock.seconds())
    plot_run(records, run_dir / "curves.png",
             title=f"{cfg.run.policy} / {cfg.run.strategy} (seed {cfg.run.seed})",
             chance=chance_level(cfg, records))
    table = summary_table(summary)
    atomic_write_text(run_dir / "summary.md", table + "\n")
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(run_dir / "complete.json", json.dumps({"steps": trainer.step}))
    echo(table)
    echo(f"run directory: {run_dir}")
    return RunResult(run_dir, True, summary, trainer)


__all__ = ["train", "build_trainer", "RunResult", "RunError", "summarize", "summary_table",
           "read_metrics", "is_complete"]
