"""Launchers and the differentiable op of the energy cross-attention kernels (fused.py).

``energy_attention(q, kv, pad_mask, heads)``: q (Bq, Q, E) with Bq = B or 1 (one candidate pool
shared by every sample), kv (B, S, 2E) the K|V projection (K = kv[..., :E], V = kv[..., E:], read
in place), pad_mask (B, S) bool (True = ignore) or None -> out (B, Q, E) in q's dtype. The
gradient of kv is ONE (B, S, 2E) buffer written by the dK/dV kernel (two separate dk, dv
tensors would make autograd materialise a zero-filled (B, S, 2E) buffer per slice).
Wrapped as ``torch.library.custom_op`` ops (``energy_train::energy_attn_fwd`` / ``_bwd``) with a
registered fake and autograd formula, so that ``loss.backward()`` works and ``torch.compile``
traces through them with ``fullgraph=True``. What is checked where: on the CPU,
tests/test_kernel_energy.py compiles the whole loss (backend "aot_eager": dynamo + AOTAutograd,
fakes for the shapes, the kernels under TRITON_INTERPRET=1 for the numbers); on a GPU, a marked
test does the same with inductor. Not triton_op: its automatic fake re-runs the launcher on fake
tensors, which under the interpreter reaches the data pointers (design section 8); with
custom_op inductor calls the op as one opaque kernel-launching node (no graph break either).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from .fused import (_energy_attn_bwd_dkdv_kernel, _energy_attn_bwd_dq_kernel,
                    _energy_attn_bwd_preprocess_kernel, _energy_attn_fwd_kernel)

LOG2E = 1.4426950408889634
PRECISIONS = ("ieee", "tf32")
# Tests set this: every output buffer is NaN-filled before the kernels run, so an element a
# kernel fails to write fails the parity check instead of passing with stale memory.
POISON = os.environ.get("ENERGY_TRITON_POISON", "0") == "1"


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON else t


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attn_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes and launch options. Small tiles under the interpreter (speed of the CPU
    tests, and S not a multiple of the tile); 64 x 64 on the GPU (dh = 64 at 512/8, 1024/16).
    ``ENERGY_ATTN_BLOCK_M`` / ``ENERGY_ATTN_BLOCK_N`` override (every rank the same config)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    small = interpreting()
    bm = int(os.environ.get("ENERGY_ATTN_BLOCK_M", 16 if small else 64))
    bn = int(os.environ.get("ENERGY_ATTN_BLOCK_N", 16 if small else 64))
    # fp32 dK/dV at 4 warps needs 255 registers + 32 B of stack on sm_90: 8 warps, no spill
    dkdv_warps = 8 if dtype == torch.float32 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=4, num_stages=2,
                dkdv_warps=dkdv_warps)


def _upcast(dtype: torch.dtype) -> bool:
    # tl.dot on bf16 operands is wrong under the interpreter: compute in fp32 there
    return interpreting() and dtype in (torch.bfloat16, torch.float16)


def _dims(q, kv, heads):
    B, S, E2 = kv.shape
    E = E2 // 2
    Bq, Q, Eq = q.shape
    head_dim = E // heads
    return B, S, E, Bq, Q, head_dim


def _last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("energy_train::energy_attn_fwd", mutates_args=())
def energy_attn_fwd(q: torch.Tensor, kv: torch.Tensor, pad: Optional[torch.Tensor],
                    heads: int, input_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, Q, E) (q.dtype), lse (B, heads, Q) fp32 in log2 units (+inf: no valid key)."""
    B, S, E, Bq, Q, dh = _dims(q, kv, heads)
    k, v = kv[..., :E], kv[..., E:]
    out = _empty((B, Q, E), q.dtype, q.device)
    lse = _empty((B, heads, Q), torch.float32, q.device)
    cfg = attn_config(dh, q.dtype)
    grid = (triton.cdiv(Q, cfg["BLOCK_M"]), B * heads)
    padt = pad if pad is not None else k  # dummy pointer, never read (HAS_PAD=False)
    _energy_attn_fwd_kernel[grid](
        q, k, v, padt, out, lse,
        q.stride(0) if Bq > 1 else 0, q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), pad.stride(0) if pad is not None else 0, out.stride(0), out.stride(1),
        heads, Q, S, dh, LOG2E / math.sqrt(dh),
        HAS_PAD=pad is not None, UPCAST=_upcast(q.dtype), INPUT_PRECISION=input_precision,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


@energy_attn_fwd.register_fake
def _energy_attn_fwd_fake(q, kv, pad, heads, input_precision):
    B, S, E, Bq, Q, dh = _dims(q, kv, heads)
    return q.new_empty((B, Q, E)), q.new_empty((B, heads, Q), dtype=torch.float32)


