"""Launcher of the all-layer action-head pass: M = L'*B*H rows (every selected layer, sample
and chunk step) through the head's MLPResNet in 2 + 2 * blocks + 1 launches for any L' (7 for
OFT's head), each weight matrix read once per pass (per row tile: from L2), not once per layer:

  1. ``_la_norm_kernel`` (NORM): the rows gathered straight from the (L', B, T, D) layer stack
     by ``action_index`` and layer_norm1'ed into a compact (M, Da*D) buffer;
  2. ``_la_gemm_kernel``: fc1, bias + activation in the epilogue;
  3. per block: NORM of the block input, then the GEMM with bias + activation + residual;
  4. ``_la_norm_kernel`` (FC2): layer_norm2 + fc2 (N = Da) per row.

Each LayerNorm output is materialised (in the head's dtype, what an eager LayerNorm outputs):
for a head that changes every step (phase 2 runs it on the weights the L1 step just updated)
that moves fewer bytes than folding gamma into W (fc1: 2 x 235 MB per weight version at the
production shape against 2 x 121 MB for the rows) and keeps the GEMM's K loop free of
LayerNorm arithmetic. ``gemm="cublas"`` runs steps 2-3's GEMMs on cuBLAS (torch.addmm) instead,
for comparison (bench/bench_layer_actions.py).
"""
from __future__ import annotations

import torch
import triton

from .._utils import ACTIVATIONS, DTYPES, TL_DTYPES, TORCH_ACTIVATIONS, dot_precision, empty
from .._utils import interpreting, upcast_dot
from .configs import gemm_config, norm_config
from .fused import _la_gemm_kernel, _la_norm_kernel


