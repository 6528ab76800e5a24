"""energy-train plan (energy_train/plan): the peak memory of a step under fake tensors.

On the CPU: the plan of the tiny VLA's two_phase step equals the real step's peak of live
tensors (the profiler's, bench/memory.py) within 10% (1% measured); the plan runs for the tiny
VLA, the OFT stand-in and OpenVLA-OFT's 7B shapes; the fused ops' launcher scratch is counted
where `auto` picks them; the kernels' caches keep no fake tensor; the CLI prints and writes it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from energy_train.cli import main
from energy_train.plan import plan, report
from energy_train.plan.cases import build_policy, case_config
from energy_train.plan.tracker import LiveBytes, rounded


def test_tracker_counts_storages_once_until_freed():
    from torch._subclasses.fake_tensor import FakeTensorMode
    t = LiveBytes()
    with FakeTensorMode(), t:
        a = torch.empty(1000)
        v = a.view(10, 100)  # a view: the same storage
        a.add_(1)            # in place: the same storage
        b = a * 2
        assert t.live == 2 * rounded(4000)
        del a, b
        assert t.live == rounded(4000)  # the view keeps a's storage
        del v
        assert t.live == 0 and t.peak == 2 * rounded(4000)


def test_plan_equals_the_measured_cpu_step():
    from bench.plan_check import check
    r = check("tiny", torch.device("cpu"))
    assert r["within"] and abs(r["ratio"] - 1) < 0.05, r


@pytest.fixture(scope="module")
def tiny_plan():
    return plan("tiny", {"energy.loss": "explicit"}, device="cpu")


def test_plan_parts(tiny_plan):
    p = tiny_plan
    assert set(p["strategies"]) == {"joint", "two_phase", "shared_forward"}
    tp = p["strategies"]["two_phase"]
    assert tp["base"] > 0 and tp["phase1"] > 0 and tp["read"] > 0 and tp["energy"] > 0
    assert tp["peak"] == tp["base"] + max(tp["phase1"], tp["read"], tp["energy"])
    assert tp["overlapped"] == tp["base"] + tp["phase1"] + max(tp["read"], tp["energy"])
    assert tp["opt_theta"] > 0 and tp["opt_phi"] > 0
    assert p["checkpointing"]["phase1"] < tp["phase1"]  # checkpointed layers keep less
    assert p["fsdp"]["world"] == 8
    # the layer actions ran as `auto` picks them on CUDA: the Triton op, its scratch counted
    assert p["scratch"]["energy_train::layer_actions"] > 0
    md = report(p)
    assert "| two_phase |" in md and "activation checkpointing" in md and "MiB" in md


def test_fused_energy_path_scratch_is_counted():
    """A bf16 energy model: `auto` on CUDA picks the Triton energy path; its fp32 workspace is
    the op's output and its backward scratch comes from the kernel's plan."""
    p = plan("tiny", {"energy.precision": "bf16_weights"}, strategies=("two_phase",),
             device="cpu", checkpointing=False)
    assert p["scratch"]["energy_train::energy_bwd"] > 0
    eager = plan("tiny", {"energy.precision": "bf16_weights"}, strategies=("two_phase",),
                 device="cpu", target="cpu", checkpointing=False)
    assert "energy_train::energy_bwd" not in eager["scratch"]


def test_kernel_caches_keep_no_fake_tensor(tiny_plan):
    from torch._subclasses.fake_tensor import FakeTensor

    from energy_train.kernels.mlp import launch
    assert not any(isinstance(v, FakeTensor) for v in launch._CONSTANTS.values())


def test_oft_standin_and_7b_shapes():
    p = plan("oft-standin", strategies=("two_phase",), device="cpu", checkpointing=False)
    assert p["strategies"]["two_phase"]["peak"] > 0
    cfg = case_config("oft-7b")
    policy = build_policy("oft-7b", cfg)  # on meta: no memory
    lm = policy.backbone.language_model.config
    assert (lm.hidden_size, lm.num_hidden_layers, lm.intermediate_size) == (4096, 32, 11008)
    assert cfg.run.batch_size == 8 and cfg.run.precision == "bf16"
    n = sum(p.numel() for m in policy.modules().values() for p in m.parameters())
    assert 6.5e9 < n < 8e9, n


def test_7b_plan_runs_on_the_cpu():
    """OpenVLA-OFT's shapes (Llama-2 7B, LoRA r 32, T ~590, B 8, bf16): the frozen base is
    ~13 GiB of bf16, the adapters and head under 1 GiB, phase 1's activations dominate."""
    p = plan("oft-7b", strategies=("two_phase",), device="cpu", checkpointing=False)
    w, tp = p["weights"], p["strategies"]["two_phase"]
    assert 12 * 2**30 < w["frozen"] < 15 * 2**30 and w["theta"] < 2**30
    assert tp["phase1"] > 10 * tp["read"] and tp["peak"] < 80 * 2**30


