"""Energy scoring + contrastive losses: ``python -m bench.run energy [--quick]``.

Providers (what is timed is what tests/test_kernel_energy.py proves equal):
  reference_replicated  the public fork: context copied B*B (swap) / B*(1+M) (explicit) times
                        through the WHOLE model (bench.baselines.replicated_*)
  eager_once            losses.*(backend="eager"): context encoded once (the oracle)
  torch_compile         eager_once under torch.compile (GPU only here: inductor's CPU compile
                        on a 2-core box costs minutes per shape)
  triton                losses.*(backend="triton") (GPU only: interpreter timings mean nothing):
                        energy_fwd / energy_bwd, 18 Triton launches (kernels/energy)
  triton_tiled          the same with chains="tiled" (v5, GPU only): the pool's and the head's
                        layers one tiled launch each instead of one chain launch per pass
                        (37 Triton launches), timed beside ``triton`` in the same run
Cases: swap InfoNCE and explicit-negative InfoNCE (M = 6), forward and forward+backward (the
energy model's parameters; context detached, as the trainer does), hidden 512/8 and 1024/16,
B=8, S=600, D=4096, H=8, Da=7, an fp32 energy model (the default) and a bf16 one (the public
fork trains it in bf16: ``-bf16`` cases), plus sweeps over B (8-64) and S (256-1024) on the GPU.
The record's params carry ``ctx_bytes``: the encoded context itself (K|V, (B, S, 2*hidden) in
the model dtype), the yardstick of the memory target (peak <= 2x that). Memory, fwd+bwd cases:
on a GPU the harness records the peak of one call above what was allocated before it (inputs,
model) as ``peak_mem_bytes``, shown as "+N MiB (x ctx)"; on the CPU ``saved_bytes`` is what the
autograd graph keeps for the backward (bench/memory.py: distinct storages, parameters and
inputs excluded) and ``cpu_peak_bytes`` the peak of live torch tensors during one call above
what was alive before it (the GPU figure's stand-in; parameter gradients included), per provider
- the triton one only when the run has TRITON_INTERPRET=1 (interpreted calls, not timed):
``TRITON_INTERPRET=1 python -m bench.run energy [--quick]``.
"""
from __future__ import annotations

import torch

import os

from bench.baselines import replicated_explicit_infonce, replicated_swap_infonce
from bench.harness import Benchmark, Case, Provider
from bench.memory import peak_bytes, saved_bytes
from energy_train import losses
from energy_train.kernels.energy import energy_chains
from energy_train.models import EnergyModel

H, DA, M_NEG = 8, 7, 6
REPLICATED_MAX_BYTES = 12 * 2**30  # skip the replicated baseline where its copy alone is larger


def fwd_flops(B, S, D, E, C):
    """Matrix FLOPs of one encode-once forward (2 per multiply-add)."""
    Q = C * H
    ctx = B * S * 2 * (D * E + E * E + E * E + E * 2 * E)      # fc1, block, fc2, K|V
    act = C * H * 2 * (DA * E + 3 * E * E)                      # pool encoded once (swap)
    attn = B * Q * S * E * 4                                    # QK^T and PV over all heads
    read = B * Q * 2 * (E * E + 3 * E * E + E)                  # out proj, head (fc1, 2 blocks, fc2)
    return ctx + act + attn + read


