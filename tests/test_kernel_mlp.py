"""The layer stack (kernels/mlp) against float64 autograd: MLPResNets of every shape the energy
model uses and some it does not (0 to 3 blocks, K = an action dim, N = 1, no LayerNorm affine,
no bias), forward and every gradient; its plan's layout; torch.compile over it; the tf32 dot.

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest), every launcher output
NaN-poisoned first; bf16 and tf32x3 only on a GPU."""
import copy

import pytest
import torch
import triton
import triton.language as tl

from energy_train.kernels._utils import POISON_ENV, dot, round_tf32
from energy_train.kernels.mlp import (EXTERNAL, NONE, X_IN, StackLayer, mlp_resnet_reference,
                                      mlp_resnet_stack, new_plan)
from energy_train.kernels.weights import LNLinear, MLPResNetWeights
from energy_train.models.mlp import MLPResNet
from energy_train.models.weights import mlp_resnet_weights
from energy_train.testing import assert_close, assert_close_to_eager

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")


def _mlp(blocks, k, hidden, n, act, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = MLPResNet(blocks, k, hidden, n, act)
    with torch.no_grad():  # LayerNorm affines and biases away from 1 / 0: each one matters
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.to(DEV, dtype), copy.deepcopy(m).to(DEV, torch.float64)


def _run(m, m64, x, grad_x=True):
    """(y, dx, grads) of the stack and of float64 eager, and eager in m's dtype."""
    me = copy.deepcopy(m)
    outs = []
    for model, fn, dt in ((m, mlp_resnet_stack, None), (m64, mlp_resnet_reference, torch.float64),
                          (me, mlp_resnet_reference, None)):
        xi = x.to(dt or x.dtype).clone().requires_grad_(grad_x)
        y = fn(xi, mlp_resnet_weights(model))
        outs.append((y, xi, model))
    g = torch.randn(outs[1][0].shape, dtype=torch.float64, device=DEV,
                    generator=torch.Generator(DEV).manual_seed(1))
    for y, _, _ in outs:
        (y.double() * g).sum().backward()
    return outs


@pytest.mark.parametrize("blocks,k,hidden,n,act", [
    (1, 40, 48, 48, "silu"), (1, 5, 48, 48, "silu"), (2, 48, 48, 1, "silu"),
    (0, 37, 24, 9, "relu"), (3, 19, 40, 21, "relu")],
    ids=["state", "action-K5", "head-N1", "no-block", "3-blocks"])
def test_mlp_resnet_stack_fp32(blocks, k, hidden, n, act, seed):
    m, m64 = _mlp(blocks, k, hidden, n, act, seed)
    x = torch.randn(3, 23, k, device=DEV)  # 69 rows: not a multiple of any tile
    (y, x32, _), (y64, x64, _), (ye, xe, me) = _run(m, m64, x)
    assert y.shape == (3, 23, n)
    assert_close_to_eager("y", y64, y, ye)
    assert_close_to_eager("dx", x64.grad, x32.grad, xe.grad)
    for (name, p), (_, p64), (_, pe) in zip(m.named_parameters(), m64.named_parameters(),
                                            me.named_parameters()):
        assert_close_to_eager(f"grad {name}", p64.grad, p.grad, pe.grad)


def test_mlp_resnet_stack_fp16_and_input_without_grad():
    m, m64 = _mlp(1, 40, 48, 16, "silu", 4, torch.float16)
    x = torch.randn(37, 40, device=DEV).half()
    (y, x16, _), (y64, _, _), _ = _run(m, m64, x, grad_x=False)
    assert x16.grad is None and all(p.grad is not None for p in m.parameters())
    assert_close("y fp16", y64, y, torch.float16)


def test_mlp_resnet_stack_without_layernorm_affine_or_bias():
    """An absent LayerNorm weight / bias or Linear bias reads the plan's constants (ones,
    zeros): the same numbers as the reference, which applies none."""
    g = torch.Generator().manual_seed(5)

    def lin(n, k, affine, bias):
        w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
        return LNLinear(w, torch.randn(n, generator=g, dtype=torch.float64) if bias else None,
                        torch.rand(k, generator=g, dtype=torch.float64) + 0.5 if affine else None,
                        torch.randn(k, generator=g, dtype=torch.float64) if affine else None, 1e-5)
    w64 = MLPResNetWeights(lin(32, 20, False, True), (lin(32, 32, True, False),),
                           lin(7, 32, False, False), "silu")
    def f32(layer):
        return LNLinear(*[t.float() if isinstance(t, torch.Tensor) else t for t in layer])
    w32 = MLPResNetWeights(f32(w64.fc1), tuple(f32(b) for b in w64.blocks), f32(w64.fc2), "silu")
    x = torch.randn(29, 20, generator=g)
    assert_close("y", mlp_resnet_reference(x.double(), w64), mlp_resnet_stack(x, w32))


def test_mlp_resnet_stack_empty_rows_and_leading_dims():
    m, _ = _mlp(1, 12, 16, 3, "relu", 6)
    w = mlp_resnet_weights(m)
    assert mlp_resnet_stack(torch.randn(0, 12, device=DEV), w).shape == (0, 3)
    x = torch.randn(2, 3, 5, 12, device=DEV)
    assert_close("y 4-d", mlp_resnet_reference(x, w), mlp_resnet_stack(x, w))


def test_plan_regions_never_overlap_and_gradients_chain():
    """Every ws / wb region a plan allocates is its own; a layer's dx region is the previous
    layer's dy; the first layer's dx is what the caller asked for."""
    plan = new_plan(torch.float32, ones=10_000, zeros=20_000)
    L = [StackLayer(7, 16, 0, act="silu"), StackLayer(16, 16, 200, act="silu", res=True),
         StackLayer(16, 3, 600)]
    first, last, _ = plan.add_chain(11, L, X_IN, EXTERNAL, EXTERNAL, out=EXTERNAL)
    from energy_train.kernels.mlp.launch import C
    ws, wb = [], []
    for r in plan.rows:
        M, K, N = r[C["M"]], r[C["K"]], r[C["N"]]
        for col, size in (("OUT", M * N), ("PRE", M * N), ("MU", M), ("RSTD", M)):
            if r[C[col]] >= 0:
                ws.append((r[C[col]], size))
        for col, size in (("DPRE", M * N), ("DX", M * K)):
            if r[C[col]] >= 0:
                wb.append((r[C[col]], size))
    for regions, total in ((ws, plan.ws), (wb, plan.wb)):
        regions.sort()
        assert all(a + n <= b for (a, n), (b, _) in zip(regions, regions[1:]))
        assert regions[-1][0] + regions[-1][1] <= total
    rows = plan.rows
    assert rows[last][C["DY"]] == EXTERNAL and rows[first][C["DX"]] == EXTERNAL
    assert rows[first][C["SCR"]] >= 0  # an external dx keeps dxhat in its own fp32 region
    for i in range(first + 1, last + 1):
        assert rows[i][C["DX"]] == rows[i - 1][C["DY"]] >= 0
    plan2 = new_plan(torch.float32, ones=10_000, zeros=20_000)
    f2, _, _ = plan2.add_chain(11, L, X_IN, EXTERNAL, NONE)
    assert plan2.rows[f2][C["DX"]] == NONE


def test_mlp_resnet_stack_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) over the stack op and its backward (aot_eager on the CPU:
    forward and backward graphs traced with the registered fakes); eager's numbers."""
    m, _ = _mlp(1, 10, 16, 4, "silu", 8)
    w = mlp_resnet_weights(m)
    x = torch.randn(13, 10, device=DEV)

    def f(x):
        return (mlp_resnet_stack(x, w) ** 2).sum()

    torch._dynamo.reset()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    lc = torch.compile(f, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")(xc)
    le = f(xe)
    lc.backward()
    le.backward()
    assert_close("compiled loss", le, lc)
    assert_close("compiled dx", xe.grad, xc.grad)


# --------------------------------------------------------------------------------------------
# tf32: operands rounded to nearest before the MMA
# --------------------------------------------------------------------------------------------
def _rna_tf32(t):
    """fp32 -> nearest tf32, ties away from zero (cuBLAS's cvt.rna), in torch."""
    b = t.float().contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


@triton.jit
def _round_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, round_tf32(x), mask=offs < n)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M, N, K, PREC: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                other=0.0)
    b = tl.load(b_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                other=0.0)
    c = dot(a, tl.trans(b), None, PREC)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c, mask=(rm[:, None] < M) & (rn[None, :] < N))


