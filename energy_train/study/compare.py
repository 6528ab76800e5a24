"""``energy-train compare``: the stability study - several strategies (and settings) on the same
data and initial weights, over several seeds, and a report (markdown + PNG + JSON).

A spec is ``name[:key=value,...]``: a strategy and config overrides for that run, e.g.
``joint:detach_context=false`` or ``joint:energy.output=unbounded``. A spec whose theta learning
rate is 0 (``two_phase:lr=0``) is the frozen-backbone reference: its spike count is the noise
floor the others are read against.

Layout of ``--out``::

    pretrain/              the run that trains theta first (--pretrain-steps; skipped with
                           --init-from), an ordinary run directory
    seed<S>/<label>/       one ordinary run directory per seed and spec
    report.md|png|json     the study (analysis.py: its numbers, report.py: its markdown)

``--init-from RUN_DIR`` starts every run from that run's latest checkpoint: theta always,
phi too with ``--init-phi``; so "frozen" means a trained backbone, as in the public fork's
stable run. ``--preset`` picks a base config and spec list (:data:`PRESETS`): ``default``
(the explicit loss with the policy's own prediction as a negative) or ``fork`` (the public
energy fork's first recipe, with one ablation per setting). A run that stops on a non-finite
loss is recorded as diverged (its metrics up to then are kept); the study goes on.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from ..config import TrainConfig, build
from ..files import atomic_write_text
from ..policies import default_energy, resolve_factory
from ..trainer import read_metrics, resolve_device, train
from ..trainer.checkpoint import CheckpointError, load_checkpoint, load_theta_state
from .analysis import analyse, parse_spec, study
from .plots import plot_compare
from .report import conclude, render

STRATEGY_SPECS = ("joint", "joint:detach_context=false", "two_phase", "shared_forward",
                  "alternating", "adaptive_weights", "cached_negatives",
                  "two_phase:lr=0")  # lr=0: theta frozen, the reference
# The public energy fork's first recipe (HuskyKingdom/openvla-oft-yhs, finetune_Energy.py,
# August 2025): the energy model cast to bf16, the sigmoid output, no energy gradient clipping,
# theta and phi at AdamW lr 5e-4 with no warm-up and a constant schedule, the swap InfoNCE,
# and the whole last hidden state as the context with no mask. The energy model's size stays
# the study's (hidden 64 on the CPU). Each ablation puts back one setting of the default.
FORK = {"energy.precision": "bf16_weights", "energy.output": "sigmoid",
        "optim.energy_grad_clip": 0.0, "optim.lr": 5e-4, "optim.energy_lr": 5e-4,
        "optim.warmup_steps": 0, "optim.schedule": "constant", "energy.warmup_steps": 0,
        "energy.loss": "swap", "energy.context": "all"}
FORK_SPECS = ("joint", "two_phase", "two_phase:lr=0",
              "joint:energy.precision=fp32", "joint:energy.output=unbounded",
              "joint:optim.energy_grad_clip=1.0", "joint:energy.context=policy",
              "joint:optim.energy_lr=5e-2")
# theta lr 1e-2: the backbone's context rows collapse (attention over them turns uniform and
# the energy stops depending on the candidate); the action residual is the fork's way out
COLLAPSE_SPECS = ("joint:lr=1e-2", "two_phase:lr=1e-2", "joint:lr=1e-2,energy.action_residual=true")
PRESETS = {
    "default": {"base": {"energy.loss": "explicit"}, "specs": STRATEGY_SPECS + COLLAPSE_SPECS},
    "fork": {"base": FORK, "specs": FORK_SPECS},
}
# what every study run sets (explicit flags and --set still win)
STUDY = {"run.steps": 200, "run.log_every": 50, "run.probe_every": 2, "run.lag_every": 10,
         "run.progress": False, "run.ckpt_every": 0}
PRETRAIN_STEPS = 300


def default_jobs() -> int:
    """Study runs at once: one per CPU core this process may use, at most 2 (each run uses
    one thread)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(2, n))


def label(spec: str) -> str:
    return spec.replace(":", "-").replace("=", "").replace(",", "-").replace("_", "")