def gather_rows(h: torch.Tensor, action_index: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> the (B, H*Da, D) rows at action_index; an index outside [0, T) reads zeros."""
    T = h.shape[1]
    inside = (action_index >= 0) & (action_index < T)
    rows = h.gather(1, action_index.clamp(0, max(T - 1, 0))[:, :, None].expand(-1, -1, h.shape[2]))
    return rows.masked_fill(~inside[:, :, None], 0)


def normed_rows(states, action_index, norm_mask, final_norm, wdtype) -> torch.Tensor:
    """The logit lens' fallback: every selected layer's action rows gathered eagerly, the final
    norm applied where ``norm_mask`` says, in the head's dtype -> (L', B, H*Da, D)."""
    rows = []
    for s, use_norm in zip(states, norm_mask):
        r = s if action_index is None else gather_rows(s, action_index)
        rows.append((final_norm(r) if use_norm else r).to(wdtype))
    return torch.stack(rows)


def layer_stack(states, action_index):
    """-> (stack (L', B, T, D) with unit stride along D, index or None): the layers as ONE
    strided view when they are equally spaced views of one storage (the hook capture's buffer,
    an (L+1, B, T, D) tensor), read in place; otherwise (separate tensors, e.g. Hugging Face's
    output_hidden_states) their action rows gathered into a compact (L', B, H*Da, D) tensor
    (documented fallback: one gather per layer and a stack). Data pointers: real tensors only
    (this runs inside the custom op)."""
    s0 = states[0]
    same = all(s.shape == s0.shape and s.stride() == s0.stride() and s.dtype == s0.dtype
               for s in states) and s0.stride(-1) == 1 and s0.dtype in DTYPES
    if same and len(states) == 1:
        return s0.unsqueeze(0), action_index
    if same:
        esize = s0.element_size()
        deltas = {states[i + 1].data_ptr() - states[i].data_ptr() for i in range(len(states) - 1)}
        storages = {s.untyped_storage().data_ptr() for s in states}
        if len(deltas) == 1 and len(storages) == 1:
            (delta,) = deltas
            if delta > 0 and delta % esize == 0:
                return (s0.as_strided((len(states), *s0.shape), (delta // esize, *s0.stride()),
                                      s0.storage_offset()), action_index)
    rows = [s if action_index is None else gather_rows(s, action_index) for s in states]
    dtype = s0.dtype if s0.dtype in DTYPES else torch.float32
    return torch.stack([r.to(dtype) for r in rows]), None


def _norm(x, index, g, beta, out, eps, n_batch, n_chunk, nseg, round_dtype, w2=None, b2=None):
    """``_la_norm_kernel`` over every row of the layer stack x (L', n_batch, T, D)."""
    L, D = x.shape[0], x.shape[3]
    cfg = norm_config(D, round_dtype)
    M = L * n_batch * n_chunk
    if M == 0:
        return out
    n2 = w2.shape[0] if w2 is not None else 1
    _la_norm_kernel[(M,)](
        x, index, g, beta, out, w2 if w2 is not None else g, b2 if b2 is not None else g,
        n_batch, n_chunk, x.shape[2], D, x.stride(0), x.stride(1), x.stride(2),
        index.stride(0) if index is not None else 0, n2, float(eps),
        NSEG=nseg, FC2=w2 is not None, ROUND=TL_DTYPES[round_dtype], BLOCK=cfg["BLOCK"],
        BLOCK_N2=max(16, triton.next_power_of_2(n2)), num_warps=cfg["num_warps"], num_stages=1)
    return out


def _gemm(a, w, b, activation, residual, out, precision, gemm):
    """out (M, N) = act(a @ w^T + b) [+ residual]."""
    M, K = a.shape
    N = w.shape[0]
    if M == 0:
        return out
    if gemm == "cublas":
        y = torch.addmm(b, a, w.t())
        y = TORCH_ACTIVATIONS[activation](y)
        return out.copy_(y if residual is None else y + residual)
    from triton.tools.tensor_descriptor import TensorDescriptor
    cfg = gemm_config(M, N, K, w.dtype)
    a_desc = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    w_desc = TensorDescriptor.from_tensor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    n_prog = min(tiles, _num_sms(a.device))
    _la_gemm_kernel[(n_prog,)](
        a_desc, w_desc, b, residual, out, M, N, K, n_prog, ACT=ACTIVATIONS[activation],
        DOT_DTYPE=TL_DTYPES[w.dtype], UPCAST=upcast_dot(w.dtype),
        PREC=dot_precision(w.dtype, precision), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


_SMS: dict = {}


def _num_sms(device) -> int:
    """Programs of the persistent GEMM: the SM count (CPU / interpreter: 4)."""
    if device.type != "cuda" or interpreting():
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def layer_actions_launch(states, action_index, params, eps, activation, precision, H, Da,
                         gemm="triton"):
    """states: L' tensors (B, T, D) of the selected layers, action_index (B, H*Da) or None
    (T == H*Da, rows in chunk order); params as ``MLPResNetWeights.flat()``, eps per
    LayerNorm -> (L', B, H, Da) in fc1.weight's dtype."""
    stack, action_index = layer_stack(states, action_index)
    Lp, B, _, D = stack.shape
    M = Lp * B * H
    nb = (len(params) - 8) // 4
    wdtype, hid, dev = params[2].dtype, params[2].shape[0], stack.device

    def layer(i):  # (gamma, beta, W, b) of layer i (0 = fc1, 1..nb blocks, nb+1 = fc2)
        return params[4 * i: 4 * i + 4]

    index = None if action_index is None else action_index.contiguous()
    rows = empty((M, Da * D), wdtype, dev)
    g, be, w, b = layer(0)
    _norm(stack, index, g, be, rows, eps[0], B, H, Da, wdtype)
    x = _gemm(rows, w, b, activation, None, empty((M, hid), wdtype, dev), precision, gemm)
    if nb:
        normed, spare = empty((M, hid), wdtype, dev), empty((M, hid), wdtype, dev)
    for i in range(1, nb + 1):
        g, be, w, b = layer(i)
        _norm(x.view(1, M, 1, hid), None, g, be, normed, eps[i], M, 1, 1, wdtype)
        y = _gemm(normed, w, b, activation, x, spare, precision, gemm)
        x, spare = y, x
    g, be, w, b = layer(nb + 1)
    out = empty((Lp, B, H, Da), wdtype, dev)
    _norm(x.view(1, M, 1, hid), None, g, be, out.view(M, Da), eps[nb + 1], M, 1, 1, wdtype,
          w2=w, b2=b)
    return out
