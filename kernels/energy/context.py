"""The context encoder as ONE differentiable op that keeps no activation for its backward.

``context_kv(model, context, input_precision, chunk_rows=None)`` -> kv (B, S, 2E): the state
encoder MLPResNet (ln1 -> fc1 -> act -> blocks -> ln2 -> fc2) and the K|V projection of
``model.cross``, every Linear the fused ``ln_linear`` kernel.

Memory (issue 5: peak <= 1.2x the encoded context K|V). The plain composition of autograd ops
saves, per context row, the fc1 output, the block output and the fc2 output (3 x E, beside the
2 x E of K|V itself): 2.5x K|V saved after the forward. This op saves only its inputs (the
context, which the caller holds anyway, and the parameters), and:
  forward   rows in chunks of ``chunk_rows`` through the whole encoder, each chunk's K|V written
            into the one (B*S, 2E) output; transient memory is one chunk's activations;
  backward  per chunk: the forward is recomputed (fc1 and block GEMMs write their fp32
            PRE-activations, which their backward needs anyway and the activation is applied in
            torch; fc2 is the only GEMM run again), then the backward of K|V, fc2, blocks, fc1
            (``ln_linear_backward``), parameter gradients summed over chunks in fp32.
Extra compute vs keeping the activations: the fc2 GEMM once more (2*B*S*E^2 FLOPs, ~3% of the
fwd+bwd at B=8, S=600, D=4096, E=512) plus the LayerNorm statistics passes; the
pre-activations of fc1 and the blocks were already recomputed by ``ln_linear``'s backward.
Registered like the other ops (custom_op + fake + autograd): torch.compile traces it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mlp import ln_linear
from ..mlp.backward import ln_linear_backward

_ACT = {"none": lambda h: h, "relu": F.relu, "silu": F.silu}


def encoder_params(model) -> list:
    """[ln1.w, ln1.b, fc1.w, fc1.b, (block ln.w, ln.b, fc.w, fc.b) x blocks, ln2.w, ln2.b, fc2.w,
    fc2.b, W_kv, b_kv] of the state encoder and the K|V projection (W_kv: in_proj_weight[E:])."""
    m, E = model.state_linear, model.hidden
    ps = [m.layer_norm1.weight, m.layer_norm1.bias, m.fc1.weight, m.fc1.bias]
    for blk in m.mlp_resnet_blocks:
        ps += [blk.ffn[0].weight, blk.ffn[0].bias, blk.ffn[1].weight, blk.ffn[1].bias]
    ps += [m.layer_norm2.weight, m.layer_norm2.bias, m.fc2.weight, m.fc2.bias,
           model.cross.in_proj_weight[E:], model.cross.in_proj_bias[E:]]
    return ps


def supported(model) -> bool:
    """Every LayerNorm with affine weight and bias and one shared eps (the EnergyModel's)."""
    m = model.state_linear
    lns = [m.layer_norm1, m.layer_norm2] + [blk.ffn[0] for blk in m.mlp_resnet_blocks]
    return all(ln.weight is not None and ln.bias is not None and ln.eps == lns[0].eps
               for ln in lns) and m.fc1.bias is not None


def _layers(params, num_blocks):
    """-> [(ln_w, ln_b, W, b, activation?, residual?)] for fc1, blocks, fc2."""
    layers = [(params[0], params[1], params[2], params[3], True, False)]
    for i in range(num_blocks):
        g, be, w, b = params[4 + 4 * i: 8 + 4 * i]
        layers.append((g, be, w, b, True, True))
    layers.append((params[-6], params[-5], params[-4], params[-3], False, False))
    return layers


def default_chunk_rows(rows: int) -> int:
    """An eighth of the rows (multiple of 64, at least 256): one chunk's activations stay well
    below K|V. To tune on a GPU: fewer rows per GEMM means fewer output tiles per launch."""
    return max(256, -(-rows // 8 // 64) * 64)


@torch.library.custom_op("energy_train::context_kv_fwd", mutates_args=())
def context_kv_fwd(context: torch.Tensor, params: list[torch.Tensor], num_blocks: int,
                   activation: str, eps: float, input_precision: str, chunk_rows: int
                   ) -> torch.Tensor:
    """context (B, S, D) -> kv (B, S, 2E) in the parameters' dtype; nothing kept."""
    B, S, D = context.shape
    x = context.reshape(B * S, D)
    kv = torch.empty((B * S, params[-2].shape[0]), dtype=params[-2].dtype, device=context.device)
    for r0 in range(0, B * S, chunk_rows):
        h = x[r0:r0 + chunk_rows]
        for g, be, w, b, act, res in _layers(params, num_blocks):
            h = ln_linear(h, w, b, ln_weight=g, ln_bias=be, ln_eps=eps, normalize=True,
                          activation=activation if act else "none", residual=h if res else None,
                          input_precision=input_precision)
        ln_linear(h, params[-2], params[-1], out=kv[r0:r0 + chunk_rows],
                  input_precision=input_precision)
    return kv.reshape(B, S, -1)


@context_kv_fwd.register_fake
def _context_kv_fwd_fake(context, params, num_blocks, activation, eps, input_precision,
                         chunk_rows):
    B, S, _ = context.shape
    return context.new_empty((B, S, params[-2].shape[0]), dtype=params[-2].dtype)


@torch.library.custom_op("energy_train::context_kv_bwd", mutates_args=())
def context_kv_bwd(dkv: torch.Tensor, context: torch.Tensor, params: list[torch.Tensor],
                   num_blocks: int, activation: str, eps: float, input_precision: str,
                   chunk_rows: int, needs_dcontext: bool) -> list[torch.Tensor]:
    """-> [dcontext (B, S, D) or an empty (0,) tensor] + [one gradient per parameter]."""
    B, S, D = context.shape
    x = context.reshape(B * S, D)
    dkv2 = dkv.reshape(B * S, -1)
    fn = _ACT[activation]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    dctx = torch.empty_like(x) if needs_dcontext else None
    layers = _layers(params, num_blocks)
    prec = dict(input_precision=input_precision)
    for r0 in range(0, B * S, chunk_rows):
        h = x[r0:r0 + chunk_rows]
        saved = []  # per layer: (input, mean, rstd, fp32 pre-activation or None)
        for g, be, w, b, act, res in layers:
            use_act = act and activation != "none"
            pre, mean, rstd = ln_linear(h, w, b, ln_weight=g, ln_bias=be, ln_eps=eps,
                                        normalize=True, return_stats=True, **prec,
                                        out_dtype=torch.float32 if use_act else None)
            saved.append((h, mean, rstd, pre if use_act else None))
            out = fn(pre) if use_act else pre
            h = (out + h.float() if res else out).to(w.dtype)   # as the fused epilogue rounds
        dh, dw, db, _, _ = ln_linear_backward(dkv2[r0:r0 + chunk_rows], h, params[-2], params[-1],
                                              **prec)
        acc[-2] += dw
        acc[-1] += db
        for i in range(len(layers) - 1, -1, -1):
            g, be, w, b, act, res = layers[i]
            xin, mean, rstd, pre = saved[i]
            need_dx = i > 0 or needs_dcontext
            dx, dw, db, dg, dbeta = ln_linear_backward(
                dh, xin, w, b, ln_weight=g, ln_bias=be, normalize=True, mean=mean, rstd=rstd,
                h=pre, activation=activation if pre is not None else "none", needs_dx=need_dx,
                **prec)
            for j, grad in enumerate((dg, dbeta, dw, db)):
                acc[4 * i + j] += grad
            if i == 0:
                if needs_dcontext:
                    dctx[r0:r0 + chunk_rows] = dx
            else:
                dh = dx + dh if res else dx
    out = [dctx.reshape(B, S, D) if needs_dcontext else x.new_empty((0,))]
    return out + [a.to(p.dtype) for a, p in zip(acc, params)]


@context_kv_bwd.register_fake
def _context_kv_bwd_fake(dkv, context, params, num_blocks, activation, eps, input_precision,
                         chunk_rows, needs_dcontext):
    first = torch.empty_like(context) if needs_dcontext else context.new_empty((0,))
    return [first] + [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]


def _setup_context(ctx, inputs, output):
    context, params, num_blocks, activation, eps, prec, chunk_rows = inputs
    ctx.save_for_backward(context, *params)
    ctx.cfg = (num_blocks, activation, eps, prec, chunk_rows)


def _backward(ctx, dkv):
    context, *params = ctx.saved_tensors
    needs_dctx = ctx.needs_input_grad[0]
    grads = context_kv_bwd(dkv.contiguous(), context, params, *ctx.cfg, needs_dctx)
    return (grads[0] if needs_dctx else None), grads[1:], None, None, None, None, None


context_kv_fwd.register_autograd(_backward, setup_context=_setup_context)


def context_kv(model, context: torch.Tensor, input_precision: str,
               chunk_rows: int | None = None) -> torch.Tensor:
    """kv (B, S, 2E) of the context (B, S, D) through the state encoder and the K|V projection,
    differentiable w.r.t. every parameter and the context; see the module docstring."""
    B, S, _ = context.shape
    m = model.state_linear
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(B * S)
    return context_kv_fwd(context, encoder_params(model), len(m.mlp_resnet_blocks), m.activation,
                          float(m.layer_norm1.eps), input_precision, int(rows))
