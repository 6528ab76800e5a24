"""Test-time latency of the trained verifier: Python eager vs the C++ runtime.

``python -m bench.run runtime [--quick] [--device cuda|cpu] [--threads N]`` (needs ``make
runtime`` first: it times ``build/runtime/et-verify``).

Providers, per case, at B = 1 (one robot step) and the production context (S = 600, D = 4096,
energy model hidden 512 / 8 heads, fp32, H = 8, Da = 7):
  python_eager  ``energy_scores(..., backend="eager")`` under no_grad / ``correct_actions(...,
                steps=k, backend="eager")``: what a Python control loop calls today
  cpp_runtime   the same function exported by ``energy_train.deploy.export_verifier`` and run
                by ``energy_train::Verifier`` in ``et-verify --repeat N`` (its input checks
                included; timed in C++ with std::chrono::steady_clock)
Cases: score with C = 1, 8, 64 candidates; correct with k = 1 and 3 steps. Both providers
take the same inputs and run the same number of calls, in 3 alternating rounds (each after a
warm-up call), and report the median and p99 (and p20/p80) of the per-call latencies; a call
ends with its result on the CPU (on CUDA that includes the copy). Ratios are against python_eager measured in the same run.
The packages are exported once per run (ranges: batch 1-8, context 1-1024, candidates 1-64).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.harness import _triton_version, device_name, git_commit, write_results
from energy_train import EnergyModel, correct_actions, energy_scores
from energy_train.deploy import export_verifier

ROOT = Path(__file__).resolve().parents[1]
ET_VERIFY = ROOT / "build" / "runtime" / "et-verify"
B, S, D, HIDDEN, HEADS, H, DA = 1, 600, 4096, 512, 8, 8, 7
ALPHA, CLIP = 0.1, 0.2
RANGES = dict(batch=(1, 8), context_len=(1, 1024), candidates=(1, 64))
EXAMPLES = dict(batch=2, context_len=S, candidates=8)
ROUNDS = 3


def _quantiles(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return dict(median_ms=statistics.median(ms), p20_ms=q[19], p80_ms=q[79], p99_ms=q[98],
                reps=len(ms))


def _time_python(fn, reps: int) -> tuple[float, list[float]]:
    """(first call ms, ms of each of `reps` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return first, ms


def _time_cpp(verifier: Path, command: str, src: Path, reps: int, threads: int,
              tmp: Path) -> tuple[float, list[float]]:
    """The same, timed inside one et-verify process (its first call loads nothing: the
    packages are loaded before it)."""
    dst, timings = tmp / "out.safetensors", tmp / "t.json"
    cmd = [str(ET_VERIFY), command, "--model", str(verifier), "--in", str(src), "--out", str(dst),
           "--repeat", str(reps), "--timings", str(timings)]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"et-verify {command} failed: {r.stderr}")
    t = json.loads(timings.read_text())
    return t["first_ms"], t["ms"]


def _reps(seconds_per_call: float, budget_s: float, lo: int = 30, hi: int = 200) -> int:
    return int(min(hi, max(lo, budget_s / max(seconds_per_call, 1e-6))))


