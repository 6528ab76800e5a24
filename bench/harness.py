"""The benchmark harness shared by every bench/ script.

API (for a new benchmark ``bench/bench_<op>.py``)::

    from bench.harness import Benchmark, Case, Provider, run_benchmark

    def make_benchmark(device: torch.device, quick: bool, cpu_shapes: bool) -> Benchmark:
        cases = [Case(name="B8-D4096", params=dict(B=8, D=4096),
                      flops=2*M*N*K,            # counted FLOPs (for TFLOP/s, % of peak)
                      bytes=min_bytes,          # fewest bytes moved (for GB/s), or None
                      make=lambda dev: inputs)] # builds the inputs (called per phase)
        providers = [Provider("eager", lambda inputs: (lambda: f(inputs))),
                     Provider("triton", ..., gpu_only=True)]
        return Benchmark("op", cases, providers, baseline="eager")

``python -m bench.run <op> [--quick] [--cpu-shapes] [--out DIR]`` imports
``bench.bench_<op>``, calls ``make_benchmark`` and ``run_benchmark``; the latter

1. on a GPU measures the device's own ceilings first (a large bf16 matmul in TFLOP/s, a large
   device-to-device copy in GB/s counting read + write) so "% of peak" is against measured
   peaks;
2. warms EVERY (case, provider) up (compiles, autotunes, caches) before timing any: inputs are
   built by ``Case.make`` for the warm-up pass and again for the timed pass (so two huge
   cases never live at once); each warm-up's seconds (compile time included) land in the
   record as ``warmup_s``; a provider that raises (warm-up or timing) is recorded with status
   ``error: <exception>`` and the others still run;
3. times each provider: on a GPU ``triton.testing.do_bench`` quantiles (median, p20, p80) and
   the extra peak device memory of one call; on the CPU ``time.perf_counter`` repeats taken in
   rounds that interleave the providers (median, p20, p80), skipping ``gpu_only`` providers (interpreter timings mean nothing) and reporting
   ratios against ``Benchmark.baseline`` measured in the same run;
4. writes ``<out>/<op>-<device>-<date>.json`` (meta: device, commit, date, torch/triton
   versions, ceilings; one record per case x provider: params, median/p20/p80 ms, TFLOP/s,
   % of peak, GB/s, peak memory, speed-up vs baseline), the same as a markdown table
   (``.md``) and a PNG plot (``.png``, matplotlib Agg), and returns the records.

A provider's factory gets the case's inputs and returns the zero-argument callable to time;
returning None marks the provider as not applicable to that case (recorded as skipped).

Optional, for benchmarks that report more than a time (bench/bench_step.py):
``Benchmark.annotate(case, provider_name, inputs, record, device) -> dict`` runs after a
provider is timed (inputs still alive) and its dict is merged into the record;
``Benchmark.columns`` = [(key, header, format)] adds a "details" table of those keys to the
markdown; ``Benchmark.finish(device, out_dir, records)`` runs last (extra figures).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    name: str
    params: dict
    make: Callable[[torch.device], Any]
    flops: float | None = None
    bytes: float | None = None


@dataclass
class Provider:
    name: str
    factory: Callable[[Any], Callable[[], Any] | None]
    gpu_only: bool = False
    cpu_ok: bool = True


@dataclass
class Benchmark:
    op: str
    cases: list
    providers: list
    baseline: str | None = None
    notes: list = field(default_factory=list)
    annotate: Callable | None = None
    columns: list = field(default_factory=list)
    finish: Callable | None = None
    # memory(case, provider_name, inputs) -> dict merged into the record (e.g. saved_bytes),
    # asked for every provider, timed or not; {} when it has nothing to say
    memory: Callable[[Case, str, Any], dict] | None = None
    cpu_budget_s: float = 0.6  # CPU: about this many seconds of repeats per (case, provider)


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        # results written earlier in the same session do not make the measured code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)bench/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# the device calls of the GPU timing path: CUDA's, or stand-ins that return exactly what they
# return, so that the dry run (GPU_CHECK_DRY=1 sets ET_GPU_STANDIN=1) runs every line that
# handles a GPU result on the CPU
# --------------------------------------------------------------------------------------------
STANDIN_ENV = "ET_GPU_STANDIN"


def gpu_standin() -> bool:
    """True when the GPU timing path runs on the CPU against stand-ins (the dry run)."""
    return os.environ.get(STANDIN_ENV, "0") == "1"


def gpu_path(device: torch.device) -> bool:
    """Time with the GPU path: on CUDA, or on the CPU with the stand-ins."""
    return device.type == "cuda" or gpu_standin()


def _summarize(times: list, quantiles, return_mode: str):
    """triton.testing.do_bench's return value for these times: triton's own summary where it
    has one (a float for ONE quantile, a list for several, a float per return_mode)."""
    import triton.testing as tt
    if hasattr(tt, "_summarize_statistics"):
        return tt._summarize_statistics(times, quantiles, return_mode)
    if quantiles is not None:  # triton versions without the helper: the same rule
        ret = torch.quantile(torch.tensor(times, dtype=torch.float), torch.tensor(
            quantiles, dtype=torch.float)).tolist()
        return ret[0] if len(ret) == 1 else ret
    return getattr(statistics, return_mode)(times) if return_mode != "all" else times


def do_bench(fn, warmup: float = 25, rep: float = 100, quantiles=None,
             return_mode: str = "mean"):
    """``triton.testing.do_bench`` (CUDA events, L2 flushed), or in the dry run a stand-in that
    times ``fn`` with perf_counter for about ``rep`` ms (3 to 50 calls) and returns what
    do_bench would (``_summarize``)."""
    import triton.testing as tt
    if not gpu_standin():
        return tt.do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles,
                           return_mode=return_mode)
    fn()
    times, t_end = [], time.perf_counter() + rep * 1e-3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summarize(times, quantiles, return_mode)


def bench_ms(fn, quantiles=(0.5,), warmup: float = 25, rep: float = 100) -> list[float]:
    """THE GPU timing function: do_bench's quantiles of ``fn`` in ms, always a list of floats
    (do_bench returns a float for one quantile and a list for several)."""
    r = do_bench(fn, warmup=warmup, rep=rep, quantiles=list(quantiles))
    return [float(r)] if isinstance(r, (int, float)) else [float(x) for x in r]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _max_memory_allocated(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return name + (" [GPU timing path, stand-ins]" if gpu_standin() else "")


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def time_gpu(fn, device, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    med, p20, p80 = bench_ms(fn, (0.5, 0.2, 0.8), warmup=warmup_ms, rep=rep_ms)
    _sync(device)
    base = _memory_allocated(device)
    _reset_peak(device)
    fn()
    _sync(device)
    peak = _max_memory_allocated(device) - base
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=int(peak))


def time_cpu_rounds(fns: dict, budget_s: float = 0.6, rounds: int = 5, min_reps: int = 5,
                    max_reps: int = 50) -> dict:
    """``fns``: {name: zero-argument callable}. Times each ``reps`` times (sized from one call
    to about ``budget_s``) in ``rounds`` interleaved rounds - A A B B C C, A A B B C C, ... - so
    that a slow stretch of a shared machine lands on every provider, not on one. Returns
    {name: median/p20/p80 ms and reps, or the exception the callable raised}."""
    reps, times, out = {}, {name: [] for name in fns}, {}

    def call(name) -> None:
        t0 = time.perf_counter()
        try:
            fns[name]()
        except Exception as e:  # this provider stops; the others go on
            out[name] = e
        times[name].append((time.perf_counter() - t0) * 1e3)

    for name in fns:
        call(name)
        reps[name] = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(times[name].pop(), 1e-3))))
    for r in range(rounds):
        for name in fns:
            for _ in range(reps[name] // rounds + (r < reps[name] % rounds)):
                if name not in out:
                    call(name)
    for name, t in times.items():
        if name not in out:
            q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else t * 9
            out[name] = dict(median_ms=statistics.median(t), p20_ms=q[1], p80_ms=q[7],
                             peak_mem_bytes=None, reps=reps[name])
    return out


def _annotate(bench: Benchmark, case, name: str, inputs, rec: dict, device) -> None:
    if bench.annotate is not None:
        rec.update(bench.annotate(case, name, inputs, rec, device))


def _failed(rec: dict, e: BaseException, log) -> None:
    rec["status"] = _error(e)
    log(f"  {rec['case']} / {rec['provider']}: {rec['status']}")


def measure_ceilings(device: torch.device) -> dict:
    """The device's own peaks, measured: bf16 matmul TFLOP/s and device-to-device copy GB/s
    (with the stand-ins: the same code at tiny sizes on the CPU, not a peak)."""
    if not gpu_path(device):
        return {}
    cuda = device.type == "cuda"
    n = 8192 if cuda else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    (ms,) = bench_ms(lambda: torch.matmul(a, b), warmup=100, rep=500 if cuda else 50)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    del a, b
    nbytes = (2 << 30) if cuda else (8 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    (ms_c,) = bench_ms(lambda: dst.copy_(src), warmup=50, rep=300 if cuda else 50)
    gbps = 2 * nbytes / (ms_c * 1e-3) / 1e9
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    out = dict(bf16_matmul_tflops=tflops, bf16_matmul_shape=[n, n, n], copy_gbps=gbps,
               copy_bytes=nbytes)
    if not cuda:
        out["note"] = "GPU timing path with CPU stand-ins: tiny sizes, not a device ceiling"
    return out


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def _active(bench: Benchmark, device) -> list:
    return [p for p in bench.providers if device.type == "cuda" or (p.cpu_ok and not p.gpu_only)]


def _error(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def run_benchmark(bench: Benchmark, device: torch.device, out_dir: Path | str | None = RESULTS,
                  tag: str | None = None, log=print, ceilings: dict | None = None) -> list[dict]:
    """``ceilings``: measured earlier on this device (measure_ceilings' dict); None measures them."""
    device = torch.device(device)
    ceilings = measure_ceilings(device) if ceilings is None else ceilings
    if ceilings:
        log(f"ceilings: bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, "
            f"copy {ceilings['copy_gbps']:.0f} GB/s")
    providers = _active(bench, device)
    skipped = [p.name for p in bench.providers if p not in providers]

    # 1. warm every (case, provider) up before timing any
    t_warm = time.perf_counter()
    warm, failed = {}, {}
    for case in bench.cases:
        inputs = case.make(device)
        for p in providers:
            t0 = time.perf_counter()
            try:
                fn = p.factory(inputs)
                if fn is not None:
                    fn()
                    _sync(device)  # an asynchronous fault is charged to this provider
            except Exception as e:  # recorded; the other providers still run
                failed[(case.name, p.name)] = _error(e)
                log(f"warm-up {case.name} / {p.name}: {failed[(case.name, p.name)]}")
                continue
            warm[(case.name, p.name)] = time.perf_counter() - t0
            log(f"warm-up {case.name} / {p.name}: {warm[(case.name, p.name)]:.1f} s")
        del inputs
    log(f"warm-up of {len(bench.cases)} cases x {len(providers)} providers: "
        f"{time.perf_counter() - t_warm:.1f} s")

    # 2. time
    records = []
    for case in bench.cases:
        inputs = case.make(device)
        row, on_cpu = {}, {}
        for p in providers:
            rec = dict(case=case.name, params=case.params, provider=p.name, flops=case.flops,
                       bytes=case.bytes)
            if (case.name, p.name) in warm:
                rec["warmup_s"] = warm[(case.name, p.name)]
            row[p.name] = rec
            records.append(rec)
            if (case.name, p.name) in failed:
                rec["status"] = failed[(case.name, p.name)]
                continue
            try:
                fn = p.factory(inputs)
                if fn is not None and gpu_path(device):  # one provider's state at a time
                    _sync(device)
                    rec.update(time_gpu(fn, device))
                    _annotate(bench, case, p.name, inputs, rec, device)
                elif fn is not None:
                    on_cpu[p.name] = fn
            except Exception as e:
                _failed(rec, e, log)
                continue
            rec["status"] = "not applicable" if fn is None else "ok"
        if on_cpu:  # interleaved rounds: a drift of the machine's speed hits every provider alike
            for name, t in time_cpu_rounds(on_cpu, bench.cpu_budget_s).items():
                if isinstance(t, Exception):
                    _failed(row[name], t, log)
                    continue
                row[name].update(t)
                try:
                    _annotate(bench, case, name, inputs, row[name], device)
                except Exception as e:
                    _failed(row[name], e, log)
            del on_cpu
        for rec in row.values():
            if rec.get("status") == "ok":
                sec = rec["median_ms"] * 1e-3
                if case.flops:
                    rec["tflops"] = case.flops / sec / 1e12
                    if ceilings:
                        rec["pct_peak_flops"] = 100 * rec["tflops"] / ceilings["bf16_matmul_tflops"]
                if case.bytes:
                    rec["gbps"] = case.bytes / sec / 1e9
                    if ceilings:
                        rec["pct_peak_bw"] = 100 * rec["gbps"] / ceilings["copy_gbps"]
        if bench.memory is not None:
            for p in bench.providers:
                extra = bench.memory(case, p.name, inputs)
                if extra:
                    row.setdefault(p.name, dict(case=case.name, params=case.params,
                                                provider=p.name, status="memory only"))
                    row[p.name].update(extra)
                    if row[p.name] not in records:
                        records.append(row[p.name])
        base = row.get(bench.baseline)
        for rec in row.values():
            if base and base.get("status") == "ok" and rec.get("status") == "ok":
                rec["speedup_vs_baseline"] = base["median_ms"] / rec["median_ms"]
        log("  " + case.name + ": " + ", ".join(
            f"{r['provider']} {r['median_ms']:.3f} ms" for r in row.values() if r.get("status") == "ok"))
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name in skipped:
        for case in bench.cases:
            rec = next((r for r in records if r["case"] == case.name and r["provider"] == name),
                       None)
            if rec is None:
                rec = dict(case=case.name, params=case.params, provider=name)
                records.append(rec)
            rec["status"] = "skipped on the CPU (interpreter timings mean nothing)"

    meta = dict(op=bench.op, device=device_name(device), device_type=device.type,
                commit=git_commit(), date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=_triton_version(), python=platform.python_version(),
                ceilings=ceilings, baseline=bench.baseline, notes=bench.notes,
                columns=[list(c) for c in bench.columns],
                providers=[p.name for p in bench.providers],
                gpu_path=gpu_path(device),
                timing=("triton.testing.do_bench median/p20/p80" if device.type == "cuda" else
                        "the GPU path's do_bench stand-in (perf_counter), median/p20/p80: a "
                        "dry run, not a timing" if gpu_standin() else
                        "time.perf_counter repeats in 5 rounds interleaving the providers, median/p20/p80"))
    if out_dir is not None:
        write_results(meta, records, Path(out_dir), tag)
    if bench.finish is not None:
        bench.finish(device, None if out_dir is None else Path(out_dir), records)
    return records


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


def write_results(meta: dict, records: list, out_dir: Path, tag: str | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if meta["device_type"] == "cpu" else _slug(meta["device"])
    stem = out_dir / (f"{meta['op']}-{dev}" + (f"-{tag}" if tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    stem.with_suffix(".md").write_text(markdown_table(meta, records))
    plot(meta, records, stem.with_suffix(".png"))
    return stem


def _memory_cell(r: dict) -> str:
    """'; saved N KiB (x ctx); peak N KiB (x ctx)' when the record carries the bytes its
    autograd graph saved / the CPU peak of live tensors (bench/memory.py)."""
    s = ""
    for key, label in (("saved_bytes", "saved"), ("cpu_peak_bytes", "peak")):
        if r.get(key) is None:
            continue
        s += f"; {label} {r[key] / 2**10:.0f} KiB"
        if r["params"].get("ctx_bytes"):
            s += f" ({r[key] / r['params']['ctx_bytes']:.2f}x ctx)"
    return s


def _short_status(status) -> str:
    """A table cell for a record that was not timed: 'skipped', 'n/a', 'error (TypeError)',
    'did not compile within 90 s', 'timed out after 60 s', 'not run: budget'."""
    s = str(status or "")
    if "skipped" in s:
        return "skipped"
    if s.startswith("error"):
        kind = s.split(":")[1].strip() if s.count(":") >= 1 else ""
        return f"error ({kind})" if kind else "error"
    if s.startswith(("did not compile", "timed out")):
        return s.split(" (")[0]
    if s.startswith("not run"):
        return s.split(" (")[0]
    return "n/a"


def markdown_table(meta: dict, records: list) -> str:
    providers = list(dict.fromkeys(meta.get("providers", []) + [r["provider"] for r in records]))
    cases = list(dict.fromkeys(r["case"] for r in records))
    by = {(r["case"], r["provider"]): r for r in records}
    gpu = meta.get("gpu_path", meta["device_type"] == "cuda")
    lines = [f"# {meta['op']} on {meta['device']}", "",
             f"commit {meta['commit']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}; "
             f"timing: {meta['timing']}."]
    if meta.get("ceilings"):
        c = meta["ceilings"]
        lines.append(f"Measured ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, "
                     f"copy {c['copy_gbps']:.0f} GB/s.")
    if meta.get("baseline"):
        lines.append(f"Cells: median ms (p20-p80) and speed-up vs `{meta['baseline']}` (x)"
                     + ("; TFLOP/s and % of the measured bf16 matmul peak" if gpu else "") + ".")
    lines += [f"- {n}" for n in meta.get("notes", [])]
    lines += ["", "| case | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for case in cases:
        cells = []
        for p in providers:
            r = by.get((case, p), {})
            mem = _memory_cell(r)
            if r.get("status") != "ok":
                cells.append(_short_status(r.get("status")) + mem)
                continue
            s = f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"
            if "speedup_vs_baseline" in r:
                s += f" {r['speedup_vs_baseline']:.2f}x"
            if gpu and "tflops" in r:
                s += f"; {r['tflops']:.0f} TF/s"
                if "pct_peak_flops" in r:
                    s += f" {r['pct_peak_flops']:.0f}%"
            if gpu and r.get("peak_mem_bytes") is not None:
                s += f"; +{r['peak_mem_bytes'] / 2**20:.0f} MiB"
                if r["params"].get("ctx_bytes"):
                    s += f" ({r['peak_mem_bytes'] / r['params']['ctx_bytes']:.2f}x ctx)"
            cells.append(s + mem)
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if meta.get("columns"):
        cols = meta["columns"]
        lines += ["", "Details:", "", "| case | provider | " + " | ".join(c[1] for c in cols) + " |",
                  "|---" * (len(cols) + 2) + "|"]
        for r in records:
            if r.get("status") != "ok":
                continue
            cells = [("-" if r.get(k) is None else format(r[k], f)) for k, _, f in cols]
            lines.append(f"| {r['case']} | {r['provider']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(meta: dict, records: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in records if r.get("status") == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 3), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        ys = [next((r["median_ms"] for r in ok if r["case"] == c and r["provider"] == p), math.nan)
              for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], ys, width, label=p)
    ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title(f"{meta['op']} on {meta['device']} ({meta['commit']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
