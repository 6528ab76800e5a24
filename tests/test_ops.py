"""The eager ops and losses against the public formulations (float64), odd shapes."""
import pytest
import torch

from bench.baselines import (public_layer_actions_loop, replicated_energy_scores,
                             replicated_explicit_infonce, replicated_swap_infonce)
from energy_train import (EnergyModel, L1RegressionActionHead, build_action_index,
                          correct_actions, energy_scores, explicit_infonce, layer_actions,
                          margin_ranking, ranking_accuracy, structured_negatives, swap_infonce)
from energy_train.tensors import gather_rows
from energy_train.testing import assert_close

F64 = torch.float64


def _oft_batch(B=3, T=41, D=10, H=3, Da=5, L=4, seed=0):
    """Hidden states with action tokens at a different offset per sample, plus their mask."""
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(B, T, D, generator=g, dtype=F64) for _ in range(L + 1)]
    starts = torch.randint(0, T - H * Da, (B,), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, starts[b]: starts[b] + H * Da] = True
    return hs, mask, starts


@pytest.mark.parametrize("shape", [(3, 41, 10, 3, 5, 4), (1, 17, 6, 2, 7, 2), (5, 60, 12, 5, 7, 3)],
                         ids=lambda s: "B{}-T{}-D{}-H{}-Da{}-L{}".format(*s))
def test_layer_actions_equals_public_loop(shape, seed):
    B, T, D, H, Da, L = shape
    hs, mask, _ = _oft_batch(B, T, D, H, Da, L, seed)
    head = L1RegressionActionHead(D, 9, Da, H).double()
    ref = public_layer_actions_loop(hs, mask, head)
    idx = build_action_index(num_tokens=H * Da, mask=mask)
    out = layer_actions(hs, idx, head, include_embeddings=True, backend="eager")
    assert out.shape == (L + 1, B, H, Da)
    assert_close("layer_actions", ref, out, F64, tol=1e-12)
    # default: the embeddings (entry 0) are skipped; a stacked tensor works too
    out2 = layer_actions(torch.stack(hs), idx, head)
    assert_close("layer_actions[1:]", ref[1:], out2, F64, tol=1e-12)
    # explicit layer list, negative indices allowed
    out3 = layer_actions(hs, idx, head, layers=[0, -1])
    assert_close("layers=[0,-1]", ref[[0, L]], out3, F64, tol=1e-12)


def test_layer_actions_runs_without_grad_and_on_pregathered_rows():
    hs, mask, _ = _oft_batch()
    head = L1RegressionActionHead(10, 9, 5, 3).double()
    idx = build_action_index(num_tokens=15, mask=mask)
    rows = [gather_rows(h, idx) for h in hs]
    a = layer_actions(hs, idx, head)
    b = layer_actions(rows, None, head)
    assert not a.requires_grad
    assert_close("pregathered", a, b, F64, tol=1e-12)


def test_layer_actions_final_norm_logit_lens():
    hs, mask, _ = _oft_batch()
    head = L1RegressionActionHead(10, 9, 5, 3).double()
    norm = torch.nn.LayerNorm(10).double()
    torch.nn.init.normal_(norm.weight)
    idx = build_action_index(num_tokens=15, mask=mask)
    out = layer_actions(hs, idx, head, final_norm=norm)
    normed = [norm(h) for h in hs[:-1]] + [hs[-1]]  # the last state is already normalised
    ref = public_layer_actions_loop(normed, mask, head)[1:]
    assert_close("final_norm", ref, out, F64, tol=1e-12)


def test_build_action_index_layouts():
    B, T, n = 4, 30, 6
    starts = torch.tensor([0, 3, 11, 24])
    idx = build_action_index(num_tokens=n, start=starts)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, starts[b]: starts[b] + n] = True
    assert torch.equal(build_action_index(num_tokens=n, mask=mask), idx)
    # OFT's labels: action tokens have ids above the begin index; offset shifts positions
    labels = torch.where(mask, 32001, 7)
    assert torch.equal(build_action_index(num_tokens=n, labels=labels, action_token_begin_idx=32000,
                                          offset=-1), idx - 1)
    assert torch.equal(build_action_index(num_tokens=n, start=5, batch_size=B),
                       torch.arange(5, 5 + n).expand(B, n))
    # non-contiguous action tokens keep their order
    m = torch.zeros(1, 10, dtype=torch.bool)
    m[0, [1, 4, 5, 9]] = True
    assert build_action_index(num_tokens=4, mask=m).tolist() == [[1, 4, 5, 9]]
    with pytest.raises(ValueError, match="exactly one"):
        build_action_index(num_tokens=n)
    with pytest.raises(ValueError, match="action tokens per row"):
        build_action_index(num_tokens=n + 1, mask=mask, validate=True)