def test_round_tf32_is_round_to_nearest_ties_away():
    one = 1.0
    ulp = 2.0 ** -10  # tf32's spacing at 1
    x = torch.tensor([one, one + ulp / 2, one + ulp / 2 - 2 ** -23, -(one + ulp / 2), 3.0e38,
                      float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40],
                     dtype=torch.float32)
    x = torch.cat([x, torch.randn(245) * 1e3]).to(DEV)
    y = torch.full_like(x, 7.0)
    _round_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=256)
    want = _rna_tf32(x)
    want[5:8] = x[5:8]  # inf, -inf, nan pass unchanged
    assert y[1] == one + ulp and y[2] == one and y[3] == -(one + ulp)  # ties away, below rounds down
    assert torch.equal(y[~x.isnan()], want[~x.isnan()]) and y[7].isnan()


def test_tf32_dot_rounds_operands_to_nearest():
    """dot(..., "tf32") rounds fp32 operands to the nearest tf32 before the MMA (which would
    truncate them). Under the interpreter (exact products) the result equals exact products of
    the rounded operands; truncated operands are ~2x further from float64."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(60, 120, generator=g).to(DEV)
    b = torch.randn(45, 120, generator=g).to(DEV)
    c = torch.empty(60, 45, device=DEV)
    _dot_kernel[(1,)](a, b, c, 60, 45, 120, PREC="tf32", BM=64, BN=64, BK=128)
    exact = a.double() @ b.double().T
    rna = _rna_tf32(a).double() @ _rna_tf32(b).double().T
    trunc = ((a.view(torch.int32) & ~0x1FFF).view(torch.float32).double()
             @ (b.view(torch.int32) & ~0x1FFF).view(torch.float32).double().T)
    assert_close("tf32 vs rounded operands", rna, c, tol=2e-6)
    err = (c.double() - exact).abs().max() / exact.abs().max()
    err_trunc = (trunc - exact).abs().max() / exact.abs().max()
    assert 1e-5 < err < 1e-3 and err < 0.75 * err_trunc, (err, err_trunc)


# --------------------------------------------------------------------------------------------
# GPU only: bf16, tf32x3 at the energy model's production widths
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-tf32x3"])
@pytest.mark.parametrize("blocks,k,hidden,n", [(1, 4096, 512, 512), (2, 512, 512, 1)],
                         ids=["state-D4096", "head"])
def test_mlp_resnet_stack_gpu(dtype, blocks, k, hidden, n):
    m, m64 = _mlp(blocks, k, hidden, n, "silu", 0, dtype)
    x = torch.randn(1200, k, device=DEV).to(dtype)
    (y, x1, _), (y64, x64, _), (ye, xe, me) = _run(m, m64, x)
    factor, min_tol = (2.0, 1e-5) if dtype == torch.float32 else (1.5, 5e-3)
    assert_close_to_eager("y", y64, y, ye, factor=factor, min_tol=min_tol)
    for (name, p), (_, p64), (_, pe) in zip(m.named_parameters(), m64.named_parameters(),
                                            me.named_parameters()):
        assert_close_to_eager(f"grad {name}", p64.grad, p.grad, pe.grad, factor=factor,
                              min_tol=min_tol, floor=1e-3 * p64.grad.abs().max().item())
