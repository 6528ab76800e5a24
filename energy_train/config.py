"""Training configuration: one flat dataclass, filled by defaults < TOML file < CLI flags.

Unknown keys are errors that suggest the closest known key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = ("joint", "two_phase", "shared_forward", "alternating", "adaptive_weights",
              "cached_negatives")
ENERGY_LOSSES = ("swap", "explicit", "margin")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    # --- run --------------------------------------------------------------------------------
    strategy: str = "two_phase"
    steps: int = 800                 # total optimizer steps (the LR schedule's length)
    stop_after: int = 0              # stop (checkpointed, not complete) after this step; 0 = off
    batch_size: int = 16
    grad_accum: int = 1              # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"             # auto = cuda if available, else cpu
    log_every: int = 25              # metrics are read back from the device once per interval
    ckpt_every: int = 0              # 0 = a checkpoint at the end (and at stop_after) only
    probe_every: int = 25            # context/negative drift + held-out metrics; 0 = off
    progress: bool = True
    threads: int = 1                 # CPU intra-op threads (0 = torch's default). One thread is
                                     # the fastest for the tiny default on a shared 2-core box
    overlap: bool = True             # CUDA: phase 2 of step k on a side stream beside phase 1 of
                                     # step k+1 (same numbers); the CPU always runs in order
    capture: str = "hooks"           # hooks: keep only action/context rows (preallocated,
                                     # double-buffered); hidden_states: output_hidden_states=True
    # --- task -------------------------------------------------------------------------------
    dataset_size: int = 1024
    probe_size: int = 32
    num_objects: int = 3
    image_size: int = 16
    chunk: int = 8                   # H
    action_dim: int = 7              # Da
    check_data: bool = True          # host-side NaN/inf check of the data
    # --- tiny VLA + action head ---------------------------------------------------------------
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    patch_size: int = 4
    mlp_ratio: int = 2
    head_hidden: int = 128
    # --- energy model and loss ------------------------------------------------------------------
    energy_hidden: int = 64
    energy_heads: int = 4
    energy_output: str = "unbounded"
    energy_loss: str = "swap"        # swap | explicit (structured negatives) | margin
    # Caveat for explicit/margin: EnergyModel's action encoder starts with a LayerNorm over the
    # Da dims of each step, so the fork's amplitude negatives (x0.3, x1.7) get EXACTLY the
    # expert's energy (up to LN eps); ranking accuracy counts those ties as misses.
    tau: float = 0.5
    logit_lens: bool = True          # apply the final norm to intermediate layers' rows
    # --- optimisation -------------------------------------------------------------------------
    lr: float = 1e-3                 # theta: backbone + action head
    energy_lr: float = 1e-3          # phi: energy model
    weight_decay: float = 0.0
    energy_weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    energy_warmup_steps: int = 0     # energy loss weight ramps 0 -> 1 over these steps
    energy_grad_clip: float = 1.0    # the fork's value; 0 = off
    grad_clip: float = 0.0           # theta; 0 = off
    # --- strategy knobs -----------------------------------------------------------------------
    detach_context: bool = True      # joint only: False = the leaky diagnostic variant
    alternate_every: int = 10        # alternating: N theta steps, then N phi steps
    cache_refresh: int = 64          # cached_negatives: refresh an entry after K steps
    adaptive_window: int = 10        # adaptive_weights: losses in the variance window
    # --- several processes (torchrun; see energy_train/distributed.py) -------------------------
    # batch_size is the GLOBAL batch: each of the N ranks takes batch_size / N rows of it
    global_negatives: bool = True    # swap InfoNCE scores against the expert chunks of EVERY rank
    fsdp: bool = False               # shard the backbone with FSDP2 fully_shard (head, phi: DDP)
    dist_timeout: float = 300.0      # seconds a collective may wait for the other ranks

    def validate(self) -> "TrainConfig":
        def one_of(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                close = difflib.get_close_matches(str(v), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{name}: expected one of {allowed}, got {v!r}{hint}")
        one_of("strategy", STRATEGIES)
        one_of("energy_loss", ENERGY_LOSSES)
        one_of("schedule", SCHEDULES)
        one_of("energy_output", ("unbounded", "sigmoid", "softplus"))
        one_of("capture", ("hooks", "hidden_states"))
        for name in ("steps", "batch_size", "grad_accum", "log_every", "d_model", "n_layers",
                     "chunk", "action_dim", "alternate_every", "cache_refresh", "adaptive_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout: expected > 0 seconds, got {self.dist_timeout}")
        if not 0 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after: expected 0..steps={self.steps}, got {self.stop_after}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(TrainConfig)}[name]
    kind = {"int": int, "float": float, "bool": bool, "str": str}[kind]
    if kind is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: expected a boolean, got {value!r}")
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected a boolean, got {value!r}")
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and out != value:
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return out


def check_keys(keys, where: str) -> None:
    known = field_names()
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown config key {k!r}{hint}")


def apply(cfg: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    """A copy of cfg with ``values`` set (keys checked, values coerced to the field's type)."""
    check_keys(values, where)
    return dataclasses.replace(cfg, **{k: _coerce(k, v) for k, v in values.items()})


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {str(path)!r}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    for k, v in data.items():
        if isinstance(v, dict):
            raise ValueError(f"--config {path}: expected flat `key = value` entries, got a table "
                             f"[{k}]")
    return data


def load_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def resolve(toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    cfg = TrainConfig()
    if toml_path is not None:
        cfg = apply(cfg, load_toml(toml_path), f"--config {toml_path}")
    if overrides:
        cfg = apply(cfg, overrides, "command line")
    return cfg.validate()
