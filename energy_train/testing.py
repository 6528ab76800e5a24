"""Numerics parity helpers: compare a fused op against its float64 eager reference.

``assert_close(name, ref, out, dtype)`` fails on any NaN and when the relative error
``max|out - ref| / max(max|ref|, floor)`` exceeds the tolerance of ``dtype`` (README,
"Numerics"), with a message that names the tensor, the worst index and both values.
"""
from __future__ import annotations

import torch

#: relative-error tolerances per compute dtype
TOLERANCES = {
    "fp64": 1e-12,
    "fp32": 1e-5,   # ieee
    "tf32": 1e-3,
    "fp16": 5e-3,
    "bf16": 2e-2,
}
_DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
                torch.bfloat16: "bf16"}


def tolerance(dtype) -> float:
    """The tolerance for a dtype (torch.dtype or one of TOLERANCES' names)."""
    key = _DTYPE_NAMES.get(dtype, dtype)
    if key not in TOLERANCES:
        raise ValueError(f"dtype: expected one of {list(TOLERANCES)} or a float torch.dtype, got {dtype!r}")
    return TOLERANCES[key]


def relative_error(ref: torch.Tensor, out: torch.Tensor, floor: float = 1e-30) -> float:
    """max|out - ref| / max(max|ref|, floor), in float64; NaN anywhere gives inf."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    if out64.shape != ref64.shape:
        raise ValueError(f"shape mismatch: ref {tuple(ref64.shape)} vs out {tuple(out64.shape)}")
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    if out64.numel() == 0:
        return 0.0
    scale = max(ref64.abs().max().item(), floor)
    return (out64 - ref64).abs().max().item() / scale


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, dtype=torch.float32,
                 tol: float | None = None, floor: float = 1e-30) -> float:
    """Raise AssertionError unless ``out`` matches ``ref`` within ``dtype``'s tolerance.

    ``floor`` bounds the denominator from below: give the scale of the quantity where the true
    value can be exactly zero (e.g. the gradient of a softmax loss w.r.t. a shared bias)."""
    tol = tolerance(dtype) if tol is None else tol
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    nan = torch.isnan(out64)
    if nan.any():
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{name}: {int(nan.sum())} NaN values (first at {first}) - "
                             "an unwritten (poisoned) element or a numerical failure")
    err = relative_error(ref64, out64, floor)
    if not err <= tol:
        diff = (out64 - ref64).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e} at {worst}: "
            f"out {out64[worst].item():.6g} vs ref {ref64[worst].item():.6g}")
    return err


def assert_close_to_eager(name: str, ref: torch.Tensor, out: torch.Tensor, eager: torch.Tensor,
                          dtype=torch.float32, factor: float = 2.0, floor: float = 1e-30,
                          min_tol: float | None = None) -> float:
    """``out`` within ``max(min_tol, factor * err_eager)`` of the float64 ``ref`` (``min_tol``
    defaults to ``tolerance(dtype)``), where
    ``err_eager`` is the eager reference's OWN relative error against ``ref`` in the same dtype,
    measured on the same inputs. At production shapes the eager fp32 path itself nearly reaches
    the fixed 1e-5 (long reductions), so a fused path is held to a multiple of what eager
    achieves there, not to a number eager could miss."""
    err_eager = relative_error(ref, eager, floor)
    tol = max(tolerance(dtype) if min_tol is None else min_tol, factor * err_eager)
    return assert_close(f"{name} (eager's own error {err_eager:.2e}, x{factor})", ref, out,
                        tol=tol, floor=floor)


def poison(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A NaN-filled buffer: pass it as a kernel's output so an unwritten element fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