def make_benchmark(device: torch.device, quick: bool = False, cpu_shapes: bool = False) -> Benchmark:
    gpu = device.type == "cuda"
    if cpu_shapes or not gpu:
        grid = [dict(B=4, S=64, D=256, E=64, heads=4)]
        if not quick:
            grid.append(dict(B=8, S=96, D=256, E=64, heads=4))
    else:
        grid = [dict(B=8, S=600, D=4096, E=512, heads=8), dict(B=8, S=600, D=4096, E=1024, heads=16),
                dict(B=8, S=600, D=4096, E=512, heads=8, dtype="bfloat16")]
        if not quick:
            grid += [dict(B=b, S=600, D=4096, E=512, heads=8) for b in (16, 32, 64)]
            grid += [dict(B=8, S=s, D=4096, E=512, heads=8) for s in (256, 1024)]
    cases = []
    for g in grid:
        for loss in ("swap", "explicit"):
            for mode in ("fwd", "fwdbwd"):
                C = g["B"] if loss == "swap" else 1 + M_NEG
                f = fwd_flops(g["B"], g["S"], g["D"], g["E"], C)
                g = dict(g, dtype=g.get("dtype", "float32"))
                esize = 2 if g["dtype"] == "bfloat16" else 4
                ctx_bytes = g["B"] * g["S"] * 2 * g["E"] * esize  # K|V in the model's dtype
                params = dict(g, loss=loss, mode=mode, C=C, ctx_bytes=ctx_bytes)
                tag = "-bf16" if g["dtype"] == "bfloat16" else ""
                cases.append(Case(
                    name=f"{loss}-{mode}-B{g['B']}-S{g['S']}-D{g['D']}-E{g['E']}h{g['heads']}{tag}",
                    params=params, flops=f if mode == "fwd" else 3 * f,
                    make=lambda dev, p=params: _inputs(dev, p)))
    providers = [
        Provider("reference_replicated", lambda i: _runner(i, "replicated")),
        Provider("eager_once", lambda i: _runner(i, "eager")),
        Provider("torch_compile", lambda i: _runner(i, "compile"), cpu_ok=False),
        Provider("triton", lambda i: _runner(i, "triton"), gpu_only=True),
        Provider("triton_tiled", lambda i: _runner(i, "triton_tiled"), gpu_only=True),
    ]
    return Benchmark("energy", cases, providers, baseline="eager_once",
                     notes=["context bf16 on the GPU (fp32 on the CPU), energy model fp32 (bf16 in "
                            "the -bf16 cases); fwd+bwd = energy-model parameter gradients, "
                            "context detached",
                            "memory (fwd+bwd) vs ctx_bytes = the encoded context (K|V) itself: "
                            "GPU: peak above the inputs; CPU: bytes saved for the backward "
                            "and peak of live tensors (profiler memory timeline)"],
                     memory=_memory)


def _memory(case, provider, i):
    """CPU, fwd+bwd: bytes the autograd graph saves (parameters and inputs excluded) and the
    peak of live tensors above what was alive before the call (the GPU figure's stand-in)."""
    if case.params["mode"] != "fwdbwd" or i["ctx"].device.type == "cuda":
        return {}
    how = {"reference_replicated": "replicated", "eager_once": "eager", "triton": "triton",
           "triton_tiled": "triton_tiled"}.get(provider)
    if how is None or (how.startswith("triton") and os.environ.get("TRITON_INTERPRET") != "1"):
        return {}
    fn = _runner(i, how)
    if fn is None:
        return {}
    keep = [*i["model"].parameters(), i["ctx"], i["pad"], i["expert"], i["negs"]]
    saved = saved_bytes(fn, exclude=keep)["bytes"]
    return dict(saved_bytes=saved, cpu_peak_bytes=peak_bytes(fn)["peak"])


def _inputs(dev, p):
    torch.manual_seed(0)
    mdt = getattr(torch, p.get("dtype", "float32"))
    model = EnergyModel(p["D"], DA, hidden=p["E"], heads=p["heads"]).to(dev, mdt)
    cdt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ctx = torch.randn(p["B"], p["S"], p["D"], device=dev, dtype=cdt)
    pad = torch.rand(p["B"], p["S"], device=dev) < 0.1
    expert = torch.randn(p["B"], H, DA, device=dev).to(mdt)
    negs = torch.randn(p["B"], M_NEG, H, DA, device=dev).to(mdt)
    return dict(p=p, model=model, ctx=ctx, pad=pad, expert=expert, negs=negs)


def _runner(i, how):
    p, model, ctx, pad, expert, negs = (i[k] for k in ("p", "model", "ctx", "pad", "expert", "negs"))
    if how == "replicated":
        C = p["C"]
        if p["B"] * C * p["S"] * p["D"] * 4 > REPLICATED_MAX_BYTES:
            return None
        if p["loss"] == "swap":
            def loss_fn():
                return replicated_swap_infonce(model, ctx, pad, expert)[0]
        else:
            def loss_fn():
                return replicated_explicit_infonce(model, ctx, pad, expert, negs)[0]
    else:
        backend = "triton" if how in ("triton", "triton_tiled") else "eager"
        chains = "tiled" if how == "triton_tiled" else "chain"

        def loss_fn():
            with energy_chains(chains):
                if p["loss"] == "swap":
                    return losses.swap_infonce(model, ctx, pad, expert, backend=backend).loss
                return losses.explicit_infonce(model, ctx, pad, expert, negs,
                                               backend=backend).loss

        if how == "compile":
            loss_fn = torch.compile(loss_fn)
    params = list(model.parameters())
    if p["mode"] == "fwd":
        def run():
            with torch.no_grad():
                return loss_fn()
        return run

    def run_bwd():
        for q in params:
            q.grad = None
        loss = loss_fn()
        loss.backward()
        return loss
    return run_bwd
