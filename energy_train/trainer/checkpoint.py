"""Atomic checkpoints: weights as safetensors, everything else (optimizers, schedulers, RNG,
step, strategy state) in a torch.save file.

Layout: ``<run>/checkpoints/step_<N>/{theta.safetensors, phi.safetensors, state.pt, meta.json}``
and ``<run>/checkpoints/latest.json``. A checkpoint is written into a temporary directory next
to its final name (every file fsync'd), renamed into place (atomic), and only then does
``latest.json`` (itself written to a temp file, fsync'd, ``os.replace``d) point at it. A crash
at any moment leaves either the previous checkpoint or the new one, never a half-written one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _write(path: Path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, theta: dict[str, torch.Tensor],
                    phi: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    buf = io.BytesIO()
    torch.save(state, buf)
    digests = {
        "theta.safetensors": _write(tmp / "theta.safetensors",
                                    st_save({k: v.detach().contiguous().cpu() for k, v in theta.items()})),
        "phi.safetensors": _write(tmp / "phi.safetensors",
                                  st_save({k: v.detach().contiguous().cpu() for k, v in phi.items()})),
        "state.pt": _write(tmp / "state.pt", buf.getvalue()),
    }
    _write(tmp / "meta.json", json.dumps({"step": step, "sha256": digests}, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. --resume of a stopped run): latest.json may
        # point at `final`; point it at the complete tmp copy while `final` is replaced
        atomic_write_text(root / "latest.json", json.dumps({"step": step, "dir": tmp.name}))
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "dir": final.name}))
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    # latest.json now names `final`: any temporary copy is stale (e.g. left by a crash mid-save)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


class CheckpointError(RuntimeError):
    pass


def load_checkpoint(run_dir: str | Path, map_location="cpu"):
    """-> (step, theta, phi, state). Raises CheckpointError with a clear message when the
    checkpoint is missing or corrupt (digest mismatch, unreadable file)."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest.json"
    if not latest.is_file():
        raise CheckpointError(f"--resume: no checkpoint in {str(run_dir)!r} (expected "
                              f"{latest}); was the run started with this --out?")
    try:
        pointer = json.loads(latest.read_text())
        ckpt = root / pointer["dir"]
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"--resume: checkpoint pointer {latest} is unreadable ({e})") from None
    blobs = {}
    for name, digest in meta["sha256"].items():
        try:
            data = (ckpt / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"--resume: checkpoint file {ckpt / name} is missing ({e})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"--resume: checkpoint file {ckpt / name} is corrupt "
                                  "(sha256 differs from meta.json)")
        blobs[name] = data
    try:
        theta = st_load(blobs["theta.safetensors"])
        phi = st_load(blobs["phi.safetensors"])
        state = torch.load(io.BytesIO(blobs["state.pt"]), map_location=map_location,
                           weights_only=False)
    except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt checkpoint
        raise CheckpointError(f"--resume: checkpoint in {ckpt} cannot be decoded ({e})") from None
    return int(meta["step"]), theta, phi, state
