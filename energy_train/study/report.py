"""The stability study as markdown: the conclusion, written sentence by sentence from the
numbers of :mod:`energy_train.study.analysis` (:func:`conclude`), and the report around it
(:func:`render`)."""
from __future__ import annotations

import numpy as np

from .analysis import SPIKE_ALPHA, SPIKE_REL_FLOOR, SPIKE_WARMUP, STALL, parse_spec


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
    o, e = cfg["optim"], cfg["energy"]
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
        lines += ["- bitwise identical (L1, energy loss, rank acc) in every seed: "
                  + " = ".join(f"`{s}`" for s in g) for g in ident["all"]]
        lines += ["- the same L1 series in every seed: " + " = ".join(f"`{s}`" for s in g)
                  for g in ident["l1"]]
    else:
        lines.append("- none: every spec differs from every other in some seed")
    return "\n".join(lines) + "\n"
