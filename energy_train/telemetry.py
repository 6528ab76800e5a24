"""GPU telemetry per log interval through NVML (nvidia-ml-py), optional at run time.

``GpuTelemetry(device).sample()`` -> a dict with some of

    gpu_util_pct        NVML utilisation over its last sample period (%)
    gpu_mem_used_bytes  device memory in use (all processes, NVML)
    gpu_power_w         board power draw (W)
    gpu_mem_peak_bytes  torch's peak allocated bytes since the previous sample (CUDA only)

A field that cannot be read is ABSENT (never 0): no GPU, no pynvml, NVML failing to start, or
one query failing (e.g. power on a GPU that does not report it). pynvml is imported lazily and
every call is guarded. Nothing here synchronises the device.
"""
from __future__ import annotations

import os

import torch


def _nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError (no driver), anything else: no telemetry
        return None


def _nvml_index(device: torch.device) -> int:
    """The NVML index of a torch device (honours CUDA_VISIBLE_DEVICES given as integers)."""
    idx = device.index if device.index is not None else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        if idx < len(ids) and ids[idx].isdigit():
            return int(ids[idx])
    return idx


class GpuTelemetry:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.nvml = self.handle = None
        if self.device.type != "cuda":
            return
        self.nvml = _nvml()
        if self.nvml is None:
            return
        try:
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(_nvml_index(self.device))
        except Exception:
            self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def sample(self) -> dict:
        out = {}
        if self.device.type == "cuda" and torch.cuda.is_available():
            try:
                out["gpu_mem_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
                torch.cuda.reset_peak_memory_stats(self.device)
            except Exception:
                pass
        if self.handle is None:
            return out
        queries = {
            "gpu_util_pct": lambda: float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu),
            "gpu_mem_used_bytes": lambda: int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used),
            "gpu_power_w": lambda: self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
        }
        for key, query in queries.items():
            try:
                out[key] = query()
            except Exception:
                pass
        return out
