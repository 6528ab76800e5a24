"""Argument checks that name the argument, the expected and the received shape or dtype.

Shape and dtype checks read only tensor metadata (no host synchronisation); value checks
(NaN/inf, all-masked rows) read data and therefore sit behind ``validate=True``.
"""
from __future__ import annotations

from typing import Mapping

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, shape: Mapping[int, int] | None = None,
                 dtype: torch.dtype | tuple | None = None, floating: bool = False,
                 integer: bool = False, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    for dim, size in (shape or {}).items():
        if size is not None and t.shape[dim] != size:
            raise ValueError(
                f"{name}: expected size {size} at dim {dim}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype {allowed}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def check_same_device(**tensors) -> None:
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"expected all tensors on one device, got {devices}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Value check (host sync): raises if ``t`` holds NaN or inf."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: holds {int(bad.sum())} non-finite values (first at {first})")
