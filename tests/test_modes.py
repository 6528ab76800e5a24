"""The trainer owns module modes (energy_train/modes.py): train mode for the forward it trains,
eval mode for every no-grad forward (phase 2, the negatives, the probe, the start-up check,
test time), the modes the modules came in restored afterwards."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from energy_train import EnergyModel, correct_actions
from energy_train.policies.tiny import build
from energy_train.trainer import train
from trainer_helpers import make_trainer, tiny_cfg


def _dropout_setup(cfg):
    """The tiny policy with dropout 0.5 in every block's MLP, loaded "from_pretrained" (the
    backbone in eval mode), the head left in train mode: a mix the trainer must not keep."""
    setup = build(cfg, torch.device("cpu"))
    for block in setup.policy.backbone.blocks:
        block.mlp.append(nn.Dropout(0.5))
    setup.policy.backbone.eval()
    setup.policy.action_head.train()
    return setup


def _record(setup) -> list:
    """(grad enabled, backbone dropout on, head training) at every backbone / head forward."""
    log = []
    drop = setup.policy.backbone.blocks[0].mlp[-1]
    setup.policy.backbone.register_forward_pre_hook(
        lambda m, a: log.append(("backbone", torch.is_grad_enabled(), drop.training)))
    setup.policy.action_head.register_forward_pre_hook(
        lambda m, a: log.append(("head", torch.is_grad_enabled(), m.training)))
    return log


def test_phase_1_is_stochastic_and_phase_2_deterministic_with_dropout():
    cfg = tiny_cfg()
    setup = _dropout_setup(cfg)
    t = make_trainer(cfg, policy=setup.policy, data=setup.data, energy=setup.energy)
    mb = t.batch(0)[0]
    torch.manual_seed(0)
    l1_a, _ = t.forward_l1(mb)
    l1_b, _ = t.forward_l1(mb)
    assert not torch.equal(l1_a, l1_b)  # phase 1: train mode, dropout on
    obj = t.objective
    f1, f2 = t.observe(mb, reuse=False), t.observe(mb, reuse=False)
    assert torch.equal(obj.context(f1), obj.context(f2))  # phase 2: eval mode, dropout off
    assert torch.equal(obj.negatives(f1), obj.negatives(f2))


@pytest.mark.parametrize("strategy", ["two_phase", "joint"])
def test_every_no_grad_forward_runs_in_eval_mode_and_modes_are_restored(tmp_path, strategy,
                                                                        monkeypatch):
    from energy_train import losses
    cfg = tiny_cfg(strategy=strategy, steps=3, probe_every=1, log_every=1, lag_every=1)
    setup = _dropout_setup(cfg)
    setup.energy.eval()  # a loaded energy model: the trainer trains it in train mode
    log = _record(setup)
    scored, scores = [], losses.energy_scores

    def spy(model, *a, **kw):  # (grad enabled, energy model in train mode) of every scoring
        scored.append((torch.is_grad_enabled(), model.training))
        return scores(model, *a, **kw)

    monkeypatch.setattr(losses, "energy_scores", spy)
    res = train(cfg, tmp_path / "run", policy=setup.policy, data=setup.data, energy=setup.energy,
                probe=setup.data.probe(), echo=lambda *a: None)
    assert res.complete
    assert {on for grad, on in scored if grad} == {True}   # phi's loss: train mode
    assert {on for grad, on in scored if not grad} == {False}  # probe, lag effect: eval mode
    assert not setup.energy.training  # restored
    with_grad = [on for _, grad, on in log if grad]
    without = [on for _, grad, on in log if not grad]
    assert with_grad and all(with_grad), "a forward with grad ran in eval mode"
    assert len(without) >= 5 and not any(without), "a no-grad forward ran in train mode"
    # the modes the modules came in
    assert not setup.policy.backbone.training and not setup.policy.backbone.blocks[0].mlp[-1].training
    assert setup.policy.action_head.training


def test_test_time_correction_runs_in_eval_mode_and_restores_it(monkeypatch):
    from energy_train import losses
    seen, scores = [], losses.energy_scores

    def spy(model, *a, **kw):
        seen.append(model.training)
        return scores(model, *a, **kw)

    monkeypatch.setattr(losses, "energy_scores", spy)
    m = EnergyModel(8, 3, hidden=8, heads=2).train()
    correct_actions(m, torch.randn(2, 5, 8), None, torch.randn(2, 2, 3), steps=2)
    assert seen == [False, False] and m.training
