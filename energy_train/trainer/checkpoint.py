"""Checkpoint I/O, all of it: what is saved and under which names, gathering shards and
per-rank state (the files are written by :mod:`energy_train.files`).

- ``theta.safetensors``: theta's TRAINABLE tensors only (a frozen base is never written),
  named ``backbone.<name>``, ``action_head.<name>``, ``extras.<key>.<name>`` - the module's own
  parameter names behind its prefix, so ``policy.backbone.load_state_dict(sub, strict=False)``
  (or peft's ``set_peft_model_state_dict``) loads them back (:func:`split_theta`).
- ``phi.safetensors``: the energy model's state_dict.
- ``state.pt``: optimizers, schedulers, RNG, step, strategy state, the drift reference; under
  torchrun each rank's RNG and strategy state in ``state["ranks"]``.

Layout: ``<run>/checkpoints/step_<N>[.v]/{theta.safetensors, phi.safetensors, state.pt,
meta.json}`` and ``<run>/checkpoints/latest.json`` ({"step", "dir", "history"}). A save writes
a temporary directory (every file fsync'd), renames it to a name that does not exist yet (a
re-save of step N becomes ``step_<N>.1``, ...: nothing that latest.json may name is ever
removed or replaced first), and only then points ``latest.json`` (written to a temp file,
fsync'd, ``os.replace``d) at it; older directories beyond the last ``keep`` go after that. A
crash at any moment leaves the previous checkpoint or the new one loadable.

Loading verifies every file against the sha256 in meta.json and takes the step from the
checksummed state; a corrupt or unreadable latest checkpoint falls back to the previous
intact one (the reason is reported).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import files


class CheckpointError(RuntimeError):
    pass


def _pointer(root: Path) -> dict:
    try:
        p = json.loads((root / "latest.json").read_text())
        return p if isinstance(p, dict) and isinstance(p.get("dir"), str) else {}
    except (OSError, ValueError):
        return {}


def _free_name(root: Path, step: int) -> str:
    name, v = f"step_{step:07d}", 0
    while (root / name).exists():
        v += 1
        name = f"step_{step:07d}.{v}"
    return name


def save_checkpoint(run_dir: str | Path, step: int, theta: dict[str, torch.Tensor],
                    phi: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write a checkpoint atomically (see the module docstring); its directory. A filesystem
    fault raises CheckpointError naming the path and leaves no temporary directory."""
    root = Path(run_dir) / "checkpoints"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # never named by latest.json: left by a crash
            shutil.rmtree(stale, ignore_errors=True)
        name = _free_name(root, step)
        tmp = root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        buf = io.BytesIO()
        torch.save(state, buf)
        digests = {
            "theta.safetensors": files.write_synced(tmp / "theta.safetensors", st_save(
                {k: v.detach().contiguous().cpu() for k, v in theta.items()})),
            "phi.safetensors": files.write_synced(tmp / "phi.safetensors", st_save(
                {k: v.detach().contiguous().cpu() for k, v in phi.items()})),
            "state.pt": files.write_synced(tmp / "state.pt", buf.getvalue()),
        }
        files.write_synced(tmp / "meta.json",
                           json.dumps({"step": step, "sha256": digests}, indent=1).encode())
        files.fsync_dir(tmp)
        os.replace(tmp, root / name)  # a fresh name: atomic, replaces nothing
        tmp = None
        files.fsync_dir(root)
        history = [d for d in _pointer(root).get("history", []) if (root / d).is_dir()] + [name]
        files.atomic_write_text(root / "latest.json",
                          json.dumps({"step": step, "dir": name, "history": history[-keep:]}))
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        where = e.filename or root
        raise CheckpointError(f"checkpoint: cannot write {where} ({e.strerror or e}); the "
                              "previous checkpoint is intact") from None
    kept = set(history[-keep:])
    for old in root.glob("step_*"):  # older ones, and any a crash left unnamed
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


class Loaded(NamedTuple):
    step: int
    theta: dict
    phi: dict
    state: dict
    dir: Path
    skipped: list[str]  # why newer checkpoints were not used (corrupt, unreadable)


