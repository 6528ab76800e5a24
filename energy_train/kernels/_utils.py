"""Plumbing shared by every op's launchers and kernels, each piece once: interpreter detection,
the fp32 dot precision default, output poisoning, dtype and activation tables, argument checks.
Imports nothing from ``energy_train`` (``energy_train`` imports these).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

#: dtypes the kernels compute in (operands rounded to the weight dtype, fp32 accumulation)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: ``input_precision`` of fp32 dots: exact FFMA, one TF32 MMA, or three TF32 MMAs (fp32-grade)
PRECISIONS = ("ieee", "tf32", "tf32x3")

#: activation name -> the ``ACT`` constexpr of the kernels; ACT_* are those codes inside kernels
ACTIVATIONS = {"none": 0, "relu": 1, "silu": 2}
ACT_NONE = tl.constexpr(ACTIVATIONS["none"])
ACT_RELU = tl.constexpr(ACTIVATIONS["relu"])
ACT_SILU = tl.constexpr(ACTIVATIONS["silu"])
#: the same activations in torch, for launchers that apply one outside a kernel
TORCH_ACTIVATIONS = {"none": lambda h: h, "relu": F.relu, "silu": F.silu}

#: environment switch: "1" fills every buffer a launcher allocates with NaN, so an element a
#: kernel fails to write fails a parity test instead of passing with stale memory
POISON_ENV = "ENERGY_TRAIN_POISON"


@triton.jit
def round_tf32(x):
    """fp32 -> the nearest tf32 value (10-bit mantissa; ties away from zero, as cuBLAS's
    ``cvt.rna.tf32.f32``), kept in fp32; inf and NaN pass unchanged. The tensor core's tf32 MMA
    TRUNCATES its fp32 operands (triton 3.6 emits no rounding), which doubles the error."""
    bits = x.to(tl.uint32, bitcast=True)
    r = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < float("inf"), r, x)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` (fp32 accumulation; ``acc`` may be None). "tf32" on fp32 operands rounds
    them to the nearest tf32 first (``round_tf32``): the same numbers as cuBLAS's TF32 GEMMs,
    and the same under the interpreter (whose fp32 dot is exact) as on a GPU."""
    if INPUT_PRECISION == "tf32":
        if a.dtype == tl.float32:
            a = round_tf32(a)
        if b.dtype == tl.float32:
            b = round_tf32(b)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def mm(a, b, acc, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b`` with both operands rounded to DOT_DTYPE (fp32 accumulation). UPCAST (the
    interpreter, whose bf16 dot is wrong): the rounded operands multiplied exactly in fp32 -
    what the tensor core computes."""
    if UPCAST:
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32), acc,
                      input_precision="ieee")
    return dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, PREC)


def flags_from_pointers(**flags):
    """``@triton.heuristics`` for optional pointer arguments: each constexpr flag is True when
    its pointer argument is given (not None), e.g. ``flags_from_pointers(HAS_BIAS="b_ptr")``."""
    return triton.heuristics({flag: (lambda args, name=name: args[name] is not None)
                              for flag, name in flags.items()})


def interpreting() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_runnable(name: str, t: torch.Tensor) -> None:
    """A kernel needs CUDA tensors, or CPU tensors under the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name}: the Triton kernel needs CUDA tensors (got {t.device}); on the "
                           "CPU set TRITON_INTERPRET=1 to run it under the Triton interpreter")


def default_precision(dtype: torch.dtype) -> str:
    """fp32 dots on a GPU: "tf32" when torch allows TF32 for matmuls, else "tf32x3" (three TF32
    MMAs: fp32-grade products on tensor cores; "ieee" compiles to FFMA, several times slower);
    under the interpreter "ieee" (its fp32 dot is exact whatever is asked)."""
    if dtype != torch.float32 or interpreting():
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def resolve_precision(input_precision: str | None, dtype: torch.dtype) -> str:
    """``input_precision`` checked, or the default for ``dtype``."""
    if input_precision is None:
        return default_precision(dtype)
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision: expected one of {PRECISIONS}, got {input_precision!r}")
    return input_precision


def dot_precision(dtype: torch.dtype, input_precision: str) -> str:
    """The ``input_precision`` a kernel's ``tl.dot`` gets: only fp32 operands have a choice."""
    return input_precision if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's ``tl.dot`` on bf16 operands is wrong: kernels feed fp32 operands there."""
    return interpreting() and dtype == torch.bfloat16


def poisoning() -> bool:
    return os.environ.get(POISON_ENV, "0") == "1"


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, NaN-filled when ``ENERGY_TRAIN_POISON=1``."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if poisoning() and dtype.is_floating_point else t


def check_tensor(name: str, t, *, ndim: int | None = None, shape: Mapping[int, int] | None = None,
                 dtype: torch.dtype | tuple | None = None, floating: bool = False,
                 integer: bool = False, device: torch.device | None = None) -> None:
    """Metadata checks (no host sync) whose errors name ``name``, the expected and the received."""
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


def check_kernel_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise TypeError(f"{name}: the Triton path expects a dtype in {DTYPES}, got {dtype}; "
                        "use backend='eager'")