def test_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--case", "tiny", "--strategy", "two_phase", "--no-checkpointing",
                 "--device", "cpu", "--json", str(out)]) == 0
    assert "| two_phase |" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["strategies"]) == {"two_phase"}
    assert main(["plan", "--case", "nope"]) == 2
    assert "--case: expected one of" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# library workspaces (energy_train/plan/workspace.py), on stand-in capabilities
# --------------------------------------------------------------------------------------------
MiB = 2**20
H200_RECORD = Path(__file__).resolve().parents[1] / "bench" / "results" / "plan-check-h200.json"


def test_cublas_workspace_config_parsed_as_torch_parses_it():
    from energy_train.plan.workspace import parse_cublas_config
    assert parse_cublas_config(None) is None
    assert parse_cublas_config(":4096:8") == 32 * MiB
    assert parse_cublas_config(":16:8") == 128 * 1024  # torch's deterministic-mode setting
    assert parse_cublas_config(":4096:2:16:8") == 8 * MiB + 128 * 1024  # successive pairs
    assert parse_cublas_config("garbage") is None and parse_cublas_config("") is None


def test_default_cublas_workspace_per_capability():
    from energy_train.plan.workspace import DEFAULT, HOPPER_DEFAULT, blas_workspaces
    assert HOPPER_DEFAULT == 32 * MiB and DEFAULT == 4096 * 1024 * 2 + 16 * 1024 * 8
    for v in ("2.11.0+cu130", "2.12.0"):
        assert blas_workspaces((9, 0), {}, v).cublas == 32 * MiB
        assert blas_workspaces((8, 0), {}, v).cublas == DEFAULT   # A100
        assert blas_workspaces((8, 9), {}, v).cublas == DEFAULT   # L4 / Ada
    # Blackwell: 32 MiB only in the later source (see the module docstring)
    assert blas_workspaces((10, 0), {}, "2.11.0").cublas == DEFAULT
    assert blas_workspaces((10, 0), {}, "2.12.0").cublas == 32 * MiB
    # the environment wins over the default; an unparsable value keeps the default
    ws = blas_workspaces((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, "2.11.0")
    assert ws.cublas == 128 * 1024 and "CUBLAS_WORKSPACE_CONFIG" in ws.cublas_rule
    assert blas_workspaces((9, 0), {"CUBLAS_WORKSPACE_CONFIG": "x"}, "2.11.0").cublas == 32 * MiB
    # what torch itself reports on a device wins over both
    assert blas_workspaces((9, 0), {}, "2.13.0", torch_says=7 * MiB).cublas == 7 * MiB


def test_cublaslt_workspace_separate_or_unified():
    from energy_train.plan.workspace import blas_workspaces
    assert blas_workspaces((9, 0), {}, "2.11.0").cublaslt == 1 * MiB       # separate, default
    assert blas_workspaces((9, 0), {}, "2.12.0").cublaslt == 0             # unified by default
    one = {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "1"}
    zero = {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}
    assert blas_workspaces((9, 0), one, "2.11.0").cublaslt == 0
    assert blas_workspaces((9, 0), zero, "2.12.0").cublaslt == 1 * MiB
    # check_env: only "0" / "1" count, anything else is the version's default
    assert blas_workspaces((9, 0), {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "true"},
                           "2.11.0").cublaslt == 1 * MiB
    big = {"CUBLASLT_WORKSPACE_SIZE": str(64 * 1024)}  # KiB
    assert blas_workspaces((9, 0), big, "2.11.0").cublaslt == 32 * MiB     # capped at cuBLAS's
    assert blas_workspaces((9, 0), {**big, **zero}, "2.11.0").cublaslt == 64 * MiB


def test_workspace_lines_per_stream():
    from energy_train.plan.workspace import blas_workspaces, streams_of
    assert (streams_of(), streams_of(overlap=True), streams_of(cuda_graphs=True),
            streams_of(True, True)) == (1, 2, 2, 3)
    ws = blas_workspaces((9, 0), {}, "2.11.0")
    # two cuBLAS handles per stream (the caller's thread, autograd's device thread), one
    # cuBLASLt workspace per stream (forward addmm + bias, the caller's thread)
    assert ws.lines(1) == {"cuBLAS workspace": 64 * MiB, "cuBLASLt workspace": 1 * MiB}
    assert ws.lines(2) == {"cuBLAS workspace": 128 * MiB, "cuBLASLt workspace": 2 * MiB}
    assert ws.total(2) == 130 * MiB


@pytest.mark.parametrize("case", ["tiny", "oft-1b"])
def test_recorded_h200_measurement_within_10_percent_with_the_workspaces(case):
    """The H200 run at 683d510 (torch 2.11, sm_90, no CUBLAS_WORKSPACE_CONFIG): the plan's
    tensors alone were 0.257x the measured peak of the tiny step; with the sequential step's
    workspace lines (1 stream: 2 x 32 MiB cuBLAS + 1 MiB cuBLASLt) through the same comparison
    the check uses, both cases are within 10%."""
    from bench.plan_check import compare
    from energy_train.plan.workspace import blas_workspaces, streams_of
    rec = next(r for r in json.loads(H200_RECORD.read_text())["results"] if r["case"] == case)
    tensors = dict(peak=rec["planned_peak"], base=rec["planned_base"])  # recorded: no workspaces
    assert compare(dict(tensors, workspaces=0), rec["measured"])["ratio"] == pytest.approx(
        rec["ratio"])  # the recorded comparison, reproduced
    ws = blas_workspaces((9, 0), env={}, torch_version="2.11.0+cu130")
    r = compare(dict(tensors, workspaces=ws.total(streams_of())), rec["measured"])
    assert r["within"], r
    assert r["planned_workspaces"] == 65 * MiB
    if case == "tiny":  # what the workspaces explain: the measured start above the plan's base
        gap = rec["measured"]["start"] - rec["planned_base"]
        assert gap - 65 * MiB == 4096   # 4 KiB left unexplained (module docstring)
        assert 0.99 < r["ratio"] < 1.0


def test_cpu_plan_has_no_workspace_lines_and_a_stand_in_gpu_has(tiny_plan):
    assert tiny_plan["workspaces"] is None
    assert "| line |" not in report(tiny_plan)
    p = plan("tiny", strategies=("two_phase",), device="cpu", checkpointing=False,
             capability=(9, 0))
    ws = p["workspaces"]
    assert ws["source"] == "stand-in capability" and ws["capability"] == [9, 0]
    seq = ws["modes"]["sequential"]
    assert seq["streams"] == 1 and seq["cuBLAS workspace"] == 2 * ws["cublas"]
    assert ws["modes"]["overlapped"]["streams"] == 2
    md = report(p)
    assert "| cuBLAS workspace |" in md and "| cuBLASLt workspace |" in md
    assert "peak + workspaces" in md
