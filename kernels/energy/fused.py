"""Triton kernels of the energy model's cross-attention: the C*H candidate queries of a
sample attend to that sample's S context keys, K/V shared by all candidates (never copied).

Layout (no transposes anywhere): q (Bq, Q, E), k and v (B, S, E) (any strides in the first two
dims, unit stride in the last), head h owns columns h*dh:(h+1)*dh. ``Bq`` is B, or 1 when all
samples score one shared candidate pool (stride 0 over the batch: the swap loss).
A key is valid when it is in range and not padded (pad byte 0). Rows whose keys are all
padded give a zero output and lse = +inf (so every backward probability is 0).

Forward: one program per (query block, sample, head); online softmax in base 2; the S x Q
score matrix never leaves registers; lse (log2 domain) saved for the backward.
Backward (FlashAttention-2 split, deterministic, no atomics):
  ``_energy_attn_bwd_preprocess_kernel``  delta = rowsum(dO * O)
  ``_energy_attn_bwd_dq_kernel``          dQ, one program per (query block, head[, sample]);
                                          with a shared pool it sums over the samples itself
  ``_energy_attn_bwd_dkdv_kernel``        dK, dV, one program per (key block, sample, head),
                                          looping over every query block of the sample
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn, stride_vb,
                  stride_vn, stride_pb, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """K and V tiles (BLOCK_N, BLOCK_D) of keys ``offs_n`` of sample ``b`` in the head's columns
    ``col``, and which of those keys are valid (in range and not padded)."""
    in_range = offs_n < n_k
    valid = in_range
    if HAS_PAD:
        pad = tl.load(PAD + b * stride_pb + offs_n, mask=in_range, other=1)
        valid = valid & (pad == 0)
    kv_mask = in_range[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + offs_n[:, None] * stride_kn + col[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vn + col[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v, valid


@triton.jit
def _energy_attn_fwd_kernel(
    Q, K, V, PAD, O, LSE,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_pb,
    stride_ob, stride_om,
    n_heads, n_q, n_k, head_dim, qk_scale,
    HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    col = h * head_dim + offs_d

    q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + col[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, valid = _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn,
                                    stride_vb, stride_vn, stride_pb, HAS_PAD, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # acc is 0 where no key is valid: zero output
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
    tl.store(O + b * stride_ob + offs_m[:, None] * stride_om + col[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * n_q + offs_m, lse, mask=m_ok)


@triton.jit
def _energy_attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_om, stride_dob, stride_dom,
    n_heads, n_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, m] = sum_d dO[b, m, h, d] * O[b, m, h, d] (fp32)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n_q)[:, None] & (offs_d < head_dim)[None, :]
    col = h * head_dim + offs_d
    o = tl.load(O + b * stride_ob + offs_m[:, None] * stride_om + col[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dom + col[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _energy_attn_bwd_dq_kernel(
    Q, K, V, PAD, DO, LSE, DELTA, DQ,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_pb,
    stride_dob, stride_dom, stride_dqb, stride_dqm,
    n_batch, n_heads, n_q, n_k, head_dim, qk_scale, sm_scale,
    SHARED_Q: tl.constexpr, HAS_PAD: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = scale * sum_keys dS K, dS = P * (dP - delta), dP = dO V^T. With SHARED_Q the grid's
    second axis is the head only and the program sums dQ over the samples (deterministic)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_1 = tl.program_id(1).to(tl.int64)
    if SHARED_Q:
        h = pid_1
        b_lo = 0
        b_hi = n_batch
        qb = 0
        out_b = 0
    else:
        h = pid_1 % n_heads
        b_lo = pid_1 // n_heads
        b_hi = b_lo + 1
        qb = b_lo
        out_b = b_lo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_q
    d_ok = offs_d < head_dim
    col = h * head_dim + offs_d
    q = tl.load(Q + qb * stride_qb + offs_m[:, None] * stride_qm + col[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for b32 in range(b_lo, b_hi):
        b = pid_1 * 0 + b32  # int64 (pid_1 is), also under the interpreter where b32 is an int
        row = (b * n_heads + h) * n_q
        lse = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
        do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dom + col[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            do = do.to(tl.float32)
        for start_n in range(0, n_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, valid = _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn,
                                        stride_vb, stride_vn, stride_pb, HAS_PAD, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + out_b * stride_dqb + offs_m[:, None] * stride_dqm + col[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _energy_attn_bwd_dkdv_kernel(
    Q, K, V, PAD, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_pb,
    stride_dob, stride_dom, stride_dkb, stride_dkn, stride_dvb, stride_dvn,
    n_heads, n_q, n_k, head_dim, qk_scale, sm_scale,
    HAS_PAD: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dV = P^T dO, dK = scale * dS^T Q for one key block, summed over all C*H queries of the
    sample in a fixed order (deterministic). Padded keys get exact zeros."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col = h * head_dim + offs_d
    kv_mask = (offs_n < n_k)[:, None] & d_ok[None, :]  # for the dK/dV stores
    k, v, valid = _load_kv_tile(K, V, PAD, b, offs_n, col, d_ok, n_k, stride_kb, stride_kn,
                                stride_vb, stride_vn, stride_pb, HAS_PAD, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row = pid_bh * n_q
    for start_m in range(0, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_q
        qm = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + col[None, :], mask=qm,
                    other=0.0)
        do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dom + col[None, :], mask=qm,
                     other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (N, M)
        p_t = tl.where(valid[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + offs_n[:, None] * stride_dkn + col[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + offs_n[:, None] * stride_dvn + col[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# Shipped configs for the sm_90 resource report (bench/resources.py reads RESOURCE_CONFIGS):
# the attention kernels at the production shapes (B=8, S=600, C*H=64 swap / 56 explicit,
# E=512/8 or 1024/16 heads -> dh=64; 64 x 64 tiles, 4 warps (8 for the fp32 dK/dV kernel, which
# spills 32 B at 4), 2 stages, as attention.attn_config)
# and the backward kernels of the fused MLP block (kernels/mlp/backward.py, bwd_config) that the
# energy path runs for every Linear.
# --------------------------------------------------------------------------------------------
def _attn_cfgs():
    out = []
    for dt in ("bf16", "fp32"):
        for E, heads in ((512, 8), (1024, 16)):
            p = f"*{dt}"
            common = dict(HAS_PAD=True, UPCAST=False, INPUT_PRECISION="tf32", BLOCK_M=64,
                          BLOCK_N=64, BLOCK_D=64)
            strides = dict(stride_qb=64 * E, stride_qm=E, stride_kb=600 * 2 * E, stride_kn=2 * E,
                           stride_vb=600 * 2 * E, stride_vn=2 * E, stride_pb=608)
            tag = f"{dt}.E{E}h{heads}"
            out.append(dict(
                name=f"energy.attn_fwd.{tag}", kernel=_energy_attn_fwd_kernel,
                args=dict(Q=p, K=p, V=p, PAD="*u8", O=p, LSE="*fp32", **strides,
                          stride_ob=64 * E, stride_om=E, n_heads=heads, n_q=64, n_k=600,
                          head_dim=64, qk_scale=0.18),
                constexprs=common, num_warps=4, num_stages=2, expect_wgmma=True))
            out.append(dict(
                name=f"energy.attn_bwd_pre.{tag}", kernel=_energy_attn_bwd_preprocess_kernel,
                args=dict(O=p, DO=p, DELTA="*fp32", stride_ob=64 * E, stride_om=E,
                          stride_dob=64 * E, stride_dom=E, n_heads=heads, n_q=64, head_dim=64),
                constexprs=dict(BLOCK_M=64, BLOCK_D=64), num_warps=4, num_stages=2))
            for shared in (True, False):
                out.append(dict(
                    name=f"energy.attn_bwd_dq.{tag}.{'shared' if shared else 'per_sample'}",
                    kernel=_energy_attn_bwd_dq_kernel,
                    args=dict(Q=p, K=p, V=p, PAD="*u8", DO=p, LSE="*fp32", DELTA="*fp32", DQ=p,
                              **strides, stride_dob=64 * E, stride_dom=E, stride_dqb=64 * E,
                              stride_dqm=E, n_batch=8, n_heads=heads, n_q=64, n_k=600,
                              head_dim=64, qk_scale=0.18, sm_scale=0.125),
                    constexprs=dict(SHARED_Q=shared, **common), num_warps=4, num_stages=2,
                    expect_wgmma=True))
            out.append(dict(
                name=f"energy.attn_bwd_dkdv.{tag}", kernel=_energy_attn_bwd_dkdv_kernel,
                args=dict(Q=p, K=p, V=p, PAD="*u8", DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p,
                          **strides, stride_dob=64 * E, stride_dom=E, stride_dkb=600 * E,
                          stride_dkn=E, stride_dvb=600 * E, stride_dvn=E, n_heads=heads,
                          n_q=64, n_k=600, head_dim=64, qk_scale=0.18, sm_scale=0.125),
                constexprs=common, num_warps=8 if dt == "fp32" else 4, num_stages=2,
                expect_wgmma=True))
    return out


def _mlp_bwd_cfgs():
    from ..mlp.backward import (_act_bwd_kernel, _ln_gemm_bwd_dw_kernel,
                                _ln_gemm_bwd_dx_kernel, bwd_config)
    cfg = bwd_config(interpret=False)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = [dict(name="energy.mlp_act_bwd.silu", kernel=_act_bwd_kernel,
                args=dict(DY="*fp32", H="*fp32", DH="*fp32", M=4800, N=512, stride_dym=512,
                          stride_hm=512, stride_dhm=512),
                constexprs=dict(ACT=2, BLOCK_M=BM, BLOCK_N=BN), **launch)]
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        # the state encoder's first Linear at production shape: M = B*S = 4800, K = D = 4096
        out.append(dict(
            name=f"energy.mlp_bwd_dw.{dt}.K4096", kernel=_ln_gemm_bwd_dw_kernel,
            args=dict(DH="*fp32", X=p, MEAN="*fp32", RSTD="*fp32", G=p, BETA=p, DW=p, DB=p,
                      M=4800, N=512, K=4096, stride_dhm=512, stride_xm=4096, stride_xk=1,
                      stride_dwn=4096),
            constexprs=dict(NORMALIZE=True, HAS_GAMMA=True, HAS_BETA=True, HAS_BIAS=True,
                            DOT_DTYPE=dt, UPCAST=False, INPUT_PRECISION="tf32", BLOCK_M=BM,
                            BLOCK_N=BN, BLOCK_K=BK), expect_wgmma=True, **launch))
        out.append(dict(
            name=f"energy.mlp_bwd_dx.{dt}.K512", kernel=_ln_gemm_bwd_dx_kernel,
            args=dict(DH="*fp32", W=p, X=p, MEAN="*fp32", RSTD="*fp32", G=p, DX=p,
                      SCRATCH="*fp32", DG_PART="*fp32", DBETA_PART="*fp32", M=4800, N=512,
                      K=512, stride_dhm=512, stride_wn=512, stride_wk=1, stride_xm=512,
                      stride_xk=1, stride_dxm=512, stride_sm=512),
            constexprs=dict(NORMALIZE=True, HAS_GAMMA=True, NEED_DX=True, NEED_PARTS=True,
                            DOT_DTYPE=dt, UPCAST=False, INPUT_PRECISION="tf32", BLOCK_M=BM,
                            BLOCK_N=BN, BLOCK_K=BK), expect_wgmma=True, **launch))
    return out


def _configs():
    try:
        return _attn_cfgs() + _mlp_bwd_cfgs()
    except ImportError:  # kernels/mlp not installed: the attention configs alone
        return _attn_cfgs()


RESOURCE_CONFIGS = _configs()
