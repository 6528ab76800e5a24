"""The memory plan against a measured step: ``python -m bench.plan_check [--case C ...] [--out
FILE]``.

For each case (energy_train/plan: ``tiny``, ``oft-1b`` on a GPU), the plan of a sequential,
eager two_phase step (fake tensors on this device, fused ops as ``auto`` picks them here) and
the same step run for real on the same device from a trainer built the same way (the plan's
modules, initialised for real; the same batches): steps 0-2, the peak measured over steps 1-2
- on CUDA ``torch.cuda.max_memory_allocated`` (reset at step 1's start; absolute, and above
what was allocated then), on the CPU (the gpu-check dry run, tiny only) the profiler's peak of
live tensors above step 1's start (bench/memory.py). On CUDA the planned peak is the plan's
tensors plus its library-workspace lines for the sequential step (energy_train/plan/
workspace.py: the cuBLAS workspaces of its two handles on the one stream, the cuBLASLt one):
torch allocates them in step 0 and keeps them, so they are in the measured start and peak.
Writes one JSON: per case the planned and measured peaks, their ratio and whether it is
within 10% (:func:`compare`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from energy_train.plan import plan, workspace_bytes
from energy_train.plan.cases import batches, build_energy, build_policy, case_config
from energy_train.trainer import Trainer
from energy_train.trainer.feed import prepare

TOLERANCE = 0.10
GPU_CASES = ("tiny", "oft-1b")
CPU_CASES = ("tiny",)
FIXED = {"run.overlap": False, "run.cuda_graphs": "off", "run.probe_every": 0,
         "run.check_data": False}


def measured(case: str, device: torch.device) -> dict:
    """Peak bytes of steps 1-2 of the real two_phase step (see the module docstring)."""
    cfg = case_config(case, {**FIXED, "run.strategy": "two_phase", "run.device": device.type})
    host = batches(case, cfg, 3)
    torch.manual_seed(cfg.run.seed)
    policy = build_policy(case, cfg, device)  # the plan's modules, initialised for real
    energy = build_energy(cfg, policy, device)

    class Premade:
        def batch(self, step, rank=0, world=1):
            return host[step]

    t = Trainer(cfg, policy, energy, Premade(), device)
    t.batch = lambda k: [prepare(policy, d, device, i, i == len(host[k]) - 1)
                         for i, d in enumerate(host[k])]
    t.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t.train_step()
        t.train_step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(peak=peak, above_start=peak - start, start=start)
    from bench.memory import peak_bytes

    def two():
        t.train_step()
        t.train_step()
    r = peak_bytes(two)
    return dict(peak=None, above_start=r["peak"], start=None)


def check(case: str, device: torch.device) -> dict:
    t0 = time.perf_counter()
    target = "cuda" if device.type == "cuda" else "cpu"
    planned_on = device.type
    try:
        p = plan(case, {**FIXED}, strategies=("two_phase",), device=device.type, target=target,
                 checkpointing=False)
    except Exception as e:  # noqa: BLE001 - fake CUDA tensors failed: plan on the CPU, said so
        if device.type != "cuda":
            raise
        planned_on = f"cpu (fake cuda failed: {type(e).__name__}: {str(e)[:120]})"
        p = plan(case, {**FIXED}, strategies=("two_phase",), device="cpu", target=target,
                 checkpointing=False, capability=torch.cuda.get_device_capability(device))
    s = p["strategies"]["two_phase"]
    m = measured(case, device)
    out = dict(case=case, device=str(device), planned_on=planned_on,
               **compare(dict(peak=s["peak"], base=s["base"], workspaces=workspace_bytes(p)), m))
    if p.get("workspaces"):
        out["workspace_lines"] = p["workspaces"]
    out["seconds"] = time.perf_counter() - t0
    return out


def compare(planned: dict, measured: dict) -> dict:
    """The plan against the measured step. ``planned``: {"peak": the tensors' peak, "base":
    what is live at the step's start, "workspaces": the library workspaces (0 on the CPU)};
    ``measured``: {"peak" (None on the CPU), "above_start", "start"}. -> planned_peak (tensors
    + workspaces), planned_base, planned_workspaces, planned_above_start, measured, ratio
    (CUDA: absolute peaks - what a user sizes a GPU by; CPU: above the step's start, the
    profiler sees the step's own tensors only) and within (10%)."""
    above = planned["peak"] - planned["base"]
    peak = planned["peak"] + planned.get("workspaces", 0)
    out = dict(planned_peak=peak, planned_base=planned["base"],
               planned_workspaces=planned.get("workspaces", 0), planned_above_start=above,
               measured=measured)
    if measured.get("peak") is not None:
        out["ratio"] = peak / measured["peak"]
    else:
        out["ratio"] = above / max(measured["above_start"], 1)
    out["within"] = abs(out["ratio"] - 1) <= TOLERANCE
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plan_check", description=__doc__)
    ap.add_argument("--case", action="append", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cases = args.case or list(GPU_CASES if device.type == "cuda" else CPU_CASES)
    results = []
    for case in cases:
        try:
            r = check(case, device)
        except Exception as e:  # noqa: BLE001 - recorded; the other cases still run
            r = dict(case=case, device=str(device), error=f"{type(e).__name__}: {e}")
        results.append(r)
        print(json.dumps(r, default=str), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(dict(results=results), indent=1, default=str))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
