"""Launchers of the energy path: the cross-attention kernels (fused.py) and the whole energy
forward / backward as a plan of the layer stack (kernels/mlp) around them. op.py wraps
``energy_forward`` / ``energy_backward`` in custom ops.

The plan (``energy_plan``, built once per shape and cached, its tables on the device): three
chains of LN-linear layers and the attention between them, every activation in ONE fp32
workspace ``ws`` (kept for the backward), every backward scratch in ONE ``wb``, the
parameters ONE flat tensor ``P`` (``energy_tensors``' order, then constant ones / zeros):

  context (B*S rows):  state fc1 (K = D) | state block, state fc2, K|V projection (N = 2E)
  pool (Bq*C*H rows):  action fc1 (K = Da), action block, action fc2 (+ pe[h]), Q projection
  attention:           z (B, C*H, E) = softmax(Q K^T / sqrt(dh)) V per head, lse saved
  queries (B*C*H):     out projection, head fc1, head blocks, head fc2 (N = 1) -> raw

Launches, forward (7 Triton + 1 copy of the pool into ws): the context's four layers one tiled
tensor-core launch each (B*S rows: thousands, where the chain launch's 32-row programs are too
few and latency-bound - H200, commit 0a20d77: 11.5 ms with the context as one chain launch),
the pool chain, the attention, the head chain (a few hundred rows: one chain launch each).
With ``chains="tiled"`` (v5, an option: ``CHAINS``) the pool's 4 and the head's 5 layers are
one tiled launch each too (small row tiles, many programs): 14 forward, 23 backward launches.
Backward (11): the head chain (-> dz), attention dQ and dK|V, the pool chain, the context
(per layer a tiled dx GEMM, and for the LayerNorm layers a row pass: K|V's and fc2's and the
block's; fc1's dx only when the context needs a gradient), every weight gradient (one
launch), the dgamma/dbeta sums. Nothing is recomputed: the forward saves every layer's input
statistics and pre-activation (ws is about 7 x B*S*E fp32 at the context side).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

from .._utils import TL_DTYPES, dot_precision, empty, upcast_dot
from ..mlp.fused import STACK_COLS
from ..mlp.launch import (EXTERNAL, NONE, X_IN, StackLayer, StackPlan, constants, mlp_layers,
                          mlp_tensors, new_plan, stack_backward, stack_backward_tiled,
                          stack_forward, stack_forward_tiled, stack_weight_grads)
from ..weights import EnergyWeights
from .configs import attn_config
from .fused import (_energy_attention_bwd_dkdv_kernel, _energy_attention_bwd_dq_kernel,
                    _energy_attention_fwd_kernel)

LOG2E = 1.4426950408889634
PE_COL = STACK_COLS["PE"]


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def _dot_kw(dtype: torch.dtype, precision: str) -> dict:
    return dict(DOT_DTYPE=TL_DTYPES[dtype], UPCAST=upcast_dot(dtype),
                PREC=dot_precision(dtype, precision))


def _pad_bytes(pad):
    return None if pad is None else pad.view(torch.uint8)


def attention_fwd(q, kv, pad, out, lse, heads: int, dtype: torch.dtype, precision: str) -> None:
    """q (Bq, Q, E), kv (B, S, 2E) = K | V (read in place), pad (B, S) bool or None -> out
    (B, Q, E), lse (B, heads, Q) fp32 in log2 units (+inf: no valid key); the products in
    ``dtype`` (the model's), fp32 accumulation."""
    B, S, E2 = kv.shape
    E = E2 // 2
    Bq, Q, _ = q.shape
    dh = E // heads
    k, v = kv[..., :E], kv[..., E:]
    cfg = attn_config(dh, dtype, dot_precision(dtype, precision))
    c = cfg["fwd"]
    _energy_attention_fwd_kernel[(triton.cdiv(Q, c["BLOCK_M"]), B * heads)](
        q, k, v, _pad_bytes(pad), out, lse,
        q.stride(0) if Bq > 1 else 0, q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), pad.stride(0) if pad is not None else 0, out.stride(0), out.stride(1),
        heads, Q, S, dh, LOG2E / math.sqrt(dh), **_dot_kw(dtype, precision),
        BLOCK_D=cfg["BLOCK_D"], **c)


