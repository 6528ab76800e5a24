"""The fused LN-prologue GEMM (kernels/mlp) against its float64 eager reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest); bf16 and tf32 only on a GPU.
"""
import pytest
import torch
import triton
import triton.language as tl

from energy_train.kernels._utils import round_tf32
from energy_train.kernels.mlp import ln_linear, ln_stats
from energy_train.kernels.mlp.reference import ln_linear_reference
from energy_train.testing import assert_close, poison

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(M, K, N, dtype, seed, outliers=0, offset=0.0, R=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R or M, K, generator=g, dtype=F64)
    if outliers:  # LLM activations: a few dimensions ~100x the rest
        x[:, torch.randperm(K, generator=g)[:outliers]] *= 100.0
    x += offset
    p = dict(x=x, weight=torch.randn(N, K, generator=g, dtype=F64) / K ** 0.5,
             bias=torch.randn(N, generator=g, dtype=F64),
             ln_weight=1 + 0.3 * torch.randn(K, generator=g, dtype=F64),
             ln_bias=0.3 * torch.randn(K, generator=g, dtype=F64),
             residual=torch.randn(M, N, generator=g, dtype=F64))
    # round once to the test dtype, so kernel and float64 oracle see the same numbers
    return {k: v.to(dtype).to(DEV) for k, v in p.items()}


