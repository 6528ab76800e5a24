"""Launchers of the energy path (validated by op.py's public functions; op.py wraps these in
custom ops):

``attention_fwd(q, kv, pad, heads, prec)`` / ``attention_bwd(...)``: the cross-attention kernels
(fused.py). q (Bq, Q, E) with Bq = B or 1 (one candidate pool shared by every sample), kv
(B, S, 2E) the K|V projection (K = kv[..., :E], V = kv[..., E:], read in place), pad (B, S) bool
(True = ignore) or None; its uint8 view (the kernels read bytes) is taken here, inside the custom
op's real body: inductor cannot lower a bit-cast view of a bool tensor in a traced graph. The gradient of kv is ONE (B, S, 2E) buffer written by the dK/dV kernel (two
separate dk, dv tensors would make autograd materialise a zero-filled (B, S, 2E) buffer per
slice).

``context_kv_fwd(context, pad, params, ...)`` / ``context_kv_bwd(...)``: the context encoder (the
state MLPResNet, then the K|V projection) by row chunks, every Linear the ``ln_linear`` kernels,
keeping no activation: the backward recomputes each chunk's forward (fc1 and block GEMMs write
their fp32 PRE-activations, which their backward needs anyway; fc2 is the only GEMM run again,
2*B*S*E^2 FLOPs, ~3% of the fwd+bwd at B=8, S=600, D=4096, E=512), then runs the chunk's backward
(``ln_linear_backward``), summing parameter gradients over chunks in fp32. Transient memory is one
chunk's activations. A padded context row is replaced by zeros before the encoder (a select), and
its gradient is exactly zero, so whatever it holds never reaches K|V or a parameter gradient.
"""
from __future__ import annotations

import math

import torch
import triton

from .._utils import TORCH_ACTIVATIONS, empty, upcast_dot
from ..mlp.launch import ln_linear, ln_linear_backward
from ..weights import MLPResNetWeights
from .configs import attn_config
from .fused import (_energy_attention_bwd_dkdv_kernel, _energy_attention_bwd_dq_kernel,
                    _energy_attention_bwd_preprocess_kernel, _energy_attention_fwd_kernel)

LOG2E = 1.4426950408889634


def attention_dims(q, kv, heads):
    """-> B, S, E, Bq, Q, head_dim."""
    B, S, E2 = kv.shape
    E = E2 // 2
    Bq, Q, _ = q.shape
    return B, S, E, Bq, Q, E // heads


def _bytes(pad):
    """The bool pad mask as the uint8 the kernels read (a view, no copy)."""
    return None if pad is None else pad.view(torch.uint8)


def attention_fwd(q, kv, pad, heads: int, input_precision: str):
    """-> out (B, Q, E) (q.dtype), lse (B, heads, Q) fp32 in log2 units (+inf: no valid key)."""
    B, S, E, Bq, Q, dh = attention_dims(q, kv, heads)
    k, v = kv[..., :E], kv[..., E:]
    pad = _bytes(pad)
    out = empty((B, Q, E), q.dtype, q.device)
    lse = empty((B, heads, Q), torch.float32, q.device)
    cfg = attn_config(dh, q.dtype)
    _energy_attention_fwd_kernel[(triton.cdiv(Q, cfg["BLOCK_M"]), B * heads)](
        q, k, v, pad, out, lse,
        q.stride(0) if Bq > 1 else 0, q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), pad.stride(0) if pad is not None else 0, out.stride(0), out.stride(1),
        heads, Q, S, dh, LOG2E / math.sqrt(dh),
        UPCAST=upcast_dot(q.dtype), INPUT_PRECISION=input_precision,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