def attention_bwd(dout, q, kv, pad, out, lse, dq, dkv, heads: int, dtype: torch.dtype,
                  precision: str) -> None:
    """-> dq (Bq, Q, E) (with Bq = 1 summed over samples), dkv (B, S, 2E), written in place."""
    B, S, E2 = kv.shape
    E = E2 // 2
    Bq, Q, _ = q.shape
    dh = E // heads
    k, v = kv[..., :E], kv[..., E:]
    dk, dv = dkv[..., :E], dkv[..., E:]
    cfg = attn_config(dh, dtype, dot_precision(dtype, precision))
    shared = Bq == 1 and B > 1
    pad_sb = pad.stride(0) if pad is not None else 0
    q_sb = q.stride(0) if Bq > 1 else 0
    common = dict(**_dot_kw(dtype, precision), BLOCK_D=cfg["BLOCK_D"])
    qk_scale, sm_scale = LOG2E / math.sqrt(dh), 1.0 / math.sqrt(dh)
    _energy_attention_bwd_dq_kernel[(triton.cdiv(Q, cfg["dq"]["BLOCK_M"]),
                                     heads if shared else B * heads)](
        q, k, v, _pad_bytes(pad), out, dout, lse, dq,
        q_sb, q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pad_sb,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        B, heads, Q, S, dh, qk_scale, sm_scale, SHARED_Q=shared, **cfg["dq"], **common)
    _energy_attention_bwd_dkdv_kernel[(triton.cdiv(S, cfg["dkdv"]["BLOCK_N"]), B * heads)](
        q, k, v, _pad_bytes(pad), out, dout, lse, dk, dv,
        q_sb, q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pad_sb,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), heads, Q, S, dh, qk_scale, sm_scale, **cfg["dkdv"],
        **common)


# --------------------------------------------------------------------------------------------
# the energy model as a plan of the layer stack
# --------------------------------------------------------------------------------------------
def energy_tensors(w: EnergyWeights) -> list:
    """The model's parameters in the flat layout's order: the state, action and head
    MLPResNets (``mlp_tensors``), in_proj_weight, in_proj_bias, out_proj_weight,
    out_proj_bias."""
    return (mlp_tensors(w.state) + mlp_tensors(w.action) + mlp_tensors(w.head)
            + [w.in_proj_weight, w.in_proj_bias, w.out_proj_weight, w.out_proj_bias])


def energy_layout(w: EnergyWeights) -> tuple:
    """(w_shapes of state, action, head (each ((N, K), ...)), eps of each): what the plan needs
    of the weights, hashable."""
    mlps = (w.state, w.action, w.head)
    return (tuple(tuple(tuple(l.weight.shape) for l in m.layers) for m in mlps),
            tuple(tuple(float(l.ln_eps) for l in m.layers) for m in mlps))


@dataclass(frozen=True)
class EnergyShape:
    B: int      # samples
    S: int      # context keys
    D: int      # context features
    Bq: int     # candidate pools: B, or 1 (shared by every sample)
    C: int      # candidates
    H: int      # chunk steps
    Da: int     # action dims
    E: int      # hidden
    heads: int


@dataclass
class EnergyPlan:
    plan: StackPlan
    ctx: tuple          # (first, last) layer indices of the context chain
    pool: tuple
    head: tuple
    pool_in: int        # ws offset of the pool rows (fp32 copy)
    kv: int             # ws offset of K|V (B*S, 2E)
    q: int              # ws offset of Q (Bq*C*H, E)
    z: int              # ws offset of the attention output (B*C*H, E)
    lse: int            # ws offset of lse (B, heads, C*H)
    dz: int             # wb offsets of dz, dq, dkv
    dq: int
    dkv: int
    n_params: int       # flat parameter count before the constants
    n_const: int


