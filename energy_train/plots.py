"""PNG plots of a run's curves (matplotlib, Agg backend); the study's: energy_train/study/plots.py."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if key in r and r["step"] >= 0]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s), np.asarray(v, dtype=float)


def smooth(v: np.ndarray, k: int) -> np.ndarray:
    if len(v) < 3 or k <= 1:
        return v
    k = min(k, len(v))
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    return np.concatenate([np.full(k - 1, np.nan), out])


def plot_run(records: list[dict], path: str | Path, title: str = "", chance: float | None = None) -> None:
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    k = max(1, len([r for r in records if "l1" in r]) // 40)
    for key, a, label in (("l1", ax[0, 0], "L1 (train)"), ("energy_loss", ax[0, 1], "energy loss"),
                          ("rank_acc", ax[1, 0], "ranking accuracy (train)")):
        s, v = series(records, key)
        a.plot(s, v, alpha=0.25, lw=0.8)
        a.plot(s, smooth(v, k), lw=1.6, label=label)
    for key, a, label in (("probe_l1", ax[0, 0], "L1 (held-out probe)"),
                          ("probe_rank_acc", ax[1, 0], "ranking accuracy (probe)")):
        s, v = series(records, key)
        if len(s):
            a.plot(s, v, "o-", ms=3, label=label)
    if chance is not None:
        ax[1, 0].axhline(chance, color="gray", ls=":", label=f"chance {chance:.2f}")
    for key in ("time_step", "time_phase1", "time_phase2"):
        s, v = series(records, key)
        if len(s):
            ax[1, 1].plot(s, smooth(1000 * v, k), label=key.replace("time_", ""))
    for a, t in zip(ax.flat, ("L1", "energy loss", "ranking accuracy", "time per step / phase (ms)")):
        a.set_title(t)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
