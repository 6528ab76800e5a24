"""``make gpu-check``: prove and measure the package on one GPU in one time-boxed command.

Steps, most valuable first; each runs in its own subprocess under its own time cap, cut to
what the global budget (default 585 s from ``--t0``, the Makefile's start, set-up included)
has left minus what is reserved for the steps after it (RESERVE: each torch.compile
benchmark keeps 70 s from every step before it, so the "triton vs torch.compile" targets are
measured whatever ran long); a step that fails or runs out of time is recorded and the run
goes on:

1. ``device``: name, SMs, clocks, driver, versions, and the measured ceilings (a large bf16
   matmul in TFLOP/s, a large device-to-device copy in GB/s counting read + write), once;
2. ``collect``: the GPU tests (``-m gpu``), split into groups (TEST_GROUPS);
3. ``tests:parity``: every GPU test of tests/test_kernel_*.py (bf16/fp16/tf32 parity, the
   production shapes), with pytest-xdist when the machine has it;
4. ``bench:layer_actions:*``, ``bench:energy:*``: the production shapes (SELECT), the eager
   providers in one process, every GPU-only provider (triton) in its own;
   ``bench:energy:profile`` right after ``bench:energy:triton``: per-kernel CUDA times of its
   fwd+bwd (bench/bench_energy_profile.py -> ``energy-profile-<dev>.{json,md}``);
   ``bench:energy:triton_tiled`` after it: v5's variant (chains="tiled") timed in the same
   run, so triton_tiled / triton is one device's one run (with the H200 timings of 683d510
   and this step's estimate, ~30 s, the last step, tests:compile, no longer fits the budget:
   tests/test_gpu_check.py H200_LEFT_OUT);
5. ``bench:step:main``: the step benchmark (tiny VLA, ~1B Llama-style backbone), every strategy,
   eager and with CUDA graphs (``*_graphs``: run.cuda_graphs = "on");
6. ``tests:graphs``: graphed == eager bitwise, no host sync in a graphed step;
7. ``bench:layer_actions:torch_compile``, ``bench:energy:torch_compile``: each compiling
   provider in its own process under a compile-time cap (110 s, cut to the budget; 70 s of it
   reserved): one that has not compiled in time is killed and reported as such. On the H200
   (commit 683d510) they took 58 s and 55 s, compilation included;
8. ``plan:memory`` (bench/plan_check.py: the memory plan of a two_phase step against its
   measured peak, the tiny VLA and the OFT stand-in at ~1B);
9. ``tests:overlap``, ``tests:no_host_sync``, ``tests:other``, ``tests:compile``: what the
   budget has left (on the H200 at 683d510 the steps needed ~560 s together, ~580 with the
   profile step: 585 s fits them; the device tool allows 600 s a call).

After every step it rewrites, under ``--results`` (default bench/results), ``gpu-check-<dev>.
{json,md,log}`` (device, ceilings, steps, tests, the targets table, every benchmark table)
and ``<op>-<dev>.{json,md,png}`` per benchmark (``step-timeline-<dev>.*`` too), and copies
a compact set to ``--out DIR``: the three gpu-check files and ``gpu-check-<dev>-results.tar.gz``
(all of the above), 4 files, each under 16 MB.

``GPU_CHECK_DRY=1``: the same steps on the CPU (CUDA hidden) at the benchmarks' reduced CPU
shapes, the device step and the benchmarks on the GPU timing path with stand-ins for
triton's ``do_bench`` and torch.cuda's calls that return exactly what those return
(``bench.harness``, ET_GPU_STANDIN=1: every line that handles a GPU result runs here), the GPU tests collected and reported as not run, compile caps of 2 s (so the
"did not compile in time" path runs), results under bench/results/dry/ (git-ignored), file
names ``*-cpu-dry.*``; under 2 minutes. ``--only PATTERN`` reruns the matching steps alone
(fnmatch on the names above; device and collect always run): the benchmark files keep the
earlier run's records of the providers not rerun, and the summary is ``gpu-check-<dev>-rerun.*``.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUDGET_S = 585.0        # the whole command, set-up included (a device call may run 600 s; the tool needs a few of them)
DRY_BUDGET_S = 150.0
RESERVE_S = 12.0        # kept for the last publish
OUT_FILE_MAX = 15 << 20  # each file copied to --out stays under the device tool's 16 MB

# Production cases, by their params (scripts/gpu_check.py fails loudly when a benchmark no
# longer has one): role -> params that must match (first matching case wins).
SELECT = {
    "layer_actions": {"prod": dict(L1=33, B=8, H=8, Da=7, D=4096, dtype="bfloat16", act="relu")},
    "energy": {"h512": dict(loss="swap", mode="fwdbwd", B=8, S=600, D=4096, E=512, heads=8,
                            dtype="float32"),
               "h1024": dict(loss="swap", mode="fwdbwd", B=8, S=600, D=4096, E=1024, heads=16,
                             dtype="float32"),
               "h512bf16": dict(loss="swap", mode="fwdbwd", B=8, S=600, D=4096, E=512, heads=8,
                                dtype="bfloat16")},
    "step": {"tiny": dict(kind="tiny"), "1b": dict(kind="decoder", d_model=2048, n_layers=16)},
}
DRY_SELECT = {
    "layer_actions": {"prod": dict(H=8, Da=7, dtype="float32")},
    "energy": {"h512": dict(loss="swap", mode="fwdbwd")},
    "step": {"tiny": dict(kind="tiny")},
}
ROLE_TITLES = {"prod": "D=4096 L+1=33 B=8 H=8 Da=7 bf16", "h512": "swap fwd+bwd, hidden 512/8",
               "h1024": "swap fwd+bwd, hidden 1024/16",
               "h512bf16": "swap fwd+bwd, hidden 512/8, bf16 model", "tiny": "tiny VLA",
               "1b": "~1B Llama-style"}

# GPU test groups: (name, title, rule on the node id); the first matching rule wins.
TEST_GROUPS = [
    ("compile", "inductor / torch.compile tests", lambda n: "inductor" in n or "compile" in n),
    ("graphs", "CUDA graphs: graphed == eager bitwise, no host sync when graphed",
     lambda n: n.startswith("tests/test_graphs.py")),
    ("parity", "kernel parity (bf16, fp16, tf32; production shapes)",
     lambda n: n.startswith("tests/test_kernel_")),
    ("overlap", "overlapped step == sequential, bitwise", lambda n: "equals_sequential" in n),
    ("no_host_sync", "no host sync inside a step (set_sync_debug_mode('error'))",
     lambda n: "no_host_sync" in n),
    ("other", "the other GPU tests", lambda n: True),
]
# caps in seconds (GPU); the dry run uses DRY_CAPS where given
CAPS = {"device": 60, "collect": 60, "tests:parity": 150, "tests:overlap": 75,
        "tests:no_host_sync": 60, "tests:other": 60, "tests:compile": 120, "tests:graphs": 90,
        "bench:main": 75, "bench:gpu_only": 90, "bench:step:main": 200, "bench:compile": 110,
        "plan:memory": 150}
PLAN_TOLERANCE = 0.10   # the memory plan's peak against the measured one
DRY_CAPS = {"bench:compile": 2}
# seconds kept for a step from every step before it (a cap cut to the budget leaves them):
# torch.compile of layer actions took 58 s on the H200, of the energy op 55 s (compile
# included; gpu-check-h200-rerun.log at 683d510). The dry run keeps its (2 s) cap.
RESERVE = {"bench:compile": 70}
# the least time a step starts with on a GPU (default 20 s): the last test groups take what
# the budget leaves, and one started without the time it took on the H200 (683d510: overlap
# 25 s, no_host_sync 15, other 14, compile 45, pytest's start-up included) would only be
# killed, a failure that says nothing about the package; left out, it reads "not run: budget"
MIN_S = {"tests:overlap": 30, "tests:no_host_sync": 20, "tests:other": 20, "tests:compile": 50}
PROFILE_CAP_S = (20.0, 90.0)  # bench:energy:profile on the GPU (kernels cached), in a dry run
STATUS_RE = re.compile(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+::\S+)"
                       r"|(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


# --------------------------------------------------------------------------------------------
# worker: device information and ceilings (runs in its own process)
# --------------------------------------------------------------------------------------------
def _nvidia_smi() -> dict:
    """Clocks, driver and limits as nvidia-smi reads them (read-only queries); a smaller field
    set if this nvidia-smi rejects a name of the first."""
    err = ""
    for fields in ("name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
                   "power.limit,memory.total,pstate,temperature.gpu,compute_mode",
                   "name,driver_version,clocks.sm,clocks.max.sm"):
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        if out.returncode == 0 and out.stdout.strip():
            first = out.stdout.strip().splitlines()[0]
            return dict(zip(fields.split(","), (v.strip() for v in first.split(","))))
        err = (out.stderr or out.stdout).strip()[:300]
    return {"error": err}


def _device_properties(torch):
    """torch.cuda's device properties, or (dry run) a stand-in with the same attributes."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device("cuda"))
    from types import SimpleNamespace
    return SimpleNamespace(name=f"cpu ({platform.processor() or platform.machine()}) "
                                "[GPU path, stand-ins]", major=0, minor=0,
                           multi_processor_count=os.cpu_count() or 1, total_memory=0,
                           L2_cache_size=0)


