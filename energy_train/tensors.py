"""Small tensor helpers every floor of the package uses (no host synchronisation in any)."""
from __future__ import annotations

import torch


def gather_rows(h: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of ``h`` (B, T, D) at ``index`` (B, N) int64 -> (B, N, D): row n of sample b
    is ``h[b, index[b, n]]``. With ``out`` (B, N, D) the rows are written there (cast to
    its dtype where h's differs) and ``out`` is returned."""
    idx = index[:, :, None].expand(-1, -1, h.shape[-1])
    if out is None:
        return h.gather(1, idx)
    if h.dtype == out.dtype:
        return torch.gather(h, 1, idx, out=out)
    return out.copy_(h.gather(1, idx))


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (losses and norms of autocast outputs); fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def bf16_autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device``'s type, or a no-op context when not ``enabled``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 host values -> a device tensor without a host sync: on CUDA through pinned memory
    and a non_blocking copy (a non_blocking copy from pageable memory is not asynchronous)."""
    t = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


__all__ = ["gather_rows", "upcast", "bf16_autocast", "index_tensor"]
