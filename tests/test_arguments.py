"""Public API arguments: every bad scalar or shape is an error that names the argument the
caller passed (one row per case: call -> exception type and message), and empty batches give
the same documented result on both backends."""
import math

import pytest
import torch

from energy_train import (EnergyModel, L1RegressionActionHead, build_action_index,
                          correct_actions, energy_scores, explicit_infonce, layer_actions,
                          margin_ranking, structured_negatives, swap_infonce)
from energy_train.losses import EnergyLoss, infonce_from_energies, ranking_accuracy
from energy_train.ops import mark_layer_actions
from energy_train.models import MLPResNet, load_oft_state_dict
from energy_train.policies.tiny import TinyVLA

B, S, D, H, Da, HID, HEADS = 2, 7, 8, 2, 3, 8, 2
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels under the interpreter


def _model(**kw):
    torch.manual_seed(0)
    return EnergyModel(D, Da, hidden=HID, heads=HEADS, max_steps=4, **kw)


def _ctx(b=B, s=S):
    return torch.randn(b, s, D), torch.zeros(b, s, dtype=torch.bool)


def _expert(b=B, h=H, da=Da):
    return torch.randn(b, h, da)


def swap(**kw):
    args = dict(expert=_expert())
    args.update(kw)
    c, m = _ctx(args.pop("b", B))
    return swap_infonce(_model(), c, m, args.pop("expert"), **args)


def explicit(negatives=None, **kw):
    c, m = _ctx()
    negs = torch.randn(B, 3, H, Da) if negatives is None else negatives
    return explicit_infonce(_model(), c, m, _expert(), negs, **kw)


def margin(negatives=None, **kw):
    c, m = _ctx()
    negs = torch.randn(B, 3, H, Da) if negatives is None else negatives
    return margin_ranking(_model(), c, m, _expert(), negs, **kw)


def correct(actions=None, **kw):
    c, m = _ctx()
    return correct_actions(_model(), c, m, _expert() if actions is None else actions, **kw)


def negatives(**kw):
    return structured_negatives(_expert(), **kw)


def head_layer_actions(**kw):
    head = L1RegressionActionHead(D, 12, Da, H)
    hs = [torch.randn(B, 10, D) for _ in range(3)]
    idx = build_action_index(num_tokens=H * Da, start=0, batch_size=B)
    return layer_actions(hs, idx, head, **kw)


def scores(context=None, candidates=None, **kw):
    c, m = _ctx()
    c = c if context is None else context
    m = torch.zeros(c.shape[:2], dtype=torch.bool)
    cand = torch.randn(B, 3, H, Da) if candidates is None else candidates
    return energy_scores(_model(), c, m, cand, **kw)