def device_worker(path: Path) -> None:
    """Device facts and ceilings. The dry run takes the SAME branch with the harness's
    stand-ins (ET_GPU_STANDIN=1) and a stand-in for the device properties."""
    import torch

    from bench.harness import (_triton_version, git_commit, gpu_path, gpu_standin,
                               measure_ceilings)
    info = dict(torch=torch.__version__, triton=_triton_version(), cuda=torch.version.cuda,
                python=platform.python_version(), commit=git_commit(),
                cuda_available=torch.cuda.is_available(), gpu_standin=gpu_standin())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not gpu_path(dev):
        raise RuntimeError("device worker: no CUDA device and no stand-ins (ET_GPU_STANDIN=1)")
    p = _device_properties(torch)
    info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None),
                nvidia_smi=_nvidia_smi())
    # written before the ceilings: a failure there still leaves the device's name for the files
    path.write_text(json.dumps(dict(device=info, ceilings=None), indent=1))
    print(f"device: {p.name}, {p.multi_processor_count} SMs; measuring ceilings", flush=True)
    ceilings = measure_ceilings(dev)
    print(f"ceilings: bf16 matmul {ceilings['bf16_matmul_tflops']:.1f} TFLOP/s, "
          f"copy {ceilings['copy_gbps']:.1f} GB/s", flush=True)
    path.write_text(json.dumps(dict(device=info, ceilings=ceilings), indent=1))


# --------------------------------------------------------------------------------------------
# subprocesses under a time cap
# --------------------------------------------------------------------------------------------
@dataclass
class Proc:
    rc: int | None
    seconds: float
    timed_out: bool
    output: str


def run_proc(cmd: list, timeout: float, log, env: dict, prefix: str) -> Proc:
    """Run ``cmd`` in its own process group, streaming its output into the log; on timeout
    kill the whole group (compile workers, xdist workers included)."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, errors="replace",
                         start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in p.stdout:
            lines.append(line)
            log(prefix + line.rstrip("\n"))
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        p.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    reader.join(timeout=10)
    return Proc(p.returncode, time.monotonic() - t0, timed_out, "".join(lines))


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def group_tests(nodeids: list[str]) -> dict[str, list[str]]:
    groups = {name: [] for name, _, _ in TEST_GROUPS}
    for n in nodeids:
        name = next(g for g, _, rule in TEST_GROUPS if rule(n))
        groups[name].append(n)
    return groups


def _nodeid(case: ET.Element) -> str:
    cls = case.get("classname", "")
    mod = cls.replace(".", "/") + ".py" if cls else case.get("file", "?")
    return f"{mod}::{case.get('name')}"


def parse_junit(path: Path) -> dict[str, dict]:
    """{nodeid: {outcome, message}} from a pytest junit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                text = (child.text or "").strip().splitlines()
                message = (child.get("message") or "").strip()
                if outcome != "skipped":
                    message = (message + "\n" + "\n".join(text[-25:])).strip()[-3000:]
                break
        out[_nodeid(case)] = dict(outcome=outcome, message=message)
    return out


def parse_verbose(output: str) -> dict[str, dict]:
    """{nodeid: {outcome}} from pytest -v lines (plain and xdist formats): what ran before a
    group was killed."""
    out = {}
    for m in STATUS_RE.finditer(output):
        status, nodeid = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        out[nodeid] = dict(outcome={"PASSED": "passed", "FAILED": "failed", "ERROR": "error",
                                    "SKIPPED": "skipped", "XFAIL": "skipped",
                                    "XPASS": "failed"}[status], message="")
    return out


