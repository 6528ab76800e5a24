"""Per-kernel device times of the energy op's Triton path: ``python -m bench.run
energy_profile [--quick] [--out DIR] [--tag TAG]``.

The production swap InfoNCE fwd+bwd (bench/bench_energy.py's ``triton`` provider, the same
inputs and callable: B 8, S 600, D 4096, C = H = 8, context detached; fp32 model 512/8 and
1024/16, bf16 512/8; ``--quick``: fp32 512/8 only) runs ``REPS`` times under
``torch.profiler`` (CUDA activity) after one warm-up call. Written to
``<out>/energy-profile-<TAG or device>.{json,md}``:

- per kernel name: calls per fwd+bwd, total us per fwd+bwd, share of the device time;
- per launch: the Triton launches of one fwd+bwd in issue order, each the mean over the
  repeats, labelled as bench/energy_launches.py labels them (when there are exactly its 18);
  next to each, the CPU model's estimate (bench/results/energy-launches-sm90.json) when that
  file has the case: the check of NOTES.md "v4 measured on the H200: the miss, explained from
  the CPU".

Dry run (``ET_GPU_STANDIN=1``, as ``GPU_CHECK_DRY=1`` sets it): on the CPU at reduced shapes
the Triton kernels run under the interpreter and ``_device_events`` - the one GPU-only call -
is replaced by a stand-in returning what it returns (a list of torch's ``FunctionEvent`` with
``device_type`` CUDA: one per Triton launch, timed with perf_counter, and one per aten leaf
op outside them), so every line that reads the profile runs here too. Its times mean nothing.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any kernel is decorated: the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.autograd import DeviceType  # noqa: E402
from torch.autograd.profiler_util import FunctionEvent  # noqa: E402

from bench.harness import git_commit, gpu_standin  # noqa: E402

REPS = 5
GPU_CASES = [("fp32-E512h8", dict(B=8, S=600, D=4096, E=512, heads=8, dtype="float32")),
             ("fp32-E1024h16", dict(B=8, S=600, D=4096, E=1024, heads=16, dtype="float32")),
             ("bf16-E512h8", dict(B=8, S=600, D=4096, E=512, heads=8, dtype="bfloat16"))]
#: the dry run's shapes: every launch of the production call structure, interpreted in seconds
CPU_CASES = [("fp32-E32h2-cpu", dict(B=2, S=24, D=32, E=32, heads=2, dtype="float32"))]
ESTIMATES = Path(__file__).resolve().parent / "results" / "energy-launches-sm90.json"


def _callable(device, p):
    """bench_energy's triton provider at these params (swap, fwd+bwd): inputs and the call."""
    from bench.bench_energy import _inputs, _runner
    params = dict(p, loss="swap", mode="fwdbwd", C=p["B"])
    inputs = _inputs(device, params)
    return inputs, _runner(inputs, "triton")


# --------------------------------------------------------------------------------------------
# the GPU-only call and its stand-in
# --------------------------------------------------------------------------------------------
def _device_events(fn, reps: int) -> list:
    """torch.profiler (CUDA activity) around ``reps`` calls of ``fn``: its events (a list of
    FunctionEvent; the device ones have device_type CUDA). The stand-in in a dry run."""
    if gpu_standin():
        return _standin_events(fn, reps)
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return list(prof.events())


#: aten ops that launch no kernel on a GPU (views, allocations): no device event in the stand-in
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "t", "transpose",
              "permute", "unsqueeze", "squeeze", "detach", "alias", "as_strided", "empty",
              "empty_strided", "new_empty", "empty_like", "lift_fresh", "unbind", "split",
              "split_with_sizes", "chunk", "narrow", "_reshape_alias", "view_as", "expand_as",
              "new_empty_strided", "_local_scalar_dense", "is_same_size", "set_", "resolve_conj",
              "resolve_neg", "result_type", "contiguous", "to", "_to_copy"}


def triton_kernel_names() -> set:
    """The names the energy path's Triton kernels have on the device (their function names)."""
    from energy_train.kernels.energy import fused as ef
    from energy_train.kernels.mlp import fused as mf
    out = set()
    for mod in (ef, mf):
        for v in vars(mod).values():
            fn = v
            while hasattr(fn, "fn"):
                fn = fn.fn
            if fn is not v and callable(fn) and fn.__name__.endswith("_kernel"):
                out.add(fn.__name__)
    return out


def _event(i: int, name: str, start_us: float, end_us: float) -> FunctionEvent:
    return FunctionEvent(id=i, name=name, thread=0, start_us=int(start_us),
                         end_us=max(int(end_us), int(start_us) + 1),
                         device_type=DeviceType.CUDA, device_index=0)


