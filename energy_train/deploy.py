"""Export a trained energy model for the C++ runtime (``runtime/``, ``energy_train::Verifier``).

``export_verifier(model, path=DIR, ...)`` writes into DIR:

- ``score.pt2``: an AOTInductor package of ``energy_scores(model, context, pad_mask,
  candidates, backend="eager")`` -> energies (B, C); each context is encoded once;
- ``correct.pt2``: an AOTInductor package of ``correct_actions(model, context, pad_mask,
  actions, steps, alpha, clip_frac, backend="eager")`` -> corrected actions (B, H, Da);
- ``manifest.json``: per function its inputs (name, dtype, shape with named dynamic dims) and
  output, the dynamic ranges, the correction's constants, the model's configuration, the torch
  version and the sha256 of each package file.

What is exported: the EAGER path of the public ops, as a graph of aten ops with the weights
inside the package (fixed at export time). What is not: the Triton custom ops of
``energy_train.kernels`` (``backend="triton"``) are never inside a package, on the CPU or on
CUDA; AOTInductor compiles the eager graph with its own generated kernels (C++ on the CPU,
Triton-generated CUDA kernels on a GPU). Training, the losses and anything with a host
synchronisation are not exported.

How ``correct`` is exported: ``torch.export`` cannot trace ``torch.autograd.grad`` (torch 2.13:
non-strict export leaves fake tensors among the program's constants; strict export with
``trace_autograd_ops`` leaks them into the outputs), so ``correct_actions`` - forward,
``autograd.grad`` and the clipped step, ``steps`` times - is first traced by ``make_fx`` into a
graph of aten ops with symbolic shapes, and that graph is exported and compiled. The graph IS
``correct_actions``: the same calls (with common subexpressions merged: the context is encoded
once for all steps), so the graph equals eager bitwise (tests/test_runtime.py); the compiled
package equals it within fp32 rounding (its kernels sum in another order).

A package runs only with the exporting torch's major.minor version, on the exported device
kind and, on the CPU, on processors with the vector ISA it was compiled for (AOTInductor's
``AOTI_CPU_ISA`` metadata, e.g. AVX512); the C++ runtime refuses anything else.

AOTInductor may specialise a dynamic dimension to the example size while it compiles (a small
example batch met a size-dependent decomposition of a tiny matrix product and the package
silently computed garbage for every other batch). ``export_verifier`` therefore traces at
example sizes inside the ranges and, before writing the manifest, runs each compiled package
at sizes different from the examples and compares it with eager (``check=True``).
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .files import atomic_write_text
from .losses import correct_actions
from .models import EnergyModel
from .ops import energy_scores
from .testing import relative_error

FORMAT = "energy-train-verifier"
FORMAT_VERSION = 1
FUNCTIONS = ("score", "correct")
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
          torch.bfloat16: "bfloat16"}
#: relative-error bound of the post-compile check against eager, per dtype
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 5e-3,
                   torch.bfloat16: 2e-2}


class ExportError(RuntimeError):
    """The compiled package does not reproduce eager (see ``export_verifier(check=True)``)."""


#: preferred tracing sizes (clamped into each range); distinct so no two dims are confused
EXAMPLES = {"batch": 3, "context_len": 50, "candidates": 5}


@dataclass(frozen=True)
class _Range:
    name: str
    lo: int
    hi: int

    def example(self, preferred: int) -> int:
        """A tracing size: ``preferred`` clamped to the range, off its ends where it can be,
        and >= 2 where it can be (torch.export specialises a dim traced at size 1)."""
        lo, hi = (self.lo + 1, self.hi - 1) if self.hi - self.lo >= 2 else (self.lo, self.hi)
        return min(hi, max(lo, 2, preferred))

    def dim(self) -> torch.export.Dim | None:
        """The export Dim; None (a static size) when min == max."""
        return None if self.lo == self.hi else torch.export.Dim(self.name, min=self.lo, max=self.hi)


def _range(name: str, value) -> _Range:
    """An int N means [1, N]; a pair (lo, hi) means [lo, hi]; 1 <= lo <= hi."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a (min, max) pair, got {value!r}")
    if isinstance(value, int):
        lo, hi = 1, value
    elif isinstance(value, Sequence) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        lo, hi = value
    else:
        raise TypeError(f"{name}: expected an int or a (min, max) pair of ints, got {value!r}")
    if not 1 <= lo <= hi:
        raise ValueError(f"{name}: expected 1 <= min <= max, got ({lo}, {hi})")
    return _Range(name, lo, hi)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (what manifest.json records per package)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Score(torch.nn.Module):
    def __init__(self, model: EnergyModel):
        super().__init__()
        self.model = model

    def forward(self, context, pad_mask, candidates):
        return energy_scores(self.model, context, pad_mask, candidates, backend="eager")