def _energy_setup(seed, B=3, S=13, D=11, Da=5, H=3, hidden=24, heads=3, output="unbounded"):
    torch.manual_seed(seed)
    model = EnergyModel(D, Da, hidden=hidden, heads=heads, output=output).double()
    ctx = torch.randn(B, S, D, dtype=F64)
    pm = torch.zeros(B, S, dtype=torch.bool)
    pm[0, S - 4:] = True      # padded tail
    if B > 2:
        pm[2, ::2] = True     # scattered padding
    expert = torch.randn(B, H, Da, dtype=F64)
    return model, ctx, pm, expert


def _grads(model, extra=()):
    return [p.grad.clone() for p in model.parameters()] + [t.grad.clone() for t in extra]


@pytest.mark.parametrize("output", ["unbounded", "sigmoid", "softplus"])
def test_energy_scores_equal_replicated(output, seed):
    model, ctx, pm, _ = _energy_setup(seed, output=output)
    cand = torch.randn(3, 5, 3, 5, dtype=F64, requires_grad=True)
    g = torch.randn(3, 5, dtype=F64)
    ref = replicated_energy_scores(model, ctx, pm, cand)
    (ref * g).sum().backward()
    ref_grads = _grads(model, [cand])
    model.zero_grad()
    cand.grad = None
    out = energy_scores(model, ctx, pm, cand, backend="eager")
    (out * g).sum().backward()
    assert out.shape == (3, 5)
    assert_close("energies", ref, out, F64, tol=1e-10)
    for i, (r, o) in enumerate(zip(ref_grads, _grads(model, [cand]))):
        assert_close(f"grad[{i}]", r, o, F64, tol=1e-10, floor=1e-3)


def test_swap_infonce_equals_replicated(seed):
    model, ctx, pm, expert = _energy_setup(seed)
    ref_loss, ref_E = replicated_swap_infonce(model, ctx, pm, expert, tau=0.5)
    ref_loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    out = swap_infonce(model, ctx, pm, expert, tau=0.5, backend="eager")
    out.loss.backward()
    assert_close("swap loss", ref_loss, out.loss, F64, tol=1e-10)
    assert_close("swap energies", ref_E, out.energies, F64, tol=1e-10)
    for i, (r, o) in enumerate(zip(ref_grads, _grads(model))):
        assert_close(f"grad[{i}]", r, o, F64, tol=1e-10, floor=1e-3)
    acc = ranking_accuracy(out)
    assert acc.item() == pytest.approx((ref_E.argmin(1) == torch.arange(3)).double().mean().item())


def test_explicit_infonce_and_margin_equal_replicated(seed):
    model, ctx, pm, expert = _energy_setup(seed)
    la = torch.randn(4, 3, 3, 5, dtype=F64)
    negs = structured_negatives(expert, la, own_prediction=True,
                                generator=torch.Generator().manual_seed(seed))
    assert negs.shape == (3, 5, 3, 5)
    ref_loss, ref_E = replicated_explicit_infonce(model, ctx, pm, expert, negs)
    ref_loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    out = explicit_infonce(model, ctx, pm, expert, negs, backend="eager")
    out.loss.backward()
    assert_close("explicit loss", ref_loss, out.loss, F64, tol=1e-10)
    for i, (r, o) in enumerate(zip(ref_grads, _grads(model))):
        assert_close(f"grad[{i}]", r, o, F64, tol=1e-10, floor=1e-3)
    # margin ranking from the same energies, written out literally
    d = (negs - expert[:, None]).flatten(2).norm(dim=-1)
    ref_margin = torch.relu(1.0 + 0.6 * d + ref_E[:, :1] - ref_E[:, 1:]).mean()
    mr = margin_ranking(model, ctx, pm, expert, negs, backend="eager")
    assert_close("margin", ref_margin, mr.loss, F64, tol=1e-10)


