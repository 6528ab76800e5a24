"""A run directory: creating or reopening it, its lock, its metrics file, its error record.

<run>/config.json        the resolved config (written first)
<run>/metrics.jsonl      one record per step (+ step -1: the probe before training)
<run>/checkpoints/       step_<N>/{theta,phi}.safetensors, state.pt, meta.json; latest.json
<run>/curves.png         L1, energy loss, ranking accuracy, per-phase time
<run>/summary.md|json    the summary table (summary.py)
<run>/complete.json      written LAST: only a run with this file is complete
<run>/error.txt          why a run failed (no complete.json then); a failed --resume appends,
                         a resume that gets going moves it to error.history.txt
<run>/metrics.discarded.jsonl  rows a resume took out of metrics.jsonl (after its checkpoint,
                         or torn by a crash): moved here, never deleted
<run>/.lock              held (flock) by the process that runs it: one process at a time

Every file is written whole (energy_train/files.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from ..config import TrainConfig, build, resumable_keys
from ..files import append_lines, atomic_write_text


class RunError(RuntimeError):
    pass


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
            unlock(run_dir)
            raise RunError(f"--resume: {run_dir / 'config.json'} is not a valid config ({e})") from None
        flat = {f"{sec}.{k}": v for sec, vals in saved.to_dict().items() for k, v in vals.items()}
        changed = {k: v for k, v in (overrides or {}).items() if flat.get(k) != v}
        locked = sorted(set(changed) - set(resumable_keys()))
        if locked:
            unlock(run_dir)
            raise RunError(f"--resume: cannot change {locked} of an existing run (only "
                           f"{resumable_keys()})")
        # the one --resume rule: a resume runs to run.steps unless the command gives a new
        # --stop-after; the saved stop point never applies (it may lie before or after the
        # checkpoint a fallback loads). run.py refuses a --steps / --stop-after the run is past.
        changed["run.stop_after"] = (overrides or {}).get("run.stop_after", 0)
        try:
            return run_dir, saved.with_values(changed, "--resume")  # config.json: after load
        except ValueError:
            unlock(run_dir)
            raise
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
        unlock(run_dir)
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


def keep_metrics_before(run_dir: Path, step: int) -> int:
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
        try:
            self.file = open(run_dir / ".lock", "a+")
        except OSError as e:  # a read-only run directory (or filesystem)
            raise RunError(f"--out {str(run_dir)!r}: cannot open {run_dir / '.lock'} "
                           f"({e.strerror or e}); the run directory must be writable") from None
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


def unlock(run_dir) -> None:
    lock = _LOCKS.pop(str(run_dir), None)
    if lock is not None:
        lock.close()


def append_metrics(path: Path, records: list[dict]) -> None:
    """Append metrics records to metrics.jsonl (one JSON line each, fsync'd); a full or
    read-only disk is a RunError naming the file."""
    try:
        append_lines(path, [json.dumps(r) for r in records])
    except OSError as e:
        steps = f"steps {records[0]['step']}..{records[-1]['step']}" if records else "no step"
        raise RunError(f"cannot append the metrics of {steps} to {path} ({e.strerror or e}); "
                       "make room, then --resume (it continues from the last checkpoint)") from None


def retire_error(run_dir: Path) -> None:
    """A resume continues past a failure: error.txt moves to the end of error.history.txt."""
    path = run_dir / "error.txt"
    if path.is_file():
        append_lines(run_dir / "error.history.txt", [path.read_text().rstrip(), "-" * 40])
        path.unlink()


def record_error(run_dir: Path, resume: bool, e: BaseException) -> None:
    """error.txt: why the run failed. A failed --resume appends (the original error stays); a
    finished run stays finished (no error.txt beside complete.json). Never raises: when it
    cannot be written, the reason goes to stderr."""
    if run_dir is None or is_complete(run_dir):
        return
    text = f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
    path = run_dir / "error.txt"
    try:
        if resume and path.is_file():
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            text = path.read_text() + f"\n--- --resume at {stamp} failed ---\n" + text
        atomic_write_text(path, text)  # leaves no temporary file when it fails
    except OSError as why:  # e.g. a read-only or full filesystem: say so; the error follows
        print(f"energy-train: could not write {path} ({why.strerror or why})", file=sys.stderr)


def is_complete(run_dir) -> bool:
    """Whether the run finished (complete.json, written last, is there)."""
    return (Path(run_dir) / "complete.json").is_file()


__all__ = ["RunError", "RunLock", "prepare_run_dir", "default_run_dir", "read_metrics",
           "keep_metrics_before", "append_metrics", "retire_error", "record_error", "unlock",
           "is_complete"]
