"""The one home of argument checks: each error names the argument the caller passed, what was
expected and what came.

Shape and dtype checks read only tensor metadata (no host synchronisation); value checks
(NaN/inf, all-masked rows) read data and therefore sit behind ``validate=True``. The tensor
checks are the kernels' own (``energy_train.kernels._utils``): one definition for both.
"""
from __future__ import annotations

import math
import numbers

import torch

from .kernels._utils import FLOAT_DTYPES, check_same_device, check_tensor  # noqa: F401


def check_finite(name: str, t: torch.Tensor) -> None:
    """Value check (host sync): raises if ``t`` holds NaN or inf."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: holds {int(bad.sum())} non-finite values (first at {first})")


# --------------------------------------------------------------------------------------------
# scalar arguments: each error names the argument, what was expected and what came
# --------------------------------------------------------------------------------------------
def _bounds(low, high, low_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    return f" <= {high}" if high is not None else ""


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` is an int (not a bool) within [low, high]; returns it as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int{_bounds(low, high, False)}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int{_bounds(low, high, False)}, got {value!r}")
    return int(value)


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """``value`` is a finite real number (not a bool, not NaN or inf) within its bounds
    (``low_open``: strictly above ``low``); returns it as a float."""
    want = f"a finite number{_bounds(low, high, low_open)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {want}, got {value!r}")
    v = float(value)
    if (not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low))
            or (high is not None and v > high)):
        raise ValueError(f"{name}: expected {want}, got {value!r}")
    return v


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_multiple(name: str, value: int, base_name: str, base: int) -> None:
    """``value`` is a multiple of ``base``, the value of the argument or key ``base_name``."""
    if value % base:
        raise ValueError(f"{name}: expected a multiple of {base_name}={base}, got {value}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_nonempty(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    """``t`` has at least one entry along ``dim`` (``what`` names them: "sample", "key")."""
    if t.shape[dim] == 0:
        raise ValueError(f"{name}: expected at least one {what} (dim {dim}), got shape "
                         f"{tuple(t.shape)}")
