"""The cuBLAS / cuBLASLt workspaces torch allocates on CUDA, for the memory plan.

torch gives every (cuBLAS handle, CUDA stream) pair that runs a cuBLAS call its own workspace,
allocated through the CUDA caching allocator at the first call and kept until the process ends
(``at::cuda::setWorkspaceForHandle``, aten/src/ATen/cuda/CublasHandlePool.cpp): it counts in
``torch.cuda.memory_allocated`` and ``max_memory_allocated`` like a tensor, but no tensor holds
it, so fake tensors never see it. What the plan adds (read from that file's source in
pytorch/pytorch, not from a 2.11 build, which ships no C++ source - see "what is not certain"):

- **size of one cuBLAS workspace**: ``CUBLAS_WORKSPACE_CONFIG`` when set, parsed as torch
  parses it: every ``:SIZE:COUNT`` match of the regex ``:([0-9]+):([0-9]+)`` adds
  SIZE KiB x COUNT (``:4096:8`` = 32 MiB, ``:4096:2:16:8`` = 8 MiB + 128 KiB); a value with
  no match falls back to the default (torch warns). The default: 32 MiB (``4096 * 8 * 1024``)
  on Hopper, else ``4096 * 1024 * 2 + 16 * 1024 * 8`` (":4096:2:16:8", 8.125 MiB). "Hopper" is
  compute capability (9, 0) exactly in the source with the separate cuBLASLt workspace below
  (what torch 2.11 behaved as on the H200); later sources say major 9, 10 or 12 (Blackwell
  too, pytorch PR #175344). On a real device, when torch can say
  (``torch.backends.cuda.cublas_workspace_size()``, newer than 2.11), its answer is used.
- **handles per stream: 2**. A handle is per thread (``DeviceThreadHandlePool``); the
  forward runs on the caller's thread, autograd runs a CUDA backward on its own device thread
  (torch/csrc/autograd/engine.cpp: one worker thread per device), hence two handles and two
  workspaces on each stream a training step runs on. The H200 measured exactly that for the
  sequential tiny step (one stream): 2 x 32 MiB + 1 MiB (the cuBLASLt workspace below) + 4 KiB
  above the plan's tensors at the step's start (bench/results/plan-check-h200.json).
- **the cuBLASLt workspace**, per (handle, stream) of a cuBLASLt call (``addmm`` with a bias
  epilogue: a Linear's forward, on the caller's thread only; one per stream). Unified with the
  cuBLAS one (no extra bytes) when ``TORCH_CUBLASLT_UNIFIED_WORKSPACE`` says so; separate
  otherwise, of ``CUBLASLT_WORKSPACE_SIZE`` KiB (default 1024 KiB = 1 MiB), capped at the
  cuBLAS size unless the variable is "0". torch reads the variable with ``check_env``: "1"
  is true, "0" false, anything else (or unset) means the default - which was *separate* up
  to torch 2.11 (the 1 MiB the H200 measured) and *unified* from pytorch PR #175879 (merged
  2026-03-02, taken here as torch >= 2.12).
- **streams** that run matmuls: the current one; plus the side stream with ``run.overlap``
  (phase 2 runs there: its forward and its energy backward); plus a capture stream with
  ``run.cuda_graphs`` (graphed parts are warmed up and captured on a side stream) - an upper
  bound, since a stream counts whether or not its matmuls use both handles.

What is not certain: the 2.11 rule was not read from 2.11's own source (none ships with the
wheel, and the stored pytorch sources are undated); the (9, 0)-only 32 MiB default and the
separate 1 MiB cuBLASLt workspace are from the source that matches what the H200 measured
with torch 2.11 (65 MiB + 4 KiB at the tiny step's start, its plan's tensors aside), and the
2.12 switch points are the PRs' merge dates. The 4 KiB is not explained. cuDNN's workspaces
(convolutions: none in these policies), NCCL's buffers and the CUDA context are not counted.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
HOPPER_DEFAULT = 4096 * 8 * 1024                 # 32 MiB
DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8        # ":4096:2:16:8" = 8 MiB + 128 KiB
LT_DEFAULT_KIB = 1024                            # CUBLASLT_WORKSPACE_SIZE's default (1 MiB)
HANDLES_PER_STREAM = 2   # the caller's thread and autograd's CUDA device thread
LT_HANDLES_PER_STREAM = 1  # cuBLASLt (addmm + bias) runs in forwards: the caller's thread
_CONFIG = re.compile(r":([0-9]+):([0-9]+)")


def _version(v: str | None) -> tuple[int, int]:
    if v is None:
        import torch
        v = torch.__version__
    m = re.match(r"(\d+)\.(\d+)", str(v))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parse_cublas_config(value: str | None) -> int | None:
    """Bytes of ``CUBLAS_WORKSPACE_CONFIG`` as torch sums it, or None (unset, or no
    ``:SIZE:COUNT`` in it: torch then uses its default)."""
    if value is None:
        return None
    matches = _CONFIG.findall(value)
    if not matches:
        return None
    return sum(int(size) * KIB * int(count) for size, count in matches)


def default_cublas_bytes(capability: tuple[int, int], torch_version: str | None = None) -> int:
    """torch's default cuBLAS workspace for a device of ``capability`` (see the module
    docstring: (9, 0) only up to torch 2.11, major 9/10/12 after)."""
    major, minor = capability
    if _version(torch_version) >= (2, 12):
        big = major in (9, 10, 12)
    else:
        big = (major, minor) == (9, 0)
    return HOPPER_DEFAULT if big else DEFAULT


def check_env(value: str | None) -> bool | None:
    """c10::utils::check_env: "1" true, "0" false, anything else (or unset) None."""
    return {"1": True, "0": False}.get(value) if value is not None else None


@dataclass
class BlasWorkspaces:
    """One cuBLAS and one (separate, or 0 when unified) cuBLASLt workspace, and why."""
    capability: tuple[int, int]
    cublas: int
    cublas_rule: str
    cublaslt: int          # 0: unified with the cuBLAS workspace
    cublaslt_rule: str

    def lines(self, streams: int) -> dict:
        """{"cuBLAS workspace": bytes, "cuBLASLt workspace": bytes} for ``streams`` streams
        that run matmuls."""
        return {"cuBLAS workspace": streams * HANDLES_PER_STREAM * self.cublas,
                "cuBLASLt workspace": streams * LT_HANDLES_PER_STREAM * self.cublaslt}

    def total(self, streams: int) -> int:
        return sum(self.lines(streams).values())


def blas_workspaces(capability: tuple[int, int], env: dict | None = None,
                    torch_version: str | None = None,
                    torch_says: int | None = None) -> BlasWorkspaces:
    """The workspaces of a device of ``capability`` under ``env`` (default os.environ) and
    torch ``torch_version`` (default the installed one). ``torch_says``: the cuBLAS size torch
    reported on the device itself (newer torch), used as is."""
    env = os.environ if env is None else env
    capability = tuple(int(c) for c in capability)
    parsed = parse_cublas_config(env.get("CUBLAS_WORKSPACE_CONFIG"))
    default = default_cublas_bytes(capability, torch_version)
    if torch_says is not None:
        cublas, rule = int(torch_says), "torch.backends.cuda.cublas_workspace_size()"
    elif parsed is not None:
        cublas, rule = parsed, f"CUBLAS_WORKSPACE_CONFIG={env['CUBLAS_WORKSPACE_CONFIG']}"
    else:
        cublas = default
        rule = (f"torch's default for sm_{capability[0]}{capability[1]}"
                + (" (unparsed CUBLAS_WORKSPACE_CONFIG)" if "CUBLAS_WORKSPACE_CONFIG" in env
                   else ""))
    flag = check_env(env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE"))
    unified = flag if flag is not None else _version(torch_version) >= (2, 12)
    if unified:
        return BlasWorkspaces(capability, cublas, rule, 0, "unified with the cuBLAS workspace"
                              + ("" if flag else " (torch >= 2.12 default)"))
    kib = LT_DEFAULT_KIB
    try:
        kib = int(env.get("CUBLASLT_WORKSPACE_SIZE", LT_DEFAULT_KIB))
    except ValueError:  # torch warns and keeps its default
        pass
    lt = kib * KIB
    if flag is None:  # the size parser treats "unset" as unified: capped at cuBLAS's
        lt = min(lt, cublas)
    why = ("separate" + (": TORCH_CUBLASLT_UNIFIED_WORKSPACE=0" if flag is False
                         else " (torch <= 2.11 default)")
           + f", {kib} KiB" + (" (CUBLASLT_WORKSPACE_SIZE)" if "CUBLASLT_WORKSPACE_SIZE" in env
                               else ""))
    return BlasWorkspaces(capability, cublas, rule, lt, why)


def streams_of(overlap: bool = False, cuda_graphs: bool = False) -> int:
    """Streams that run matmuls in a step: the current one, the overlap's side stream, the
    CUDA graphs' capture stream (an upper bound: see the module docstring)."""
    return 1 + bool(overlap) + bool(cuda_graphs)


def for_device(device) -> BlasWorkspaces:
    """The workspaces of the real CUDA ``device`` this process runs on."""
    import torch
    cap = torch.cuda.get_device_capability(device)
    says = None
    query = getattr(torch.backends.cuda, "cublas_workspace_size", None)
    if query is not None:
        try:
            with torch.cuda.device(device):
                says = int(query())
        except Exception:  # noqa: BLE001 - an older or CPU-only build: the source's rule
            says = None
    return blas_workspaces(cap, torch_says=says)
