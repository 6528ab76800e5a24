"""@triton.jit kernel of the all-layer action-head pass: the fc1 gather table. The GEMMs are
``ln_linear``'s (kernels/mlp/fused.py); fc1 reads its A rows through this table, straight from
every layer's (B, T, D) tensor.

Gather without pointers loaded from memory: row m = (l, b, h) of fc1's A operand is Da segments
of D elements, segment j at the element offset
    seg[m, j] = delta_l + b * stride_b[l] + tok * stride_t[l],   tok = action_index[b, h*Da + j]
from the first layer tensor's first element, delta_l = (data_ptr(layer l) - data_ptr(layer 0)) /
itemsize (one address space on a GPU; the same on the CPU under the interpreter, whose CPU tensors
are not copied). A token outside [0, T_l) points at a row of zeros instead, so a bad index never
reads outside its own layer row. The (M, Da) int64 table costs M*Da*8 bytes (118 KB at the
production shape) instead of a compact (L', B, H*Da, D) copy of the rows (121 MB written + read
in bf16).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._utils import flags_from_pointers

#: columns of the per-layer table: delta, stride_b, stride_t, read by index (0/1), T
TABLE_COLS = tl.constexpr(5)


@flags_from_pointers(HAS_INDEX="index_ptr")
@triton.jit
def _layer_actions_offsets_kernel(table_ptr, index_ptr, seg_ptr, n_batch, n_tok, stride_ib,
                                  zero_off, HAS_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """seg[l, b, t] (int64) for the (B * n_tok) tokens of layer l = program_id(1); tokens are
    t itself for layers not read by index (rows already gathered)."""
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_batch * n_tok
    b = offs // n_tok
    t = offs % n_tok
    row = table_ptr + layer * TABLE_COLS
    delta = tl.load(row)
    stride_b = tl.load(row + 1)
    stride_t = tl.load(row + 2)
    by_index = tl.load(row + 3)
    n_t = tl.load(row + 4)
    tok = t
    if HAS_INDEX:
        idx = tl.load(index_ptr + b * stride_ib + t, mask=ok, other=0).to(tl.int64)
        tok = tl.where(by_index != 0, idx, t)
    inside = (tok >= 0) & (tok < n_t)
    seg = tl.where(inside, delta + b * stride_b + tok * stride_t, zero_off)
    tl.store(seg_ptr + layer * n_batch * n_tok + offs, seg, mask=ok)