def summarize_tests(collected: list[str], results: dict[str, dict]) -> dict:
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for r in results.values():
        counts[r["outcome"]] += 1
    ran = set(results)
    return dict(collected=len(collected), **counts,
                not_reported=[n for n in collected if n not in ran],
                failures=[dict(nodeid=n, outcome=r["outcome"], message=r["message"])
                          for n, r in results.items() if r["outcome"] in ("failed", "error")])


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------
def resolve_cases(op: str, dry: bool) -> dict:
    """The cases SELECT (GPU) / DRY_SELECT (CPU shapes) names in bench_<op>, and its providers
    split into process groups: {"cases": {role: name}, "params": {role: params},
    "groups": [(group, [providers], kind)], "providers": [all names], "baseline": name}."""
    import importlib

    import torch
    mod = importlib.import_module(f"bench.bench_{op}")
    bench = mod.make_benchmark(torch.device("cpu" if dry else "cuda"), quick=False,
                               cpu_shapes=dry)
    sel = (DRY_SELECT if dry else SELECT)[op]
    cases, params = {}, {}
    for role, want in sel.items():
        match = next((c for c in bench.cases
                      if all(c.params.get(k) == v for k, v in want.items())), None)
        if match is None:
            raise LookupError(f"bench_{op} has no case with params {want} (role {role}); its "
                              f"cases: {', '.join(c.name for c in bench.cases)}")
        cases[role], params[role] = match.name, match.params
    groups = [("main", [p.name for p in bench.providers
                        if not p.gpu_only and "compile" not in p.name], "main")]
    groups += [(p.name, [p.name], "gpu_only") for p in bench.providers if p.gpu_only]
    groups += [(p.name, [p.name], "compile") for p in bench.providers
               if not p.gpu_only and "compile" in p.name]
    return dict(op=op, cases=cases, params=params, groups=[g for g in groups if g[1]],
                providers=[p.name for p in bench.providers], baseline=bench.baseline,
                cpu_skipped=[p.name for p in bench.providers if p.gpu_only or not p.cpu_ok])


def killed_status(kind: str, cap: float, output: str, case: str, provider: str) -> str:
    warm = re.search(rf"warm-up {re.escape(case)} / {re.escape(provider)}: ([0-9.]+) s", output)
    if kind == "compile" and not warm:
        return f"did not compile within {cap:.0f} s (killed: compile-time cap)"
    if warm:
        return f"timed out after {cap:.0f} s (warm-up done in {warm.group(1)} s; killed while timing)"
    return f"timed out after {cap:.0f} s (killed before its warm-up finished)"


def merge_records(sel: dict, parts: list[dict]) -> list[dict]:
    """Records of every part (one per case x provider, in the benchmark's provider order),
    speed-ups recomputed against the baseline across the parts (same device, one run)."""
    recs = [r for part in parts for r in part]
    order = {p: i for i, p in enumerate(sel["providers"])}
    cases = list(sel["cases"].values())
    recs.sort(key=lambda r: (cases.index(r["case"]) if r["case"] in cases else 99,
                             order.get(r["provider"], 99)))
    for case in cases:
        row = [r for r in recs if r["case"] == case]
        base = next((r for r in row if r["provider"] == sel["baseline"]
                     and r.get("status") == "ok"), None)
        for r in row:
            r.pop("speedup_vs_baseline", None)
            if base and r.get("status") == "ok":
                r["speedup_vs_baseline"] = base["median_ms"] / r["median_ms"]
    return recs


# --------------------------------------------------------------------------------------------
# targets (the Part B table), from whatever was measured
# --------------------------------------------------------------------------------------------
def _find(benches, op, role, provider):
    b = benches.get(op)
    if not b or role not in b["sel"]["cases"]:
        return None
    case = b["sel"]["cases"][role]
    return next((r for r in b["records"] if r["case"] == case and r["provider"] == provider
                 and r.get("status") == "ok"), None)


def _row(what, target, value, ok, fmt="{:.2f}x", note=""):
    return dict(what=what, target=target, value=value,
                measured="not measured" if value is None else fmt.format(value),
                met=None if value is None else bool(ok(value)), note=note)


def targets(benches: dict, tests: dict, dry: bool = False, plan: dict | None = None) -> list[dict]:
    """One row per target: what, target, measured (text), value, met (None: not measured;
    always None in a dry run, whose figures only exercise the report). ``plan``: the
    plan:memory step's results (bench/plan_check.py)."""
    rows = targets_rows(benches, tests, plan or {})
    if dry:
        for r in rows:
            r["met"] = None
    return rows


def targets_rows(benches: dict, tests: dict, plan: dict | None = None) -> list[dict]:
    rows = []

    def ratio(slow, fast):
        return None if slow is None or fast is None else slow["median_ms"] / fast["median_ms"]
    ref = _find(benches, "layer_actions", "prod", "reference_loop")
    compiled = _find(benches, "layer_actions", "prod", "torch_compile")
    for provider in ("triton", "triton_cublas"):
        tr = _find(benches, "layer_actions", "prod", provider)
        rows.append(_row(f"layer actions: {provider} vs the public per-layer loop", ">= 10x",
                         ratio(ref, tr), lambda v: v >= 10))
        rows.append(_row(f"layer actions: {provider} vs torch.compile", ">= 1.0x",
                         ratio(compiled, tr), lambda v: v >= 1.0))
        rows.append(_row(f"layer actions: {provider}, % of the measured bf16 matmul ceiling",
                         ">= 75%", tr.get("pct_peak_flops") if tr else None, lambda v: v >= 75,
                         "{:.0f}%"))
    for role, vs_compile in (("h512", 2.0), ("h1024", 2.0), ("h512bf16", 5.0)):
        title = ROLE_TITLES[role]
        tr = _find(benches, "energy", role, "triton")
        rows.append(_row(f"{title}: triton vs torch.compile", f">= {vs_compile:g}x",
                         ratio(_find(benches, "energy", role, "torch_compile"), tr),
                         lambda v, b=vs_compile: v >= b))
        rows.append(_row(f"{title}: triton vs eager encode-once", "(report)",
                         ratio(_find(benches, "energy", role, "eager_once"), tr),
                         lambda v: True))
        # v5's variant (bench provider triton_tiled: chains="tiled"), beside v4's in the run
        tt = _find(benches, "energy", role, "triton_tiled")
        rows.append(_row(f"{title}: triton_tiled vs torch.compile", f">= {vs_compile:g}x",
                         ratio(_find(benches, "energy", role, "torch_compile"), tt),
                         lambda v, b=vs_compile: v >= b))
        rows.append(_row(f"{title}: triton_tiled vs triton (v5 / v4 speed-up)", "(report)",
                         ratio(tr, tt), lambda v: True))
        if role == "h512bf16":
            continue
        rows.append(_row(f"{title}: triton vs the replicated public formulation", ">= 10x",
                         ratio(_find(benches, "energy", role, "reference_replicated"), tr),
                         lambda v: v >= 10))
        mem = None
        if tr and tr.get("peak_mem_bytes") is not None and tr["params"].get("ctx_bytes"):
            mem = tr["peak_mem_bytes"] / tr["params"]["ctx_bytes"]
        rows.append(_row(f"{title}: triton peak memory above inputs / encoded context K|V",
                         "<= 2x", mem, lambda v: v <= 2))
    for role, bound in (("tiny", 0.75), ("1b", 0.95)):
        rows.append(_row(f"step, {ROLE_TITLES[role]}: two_phase overlapped / sequential",
                         f"<= {bound}x",
                         ratio(_find(benches, "step", role, "two_phase_overlap"),
                               _find(benches, "step", role, "two_phase_seq")),
                         lambda v, b=bound: v <= b))
    for role in ("tiny", "1b"):
        rows.append(_row(f"step, {ROLE_TITLES[role]}: shared_forward / joint", "<= 1.05x",
                         ratio(_find(benches, "step", role, "shared_forward"),
                               _find(benches, "step", role, "joint")), lambda v: v <= 1.05))
    rows += graph_rows(benches, ratio)
    for r in (plan or {}).get("results", []):
        if "error" in r:
            rows.append(_row(f"memory plan vs measured peak, {r['case']}", "within 10%", None,
                             bool, note=r["error"][:120]))
            continue
        m = r["measured"]
        ws = r.get("planned_workspaces") or 0
        if m.get("peak"):
            note = (f"planned {r['planned_peak'] / 2**20:.0f} MiB"
                    + (f" ({ws / 2**20:.0f} MiB of it cuBLAS/cuBLASLt workspaces)" if ws else "")
                    + f", measured {m['peak'] / 2**20:.0f} MiB")
        else:
            note = (f"above the step's start: planned {r['planned_above_start'] / 2**20:.1f} "
                    f"MiB, measured (CPU profiler) {m['above_start'] / 2**20:.1f} MiB")
        rows.append(_row(f"memory plan vs measured peak, {r['case']}", "within 10%",
                         r["ratio"], lambda v: abs(v - 1) <= PLAN_TOLERANCE, "{:.3f}x", note))
    ran = [g for g in tests.values() if g.get("passed", 0) + g.get("failed", 0)
           + g.get("error", 0) > 0]
    total = sum(g.get("collected", 0) for g in tests.values())
    passed = sum(g.get("passed", 0) for g in tests.values())
    rows.append(_row("correctness: every GPU test passes", "all", passed if ran else None,
                     lambda v: v == total, "{:d}/" + str(total) + " passed"))
    sync = tests.get("no_host_sync", {})
    rows.append(_row("correctness: no host sync inside a step", "0 syncs",
                     sync.get("passed") if sync.get("passed", 0) + sync.get("failed", 0)
                     + sync.get("error", 0) else None,
                     lambda v: v == sync.get("collected"),
                     "{:d}/" + str(sync.get("collected", 0)) + " tests pass"))
    return rows


