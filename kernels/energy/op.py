"""The energy path as differentiable ``torch.library`` custom ops with registered fakes and
autograd (``loss.backward()`` works; ``torch.compile(fullgraph=True)`` traces through them), and
the public functions that compose them.

``energy_scores_triton(weights, context, pad_mask, candidates)`` -> energies (B, C), the fused
counterpart of ``energy_scores_reference``. Differentiable w.r.t. every weight, the candidates
(when they require grad) and the context (when it requires grad). Pipeline (E = hidden,
Q = C*H queries per sample):
  context (B, S, D) -> state encoder -> one K|V projection (B, S, 2E)   once per sample
                       (``context_kv``: one op that recomputes its activations in the backward)
  candidates -> action encoder -> + positional table -> Q projection (Bq, Q, E)
  cross-attention (``energy_attention``: flash-style, K/V read in place for all C candidates)
  out projection -> prediction head -> mean over H -> output transform -> (B, C)
Every Linear is the fused ``ln_linear`` (kernels/mlp). When ``candidates`` is an expanded view
with stride 0 over the batch (``pool.unsqueeze(0).expand(B, ...)``), the C chunks are encoded
ONCE (Bq = 1) and the attention kernels read one Q for all samples.

Custom ops: ``energy_train::energy_attention_fwd/_bwd`` and ``energy_train::context_kv_fwd/_bwd``.
Not triton_op: its automatic fake re-runs the launcher on fake tensors, which under the
interpreter reaches the data pointers; with custom_op, inductor calls each op as one opaque
kernel-launching node (no graph break either).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._utils import check_kernel_dtype, resolve_precision
from ..mlp.op import ln_linear_autograd, mlp_resnet
from ..weights import EnergyWeights, check_weights
from . import launch
from .reference import output_transform


def _last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("energy_train::energy_attention_fwd", mutates_args=())
def energy_attention_fwd(q: torch.Tensor, kv: torch.Tensor, pad: Optional[torch.Tensor],
                         heads: int, input_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, Q, E) (q.dtype), lse (B, heads, Q) fp32 in log2 units (+inf: no valid key)."""
    return launch.attention_fwd(q, kv, pad, heads, input_precision)


@energy_attention_fwd.register_fake
def _energy_attention_fwd_fake(q, kv, pad, heads, input_precision):
    B, S, E, Bq, Q, dh = launch.attention_dims(q, kv, heads)
    return q.new_empty((B, Q, E)), q.new_empty((B, heads, Q), dtype=torch.float32)