NAN, INF = float("nan"), float("inf")
CASES = [
    # losses: tau, offset, the chunks named as passed (expert, not the internal candidates)
    ("swap-tau-negative", lambda: swap(tau=-1), ValueError, "tau: expected a finite number > 0, got -1"),
    ("swap-tau-zero", lambda: swap(tau=0), ValueError, "tau: expected a finite number > 0, got 0"),
    ("swap-tau-nan", lambda: swap(tau=NAN), ValueError, "tau: expected a finite number > 0, got nan"),
    ("swap-tau-str", lambda: swap(tau="0.5"), TypeError, "tau: expected a finite number > 0"),
    ("swap-offset-negative", lambda: swap(offset=-1), ValueError, "offset: expected an int in [0, 0], got -1"),
    ("swap-offset-past-pool", lambda: swap(all_expert=_expert(b=4), offset=3), ValueError,
     "offset: expected an int in [0, 2], got 3"),
    ("swap-offset-float", lambda: swap(offset=1.0), TypeError, "offset: expected an int"),
    ("swap-offset-float-tensor", lambda: swap(offset=torch.tensor(0.0)), TypeError,
     "offset: expected an integer dtype"),
    ("swap-expert-Da", lambda: swap(expert=_expert(da=Da + 1)), ValueError,
     "expert: expected size 3 at dim 2, got shape (2, 2, 4)"),
    ("swap-expert-batch", lambda: swap(expert=_expert(b=B + 1)), ValueError,
     "expert: expected size 2 at dim 0, got shape (3, 2, 3)"),
    ("swap-expert-no-step", lambda: swap(expert=_expert(h=0)), ValueError,
     "expert: expected at least one chunk step (dim 1)"),
    ("swap-expert-too-many-steps", lambda: swap(expert=_expert(h=5)), ValueError,
     "expert: at most 4 chunk steps (dim 1)"),
    ("swap-no-sample", lambda: swap(b=0, expert=_expert(b=0)), ValueError,
     "expert: expected at least one sample (dim 0)"),
    ("swap-all-expert-shape", lambda: swap(all_expert=_expert(da=Da + 1)), ValueError,
     "all_expert: expected size 3 at dim 2"),
    ("explicit-tau", lambda: explicit(tau=0.0), ValueError, "tau: expected a finite number > 0"),
    ("explicit-negatives-H", lambda: explicit(torch.randn(B, 3, H + 1, Da)), ValueError,
     "negatives: expected size 2 at dim 2"),
    ("explicit-negatives-batch", lambda: explicit(torch.randn(B + 1, 3, H, Da)), ValueError,
     "negatives: expected size 2 at dim 0"),
    # degenerate batches: a loss that would be a constant, an accuracy that would be 1.0
    ("swap-one-sample", lambda: swap(b=1, expert=_expert(b=1)), ValueError,
     "expert: the swap InfoNCE scores each sample against every chunk of the batch"),
    ("explicit-no-negative", lambda: explicit(torch.randn(B, 0, H, Da)), ValueError,
     "negatives: expected at least 1 negative(s) (dim 1), got shape (2, 0, 2, 3): with the "
     "expert alone explicit_infonce is a constant"),
    ("explicit-layer-actions-axes", lambda: explicit(mark_layer_actions(torch.randn(B, B, H, Da))),
     ValueError, "negatives: got the output of layer_actions, laid out (L, B, H, Da)"),
    ("margin-layer-actions-axes", lambda: margin(head_layer_actions(layers=[1, 2])), ValueError,
     "pass structured_negatives(expert, layer_actions) or layer_actions.transpose(0, 1)"),
    ("ranking-accuracy-one-candidate", lambda: ranking_accuracy(EnergyLoss(
        torch.zeros(()), torch.zeros(B, 1), torch.zeros(B, dtype=torch.long))), ValueError,
     "ranking_accuracy: expected energies (B, C) of at least 2 candidates, got shape (2, 1)"),
    ("margin-m0", lambda: margin(m0=-1.0), ValueError, "m0: expected a finite number >= 0, got -1.0"),
    ("margin-kappa-inf", lambda: margin(kappa=INF), ValueError, "kappa: expected a finite number >= 0"),
    ("margin-no-negative", lambda: margin(torch.randn(B, 0, H, Da)), ValueError,
     "negatives: expected at least 1 negative(s) (dim 1)"),
    ("infonce-tau", lambda: infonce_from_energies(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), -2),
     ValueError, "tau: expected a finite number > 0, got -2"),
    # test-time correction
    ("correct-alpha-negative", lambda: correct(alpha=-0.1), ValueError,
     "alpha: expected a finite number >= 0, got -0.1"),
    ("correct-alpha-nan", lambda: correct(alpha=NAN), ValueError, "alpha: expected a finite number >= 0"),
    ("correct-steps-negative", lambda: correct(steps=-1), ValueError, "steps: expected an int >= 0, got -1"),
    ("correct-steps-float", lambda: correct(steps=1.5), TypeError, "steps: expected an int >= 0, got 1.5"),
    ("correct-steps-bool", lambda: correct(steps=True), TypeError, "steps: expected an int >= 0, got True"),
    ("correct-clip-zero", lambda: correct(clip_frac=0), ValueError, "clip_frac: expected a finite number > 0"),
    ("correct-actions-Da", lambda: correct(_expert(da=Da + 2)), ValueError, "actions: expected size 3 at dim 2"),
    # structured negatives
    ("negatives-pick-range", lambda: negatives(layer_actions=torch.randn(4, B, H, Da), layer_picks=(0, 5)),
     ValueError, "layer_picks[1]: expected an int in [-4, 3], got 5"),
    ("negatives-pick-without-layers", lambda: negatives(layer_picks=(0,)), ValueError,
     "layer_picks: given without layer_actions"),
    ("negatives-no-layers", lambda: negatives(layer_actions=torch.randn(0, B, H, Da)), ValueError,
     "layer_actions: expected at least one layer (dim 0)"),
    ("negatives-sigma", lambda: negatives(sigma=-0.3), ValueError, "sigma: expected a finite number >= 0"),
    ("negatives-amplitude-nan", lambda: negatives(amplitudes=(0.3, NAN)), ValueError,
     "amplitudes[1]: expected a finite number"),
    # model constructors
    ("energy-heads-zero", lambda: EnergyModel(D, Da, hidden=8, heads=0), ValueError,
     "heads: expected an int >= 1, got 0"),
    ("energy-hidden-zero", lambda: EnergyModel(D, Da, hidden=0), ValueError, "hidden: expected an int >= 1, got 0"),
    ("energy-act-dim-zero", lambda: EnergyModel(D, 0), ValueError, "act_dim: expected an int >= 1, got 0"),
    ("energy-state-dim-float", lambda: EnergyModel(8.0, Da), TypeError, "state_dim: expected an int >= 1"),
    ("energy-max-steps", lambda: EnergyModel(D, Da, hidden=8, heads=2, max_steps=0), ValueError,
     "max_steps: expected an int >= 1, got 0"),
    ("energy-hidden-heads", lambda: EnergyModel(D, Da, hidden=10, heads=3), ValueError,
     "hidden: expected a multiple of heads=3, got 10"),
    ("energy-output", lambda: EnergyModel(D, Da, hidden=8, heads=2, output="tanh"), ValueError,
     "output: expected one of ('unbounded', 'sigmoid', 'softplus'), got 'tanh'"),
    ("energy-activation", lambda: EnergyModel(D, Da, hidden=8, heads=2, activation="gelu"), ValueError,
     "activation: expected one of"),
    ("head-num-blocks", lambda: L1RegressionActionHead(D, 12, Da, H, num_blocks=-1), ValueError,
     "num_blocks: expected an int >= 0, got -1"),
    ("head-action-dim", lambda: L1RegressionActionHead(D, 12, 0, H), ValueError,
     "action_dim: expected an int >= 1, got 0"),
    ("head-chunk", lambda: L1RegressionActionHead(D, 12, Da, 0), ValueError,
     "num_actions_chunk: expected an int >= 1, got 0"),
    ("head-input-dim-float", lambda: L1RegressionActionHead(2.5, 12, Da, H), TypeError,
     "input_dim: expected an int >= 1, got 2.5"),
    ("mlp-num-blocks", lambda: MLPResNet(-2, 4, 4, 4), ValueError, "num_blocks: expected an int >= 0, got -2"),
    ("tiny-vla-heads", lambda: TinyVLA(n_heads=0), ValueError, "n_heads: expected an int >= 1, got 0"),
    ("tiny-vla-stop-token", lambda: TinyVLA(vocab_size=8, stop_token=8), ValueError,
     "stop_token: expected an int in [0, 7], got 8"),
    # checkpoints
    ("load-not-a-mapping", lambda: load_oft_state_dict(MLPResNet(0, 2, 2, 2), [("fc1.weight", torch.zeros(2, 2))]),
     TypeError, "state_dict: expected a mapping of names to tensors, got list"),
    ("load-prefixed-and-not", lambda: load_oft_state_dict(
        MLPResNet(0, 2, 2, 2), {"fc1.bias": torch.zeros(2), "module.fc1.bias": torch.ones(2)}),
     ValueError, "state_dict: holds both 'fc1.bias' and 'module.fc1.bias'"),
    ("load-not-a-module", lambda: load_oft_state_dict({}, {}), TypeError,
     "module: expected a torch.nn.Module, got dict"),
    # ops
    ("index-num-tokens", lambda: build_action_index(num_tokens=0, start=0, batch_size=2), ValueError,
     "num_tokens: expected an int >= 1, got 0"),
    ("index-start", lambda: build_action_index(num_tokens=3, start=-1, batch_size=2), ValueError,
     "start: expected an int >= 0, got -1"),
    ("index-offset", lambda: build_action_index(num_tokens=3, start=0, batch_size=2, offset=0.5),
     TypeError, "offset: expected an int, got 0.5"),
    ("layer-actions-layers", lambda: head_layer_actions(layers=[1.0]), TypeError,
     "layers[0]: expected an int, got 1.0"),
    ("layer-actions-flag", lambda: head_layer_actions(include_embeddings="yes"), TypeError,
     "include_embeddings: expected True or False, got 'yes'"),
    ("scores-validate", lambda: scores(validate=1), TypeError, "validate: expected True or False, got 1"),
    ("scores-no-key", lambda: scores(context=torch.randn(B, 0, D)), ValueError,
     "context: expected at least one key (dim 1), got shape (2, 0, 8)"),
    ("scores-no-step", lambda: scores(candidates=torch.randn(B, 3, 0, Da)), ValueError,
     "candidates: expected at least one chunk step (dim 2)"),
]


