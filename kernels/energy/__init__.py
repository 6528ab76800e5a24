"""Fused energy scoring: many candidates against a context encoded once (issue 5).

``energy_scores_triton(model, context, pad_mask, candidates)`` -> energies (B, C), the
Triton path behind ``energy_train.ops.energy_scores(..., backend="triton")``. Differentiable
w.r.t. every energy-model parameter, the candidates (when they require grad) and the context
(when it requires grad; the trainer detaches it, so then nothing is computed for it).

Pipeline (E = hidden, Q = C*H queries per sample):
  context (B, S, D) -> state encoder MLPResNet -> one K|V projection (B, S, 2E)   once per sample
                       (one op that recomputes its activations in the backward: context.py)
  candidates -> action encoder MLPResNet -> + positional table -> Q projection (Bq, Q, E)
  cross-attention (Triton, flash-style, K/V read in place for all C candidates) -> (B, Q, E)
  out projection -> prediction head MLPResNet -> mean over H -> output transform -> (B, C)

Shared candidate pool: when ``candidates`` is an expanded view with stride 0 over the batch
(``pool.unsqueeze(0).expand(B, ...)``, what ``losses.swap_infonce`` passes), the C chunks are
encoded ONCE (Bq = 1) instead of B times, and the attention kernels read one Q for all samples.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..mlp.backward import ln_linear_autograd
from . import context as _context
from .attention import default_precision, energy_attention  # noqa: F401

__all__ = ["energy_scores_triton", "energy_attention", "is_shared_pool"]


def is_shared_pool(candidates: torch.Tensor) -> bool:
    """True when every sample sees the same candidates (an expand: stride 0 over the batch)."""
    return candidates.shape[0] > 1 and candidates.stride(0) == 0


def _linear(x, fc, ln=None, activation="none", residual=None, prec="ieee"):
    """act(ln(x) @ fc.W^T + fc.b) [+ residual] through the fused Triton block (fwd and bwd)."""
    if ln is None:
        return ln_linear_autograd(x, fc.weight, fc.bias, residual=residual, input_precision=prec)
    return ln_linear_autograd(x, fc.weight, fc.bias, ln_weight=ln.weight, ln_bias=ln.bias,
                              ln_eps=ln.eps, normalize=True, activation=activation,
                              residual=residual, input_precision=prec)


def _mlp_resnet(m, x: torch.Tensor, prec: str, residual=None) -> torch.Tensor:
    """MLPResNet: ln1 -> fc1 -> act -> blocks (x + act(fc(ln x))) -> ln2 -> fc2 [+ residual],
    one LN-prologue GEMM per Linear."""
    x = _linear(x, m.fc1, m.layer_norm1, m.activation, prec=prec)
    for block in m.mlp_resnet_blocks:
        x = _linear(x, block.ffn[1], block.ffn[0], m.activation, residual=x, prec=prec)
    return _linear(x, m.fc2, m.layer_norm2, residual=residual, prec=prec)


def _output_transform(raw: torch.Tensor, output: str) -> torch.Tensor:
    if output == "unbounded":
        return raw
    if output == "sigmoid":
        return torch.sigmoid(0.5 * raw) * 2 + 0.1
    if output == "softplus":
        return F.softplus(raw) + 1e-6
    raise ValueError(f"output: unknown transform {output!r}")


def energy_scores_triton(model, context: torch.Tensor, pad_mask: Optional[torch.Tensor],
                         candidates: torch.Tensor, *,
                         input_precision: Optional[str] = None,
                         recompute_context: bool = True,
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Energies (B, C) of candidates (B, C, H, Da) against context (B, S, D); pad_mask (B, S)
    bool, True = ignore. Inputs are checked by ops.energy_scores (model.check_inputs).

    ``recompute_context`` (default): the context encoder keeps no activation for the backward
    and recomputes it there, by row chunks of ``chunk_rows`` (kernels/energy/context.py; ~3%
    more FLOPs, 2.5x K|V less memory saved); False: one autograd op per Linear, which saves
    every layer's input."""
    B, C, H, Da = candidates.shape
    E, heads, dt = model.hidden, model.heads, model.dtype
    kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if dt not in kernel_dtypes:
        raise TypeError(f"energy_model: the Triton path expects parameters in {kernel_dtypes}, "
                        f"got {dt}; use backend='eager'")
    if context.dtype not in kernel_dtypes:
        raise TypeError(f"context: the Triton path expects a dtype in {kernel_dtypes}, got "
                        f"{context.dtype}; use backend='eager'")
    if input_precision is None:
        input_precision = default_precision(dt)
    pool = candidates[:1] if is_shared_pool(candidates) else candidates  # (Bq, C, H, Da)
    Bq = pool.shape[0]

    prec = input_precision
    w, bias = model.cross.in_proj_weight, model.cross.in_proj_bias
    # the context is read in its own dtype and rounded to the model's inside the first GEMM
    if recompute_context and _context.supported(model):
        kv = _context.context_kv(model, context, prec, chunk_rows)      # (B, S, 2E): K | V
    else:
        c = _mlp_resnet(model.state_linear, context, prec)              # (B, S, E)
        kv = ln_linear_autograd(c, w[E:], bias[E:], input_precision=prec)

    pe = model.pe_layer.P[:H].to(dt).expand(Bq * C, H, E)               # added in fc2's epilogue
    a = _mlp_resnet(model.action_linear, pool.to(dt).reshape(Bq * C, H, Da), prec, residual=pe)
    q = ln_linear_autograd(a, w[:E], bias[:E], input_precision=prec).reshape(Bq, C * H, E)

    z = energy_attention(q, kv, pad_mask, heads, prec)                  # (B, C*H, E)
    z = _linear(z, model.cross.out_proj, prec=prec)
    raw = _mlp_resnet(model.prediction_head, z, prec).reshape(B, C, H).mean(dim=-1)
    return _output_transform(raw, model.output)