def attention_bwd(dout, q, kv, pad, out, lse, heads: int, input_precision: str):
    """-> dq (Bq, Q, E), dkv (B, S, 2E); with Bq = 1 dq is summed over samples."""
    B, S, E, Bq, Q, dh = attention_dims(q, kv, heads)
    k, v = kv[..., :E], kv[..., E:]
    pad = _bytes(pad)
    cfg = attn_config(dh, q.dtype)
    BM, BN, BD = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    delta = empty((B, heads, Q), torch.float32, q.device)
    _energy_attention_bwd_preprocess_kernel[(triton.cdiv(Q, BM), B * heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        heads, Q, dh, BLOCK_M=BM, BLOCK_D=BD, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    shared = Bq == 1 and B > 1
    dq = empty((Bq, Q, E), q.dtype, q.device)
    dkv = empty((B, S, 2 * E), kv.dtype, kv.device)
    dk, dv = dkv[..., :E], dkv[..., E:]
    pad_sb = pad.stride(0) if pad is not None else 0
    qk_scale, sm_scale = LOG2E / math.sqrt(dh), 1.0 / math.sqrt(dh)
    q_sb = q.stride(0) if Bq > 1 else 0
    common = dict(UPCAST=upcast_dot(q.dtype), INPUT_PRECISION=input_precision,
                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_stages=cfg["num_stages"])
    _energy_attention_bwd_dq_kernel[(triton.cdiv(Q, BM), heads if shared else B * heads)](
        q, k, v, pad, dout, lse, delta, dq,
        q_sb, q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pad_sb,
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        B, heads, Q, S, dh, qk_scale, sm_scale, SHARED_Q=shared, num_warps=cfg["dq_warps"],
        **common)
    _energy_attention_bwd_dkdv_kernel[(triton.cdiv(S, BN), B * heads)](
        q, k, v, pad, dout, lse, delta, dk, dv,
        q_sb, q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pad_sb,
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        heads, Q, S, dh, qk_scale, sm_scale, num_warps=cfg["dkdv_warps"], **common)
    return dq, dkv


# --------------------------------------------------------------------------------------------
# the context encoder, chunked, recomputed in the backward
# --------------------------------------------------------------------------------------------
def default_chunk_rows(rows: int) -> int:
    """An eighth of the rows (multiple of 64, at least 256): one chunk's activations stay well
    below K|V. To tune on a GPU: fewer rows per GEMM means fewer output tiles per launch."""
    return max(256, -(-rows // 8 // 64) * 64)


def _layers(params, eps, activation):
    """-> [(LNLinear, activation?, residual?)] for fc1, blocks, fc2 of the state encoder
    (params: ``MLPResNetWeights.flat()`` + [W_kv, b_kv])."""
    w = MLPResNetWeights.from_flat(params[:-2], eps, activation)
    return ([(w.fc1, True, False)] + [(blk, True, True) for blk in w.blocks] +
            [(w.fc2, False, False)])


def _chunk(x, keep, r0, rows):
    """Rows r0:r0+rows of x, padded rows replaced by zeros (a select: NaN there never leaks)."""
    h = x[r0:r0 + rows]
    return h if keep is None else h.masked_fill(~keep[r0:r0 + rows, None], 0)


def context_kv_fwd(context, pad, params, eps, activation: str, input_precision: str,
                   chunk_rows: int) -> torch.Tensor:
    """context (B, S, D), pad (B, S) bool (True = ignore) or None -> kv (B, S, 2E) in the
    parameters' dtype; nothing kept."""
    B, S, D = context.shape
    x = context.reshape(B * S, D)
    keep = None if pad is None else ~pad.reshape(B * S)
    kv = empty((B * S, params[-2].shape[0]), params[-2].dtype, context.device)
    layers = _layers(params, eps, activation)
    for r0 in range(0, B * S, chunk_rows):
        h = _chunk(x, keep, r0, chunk_rows)
        for lin, act, res in layers:
            h = ln_linear(h, lin.weight, lin.bias, ln_weight=lin.ln_weight, ln_bias=lin.ln_bias,
                          ln_eps=lin.ln_eps, normalize=True,
                          activation=activation if act else "none", residual=h if res else None,
                          input_precision=input_precision)
        ln_linear(h, params[-2], params[-1], out=kv[r0:r0 + chunk_rows],
                  input_precision=input_precision)
    return kv.view(B, S, kv.shape[1])


def context_kv_bwd(dkv, context, pad, params, eps, activation: str, input_precision: str,
                   chunk_rows: int, needs_dcontext: bool) -> list:
    """-> [dcontext (B, S, D) or None] + [one gradient per parameter (None where absent)]."""
    B, S, D = context.shape
    x = context.reshape(B * S, D)
    keep = None if pad is None else ~pad.reshape(B * S)
    dkv2 = dkv.reshape(B * S, dkv.shape[-1])
    fn = TORCH_ACTIVATIONS[activation]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    dctx = empty((B * S, D), context.dtype, context.device) if needs_dcontext else None
    layers = _layers(params, eps, activation)
    prec = dict(input_precision=input_precision)
    for r0 in range(0, B * S, chunk_rows):
        h = _chunk(x, keep, r0, chunk_rows)
        saved = []  # per layer: (input, mean, rstd, fp32 pre-activation or None)
        for lin, act, res in layers:
            use_act = act and activation != "none"
            pre, mean, rstd = ln_linear(h, lin.weight, lin.bias, ln_weight=lin.ln_weight,
                                        ln_bias=lin.ln_bias, ln_eps=lin.ln_eps, normalize=True,
                                        return_stats=True, **prec,
                                        out_dtype=torch.float32 if use_act else None)
            saved.append((h, mean, rstd, pre if use_act else None))
            out = fn(pre) if use_act else pre
            h = (out + h.float() if res else out).to(lin.weight.dtype)  # as the epilogue rounds
        dh, dw, db, _, _ = ln_linear_backward(dkv2[r0:r0 + chunk_rows], h, params[-2],
                                              params[-1], **prec)
        acc[-2] += dw
        acc[-1] += db
        for i in range(len(layers) - 1, -1, -1):
            lin, act, res = layers[i]
            xin, mean, rstd, pre = saved[i]
            need_dx = i > 0 or needs_dcontext
            dx, dw, db, dg, dbeta = ln_linear_backward(
                dh, xin, lin.weight, lin.bias, ln_weight=lin.ln_weight, ln_bias=lin.ln_bias,
                normalize=True, mean=mean, rstd=rstd, h=pre,
                activation=activation if pre is not None else "none", needs_dx=need_dx, **prec)
            for j, grad in enumerate((dg, dbeta, dw, db)):
                if grad is not None:
                    acc[4 * i + j] += grad
            if i > 0:
                dh = dx + dh if res else dx
            elif needs_dcontext:
                dctx[r0:r0 + chunk_rows] = dx if keep is None else dx.masked_fill(
                    ~keep[r0:r0 + chunk_rows, None], 0)
    grads = [a.to(p.dtype) if p.numel() else None for a, p in zip(acc, params)]
    return [dctx.reshape(B, S, D) if needs_dcontext else None] + grads
