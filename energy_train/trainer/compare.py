"""``energy-train compare``: several strategies on the same seed and data, and a stability
report (markdown + PNG + JSON).

A spec is ``name[:key=value,...]`` (config overrides for that run), e.g.
``joint:detach_context=false``. Every run gets the same base config (seed, data, models,
learning rates), probes the fixed batch every step (drift per step) and lands in
``<out>/<label>/`` as an ordinary run directory.

Spikes: a loss value more than ``k`` sigma above its exponential moving average (mean and
variance with factor ``alpha``, after ``warmup`` steps). For each spike the report compares
the other measured quantities at that step with their median over the run ("moves with the
spikes" = a ratio well above 1).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..plots import plot_compare, series
from .checkpoint import atomic_write_text
from .run import read_metrics, train

DEFAULT_SPECS = ("joint", "joint:detach_context=false", "two_phase", "shared_forward",
                 "alternating", "adaptive_weights", "cached_negatives",
                 "two_phase:lr=0")  # lr=0: theta frozen, the "frozen backbone" reference
WATCH = ("grad_norm_theta", "grad_norm_phi", "energy_grad_theta", "drift_context", "drift_negatives")


def parse_spec(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kv = {}
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        if not eq:
            raise ValueError(f"--strategies: expected key=value after ':' in {spec!r}, got {part!r}")
        kv[k.strip()] = v.strip()
    return name.strip(), kv


def label(spec: str) -> str:
    return spec.replace(":", "-").replace("=", "").replace(",", "-").replace("_", "")


def find_spikes(values: np.ndarray, k: float = 4.0, alpha: float = 0.1, warmup: int = 20) -> list[int]:
    """Indices where v > EMA + k * EMA-std (the EMA is updated after the test)."""
    out, mean, var = [], None, 0.0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            out.append(i)
            continue
        if mean is None:
            mean = v
            continue
        if i >= warmup and v > mean + k * math.sqrt(max(var, 1e-12)):
            out.append(i)
        d = v - mean
        mean += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    return out


def analyse(records: list[dict], k: float) -> dict:
    res = {}
    for key in ("l1", "energy_loss"):
        s, v = series(records, key)
        idx = find_spikes(v, k)
        res[f"{key}_spikes"] = [int(s[i]) for i in idx]
    co = {}
    spike_steps = sorted(set(res["l1_spikes"]) | set(res["energy_loss_spikes"]))
    for q in WATCH:
        s, v = series(records, q)
        if not len(s) or not spike_steps:
            continue
        med = float(np.median(np.abs(v)))
        at = v[np.isin(s, spike_steps)]
        if len(at) and med > 0:
            co[q] = float(np.median(np.abs(at)) / med)
    res["at_spike_over_median"] = co
    # correlation of each watched quantity with the loss jumps (step-to-step change)
    corr = {}
    for key in ("l1", "energy_loss"):
        s, v = series(records, key)
        dv = dict(zip(s[1:], np.diff(v)))
        for q in WATCH:
            sq, vq = series(records, q)
            pairs = [(dv[a], b) for a, b in zip(sq, vq) if a in dv and math.isfinite(b)]
            if len(pairs) > 10:
                x, y = np.asarray(pairs).T
                if x.std() > 0 and y.std() > 0:
                    corr[f"d{key}~{q}"] = float(np.corrcoef(x, y)[0, 1])
    res["corr"] = corr
    return res


def compare(base: TrainConfig, specs=DEFAULT_SPECS, out="runs/compare", *, k: float = 4.0,
            echo=print) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} already holds files; choose another")
    out.mkdir(parents=True, exist_ok=True)
    runs, rows = {}, []
    cfgs = {}
    for spec in specs:  # every spec checked before the first run starts
        name, kv = parse_spec(spec)
        cfgs[spec] = base.with_values({"run.strategy": name, **kv}, f"--strategies {spec!r}")
    for spec, cfg in cfgs.items():
        echo(f"== {spec}")
        res = train(cfg, out / label(spec), echo=lambda *_: None)
        recs = read_metrics(res.run_dir)
        runs[spec] = recs
        a = analyse(recs, k)
        rows.append({"spec": spec, **res.summary, **a})
    spikes = {f"{r['spec']}:{key}": r[f"{key}_spikes"] for r in rows for key in ("l1", "energy_loss")}
    plot_compare(runs, out / "report.png", spikes)
    report = render(base, rows, k)
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "report.json", json.dumps(rows, indent=1))
    echo(report)
    return {"rows": rows, "out": out}


def _f(v, fmt="{:.3g}"):
    return "-" if v is None else fmt.format(v)


def render(base: TrainConfig, rows: list[dict], k: float) -> str:
    run, o, e = base.run, base.optim, base.energy
    lines = [
        "# Strategy comparison: stability report", "",
        f"Policy `{run.policy}`. Same seed ({run.seed}), data and initial weights for every run; "
        f"{run.steps} steps, batch {run.batch_size}, energy loss `{e.loss}`, lr theta {o.lr:g}, "
        f"lr phi {o.energy_lr:g}, energy output `{e.output}`. Spikes: loss > EMA + "
        f"{k:g} sigma (EMA factor 0.1, after 20 steps). Drift: relative change per step of the "
        "context / layer-action negatives on a fixed held-out probe batch. |grad_theta E|: the "
        "gradient norm the energy loss deposits into theta (the gradient-path audit). "
        "`two_phase:lr=0` freezes theta: the frozen-backbone reference.", "",
        "| strategy | L1 spikes | energy spikes | final L1 | final rank acc (chance) | probe rank acc "
        "| max abs grad_theta E | context drift/step | negatives drift/step | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| `{r['spec']}` | {len(r['l1_spikes'])} | {len(r['energy_loss_spikes'])} | "
            f"{_f(r['l1_last'])} | {_f(r['rank_acc_last'])} ({_f(r['rank_acc_chance'])}) | "
            f"{_f(r['probe_rank_acc_end'])} | {_f(r['energy_grad_theta_max'])} | "
            f"{_f(r['drift_context_mean'])} | {_f(r['drift_negatives_mean'])} | "
            f"{_f(r['sec_per_step'])} |")
    lines += ["", "## What moves with the spikes", "",
              "Median of each quantity at the spike steps over its median over the run "
              "(> 1: larger at spikes), and the correlation of the per-step loss change with it.", ""]
    for r in rows:
        co = ", ".join(f"{q} x{v:.2f}" for q, v in r["at_spike_over_median"].items()) or "no spikes"
        cor = ", ".join(f"{q} {v:+.2f}" for q, v in r["corr"].items() if abs(v) >= 0.3)
        lines.append(f"- `{r['spec']}`: spikes at L1 {r['l1_spikes'][:8]}, energy "
                     f"{r['energy_loss_spikes'][:8]}; {co}" + (f"; |corr| >= 0.3: {cor}" if cor else ""))
    return "\n".join(lines) + "\n"