def parse_seeds(text: str | None, first: int) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; "3" -> 3 seeds from ``first``; None -> [first]."""
    if text is None:
        return [first]
    try:
        if "," in text:
            seeds = [int(x) for x in text.split(",") if x.strip()]
        else:
            seeds = list(range(first, first + int(text)))
    except ValueError:
        raise ValueError(f"--seeds: expected N or a comma-separated list of seeds, got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds: {text!r} asks for no seed; give N >= 1 (N seeds from --seed) "
                         "or a list of seeds (--seeds 0,1,2; one seed: --seeds 1 --seed S)")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct seeds >= 0, got {text!r}")
    return seeds


class Init:
    """theta (and optionally phi) of a trained run, loaded into every study run."""

    def __init__(self, run_dir, phi: bool):
        self.run_dir, self.phi = Path(run_dir), phi
        try:
            loaded = load_checkpoint(self.run_dir)
        except CheckpointError as e:
            raise ValueError(f"--init-from {str(run_dir)!r}: {e}".replace("--resume: ", "")) from None
        self.step, self.theta, self.phi_state = loaded.step, loaded.theta, loaded.phi

    def apply(self, policy, energy) -> None:
        where = f"--init-from {str(self.run_dir)!r}"
        try:
            load_theta_state(policy, self.theta, where=where)
            if self.phi:
                energy.load_state_dict(self.phi_state)
        except (CheckpointError, RuntimeError) as e:  # RuntimeError: load_state_dict's mismatch
            raise ValueError(f"{where}: {e}" if not str(e).startswith(where) else str(e)) from None


def _job(cfg_dict: dict, run_dir: str, init: tuple | None) -> dict:
    """One study run in a worker process (``--jobs`` > 1): everything crosses as plain data."""
    return _run(build(cfg_dict, []), Path(run_dir), None if init is None else Init(*init))


def _run(cfg: TrainConfig, run_dir: Path, init: Init | None) -> dict:
    """One study run; a non-finite loss ends it as diverged (its metrics are kept)."""
    kw = {}
    if init is not None:  # the factory's policy and data, with the trained weights loaded
        device = resolve_device(cfg.run.device)
        setup = resolve_factory(cfg.run.policy)(cfg, device)
        energy = setup.energy if setup.energy is not None else default_energy(cfg, setup.policy, device)
        init.apply(setup.policy, energy)
        kw = dict(policy=setup.policy, energy=energy, data=setup.data, probe=setup.probe)
    try:
        res = train(cfg, run_dir, echo=lambda *_: None, **kw)
        return {"summary": res.summary, "diverged": None}
    except FloatingPointError as e:
        return {"summary": None, "diverged": str(e)}


def compare(base: TrainConfig, specs=STRATEGY_SPECS, out="runs/compare", *, seeds=(0,),
            k: float = 4.0, init_from=None, init_phi: bool = False, pretrain_steps: int = 0,
            jobs: int = 1, title: str = "", echo=print) -> dict:
    """Run every spec for every seed (from ``init_from``'s weights, or from a pretraining run
    of ``pretrain_steps`` steps, or from the initialisation) and write the report. ``jobs``
    runs that many study runs at once, each in its own process (each run is deterministic
    on its own: the numbers do not depend on ``jobs``)."""
    if jobs < 1:
        raise ValueError(f"--jobs: expected an integer >= 1, got {jobs}")
    k = check_k(k)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r}: expected a directory, got an existing file")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} already holds files; choose another")
    if init_from is not None and pretrain_steps:
        raise ValueError("--init-from and --pretrain-steps: give one (the weights to start from)")
    if init_phi and init_from is None and not pretrain_steps:
        raise ValueError("--init-phi: needs --init-from RUN_DIR (or --pretrain-steps)")
    cfgs = {}
    for seed in seeds:  # every spec checked before the first run starts
        for spec in specs:
            name, kv = parse_spec(spec)
            cfgs[seed, spec] = base.with_values({"run.strategy": name, "run.seed": seed, **kv},
                                                f"--strategies {spec!r}")
    init = Init(init_from, init_phi) if init_from is not None else None
    out.mkdir(parents=True, exist_ok=True)
    pre = None
    if pretrain_steps:
        pre_cfg = base.with_values({"run.strategy": "two_phase", "run.steps": pretrain_steps,
                                    "run.lag_every": 0, "run.probe_every": 25}, "--pretrain-steps")
        echo(f"== pretrain: two_phase, {pretrain_steps} steps (theta{' and phi' if init_phi else ''} "
             "of every run start here)")
        res = train(pre_cfg, out / "pretrain", echo=lambda *_: None)
        pre = res.summary
        init = Init(out / "pretrain", init_phi)
    dirs = {key: out / f"seed{key[0]}" / label(key[1]) for key in cfgs}
    if jobs == 1:
        done = {}
        for (seed, spec), cfg in cfgs.items():
            echo(f"== seed {seed}: {spec}")
            done[seed, spec] = _run(cfg, dirs[seed, spec], init)
    else:
        plain = None if init is None else (str(init.run_dir), init.phi)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {key: pool.submit(_job, cfg.to_dict(), str(dirs[key]), plain)
                       for key, cfg in cfgs.items()}
            done = {}
            for (seed, spec), f in futures.items():
                done[seed, spec] = f.result()
                echo(f"== seed {seed}: {spec}")
    runs = [{"spec": spec, "seed": seed, "dir": str(dirs[seed, spec].relative_to(out)),
             "theta_lr": cfg.optim.lr, **done[seed, spec]} for (seed, spec), cfg in cfgs.items()]
    meta = {"title": title, "jobs": jobs, "policy": base.run.policy, "steps": base.run.steps,
            "batch_size": base.run.batch_size, "seeds": list(seeds), "specs": list(specs), "k": k,
            "init": (None if init is None else {"run_dir": str(init.run_dir), "step": init.step,
                                                 "phi": init.phi}),
            "pretrain": pre, "config": base.to_dict()}
    return write_report(out, meta, runs, k, echo)


def write_report(out: Path, meta: dict, runs: list[dict], k: float, echo=print) -> dict:
    """Analyse the runs' metrics (``runs``: spec, seed, dir relative to ``out``, theta_lr,
    summary, diverged) and write report.md|png|json."""
    k = check_k(k)
    runs = [{**r, "records": read_metrics(out / r["dir"])} for r in runs]
    runs = [{**r, **analyse(r["records"], k)} for r in runs]
    result = study(runs, k)
    result["conclusion"] = conclude(result)
    report = render({**meta, "k": k}, result, runs)  # everything computed before a file is written
    plot_compare(runs, result, out / "report.png", title=meta["title"])
    atomic_write_text(out / "report.md", report)
    slim = [{k2: v for k2, v in r.items() if k2 != "records"} for r in runs]
    atomic_write_text(out / "report.json", json.dumps({"meta": {**meta, "k": k}, "study": result,
                                                       "runs": slim}, indent=1, default=_json))
    echo(report)
    return {"runs": runs, "study": result, "out": out}


RUN_KEYS = ("spec", "seed", "dir", "theta_lr", "summary", "diverged")


def check_k(k) -> float:
    """The spike threshold: a finite number of EMA sigmas > 0 (``--k``)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
        raise ValueError(f"--k: expected a finite number of sigmas > 0 (a spike is a loss more "
                         f"than k sigmas above its EMA; default 4), got {k!r}")
    return float(k)


def report_again(out, k: float | None = None, echo=print) -> dict:
    """Rewrite the report of a finished study in ``out`` from its runs' metrics (after the
    analysis changed, or with another spike threshold ``k``); no run is trained again. Every
    input is checked and the report computed before a file is replaced."""
    if k is not None:
        check_k(k)
    out = Path(out)
    path = out / "report.json"
    if not path.is_file():
        raise ValueError(f"--report-only: {str(out)!r} holds no study (no report.json)")
    try:
        saved = json.loads(path.read_text())
        runs = [{key: r[key] for key in RUN_KEYS} for r in saved["runs"]]
        meta = saved["meta"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--report-only: {path} is not a study's report ({type(e).__name__}: "
                         f"{e})") from None
    return write_report(out, meta, runs, meta["k"] if k is None else k, echo)


def _json(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)
