"""The launch plan of the all-layer action-head pass (its @triton.jit kernels are the fused MLP
block's, kernels/mlp/fused.py) and the shipped kernel configs for the sm_90 resource report.

Gather without pointers loaded from memory: the fc1 A operand's row m = (l, b, h) is Da
segments of D elements, segment j at the element offset
    seg[m, j] = delta_l + b * stride_b[l] + tok[l, b, h*Da + j] * stride_t[l]
from the base tensor's first element, delta_l = (data_ptr(layer l) - data_ptr(base)) / itemsize
(one address space on a GPU; the same on the CPU under the interpreter, whose CPU tensors are
not copied). The (M, Da) int64 table costs M*Da*8 bytes (118 KB at production shape) instead
of a compact (L', B, H*Da, D) copy of the rows (121 MB written + read in bf16).
"""
from __future__ import annotations

from typing import Optional

import torch

from energy_train.checks import check_tensor
from energy_train.kernels.mlp import DTYPES, ln_linear
from energy_train.kernels.mlp.fused import (ACT_RELU, ACT_SILU, _ln_gemm_fwd_kernel,
                                            _ln_stats_fwd_kernel)

#: tests set this to fill every buffer the plan allocates with NaN, so an unwritten element fails
POISON = False


def _alloc(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _ln_args(mod):
    return dict(ln_weight=mod.weight, ln_bias=mod.bias, ln_eps=mod.eps)


def _sources(states, action_index, norm_mask, final_norm, wdtype, D):
    """-> (base dtype, [(tensor, gathered_by_index)]): the tensors the fc1 kernel reads.
    A layer is read in place (gathered by action_index inside the kernel) unless it needs the
    final norm, has another dtype, or is not contiguous along D; those are gathered eagerly
    into compact (B, H*Da, D) rows first (documented fallbacks)."""
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
        rows = s
        if action_index is not None:
            rows = s.gather(1, action_index[:, :, None].expand(-1, -1, D))
        if use_norm:
            rows = final_norm(rows)
        out.append((rows.to(wdtype).to(c).contiguous(), False))
    return c, out


def _segment_offsets(sources, action_index, B, T_act, Da, device):
    """(L'*B*H, Da) int64 element offsets from sources[0]'s first element."""
    base = sources[0][0]
    esize = base.element_size()
    table = []
    for t, by_index in sources:
        delta = t.data_ptr() - base.data_ptr()
        if delta % esize:
            raise RuntimeError("layer_actions: layer tensors are not element-aligned to each other")
        table.append([delta // esize, t.stride(0), t.stride(1), int(by_index)])
    p = torch.tensor(table, dtype=torch.int64)
    if device.type == "cuda":  # no host sync: pinned memory, asynchronous copy
        p = p.pin_memory().to(device, non_blocking=True)
    delta, sb, st, use = (p[:, i, None, None] for i in range(4))
    t_ar = torch.arange(T_act, device=device, dtype=torch.int64)[None, None, :]
    b_ar = torch.arange(B, device=device, dtype=torch.int64)[None, :, None]
    tok = t_ar if action_index is None else torch.where(
        use.bool(), action_index.to(torch.int64)[None], t_ar)
    seg = delta + b_ar * sb + tok * st  # (L', B, H*Da)
    return seg.reshape(-1, Da)


def _common_align(sources) -> int:
    """16 when every gathered offset is a multiple of 16 elements (aligned data pointers and
    strides), which lets the fc1 kernel vectorise and pipeline its gathered A loads; else 1."""
    for t, _ in sources:
        if t.data_ptr() % (16 * t.element_size()) or t.stride(0) % 16 or t.stride(1) % 16:
            return 1
    return 16


def head_params(m) -> list:
    """[ln1.w, ln1.b, fc1.w, fc1.b, (block ln.w, ln.b, fc.w, fc.b) x blocks, ln2.w, ln2.b, fc2.w,
    fc2.b] of an MLPResNet (a missing LayerNorm affine or bias is an empty tensor)."""
    def t(x, like):
        return x if x is not None else like.new_empty((0,))
    w = m.fc1.weight
    ps = [t(m.layer_norm1.weight, w), t(m.layer_norm1.bias, w), w, t(m.fc1.bias, w)]
    for blk in m.mlp_resnet_blocks:
        ps += [t(blk.ffn[0].weight, w), t(blk.ffn[0].bias, w), blk.ffn[1].weight,
               t(blk.ffn[1].bias, w)]
    return ps + [t(m.layer_norm2.weight, w), t(m.layer_norm2.bias, w), m.fc2.weight,
                 t(m.fc2.bias, w)]


@torch.no_grad()
def layer_actions_triton(states, action_index, head, final_norm=None, norm_mask=None,
                         input_precision=None):
    """states: L' tensors (B, T, D) (the selected layers); action_index (B, H*Da) int64 or None
    (T == H*Da, rows already gathered). -> (L', B, H, Da) in the head's dtype."""
    m = head.model
    H, Da, D = head.num_actions_chunk, head.action_dim, head.input_dim
    wdtype = m.fc1.weight.dtype
    if wdtype not in DTYPES:
        raise TypeError(f"head: expected fp16/bf16/fp32 weights for the Triton path, got {wdtype}"
                        " (use backend='eager')")
    Lp, B = len(states), states[0].shape[0]
    norm_mask = list(norm_mask) if norm_mask is not None else [False] * Lp
    if len(norm_mask) != Lp:
        raise ValueError(f"norm_mask: expected {Lp} entries, got {len(norm_mask)}")
    if any(norm_mask) and final_norm is None:
        raise ValueError("norm_mask: True entries need final_norm")
    for i, s in enumerate(states):
        check_tensor(f"states[{i}]", s, ndim=3, shape={0: B, 2: D}, floating=True)
    if action_index is not None:
        check_tensor("action_index", action_index, ndim=2, shape={0: B, 1: H * Da}, integer=True)
    if input_precision is None:
        input_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    _, sources = _sources(states, action_index, norm_mask, final_norm, wdtype, D)
    lns = [m.layer_norm1] + [blk.ffn[0] for blk in m.mlp_resnet_blocks] + [m.layer_norm2]
    return layer_actions_op([t for t, _ in sources], [by for _, by in sources], action_index,
                            head_params(m), [float(ln.eps) for ln in lns], m.activation,
                            input_precision, H, Da)


# The pass as a torch.library custom op with a registered fake: a user's torch.compile traces
# ops.layer_actions(backend="triton") without a graph break (the data-pointer arithmetic of the
# gather table happens inside, on real tensors only). Inference only: no autograd.
@torch.library.custom_op("energy_train::layer_actions", mutates_args=())
def layer_actions_op(sources: list[torch.Tensor], by_index: list[bool],
                     action_index: Optional[torch.Tensor], params: list[torch.Tensor],
                     eps: list[float], activation: str, input_precision: str, H: int,
                     Da: int) -> torch.Tensor:
    """sources: L' tensors (B, T, D) of one dtype (read in place; gathered by action_index where
    by_index), params as ``head_params`` -> (L', B, H, Da) in fc1.weight's dtype."""
    srcs = list(zip(sources, by_index))
    Lp, B, D = len(sources), sources[0].shape[0], sources[0].shape[2]
    M = Lp * B * H
    device = sources[0].device
    nb = (len(params) - 8) // 4
    w1 = params[2]
    wdtype, hid = w1.dtype, w1.shape[0]

    def ln(i):  # ln_linear keyword arguments of layer i (0 = fc1, 1..nb blocks, nb+1 = fc2)
        g, b = params[4 * i], params[4 * i + 1]
        return dict(ln_weight=g if g.numel() else None, ln_bias=b if b.numel() else None,
                    ln_eps=eps[i], normalize=True, input_precision=input_precision)

    def bias(i):
        b = params[4 * i + 3]
        return b if b.numel() else None

    if D % 16 == 0:
        seg = _segment_offsets(srcs, action_index, B, H * Da, Da, device)
        x = ln_linear(sources[0], w1, bias(0), **ln(0), activation=activation,
                      segment_offsets=seg, segment_align=_common_align(srcs),
                      out=_alloc((M, hid), wdtype, device))
    else:  # segments must be multiples of 16 elements: gather a compact row buffer instead
        rows = torch.stack([
            (t if not by else t.gather(1, action_index[:, :, None].expand(-1, -1, D)))
            for t, by in srcs])
        x = ln_linear(rows.reshape(M, Da * D), w1, bias(0), **ln(0), activation=activation,
                      out=_alloc((M, hid), wdtype, device))
    spare = _alloc((M, hid), wdtype, device)
    for i in range(1, nb + 1):
        y = ln_linear(x, params[4 * i + 2], bias(i), **ln(i), activation=activation, residual=x,
                      out=spare)
        x, spare = y, x
    y = _alloc((Lp, B, H, Da), wdtype, device)
    ln_linear(x, params[4 * nb + 6], bias(nb + 1), **ln(nb + 1), out=y.view(M, Da))
    return y


@layer_actions_op.register_fake
def _layer_actions_fake(sources, by_index, action_index, params, eps, activation,
                        input_precision, H, Da):
    return sources[0].new_empty((len(sources), sources[0].shape[0], H, Da), dtype=params[2].dtype)


# --------------------------------------------------------------------------------------------
# shipped configs for the sm_90 resource report (python -m bench.resources)
# --------------------------------------------------------------------------------------------
def _gemm_cfg(name, dt, *, gather, nseg=1, seg_len=4096, K=4096, N=4096, act=ACT_RELU,
              res=False, block=(128, 128, 64), warps=8, stages=4, inline=False, group=8):
    ptr = f"*{dt}"
    return dict(
        name=name, kernel=_ln_gemm_fwd_kernel,
        args=dict(x_ptr=ptr, seg_ptr="*i64", w_ptr=ptr, b_ptr=ptr, g_ptr=ptr, beta_ptr=ptr,
                  res_ptr=ptr, y_ptr=ptr, mean_ptr="*fp32", rstd_ptr="*fp32",
                  M=2112, N=N, K=K, stride_xm=0 if gather else K, stride_xk=1, stride_wn=K,
                  stride_wk=1, stride_rm=N, stride_rn=1, stride_ym=N, stride_yn=1, eps=1e-5),
        constexprs=dict(GATHER=gather, NSEG=nseg, SEG_LEN=seg_len if gather else K,
                        SEG_ALIGN=16 if gather else 1, NORMALIZE=True, STATS_INLINE=inline, WRITE_STATS=inline, HAS_GAMMA=True,
                        HAS_BETA=True, HAS_BIAS=True, ACT=act, HAS_RES=res, DOT_DTYPE=dt,
                        UPCAST=False, INPUT_PRECISION="tf32", BLOCK_M=block[0],
                        BLOCK_N=block[1], BLOCK_K=block[2], GROUP_M=group),
        num_warps=warps, num_stages=stages, expect_wgmma=True)


def _stats_cfg(name, dt, *, gather, nseg=1, seg_len=4096, K=4096):
    return dict(
        name=name, kernel=_ln_stats_fwd_kernel,
        args=dict(x_ptr=f"*{dt}", seg_ptr="*i64", mean_ptr="*fp32", rstd_ptr="*fp32", M=2112,
                  K=K, stride_xm=0 if gather else K, stride_xk=1, eps=1e-5),
        constexprs=dict(GATHER=gather, NSEG=nseg, SEG_LEN=seg_len if gather else K,
                        SEG_ALIGN=16 if gather else 1, ROUND_DTYPE=dt, BLOCK_M=16, BLOCK_K=256),
        num_warps=4, num_stages=2)


def _configs():
    out = []
    for dt, tag in (("bf16", "bf16"), ("fp16", "fp16")):
        for da in (7, 14):  # LIBERO / BRIDGE, ALOHA
            out.append(_stats_cfg(f"la.stats.fc1.{tag}.Da{da}", dt, gather=True, nseg=da,
                                  K=da * 4096))
            out.append(_gemm_cfg(f"la.fc1.{tag}.Da{da}.relu", dt, gather=True, nseg=da,
                                 K=da * 4096))
        out.append(_gemm_cfg(f"la.fc1.{tag}.Da7.silu", dt, gather=True, nseg=7, K=7 * 4096,
                             act=ACT_SILU))
        out.append(_stats_cfg(f"la.stats.block.{tag}", dt, gather=False))
        out.append(_gemm_cfg(f"la.block.{tag}.relu", dt, gather=False, res=True))
        out.append(_gemm_cfg(f"la.block.{tag}.silu", dt, gather=False, res=True, act=ACT_SILU))
        for da in (7, 14):
            out.append(_gemm_cfg(f"la.ln2_fc2.{tag}.Da{da}", dt, gather=False, N=da, act=0,
                                 block=(64, 16, 128), warps=4, stages=3, inline=True, group=1))
    # fp32 heads: tf32 dot, BLOCK_K 32
    out.append(_stats_cfg("la.stats.fc1.fp32.Da7", "fp32", gather=True, nseg=7, K=7 * 4096))
    out.append(_gemm_cfg("la.fc1.fp32.Da7.relu", "fp32", gather=True, nseg=7, K=7 * 4096,
                         block=(128, 128, 32), stages=3))
    out.append(_gemm_cfg("la.block.fp32.relu", "fp32", gather=False, res=True,
                         block=(128, 128, 32), stages=3))
    out.append(_gemm_cfg("la.ln2_fc2.fp32.Da7", "fp32", gather=False, N=7, act=0,
                         block=(64, 16, 64), warps=4, stages=3, inline=True, group=1))
    return out


RESOURCE_CONFIGS = _configs()