@pytest.mark.parametrize("call,exc,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_named(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), str(info.value)


def test_good_edge_values_pass():
    """The bounds are inclusive where they say so: alpha = 0 and steps = 0 leave the actions,
    sigma = 0 is a copy, offset at the end of the pool and as a tensor are accepted."""
    a = _expert()
    c, m = _ctx()
    assert torch.equal(correct_actions(_model(), c, m, a, alpha=0.0, steps=3), a)
    assert torch.equal(correct_actions(_model(), c, m, a, steps=0), a)
    assert torch.equal(structured_negatives(a, sigma=0, sign_flip=False, amplitudes=(1.0,))[:, 0], a)
    pool = _expert(b=5)
    out = swap_infonce(_model(), c, m, a, all_expert=pool, offset=3)
    assert out.target.tolist() == [3, 4]
    assert swap_infonce(_model(), c, m, a, offset=torch.tensor(0)).target.tolist() == [0, 1]
    assert math.isfinite(explicit_infonce(_model(), c, m, a, torch.randn(B, 1, H, Da)).loss.item())
    assert math.isfinite(swap_infonce(_model(), c[:1], m[:1], a[:1], all_expert=a).loss.item())


# --------------------------------------------------------------------------------------------
# empty batches: the same documented result on both backends
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("b,c", [(0, 3), (2, 0)], ids=["B0", "C0"])
def test_energy_scores_empty_batch_or_candidates(b, c, backend):
    model = _model().to(DEV)
    ctx = torch.randn(b, S, D, device=DEV, requires_grad=True)
    cand = torch.randn(b, c, H, Da, device=DEV, requires_grad=True)
    pad = torch.zeros(b, S, dtype=torch.bool, device=DEV)
    out = energy_scores(model, ctx, pad, cand, backend=backend)
    assert out.shape == (b, c)
    out.sum().backward()
    assert ctx.grad is not None and (ctx.grad == 0).all()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_layer_actions_and_correction_empty_batch(backend):
    head = L1RegressionActionHead(32, 12, Da, H).to(DEV)
    hs = [torch.randn(0, 10, 32, device=DEV) for _ in range(3)]
    idx = build_action_index(num_tokens=H * Da, start=0, batch_size=0, device=DEV)
    assert layer_actions(hs, idx, head, backend=backend).shape == (2, 0, H, Da)
    c, m = (t.to(DEV) for t in _ctx(b=0))
    out = correct_actions(_model().to(DEV), c, m, _expert(b=0).to(DEV), backend=backend)
    assert out.shape == (0, H, Da)