@torch.library.custom_op("energy_train::energy_attn_bwd", mutates_args=())
def energy_attn_bwd(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                    pad: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, heads: int,
                    input_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dq (Bq, Q, E), dkv (B, S, 2E); with Bq = 1 dq is summed over samples."""
    B, S, E, Bq, Q, dh = _dims(q, kv, heads)
    k, v = kv[..., :E], kv[..., E:]
    cfg = attn_config(dh, q.dtype)
    BM, BN, BD = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    delta = _empty((B, heads, Q), torch.float32, q.device)
    _energy_attn_bwd_preprocess_kernel[(triton.cdiv(Q, BM), B * heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        heads, Q, dh, BLOCK_M=BM, BLOCK_D=BD, **launch)
    shared = Bq == 1 and B > 1
    dq = _empty((Bq, Q, E), q.dtype, q.device)
    dkv = _empty((B, S, 2 * E), kv.dtype, kv.device)
    dk, dv = dkv[..., :E], dkv[..., E:]
    padt = pad if pad is not None else k
    pad_sb = pad.stride(0) if pad is not None else 0
    qk_scale, sm_scale = LOG2E / math.sqrt(dh), 1.0 / math.sqrt(dh)
    q_sb = q.stride(0) if Bq > 1 else 0
    common = dict(HAS_PAD=pad is not None, UPCAST=_upcast(q.dtype), INPUT_PRECISION=input_precision,
                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_stages=cfg["num_stages"])
    _energy_attn_bwd_dq_kernel[(triton.cdiv(Q, BM), heads if shared else B * heads)](
        q, k, v, padt, dout, lse, delta, dq,
        q_sb, q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pad_sb,
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        B, heads, Q, S, dh, qk_scale, sm_scale, SHARED_Q=shared, num_warps=cfg["num_warps"],
        **common)
    _energy_attn_bwd_dkdv_kernel[(triton.cdiv(S, BN), B * heads)](
        q, k, v, padt, dout, lse, delta, dk, dv,
        q_sb, q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pad_sb,
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        heads, Q, S, dh, qk_scale, sm_scale, num_warps=cfg["dkdv_warps"], **common)
    return dq, dkv


@energy_attn_bwd.register_fake
def _energy_attn_bwd_fake(dout, q, kv, pad, out, lse, heads, input_precision):
    B, S, E, Bq, Q, dh = _dims(q, kv, heads)
    return q.new_empty((Bq, Q, E)), kv.new_empty((B, S, 2 * E))


def _setup_context(ctx, inputs, output):
    q, kv, pad, heads, input_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, pad, out, lse)
    ctx.heads, ctx.input_precision = heads, input_precision


def _backward(ctx, dout, dlse):
    q, kv, pad, out, lse = ctx.saved_tensors
    dq, dkv = energy_attn_bwd(_last_unit(dout), q, kv, pad, out, lse, ctx.heads,
                              ctx.input_precision)
    return dq, dkv, None, None, None


energy_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def default_precision(dtype: torch.dtype) -> str:
    """fp32 dots: IEEE unless torch itself allows TF32 for matmuls (then the kernel does too)."""
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def energy_attention(q: torch.Tensor, kv: torch.Tensor, pad_mask: Optional[torch.Tensor],
                     heads: int, input_precision: Optional[str] = None) -> torch.Tensor:
    """Differentiable masked cross-attention -> (B, Q, E). See the module docstring."""
    if kv.dim() != 3 or kv.shape[2] % 2:
        raise ValueError(f"kv: expected (B, S, 2E) (K | V), got {tuple(kv.shape)}")
    B, S, E = kv.shape[0], kv.shape[1], kv.shape[2] // 2
    if q.dim() != 3 or q.shape[0] not in (1, B) or q.shape[2] != E:
        raise ValueError(f"q: expected (1 or {B}, Q, {E}), got {tuple(q.shape)}")
    if E % heads:
        raise ValueError(f"heads: expected a divisor of {E}, got {heads}")
    if q.dtype != kv.dtype:
        raise TypeError(f"q, kv: expected one dtype, got {q.dtype}, {kv.dtype}")
    if input_precision is None:
        input_precision = default_precision(q.dtype)
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision: expected one of {PRECISIONS}, got {input_precision!r}")
    pad = None
    if pad_mask is not None:
        if pad_mask.shape != (B, S) or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask: expected bool ({B}, {S}), got {pad_mask.dtype} "
                             f"{tuple(pad_mask.shape)}")
        pad = _last_unit(pad_mask).view(torch.uint8)
    out, _ = energy_attn_fwd(_last_unit(q), _last_unit(kv), pad, heads, input_precision)
    return out
