"""The stability study's numbers and its report: per run (:func:`analyse`), over seeds and
across specs (:func:`study`), and as markdown (:func:`render`) whose conclusion is written from
those numbers.

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
            kv[last] += "," + part.strip()
            continue
        last = k.strip()
        kv[last] = v.strip()
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
    """Per spec: each number's mean/std/min/max over seeds; identity groups; the noise floor;
    the conclusion's sentences."""
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
    res = {"specs": specs, "per_spec": per, "identity": identity(runs), "floor": floor, "k": k,
           "at_spike": at_spike, "spiking_runs": len(spiking)}
    res["conclusion"] = conclude(res)
    return res


def _m(a: dict | None, fmt: str = "{:.3g}") -> str:
    if a is None:
        return "-"
    return fmt.format(a["mean"]) + (f" ± {fmt.format(a['std'])}" if a["n"] > 1 else "")


def _mean(a):
    return None if a is None else a["mean"]


def conclude(res: dict) -> list[str]:
    """The conclusion, sentence by sentence, from the numbers (nothing here is hard-coded
    about which strategy wins)."""
    per, specs, floor = res["per_spec"], res["specs"], res["floor"]
    moving = [s for s in specs if not per[s]["frozen"]]
    out = []
    # 1. spikes against the noise floor
    if floor and floor["energy_spikes"]:
        f = floor["energy_spikes"]
        out.append(f"Noise floor: the frozen reference `{floor['spec']}` has {_m(f, '{:.2g}')} "
                   f"energy-loss spikes per run - phi's own optimisation noise, with nothing "
                   "else moving.")
        above = []
        for s in moving:
            a = per[s]["energy_spikes"]
            if a is None:
                continue
            margin = max(f["std"], a["std"], 1.0)
            if a["mean"] - f["mean"] > margin:
                above.append(f"`{s}` ({_m(a, '{:.2g}')})")
        if above:
            out.append("Above the floor by more than the spread over seeds: " + ", ".join(above) + ".")
        else:
            out.append("No strategy or setting spikes more than the frozen reference beyond the "
                       "spread over seeds: on this task the spikes are not caused by theta moving.")
    # 1b. what moves at the spikes (every run with spikes)
    at = {q: res["at_spike"].get(q, []) for q in ("grad_norm_phi", "grad_norm_theta", "drift_context")}
    if at["grad_norm_phi"]:
        med = {q: float(np.median(v)) for q, v in at.items() if v}
        parts = [f"{what} {med[q]:.2g}x" for q, what in (("grad_norm_phi", "phi's gradient norm"),
                                                         ("grad_norm_theta", "theta's"),
                                                         ("drift_context", "the context drift"))
                 if q in med]
        own = (med["grad_norm_phi"] >= 2 and med.get("grad_norm_theta", 1.0) < 1.5
               and med.get("drift_context", 1.0) < 1.5)
        out.append(f"At the spike steps of {res['spiking_runs']} run(s), against each run's median: "
                   + ", ".join(parts) + " (median over those runs)"
                   + ("; the spikes go with phi's own step, not with theta or the context moving."
                      if own else "."))
    # 2. divergence
    div = [f"`{s}` ({per[s]['diverged']}/{per[s]['seeds']} seeds"
           + (f", first non-finite loss at step {min(per[s]['nonfinite_steps'])})"
              if per[s]["nonfinite_steps"] else ")") for s in specs if per[s]["diverged"]]
    out.append(("Diverged (non-finite loss): " + ", ".join(div) + ".") if div else
               "No run produced a non-finite loss.")
    # 3. stalls
    stalls = []
    for s in specs:
        a = per[s]["stall_longest"]
        if a is not None and a["mean"] >= 20:
            stalls.append(f"`{s}` (longest {_m(a, '{:.0f}')} steps)")
    if stalls:
        out.append("Stalls (energy independent of the candidate, loss at its uniform value, for "
                   ">= 20 consecutive steps on average): " + ", ".join(stalls) + ".")
    # 4. ranking: learns or not
    learn, chance_like = [], []
    for s in specs:
        acc, ch = _mean(per[s]["probe_rank_acc_last"]), _mean(per[s]["probe_chance"])
        if acc is None or ch is None:
            continue
        (learn if acc >= 2 * ch else chance_like).append(f"`{s}` {acc:.2f} (chance {ch:.2g})")
    if learn:
        out.append("Held-out ranking accuracy (training candidate set) at least twice chance: "
                   + ", ".join(learn) + ".")
    if chance_like:
        out.append("Below twice chance: " + ", ".join(chance_like) + ".")
    # 5. identical runs
    for g in res["identity"]["all"]:
        out.append("Bitwise the same run in every seed (one line in the plot): "
                   + " = ".join(f"`{s}`" for s in g) + ".")
    l1_only = [g for g in res["identity"]["l1"] if not any(set(g) <= set(a) for a in res["identity"]["all"])]
    for g in l1_only:
        out.append("The same L1 series in every seed (the energy loss never reaches theta, so "
                   "theta's trajectory is the L1 one): " + " = ".join(f"`{s}`" for s in g) + ".")
    # 6. the two-phase update against joint
    if "joint" in per and "two_phase" in per:
        j, t = per["joint"], per["two_phase"]
        parts = []
        for key, what in (("energy_spikes", "energy spikes"), ("probe_rank_acc_last", "held-out rank acc"),
                          ("energy_last", "final energy loss")):
            if j[key] is not None and t[key] is not None:
                d = t[key]["mean"] - j[key]["mean"]
                spread = max(j[key]["std"], t[key]["std"])
                within = ("one seed: no spread" if min(j[key]["n"], t[key]["n"]) < 2 else
                          f"{'within' if abs(d) <= spread else 'beyond'} the spread over seeds")
                parts.append(f"{what} {_m(j[key])} vs {_m(t[key])} ({within})")
        if parts:
            out.append("`joint` vs `two_phase`: " + "; ".join(parts) + ".")
    # 7. the mechanism
    lt = [per[s]["lag_theta"]["mean"] for s in moving if per[s]["lag_theta"]]
    lb = [per[s]["lag_batch"]["mean"] for s in moving if per[s]["lag_batch"]]
    if lt and lb:
        a, b = float(np.median(lt)), float(np.median(lb))
        out.append(f"One-step lag: switching the energy loss's inputs from theta_k to theta_k+1 "
                   f"(what two_phase changes) moves it by {a:.3g} (median over runs); the next "
                   f"batch moves it by {b:.3g} ({b / a:.1f}x)." if a > 0 else
                   f"One-step lag: 0 (theta does not move); the next batch moves the loss by {b:.3g}.")
    w = [(s, per[s]["neg_weight_theta"], per[s]["neg_gap_theta"]) for s in moving if per[s]["neg_weight_theta"]]
    if w:
        ws = [x[1]["mean"] for x in w]
        gs = [x[2]["mean"] for x in w if x[2]]
        out.append(f"Theta-dependent negatives (layer actions, own prediction) carry "
                   f"{min(ws):.2f}-{max(ws):.2f} of the InfoNCE weight (mean over runs), "
                   f"their energy {min(gs):+.3g} to {max(gs):+.3g} above the expert's: "
                   + ("they take part in the loss." if min(ws) > 0.05 else
                      "they hardly take part in the loss."))
    collapsed = []
    for s in specs:
        c, first, low = (per[s][k] for k in ("context_collapsed", "context_diversity_first",
                                             "context_diversity_min"))
        if c and c["mean"] > 0:
            collapsed.append(f"`{s}` in {round(c['mean'] * c['n'])}/{c['n']} seeds (row diversity "
                             f"{first['mean']:.3f} -> min {low['min']:.3f}-{low['max']:.3f})")
    out.append(("Context rows collapse (row diversity below a quarter of its start): "
                + ", ".join(collapsed) + ".") if collapsed else
               "No run's context rows collapse (row diversity stays above a quarter of its start).")
    # 8. ablations: each spec against the spec of the same strategy with the most overrides
    # that are a strict subset of its own (joint:a=1,b=2 against joint:a=1, then joint)
    parsed = {s: parse_spec(s) for s in specs}
    for s in specs:
        name, kv = parsed[s]
        if not kv or per[s]["frozen"]:
            continue
        bases = [b for b in specs if b != s and parsed[b][0] == name and not per[b]["frozen"]
                 and parsed[b][1].items() < kv.items()]
        if not bases:
            continue
        b = max(bases, key=lambda x: len(parsed[x][1]))
        added = ",".join(f"{k}={v}" for k, v in kv.items() if parsed[b][1].get(k) != v)
        pa, pb = per[b], per[s]
        out.append(f"`{b}` + `{added}`: energy spikes {_m(pa['energy_spikes'], '{:.2g}')} -> "
                   f"{_m(pb['energy_spikes'], '{:.2g}')}, diverged {pa['diverged']} -> {pb['diverged']} "
                   f"of {pb['seeds']}, longest stall {_m(pa['stall_longest'], '{:.0f}')} -> "
                   f"{_m(pb['stall_longest'], '{:.0f}')} steps, held-out rank acc "
                   f"{_m(pa['probe_rank_acc_last'], '{:.2f}')} -> {_m(pb['probe_rank_acc_last'], '{:.2f}')}.")
    return out


