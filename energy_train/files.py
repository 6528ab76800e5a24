"""Files that are whole or absent: every file a run, a checkpoint or a study writes goes
through here.

- :func:`atomic_write_text` / :func:`atomic_write_bytes`: a temporary file beside the target,
  fsync'd, ``os.replace``d onto it, the directory fsync'd - a reader sees the old file or the
  new one, never a torn one.
- :func:`write_synced`: one file of a directory that is itself renamed into place (a
  checkpoint), fsync'd; returns its sha256.
- :func:`append_lines`: lines appended and fsync'd (metrics.jsonl, the error history).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """fsync a directory (its entries: a rename into it survives a crash)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` and fsync it; returns its sha256 (hex)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """A temporary file beside ``path``, fsync'd and renamed onto it; on a failure (a full or
    read-only disk) the temporary file is removed and the OSError names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_lines(path: str | Path, lines: list[str]) -> None:
    """Append ``lines`` (each without its newline) and fsync; an OSError names ``path``."""
    try:
        with open(path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


__all__ = ["fsync_dir", "write_synced", "atomic_write_bytes", "atomic_write_text", "append_lines"]
