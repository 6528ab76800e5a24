"""bench/bench_energy_profile.py (``python -m bench.run energy_profile``, gpu-check's
``bench:energy:profile``) on the CPU: the dry run's stand-in returns what torch.profiler's
events are (FunctionEvents, the device ones typed CUDA), and every line that reads them runs
here at reduced shapes; what it writes, not how fast anything is."""
import json

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

import bench.bench_energy_profile as bp
from bench.energy_launches import LABELS

SMALL = dict(B=2, S=24, D=32, E=32, heads=2, dtype="float32")


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setenv("ET_GPU_STANDIN", "1")


def test_standin_returns_cuda_typed_function_events(standin):
    _, fn = bp._callable(torch.device("cpu"), SMALL)
    fn()
    events = bp._device_events(fn, 2)
    assert events and all(isinstance(e, FunctionEvent) for e in events)
    assert all(e.device_type == DeviceType.CUDA for e in events)
    names = [e.name for e in events]
    assert set(names) & bp.triton_kernel_names()
    assert "aten::view" not in names  # no kernel on a GPU: no device event
    t = bp.kernel_table(events, 2)
    assert [k for k, _ in t["sequence"]].count("_linear_tiled_kernel") == 4
    assert len(t["sequence"]) == len(LABELS) == 18
    assert sum(r["share"] for r in t["by_name"]) == pytest.approx(1.0)
    assert t["triton_us"] <= t["device_us"] + 1e-6


def test_kernel_table_on_synthetic_events():
    """Two calls of [A, aten, B]: per-call means, issue order, shares; a launch count that does
    not divide by the repeats leaves the per-launch sequence empty (no wrong labels)."""
    def ev(i, name, t0, t1):
        return bp._event(i, name, t0, t1)
    evs = [ev(0, "_stack_fwd_kernel", 0, 10), ev(1, "aten::add", 10, 12),
           ev(2, "_stack_dw_kernel", 12, 42), ev(3, "_stack_fwd_kernel", 50, 70),
           ev(4, "aten::add", 70, 72), ev(5, "_stack_dw_kernel", 72, 82),
           FunctionEvent(id=9, name="host op", thread=0, start_us=0, end_us=1000)]
    t = bp.kernel_table(evs, 2)
    assert t["sequence"] == [("_stack_fwd_kernel", 15.0), ("_stack_dw_kernel", 20.0)]
    assert t["device_us"] == pytest.approx(37.0)  # the CPU event is not device time
    top = t["by_name"][0]
    assert top["name"] == "_stack_dw_kernel" and top["calls"] == 1 and top["total_us"] == 20
    assert bp.kernel_table(evs[:5], 2)["sequence"] == []


def test_run_standalone_writes_json_and_markdown(standin, tmp_path, monkeypatch):
    monkeypatch.setattr(bp, "CPU_CASES", [("small", SMALL)])
    monkeypatch.setattr(bp, "REPS", 2)
    recs = bp.run_standalone(torch.device("cpu"), True, tmp_path, "cpu-dry", log=lambda *_: None)
    data = json.loads((tmp_path / "energy-profile-cpu-dry.json").read_text())
    assert data["meta"]["op"] == "energy-profile" and "stand-in" in data["meta"]["timing"]
    (r,) = data["records"]
    assert r["case"] == "small" and len(r["sequence"]) == 18 and recs[0]["case"] == "small"
    assert [s["label"] for s in r["sequence"]] == list(LABELS)
    md = (tmp_path / "energy-profile-cpu-dry.md").read_text()
    assert "| 17 | grouped dW | `_stack_dw_kernel` |" in md and "dry run" in md