def graph_rows(benches: dict, ratio) -> list[dict]:
    """The issue-25 targets: the tiny VLA's step with CUDA graphs, the ~1B backbone's
    overlapped step (graphed, the default) against joint and against the sequential one."""
    rows = []
    seq = _find(benches, "step", "tiny", "two_phase_seq")
    tiny = _find(benches, "step", "tiny", "two_phase_overlap_graphs")
    rows.append(_row("step, tiny VLA: two_phase overlapped with CUDA graphs (ms)", "<= 8 ms",
                     tiny["median_ms"] if tiny else None, lambda v: v <= 8, "{:.2f} ms"))
    rows.append(_row("step, tiny VLA: two_phase eager sequential / overlapped with CUDA graphs",
                     ">= 3x", ratio(seq, tiny), lambda v: v >= 3))
    over = _find(benches, "step", "1b", "two_phase_overlap_graphs")
    rows.append(_row("step, ~1B Llama-style: two_phase overlapped (graphs) / joint", "<= 1.05x",
                     ratio(over, _find(benches, "step", "1b", "joint")), lambda v: v <= 1.05))
    rows.append(_row("step, ~1B Llama-style: two_phase overlapped / sequential (both graphed)",
                     "<= 0.85x", ratio(over, _find(benches, "step", "1b", "two_phase_seq_graphs")),
                     lambda v: v <= 0.85))
    return rows


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    cap: float
    run: object          # callable(Step, timeout) -> dict (status, detail)
    min_s: float = 15.0
    reserve: float = 0.0  # seconds no step before this one may take from it


def step_timeout(step: Step, later: list[Step], left: float) -> float:
    """The time ``step`` may run: its cap, cut to what is ``left`` of the budget minus what
    the ``later`` steps (those that will still run) have reserved."""
    return min(step.cap, left - sum(s.reserve for s in later))