# ---- markdown --------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def render(meta: dict, res: dict, runs: list[dict]) -> str:
    cfg = meta["config"]
    run, o, e = cfg["run"], cfg["optim"], cfg["energy"]
    per = res["per_spec"]
    init = meta["init"]
    start = ("the initialisation" if init is None else
             f"the checkpoint of `{init['run_dir']}` (step {init['step']}; theta"
             f"{' and phi' if init['phi'] else ''})")
    lines = [f"# Stability study{': ' + meta['title'] if meta['title'] else ''}", "",
             f"Policy `{meta['policy']}`; {meta['steps']} steps, batch {meta['batch_size']}, seeds "
             f"{meta['seeds']}; every run starts from {start}. Base config: energy loss "
             f"`{e['loss']}` (tau {e['tau']:g}), theta lr {o['lr']:g}, phi lr {o['energy_lr']:g}, "
             f"warm-up {o['warmup_steps']} steps, schedule `{o['schedule']}`, phi grad clip "
             f"{o['energy_grad_clip']:g}, energy output `{e['output']}`, precision "
             f"`{e['precision']}`, context `{e['context']}`, action residual "
             f"{e['action_residual']}; negatives (explicit / margin): layer picks "
             f"`{e['layer_picks']}`, own prediction {e['own_prediction']}, noise sigma "
             f"{e['noise_sigma']:g}, amplitudes `{e['amplitudes'] or 'none'}`, sign flip "
             f"{e['sign_flip']}. A spec's overrides apply on top.", "",
             f"Spike: loss > EMA + {res['k']:g} sigma (EMA factor {SPIKE_ALPHA}, from step "
             f"{SPIKE_WARMUP}, sigma >= {SPIKE_REL_FLOOR:g} x EMA); stall: the std of E/tau over the candidates below {STALL}; "
             "ranking accuracy counts ties as ties (1/(k+1) for a k-way tie at the top), the "
             "held-out one uses the training loss's candidate set; chance = 1 / candidates. "
             "Values: mean ± std over seeds.", "",
             "## Conclusion", ""]
    lines += [f"- {c}" for c in res["conclusion"]]

    same = {s: g[0] for g in res["identity"]["all"] for s in g[1:]}

    def row(s: str, cells) -> list[str]:
        return [f"`{s}`" + (f" (= `{same[s]}`)" if s in same else ""), *cells(per[s])]

    lines += ["", "## Settings x strategies", ""]
    lines += _table(["spec", "energy spikes", "L1 spikes", "max excess (sigma, energy)",
                     "longest stall", "diverged", "final L1", "train rank acc (chance)",
                     "held-out rank acc (chance)", "context drift/step", "s/step"],
                    [row(s, lambda p: [
                        _m(p["energy_spikes"], "{:.2g}"), _m(p["l1_spikes"], "{:.2g}"),
                        _m(p["energy_max_excess"], "{:.3g}"), _m(p["stall_longest"], "{:.0f}"),
                        f"{p['diverged']}/{p['seeds']}", _m(p["l1_last"]),
                        f"{_m(p['rank_acc_last'], '{:.2f}')} ({_m(p['chance'], '{:.2g}')})",
                        f"{_m(p['probe_rank_acc_last'], '{:.2f}')} ({_m(p['probe_chance'], '{:.2g}')})",
                        _m(p["drift_context"]), _m(p["sec_per_step"], "{:.2g}")])
                     for s in res["specs"]])
    if res["floor"]:
        lines += ["", f"Noise floor (`{res['floor']['spec']}`, theta frozen): "
                  f"{_m(res['floor']['energy_spikes'], '{:.2g}')} energy spikes per run."]
    lines += ["", "## The mechanism, measured", ""]
    lines += _table(["spec", "lag: theta_k -> theta_k+1", "lag: batch_k -> batch_k+1",
                     "batch / theta", "weight of theta-dependent negatives", "their energy gap",
                     "tie rate", "context row diversity (start -> min -> end)", "max grad_theta E"],
                    [row(s, lambda p: [
                        _m(p["lag_theta"]), _m(p["lag_batch"]), _m(p["lag_ratio"], "{:.2g}"),
                        _m(p["neg_weight_theta"], "{:.2f}"), _m(p["neg_gap_theta"]),
                        _m(p["tie_rate"], "{:.2g}"),
                        f"{_m(p['context_diversity_first'])} -> {_m(p['context_diversity_min'])} "
                        f"-> {_m(p['context_diversity_last'])}", _m(p["energy_grad_theta_max"])])
                     for s in res["specs"]])
    seeds = sorted({r["seed"] for r in runs})
    lines += ["", "## Per seed: energy / L1 spikes (x = diverged)", ""]
    lines += _table(["spec", *[f"seed {k}" for k in seeds]],
                    [[f"`{s}`", *[next((f"{r['energy_spikes']} / {r['l1_spikes']}"
                                        + (" x" if r["diverged"] else "")
                                        for r in runs if r["spec"] == s and r["seed"] == k), "-")
                                  for k in seeds]] for s in res["specs"]])
    moves = [(f"`{r['spec']}` seed {r['seed']}",
              ", ".join(f"{q} x{v:.2g}" for q, v in r["at_spike_over_median"].items()))
             for r in runs if r["at_spike_over_median"]]
    if moves:
        lines += ["", "At the spike steps, each quantity's median over its median over the run "
                  "(> 1: larger at spikes):", ""]
        lines += [f"- {who}: {what}" for who, what in moves]
    ident = res["identity"]
    lines += ["", "## Identical runs", ""]
    if ident["all"] or ident["l1"]:
        lines += [f"- bitwise identical (L1, energy loss, rank acc) in every seed: "
                  + " = ".join(f"`{s}`" for s in g) for g in ident["all"]]
        lines += [f"- the same L1 series in every seed: " + " = ".join(f"`{s}`" for s in g)
                  for g in ident["l1"]]
    else:
        lines.append("- none: every spec differs from every other in some seed")
    return "\n".join(lines) + "\n"
