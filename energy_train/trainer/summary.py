"""The summary of a finished run: a few numbers from its metrics (``summary.json``) and their
table (``summary.md``, also printed at the end of a run)."""
from __future__ import annotations

import numpy as np

from ..config import TrainConfig
from ..plots import series


def chance_level(cfg: TrainConfig, records: list[dict] = ()) -> float:
    """1 / the number of candidates the energy loss ranks: as logged ("chance"), else from
    the config (swap: the batch; explicit / margin: 1 + the structured negatives)."""
    logged = [r["chance"] for r in records if "chance" in r]
    if logged:
        return logged[-1]
    return 1.0 / (cfg.run.batch_size if cfg.energy.loss == "swap" else 1 + cfg.energy.num_negatives())


def summarize(cfg: TrainConfig, records: list[dict], wall: float) -> dict:
    def window(key, last: bool):
        s, v = series(records, key)
        v = v[np.isfinite(v)]
        if not len(v):
            return None
        n = max(1, min(len(v) // 10, 50))
        return float(np.mean(v[-n:] if last else v[:n]))

    def probe(key, last: bool):
        pts = [r[key] for r in records if key in r]
        return (pts[-1] if last else pts[0]) if pts else None

    def mean(key):
        s, v = series(records, key)
        return float(np.mean(v)) if len(v) else None

    s_t, v_t = series(records, "time_step")
    return {
        "policy": cfg.run.policy, "strategy": cfg.run.strategy,
        "steps": int(max([r["step"] for r in records] + [-1]) + 1),
        "batch_size": cfg.run.batch_size, "energy_loss_kind": cfg.energy.loss,
        "l1_first": window("l1", False), "l1_last": window("l1", True),
        "energy_first": window("energy_loss", False), "energy_last": window("energy_loss", True),
        "rank_acc_first": window("rank_acc", False), "rank_acc_last": window("rank_acc", True),
        "rank_acc_chance": chance_level(cfg, records),
        "probe_l1_start": probe("probe_l1", False), "probe_l1_end": probe("probe_l1", True),
        "probe_rank_acc_start": probe("probe_rank_acc", False),
        "probe_rank_acc_end": probe("probe_rank_acc", True),
        "energy_grad_theta_max": (float(np.max(series(records, "energy_grad_theta")[1]))
                                  if len(series(records, "energy_grad_theta")[1]) else None),
        "drift_context_mean": mean("drift_context"), "drift_negatives_mean": mean("drift_negatives"),
        "sec_per_step": float(np.median(v_t)) if len(v_t) else None,
        "sec_phase1": mean("time_phase1"), "sec_phase2": mean("time_phase2"),
        "wall_seconds": wall,
    }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def summary_table(s: dict) -> str:
    rows = [("strategy", s["strategy"]), ("steps", s["steps"]),
            ("L1 (train, first -> last 10%)", f"{_fmt(s['l1_first'])} -> {_fmt(s['l1_last'])}"),
            ("L1 (held-out probe, start -> end)",
             f"{_fmt(s['probe_l1_start'])} -> {_fmt(s['probe_l1_end'])}"),
            (f"energy loss ({s['energy_loss_kind']})",
             f"{_fmt(s['energy_first'])} -> {_fmt(s['energy_last'])}"),
            ("ranking accuracy (train)",
             f"{_fmt(s['rank_acc_first'])} -> {_fmt(s['rank_acc_last'])} (chance {_fmt(s['rank_acc_chance'])})"),
            ("ranking accuracy (probe, start -> end)",
             f"{_fmt(s['probe_rank_acc_start'])} -> {_fmt(s['probe_rank_acc_end'])}"),
            ("energy grad into theta (max)", _fmt(s["energy_grad_theta_max"])),
            ("context / negatives drift per step", f"{_fmt(s['drift_context_mean'])} / "
                                                    f"{_fmt(s['drift_negatives_mean'])}"),
            ("seconds per step (median)", _fmt(s["sec_per_step"])),
            ("phase 1 / phase 2 seconds (mean)", f"{_fmt(s['sec_phase1'])} / {_fmt(s['sec_phase2'])}"),
            ("wall seconds", _fmt(s["wall_seconds"]))]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k.ljust(w)} | {v} |" for k, v in rows]
    return "\n".join(lines)


__all__ = ["chance_level", "summarize", "summary_table"]
