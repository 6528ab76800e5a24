"""bench.harness on the CPU with a toy benchmark: what it writes, not how fast anything is."""
import json

import pytest

import torch

from bench.harness import Benchmark, Case, Provider, run_benchmark


def test_harness_writes_json_markdown_and_plot(tmp_path):
    calls = {"warm": 0}

    def make(dev):
        calls["warm"] += 1
        return torch.randn(64, 64, device=dev)

    cases = [Case("n64", dict(n=64), make, flops=2 * 64 ** 3, bytes=3 * 64 * 64 * 4),
             Case("n64b", dict(n=64), make, flops=2 * 64 ** 3)]
    providers = [Provider("matmul", lambda x: (lambda: x @ x)),
                 Provider("loop", lambda x: (lambda: torch.stack([r @ x for r in x]))),
                 Provider("gpu_kernel", lambda x: (lambda: x), gpu_only=True),
                 Provider("partial", lambda x: None)]
    bench = Benchmark("toy", cases, providers, baseline="loop", notes=["a note"])
    recs = run_benchmark(bench, torch.device("cpu"), tmp_path, log=lambda *_: None)
    assert calls["warm"] == 4  # inputs built once for the warm-up pass, once for timing
    data = json.loads((tmp_path / "toy-cpu.json").read_text())
    meta = data["meta"]
    for key in ("device", "commit", "date", "torch", "triton", "timing", "baseline"):
        assert meta[key], key
    by = {(r["case"], r["provider"]): r for r in data["records"]}
    ok = by[("n64", "matmul")]
    assert ok["status"] == "ok" and ok["p20_ms"] <= ok["median_ms"] <= ok["p80_ms"]
    assert ok["tflops"] > 0 and ok["gbps"] > 0 and ok["speedup_vs_baseline"] > 0
    assert by[("n64", "loop")]["speedup_vs_baseline"] == 1.0
    assert "skipped" in by[("n64", "gpu_kernel")]["status"]
    assert by[("n64", "partial")]["status"] == "not applicable"
    md = (tmp_path / "toy-cpu.md").read_text()
    assert "| n64 |" in md and "skipped" in md and "a note" in md
    assert (tmp_path / "toy-cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert len(recs) == len(data["records"]) == 8


def test_harness_memory_hook_and_saved_bytes(tmp_path):
    """Benchmark.memory adds fields to timed and untimed (skipped) providers' records; the
    saved-bytes counter sees exactly the storage an autograd node keeps."""
    from bench.memory import peak_bytes, saved_bytes
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(16, 32)
    # y = (x @ w).relu().sum(): matmul saves x (excluded) and w (excluded); relu saves its
    # (16, 32) fp32 output: 2048 bytes
    r = saved_bytes(lambda: (x @ w).relu().sum(), exclude=[w, x])
    assert r["bytes"] == 16 * 32 * 4 and r["storages"] == 1
    assert peak_bytes(lambda: (x @ w).relu().sum().backward())["peak"] >= 16 * 32 * 4

    def memory(case, provider, inputs):
        return dict(saved_bytes=123) if provider in ("mm", "gpu_kernel") else {}

    bench = Benchmark("toym", [Case("c", dict(ctx_bytes=123), lambda d: torch.randn(8, 8))],
                      [Provider("mm", lambda x: (lambda: x @ x)),
                       Provider("gpu_kernel", lambda x: (lambda: x), gpu_only=True)],
                      memory=memory)
    recs = run_benchmark(bench, torch.device("cpu"), tmp_path, log=lambda *_: None)
    by = {r["provider"]: r for r in recs}
    assert by["mm"]["status"] == "ok" and by["mm"]["saved_bytes"] == 123
    assert "skipped" in by["gpu_kernel"]["status"] and by["gpu_kernel"]["saved_bytes"] == 123
    md = (tmp_path / "toym-cpu.md").read_text()
    assert md.count("(1.00x ctx)") == 2


def test_harness_records_a_failing_provider_and_runs_the_others(tmp_path):
    """A provider that raises in its warm-up or its timing is recorded as an error; the others
    are still timed, and warm-up seconds are kept per provider."""
    state = {"calls": 0}

    def flaky(x):
        def run():
            state["calls"] += 1
            if state["calls"] > 1:  # warm-up passes, timing fails
                raise RuntimeError("timing broke")
            return x
        return run

    def broken(x):
        raise ValueError("no kernel for this shape\nsecond line")

    bench = Benchmark("toye", [Case("c", {}, lambda d: torch.randn(8, 8))],
                      [Provider("mm", lambda x: (lambda: x @ x)), Provider("broken", broken),
                       Provider("flaky", flaky)], baseline="mm")
    recs = {r["provider"]: r for r in run_benchmark(bench, torch.device("cpu"), tmp_path,
                                                    log=lambda *_: None, ceilings={})}
    assert recs["mm"]["status"] == "ok" and recs["mm"]["warmup_s"] >= 0
    assert recs["broken"]["status"] == "error: ValueError: no kernel for this shape"
    assert recs["flaky"]["status"] == "error: RuntimeError: timing broke"
    md = (tmp_path / "toye-cpu.md").read_text()
    assert "error (ValueError)" in md and "error (RuntimeError)" in md


def test_gpu_timing_path_with_stand_ins(tmp_path, monkeypatch):
    """The GPU branch of the harness (do_bench quantiles, peak memory, ceilings) on the CPU
    with stand-ins that return exactly what triton's do_bench returns: a float for ONE
    quantile (what broke the first GPU run), a list for several."""
    import triton.testing as tt

    from bench import harness
    monkeypatch.setenv(harness.STANDIN_ENV, "1")
    assert harness.gpu_path(torch.device("cpu"))
    fn = lambda: torch.randn(32, 32) @ torch.randn(32, 32)  # noqa: E731
    one = harness.do_bench(fn, rep=5, quantiles=[0.5])
    several = harness.do_bench(fn, rep=5, quantiles=[0.5, 0.2, 0.8])
    assert isinstance(one, float) and isinstance(several, list) and len(several) == 3
    # the same types as triton's own summary of a run's times
    assert isinstance(tt._summarize_statistics([1.0, 2.0, 3.0], [0.5], "mean"), float)
    (ms,) = harness.bench_ms(fn, (0.5,), rep=5)
    assert isinstance(ms, float) and ms > 0
    c = harness.measure_ceilings(torch.device("cpu"))
    assert c["bf16_matmul_tflops"] > 0 and c["copy_gbps"] > 0 and "stand-ins" in c["note"]
    bench = Benchmark("toy", [Case("n64", dict(n=64), lambda dev: torch.randn(64, 64, device=dev),
                                   flops=2 * 64 ** 3)],
                      [Provider("matmul", lambda x: (lambda: x @ x))], baseline="matmul")
    (rec,) = run_benchmark(bench, torch.device("cpu"), tmp_path, log=lambda *_: None)
    assert rec["status"] == "ok" and rec["peak_mem_bytes"] == 0
    assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"] and rec["pct_peak_flops"] > 0
    meta = json.loads((tmp_path / "toy-cpu.json").read_text())["meta"]
    assert meta["gpu_path"] and "stand-in" in meta["timing"]
    assert "% " in (tmp_path / "toy-cpu.md").read_text()  # the GPU columns were formatted