def run_standalone(device: torch.device, quick: bool, out_dir: Path | None, tag: str | None,
                   log=print) -> list[dict]:
    """Export, time both providers per case, write ``<out_dir>/runtime-<device>.{json,md,png}``."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    if not ET_VERIFY.exists():
        raise SystemExit(f"{ET_VERIFY} not found: build the runtime first (make runtime)")
    torch.manual_seed(0)
    model = EnergyModel(D, DA, hidden=HIDDEN, heads=HEADS).to(device).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    try:
        return _run(model, work, device, quick, out_dir, tag, threads, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(model, work, device, quick, out_dir, tag, threads, log):
    steps_list = (1,) if quick else (1, 3)
    dirs = {}
    for k in steps_list:
        t0 = time.perf_counter()
        export_verifier(model, path=work / f"k{k}", chunk=(H, DA), steps=k, alpha=ALPHA,
                        clip_frac=CLIP, device=device, examples=EXAMPLES,
                        functions=("score", "correct") if k == steps_list[0] else ("correct",),
                        **RANGES)
        dirs[k] = work / f"k{k}"
        log(f"exported k={k} in {time.perf_counter() - t0:.0f} s")
    g = torch.Generator().manual_seed(0)
    context = torch.randn(B, S, D, generator=g).to(device)
    pad_mask = torch.zeros(B, S, dtype=torch.bool)
    pad_mask[:, S - 40:] = True  # some padding, as a real prompt has
    pad_mask = pad_mask.to(device)

    cases = [("score", dict(C=c)) for c in ((1, 8) if quick else (1, 8, 64))]
    cases += [("correct", dict(k=k)) for k in steps_list]
    budget = 4.0 if quick else 12.0
    records = []
    for fn_name, p in cases:
        params = dict(B=B, S=S, D=D, hidden=HIDDEN, heads=HEADS, H=H, Da=DA, **p)
        name = f"{fn_name}-" + ("C{C}".format(**p) if fn_name == "score" else "k{k}".format(**p))
        if fn_name == "score":
            moving = torch.randn(B, p["C"], H, DA, generator=g).to(device)

            def call():
                with torch.no_grad():
                    return energy_scores(model, context, pad_mask, moving, backend="eager").cpu()
            inputs = dict(context=context, pad_mask=pad_mask, candidates=moving)
            verifier = dirs[steps_list[0]]
        else:
            moving = torch.randn(B, H, DA, generator=g).to(device)

            def call(k=p["k"]):
                return correct_actions(model, context, pad_mask, moving, steps=k, alpha=ALPHA,
                                       clip_frac=CLIP, backend="eager").cpu()
            inputs = dict(context=context, pad_mask=pad_mask, actions=moving)
            verifier = dirs[p["k"]]
        t0 = time.perf_counter()
        call()
        per_round = max(10, _reps(time.perf_counter() - t0, budget) // ROUNDS)
        src = work / "in.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in inputs.items()}, src)
        # alternate the providers in rounds so that a change of the machine's load hits both
        first, samples = {}, {"python_eager": [], "cpp_runtime": []}
        for _ in range(ROUNDS):
            f, ms = _time_python(call, per_round)
            first.setdefault("python_eager", f)
            samples["python_eager"] += ms
            f, ms = _time_cpp(verifier, fn_name, src, per_round, threads, work)
            first.setdefault("cpp_runtime", f)
            samples["cpp_runtime"] += ms
        py, cpp = (dict(_quantiles(samples[k]), first_ms=first[k])
                   for k in ("python_eager", "cpp_runtime"))
        reps = len(samples["python_eager"])
        for provider, t in (("python_eager", py), ("cpp_runtime", cpp)):
            records.append(dict(case=name, params=params, provider=provider, status="ok", **t,
                                speedup_vs_baseline=py["median_ms"] / t["median_ms"],
                                p99_ratio_vs_baseline=py["p99_ms"] / t["p99_ms"]))
        log(f"  {name}: python {py['median_ms']:.2f} ms (p99 {py['p99_ms']:.2f}), "
            f"c++ {cpp['median_ms']:.2f} ms (p99 {cpp['p99_ms']:.2f}), {reps} calls each")
    meta = dict(op="runtime", device=device_name(device), device_type=device.type,
                commit=git_commit(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=_triton_version(),
                python=platform.python_version(), ceilings={},
                baseline="python_eager",
                notes=[f"B={B}, S={S} (last 40 keys padded), D={D}, hidden {HIDDEN}/{HEADS} heads, "
                       f"H={H}, Da={DA}, fp32; correct: alpha {ALPHA}, clip_frac {CLIP}",
                       "cpp_runtime = energy_train::Verifier (AOTInductor packages, input checks "
                       "included) timed inside et-verify; python_eager = energy_scores / "
                       "correct_actions (backend='eager'); same inputs, same call count",
                       f"threads: {threads} for both (torch.set_num_threads / et-verify --threads)"
                       if device.type == "cpu" else "CUDA: a call ends with its result copied to the CPU"],
                columns=[["p99_ms", "p99 ms", ".2f"], ["p99_ratio_vs_baseline", "p99 ratio vs python", ".2f"],
                         ["first_ms", "first call ms", ".1f"], ["reps", "calls", "d"]],
                providers=["python_eager", "cpp_runtime"],
                timing="per-call latencies after one warm-up call: median, p20/p80, p99 "
                       "(statistics.quantiles, inclusive)")
    if out_dir is not None:
        write_results(meta, records, Path(out_dir), tag)
    return records

