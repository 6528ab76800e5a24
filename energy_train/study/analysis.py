"""The stability study's numbers: per run (:func:`analyse`), over seeds and across specs
(:func:`study`). The markdown written from them: :mod:`energy_train.study.report`.

Definitions (also printed in the report):

- spike: a loss value more than ``k`` sigma above its exponential moving average (mean and
  variance with factor 0.1, tested from step 20 on; sigma at least 1% of the EMA, so the end
  of a flat, stalled stretch is not a spike; a non-finite value is a spike too);
  ``max excess``: the largest (value - EMA) / EMA-sigma of the run;
- stall: a step whose energy logits hardly depend on the candidate (``energy_spread``, the
  std of E / tau over the candidates, below 0.05: the loss sits at its uniform value);
- the noise floor: the spike count of the frozen reference (theta lr 0), where nothing moves
  but phi;
- lag effect (``lag_theta``): |L(theta_k+1, batch_k) - L(theta_k, batch_k)| of the energy loss
  (phi fixed) - what two_phase changes against joint; ``lag_batch``:
  |L(theta_k+1, batch_k+1) - L(theta_k+1, batch_k)| - what phi sees change every step anyway;
- theta-dependent negatives: the layer actions and the policy's own prediction among the
  explicit / margin candidates; their weight is their softmax(-E/tau) mass in the loss;
- context row diversity: how different the context rows are (0 = collapsed: attention over
  them is uniform).
"""
from __future__ import annotations

import math

import numpy as np

from ..config import Typed
from ..plots import series

SPIKE_ALPHA, SPIKE_WARMUP, SPIKE_REL_FLOOR = 0.1, 20, 0.01
STALL = 0.05
COLLAPSE = 0.25  # a run's context rows collapsed: row diversity below this fraction of its start
WATCH = ("grad_norm_theta", "grad_norm_phi", "energy_grad_theta", "drift_context", "drift_negatives")
NUMERIC = ("energy_spikes", "l1_spikes", "energy_max_excess", "l1_max_excess", "stall_longest",
           "stall_steps", "l1_last", "energy_last", "rank_acc_last", "probe_rank_acc_last",
           "probe_rank_acc_first", "chance", "probe_chance", "drift_context", "drift_negatives",
           "lag_theta", "lag_batch", "lag_ratio", "neg_weight_theta", "neg_gap_theta",
           "tie_rate", "context_diversity_first", "context_diversity_min",
           "context_diversity_last", "context_collapsed", "energy_grad_theta_max", "sec_per_step",
           "grad_norm_phi")


def parse_spec(spec: str) -> tuple[str, dict]:
    """"name:k=v,k=v" -> (name, {k: v}); a part without '=' continues the previous value
    (``energy.layer_picks=first,last``)."""
    name, _, rest = spec.partition(":")
    kv, last = {}, None
    for part in filter(None, rest.split(",")):
        k, eq, v = part.partition("=")
        if not eq:
            if last is None:
                raise ValueError(f"--strategies: expected key=value after ':' in {spec!r}, got {part!r}")
            kv[last] = Typed(kv[last] + "," + part.strip())
            continue
        last = k.strip()
        kv[last] = Typed(v.strip())  # text, as --set gives it
    return name.strip(), kv


# ---- one run ---------------------------------------------------------------------------------
def find_spikes(values: np.ndarray, k: float = 4.0, alpha: float = SPIKE_ALPHA,
                warmup: int = SPIKE_WARMUP, rel_floor: float = SPIKE_REL_FLOOR
                ) -> tuple[list[int], float | None]:
    """(indices where v > EMA + k * sigma, the largest (v - EMA) / sigma from ``warmup`` on),
    sigma = max(EMA-std, rel_floor * |EMA|): after a flat stretch (a stalled loss) the EMA-std
    is ~0 and the first small move would otherwise count as a spike. The EMA is updated after
    the test; a non-finite value is a spike and is skipped."""
    out, mean, var, zmax = [], None, 0.0, None
    for i, v in enumerate(values):
        if not math.isfinite(v):
            out.append(i)
            continue
        if mean is None:
            mean = v
            continue
        if i >= warmup:
            z = (v - mean) / max(math.sqrt(var), rel_floor * abs(mean), 1e-12)
            zmax = z if zmax is None else max(zmax, z)
            if z > k:
                out.append(i)
        d = v - mean
        mean += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    return out, zmax


