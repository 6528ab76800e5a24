"""Training configuration: sections of typed, range-checked keys, filled by defaults < TOML
file < ``--set`` < explicit CLI flags.

Sections (TOML tables; ``--set section.key=value``)::

    [run]       what to train and how long: policy, strategy, steps, batch, device, precision, ...
    [optim]     theta's and phi's AdamW, schedules, clipping
    [energy]    the energy model and its loss
    [strategy]  every strategy's options (declared beside it: energy_train/strategies.py)
    [dist]      several processes (torchrun)
    [policy]    the options of the policy named by run.policy (e.g. the tiny VLA's sizes)

Every key is declared once, with its type and range (:func:`~energy_train.knobs.knob`); a
value is checked where it enters (TOML, ``--set``, flags, ``compare`` specs), before a run
directory exists, and the error names the key: ``optim.lr: expected a number >= 0, got
-0.1``. Unknown keys are errors that suggest the closest known key. The flat keys of earlier
versions (``lr``, ``d_model``, ``energy_hidden``, ...) are mapped to their section
(:data:`FLAT`); they keep working.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .checks import check_multiple
from .knobs import check_value, kind_of, knob, section_fields
from .policies import options_class
from .strategies import STRATEGIES, StrategyConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENERGY_LOSSES = ("swap", "explicit", "margin")
PICKS = r"\s*((first|middle|last|-?\d+)\s*(,\s*(first|middle|last|-?\d+)\s*)*)?"
FLOATS = r"\s*((\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*(,\s*(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*)*)?"


@dataclass
class RunConfig:
    policy: str = knob("tiny", what="a registered policy name or module:factory")
    strategy: str = knob("two_phase", choices=tuple(STRATEGIES))
    steps: int = knob(800, ge=1, resumable=True)          # optimizer steps (the schedules' length)
    stop_after: int = knob(0, ge=0, resumable=True)       # stop (checkpointed) after this step; 0 = off
    batch_size: int = knob(16, ge=1)                      # the GLOBAL batch (split over ranks)
    grad_accum: int = knob(1, ge=1)                       # micro-batches per optimizer step
    seed: int = knob(0, ge=0)
    device: str = knob("auto", resumable=True, pattern=r"auto|cpu|cuda(:\d+)?",
                       what="auto, cpu, cuda or cuda:N")
    precision: str = knob("fp32", choices=("fp32", "bf16"))  # autocast of the policy forwards
    log_every: int = knob(25, ge=1, resumable=True)       # metrics read back once per interval
    ckpt_every: int = knob(200, ge=0, resumable=True)     # every N steps (and at the end); 0 = end only
    probe_every: int = knob(25, ge=0)                     # held-out metrics + drift; 0 = off
    lag_every: int = knob(0, ge=0)  # the one-step lag effect every N steps (step-indexed data); 0 = off
    progress: bool = knob(True, resumable=True)
    threads: int = knob(1, ge=0, resumable=True)          # CPU intra-op threads; 0 = torch's default
    overlap: bool = knob(True, resumable=True)            # CUDA: phase 2(k) beside phase 1(k+1)
    # CUDA: the step's parts as CUDA graphs (trainer/graphs.py); auto: where capturable, else
    # eager with a warning naming why, ignored off CUDA; on: an error instead; off: never
    cuda_graphs: str = knob("auto", choices=("auto", "on", "off"), resumable=True)
    capture: str = knob("hooks", choices=("hooks", "hidden_states"))
    check_data: bool = knob(True)                         # step-indexed data: NaN/inf check at start
    log: str = knob("none", choices=("none", "wandb", "tensorboard"), resumable=True)  # + metrics.jsonl


@dataclass
class OptimConfig:
    lr: float = knob(1e-3, ge=0.0)                        # theta: backbone + head + extras
    weight_decay: float = knob(0.0, ge=0.0)
    grad_clip: float = knob(0.0, ge=0.0)                  # theta; 0 = off
    energy_lr: float = knob(1e-3, ge=0.0)                 # phi: the energy model
    energy_weight_decay: float = knob(0.0, ge=0.0)
    energy_grad_clip: float = knob(1.0, ge=0.0)           # the public fork's value; 0 = off
    # phi's optimizer step is skipped (its grads dropped) for the first N optimizer steps: the
    # fork's energy_warm_steps (energy.warmup_steps is another thing: a loss-weight ramp)
    energy_skip_steps: int = knob(0, ge=0)
    warmup_steps: int = knob(20, ge=0)                    # linear LR warm-up (both optimizers)
    schedule: str = knob("cosine", choices=("cosine", "constant"))
    min_lr_ratio: float = knob(0.1, ge=0.0, le=1.0)       # cosine floor, a fraction of lr


@dataclass
class EnergyConfig:
    hidden: int = knob(64, ge=1)
    heads: int = knob(4, ge=1)
    output: str = knob("unbounded", choices=("unbounded", "sigmoid", "softplus"))
    loss: str = knob("swap", choices=ENERGY_LOSSES)       # swap | explicit | margin
    tau: float = knob(0.5, gt=0.0)                        # InfoNCE temperature
    warmup_steps: int = knob(0, ge=0)                     # energy-loss weight ramps 0 -> 1
                                                          # (phi still steps: optim.energy_skip_steps skips)
    logit_lens: bool = knob(True)                         # final norm on intermediate layers' rows
    # fp32 as the public fork runs it now; bf16 = autocast; bf16_weights = the model cast to
    # bf16 (the fork's first recipe: AdamW then updates bf16 weights)
    precision: str = knob("fp32", choices=("fp32", "bf16", "bf16_weights"))
    # the energy model's context: the policy's context rows + pad mask ("policy"), or every
    # row of the last hidden state, nothing masked (action rows included: the fork's first recipe)
    context: str = knob("policy", choices=("policy", "all"))
    action_residual: bool = knob(False)                   # the fork's gate_a path (see EnergyModel)
    # explicit / margin negatives (losses.structured_negatives): layer actions picked by
    # position ("first", "middle", "last" or an index into the layer actions), the policy's own
    # prediction, Gaussian noise (sigma; 0 = none), amplitude scalings (tie with the expert
    # under the action encoder's per-step LayerNorm: off), a sign flip of one dimension
    layer_picks: str = knob("first,middle", pattern=PICKS,
                            what="comma-separated layer picks: first, middle, last or integers")
    own_prediction: bool = knob(True)
    noise_sigma: float = knob(0.3, ge=0.0)
    amplitudes: str = knob("", pattern=FLOATS, what="comma-separated positive numbers (or empty)")
    sign_flip: bool = knob(True)

    def picks(self) -> list[str]:
        """The entries of energy.layer_picks ("first", "middle", "last" or an integer)."""
        return [p.strip() for p in self.layer_picks.split(",") if p.strip()]

    def num_negatives(self) -> int:
        """M, the structured negatives per sample of the explicit / margin losses."""
        return (len(self.picks()) + self.own_prediction + (self.noise_sigma > 0) +
                len(parse_floats(self.amplitudes)) + self.sign_flip)

    def theta_negatives(self) -> int:
        """How many of those come from the policy's weights (the picked layer actions and the
        own prediction; they come first); 0 for the swap loss, which uses none."""
        return 0 if self.loss == "swap" else len(self.picks()) + int(self.own_prediction)


@dataclass
class DistConfig:
    global_negatives: bool = knob(True)  # swap InfoNCE against the expert chunks of EVERY rank
    fsdp: bool = knob(False)             # shard the policy's decoder layers with FSDP2
    find_unused_parameters: bool = knob(False)  # DDP: needed when some theta gets no grad (OFT)
    timeout: float = knob(300.0, gt=0.0, resumable=True)  # seconds a collective may wait


SECTIONS = {"run": RunConfig, "optim": OptimConfig, "energy": EnergyConfig,
            "strategy": StrategyConfig, "dist": DistConfig}

# flat keys of earlier versions -> section.key (others: a field name unique across sections)
FLAT = {"energy_hidden": "energy.hidden", "energy_heads": "energy.heads",
        "energy_output": "energy.output", "energy_loss": "energy.loss", "tau": "energy.tau",
        "energy_warmup_steps": "energy.warmup_steps", "logit_lens": "energy.logit_lens",
        "warmup_steps": "optim.warmup_steps", "precision": "run.precision",
        "dist_timeout": "dist.timeout"}


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    policy: Any = None  # the options of run.policy: its options dataclass, or a dict

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        p = self.policy
        out["policy"] = dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(p or {})
        return out

    def with_values(self, values: dict[str, Any], where: str) -> "TrainConfig":
        """A copy with ``values`` ({"section.key" or flat key: value}) set and checked."""
        return build(self.to_dict(), [(values, where)])

    def validate(self) -> "TrainConfig":
        """Checks between keys (each key alone is checked where it is set)."""
        if self.run.stop_after > self.run.steps:
            raise ValueError(f"run.stop_after: expected 0..run.steps={self.run.steps}, "
                             f"got {self.run.stop_after}")
        check_multiple("energy.hidden", self.energy.hidden, "energy.heads", self.energy.heads)
        if self.energy.loss == "swap" and self.run.batch_size < 2:
            raise ValueError(f"run.batch_size: the swap loss (energy.loss='swap') scores each "
                             f"sample against the batch's other chunks; expected >= 2, got "
                             f"{self.run.batch_size} (a loss of exactly 0, ranking accuracy 1.0 = "
                             "chance); raise it, or use energy.loss='explicit' (structured "
                             "negatives)")
        if self.energy.loss != "swap":
            if self.energy.num_negatives() == 0:
                raise ValueError(f"energy.loss={self.energy.loss!r}: every kind of negative is off "
                                 "(energy.layer_picks, own_prediction, noise_sigma, amplitudes, "
                                 "sign_flip)")
        STRATEGIES[self.run.strategy].check(self)
        check = getattr(self.policy, "validate", None)
        if check is not None:
            check(self)
        return self


def parse_floats(text: str) -> list[float]:
    """"0.3, 1.7" -> [0.3, 1.7]; "" -> []."""
    return [float(x) for x in text.split(",") if x.strip()]


# --------------------------------------------------------------------------------------------
# building a config from layers of values
# --------------------------------------------------------------------------------------------
def key_map(policy_cls) -> dict[str, str]:
    """Every accepted key spelling -> "section.key"."""
    out = {}
    count: dict[str, int] = {}
    sections = dict(SECTIONS, **({"policy": policy_cls} if policy_cls is not None else {}))
    for sec, cls in sections.items():
        for name in section_fields(cls):
            out[f"{sec}.{name}"] = f"{sec}.{name}"
            count[name] = count.get(name, 0) + 1
    for sec, cls in sections.items():
        for name in section_fields(cls):
            if count[name] == 1 and name not in FLAT:
                out.setdefault(name, f"{sec}.{name}")
    out.update(FLAT)
    return out


def _resolve_key(key: str, keys: dict[str, str], where: str, free_policy: bool) -> str:
    if key in keys:
        return keys[key]
    if free_policy and key.startswith("policy."):
        return key
    close = difflib.get_close_matches(key, list(keys), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{where}: unknown config key {key!r}{hint}")


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; flat keys stay flat."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict) and not prefix and (k in SECTIONS or k == "policy"):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[f"{prefix}{k}"] = v
    return out


def build(base: dict, layers: list[tuple[dict, str]]) -> TrainConfig:
    """A config from a nested ``base`` (e.g. to_dict() of another config) and layers of values
    ({key: value}, where) applied in order. Each value is checked as it is applied (so an
    overridden bad value is still an error); the policy section follows run.policy."""
    flat = flatten(base)
    policy_name = flat.get("run.policy", RunConfig.policy)
    for values, where in layers:  # run.policy decides the policy section's keys: find it first
        for k, v in flatten(values).items():
            if k in ("policy", "run.policy"):
                policy_name = check_value("run.policy", str, {}, v)
    pcls = options_class(policy_name)
    keys = key_map(pcls)
    if flat.get("run.policy", policy_name) != policy_name:  # another policy: its own defaults
        flat = {k: v for k, v in flat.items() if not k.startswith("policy.")}
    checked: dict[str, Any] = {}
    for values, where in [(flat, "config")] + layers:
        for k, v in flatten(values).items():
            key = _resolve_key(k, keys, where, pcls is None)
            checked[key] = _check(key, v, pcls)
    checked["run.policy"] = policy_name
    sections = {}
    for sec, cls in SECTIONS.items():
        sections[sec] = cls(**{k.split(".", 1)[1]: v for k, v in checked.items()
                               if k.startswith(sec + ".")})
    popts = {k.split(".", 1)[1]: v for k, v in checked.items() if k.startswith("policy.")}
    policy = pcls(**popts) if pcls is not None else popts
    return TrainConfig(**sections, policy=policy).validate()


class Typed(str):
    """A value typed on the command line (``--set``, a ``compare`` spec): text. A declared key
    parses it as its type; a key of a free-form ``[policy]`` table as a TOML literal."""


def free_value(key: str, value):
    """A value of a free-form ``[policy]`` table (a factory without ``options``): from a TOML
    file or Python as given; typed on the command line (:class:`Typed`) parsed as a TOML
    literal - ``true``, ``3``, ``0.5``, ``"text"`` (a string in quotes), ``[1, 2]`` - or refused:
    ``--set policy.lora=false`` must not reach a factory as the (truthy) string 'false'."""
    if not isinstance(value, Typed):
        return value
    hint = (f"{key}: the [policy] table of a factory without options takes TOML values from the "
            f"command line (true, 3, 0.5, a string in quotes: --set '{key}=\"text\"')")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        raise ValueError(f"{hint}, got {str(value)!r}; or declare the factory's options "
                         "(factory.options = a dataclass of energy_train.knobs.knob(...) fields) "
                         "to have each key typed and checked") from None
    plain = (bool, int, float, str, list, dict)
    if not isinstance(parsed, plain) or (isinstance(parsed, (list, dict)) and not json_safe(parsed)):
        raise ValueError(f"{hint}, got {str(value)!r} (a {type(parsed).__name__}, which config.json "
                         "cannot hold)")
    return parsed


def json_safe(v) -> bool:
    if isinstance(v, list):
        return all(json_safe(x) for x in v)
    if isinstance(v, dict):
        return all(json_safe(x) for x in v.values())
    return isinstance(v, (bool, int, float, str))


def _check(key: str, value, pcls):
    sec, name = key.split(".", 1)
    cls = SECTIONS.get(sec) or pcls
    if cls is None:  # a free-form policy section: as given (command-line text: a TOML literal)
        return free_value(key, value)
    f = section_fields(cls)[name]
    return check_value(key, kind_of(f), dict(f.metadata), value)


def resumable_keys() -> tuple[str, ...]:
    return tuple(f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in fields(cls)
                 if f.metadata.get("resumable"))


def canonical(values: dict[str, Any], policy: str, where: str) -> dict[str, Any]:
    """{flat or dotted key: value} -> {"section.key": checked value}."""
    pcls = options_class(policy)
    keys = key_map(pcls)
    out = {}
    for k, v in flatten(values).items():
        key = _resolve_key(k, keys, where, pcls is None)
        out[key] = _check(key, v, pcls)
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's values: tables are sections; top-level keys may be flat (mapped)."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"--config: {what} {str(path)!r}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    for k, v in data.items():
        if isinstance(v, dict) and k not in SECTIONS and k != "policy":
            close = difflib.get_close_matches(k, [*SECTIONS, "policy"], n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            raise ValueError(f"--config {path}: unknown table [{k}]{hint}")
    return data


def load_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def resolve(toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict | None = None) -> TrainConfig:
    """defaults (or ``base``) < TOML file < overrides, each value checked."""
    layers = []
    if toml_path is not None:
        layers.append((load_toml(toml_path), f"--config {toml_path}"))
    if overrides:
        layers.append((overrides, "command line"))
    return build(base or {}, layers)


def default_config(**values) -> TrainConfig:
    """The defaults with ``values`` set (flat or dotted keys): a helper for scripts and tests."""
    return build({}, [(values, "default_config")])