@dataclass
class Check:
    dry: bool
    deadline: float
    t0: float
    results: Path
    out: Path | None
    work: Path
    budget: float
    py: str = sys.executable
    tag: str = "unknown"
    suffix: str = ""
    device: dict = field(default_factory=dict)
    ceilings: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    tests: dict = field(default_factory=dict)
    test_ids: dict = field(default_factory=dict)
    benches: dict = field(default_factory=dict)
    gpu_selection: dict = field(default_factory=dict)
    plan_check: dict = field(default_factory=dict)
    _log: object = None

    # ---------------------------------------------------------------- logging / env
    def log(self, line: str) -> None:
        stamp = f"[{time.time() - self.t0:6.1f}s] "
        self._log.write(stamp + line + "\n")
        self._log.flush()
        print(stamp + line, flush=True)

    def env(self, pytest: bool) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TRITON_INTERPRET", None)
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""
            if pytest:
                env["TRITON_INTERPRET"] = "1"
            else:  # the device and benchmark steps take the GPU timing path, on stand-ins
                env["ET_GPU_STANDIN"] = "1"
        return env

    def cap(self, key: str) -> float:
        return (DRY_CAPS if self.dry else {}).get(key, CAPS[key])

    def reserve(self, key: str) -> float:
        return min(RESERVE.get(key, 0.0), self.cap(key))

    # ---------------------------------------------------------------- steps
    def step_device(self, step, timeout):
        path = self.work / "device.json"
        pr = run_proc([self.py, Path(__file__), "--device-worker", path], timeout, self.log,
                      self.env(False), "  device| ")
        data = json.loads(path.read_text()) if path.exists() else {}
        self.device = data.get("device") or self.device_fallback()
        self.tag = device_tag(self.device, self.dry)  # the files carry the device's name
        if not data.get("ceilings"):
            return dict(status=_failed(pr, timeout), detail=_tail(pr.output))
        self.ceilings = data["ceilings"]
        (self.work / "ceilings.json").write_text(json.dumps(self.ceilings))
        c = self.ceilings
        return dict(status="ok", detail=f"{self.device['name']}: bf16 matmul "
                    f"{c['bf16_matmul_tflops']:.4g} TFLOP/s, copy {c['copy_gbps']:.4g} GB/s")

    def device_fallback(self) -> dict:
        """The device's name when the worker wrote nothing: nvidia-smi's (or the CPU's in a
        dry run)."""
        if self.dry:
            return dict(name=f"cpu ({platform.processor() or platform.machine()})")
        smi = _nvidia_smi()
        return dict(name=smi.get("name", "unknown GPU"), nvidia_smi=smi)

    def step_collect(self, step, timeout):
        pr = run_proc([self.py, "-m", "pytest", "-m", "gpu", "--collect-only", "-q"], timeout,
                      self.log, self.env(True), "  collect| ")
        ids = [ln.strip() for ln in pr.output.splitlines()
               if ln.startswith("tests/") and "::" in ln]
        if not ids:
            return dict(status=_failed(pr, timeout), detail=_tail(pr.output))
        self.test_ids = group_tests(ids)
        for name, title, _ in TEST_GROUPS:
            self.tests[name] = dict(title=title, collected=len(self.test_ids[name]),
                                    status="pending")
        detail = (", ".join(f"{g} {len(v)}" for g, v in self.test_ids.items())
                  + f" ({len(ids)} tests)")
        if pr.rc != 0:  # e.g. a test module that does not import: the others still run
            return dict(status=f"failed: collection errors (rc {pr.rc})",
                        detail=detail + "; " + _tail(pr.output, 3))
        return dict(status="ok", detail=detail)

    def step_tests(self, group):
        def run(step, timeout):
            ids = self.test_ids.get(group, [])
            rec = self.tests.setdefault(group, dict(title=group, collected=0))
            if not self.test_ids:
                rec["status"] = "not run: the collection failed"
                return dict(status=rec["status"], detail="")
            if not ids:
                rec["status"] = "no tests"
                return dict(status="ok", detail="no tests in this group")
            junit = self.work / f"junit-{group}.xml"
            cmd = [self.py, "-m", "pytest", "-v", "-m", "gpu",
                   f"--junitxml={junit}", *ids]
            if (not self.dry and len(ids) >= 8 and group == "parity"
                    and _has_module("xdist")):
                cmd[3:3] = ["-n", "4"]
            pr = run_proc(cmd, timeout, self.log, self.env(True), f"  {group}| ")
            results = parse_verbose(pr.output)
            if junit.exists() and not pr.timed_out:
                results.update(parse_junit(junit))
            rec.update(summarize_tests(ids, results))
            if pr.timed_out:
                rec["status"] = f"timed out after {timeout:.0f} s"
            elif pr.rc not in (0, 1) and not results:
                rec["status"] = f"pytest failed (rc {pr.rc})"
            else:
                rec["status"] = "ok" if rec["failed"] + rec["error"] == 0 else "failures"
            detail = (f"{rec['passed']} passed, {rec['failed']} failed, {rec['error']} errors, "
                      f"{rec['skipped']} skipped of {rec['collected']}")
            if rec["not_reported"]:
                detail += f"; {len(rec['not_reported'])} not reported"
            if self.dry and rec["skipped"] == rec["collected"]:
                detail += " (no CUDA: skipped, NOT run)"
            status = rec["status"] if rec["status"] != "failures" else "ok (tests failed)"
            return dict(status=status, detail=detail)
        return run

    def step_bench(self, op, group, providers, kind):
        def run(step, timeout):
            b = self.benches[op]
            sel = b["sel"]
            if self.dry and set(providers) <= set(sel["cpu_skipped"]):
                # the harness would skip them on the CPU: no process to start
                b["parts"][group] = [dict(case=c, params=sel["params"][r], provider=p,
                                          status="skipped on the CPU (dry run)")
                                     for r, c in sel["cases"].items() for p in providers]
                b["rerun"].add(group)
                b["records"] = merge_records(sel, list(b["parts"].values()))
                return dict(status="skipped on the CPU",
                            detail="the harness skips these providers on a CPU: not launched")
            cmd = [self.py, "-m", "bench.run", op, "--out", self.work / "parts",
                   "--tag", f"part-{group}"]
            if (self.work / "ceilings.json").exists():
                cmd += ["--ceilings", self.work / "ceilings.json"]
            if self.dry:
                cmd += ["--device", "cpu", "--cpu-shapes"]
            for c in sel["cases"].values():
                cmd += ["--case", c]
            for p in providers:
                cmd += ["--provider", p]
            pr = run_proc(cmd, timeout, self.log, self.env(False), f"  {op}:{group}| ")
            part = next(iter(sorted((self.work / "parts").glob(f"{op}-*-part-{group}.json"))),
                        None)
            if part is not None:  # written: keep the records even if a later stage failed
                data = json.loads(part.read_text())
                b["meta"] = data["meta"]
                recs = data["records"]
                part.unlink()
                status = ("ok" if pr.rc == 0 else
                          f"timed out after {timeout:.0f} s, after writing its results"
                          if pr.timed_out else
                          f"failed after writing its results (rc {pr.rc}): {_tail(pr.output, 1)}")
            else:
                recs = []
                for role, case in sel["cases"].items():
                    for p in providers:
                        st = (killed_status(kind, timeout, pr.output, case, p) if pr.timed_out
                              else f"error: process exited with rc {pr.rc}: "
                                   f"{_tail(pr.output, 1)}")
                        recs.append(dict(case=case, params=sel["params"][role], provider=p,
                                         status=st))
                status = ("did not compile in time" if kind == "compile" and pr.timed_out
                          else _failed(pr, timeout))
            b["parts"][group] = recs
            b["rerun"].add(group)
            b["records"] = merge_records(sel, list(b["parts"].values()))
            for tl in (self.work / "parts").glob("step-timeline-*"):
                shutil.move(tl, self.results / f"step-timeline-{self.tag}{tl.suffix}")
            errors = [r for r in recs if str(r.get("status", "")).startswith("error")]
            if errors and status == "ok":
                status = "ok (provider errors)"
            detail = "; ".join(f"{r['case']} / {r['provider']}: " + (
                f"{r['median_ms']:.3f} ms" if r.get("status") == "ok" else str(r.get("status")))
                for r in recs)
            return dict(status=status, detail=detail)
        return run

    def step_profile(self, step, timeout):
        """bench/bench_energy_profile.py: per-kernel device times of the energy fwd+bwd."""
        cmd = [self.py, "-m", "bench.run", "energy_profile", "--out", self.results, "--tag",
               self.tag] + (["--device", "cpu"] if self.dry else [])
        pr = run_proc(cmd, timeout, self.log, self.env(False), "  profile| ")
        lines = [ln for ln in pr.output.splitlines() if "device time" in ln]
        return dict(status="ok" if pr.rc == 0 else _failed(pr, timeout),
                    detail=" | ".join(lines)[-600:] or _tail(pr.output, 2))

    def step_plan_memory(self, step, timeout):
        """bench/plan_check.py: the memory plan of a two_phase step against its measured peak
        (GPU: the tiny VLA and the OFT stand-in at ~1B; dry run: the tiny VLA on the CPU)."""
        path = self.work / "plan-check.json"
        cmd = [self.py, "-m", "bench.plan_check", "--out", path]
        if self.dry:
            cmd += ["--device", "cpu"]
        pr = run_proc(cmd, timeout, self.log, self.env(False), "  plan| ")
        if not path.exists():
            return dict(status=_failed(pr, timeout), detail=_tail(pr.output))
        self.plan_check = json.loads(path.read_text())
        self.results.mkdir(parents=True, exist_ok=True)
        (self.results / f"plan-check-{self.tag}.json").write_text(
            json.dumps(self.plan_check, indent=1))
        detail = "; ".join(f"{r['case']}: " + (r["error"][:100] if "error" in r else
                                                f"plan/measured {r['ratio']:.3f}")
                           for r in self.plan_check["results"])
        status = "ok" if pr.rc == 0 else (f"timed out after {timeout:.0f} s" if pr.timed_out
                                          else f"failed (rc {pr.rc})")
        return dict(status=status, detail=detail)

    # ---------------------------------------------------------------- plan
    def plan(self) -> list[Step]:
        steps = [Step("device", self.cap("device"), self.step_device, 5),
                 Step("collect", self.cap("collect"), self.step_collect, 5)]
        min_s = 3 if self.dry else 20
        tests = {name: Step(f"tests:{name}", self.cap(f"tests:{name}"), self.step_tests(name),
                            min_s if self.dry else MIN_S.get(f"tests:{name}", min_s))
                 for name, _, _ in TEST_GROUPS}
        benches = {}
        for op in ("layer_actions", "energy", "step"):
            if op not in self.benches:
                continue
            for group, providers, kind in self.benches[op]["sel"]["groups"]:
                key = ("bench:step:main" if op == "step" else
                       {"main": "bench:main", "gpu_only": "bench:gpu_only",
                        "compile": "bench:compile"}[kind])
                benches[(op, group)] = (kind, Step(f"bench:{op}:{group}", self.cap(key),
                                                   self.step_bench(op, group, providers, kind),
                                                   1 if kind == "compile" and self.dry else min_s,
                                                   self.reserve(key)))
        first = [s for (op, _), (kind, s) in benches.items()
                 if op in ("layer_actions", "energy") and kind != "compile"]
        step_bench = [s for (op, _), (kind, s) in benches.items()
                      if op not in ("layer_actions", "energy") and kind != "compile"]
        compiled = [s for (_, _), (kind, s) in benches.items() if kind == "compile"]
        if ("energy", "triton") in benches:
            first.insert(first.index(benches[("energy", "triton")][1]) + 1, Step(
                "bench:energy:profile", PROFILE_CAP_S[self.dry], self.step_profile, min_s))
        memory = Step("plan:memory", self.cap("plan:memory"), self.step_plan_memory, min_s)
        return (steps + [tests["parity"]] + first + step_bench + [tests["graphs"]] + compiled
                + [memory]
                + [tests["overlap"], tests["no_host_sync"], tests["other"], tests["compile"]])

    # ---------------------------------------------------------------- publish
    def publish(self) -> None:
        from bench.harness import markdown_table, plot
        self.results.mkdir(parents=True, exist_ok=True)
        stem = self.results / f"gpu-check-{self.tag}{self.suffix}"
        for op, b in self.benches.items():
            if not b.get("dirty"):
                continue
            b["dirty"] = False
            meta = dict(b.get("meta") or self._bench_meta(op), providers=b["sel"]["providers"],
                        baseline=b["sel"]["baseline"])
            meta.setdefault("notes", [])
            note = ("gpu-check: each provider group ran in its own process, one after another "
                    "on the same device; speed-ups are against the baseline of this run")
            kept = [p for g, recs in b["parts"].items() if g not in b["rerun"]
                    for p in dict.fromkeys(r["provider"] for r in recs)]
            meta["notes"] = [n for n in meta["notes"] if not n.startswith("gpu-check")] + [note]
            if kept:
                meta["notes"].append(f"gpu-check --only: {', '.join(kept)} kept from an earlier "
                                     f"run ({b.get('carried', '?')})")
            b["meta"] = meta
            bstem = self.results / f"{op}-{self.tag}"
            bstem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, records=b["records"]),
                                                             indent=1))
            bstem.with_suffix(".md").write_text(markdown_table(meta, b["records"]))
            if any(r.get("status") == "ok" for r in b["records"]):
                plot(meta, b["records"], bstem.with_suffix(".png"))
        summary = self.summary()
        stem.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
        stem.with_suffix(".md").write_text(summary_markdown(summary))
        shutil.copyfile(self.work / "gpu-check.log", stem.with_suffix(".log"))
        if self.out is not None:
            self.copy_out(stem)

    def not_run(self, name: str, status: str) -> None:
        """Mark a step's tests or benchmark records as not run (kept records stay)."""
        kind, _, rest = name.partition(":")
        if kind == "tests" and rest in self.tests:
            self.tests[rest]["status"] = status
        elif kind == "bench":
            op, group = rest.split(":")
            b = self.benches[op]
            providers = next(p for g, p, _ in b["sel"]["groups"] if g == group)
            if group not in b["parts"]:
                b["parts"][group] = [dict(case=c, params=b["sel"]["params"][r], provider=p,
                                          status=status)
                                     for r, c in b["sel"]["cases"].items() for p in providers]
                b["records"] = merge_records(b["sel"], list(b["parts"].values()))

    def carry_over(self) -> None:
        """--only: keep, from an earlier run's <op>-<dev>.json, the records of the provider
        groups this run does not redo (a rerun replaces only what it reruns)."""
        for b in self.benches.values():
            path = self.results / f"{b['sel']['op']}-{self.tag}.json"
            if not path.exists():
                continue
            old = json.loads(path.read_text())
            cases = set(b["sel"]["cases"].values())
            for group, providers, _ in b["sel"]["groups"]:
                recs = [r for r in old["records"]
                        if r["provider"] in providers and r["case"] in cases]
                if recs:
                    b["parts"][group] = recs
            b["meta"] = old["meta"]
            b["carried"] = f"commit {old['meta'].get('commit')}, {old['meta'].get('date')}"
            b["records"] = merge_records(b["sel"], list(b["parts"].values()))

    def _bench_meta(self, op) -> dict:
        d = self.device
        return dict(op=op, device=d.get("name", "?"), device_type="cpu" if self.dry else "cuda",
                    commit=d.get("commit", "?"), date=_now(), torch=d.get("torch"),
                    triton=d.get("triton"), ceilings=self.ceilings, notes=[],
                    timing="see gpu-check log", columns=[])

    def copy_out(self, stem: Path) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".json", ".log"):
            src = stem.with_suffix(suffix)
            dst = self.out / src.name
            if src.stat().st_size <= OUT_FILE_MAX:
                shutil.copyfile(src, dst)
            else:  # keep the head and the tail
                data = src.read_bytes()
                half = OUT_FILE_MAX // 2 - 1024
                dst.write_bytes(data[:half] + b"\n...[truncated]...\n" + data[-half:])
        tar = self.out / f"gpu-check-{self.tag}{self.suffix}-results.tar.gz"
        tmp = tar.with_name(tar.name + ".tmp")
        with tarfile.open(tmp, "w:gz") as tf:
            for f in sorted(self.results.glob(f"*-{self.tag}.*")):
                tf.add(f, arcname=f.name)
        if tmp.stat().st_size <= OUT_FILE_MAX:
            os.replace(tmp, tar)
        else:
            tmp.unlink()
            self.log(f"results tarball over {OUT_FILE_MAX >> 20} MB: not copied to --out")

    def summary(self) -> dict:
        return dict(
            dry=self.dry, tag=self.tag, date=_now(), commit=self.device.get("commit"),
            budget_s=self.budget, elapsed_s=round(time.time() - self.t0, 1),
            device=self.device, ceilings=self.ceilings, steps=self.steps, tests=self.tests,
            targets=targets(self.benches, self.tests, self.dry, self.plan_check),
            plan_check=self.plan_check,
            selection={op: b["sel"]["cases"] for op, b in self.benches.items()},
            gpu_selection=self.gpu_selection,
            benches={op: dict(meta=b.get("meta"), records=b["records"])
                     for op, b in self.benches.items()},
            bench_markdown={op: (self.results / f"{op}-{self.tag}.md").read_text()
                            for op in self.benches
                            if (self.results / f"{op}-{self.tag}.md").exists()})

    # ---------------------------------------------------------------- main loop
    def run(self, only: list[str] | None) -> int:
        self.log(f"gpu-check: {'DRY RUN on the CPU' if self.dry else 'GPU run'}, budget "
                 f"{self.budget:.0f} s from t0 ({time.time() - self.t0:.0f} s spent before the "
                 f"script: set-up), results -> {self.results}")
        for op in ("layer_actions", "energy", "step"):
            try:
                sel = resolve_cases(op, self.dry)
                if self.dry:  # the production selection must still resolve: CI sees rot
                    self.gpu_selection[op] = resolve_cases(op, False)["cases"]
                self.benches[op] = dict(sel=sel, parts={}, records=[], dirty=False, rerun=set())
            except Exception as e:
                self.steps.append(dict(name=f"bench:{op}:*", status=f"error: {e}", seconds=0,
                                       detail="cases could not be selected"))
                self.log(f"bench {op}: {e}")
        def selected(step):
            return step.name in ("device", "collect") or not only or any(
                fnmatch.fnmatch(step.name, pat) for pat in only)
        pending = [s for s in self.plan() if selected(s)]
        while pending:
            step = pending.pop(0)
            left = self.deadline - time.time() - RESERVE_S
            timeout = step_timeout(step, pending, left)
            if timeout < step.min_s:
                kept = sum(s.reserve for s in pending)
                res = dict(status="not run: budget", seconds=0,
                           detail=f"{max(left, 0):.0f} s left of the {self.budget:.0f} s budget"
                           + (f", {kept:.0f} s of it reserved for later steps" if kept else ""))
                self.not_run(step.name, res["status"])
            else:
                self.log(f"== {step.name} (cap {timeout:.0f} s)")
                t = time.time()
                try:
                    res = step.run(step, timeout)
                except Exception as e:  # a bug here must not lose the other steps
                    res = dict(status=f"error: {type(e).__name__}: {e}", detail="")
                res["seconds"] = round(time.time() - t, 1)
            self.steps.append(dict(name=step.name, cap_s=round(timeout, 1), **res))
            self.log(f"   {step.name}: {res['status']} ({res['seconds']} s) {res.get('detail', '')}")
            if step.name.startswith("bench:"):
                self.benches[step.name.split(":")[1]]["dirty"] = True
            if step.name == "device" and only:
                self.carry_over()
            try:
                self.publish()
            except Exception as e:
                self.log(f"publish failed: {type(e).__name__}: {e}")
        self.log(f"gpu-check done in {time.time() - self.t0:.0f} s")
        print(final_table(self.summary()), flush=True)
        return exit_code(self.summary())


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _now() -> str:
    import datetime as dt
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _tail(output: str, n: int = 5) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-600:]


