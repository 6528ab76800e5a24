"""The energy path as two differentiable ``torch.library`` custom ops with registered fakes
(``loss.backward()`` works; ``torch.compile(fullgraph=True)`` traces through them: each op is
one opaque node), and the public function that calls them.

``energy_scores_triton(weights, context, pad_mask, candidates)`` -> energies (B, C), the fused
counterpart of ``energy_scores_reference``: ``energy_train::energy_fwd`` runs the whole model
on every (sample, candidate, step) row (launch.py: 7 Triton launches; chains="tiled": 14) and returns the head's
raw output per row plus the fp32 workspace the backward reads; ``energy_train::energy_bwd``
(11 launches; chains="tiled": 23 and a copy of draw) returns the gradient of the flat parameter tensor (torch.cat's backward hands
each parameter its slice), of the candidates (when they require one) and of the context (when
it requires one). The output transform per step and the mean over the H steps are torch ops on the
(B, C, H) raw outputs. When ``candidates`` is an expanded view with stride 0 over the batch
(``pool.unsqueeze(0).expand(B, ...)``), the C chunks are encoded ONCE and the attention reads
one Q for all samples.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .._utils import check_kernel_dtype, empty, resolve_precision
from ..weights import EnergyWeights, check_weights
from .launch import EnergyShape, energy_backward, energy_forward, energy_layout, energy_plan
from .launch import check_chains, flat_parameters
from .reference import output_transform


def _shape(dims: list, layout: list) -> tuple:
    """(EnergyShape, the plan's layout tuple) from the ops' int / float lists."""
    shape = EnergyShape(*dims[:9])
    sizes, rest = dims[9:12], dims[12:]
    shapes, i = [], 0
    for n in sizes:
        shapes.append(tuple((rest[i + 2 * j], rest[i + 2 * j + 1]) for j in range(n)))
        i += 2 * n
    eps, k = [], 0
    for n in sizes:
        eps.append(tuple(layout[k:k + n]))
        k += n
    return shape, (tuple(shapes), tuple(eps))


def _rows(context: torch.Tensor) -> torch.Tensor:
    """(B, S, D) -> (B*S, D) rows with unit feature stride (a view when the strides allow)."""
    B, S, D = context.shape
    if context.stride(2) == 1 and context.stride(0) == S * context.stride(1):
        return context.as_strided((B * S, D), (context.stride(1), 1))
    return context.reshape(B * S, D).contiguous()


def _plan(context, dims, eps, activation, dtype, needs_dcontext=False, needs_dpool=False):
    shape, layout = _shape(dims, eps)
    return shape, energy_plan(shape, layout, activation, dtype, needs_dcontext, needs_dpool)


@torch.library.custom_op("energy_train::energy_fwd", mutates_args=())
def energy_fwd(context: torch.Tensor, pad: Optional[torch.Tensor], pool: torch.Tensor,
               flat: torch.Tensor, pe: torch.Tensor, dims: list[int], eps: list[float],
               activation: str, precision: str, chains: str) -> tuple[torch.Tensor, torch.Tensor]:
    """context (B, S, D), pad (B, S) bool or None, pool (Bq*C*H, Da), flat parameters, pe (H, E)
    -> raw (B*C*H,) in flat's dtype, ws (fp32: what the backward reads); chains: how the pool
    and the head run (launch.CHAINS: "chain" or "tiled"; the same ws either way)."""
    shape, ep = _plan(context, dims, eps, activation, flat.dtype)
    ws = empty((max(ep.plan.ws, 1),), torch.float32, context.device)
    raw = empty((shape.B * shape.C * shape.H,), flat.dtype, context.device)
    if raw.numel():
        energy_forward(ep, shape, flat, _rows(context), None if pad is None else pad.reshape(-1),
                       pool, pe, raw, ws, precision, chains)
    return raw, ws


@energy_fwd.register_fake
def _energy_fwd_fake(context, pad, pool, flat, pe, dims, eps, activation, precision, chains):
    shape, ep = _plan(context, dims, eps, activation, flat.dtype)
    return (context.new_empty((shape.B * shape.C * shape.H,), dtype=flat.dtype),
            context.new_empty((max(ep.plan.ws, 1),), dtype=torch.float32))


@torch.library.custom_op("energy_train::energy_bwd", mutates_args=())
def energy_bwd(draw: torch.Tensor, context: torch.Tensor, pad: Optional[torch.Tensor],
               pool: torch.Tensor, flat: torch.Tensor, ws: torch.Tensor, dims: list[int],
               eps: list[float], activation: str, precision: str, needs_dcontext: bool,
               needs_dpool: bool, chains: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dflat (flat's layout and dtype), dcontext (B, S, D), dpool (Bq*C*H, Da); an unwanted
    one is a fresh empty (0,) tensor (custom ops return tensors only; fresh: no aliasing)."""
    shape, ep = _plan(context, dims, eps, activation, flat.dtype, needs_dcontext, needs_dpool)
    dflat = empty(flat.shape, flat.dtype, flat.device)
    dctx = empty(context.shape, context.dtype, context.device) if needs_dcontext else None
    dpool = empty(pool.shape, pool.dtype, pool.device) if needs_dpool else None
    if draw.numel():
        energy_backward(ep, shape, flat, _rows(context),
                        None if pad is None else pad.reshape(-1), draw, ws, dflat,
                        None if dctx is None else dctx.view(-1, shape.D), dpool, precision,
                        chains)
    else:
        dflat.zero_()
        for t in (dctx, dpool):
            if t is not None:
                t.zero_()
    none = flat.new_empty((0,))
    return (dflat, dctx if dctx is not None else none,
            dpool if dpool is not None else none.clone())


@energy_bwd.register_fake
def _energy_bwd_fake(draw, context, pad, pool, flat, ws, dims, eps, activation, precision,
                     needs_dcontext, needs_dpool, chains):
    none = flat.new_empty((0,))
    return (torch.empty_like(flat), torch.empty_like(context) if needs_dcontext else none,
            torch.empty_like(pool) if needs_dpool else none.clone())


def _setup(ctx, inputs, output):
    context, pad, pool, flat, pe, dims, eps, activation, precision, chains = inputs
    ctx.save_for_backward(context, pad, pool, flat, output[1])
    ctx.cfg = (dims, eps, activation, precision)
    ctx.chains = chains


def _backward(ctx, draw, dws):
    context, pad, pool, flat, ws = ctx.saved_tensors
    needs_dcontext, needs_dpool = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dflat, dctx, dpool = energy_bwd(draw.contiguous(), context, pad, pool, flat, ws, *ctx.cfg,
                                    needs_dcontext, needs_dpool, ctx.chains)
    return ((dctx if needs_dcontext else None), None, (dpool if needs_dpool else None), dflat,
            None, None, None, None, None, None)


energy_fwd.register_autograd(_backward, setup_context=_setup)


_CHAINS = ["chain"]  # the default of energy_scores_triton's ``chains``: a stack (energy_chains)


@contextlib.contextmanager
def energy_chains(chains: str):
    """``with energy_chains("tiled"): ...``: energy_scores_triton (so every loss with
    backend="triton") runs the pool and the head as ``chains`` inside the block (the choice is
    passed to the custom ops, so the backward runs what the forward ran). For the benchmark's
    ``triton_tiled`` provider and the tests of the variant; the default stays "chain"."""
    _CHAINS.append(check_chains(chains))
    try:
        yield
    finally:
        _CHAINS.pop()


def is_shared_pool(candidates: torch.Tensor) -> bool:
    """True when every sample sees the same candidates (an expand: stride 0 over the batch)."""
    return candidates.shape[0] > 1 and candidates.stride(0) == 0


def energy_scores_triton(w: EnergyWeights, context: torch.Tensor,
                         pad_mask: Optional[torch.Tensor], candidates: torch.Tensor, *,
                         input_precision: Optional[str] = None,
                         chains: Optional[str] = None) -> torch.Tensor:
    """Energies (B, C) of candidates (B, C, H, Da) against context (B, S, D); pad_mask (B, S)
    bool, True = ignore (a padded key contributes nothing: its context row reads as zeros, its
    K/V are never read, its gradient is exactly zero). Shapes are checked by
    ``energy_train.ops.energy_scores``. fp32 models compute on tensor cores with fp32-grade
    products ("tf32x3") unless torch allows TF32 ("tf32") or ``input_precision`` says.
    ``chains``: how the pool and the head run, "chain" (v4) or "tiled" (v5: one tiled launch
    per layer); None: the innermost ``energy_chains(...)`` block's choice, else "chain"."""
    check_weights("weights", w, EnergyWeights)
    B, C, H, Da = candidates.shape
    B, S, D = context.shape
    dt = w.dtype
    check_kernel_dtype("weights", dt)
    check_kernel_dtype("context", context.dtype)
    prec = resolve_precision(input_precision, dt)
    chains = check_chains(chains if chains is not None else _CHAINS[-1])
    pool = candidates[:1] if is_shared_pool(candidates) else candidates  # (Bq, C, H, Da)
    Bq = pool.shape[0]
    shapes, eps = energy_layout(w)
    dims = [B, S, D, Bq, C, H, Da, w.hidden, w.heads, *(len(s) for s in shapes),
            *(d for s in shapes for ab in s for d in ab)]
    flat_eps = [e for es in eps for e in es]
    ep = energy_plan(*_shape(dims, flat_eps), w.state.activation, dt, False, False)
    flat = flat_parameters(w, ep.n_const)
    pe = w.pe[:H].to(dt).contiguous()
    pad = None if pad_mask is None else pad_mask.contiguous()
    raw, _ = energy_fwd(context, pad, pool.reshape(Bq * C * H, Da), flat, pe, dims, flat_eps,
                        w.state.activation, prec, chains)
    # the output transform per step, then the mean over the H steps (the fork's final model)
    return output_transform(raw.view(B, C, H), w.output).mean(dim=-1)
