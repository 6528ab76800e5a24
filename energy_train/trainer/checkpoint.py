"""Checkpoint I/O, all of it: what is saved and under which names, gathering shards and
per-rank state, and the atomic files.

- ``theta.safetensors``: theta's TRAINABLE tensors only (a frozen base is never written),
  named ``backbone.<name>``, ``action_head.<name>``, ``extras.<key>.<name>`` - the module's own
  parameter names behind its prefix, so ``policy.backbone.load_state_dict(sub, strict=False)``
  (or peft's ``set_peft_model_state_dict``) loads them back (:func:`split_theta`).
- ``phi.safetensors``: the energy model's state_dict.
- ``state.pt``: optimizers, schedulers, RNG, step, strategy state, the drift reference; under
  torchrun each rank's RNG and strategy state in ``state["ranks"]``.

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


# --------------------------------------------------------------------------------------------
# what a trainer saves, and loading it back
# --------------------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value (an FSDP DTensor is gathered: a collective on every rank)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def theta_state(policy) -> dict[str, torch.Tensor]:
    """theta's trainable tensors by checkpoint name (CPU)."""
    return {name: _full(p).cpu() for name, p in policy.named_trainable()}


def split_theta(theta: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"backbone": {...}, "action_head": {...}, "extras.<key>": {...}} of a theta state."""
    out: dict[str, dict] = {}
    for k, v in theta.items():
        prefix, _, name = k.partition(".")
        if prefix == "extras":
            key, _, name = name.partition(".")
            prefix = f"extras.{key}"
        out.setdefault(prefix, {})[name] = v
    return out


@torch.no_grad()
def load_theta_state(policy, theta: dict[str, torch.Tensor]) -> None:
    """Copy a theta state into the policy's trainable parameters (FSDP shards included);
    the names must match exactly."""
    params = dict(policy.named_trainable())
    missing, unexpected = sorted(set(params) - set(theta)), sorted(set(theta) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"--resume: the checkpoint's theta does not match the policy's "
                              f"trainable parameters (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]})")
    for name, p in params.items():
        value = theta[name]
        if hasattr(p, "device_mesh"):  # an FSDP DTensor: this rank's shard of the full value
            from torch.distributed.tensor import distribute_tensor
            value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointError(f"--resume: theta tensor {name}: expected shape "
                                  f"{tuple(p.shape)}, got {tuple(value.shape)}")
        p.copy_(value)


def _cpu(obj):
    return torch.utils._pytree.tree_map(
        lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, obj)


def payload(trainer):
    """(theta, phi, state) to save, on rank 0; None on the others (a collective under
    torchrun: FSDP shards are gathered, per-rank RNG and strategy state collected)."""
    dp = trainer.dp
    state = trainer.state_dict()
    main_or_sharded = dp.is_main or dp.fsdp  # gathering FSDP shards is a collective
    theta = theta_state(trainer.policy) if main_or_sharded else None
    phi = dict(trainer.energy.state_dict())
    if dp.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)
        state["opt_theta"] = get_optimizer_state_dict(
            trainer.policy.root(), trainer.opt_theta,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dp.active:
        ranks = dp.gather_object(_cpu({"rng": state["rng"], "strategy": state["strategy"]}))
        if not dp.is_main:
            return None
        state["ranks"] = ranks
    return theta, phi, state


def save(trainer, run_dir: str | Path) -> None:
    """Rank 0 writes (atomically) what every rank contributed; every rank waits for it."""
    out = payload(trainer)
    if trainer.dp.is_main:
        save_checkpoint(run_dir, trainer.step, *out)
        trainer.policy.save_extra(Path(run_dir), trainer.step, out[0], out[1])  # its own layout
    trainer.dp.barrier()


def restore(trainer, run_dir: str | Path) -> int:
    """Load the latest checkpoint of ``run_dir`` into the trainer (every rank); its step."""
    step, theta, phi, state = load_checkpoint(run_dir, map_location=trainer.device)
    dp = trainer.dp
    ranks = state.pop("ranks", None)
    written = 1 if ranks is None else len(ranks)
    if written != dp.world_size:
        raise CheckpointError(f"--resume: the checkpoint was written by {written} process(es), "
                              f"this run has {dp.world_size}; resume with the same world size")
    if ranks is not None:
        state["rng"], state["strategy"] = ranks[dp.rank]["rng"], ranks[dp.rank]["strategy"]
    load_theta_state(trainer.policy, theta)
    if dp.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        set_optimizer_state_dict(trainer.policy.root(), trainer.opt_theta, state["opt_theta"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        trainer.opt_theta.load_state_dict(state["opt_theta"])
    trainer.energy.load_state_dict(phi)
    trainer.load_state_dict(state)
    return step
