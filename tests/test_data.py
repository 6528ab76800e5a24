"""The embedded task: determinism, the data stream as a function of (seed, step), the expert."""
from __future__ import annotations

import torch

from energy_train.config import TrainConfig, apply, resolve
from energy_train.data import COLOURS, PAD, VOCAB, TaskData, generate_scenes, scripted_expert


def test_scenes_are_deterministic_per_seed():
    a, b, c = generate_scenes(20, 3), generate_scenes(20, 3), generate_scenes(20, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (20, 3, 16, 16) and a["expert"].shape == (20, 8, 7)
    assert a["expert"].abs().max() <= 1.0 + 1e-6
    assert set(a["expert"][..., 6].unique().tolist()) <= {-1.0, 1.0}


def test_stream_is_a_function_of_seed_and_step():
    d1, d2 = TaskData(7, 64, 8), TaskData(7, 64, 8)
    for step in (0, 3, 9, 3):  # out of order, repeated, crossing an epoch (64 / 16 = 4 steps)
        b1, b2 = d1.batch(step, 16)[0], d2.batch(step, 16)[0]
        assert b1.ids_host == b2.ids_host and torch.equal(b1.images, b2.images)
    epoch0 = sum((d1.batch(s, 16)[0].ids_host for s in range(4)), [])
    assert sorted(epoch0) == list(range(64))  # an epoch visits every row once
    assert d1.batch(4, 16)[0].ids_host != d1.batch(0, 16)[0].ids_host


def test_expert_moves_toward_the_named_target():
    grip = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.2, 0.5, 0.5]])
    target = torch.tensor([[0.7, 0.3], [0.2, 0.6]])
    a = scripted_expert(grip, target, torch.tensor([0.5, -0.5]), chunk=8)
    assert (a[0, :, 0] > 0).all() and (a[0, :, 1] < 0).all()   # +x, -y
    assert (a[1, :, 0] < 0).all() and (a[1, :, 1] > 0).all()   # -x, +y
    assert (a[0, :, 5] > 0).all() and (a[1, :, 5] < 0).all()   # yaw toward the colour's yaw
    # directly above the target and low: descend and close the gripper
    b = scripted_expert(torch.tensor([[0.5, 0.5, 0.05, 0.0]]), torch.tensor([[0.5, 0.5]]),
                        torch.tensor([0.0]), chunk=3)
    assert (b[0, :, 6] == -1).all() and (b[0, :, 2] <= 0).all()


def test_instruction_names_the_target_colour():
    d = TaskData(0, 32, 4)
    colours = {VOCAB.index(c) for c in COLOURS}
    for row in d.train["tokens"]:
        named = [t for t in row.tolist() if t in colours]
        assert len(named) == 1
    mb = d.batch(0, 8)[0]
    mask = mb.pad_mask(21)
    assert mask.shape == (8, 21) and torch.equal(mask[:, -4:], mb.tokens == PAD)
    assert not mask[:, :17].any()


def test_config_coercion_and_suggestions():
    cfg = apply(TrainConfig(), {"steps": "12", "lr": "3e-4", "progress": "false"}, "t")
    assert cfg.steps == 12 and cfg.lr == 3e-4 and cfg.progress is False
    for bad, msg in (({"stepz": 1}, "did you mean 'steps'"), ({"steps": "1.5"}, "expected int"),
                     ({"steps": 2.5}, "expected an integer")):
        try:
            apply(TrainConfig(), bad, "t")
        except ValueError as e:
            assert msg in str(e), e
        else:
            raise AssertionError(f"{bad} accepted")
    try:
        resolve(overrides={"strategy": "jiont"})
    except ValueError as e:
        assert "did you mean 'joint'" in str(e)
    else:
        raise AssertionError("bad strategy accepted")