class _Graph(torch.nn.Module):
    """Holds a make_fx graph so that torch.export sees a module (weights are its constants)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, context, pad_mask, actions):
        return self.gm(context, pad_mask, actions)


def _trace_correct(model, steps, alpha, clip_frac, example):
    """correct_actions as a graph of aten ops (forward, autograd.grad, step) with symbolic
    shapes. Duck sizing is off so that equal example sizes (e.g. batch == H) stay separate.

    correct_actions encodes the context again at every step: the same ops on the same inputs.
    Merging common subexpressions (after pointing every use of a weight at one node) leaves one
    context encoding for all steps - the same values, k times less of the dominant cost."""
    import torch.fx.experimental._config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.dialect.common.cse_pass import CSEPass

    def fn(context, pad_mask, actions):
        return correct_actions(model, context, pad_mask, actions, alpha=alpha, steps=steps,
                               clip_frac=clip_frac, backend="eager")

    with fx_config.patch(use_duck_shape=False):
        gm = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    first, targets = {}, set()  # make_fx gives each use of a weight its own attribute node
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            targets.add(node.target)
            keep = first.setdefault(id(getattr(gm, node.target)), node)
            if keep is not node:
                node.replace_all_uses_with(keep)
                gm.graph.erase_node(node)
    for name in targets - {node.target for node in first.values()}:
        delattr(gm, name)
    gm.recompile()
    return CSEPass()(gm).graph_module


@dataclass
class _Plan:
    """Validated arguments of an export and the model copy it traces."""
    model: EnergyModel
    H: int
    Da: int
    ranges: dict
    examples: dict
    steps: int
    alpha: float
    clip_frac: float
    device: torch.device
    dtype: torch.dtype
    functions: tuple

    def inputs(self, name: str, B: int, S: int, C: int, generator: torch.Generator):
        """Random (context, pad_mask, candidates | actions) of the given sizes."""
        D = self.model.state_dim
        context = torch.randn(B, S, D, generator=generator)
        pad_mask = torch.rand(B, S, generator=generator) < 0.25
        pad_mask[:, 0] = False  # every sample keeps a key
        shape = (B, self.H, self.Da) if name == "correct" else (B, C, self.H, self.Da)
        moving = torch.randn(*shape, generator=generator)
        return (context.to(self.device, self.dtype), pad_mask.to(self.device),
                moving.to(self.device, self.dtype))

    def eager(self, name: str, *args) -> torch.Tensor:
        if name == "correct":
            return correct_actions(self.model, *args, alpha=self.alpha, steps=self.steps,
                                   clip_frac=self.clip_frac, backend="eager")
        return energy_scores(self.model, *args, backend="eager")


def _plan(energy_model, chunk, context_len, batch, candidates, steps, alpha, clip_frac, device,
          dtype, functions, examples) -> _Plan:
    if not isinstance(energy_model, EnergyModel):
        raise TypeError(f"energy_model: expected an EnergyModel, got {type(energy_model).__name__}")
    if (not isinstance(chunk, Sequence) or len(chunk) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in chunk)):
        raise ValueError(f"chunk: expected (H, Da), two positive ints, got {chunk!r}")
    H, Da = chunk
    if Da != energy_model.act_dim:
        raise ValueError(f"chunk: expected Da = the model's act_dim {energy_model.act_dim}, got {Da}")
    max_steps = energy_model.pe_layer.P.shape[0]
    if H > max_steps:
        raise ValueError(f"chunk: expected H <= {max_steps} (the positional table), got {H}")
    ranges = {"batch": _range("batch", batch), "context_len": _range("context_len", context_len),
              "candidates": _range("candidates", candidates)}
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    for name, v in (("alpha", alpha), ("clip_frac", clip_frac)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"{name}: expected a positive number, got {v!r}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {str(device)!r} asked for, but this torch ({torch.__version__}) "
                           "has no CUDA device; export on a CUDA machine, or device='cpu'")
    functions = tuple(functions)
    if not functions or any(f not in FUNCTIONS for f in functions):
        raise ValueError(f"functions: expected a non-empty subset of {FUNCTIONS}, got {functions!r}")
    preferred = dict(EXAMPLES, **(examples or {}))
    if set(preferred) != set(EXAMPLES):
        raise ValueError(f"examples: expected keys among {sorted(EXAMPLES)}, got {sorted(examples)}")
    model = copy.deepcopy(energy_model).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return _Plan(model, H, Da, ranges, {k: r.example(preferred[k]) for k, r in ranges.items()},
                 steps, float(alpha), float(clip_frac), device, dtype, functions)


def _programs(plan: _Plan) -> dict:
    b, s, c = (plan.ranges[k].dim() for k in ("batch", "context_len", "candidates"))
    ex = plan.examples
    out = {}
    for name in plan.functions:
        gen = torch.Generator().manual_seed(0)
        example = plan.inputs(name, ex["batch"], ex["context_len"], ex["candidates"], gen)
        if name == "correct":
            module = _Graph(_trace_correct(plan.model, plan.steps, plan.alpha, plan.clip_frac,
                                           example))
            dims = ({0: b, 1: s}, {0: b, 1: s}, {0: b})
        else:
            module = _Score(plan.model)
            dims = ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: c})
        out[name] = torch.export.export(module, example, dynamic_shapes=dims, strict=False)
    return out


def export_programs(energy_model: EnergyModel, *, chunk: tuple[int, int], context_len=1024,
                    batch=64, candidates=256, steps: int = 1, alpha: float = 0.1,
                    clip_frac: float = 0.2, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, functions: Sequence[str] = FUNCTIONS,
                    examples: dict | None = None) -> dict:
    """The ``torch.export`` programs that ``export_verifier`` compiles, by function name
    ({"score": ..., "correct": ...}); same arguments. Their ``.module()`` computes exactly the
    eager ops (the same aten calls; bitwise equal on the CPU)."""
    return _programs(_plan(energy_model, chunk, context_len, batch, candidates, steps, alpha,
                           clip_frac, device, dtype, functions, examples))


def _spec(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def export_verifier(energy_model: EnergyModel, *, path: str | Path,
                    chunk: tuple[int, int], context_len=1024, batch=64, candidates=256,
                    steps: int = 1, alpha: float = 0.1, clip_frac: float = 0.2,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    functions: Sequence[str] = FUNCTIONS, examples: dict | None = None,
                    check: bool = True) -> Path:
    """Compile ``score`` and ``correct`` of ``energy_model`` into AOTInductor packages in
    ``path`` and write ``path/manifest.json``; returns the manifest's path.

    Args:
        energy_model: the trained EnergyModel (copied; the original is not changed).
        path: output directory (created; existing package files are replaced).
        chunk: (H, Da), the action chunk's steps and dims (Da must be the model's act_dim).
        context_len, batch, candidates: dynamic ranges of S, B and C: an int N for [1, N] or a
            (min, max) pair. Inputs outside them are refused by the C++ runtime.
        steps, alpha, clip_frac: the correction (``correct_actions``), fixed in the package.
        device: "cpu" or a CUDA device; the package runs there only.
        dtype: the model's and the inputs' floating dtype (context, candidates, actions).
        functions: which of ("score", "correct") to export.
        examples: tracing sizes {"batch", "context_len", "candidates"} (default EXAMPLES,
            clamped into the ranges); on CUDA the kernels are tuned for them.
        check: run each compiled package at sizes other than the tracing sizes and compare it
            with eager (relative error <= 1e-5 in fp32); raises ExportError otherwise.
    """
    plan = _plan(energy_model, chunk, context_len, batch, candidates, steps, alpha, clip_frac,
                 device, dtype, functions, examples)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    D, dt, H, Da = plan.model.state_dim, DTYPES[plan.dtype], plan.H, plan.Da
    context_spec = [_spec("context", dt, ["batch", "context_len", D]),
                    _spec("pad_mask", "bool", ["batch", "context_len"])]
    specs = {
        "score": dict(inputs=context_spec + [_spec("candidates", dt, ["batch", "candidates", H, Da])],
                      output=_spec("energies", dt, ["batch", "candidates"])),
        "correct": dict(inputs=context_spec + [_spec("actions", dt, ["batch", H, Da])],
                        output=_spec("actions", dt, ["batch", H, Da])),
    }
    model = plan.model
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "torch": torch.__version__, "device": plan.device.type, "dtype": dt,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exported": "the eager path (backend='eager') of energy_scores / correct_actions as "
                    "aten ops compiled by AOTInductor; the Triton custom ops are not inside",
        "model": dict(cls="EnergyModel", state_dim=D, act_dim=model.act_dim, hidden=model.hidden,
                      heads=model.heads, output=model.output,
                      activation=model.state_linear.activation),
        "chunk": [H, Da],
        "dims": {r.name: [r.lo, r.hi] for r in plan.ranges.values()},
        "examples": plan.examples,
        "correction": dict(steps=plan.steps, alpha=plan.alpha, clip_frac=plan.clip_frac),
        "functions": {},
    }
    tmp_dir = out / ".tmp"
    tmp_dir.mkdir(exist_ok=True)
    try:
        for name, program in _programs(plan).items():
            spec = dict(specs[name], file=f"{name}.pt2")
            # the function's spec travels inside the package too: a manifest edited to widen a
            # range or change a dtype no longer matches what the package was compiled for
            meta = {"energy_train.spec": json.dumps(_embedded_spec(manifest, spec), sort_keys=True)}
            tmp = tmp_dir / spec["file"]  # the package's inner name is its file's stem
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": meta})
            if check:
                _check_package(plan, name, tmp)
            os.replace(tmp, out / spec["file"])
            manifest["functions"][name] = spec
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    manifest["files"] = {spec["file"]: sha256_file(out / spec["file"])
                         for spec in manifest["functions"].values()}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return out / "manifest.json"


def _embedded_spec(manifest: dict, spec: dict) -> dict:
    """What a package records about itself (compared with the manifest by the C++ runtime)."""
    dims = sorted({d for t in spec["inputs"] for d in t["shape"] if isinstance(d, str)})
    return dict(inputs=spec["inputs"], output=spec["output"], device=manifest["device"],
                dims={d: manifest["dims"][d] for d in dims})


def _check_package(plan: _Plan, name: str, package: Path) -> None:
    """Run the compiled package at sizes other than the tracing sizes; compare with eager."""
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(str(package))
    b, s, c = (plan.ranges[k] for k in ("batch", "context_len", "candidates"))
    sizes = {(b.lo, s.lo, c.lo), (min(b.lo + 1, b.hi), min(s.lo + 2, s.hi), min(c.lo + 1, c.hi))}
    ex = plan.examples
    sizes.discard((ex["batch"], ex["context_len"], ex["candidates"]))
    gen = torch.Generator().manual_seed(1)
    for B, S, C in sorted(sizes):
        args = plan.inputs(name, B, S, C, gen)
        ref, got = plan.eager(name, *args), runner(*args)
        err = relative_error(ref, got) if got.shape == ref.shape else float("inf")
        if not err <= CHECK_TOLERANCE[plan.dtype]:
            raise ExportError(
                f"{name}: the compiled package disagrees with eager at batch={B}, "
                f"context_len={S}" + ("" if name == "correct" else f", candidates={C}")
                + f": shape {tuple(got.shape)} vs {tuple(ref.shape)}, relative error {err:.3e}")
