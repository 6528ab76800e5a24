"""energy-train plan (energy_train/plan): the peak memory of a step under fake tensors.

On the CPU: the plan of the tiny VLA's two_phase step equals the real step's peak of live
tensors (the profiler's, bench/memory.py) within 10% (1% measured); the plan runs for the tiny
VLA, the OFT stand-in and OpenVLA-OFT's 7B shapes; the fused ops' launcher scratch is counted
where `auto` picks them; the kernels' caches keep no fake tensor; the CLI prints and writes it.
"""
from __future__ import annotations

import json

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