def _run(p, dtype, *, normalize, affine, activation, residual, precision="ieee", **kw):
    M, N = (p["residual"].shape if "row_index" not in kw else (kw["row_index"].shape[0], p["weight"].shape[0]))
    out = poison((M, N), dtype, DEV)
    args = dict(ln_weight=p["ln_weight"] if affine else None, ln_bias=p["ln_bias"] if affine else None,
                normalize=normalize, activation=activation,
                residual=p["residual"] if residual else None)
    y = ln_linear(p["x"], p["weight"], p["bias"], out=out, input_precision=precision, **args, **kw)
    assert y is out
    ref = ln_linear_reference(*(p[k].to(F64) for k in ("x", "weight", "bias")),
                              **{k: (v.to(F64) if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
                              row_index=kw.get("row_index"))
    return ref, y


COMBOS = [  # (normalize, affine LN, activation, residual)
    (True, True, "relu", True), (True, True, "silu", False), (True, False, "none", True),
    (False, False, "relu", False), (False, False, "silu", True), (True, True, "none", False),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"ln{int(c[0])}-aff{int(c[1])}-{c[2]}-res{int(c[3])}")
def test_ln_linear_fp32_combos(combo, seed):
    p = _inputs(37, 96, 45, torch.float32, seed)
    ref, y = _run(p, torch.float32, normalize=combo[0], affine=combo[1], activation=combo[2],
                  residual=combo[3])
    assert_close("y", ref, y, torch.float32)


@pytest.mark.parametrize("combo", COMBOS[:3], ids=lambda c: f"ln{int(c[0])}-aff{int(c[1])}-{c[2]}-res{int(c[3])}")
def test_ln_linear_fp16(combo):
    p = _inputs(37, 96, 45, torch.float16, 5)
    ref, y = _run(p, torch.float16, normalize=combo[0], affine=combo[1], activation=combo[2],
                  residual=combo[3])
    assert_close("y", ref, y, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [dict(outliers=3), dict(outliers=3, offset=4.0), dict(offset=40.0)],
                         ids=["outliers", "outliers+offset", "offset"])
def test_ln_linear_outlier_rows(rows, dtype):
    """LayerNorm statistics and the on-the-fly normalisation on LLM-like rows."""
    p = _inputs(29, 160, 33, dtype, 11, **rows)
    ref, y = _run(p, dtype, normalize=True, affine=True, activation="silu", residual=True)
    assert_close("y", ref, y, dtype)
    mean, rstd = ln_stats(p["x"])
    _, m_ref, r_ref = ln_linear_reference(p["x"].to(F64), p["weight"].to(F64), return_stats=True)
    assert_close("mean", m_ref, mean, torch.float32, tol=1e-6 if dtype == torch.float32 else 1e-5,
                 floor=1.0)
    assert_close("rstd", r_ref, rstd, torch.float32)


def test_ln_linear_small_n_inline_stats_and_reuse(seed):
    """N <= one tile: statistics computed inline and returned; stats= reuses them."""
    p = _inputs(23, 80, 5, torch.float32, seed)
    y, mean, rstd = ln_linear(p["x"], p["weight"], p["bias"], ln_weight=p["ln_weight"],
                              ln_bias=p["ln_bias"], normalize=True, return_stats=True,
                              input_precision="ieee", out=poison((23, 5), torch.float32, DEV))
    ref, m_ref, r_ref = ln_linear_reference(p["x"].to(F64), p["weight"].to(F64), p["bias"].to(F64),
                                            ln_weight=p["ln_weight"].to(F64), ln_bias=p["ln_bias"].to(F64),
                                            normalize=True, return_stats=True)
    assert_close("y", ref, y)
    assert_close("mean", m_ref, mean, floor=1.0)
    assert_close("rstd", r_ref, rstd)
    # wide N: statistics from the pre-pass kernel, returned too
    q = _inputs(23, 80, 70, torch.float32, seed)
    _, m2, r2 = ln_linear(q["x"], q["weight"], normalize=True, return_stats=True,
                          input_precision="ieee")
    _, m2_ref, r2_ref = ln_linear_reference(q["x"].to(F64), q["weight"].to(F64), return_stats=True)
    assert_close("mean(pre-pass)", m2_ref, m2, floor=1.0)
    assert_close("rstd(pre-pass)", r2_ref, r2)
    # reuse: the same statistics given back skip the pre-pass and give the same y
    y2 = ln_linear(p["x"], p["weight"], p["bias"], ln_weight=p["ln_weight"], ln_bias=p["ln_bias"],
                   normalize=True, stats=(mean, rstd), input_precision="ieee")
    assert_close("y(stats=)", ref, y2)


def test_ln_linear_row_gather(seed):
    p = _inputs(31, 96, 45, torch.float32, seed, R=50)
    idx = torch.randint(0, 50, (31,), generator=torch.Generator().manual_seed(seed)).to(DEV)
    p["residual"] = p["residual"][:31]
    ref, y = _run(p, torch.float32, normalize=True, affine=True, activation="relu", residual=True,
                  row_index=idx)
    assert_close("y", ref, y)


def test_ln_linear_segment_gather():
    """Rows made of NSEG segments gathered by element offsets (the layer-actions path)."""
    g = torch.Generator().manual_seed(3)
    src = torch.randn(40, 32, generator=g).to(DEV)
    M, nseg = 19, 3
    pick = torch.randint(0, 40, (M, nseg), generator=g).to(DEV)
    off = pick * src.stride(0)
    w = (torch.randn(21, nseg * 32, generator=g) / 10).to(DEV)
    y = ln_linear(src, w, normalize=True, segment_offsets=off, input_precision="ieee",
                  out=poison((M, 21), torch.float32, DEV))
    a = src.to(F64)[pick].reshape(M, nseg * 32)
    ref = ln_linear_reference(a, w.to(F64), normalize=True)
    assert_close("y", ref, y)


def test_ln_linear_strided_inputs_and_out_dtype():
    p = _inputs(37, 96, 45, torch.float32, 1)
    xt = p["x"].t().contiguous().t()  # column-major view
    y = ln_linear(xt, p["weight"], p["bias"], normalize=True, out_dtype=torch.float16,
                  input_precision="ieee")
    assert y.dtype == torch.float16
    ref = ln_linear_reference(p["x"].to(F64), p["weight"].to(F64), p["bias"].to(F64), normalize=True)
    assert_close("y", ref, y, torch.float16)


def test_ln_linear_bad_input():
    x, w = torch.randn(5, 16, device=DEV), torch.randn(7, 16, device=DEV)
    with pytest.raises(ValueError, match="x: expected size 16"):
        ln_linear(torch.randn(5, 17, device=DEV), w)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ln_linear(x, w.double())
    with pytest.raises(ValueError, match="activation"):
        ln_linear(x, w, activation="gelu")
    with pytest.raises(ValueError, match="bias: expected size 7"):
        ln_linear(x, w, torch.randn(6, device=DEV))
    with pytest.raises(ValueError, match="residual"):
        ln_linear(x, w, residual=torch.randn(5, 6, device=DEV))
    with pytest.raises(ValueError, match="normalize=False"):
        ln_linear(x, w, ln_weight=torch.ones(16, device=DEV))
    with pytest.raises(ValueError, match="input_precision"):
        ln_linear(x, w, input_precision="bf16x3")
    with pytest.raises(ValueError, match="multiple of 16"):
        ln_linear(x, torch.randn(7, 18, device=DEV), normalize=True,
                  segment_offsets=torch.zeros(5, 2, dtype=torch.int64, device=DEV))


def test_ln_linear_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ln_linear(torch.randn(4, 16), torch.randn(3, 16))


def _rna_tf32(t):
    """fp32 -> nearest tf32, ties away from zero (cuBLAS's cvt.rna), in torch."""
    b = t.float().contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


@triton.jit
def _round_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, round_tf32(x), mask=offs < n)


def test_round_tf32_is_round_to_nearest_ties_away():
    one = 1.0
    ulp = 2.0 ** -10  # tf32's spacing at 1
    x = torch.tensor([one, one + ulp / 2, one + ulp / 2 - 2 ** -23, -(one + ulp / 2), 3.0e38,
                      float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40],
                     dtype=torch.float32)
    x = torch.cat([x, torch.randn(245) * 1e3])
    y = torch.full_like(x, 7.0)
    _round_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=256)
    want = _rna_tf32(x)
    want[5:8] = x[5:8]  # inf, -inf, nan pass unchanged
    assert y[1] == one + ulp and y[2] == one and y[3] == -(one + ulp)  # ties away, below rounds down
    assert torch.equal(y[~x.isnan()], want[~x.isnan()]) and y[7].isnan()


