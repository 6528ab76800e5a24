"""Backward of the fused MLP block (kernels/mlp) against float64 autograd.

CPU under TRITON_INTERPRET=1, fp32 ieee; odd shapes (rows not filling a tile, K=5 = an action
dim, N=1 = the energy head's output), every activation, LayerNorm on/off, residual; NaN-poisoned
outputs come from torch.empty being checked for NaN by assert_close (every element written)."""
import os

import pytest
import torch
import torch.nn.functional as F

from energy_train.testing import assert_close

pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() or
                                      os.environ.get("TRITON_INTERPRET") == "1"),
                                 reason="needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")]


@pytest.mark.parametrize("M,K,N,act,normalize,residual", [
    (37, 40, 48, "silu", True, False), (21, 5, 48, "relu", True, False),
    (19, 48, 1, "none", True, False), (23, 48, 48, "silu", True, True),
    (23, 48, 30, "none", False, False)],
    ids=["M37-K40-N48-silu-ln", "M21-K5-N48-relu-ln", "M19-K48-N1-ln", "M23-K48-N48-silu-ln-res",
         "M23-K48-N30-noln"])
def test_ln_linear_autograd_matches_float64(M, K, N, act, normalize, residual):
    from energy_train.kernels.mlp import ln_linear_autograd
    g = torch.Generator().manual_seed(M * 100 + K)
    def r(*s, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_()
    x, W, b = r(M, K), r(N, K, scale=K ** -0.5), r(N)
    gam, bet = r(K, scale=0.1, shift=1.0), r(K, scale=0.1)
    res = r(M, N) if residual else None
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    a = F.layer_norm(x, (K,), gam, bet, 1e-5) if normalize else x
    h = a @ W.T + b
    y = {"none": h, "relu": torch.relu(h), "silu": F.silu(h)}[act] + (res if residual else 0)
    leaves = [x, W, b] + ([gam, bet] if normalize else []) + ([res] if residual else [])
    ref = torch.autograd.grad((y * dy).sum(), leaves)

    f = [t.detach().float().requires_grad_() for t in (x, W, b, gam, bet)]
    fres = res.detach().float().requires_grad_() if residual else None
    out = ln_linear_autograd(f[0], f[1], f[2], ln_weight=f[3] if normalize else None,
                             ln_bias=f[4] if normalize else None, normalize=normalize,
                             activation=act, residual=fres, input_precision="ieee")
    assert_close("y", y, out, tol=1e-5)
    (out * dy.float()).sum().backward()
    got = [t.grad for t in (f[0], f[1], f[2]) + ((f[3], f[4]) if normalize else ())]
    if residual:
        got.append(fres.grad)
    names = ["dx", "dW", "db", "dgamma", "dbeta"][:3 + 2 * normalize] + (["dresidual"] if residual else [])
    for name, want, have in zip(names, ref, got):
        assert_close(name, want, have, tol=1e-5)


def test_backward_without_dx_still_gives_parameter_grads():
    from energy_train.kernels.mlp import ln_linear_autograd
    torch.manual_seed(0)
    x = torch.randn(17, 40)
    W = torch.randn(24, 40, requires_grad=True)
    gam = torch.ones(40, requires_grad=True)
    out = ln_linear_autograd(x, W, None, ln_weight=gam, normalize=True, activation="relu")
    out.sum().backward()
    assert x.grad is None and W.grad is not None and gam.grad is not None
    ref_W = W.detach().double().requires_grad_()
    ref_g = gam.detach().double().requires_grad_()
    torch.relu(F.layer_norm(x.double(), (40,), ref_g, None) @ ref_W.T).sum().backward()
    assert_close("dW", ref_W.grad, W.grad, tol=1e-5)
    assert_close("dgamma", ref_g.grad, gam.grad, tol=1e-5)