def test_structured_negatives_are_what_they_say():
    torch.manual_seed(0)
    expert = torch.randn(4, 3, 5, dtype=F64)
    la = torch.randn(5, 4, 3, 5, dtype=F64)
    n = structured_negatives(expert, la, own_prediction=True, amplitudes=(0.3, 1.7),
                             generator=torch.Generator().manual_seed(1))
    assert n.shape == (4, 7, 3, 5)
    assert torch.equal(n[:, 0], la[0]) and torch.equal(n[:, 1], la[2])   # first, middle
    assert torch.equal(n[:, 2], la[-1])                                  # own prediction
    assert 0.2 < (n[:, 3] - expert).std().item() < 0.4                   # Gaussian sigma 0.3
    assert_close("x0.3", expert * 0.3, n[:, 4], F64, tol=0)
    assert_close("x1.7", expert * 1.7, n[:, 5], F64, tol=0)
    flipped = (n[:, 6] != expert).any(dim=1)                             # (B, Da): which dims changed
    assert (flipped.sum(dim=1) == 1).all()
    assert torch.equal(n[:, 6][~flipped[:, None, :].expand(-1, 3, -1)],
                       expert[~flipped[:, None, :].expand(-1, 3, -1)])
    # the defaults: first + middle layer, noise, sign flip - no amplitude (they tie)
    assert structured_negatives(expert, la).shape == (4, 4, 3, 5)
    assert structured_negatives(expert).shape == (4, 2, 3, 5)            # no layer actions
    picked = structured_negatives(expert, la, layer_picks=(1, -1), sigma=0.0, sign_flip=False)
    assert torch.equal(picked, torch.stack([la[1], la[-1]], dim=1))
    with pytest.raises(ValueError, match=r"layer_picks\[0\]: expected an int in \[-5, 4\], got 5"):
        structured_negatives(expert, la, layer_picks=(5,))
    with pytest.raises(ValueError, match="own_prediction: needs layer_actions"):
        structured_negatives(expert, own_prediction=True)
    with pytest.raises(ValueError, match="every kind of negative is off"):
        structured_negatives(expert, sigma=0.0, sign_flip=False)
    # a dimension that is zero over the whole chunk is never the flipped one
    sparse = expert.clone()
    sparse[..., 1:] = 0
    for s in range(5):
        n = structured_negatives(sparse, generator=torch.Generator().manual_seed(s))
        assert not torch.equal(n[:, -1], sparse)
        assert torch.equal(n[:, -1, :, 0], -sparse[..., 0])


def test_energy_is_blind_to_step_rescaling_documented():
    """The fork's action encoder normalises each step (LayerNorm over Da): positive rescaling
    of the chunk does not change the energy - the documented caveat of structured_negatives."""
    model, ctx, pm, expert = _energy_setup(0)
    cand = torch.stack([expert, 0.3 * expert, 1.7 * expert, -expert], dim=1)
    e = energy_scores(model, ctx, pm, cand)
    # equal up to LayerNorm's eps (1e-5 against the per-step variance)
    assert_close("x0.3", e[:, 0], e[:, 1], F64, tol=1e-3)
    assert_close("x1.7", e[:, 0], e[:, 2], F64, tol=1e-3)
    assert (e[:, 0] - e[:, 3]).abs().max() > 1e-2  # a sign flip is visible


def test_correct_actions_lowers_energy_and_respects_clip():
    model, ctx, pm, expert = _energy_setup(0)
    e0 = energy_scores(model, ctx, pm, expert[:, None])
    a1 = correct_actions(model, ctx, pm, expert, alpha=0.05, steps=1, clip_frac=0.2)
    step = (a1 - expert).flatten(1).norm(dim=-1)
    assert (step <= 0.2 * expert.flatten(1).norm(dim=-1) + 1e-9).all()
    e1 = energy_scores(model, ctx, pm, a1[:, None])
    assert (e1 < e0).all()
    a3 = correct_actions(model, ctx, pm, expert, alpha=0.05, steps=3)
    assert (energy_scores(model, ctx, pm, a3[:, None]) < e1).all()
    assert not a3.requires_grad and not any(p.grad is not None for p in model.parameters())


def test_all_masked_sample_is_documented_zero_attention():
    model, ctx, pm, expert = _energy_setup(0)
    pm[1] = True
    e = energy_scores(model, ctx, pm, expert[:, None])
    assert torch.isfinite(e).all()
    # zero attention output: the energy is the head applied to the out-projection bias
    z = model.cross.out_proj.bias.expand(1, 3, -1)
    ref = model.prediction_head(z).mean(dim=1).squeeze()
    assert_close("all-masked row", ref, e[1, 0], F64, tol=1e-12)
    # the other rows do not change
    pm2 = pm.clone()
    pm2[1] = False
    e2 = energy_scores(model, ctx, pm2, expert[:, None])
    assert_close("other rows", e2[[0, 2]], e[[0, 2]], F64, tol=1e-12)
    # gradients stay finite
    swap_infonce(model, ctx, pm, expert).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="pad_mask: samples \\[1\\] mask every key"):
        energy_scores(model, ctx, pm, expert[:, None], validate=True)