def _window(v: np.ndarray, last: bool = True) -> float | None:
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    n = max(1, len(v) // 10)
    return float(np.mean(v[-n:] if last else v[:n]))


def _stat(records, key, fn):
    _, v = series(records, key)
    v = v[np.isfinite(v)]
    return float(fn(v)) if len(v) else None


def _runs_below(v: np.ndarray, thr: float) -> tuple[int, int]:
    """(longest run of consecutive values below thr, how many are below)."""
    best = cur = 0
    for x in v:
        cur = cur + 1 if x < thr else 0
        best = max(best, cur)
    return best, int(np.sum(v < thr))


def analyse(records: list[dict], k: float = 4.0) -> dict:
    """The numbers of one run (its metrics.jsonl records)."""
    res: dict = {}
    for key, name in (("l1", "l1"), ("energy_loss", "energy")):
        s, v = series(records, key)
        idx, zmax = find_spikes(v, k)
        res[f"{name}_spike_steps"] = [int(s[i]) for i in idx]
        res[f"{name}_spikes"] = len(idx)
        res[f"{name}_max_excess"] = zmax
    bad = [r["step"] for r in records for key in ("l1", "energy_loss")
           if key in r and not math.isfinite(r[key])]
    res["nonfinite_step"] = min(bad) if bad else None
    _, spread = series(records, "energy_spread")
    res["stall_longest"], res["stall_steps"] = _runs_below(spread, STALL) if len(spread) else (None, None)
    for key in ("l1", "energy_loss", "rank_acc", "probe_rank_acc"):
        _, v = series(records, key)
        res[f"{'energy' if key == 'energy_loss' else key}_last"] = _window(v)
    res["probe_rank_acc_first"] = next((r["probe_rank_acc"] for r in records if "probe_rank_acc" in r), None)
    for key in ("chance", "probe_chance"):
        res[key] = next((r[key] for r in reversed(records) if key in r), None)
    for key in ("drift_context", "drift_negatives", "neg_weight_theta", "neg_gap_theta", "tie_rate",
                "grad_norm_phi"):
        res[key] = _stat(records, key, np.mean)
    res["lag_theta"] = _stat(records, "lag_theta", np.median)
    res["lag_batch"] = _stat(records, "lag_batch", np.median)
    res["lag_ratio"] = (res["lag_batch"] / res["lag_theta"]
                        if res["lag_theta"] and res["lag_batch"] is not None else None)
    div = [(r["step"], r["context_diversity"]) for r in records if "context_diversity" in r]
    res["context_diversity_first"] = div[0][1] if div else None
    res["context_diversity_min"] = min(d for _, d in div) if div else None
    res["context_diversity_last"] = div[-1][1] if div else None
    res["context_collapsed"] = (None if not div else
                                float(res["context_diversity_min"] < COLLAPSE * div[0][1]))
    res["energy_grad_theta_max"] = _stat(records, "energy_grad_theta", np.max)
    res["sec_per_step"] = _stat(records, "time_step", np.median)
    # what is large at the spike steps, against its median over the run
    steps = set(res["l1_spike_steps"]) | set(res["energy_spike_steps"])
    co = {}
    for q in WATCH:
        s, v = series(records, q)
        if len(s) and steps:
            med, at = float(np.median(np.abs(v))), v[np.isin(s, sorted(steps))]
            if len(at) and med > 0:
                co[q] = float(np.median(np.abs(at)) / med)
    res["at_spike_over_median"] = co
    return res


# ---- over seeds and across specs -------------------------------------------------------------
def _agg(values: list) -> dict | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None
    a = np.asarray(v, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def _signature(records: list[dict], keys: tuple[str, ...]) -> tuple:
    return tuple(tuple(series(records, key)[1].tolist()) for key in keys)


def identity(runs: list[dict]) -> dict:
    """Groups of specs whose series are bitwise equal in EVERY seed: ``all`` (L1, energy loss,
    ranking accuracy: the same run) and ``l1`` (the same theta trajectory)."""
    specs = list(dict.fromkeys(r["spec"] for r in runs))
    out = {}
    for name, keys in (("all", ("l1", "energy_loss", "rank_acc")), ("l1", ("l1",))):
        sig: dict = {}
        for spec in specs:
            mine = sorted((r["seed"], _signature(r["records"], keys)) for r in runs if r["spec"] == spec)
            if any(not any(len(x) for x in s) for _, s in mine):
                continue  # a spec without the series (e.g. no L1 step) is in no group
            sig.setdefault(tuple(mine), []).append(spec)
        out[name] = [g for g in sig.values() if len(g) > 1]
    return out


def study(runs: list[dict], k: float) -> dict:
    """Per spec: each number's mean/std/min/max over seeds; identity groups; the noise floor
    (the conclusion's sentences: :func:`energy_train.study.report.conclude`)."""
    specs = list(dict.fromkeys(r["spec"] for r in runs))
    per = {}
    for spec in specs:
        rs = [r for r in runs if r["spec"] == spec]
        per[spec] = {key: _agg([r.get(key) for r in rs]) for key in NUMERIC}
        per[spec]["diverged"] = sum(r["diverged"] is not None for r in rs)
        per[spec]["nonfinite_steps"] = [r["nonfinite_step"] for r in rs if r["nonfinite_step"] is not None]
        per[spec]["seeds"] = len(rs)
        per[spec]["frozen"] = all(r["theta_lr"] == 0 for r in rs)
    frozen = [s for s in specs if per[s]["frozen"]]
    floor = None
    if frozen:
        floor = {"spec": frozen[0], "energy_spikes": per[frozen[0]]["energy_spikes"],
                 "l1_spikes": per[frozen[0]]["l1_spikes"]}
    spiking = [r for r in runs if r["at_spike_over_median"]]
    at_spike = {}
    for r in spiking:
        for q, v in r["at_spike_over_median"].items():
            at_spike.setdefault(q, []).append(v)
    return {"specs": specs, "per_spec": per, "identity": identity(runs), "floor": floor, "k": k,
            "at_spike": at_spike, "spiking_runs": len(spiking)}