def test_tf32_dot_rounds_operands_to_nearest():
    """input_precision="tf32": the operands are rounded to the nearest tf32 before the dot (the
    MMA would truncate them). Under the interpreter the result equals exact products of the
    rounded operands; truncated operands would be ~2x further from float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(67, 150, generator=g)
    w = torch.randn(45, 150, generator=g)
    y = ln_linear(x, w, input_precision="tf32")
    exact = x.double() @ w.double().T
    rna = _rna_tf32(x).double() @ _rna_tf32(w).double().T
    trunc = ((x.view(torch.int32) & ~0x1FFF).view(torch.float32).double()
             @ (w.view(torch.int32) & ~0x1FFF).view(torch.float32).double().T)
    assert_close("tf32 vs rounded operands", rna, y, tol=2e-6)
    err = (y.double() - exact).abs().max() / exact.abs().max()
    err_trunc = (trunc - exact).abs().max() / exact.abs().max()
    assert 1e-5 < err < 1e-3 and err < 0.75 * err_trunc, (err, err_trunc)


# --------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter's bf16 dot is wrong), tf32, a production-sized GEMM
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "tf32"), (torch.float16, "tf32"),
                                             (torch.float32, "tf32"), (torch.float32, "ieee")],
                         ids=["bf16", "fp16", "tf32", "fp32"])
@pytest.mark.parametrize("shape", [(37, 96, 45), (300, 1000, 515), (2112, 4096, 4096)],
                         ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_ln_linear_gpu(shape, dtype, precision):
    p = _inputs(*shape, dtype, 0, outliers=4)
    ref, y = _run(p, dtype, normalize=True, affine=True, activation="silu", residual=True,
                  precision=precision)
    assert_close("y", ref, y, "tf32" if (dtype == torch.float32 and precision == "tf32") else dtype)
