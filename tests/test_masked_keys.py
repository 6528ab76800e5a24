"""A key that the pad mask hides contributes exactly nothing, whatever it holds (NaN, +inf,
-inf), on both backends, forward and backward; and a bad ``action_index`` never makes the fused
layer-actions pass read another sample's memory."""
import copy

import pytest
import torch

from energy_train import (EnergyModel, L1RegressionActionHead, build_action_index,
                          energy_scores, layer_actions, swap_infonce)
from energy_train.kernels.energy import energy_attention_reference
from energy_train.kernels.energy.launch import attention_bwd, attention_fwd
from energy_train.tensors import gather_rows
from energy_train.testing import assert_close

B, S, D, C, H, Da, HID, HEADS = 3, 23, 12, 4, 3, 5, 24, 3
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels under the interpreter


def _setup(seed):
    torch.manual_seed(seed)
    model = EnergyModel(D, Da, hidden=HID, heads=HEADS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(B, S, D, generator=g)
    pad = torch.rand(B, S, generator=g) < 0.4
    pad[0] = False
    pad[1] = True  # a sample with every key masked
    cand = torch.randn(B, C, H, Da, generator=g)
    return model.to(DEV), ctx.to(DEV), pad.to(DEV), cand.to(DEV)


def _run(model, ctx, pad, cand, backend):
    """Energies and the gradients of a random projection of them: every parameter, the
    candidates, the context."""
    model = copy.deepcopy(model)
    ctx = ctx.clone().requires_grad_()
    cand = cand.clone().requires_grad_()
    e = energy_scores(model, ctx, pad, cand, backend=backend)
    w = torch.randn(e.shape, generator=torch.Generator().manual_seed(0)).to(DEV)
    (e * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return e.detach(), grads, ctx.grad, cand.grad


def _poisoned(ctx, pad):
    """ctx with NaN, +inf and -inf (in turn, element by element) at every masked position."""
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")], device=ctx.device)
    fill = bad[torch.arange(ctx.numel(), device=ctx.device) % 3].view(ctx.shape)
    return torch.where(pad[..., None], fill, ctx)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_masked_context_rows_contribute_nothing(backend):
    model, ctx, pad, cand = _setup(1)
    clean = ctx.masked_fill(pad[..., None], 0.0)
    dirty = _poisoned(ctx, pad)
    assert dirty[pad].isnan().any() and dirty[pad].isposinf().any() and dirty[pad].isneginf().any()
    e0, g0, dctx0, dcand0 = _run(model, clean, pad, cand, backend)
    e1, g1, dctx1, dcand1 = _run(model, dirty, pad, cand, backend)
    assert torch.isfinite(e0).all()
    assert torch.equal(e0, e1), "a masked key changed the energies"
    for name in g0:
        assert torch.equal(g0[name], g1[name]), f"a masked key changed grad {name}"
    assert torch.equal(dcand0, dcand1)
    assert torch.equal(dctx0, dctx1)
    assert (dctx1[pad] == 0).all(), "a masked key must get exactly zero gradient"


def test_masked_keys_leave_the_swap_loss_unchanged_across_backends():
    model, ctx, pad, _ = _setup(2)
    dirty = _poisoned(ctx, pad)
    expert = torch.randn(B, H, Da, generator=torch.Generator().manual_seed(2)).to(DEV)
    eager = swap_infonce(model, dirty, pad, expert, backend="eager")
    fused = swap_infonce(model, dirty, pad, expert, backend="triton")
    assert torch.isfinite(eager.loss) and torch.isfinite(fused.loss)
    assert_close("swap energies", eager.energies, fused.energies, torch.float32)


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample-q", "shared-q"])
def test_attention_kernel_never_reads_a_padded_key(shared):
    """The kernels alone: K|V holding NaN at padded keys give the output and gradients of K|V
    holding zeros there; the padded keys' gradient is exactly zero."""
    g = torch.Generator().manual_seed(3)
    E = HID
    _, _, pad, _ = _setup(3)
    q = torch.randn(1 if shared else B, C * H, E, generator=g).to(DEV)
    kv = torch.randn(B, S, 2 * E, generator=g).to(DEV)
    dout = torch.randn(B, C * H, E, generator=g).to(DEV)

    def reference(kv_in):
        qq, kk = q.clone().requires_grad_(), kv_in.clone().requires_grad_()
        out = energy_attention_reference(qq, kk[..., :E], kk[..., E:], pad, HEADS)
        dq, dkv = torch.autograd.grad((out * dout).sum(), (qq, kk))
        return out, dq, dkv

    def fused(kv_in):  # the launchers, as the energy op calls them
        out, lse = torch.empty(B, C * H, E, device=DEV), torch.empty(B, HEADS, C * H, device=DEV)
        attention_fwd(q, kv_in, pad, out, lse, HEADS, torch.float32, "ieee")
        dq, dkv = torch.empty_like(q), torch.empty_like(kv_in)
        attention_bwd(dout, q, kv_in, pad, out, lse, dq, dkv, HEADS, torch.float32, "ieee")
        return out, dq, dkv

    def run(kv_in, fn):
        return fn(kv_in)

    clean = kv.masked_fill(pad[..., None], 0.0)
    dirty = _poisoned(kv, pad)
    for fn in (fused, reference):
        want, got = run(clean, fn), run(dirty, fn)
        for name, a, b in zip(("out", "dq", "dkv"), want, got):
            assert torch.equal(a, b), f"{fn.__name__}: {name} changed"
        assert (got[2][pad] == 0).all()
    for name, a, b in zip(("out", "dq", "dkv"), run(dirty, reference), run(dirty, fused)):
        assert_close(name, a, b, torch.float32)


# --------------------------------------------------------------------------------------------
# layer actions: an out-of-range index reads zeros, never another sample's memory
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [32, 20], ids=["in-place-gather", "compact-fallback"])
def test_bad_action_index_reads_zeros_not_other_samples(d):
    torch.manual_seed(4)
    b, T, L = 3, 17, 3
    head = L1RegressionActionHead(d, 24, Da, H).to(DEV)
    hs = [torch.randn(b, T, d, device=DEV) for _ in range(L)]
    for h in hs:  # sample 1 holds NaN everywhere: reading it would poison sample 0 or 2
        h[1] = float("nan")
    idx = build_action_index(num_tokens=H * Da, start=torch.tensor([2, 0, 1], device=DEV))
    idx[0, 0], idx[0, 5], idx[2, 3], idx[2, 7] = T, -1, 2 * T + 3, -T - 1  # next/previous rows
    ref = layer_actions(hs, idx, head, include_embeddings=True, backend="eager")
    out = layer_actions(hs, idx, head, include_embeddings=True, backend="triton")
    keep = [0, 2]
    assert torch.isfinite(out[:, keep]).all(), "a bad index read another sample's rows"
    assert_close("bad index", ref[:, keep], out[:, keep], torch.float32)
    # the documented result: those action rows are zeros
    good = idx.clamp(0, T - 1)
    ok = (idx >= 0) & (idx < T)
    rows = torch.stack([gather_rows(h, good).masked_fill(~ok[..., None], 0) for h in hs])
    want = head.predict_action(rows.reshape(L * b, H * Da, d)).reshape(L, b, H, Da)
    assert_close("zero rows", want[:, keep], out[:, keep], torch.float32)
    with pytest.raises(ValueError, match=r"action_index: positions must lie in \[0, 17\)"):
        layer_actions(hs, idx, head, validate=True)
