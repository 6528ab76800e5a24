"""GPU telemetry (energy_train.telemetry): fields present only when NVML answers; ABSENT (never
zero) without a GPU, without pynvml, or when a query fails. NVML is faked on the CPU."""
from __future__ import annotations

import sys
import types

import torch

from energy_train.telemetry import GpuTelemetry
from trainer_helpers import make_trainer, tiny_cfg

GPU_KEYS = {"gpu_util_pct", "gpu_mem_used_bytes", "gpu_power_w", "gpu_mem_peak_bytes"}


class NVMLError(Exception):
    pass


def fake_nvml(init_fails=False, power_fails=False):
    m = types.ModuleType("pynvml")

    def init():
        if init_fails:
            raise NVMLError("driver not loaded")
    m.nvmlInit = init
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=40)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30)

    def power(h):
        if power_fails:
            raise NVMLError("not supported")
        return 412_000  # mW
    m.nvmlDeviceGetPowerUsage = power
    return m


def test_cpu_run_logs_no_gpu_fields():
    t = make_trainer(tiny_cfg(strategy="two_phase"))
    t.train_step()
    t.train_step()
    records = t.flush()
    assert records and not any(GPU_KEYS & r.keys() for r in records)
    assert "time_phase1" in records[-1] and "time_phase2" in records[-1]


def test_absent_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    tel = GpuTelemetry(torch.device("cuda", 0))
    assert not tel.available
    if not torch.cuda.is_available():
        assert tel.sample() == {}
    else:
        assert not ({"gpu_util_pct", "gpu_mem_used_bytes", "gpu_power_w"} & tel.sample().keys())


def test_absent_when_nvml_does_not_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_fails=True))
    assert not GpuTelemetry(torch.device("cuda", 0)).available


def test_fields_from_nvml_and_a_failing_query_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(power_fails=True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    tel = GpuTelemetry(torch.device("cuda", 1))
    assert tel.handle == ("handle", 5)  # the physical index behind cuda:1
    s = tel.sample()
    assert s["gpu_util_pct"] == 87.0 and s["gpu_mem_used_bytes"] == 3 << 30
    assert "gpu_power_w" not in s
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    assert GpuTelemetry(torch.device("cuda", 0)).sample()["gpu_power_w"] == 412.0
    assert GpuTelemetry(torch.device("cpu")).sample() == {}  # never on a CPU device