def _standin_events(fn, reps: int) -> list:
    """What ``_device_events`` returns, on the CPU: a CUDA-typed FunctionEvent per Triton
    launch (its interpreted run, a profiler range named by the kernel) and per aten leaf op of
    the CPU profile outside every launch (what a CUDA kernel would be), on the profiler's
    clock."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from triton.runtime.interpreter import InterpretedFunction
    orig = InterpretedFunction.run
    names = set()

    def ranged(self, *args, **kwargs):
        names.add(self.fn.__name__)
        with record_function(self.fn.__name__):
            return orig(self, *args, **kwargs)

    InterpretedFunction.run = ranged
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                fn()
    finally:
        InterpretedFunction.run = orig
    cpu = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    launches = sorted((e for e in cpu if e.name in names), key=lambda e: e.time_range.start)
    spans = [(e.time_range.start, e.time_range.end) for e in launches]

    def inside(e):
        return any(s <= e.time_range.start and e.time_range.end <= t for s, t in spans)
    leaves = [e for e in cpu if e.name.startswith("aten::") and not e.cpu_children
              and e.name[6:] not in _NO_KERNEL and not inside(e)]
    return [_event(i, e.name, e.time_range.start, e.time_range.end)
            for i, e in enumerate(launches + leaves)]


# --------------------------------------------------------------------------------------------
# reading the profile (runs on the GPU and in the dry run alike)
# --------------------------------------------------------------------------------------------
def kernel_table(events: list, reps: int) -> dict:
    """{"by_name": [dict(name, calls, total_us, share)], "sequence": [(name, us)] of ONE call
    (the mean over the repeats, launches in issue order), "device_us": per call}."""
    dev = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    by = defaultdict(lambda: [0, 0.0])
    for e in dev:
        by[e.name][0] += 1
        by[e.name][1] += e.time_range.elapsed_us()
    total = sum(v[1] for v in by.values()) or 1.0
    by_name = sorted((dict(name=n, calls=c / reps, total_us=t / reps, share=t / total)
                      for n, (c, t) in by.items()), key=lambda r: -r["total_us"])
    triton_names = triton_kernel_names() & set(by)
    launches = [e for e in dev if e.name in triton_names]
    seq = []
    if launches and len(launches) % reps == 0:
        per = len(launches) // reps
        for k in range(per):
            ts = [launches[r * per + k].time_range.elapsed_us() for r in range(reps)]
            seq.append((launches[k].name, statistics.fmean(ts)))
    return dict(by_name=by_name, sequence=seq, device_us=total / reps,
                triton_us=sum(t for _, t in seq))


def _estimates() -> dict:
    try:
        return json.loads(ESTIMATES.read_text())
    except (OSError, ValueError):
        return {}


def profile_case(device, name: str, p: dict, reps: int | None = None, log=print) -> dict:
    from bench.energy_launches import LABELS
    reps = reps or REPS
    inputs, fn = _callable(device, p)
    fn()  # warm-up: compiles, plans, device tables
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    table = kernel_table(_device_events(fn, reps), reps)
    est = {e["index"]: e for e in _estimates().get(name, {}).get("launches", [])}
    labelled = len(table["sequence"]) == len(LABELS)
    table["sequence"] = [
        dict(index=i + 1, kernel=k, us=us, label=LABELS[i] if labelled else k,
             **({"est_ms": est[i + 1]["estimate"]["ms"], "fit_ms": est[i + 1]["estimate"]["ms_fit"]}
                if labelled and (i + 1) in est and est[i + 1]["kernel"] == k else {}))
        for i, (k, us) in enumerate(table["sequence"])]
    del inputs
    log(f"{name}: {table['device_us'] / 1e3:.3f} ms of device time per fwd+bwd, Triton "
        f"{table['triton_us'] / 1e3:.3f} ms in {len(table['sequence'])} launches "
        f"({time.perf_counter() - t0:.1f} s)")
    return dict(case=name, params=p, reps=reps, **table)


def markdown(meta: dict, records: list) -> str:
    lines = [f"# energy per-kernel profile on {meta['device']}", "",
             f"commit {meta['commit']}, {meta['date']}, torch {meta['torch']}; {meta['timing']}.",
             "Swap InfoNCE fwd+bwd (bench_energy's triton provider), per fwd+bwd: the mean of "
             f"{records[0]['reps'] if records else REPS} profiled calls after a warm-up.", ""]
    for r in records:
        lines += [f"## {r['case']}: {r['device_us'] / 1e3:.3f} ms device time per call, Triton "
                  f"launches {r['triton_us'] / 1e3:.3f} ms", "",
                  "| # | launch | kernel | us | share of device time | CPU estimate ms lo-hi (fit) |",
                  "|---|---|---|---|---|---|"]
        for s in sorted(r["sequence"], key=lambda s: -s["us"]):
            e = (f"{s['est_ms'][0]:.3f}-{s['est_ms'][1]:.3f} ({s['fit_ms']:.3f})"
                 if "est_ms" in s else "-")
            lines.append(f"| {s['index']} | {s['label']} | `{s['kernel']}` | {s['us']:.1f} | "
                         f"{100 * s['us'] / max(r['device_us'], 1e-9):.1f}% | {e} |")
        lines += ["", "| kernel (all device activity) | calls | total us | share |",
                  "|---|---|---|---|"]
        for k in r["by_name"]:
            lines.append(f"| `{k['name'][:90]}` | {k['calls']:.1f} | {k['total_us']:.1f} | "
                         f"{100 * k['share']:.1f}% |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_standalone(device: torch.device, quick: bool, out_dir: Path | None, tag: str | None,
                   log=print) -> list[dict]:
    """Profile the cases, write ``<out_dir>/energy-profile-<tag or device>.{json,md}``."""
    from bench.harness import _slug, _triton_version, device_name
    import datetime as _dt
    gpu = device.type == "cuda"
    cases = (GPU_CASES[:1] if quick else GPU_CASES) if gpu else CPU_CASES
    torch.manual_seed(0)
    meta = dict(op="energy-profile", device=device_name(device), device_type=device.type,
                commit=git_commit(), torch=torch.__version__, triton=_triton_version(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                timing=("torch.profiler, CUDA activity: kernel durations" if gpu else
                        "the profiler's dry-run stand-in (interpreted launches timed with "
                        "perf_counter): a dry run, not a timing"))
    records = []
    for n, p in cases:  # written after every case: a run cut short keeps what it measured
        records.append(profile_case(device, n, p, reps=None if gpu else min(REPS, 2), log=log))
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = out / f"energy-profile-{tag or ('cpu' if not gpu else _slug(meta['device']))}"
            stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, records=records),
                                                            indent=1))
            stem.with_suffix(".md").write_text(markdown(meta, records))
    return records