@lru_cache(maxsize=64)
def energy_plan(shape: EnergyShape, layout: tuple, activation: str, dtype: torch.dtype,
                needs_dcontext: bool, needs_dpool: bool) -> EnergyPlan:
    """The plan of one energy forward/backward at these shapes (module docstring). The
    forward layout (ws) does not depend on the ``needs_*`` flags."""
    s = shape
    E = s.E
    (sh_state, sh_action, sh_head), (eps_state, eps_action, eps_head) = layout
    state, off = mlp_layers(sh_state, 0, eps_state, activation)
    action, off = mlp_layers(sh_action, off, eps_action, activation)
    head, off = mlp_layers(sh_head, off, eps_head, activation)
    in_w, in_b = off, off + 3 * E * E
    out_w = in_b + 3 * E
    out_b = out_w + E * E
    n_params = out_b + E
    n_const = max(s.D, s.Da, 3 * E)
    plan = new_plan(dtype, ones=n_params, zeros=n_params + n_const)
    R, Mq, Mh = s.B * s.S, s.Bq * s.C * s.H, s.B * s.C * s.H
    # context: state MLPResNet, then the K|V projection (rows E:3E of in_proj)
    dkv = plan.alloc_wb(R * 2 * E)
    kv_layer = StackLayer(E, 2 * E, in_w + E * E, in_b + E, ln=False)
    c0, c1, kv = plan.add_chain(R, state + [kv_layer], X_IN, dkv,
                                EXTERNAL if needs_dcontext else NONE)
    # pool: action MLPResNet (+ pe after fc2), then the Q projection (rows 0:E)
    pool_in = plan.alloc_ws(Mq * s.Da)
    dq = plan.alloc_wb(Mq * E)
    action[-1] = dataclasses.replace(action[-1], pe=True)
    q_layer = StackLayer(E, E, in_w, in_b, ln=False)
    p0, p1, q = plan.add_chain(Mq, action + [q_layer], pool_in, dq,
                               EXTERNAL if needs_dpool else NONE)
    # attention, then the head on every (sample, candidate, step) row
    z = plan.alloc_ws(Mh * E)
    lse = plan.alloc_ws(s.B * s.heads * s.C * s.H)
    dz = plan.alloc_wb(Mh * E)
    out_layer = StackLayer(E, E, out_w, out_b, ln=False)
    h0, h1, _ = plan.add_chain(Mh, [out_layer] + head, z, EXTERNAL, dz, out=EXTERNAL)
    return EnergyPlan(plan, (c0, c1), (p0, p1), (h0, h1), pool_in, kv, q, z, lse, dz, dq, dkv,
                      n_params, n_const)


def flat_parameters(w: EnergyWeights, n_const: int) -> torch.Tensor:
    """The flat parameter tensor P (differentiable: torch.cat's backward splits the gradient)."""
    return torch.cat([t.reshape(-1) for t in energy_tensors(w)]
                     + [constants(n_const, w.dtype, w.in_proj_weight.device)])


def _views(ep: EnergyPlan, s: EnergyShape, ws, wb=None):
    CH = s.C * s.H
    v = dict(kv=ws[ep.kv: ep.kv + s.B * s.S * 2 * s.E].view(s.B, s.S, 2 * s.E),
             q=ws[ep.q: ep.q + s.Bq * CH * s.E].view(s.Bq, CH, s.E),
             z=ws[ep.z: ep.z + s.B * CH * s.E].view(s.B, CH, s.E),
             lse=ws[ep.lse: ep.lse + s.B * s.heads * CH].view(s.B, s.heads, CH))
    if wb is not None:
        v.update(dz=wb[ep.dz: ep.dz + s.B * CH * s.E].view(s.B, CH, s.E),
                 dq=wb[ep.dq: ep.dq + s.Bq * CH * s.E].view(s.Bq, CH, s.E),
                 dkv=wb[ep.dkv: ep.dkv + s.B * s.S * 2 * s.E].view(s.B, s.S, 2 * s.E))
    return v


#: how the pool's and the head's layer stacks run: "chain" (one chain launch per pass, each
#: program its rows through every layer: v4, the default) or "tiled" (v5: every layer its own
#: tiled launch, small row tiles - ``stack_forward_tiled`` / ``stack_backward_tiled`` with the
#: "tiled_head" / "tiled_pool" / "dx_head" / "dx_pool" configs). Both read and write the same
#: plan (ws, wb): only the launches differ.
CHAINS = ("chain", "tiled")


