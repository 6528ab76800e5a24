"""The stability study's figure (matplotlib, Agg backend: energy_train.plots sets it)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..plots import series


STYLES = [(c, ls) for ls in ("-", "--", "-.", ":") for c in
          ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan")]


def _robust_ylim(a, values: list[np.ndarray], log: bool = False) -> float | None:
    """Limit the y axis to the 0.5-99.5th percentile of every plotted value (so one run's
    excursion does not squash the others); returns the top, where clipped points are drawn."""
    v = np.concatenate([x[np.isfinite(x)] for x in values if len(x)] or [np.zeros(0)])
    if log:
        v = v[v > 0]
    if not len(v):
        return None
    lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
    if log:
        a.set_yscale("log")
        a.set_ylim(lo / 1.5, hi * 1.5)
        return hi * 1.5
    pad = 0.06 * max(hi - lo, 0.1 * abs(hi), 1e-3)  # a flat series gets a readable range
    a.set_ylim(lo - pad, hi + pad)
    return hi + pad


def plot_compare(runs: list[dict], result: dict, path: str | Path, title: str = "") -> None:
    """The stability study: raw series of the first seed for every spec (one line per group
    of bitwise-identical specs, each with its own colour and line style), spike markers on the
    raw loss series, chance lines, robust y limits (points beyond them drawn as triangles at
    the edge), and the per-seed spike counts against the frozen reference's noise floor."""
    specs = result["specs"]
    seed = min(r["seed"] for r in runs)
    first = {r["spec"]: r for r in runs if r["seed"] == seed}
    style = {s: (STYLES[i % 10][0], ("-", "--", "-.", ":")[i % 4]) for i, s in enumerate(specs)}

    def grouped(key: str) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
        """(specs, steps, values): specs whose series of ``key`` is bitwise the same (in the
        plotted seed) share one line, drawn in the first one's style with a joined label."""
        out: list = []
        for s in specs:
            st, v = series(first[s]["records"], key)
            if not len(st):
                continue
            for g, st2, v2 in out:
                if np.array_equal(st, st2) and np.array_equal(v, v2, equal_nan=True):
                    g.append(s)
                    break
            else:
                out.append(([s], st, v))
        return out
    fig, ax = plt.subplots(3, 3, figsize=(17, 13))
    panels = [("l1", "L1 (train, raw)", ax[0, 0], False), ("energy_loss", "energy loss (train, raw)", ax[0, 1], False),
              ("rank_acc", "ranking accuracy (train, raw)", ax[0, 2], False),
              ("probe_rank_acc", "ranking accuracy (held-out probe)", ax[1, 0], False),
              ("context_diversity", "context row diversity (probe)", ax[1, 1], False),
              ("energy_spread", "spread of E/tau over candidates (stall < 0.05)", ax[1, 2], True),
              ("drift_context", "context drift / step (probe)", ax[2, 0], True)]
    for key, name, a, log in panels:
        drawn = []
        for g, s_, v in grouped(key):
            c, ls = style[g[0]]
            a.plot(s_, v, color=c, ls=ls, lw=1.1, label=textwrap.fill(" = ".join(g), 60))
            drawn.append((c, s_, v))
            if key in ("l1", "energy_loss"):
                sp = first[g[0]]["l1_spike_steps" if key == "l1" else "energy_spike_steps"]
                m = np.isin(s_, sp)
                a.plot(s_[m], v[m], "x", color=c, ms=7, mew=1.6)
        if key in ("rank_acc", "probe_rank_acc"):  # bounded: the whole [0, 1] range
            a.set_ylim(-0.02, 1.02)
            top = None
        else:
            top = _robust_ylim(a, [v for _, _, v in drawn], log)
        if top is not None:
            for c, s_, v in drawn:
                over = np.isfinite(v) & (v > top)
                if over.any():
                    a.plot(s_[over], np.full(over.sum(), top), "^", color=c, ms=6, clip_on=False)
        if key in ("rank_acc", "probe_rank_acc"):
            ck = "chance" if key == "rank_acc" else "probe_chance"
            for ch in sorted({r.get(ck) for r in runs if r.get(ck)}):
                a.axhline(ch, color="k", ls=":", lw=1)
                a.text(a.get_xlim()[0], ch, f" chance {ch:.2g}", va="bottom", fontsize=7, clip_on=True)
        if key == "energy_spread":
            a.axhline(0.05, color="k", ls=":", lw=1)
        a.set_title(name, fontsize=10)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        if key in ("l1", "context_diversity") and drawn:  # the groups of identical series
            a.legend(fontsize=6, loc="best")
    handles = [plt.Line2D([], [], color=style[s][0], ls=style[s][1]) for s in specs]
    fig.legend(handles, specs, loc="lower center", ncol=4, fontsize=8, frameon=False)
    # lag effect: theta_k -> theta_k+1 against batch_k -> batch_k+1 (median per run)
    a = ax[2, 1]
    per = result["per_spec"]
    x = np.arange(len(specs))
    for off, key, name in ((-0.2, "lag_theta", "theta_k -> theta_k+1"), (0.2, "lag_batch", "batch_k -> batch_k+1")):
        vals = [r.get(key) for s in specs for r in runs if r["spec"] == s]
        xs = [i + off for i, s in enumerate(specs) for r in runs if r["spec"] == s]
        ok = [(xx, v) for xx, v in zip(xs, vals) if v is not None and v > 0]
        if ok:
            a.plot(*zip(*ok), "o" if key == "lag_theta" else "s", ms=5, label=name)
    a.set_yscale("log")
    a.set_xticks(x, specs, rotation=60, ha="right", fontsize=6.5)
    a.set_title("one-step lag: |change of the energy loss| (median per run)", fontsize=10)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    # spikes per run, every seed, against the noise floor
    a = ax[2, 2]
    for off, key, mk in ((-0.15, "energy_spikes", "o"), (0.15, "l1_spikes", "s")):
        xs = [i + off for i, s in enumerate(specs) for r in runs if r["spec"] == s]
        ys = [r[key] for s in specs for r in runs if r["spec"] == s]
        a.plot(xs, ys, mk, ms=5, alpha=0.7, label=key.replace("_", " ") + " (each seed)")
        means = [per[s][key]["mean"] if per[s][key] else np.nan for s in specs]
        a.plot(x + off, means, "_", color="k", ms=14, mew=2)
    floor = result.get("floor")
    if floor and floor["energy_spikes"]:
        a.axhline(floor["energy_spikes"]["mean"], color="k", ls=":", lw=1,
                  label=f"noise floor ({floor['spec']})")
    a.set_xticks(x, specs, rotation=60, ha="right", fontsize=6.5)
    a.set_title("spikes per run (bar = mean over seeds)", fontsize=10)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    fig.suptitle(f"stability study{': ' + title if title else ''} (raw series of seed {seed}; "
                 "x = spikes; triangles = beyond the axis)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
