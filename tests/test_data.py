"""The embedded task: determinism, the data stream as a function of (seed, step), the expert."""
from __future__ import annotations

import torch

from energy_train.models import L1RegressionActionHead
from energy_train.policies.tiny import TinyPolicy, TinyVLA
from energy_train.policies.tiny.task import (COLOURS, PAD, VOCAB, TaskData, generate_scenes,
                                             scripted_expert)


def test_scenes_are_deterministic_per_seed():
    a, b, c = generate_scenes(20, 3), generate_scenes(20, 3), generate_scenes(20, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (20, 3, 16, 16) and a["expert"].shape == (20, 8, 7)
    assert a["expert"].abs().max() <= 1.0 + 1e-6
    assert set(a["expert"][..., 6].unique().tolist()) <= {-1.0, 1.0}


def test_stream_is_a_function_of_seed_and_step():
    d1, d2 = TaskData(7, 64, 8, batch_size=16), TaskData(7, 64, 8, batch_size=16)
    ids = lambda d, step: d.batch(step)[0]["ids"].tolist()  # noqa: E731
    for step in (0, 3, 9, 3):  # out of order, repeated, crossing an epoch (64 / 16 = 4 steps)
        b1, b2 = d1.batch(step)[0], d2.batch(step)[0]
        assert torch.equal(b1["ids"], b2["ids"]) and torch.equal(b1["images"], b2["images"])
    epoch0 = sum((ids(d1, s) for s in range(4)), [])
    assert sorted(epoch0) == list(range(64))  # an epoch visits every row once
    assert ids(d1, 4) != ids(d1, 0)


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
    batch = TaskData(0, 32, 4, batch_size=8, image_size=16).batch(0)[0]
    policy = TinyPolicy(TinyVLA(d_model=16, n_layers=1, n_heads=2), L1RegressionActionHead(16, 16, 7, 8))
    lay = policy.layout(batch)
    assert lay.pad_mask.shape == (8, 21) and torch.equal(lay.pad_mask[:, -4:], batch["tokens"] == PAD)
    assert not lay.pad_mask[:, :17].any()
    assert torch.equal(lay.context_index[0], torch.arange(21))
    assert torch.equal(lay.action_index[1], torch.arange(21, 21 + 56))
