"""Host time per call of the fused paths with every Triton kernel stubbed out:
``TRITON_INTERPRET=1 python -m bench.run host`` (CPU only: the interpreter's launch is what is
stubbed; bench/counts.py). What the Python and torch layers cost before any kernel runs - the
floor of a call's latency when nothing else hides it (on a GPU without a CUDA graph).

Cases (bench.counts' production call structures at reduced sizes): the swap InfoNCE forward +
backward of the energy model (fp32 and bf16 models), and the all-layer action-head pass over a
capture buffer of 33 layers. Providers: ``triton`` (kernels stubbed) and ``eager`` (the
reference run for real at these tiny sizes: mostly its own host overhead), timed in the same
rounds, so the ratio is the figure to read, not the milliseconds of this machine.
"""
from __future__ import annotations

import os

import torch

from bench.counts import _triton_hook, energy_swap_step, layer_actions_call
from bench.harness import Benchmark, Case, Provider


_STUB: list = []


def make_benchmark(device: torch.device, quick: bool = False, cpu_shapes: bool = True) -> Benchmark:
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("bench host: CPU only, with TRITON_INTERPRET=1 (the interpreter's "
                           "launch is what is stubbed)")
    cases = [Case("energy-swap-fwdbwd-fp32", dict(op="energy", dtype="float32"),
                  lambda dev: dict(op="energy", dtype=torch.float32)),
             Case("energy-swap-fwdbwd-bf16", dict(op="energy", dtype="bfloat16"),
                  lambda dev: dict(op="energy", dtype=torch.bfloat16)),
             Case("layer-actions-L33-captured", dict(op="layer_actions"),
                  lambda dev: dict(op="layer_actions"))]

    def provider(backend):
        def factory(inp):
            if inp["op"] == "energy":
                fn = energy_swap_step(backend, inp["dtype"])
            else:
                fn = layer_actions_call(backend, captured=True)
            return fn
        return factory
    # this process launches no Triton kernel from here on: every launch is a no-op (the eager
    # provider launches none anyway), so the triton provider's time is its host side alone
    _STUB.append(_triton_hook(stub=True))
    _STUB[-1].__enter__()
    return Benchmark("host", cases, [Provider("eager", provider("eager")),
                                     Provider("triton_stubbed", provider("triton"))],
                     baseline="eager", cpu_budget_s=1.5,
                     notes=["triton_stubbed: the fused path with every Triton launch a no-op "
                            "(bench/counts.py): its host side alone; eager: the reference, "
                            "run for real at these reduced sizes",
                            "1 torch thread; interleaved rounds: read the ratio, not the ms"])