@torch.library.custom_op("energy_train::energy_attention_bwd", mutates_args=())
def energy_attention_bwd(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                         pad: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                         heads: int, input_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dq (Bq, Q, E), dkv (B, S, 2E); with Bq = 1 dq is summed over samples."""
    return launch.attention_bwd(dout, q, kv, pad, out, lse, heads, input_precision)


@energy_attention_bwd.register_fake
def _energy_attention_bwd_fake(dout, q, kv, pad, out, lse, heads, input_precision):
    B, S, E, Bq, Q, dh = launch.attention_dims(q, kv, heads)
    return q.new_empty((Bq, Q, E)), kv.new_empty((B, S, 2 * E))


def _attention_setup_context(ctx, inputs, output):
    q, kv, pad, heads, input_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, pad, out, lse)
    ctx.heads, ctx.input_precision = heads, input_precision


def _attention_backward(ctx, dout, dlse):
    q, kv, pad, out, lse = ctx.saved_tensors
    dq, dkv = energy_attention_bwd(_last_unit(dout), q, kv, pad, out, lse, ctx.heads,
                                   ctx.input_precision)
    return dq, dkv, None, None, None


energy_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def energy_attention(q: torch.Tensor, kv: torch.Tensor, pad_mask: Optional[torch.Tensor],
                     heads: int, input_precision: Optional[str] = None) -> torch.Tensor:
    """Differentiable masked cross-attention: q (1 or B, Q, E), kv (B, S, 2E) = K | V, pad_mask
    (B, S) bool (True = ignore) or None -> (B, Q, E). A padded key is never read."""
    if kv.dim() != 3 or kv.shape[2] % 2:
        raise ValueError(f"kv: expected (B, S, 2E) (K | V), got {tuple(kv.shape)}")
    B, S, E = kv.shape[0], kv.shape[1], kv.shape[2] // 2
    if q.dim() != 3 or q.shape[0] not in (1, B) or q.shape[2] != E:
        raise ValueError(f"q: expected (1 or {B}, Q, {E}), got {tuple(q.shape)}")
    if E % heads:
        raise ValueError(f"heads: expected a divisor of {E}, got {heads}")
    if q.dtype != kv.dtype:
        raise TypeError(f"q, kv: expected one dtype, got {q.dtype}, {kv.dtype}")
    input_precision = resolve_precision(input_precision, q.dtype)
    pad = None
    if pad_mask is not None:
        if pad_mask.shape != (B, S) or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask: expected bool ({B}, {S}), got {pad_mask.dtype} "
                             f"{tuple(pad_mask.shape)}")
        pad = _last_unit(pad_mask)  # bool; the kernels' uint8 view is taken inside the op
    out, _ = energy_attention_fwd(_last_unit(q), _last_unit(kv), pad, heads, input_precision)
    return out


# --------------------------------------------------------------------------------------------
# the context encoder (recomputed in the backward)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("energy_train::context_kv_fwd", mutates_args=())
def context_kv_fwd(context: torch.Tensor, pad: Optional[torch.Tensor], params: list[torch.Tensor],
                   eps: list[float], activation: str, input_precision: str, chunk_rows: int
                   ) -> torch.Tensor:
    """context (B, S, D) -> kv (B, S, 2E) in the parameters' dtype; nothing kept."""
    return launch.context_kv_fwd(context, pad, params, eps, activation, input_precision,
                                 chunk_rows)


@context_kv_fwd.register_fake
def _context_kv_fwd_fake(context, pad, params, eps, activation, input_precision, chunk_rows):
    B, S, _ = context.shape
    return context.new_empty((B, S, params[-2].shape[0]), dtype=params[-2].dtype)


@torch.library.custom_op("energy_train::context_kv_bwd", mutates_args=())
def context_kv_bwd(dkv: torch.Tensor, context: torch.Tensor, pad: Optional[torch.Tensor],
                   params: list[torch.Tensor], eps: list[float], activation: str,
                   input_precision: str, chunk_rows: int, needs_dcontext: bool
                   ) -> list[torch.Tensor]:
    """-> [dcontext (B, S, D)] + [one gradient per parameter]; an absent one is a fresh empty
    (0,) tensor (custom ops return tensors only; fresh: no aliasing)."""
    grads = launch.context_kv_bwd(dkv, context, pad, params, eps, activation, input_precision,
                                  chunk_rows, needs_dcontext)
    return [g if g is not None else context.new_empty((0,)) for g in grads]


@context_kv_bwd.register_fake
def _context_kv_bwd_fake(dkv, context, pad, params, eps, activation, input_precision, chunk_rows,
                         needs_dcontext):
    first = torch.empty_like(context) if needs_dcontext else context.new_empty((0,))
    return [first] + [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


def _context_setup_context(ctx, inputs, output):
    context, pad, params, eps, activation, prec, chunk_rows = inputs
    ctx.save_for_backward(context, pad, *params)
    ctx.cfg = (eps, activation, prec, chunk_rows)


def _context_backward(ctx, dkv):
    context, pad, *params = ctx.saved_tensors
    needs_dctx = ctx.needs_input_grad[0]
    grads = context_kv_bwd(dkv.contiguous(), context, pad, params, *ctx.cfg, needs_dctx)
    dparams = [g if p.numel() else None for g, p in zip(grads[1:], params)]
    return (grads[0] if needs_dctx else None), None, dparams, None, None, None, None


context_kv_fwd.register_autograd(_context_backward, setup_context=_context_setup_context)


def context_kv(w: EnergyWeights, context: torch.Tensor, pad_mask: Optional[torch.Tensor],
               input_precision: str, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """kv (B, S, 2E) of the context (B, S, D) through the state encoder and the K|V projection,
    differentiable w.r.t. every weight and the context; padded rows contribute nothing."""
    B, S, _ = context.shape
    E = w.hidden
    rows = chunk_rows if chunk_rows is not None else launch.default_chunk_rows(B * S)
    params = w.state.flat() + [w.in_proj_weight[E:], w.in_proj_bias[E:]]
    return context_kv_fwd(context, pad_mask, params, w.state.eps(), w.state.activation,
                          input_precision, int(rows))


# --------------------------------------------------------------------------------------------
# the whole scoring
# --------------------------------------------------------------------------------------------
def is_shared_pool(candidates: torch.Tensor) -> bool:
    """True when every sample sees the same candidates (an expand: stride 0 over the batch)."""
    return candidates.shape[0] > 1 and candidates.stride(0) == 0


def energy_scores_triton(w: EnergyWeights, context: torch.Tensor,
                         pad_mask: Optional[torch.Tensor], candidates: torch.Tensor, *,
                         input_precision: Optional[str] = None, recompute_context: bool = True,
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Energies (B, C) of candidates (B, C, H, Da) against context (B, S, D); pad_mask (B, S)
    bool, True = ignore (a padded key contributes nothing: its context row is replaced by zeros,
    its K/V never read). Shapes are checked by ``energy_train.ops.energy_scores``.

    ``recompute_context`` (default): the context encoder keeps no activation for the backward
    and recomputes it there, by row chunks of ``chunk_rows`` (~3% more FLOPs, 2.5x K|V less
    memory saved); False: one autograd op per Linear, which saves every layer's input."""
    check_weights("weights", w, EnergyWeights)
    B, C, H, Da = candidates.shape
    E, heads, dt = w.hidden, w.heads, w.dtype
    check_kernel_dtype("weights", dt)
    check_kernel_dtype("context", context.dtype)
    prec = resolve_precision(input_precision, dt)
    pool = candidates[:1] if is_shared_pool(candidates) else candidates  # (Bq, C, H, Da)
    Bq = pool.shape[0]
    W, b = w.in_proj_weight, w.in_proj_bias
    # the context is read in its own dtype and rounded to the model's inside the first GEMM
    if recompute_context:
        kv = context_kv(w, context, pad_mask, prec, chunk_rows)             # (B, S, 2E): K | V
    else:
        x = context if pad_mask is None else context.masked_fill(pad_mask[:, :, None], 0)
        kv = ln_linear_autograd(mlp_resnet(x, w.state, prec), W[E:], b[E:], input_precision=prec)
    pe = w.pe[:H].to(dt).expand(Bq * C, H, E)                           # added in fc2's epilogue
    a = mlp_resnet(pool.to(dt).reshape(Bq * C, H, Da), w.action, prec, residual=pe)
    q = ln_linear_autograd(a, W[:E], b[:E], input_precision=prec).reshape(Bq, C * H, E)
    z = energy_attention(q, kv, pad_mask, heads, prec)                      # (B, C*H, E)
    z = ln_linear_autograd(z, w.out_proj_weight, w.out_proj_bias, input_precision=prec)
    raw = mlp_resnet(z, w.head, prec).reshape(B, C, H)                      # per step
    return output_transform(raw, w.output).mean(dim=-1)                    # transform, then mean