def _candidates(root: Path) -> list[Path]:
    """Checkpoint directories, the one latest.json names first, then newest first."""
    def order(p: Path):
        step, _, v = p.name[len("step_"):].partition(".")
        return (int(step) if step.isdigit() else -1, int(v) if v.isdigit() else 0)
    dirs = sorted((p for p in root.glob("step_*") if p.is_dir()), key=order, reverse=True)
    first = _pointer(root).get("dir")
    return sorted(dirs, key=lambda p: p.name != first)


def _read(ckpt: Path, map_location):
    meta = json.loads((ckpt / "meta.json").read_text())
    blobs = {}
    for name in ("theta.safetensors", "phi.safetensors", "state.pt"):
        data = (ckpt / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"][name]:
            raise CheckpointError(f"{ckpt / name} is corrupt (sha256 differs from meta.json)")
        blobs[name] = data
    theta = st_load(blobs["theta.safetensors"])
    phi = st_load(blobs["phi.safetensors"])
    state = torch.load(io.BytesIO(blobs["state.pt"]), map_location=map_location, weights_only=False)
    step = int(state["step"])  # checksummed; meta.json is not
    if meta.get("step") != step:
        raise CheckpointError(f"{ckpt / 'meta.json'} says step {meta.get('step')!r}, its "
                              f"checksummed state says {step}")
    return step, theta, phi, state


def load_checkpoint(run_dir: str | Path, map_location="cpu") -> Loaded:
    """The newest intact checkpoint of ``run_dir``. Raises CheckpointError when there is none
    (no checkpoint, or every one corrupt, each reason listed)."""
    root = Path(run_dir) / "checkpoints"
    dirs = _candidates(root) if root.is_dir() else []
    if not dirs:
        raise CheckpointError(f"--resume: no checkpoint in {str(run_dir)!r}")
    skipped = []
    for ckpt in dirs:
        try:
            step, theta, phi, state = _read(ckpt, map_location)
        except CheckpointError as e:
            skipped.append(str(e))
        except Exception as e:  # noqa: BLE001 - unreadable or undecodable: corrupt
            skipped.append(f"{ckpt} cannot be read ({type(e).__name__}: {e})")
        else:
            return Loaded(step, theta, phi, state, ckpt, skipped)
    raise CheckpointError("--resume: no intact checkpoint in " + repr(str(run_dir)) + ": " +
                          "; ".join(skipped))


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
def load_theta_state(policy, theta: dict[str, torch.Tensor], where: str = "--resume") -> None:
    """Copy a theta state into the policy's trainable parameters (FSDP shards included);
    the names must match exactly (errors start with ``where``)."""
    params = dict(policy.named_trainable())
    missing, unexpected = sorted(set(params) - set(theta)), sorted(set(theta) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{where}: the checkpoint's theta does not match the policy's "
                              f"trainable parameters (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]})")
    for name, p in params.items():
        value = theta[name]
        if hasattr(p, "device_mesh"):  # an FSDP DTensor: this rank's shard of the full value
            from torch.distributed.tensor import distribute_tensor
            value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: theta tensor {name}: expected shape "
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
            trainer.policy.root(), trainer.optim.opt_theta,
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


def restore(trainer, run_dir: str | Path) -> Loaded:
    """Load the newest intact checkpoint of ``run_dir`` into the trainer (every rank). The
    state is read on the CPU and each consumer moves what it needs: AdamW moves its moments to
    the parameters; a capturable one (CUDA, trainer/optim.py) its ``step`` counters too, a plain
    one keeps them on the CPU - on the GPU it would read them back with ``.item()`` at every
    optimizer step (a host sync)."""
    loaded = load_checkpoint(run_dir, map_location="cpu")
    theta, phi, state = loaded.theta, loaded.phi, loaded.state
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
        set_optimizer_state_dict(trainer.policy.root(), trainer.optim.opt_theta, state["opt_theta"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        trainer.optim.opt_theta.load_state_dict(state["opt_theta"])
    trainer.energy.load_state_dict(phi)
    trainer.load_state_dict(state)
    return loaded