def _failed(pr: Proc, timeout: float) -> str:
    return f"timed out after {timeout:.0f} s" if pr.timed_out else f"failed (rc {pr.rc})"


def device_tag(device: dict, dry: bool) -> str:
    """Short device name for file names: h100, h200, a100, ..., cpu-dry."""
    if dry:
        return "cpu-dry"
    name = device.get("name", "")
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper())
    if m:
        return m.group(1).lower()
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return slug or "unknown-gpu"


def exit_code(summary: dict) -> int:
    """1 when a test failed, a step failed or a provider raised; timeouts of compiling
    providers and steps left out for the budget are reported, not failures."""
    bad = any(s["status"].startswith(("error", "failed", "timed out", "not run: the collection"))
              or s["status"] == "ok (tests failed)" for s in summary["steps"])
    bad |= any(str(r.get("status", "")).startswith("error")
               for b in summary["benches"].values() for r in b["records"])
    return 1 if bad else 0


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def summary_markdown(s: dict) -> str:
    d, c = s["device"], s["ceilings"]
    smi = d.get("nvidia_smi", {})
    lines = [f"# gpu-check on {d.get('name', '?')}" + (" (DRY RUN: CPU, reduced shapes)"
                                                       if s["dry"] else ""), "",
             f"commit {s['commit']}, {s['date']}, {s['elapsed_s']} s of a {s['budget_s']:.0f} s "
             "budget (set-up included). Produced by `make gpu-check` (scripts/gpu_check.py).", "",
             "## Device", "",
             "| | |", "|---|---|"]
    rows = [("name", d.get("name")), ("compute capability", d.get("capability")),
            ("SMs", d.get("sms") or d.get("cores")), ("memory", _fmt_bytes(d.get("memory_bytes"))),
            ("L2", None if d.get("l2_bytes") is None else f"{d['l2_bytes'] / 2**20:.0f} MiB"),
            ("driver", smi.get("driver_version")),
            ("SM clock now / max (MHz)", f"{smi.get('clocks.sm')} / {smi.get('clocks.max.sm')}"
             if smi and "error" not in smi else None),
            ("memory clock now / max (MHz)",
             f"{smi.get('clocks.mem')} / {smi.get('clocks.max.mem')}" if smi and "error" not in smi
             else None),
            ("power limit", smi.get("power.limit")), ("torch", d.get("torch")),
            ("triton", d.get("triton")), ("CUDA (torch)", d.get("cuda")), ("python", d.get("python"))]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    if c:
        lines += ["", f"Measured ceilings: bf16 matmul **{c['bf16_matmul_tflops']:.4g} TFLOP/s** "
                      f"({'x'.join(map(str, c['bf16_matmul_shape']))}), device-to-device copy "
                      f"**{c['copy_gbps']:.4g} GB/s** (read + write, {c['copy_bytes'] >> 20} MiB)"
                  + (f"; {c['note']}" if c.get("note") else "") + "."]
    lines += ["", "## Targets", ""]
    if s["dry"]:
        lines += ["Dry run: CPU, reduced shapes; these figures only exercise the report.", ""]
    lines += ["| what | target | measured | met |", "|---|---|---|---|"]
    for t in s["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['what']} | {t['target']} | {t['measured']}{note} | {met} |")
    plan = s.get("plan_check") or {}
    if plan.get("results"):
        lines += ["", "## Memory plan vs measured (bench/plan_check.py)", "",
                  "two_phase, sequential, eager; plan: `energy-train plan` (fake tensors; on "
                  "CUDA plus its cuBLAS/cuBLASLt workspace lines, energy_train/plan/"
                  "workspace.py); "
                  "measured: " + ("the profiler's peak of live tensors above the step's start "
                                  "(CPU)" if s["dry"] else "torch.cuda.max_memory_allocated over "
                                  "steps 1-2") + ".", "",
                  "| case | planned MiB | of which workspaces | measured MiB | plan / measured "
                  "| within 10% |", "|---|---|---|---|---|---|"]
        for r in plan["results"]:
            if "error" in r:
                lines.append(f"| {r['case']} | - | - | - | {r['error'][:200]} | - |")
                continue
            m = r["measured"]
            pl, me = ((r["planned_peak"], m["peak"]) if m.get("peak") else
                      (r["planned_above_start"], m["above_start"]))
            ws = (r.get("planned_workspaces") or 0) if m.get("peak") else 0
            lines.append(f"| {r['case']} | {pl / 2**20:.1f} | {ws / 2**20:.1f} | "
                         f"{me / 2**20:.1f} | "
                         f"{r['ratio']:.3f} | {'yes' if r['within'] else '**no**'} |")
    lines += ["", "## Steps (in the order run)", "", "| step | status | s | detail |",
              "|---|---|---|---|"]
    for st in s["steps"]:
        detail = str(st.get("detail", "")).replace("|", "/").replace("\n", " ")[:400]
        lines.append(f"| {st['name']} | {st['status']} | {st.get('seconds', 0)} | {detail} |")
    lines += ["", "## GPU tests", "", "| group | collected | passed | failed | errors | skipped | "
              "status |", "|---|---|---|---|---|---|---|"]
    for name, g in s["tests"].items():
        lines.append(f"| {g.get('title', name)} | {g.get('collected', 0)} | {g.get('passed', '-')} "
                     f"| {g.get('failed', '-')} | {g.get('error', '-')} | {g.get('skipped', '-')} "
                     f"| {g.get('status', '-')} |")
    fails = [f for g in s["tests"].values() for f in g.get("failures", [])]
    if fails:
        lines += ["", "### Failures", ""]
        for f in fails:
            lines += [f"- `{f['nodeid']}` ({f['outcome']})", "", "```",
                      f["message"][-1500:], "```", ""]
    if s["dry"]:
        lines += ["", "Dry run: the GPU tests are collected and grouped but skipped (no CUDA); "
                  "the production cases the GPU run would time: "
                  + json.dumps(s["gpu_selection"]) + "."]
    lines += ["", "## Benchmarks", ""]
    for op, md in s["bench_markdown"].items():
        sel = s["selection"].get(op, {})
        lines += ["Cases: " + ", ".join(
                      ("dry stand-in for " if s["dry"] else "") + f"{ROLE_TITLES.get(r, r)} = `{c}`"
                      for r, c in sel.items()), "",
                  md.replace("\n# ", "\n### ").replace("# ", "### ", 1), ""]
    return "\n".join(lines) + "\n"


