"""Which LayerNorm prologue for the fused GEMM? Normalise the A tile on the fly, or fold
gamma/beta into W (W' = W*gamma, b' = b + W@beta, y = rstd*(x@W'^T - mean*rowsum(W')) + b')?

Emulates both in torch on the CPU (operands rounded to bf16 / tf32, fp32 accumulation) on
LLM-like rows: Gaussian, a few outlier dimensions ~100x the rest, optional per-row offset,
and compares against float64. ``python -m bench.ln_fold_numerics`` prints a table (NOTES.md).
"""
from __future__ import annotations

import torch

F64 = torch.float64


def tf32(t):  # round-to-nearest to a 10-bit mantissa
    b = t.float().view(torch.int32)
    b = (b + 0x1000) & ~0x1FFF
    return b.view(torch.float32)


def rnd(t, fmt):
    return t.to(torch.bfloat16).float() if fmt == "bf16" else tf32(t)


def case(M=64, K=2048, N=256, outliers=4, scale=100.0, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=F64)
    dims = torch.randperm(K, generator=g)[:outliers]
    x[:, dims] *= scale
    x += offset
    w = torch.randn(N, K, generator=g, dtype=F64) / K ** 0.5
    gamma = 1 + 0.1 * torch.randn(K, generator=g, dtype=F64)
    beta = 0.1 * torch.randn(K, generator=g, dtype=F64)
    b = 0.1 * torch.randn(N, generator=g, dtype=F64)
    return x, w, gamma, beta, b


def errors(fmt, **kw):
    x, w, gamma, beta, b = case(**kw)
    xr = rnd(x, fmt).double() if fmt == "bf16" else x  # bf16 inputs arrive rounded; fp32 do not
    w = rnd(w, fmt).double() if fmt == "bf16" else w
    mean = xr.mean(1, keepdim=True)
    rstd = (xr.var(1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    ref = ((xr - mean) * rstd * gamma + beta) @ w.T + b
    # on the fly: normalise in fp32, round the normalised tile to the dot format
    a = ((xr.float() - mean.float()) * rstd.float() * gamma.float() + beta.float())
    fly = rnd(a, fmt) @ rnd(w.float(), fmt).T + b.float()
    # fold: gamma into W (rounded to the dot format), beta into the bias
    wf = rnd((w * gamma).float(), fmt)
    c = wf.sum(1)
    bf = (b + w @ beta).float()
    fold = rstd.float() * (rnd(xr.float(), fmt) @ wf.T - mean.float() * c) + bf
    scale = ref.abs().max()
    return ((fly.double() - ref).abs().max() / scale).item(), ((fold.double() - ref).abs().max() / scale).item()


def main():
    print("| operands | rows | on-the-fly rel. err | fold rel. err |")
    print("|---|---|---|---|")
    for fmt in ("bf16", "tf32"):
        for name, kw in (("gaussian", dict(outliers=0)),
                         ("4 outlier dims x100", dict(outliers=4)),
                         ("4 outliers x100 + offset 3", dict(outliers=4, offset=3.0)),
                         ("no outliers, offset 30", dict(outliers=0, offset=30.0))):
            fly, fold = errors(fmt, **kw)
            print(f"| {fmt} | {name} | {fly:.2e} | {fold:.2e} |")


if __name__ == "__main__":
    main()
