"""Launcher of the all-layer action-head pass: M = L'*B*H rows (every selected layer, sample and
chunk step) through the head's MLPResNet in 7 launches for any L', each weight matrix read once
per pass (per row tile: from L2), not once per layer:
  0. the fc1 gather table (fused.py);
  1. fc1: LayerNorm statistics pre-pass over Da*D + the LN-prologue GEMM whose A rows are
     gathered through that table, bias + activation in the epilogue;
  2. per block: statistics pre-pass + LN-prologue GEMM, bias + activation + residual epilogue;
  3. layer_norm2 + fc2 (N = Da): one row-wise GEMM, statistics inline.
Outputs are in the head's dtype; rows are rounded to it first, as the reference does.
"""
from __future__ import annotations

import torch
import triton

from .._utils import DTYPES, empty
from ..mlp.launch import ln_linear
from .configs import offsets_config
from .fused import TABLE_COLS, _layer_actions_offsets_kernel


def gather_rows(h: torch.Tensor, action_index: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> the (B, H*Da, D) rows at action_index; an index outside [0, T) reads zeros."""
    T = h.shape[1]
    inside = (action_index >= 0) & (action_index < T)
    rows = h.gather(1, action_index.clamp(0, max(T - 1, 0))[:, :, None].expand(-1, -1, h.shape[2]))
    return rows.masked_fill(~inside[:, :, None], 0)


def sources(states, action_index, norm_mask, final_norm, wdtype):
    """-> [(tensor, read_by_index)]: what the fc1 kernel reads, one dtype. A layer is read in
    place (gathered by action_index inside the kernel) unless it needs the final norm, has
    another dtype, or is not contiguous along D; those are gathered eagerly into compact
    (B, H*Da, D) rows first (documented fallbacks)."""
    c = states[0].dtype
    if c not in DTYPES or any(s.dtype != c for s in states):
        c = wdtype
    if any(norm_mask) and c not in (wdtype, torch.float32):
        c = wdtype  # a normed row rounded to a narrower dtype than eager's would lose bits
    out = []
    for s, use_norm in zip(states, norm_mask):
        if not use_norm and s.dtype == c and s.stride(-1) == 1:
            out.append((s, action_index is not None))
            continue
        rows = s if action_index is None else gather_rows(s, action_index)
        if use_norm:
            rows = final_norm(rows)
        out.append((rows.to(wdtype).to(c).contiguous(), False))
    return out


def _segment_offsets(srcs, zero, action_index, B, n_tok, Da):
    """(L'*B*H, Da) int64 element offsets from srcs[0]'s first element (fused.py)."""
    base = srcs[0][0]
    device, esize = base.device, base.element_size()

    def offset(t):
        delta = t.data_ptr() - base.data_ptr()
        if delta % esize:
            raise RuntimeError("layer_actions: layer tensors are not element-aligned to each other")
        return delta // esize

    table = torch.tensor([[offset(t), t.stride(0), t.stride(1), int(by_index), t.shape[1]]
                          for t, by_index in srcs], dtype=torch.int64)
    assert table.shape[1] == TABLE_COLS.value
    if device.type == "cuda":  # no host sync: pinned memory, asynchronous copy
        table = table.pin_memory().to(device, non_blocking=True)
    index = None if action_index is None else action_index.contiguous()
    seg = torch.empty((len(srcs), B, n_tok), dtype=torch.int64, device=device)
    cfg = offsets_config()
    _layer_actions_offsets_kernel[(triton.cdiv(B * n_tok, cfg["BLOCK"]), len(srcs))](
        table, index, seg, B, n_tok, n_tok, offset(zero), BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return seg.view(len(srcs) * B * n_tok // Da, Da)


def _common_align(tensors) -> int:
    """16 when every gathered offset is a multiple of 16 elements (aligned data pointers and
    strides), which lets the fc1 kernel vectorise and pipeline its gathered A loads; else 1."""
    for t in tensors:
        if t.data_ptr() % (16 * t.element_size()) or any(s % 16 for s in t.stride()[:-1]):
            return 1
    return 16


def layer_actions_launch(srcs, action_index, params, eps, activation, input_precision, H, Da):
    """srcs: L' (tensor (B, T, D), read_by_index) of one dtype, contiguous along D; params as
    ``MLPResNetWeights.flat()``, eps per LayerNorm -> (L', B, H, Da) in fc1.weight's dtype."""
    Lp, B, D = len(srcs), srcs[0][0].shape[0], srcs[0][0].shape[2]
    M = Lp * B * H
    device = srcs[0][0].device
    nb = (len(params) - 8) // 4
    w1 = params[2]
    wdtype, hid = w1.dtype, w1.shape[0]

    def layer(i):  # ln_linear arguments of layer i (0 = fc1, 1..nb blocks, nb+1 = fc2)
        g, b, w, bias = (t if t.numel() else None for t in params[4 * i: 4 * i + 4])
        return dict(weight=w, bias=bias, ln_weight=g, ln_bias=b, ln_eps=eps[i], normalize=True,
                    input_precision=input_precision)

    if M == 0:
        return empty((Lp, B, H, Da), wdtype, device)
    out = empty((M, hid), wdtype, device)
    if D % 16 == 0:
        zero = torch.zeros(D, dtype=srcs[0][0].dtype, device=device)  # what a bad index reads
        seg = _segment_offsets(srcs, zero, action_index, B, H * Da, Da)
        x = ln_linear(srcs[0][0], **layer(0), activation=activation, segment_offsets=seg,
                      segment_align=_common_align([t for t, _ in srcs] + [zero]), out=out)
    else:  # segments must be multiples of 16 elements: gather a compact row buffer instead
        rows = torch.stack([gather_rows(t, action_index) if by else t for t, by in srcs])
        x = ln_linear(rows.reshape(M, Da * D), **layer(0), activation=activation, out=out)
    spare = empty((M, hid), wdtype, device)
    for i in range(1, nb + 1):
        y = ln_linear(x, **layer(i), activation=activation, residual=x, out=spare)
        x, spare = y, x
    y = empty((Lp, B, H, Da), wdtype, device)
    ln_linear(x, **layer(nb + 1), out=y.view(M, Da))
    return y
