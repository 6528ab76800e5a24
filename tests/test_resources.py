"""The sm_90 resource report (bench/resources.py): every shipped kernel config compiles for
Hopper without a GPU, uses wgmma where it multiplies, and does not spill."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report(tmp_path, filt=""):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "res.json"
    run = subprocess.run([sys.executable, "-m", "bench.resources", "--filter", filt, "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), run.stdout + run.stderr
    return run, json.loads(out.read_text())


def _check(run, rows):
    assert rows, run.stdout
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0 and not r["spills"], f"{r['name']} spills: {r}"
        assert r["ld_local"] == 0 and r["st_local"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared_dynamic"] <= 227 * 1024, r  # sm_90's per-block limit
        if r["expect_wgmma"]:
            assert r["wgmma"], f"{r['name']}: no wgmma in the PTX"
    assert run.returncode == 0, run.stdout + run.stderr


def test_resource_report_bf16_configs_no_spills(tmp_path):
    run, rows = _report(tmp_path, "bf16")
    _check(run, rows)
    assert any(r["name"].startswith("la.gemm.fc1.") and r["expect_wgmma"] for r in rows)


@pytest.mark.slow
def test_resource_report_all_configs_no_spills(tmp_path):
    _check(*_report(tmp_path))


def test_layer_actions_gemm_k_step_is_lean(tmp_path):
    """The layer-actions GEMM's K step (bf16, TMA, no LayerNorm in the loop): HGMMA, and at
    most 150 SASS instructions per warp on the shortest path of its hot loop (the LN-prologue
    GEMM it replaced issued 455)."""
    run, rows = _report(tmp_path, "la.gemm")
    _check(run, rows)
    for r in rows:
        if r["name"].endswith(("bf16", "fp16")):
            assert r["loop_mma"] >= 1 and r["loop_sass"] <= 150, r