def final_table(s: dict) -> str:
    out = ["", f"gpu-check {'(dry run) ' if s['dry'] else ''}on {s['device'].get('name', '?')}: "
                f"{s['elapsed_s']} s", "steps:"]
    out += [f"  {st['name']:<34} {st['status']:<28} {st.get('seconds', 0):>6} s" for st in s["steps"]]
    out.append("targets:")
    out += [f"  {t['what'][:70]:<70} {t['target']:>8}  {t['measured']:>14}  "
            f"{ {True: 'met', False: 'MISSED', None: '-'}[t['met']]}" for t in s["targets"]]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="also copy the compact result set here (e.g. the device tool's $OUT)")
    ap.add_argument("--results", type=Path, default=None,
                    help="results folder (default bench/results; dry run: bench/results/dry)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds from --t0 for everything (default {BUDGET_S:.0f}; dry "
                         f"{DRY_BUDGET_S:.0f})")
    ap.add_argument("--t0", type=float, default=None,
                    help="epoch seconds the budget counts from (the Makefile passes its start, "
                         "so set-up counts); default: now")
    ap.add_argument("--only", action="append", default=None, metavar="PATTERN",
                    help="run only the steps matching (fnmatch, repeatable), e.g. 'tests:*'")
    ap.add_argument("--device-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device_worker is not None:
        device_worker(args.device_worker)
        return 0
    dry = os.environ.get("GPU_CHECK_DRY", "").lower() in ("1", "true", "yes")
    if not dry:
        import torch
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here. On a CPU, GPU_CHECK_DRY=1 make gpu-check "
                  "runs the same steps at reduced shapes.", file=sys.stderr)
            return 2
    t0 = args.t0 if args.t0 is not None else time.time()
    budget = args.budget if args.budget is not None else (DRY_BUDGET_S if dry else BUDGET_S)
    results = args.results or (ROOT / "bench" / "results" / ("dry" if dry else ""))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    (work / "parts").mkdir()
    check = Check(dry=dry, deadline=t0 + budget, t0=t0, results=results, out=args.out,
                  work=work, budget=budget)
    check.tag = device_tag({}, dry)
    check.suffix = "-rerun" if args.only else ""
    try:
        with open(work / "gpu-check.log", "w") as log:
            check._log = log
            return check.run(args.only)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
