"""A training run and its directory.

<run>/config.json        the resolved config (written first)
<run>/metrics.jsonl      one record per step (+ step -1: the probe before training)
<run>/checkpoints/       step_<N>/{theta,phi}.safetensors, state.pt, meta.json; latest.json
<run>/curves.png         L1, energy loss, ranking accuracy, per-phase time
<run>/summary.md|json    the summary table
<run>/complete.json      written LAST: only a run with this file is complete
<run>/error.txt          why a run failed (no complete.json then); a failed --resume appends,
                         a resume that gets going moves it to error.history.txt
<run>/metrics.discarded.jsonl  rows a resume took out of metrics.jsonl (after its checkpoint,
                         or torn by a crash): moved here, never deleted
<run>/.lock              held (flock) by the process that runs it: one process at a time

Under torchrun (WORLD_SIZE > 1) every rank runs the loop on its shard of each global batch;
rank 0 alone writes the run directory (checkpoints after every rank's state is gathered;
every rank waits at a barrier), every rank resumes from the same files.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..files import append_lines, atomic_write_text
from ..config import TrainConfig, build, canonical, resumable_keys
from ..plots import plot_run, series
from ..policies import Setup, default_energy, resolve_factory
from ..policy import Policy
from . import checkpoint
from .core import Trainer
from .feed import Feed
from .loggers import NullLogger, open_logger
from .metrics import check_finite_records
from .validate import check_policy, check_sizes


class RunError(RuntimeError):
    pass


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


def default_run_dir(cfg: TrainConfig) -> Path:
    base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.run.strategy}"
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def prepare_run_dir(cfg: TrainConfig, out, resume: bool, overrides: dict | None) -> tuple[Path, TrainConfig]:
    """Create (or, for resume, reopen) the run directory; returns it and the config to run.
    ``overrides`` ({"section.key": value}) may change only the resumable keys of a run."""
    if resume:
        if out is None:
            raise RunError("--resume needs --out DIR (the run to continue)")
        run_dir = Path(out)
        if not (run_dir / "config.json").is_file():
            raise RunError(f"--resume: {str(run_dir)!r} holds no run (no config.json)")
        _lock(run_dir)
        try:
            saved = build(json.loads((run_dir / "config.json").read_text()), [])
        except ValueError as e:
            _unlock(run_dir)
            raise RunError(f"--resume: {run_dir / 'config.json'} is not a valid config ({e})") from None
        flat = {f"{sec}.{k}": v for sec, vals in saved.to_dict().items() for k, v in vals.items()}
        changed = {k: v for k, v in (overrides or {}).items() if flat.get(k) != v}
        locked = sorted(set(changed) - set(resumable_keys()))
        if locked:
            _unlock(run_dir)
            raise RunError(f"--resume: cannot change {locked} of an existing run (only "
                           f"{resumable_keys()})")
        return run_dir, saved.with_values(changed, "--resume")  # config.json: after load
    run_dir = Path(out) if out is not None else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {str(run_dir)!r}: expected a directory, got an existing file")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"--out {str(run_dir)!r} already holds files; use --resume to continue "
                       "that run, or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _lock(run_dir)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
    except OSError as e:
        _unlock(run_dir)
        raise RunError(f"--out {str(run_dir)!r}: cannot write the run directory "
                       f"({e.strerror or e})") from None
    return run_dir, cfg


def read_metrics(run_dir) -> list[dict]:
    """The records of metrics.jsonl; a line that is not JSON (torn by a crash) is skipped."""
    return _split_metrics(Path(run_dir) / "metrics.jsonl")[0]


def _split_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """(records, lines that do not parse)."""
    if not path.is_file():
        return [], []
    good, bad = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a metrics record")
            good.append(rec)
        except ValueError:
            bad.append(line)
    return good, bad


def _keep_metrics_before(run_dir: Path, step: int) -> int:
    """Resume at ``step``: metrics.jsonl keeps the records of steps < step; the others (and
    torn lines) are appended to metrics.discarded.jsonl. Returns how many moved."""
    path = run_dir / "metrics.jsonl"
    records, torn = _split_metrics(path)
    kept = [r for r in records if r["step"] < step]
    moved = [json.dumps(r) for r in records if r["step"] >= step] + torn
    if moved:
        append_lines(run_dir / "metrics.discarded.jsonl", moved)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(moved)


class RunLock:
    """An exclusive flock on ``<run>/.lock`` for the life of a run (released by close or at
    process exit): a second process on the same run directory stops with a clear error."""

    def __init__(self, run_dir: Path):
        import fcntl
        self.file = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise RunError(f"--out {str(run_dir)!r} is in use by another process (pid {holder}); "
                           "wait for it to end or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def close(self) -> None:
        self.file.close()  # closing the descriptor releases the lock


_LOCKS: dict[str, RunLock] = {}


def _lock(run_dir: Path) -> None:
    _LOCKS[str(run_dir)] = RunLock(run_dir)


def _unlock(run_dir) -> None:
    lock = _LOCKS.pop(str(run_dir), None)
    if lock is not None:
        lock.close()


def _append(path: Path, records: list[dict]) -> None:
    append_lines(path, [json.dumps(r) for r in records])


def chance_level(cfg: TrainConfig, records: list[dict] = ()) -> float:
    """1 / the number of candidates the energy loss ranks: as logged ("chance"), else from
    the config (swap: the batch; explicit / margin: 1 + the structured negatives)."""
    logged = [r["chance"] for r in records if "chance" in r]
    if logged:
        return logged[-1]
    return 1.0 / (cfg.run.batch_size if cfg.energy.loss == "swap" else 1 + cfg.energy.num_negatives())


def summarize(cfg: TrainConfig, records: list[dict], wall: float) -> dict:
    def window(key, last: bool):
        s, v = series(records, key)
        v = v[np.isfinite(v)]
        if not len(v):
            return None
        n = max(1, min(len(v) // 10, 50))
        return float(np.mean(v[-n:] if last else v[:n]))

    def probe(key, last: bool):
        pts = [r[key] for r in records if key in r]
        return (pts[-1] if last else pts[0]) if pts else None

    def mean(key):
        s, v = series(records, key)
        return float(np.mean(v)) if len(v) else None

    s_t, v_t = series(records, "time_step")
    return {
        "policy": cfg.run.policy, "strategy": cfg.run.strategy,
        "steps": int(max([r["step"] for r in records] + [-1]) + 1),
        "batch_size": cfg.run.batch_size, "energy_loss_kind": cfg.energy.loss,
        "l1_first": window("l1", False), "l1_last": window("l1", True),
        "energy_first": window("energy_loss", False), "energy_last": window("energy_loss", True),
        "rank_acc_first": window("rank_acc", False), "rank_acc_last": window("rank_acc", True),
        "rank_acc_chance": chance_level(cfg, records),
        "probe_l1_start": probe("probe_l1", False), "probe_l1_end": probe("probe_l1", True),
        "probe_rank_acc_start": probe("probe_rank_acc", False),
        "probe_rank_acc_end": probe("probe_rank_acc", True),
        "energy_grad_theta_max": (float(np.max(series(records, "energy_grad_theta")[1]))
                                  if len(series(records, "energy_grad_theta")[1]) else None),
        "drift_context_mean": mean("drift_context"), "drift_negatives_mean": mean("drift_negatives"),
        "sec_per_step": float(np.median(v_t)) if len(v_t) else None,
        "sec_phase1": mean("time_phase1"), "sec_phase2": mean("time_phase2"),
        "wall_seconds": wall,
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def summary_table(s: dict) -> str:
    rows = [("strategy", s["strategy"]), ("steps", s["steps"]),
            ("L1 (train, first -> last 10%)", f"{_fmt(s['l1_first'])} -> {_fmt(s['l1_last'])}"),
            ("L1 (held-out probe, start -> end)",
             f"{_fmt(s['probe_l1_start'])} -> {_fmt(s['probe_l1_end'])}"),
            (f"energy loss ({s['energy_loss_kind']})",
             f"{_fmt(s['energy_first'])} -> {_fmt(s['energy_last'])}"),
            ("ranking accuracy (train)",
             f"{_fmt(s['rank_acc_first'])} -> {_fmt(s['rank_acc_last'])} (chance {_fmt(s['rank_acc_chance'])})"),
            ("ranking accuracy (probe, start -> end)",
             f"{_fmt(s['probe_rank_acc_start'])} -> {_fmt(s['probe_rank_acc_end'])}"),
            ("energy grad into theta (max)", _fmt(s["energy_grad_theta_max"])),
            ("context / negatives drift per step", f"{_fmt(s['drift_context_mean'])} / "
                                                    f"{_fmt(s['drift_negatives_mean'])}"),
            ("seconds per step (median)", _fmt(s["sec_per_step"])),
            ("phase 1 / phase 2 seconds (mean)", f"{_fmt(s['sec_phase1'])} / {_fmt(s['sec_phase2'])}"),
            ("wall seconds", _fmt(s["wall_seconds"]))]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k.ljust(w)} | {v} |" for k, v in rows]
    return "\n".join(lines)


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
            _unlock(run_dir)
        distributed.teardown(ctx)
        raise
    threads = torch.get_num_threads()
    device = resolve_device(cfg.run.device) if ctx is None else ctx.device
    if cfg.run.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.run.threads)
    try:
        trainer = build_trainer(cfg, device, ctx, policy=policy, energy=energy, data=data,
                                probe=probe)
        return _train(trainer, run_dir, resume, echo, ctx, keep_stop="run.stop_after" in ov)
    except BaseException as e:
        e2 = e if ctx is None else distributed.explain(e, ctx, cfg.dist.timeout)
        if ctx is None or ctx.rank == 0:
            _record_error(run_dir, resume, e2)
        if e2 is not e:
            raise e2 from e
        raise
    finally:
        _unlock(run_dir)
        torch.set_num_threads(threads)
        distributed.teardown(ctx)


def _retire_error(run_dir: Path) -> None:
    """A resume continues past a failure: error.txt moves to the end of error.history.txt."""
    path = run_dir / "error.txt"
    if path.is_file():
        append_lines(run_dir / "error.history.txt", [path.read_text().rstrip(), "-" * 40])
        path.unlink()


def _record_error(run_dir: Path, resume: bool, e: BaseException) -> None:
    """error.txt: why the run failed. A failed --resume appends (the original error stays); a
    finished run stays finished (no error.txt beside complete.json). Never raises."""
    if is_complete(run_dir):
        return
    text = f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
    try:
        path = run_dir / "error.txt"
        if resume and path.is_file():
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            text = path.read_text() + f"\n--- --resume at {stamp} failed ---\n" + text
        atomic_write_text(path, text)
    except OSError:  # e.g. a read-only or full filesystem: the raised error still says why
        pass


def build_trainer(cfg: TrainConfig, device: torch.device, ctx=None, *, policy=None, energy=None,
                  data=None, probe=None) -> Trainer:
    """The policy (the user's, or built by run.policy's factory), the energy model and the
    data in a Trainer, checked once (data, policy outputs) and distributed under torchrun."""
    if policy is None:
        setup = resolve_factory(cfg.run.policy)(cfg, device)
        if not isinstance(setup, Setup):
            raise TypeError(f"run.policy (--policy) {cfg.run.policy!r}: the factory must return "
                            f"energy_train.policies.Setup(policy, data, probe=None, energy=None), "
                            f"got {type(setup).__name__}")
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
    trainer.clock.start()
    cfg = trainer.cfg
    main = ctx is None or ctx.rank == 0
    if not main:
        echo = lambda *a, **k: None  # noqa: E731 - rank 0 speaks for the run
    metrics_path = run_dir / "metrics.jsonl"
    loaded = None
    if resume:
        try:
            loaded = checkpoint.restore(trainer, run_dir)  # every rank
        except checkpoint.CheckpointError as e:
            if any((run_dir / "checkpoints").glob("step_*")):
                raise  # checkpoints exist but none is intact: never start over silently
            # the run died before its first checkpoint: nothing to lose, start it over
            echo(f"{e}; the run died before its first checkpoint: starting it over from step 0 "
                 "with its saved config")
        trainer.dp.barrier()  # every rank has read the files before rank 0 rewrites any
    step = 0 if loaded is None else loaded.step
    if resume:
        for why in (loaded.skipped if loaded is not None else []):
            echo(f"warning: skipped a newer checkpoint: {why}")
        if cfg.run.stop_after and cfg.run.stop_after <= step and not keep_stop:
            # the saved stop point is reached: a plain --resume continues to run.steps (else it
            # would stop at once and suggest the same --resume again)
            cfg = trainer.cfg = cfg.with_values({"run.stop_after": 0}, "--resume")
        if main:
            (run_dir / "complete.json").unlink(missing_ok=True)
            _retire_error(run_dir)
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
            moved = _keep_metrics_before(run_dir, step if loaded is not None else -1)
            if moved:
                echo(f"moved {moved} metrics row(s) after step {step} to metrics.discarded.jsonl")
        note = "" if trainer.feed.exact_resume else (" (iterable data: the consumed batches are "
                                                     "skipped; exact only if it replays its order)")
        echo(f"resumed {run_dir} at step {step}{note}")
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
                _append(metrics_path, records)
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
    if not main:
        return RunResult(run_dir, True, None, trainer)
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


def is_complete(run_dir) -> bool:
    return (Path(run_dir) / "complete.json").is_file()


__all__ = ["train", "build_trainer", "RunResult", "RunError", "summarize", "summary_table",
           "read_metrics", "is_complete"]