def check_chains(chains: str) -> str:
    if chains not in CHAINS:
        raise ValueError(f"chains must be one of {CHAINS}, got {chains!r}")
    return chains


def energy_forward(ep: EnergyPlan, s: EnergyShape, P, context, pad, pool, pe, raw, ws,
                   precision: str, chains: str = "chain") -> None:
    """Fill ws and raw (B*C*H,) (the head's output per (sample, candidate, step)).
    context (B*S, D) rows, unit feature stride; pad (B*S,) bool or None; pool (Bq*C*H, Da);
    chains: ``CHAINS``."""
    check_chains(chains)
    plan, dt = ep.plan, P.dtype
    R, Mq, Mh = s.B * s.S, s.Bq * s.C * s.H, s.B * s.C * s.H
    v = _views(ep, s, ws)
    c0, c1 = ep.ctx
    stack_forward_tiled(plan, P, ws, c0, R, X=context, pad=pad, precision=precision)
    for layer in range(c0 + 1, c1 + 1):
        stack_forward_tiled(plan, P, ws, layer, R, precision=precision)
    ws[ep.pool_in: ep.pool_in + Mq * s.Da].view(Mq, s.Da).copy_(pool)
    if chains == "tiled":
        p0, p1 = ep.pool
        for layer in range(p0, p1 + 1):
            stack_forward_tiled(plan, P, ws, layer, Mq, pe=pe if plan.rows[layer][PE_COL] else None,
                                precision=precision, kind="tiled_pool")
    else:
        stack_forward(plan, P, ws, *ep.pool, Mq, pe=pe, precision=precision)
    attention_fwd(v["q"], v["kv"], None if pad is None else pad.view(s.B, s.S), v["z"], v["lse"],
                  s.heads, dt, precision)
    if chains == "tiled":
        h0, h1 = ep.head
        for layer in range(h0, h1 + 1):
            stack_forward_tiled(plan, P, ws, layer, Mh, out=raw if layer == h1 else None,
                                precision=precision, kind="tiled_head")
    else:
        stack_forward(plan, P, ws, *ep.head, Mh, out=raw, precision=precision)


def energy_backward(ep: EnergyPlan, s: EnergyShape, P, context, pad, draw, ws, grad,
                    dcontext, dpool, precision: str, chains: str = "chain") -> None:
    """Fill grad (P's layout; the constants' entries unwritten) and, when given, dcontext
    (B*S, D) and dpool (Bq*C*H, Da), from draw (B*C*H,); chains: ``CHAINS``."""
    check_chains(chains)
    plan, dt = ep.plan, P.dtype
    R, Mq, Mh = s.B * s.S, s.Bq * s.C * s.H, s.B * s.C * s.H
    wb = empty((max(plan.wb, 1),), torch.float32, P.device)
    v = _views(ep, s, ws, wb)
    pad2 = None if pad is None else pad.view(s.B, s.S)
    if chains == "tiled":
        stack_backward_tiled(plan, P, ws, wb, *ep.head, Mh, dy=draw, precision=precision,
                             kind="dx_head")
    else:
        stack_backward(plan, P, ws, wb, *ep.head, Mh, dy=draw, precision=precision)
    attention_bwd(v["dz"], v["q"], v["kv"], pad2, v["z"], v["lse"], v["dq"], v["dkv"], s.heads,
                  dt, precision)
    if chains == "tiled":
        stack_backward_tiled(plan, P, ws, wb, *ep.pool, Mq, dx=dpool, precision=precision,
                             kind="dx_pool")
    else:
        stack_backward(plan, P, ws, wb, *ep.pool, Mq, dx=dpool, precision=precision)
    stack_backward_tiled(plan, P, ws, wb, *ep.ctx, R,
                         X=context if dcontext is not None else None, pad=pad, dx=dcontext,
                         precision=precision)
    stack_weight_grads(plan, P, ws, wb, grad, X=context, pad=pad, precision=precision)
