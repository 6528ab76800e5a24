"""Trainer invariants (README "Training"), on the CPU with tiny models and a few steps."""
from __future__ import annotations

import pytest
import torch

from energy_train.ops import build_action_index, layer_actions
from energy_train.policies.tiny import ActionRowCapture, TinyVLA
from energy_train.trainer import STRATEGIES, Trainer
from trainer_helpers import deepcopy_policy, grads, make_trainer, same, snapshot, tiny_cfg

# every strategy, plus the leaky diagnostic variant of joint
VARIANTS = [(s, {}) for s in STRATEGIES] + [("joint", {"detach_context": False})]
IDS = [s if not kw else "joint-leaky" for s, kw in VARIANTS]


def _spy(trainer: Trainer, log: dict):
    """Wrap the blocks that belong to the energy side and record what they did to theta."""
    step_phi, phase_phi = trainer.step_phi, trainer.phase_phi
    energy_backward = trainer.objective.backward

    def spy_step_phi():
        theta, phi = snapshot(trainer.theta), snapshot(trainer.phi)
        out = step_phi()
        log["step_phi_theta_same"].append(same(theta, snapshot(trainer.theta)))
        log["phi_changed"].append(not same(phi, snapshot(trainer.phi)))
        return out

    def spy_phase_phi(batch, **kw):
        theta = snapshot(trainer.theta)
        out = phase_phi(batch, **kw)
        log["phase_phi_theta_same"].append(same(theta, snapshot(trainer.theta)))
        return out

    def spy_energy_backward(loss, *, audit, retain_graph=False):
        before = grads(trainer.theta)
        out = energy_backward(loss, audit=audit, retain_graph=retain_graph)
        after = grads(trainer.theta)
        log["theta_grad_untouched"].append(all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(before, after)))
        if out is not None:
            log["audit"].append(float(out))
        return out

    trainer.step_phi, trainer.phase_phi = spy_step_phi, spy_phase_phi
    trainer.objective.backward = spy_energy_backward


@pytest.mark.parametrize("strategy,kw", VARIANTS, ids=IDS)
def test_energy_side_never_moves_theta(strategy, kw):
    """phase 2 / the phi step leave theta bitwise unchanged; the energy backward leaves theta's
    grads untouched (no gradient path), except the leaky variant, where the test sees the leak;
    phi changes after every energy step."""
    cfg = tiny_cfg(strategy=strategy, alternate_every=1, cache_refresh=2, adaptive_window=2, **kw)
    t = make_trainer(cfg)
    log = {k: [] for k in ("step_phi_theta_same", "phi_changed", "phase_phi_theta_same",
                           "theta_grad_untouched", "audit")}
    _spy(t, log)
    theta0 = snapshot(t.theta)
    metrics = [t.train_step() for _ in range(4)]
    assert log["step_phi_theta_same"] and all(log["step_phi_theta_same"])
    assert all(log["phi_changed"])
    assert all(log["phase_phi_theta_same"])
    leaky = kw.get("detach_context") is False
    if leaky:
        assert not any(log["theta_grad_untouched"]), "the leaky variant must deposit grads in theta"
        assert min(log["audit"]) > 0
    else:
        assert all(log["theta_grad_untouched"])
        assert log["audit"] == [0.0] * len(log["audit"])
    audits = [float(m["energy_grad_theta"]) for m in metrics if "energy_grad_theta" in m]
    assert audits and (min(audits) > 0 if leaky else max(audits) == 0.0)
    assert not same(theta0, snapshot(t.theta)), "theta should have been trained"


@pytest.mark.parametrize("strategy", ["two_phase", "joint"])
def test_energy_skip_steps_skip_phis_step_as_the_fork_does(strategy):
    """optim.energy_skip_steps = 2 (the fork's energy_warm_steps): phi is bitwise unchanged
    and its AdamW state empty for 2 steps while theta trains, then phi steps; no gradient is
    carried into the first step taken. energy.warmup_steps (the loss-weight ramp) skips nothing:
    phi moves from the first step."""
    t = make_trainer(tiny_cfg(strategy=strategy, energy_skip_steps=2))
    phi0, theta0 = snapshot(t.phi), snapshot(t.theta)
    for _ in range(2):
        t.train_step()
        assert same(phi0, snapshot(t.phi)) and not t.optim.opt_phi.state
        assert all(p.grad is None for p in t.phi)
    assert not same(theta0, snapshot(t.theta))
    t.train_step()
    assert not same(phi0, snapshot(t.phi))
    assert all(int(s["step"]) == 1 for s in t.optim.opt_phi.state.values())  # one AdamW step
    ramp = make_trainer(tiny_cfg(strategy=strategy, energy_warmup_steps=4))
    phi0 = snapshot(ramp.phi)
    ramp.train_step()
    assert not same(phi0, snapshot(ramp.phi))


def test_two_phase_negatives_come_from_updated_theta():
    """Phase 2 of step k uses head_{theta_k+1}(forward_{theta_k+1}(batch_k)) (HF-convention
    recomputation here, hook capture in the trainer)."""
    t = make_trainer(tiny_cfg(strategy="two_phase"))
    t.train_step()
    old = deepcopy_policy(t)  # theta_k
    seen, negatives = [], t.objective.negatives

    def spy(fwd):
        seen.append((fwd, negatives(fwd)))
        return seen[-1][1]

    t.objective.negatives = spy
    t.train_step()
    ((fwd, negs),) = seen
    mb = fwd.mb
    ctx = fwd.captured.context.clone()

    def recompute(policy):
        with torch.no_grad():
            out = policy.forward(mb.batch, output_hidden_states=True)
        n = layer_actions(out.hidden_states, mb.layout.action_index, policy.action_head,
                          final_norm=policy.backbone.norm)
        S = mb.layout.context_index.shape[1]
        return n, out.hidden_states[-1][:, :S]

    negs_new, ctx_new = recompute(t.policy)
    assert torch.equal(negs, negs_new)
    assert torch.equal(ctx, ctx_new)
    negs_old, ctx_old = recompute(old)
    assert not torch.equal(negs, negs_old)
    assert not torch.equal(ctx, ctx_old)


def test_joint_equals_shared_forward_bitwise():
    """With the context detached, joint's energy loss sends nothing into theta, so joint and
    shared_forward compute the same numbers: the coupling is dynamic, not a gradient."""
    a, b = make_trainer(tiny_cfg(strategy="joint")), make_trainer(tiny_cfg(strategy="shared_forward"))
    for _ in range(3):
        a.train_step()
        b.train_step()
    assert same(snapshot(a.theta), snapshot(b.theta))
    assert same(snapshot(a.phi), snapshot(b.phi))


def test_overlapping_parameter_sets_are_an_error():
    cfg = tiny_cfg()
    t = make_trainer(cfg)
    t.energy.borrowed = t.policy.action_head.model.fc1.weight  # a theta parameter inside phi
    with pytest.raises(ValueError, match="disjoint"):
        Trainer(cfg, t.policy, t.energy, t.feed, torch.device("cpu"))


def test_policy_extras_belong_to_the_instance():
    """A policy that never assigns ``extras`` gets a dict of its own: a module added to one
    policy's extras is not in every other policy's theta (a class-level default would be)."""
    from energy_train.policy import Policy

    class Bare(Policy):  # sets backbone and head only
        def __init__(self):
            self.backbone, self.action_head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        forward = layout = expert = lambda self, batch: None

    a, b = Bare(), Bare()
    a.extras["proj"] = torch.nn.Linear(2, 2)
    assert "extras.proj" in a.modules()
    assert b.extras == {} and "extras.proj" not in b.modules() and Bare().extras == {}


@pytest.mark.parametrize("seed", [0, 1])
def test_hook_capture_rows_equal_output_hidden_states(seed):
    torch.manual_seed(seed)
    m = TinyVLA(d_model=24, n_layers=3, n_heads=2, image_size=8, patch_size=4, chunk=3, action_dim=5)
    B = 3
    images, proprio = torch.rand(B, 3, 8, 8), torch.randn(B, 4)
    tokens = torch.randint(0, 16, (B, 4))
    cap = ActionRowCapture(m)
    idx = build_action_index(num_tokens=15, start=m.layout.action_start, batch_size=B)
    with cap.armed(idx, m.layout.context_len, torch.float32, 24) as c:
        out = m(images, proprio, tokens, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and c.action_rows.shape == (4, B, 15, 24)
    for layer, h in enumerate(out.hidden_states):
        assert torch.equal(c.action_rows[layer], h[:, m.layout.action_start:m.layout.stop_pos])
    assert torch.equal(c.context, out.hidden_states[-1][:, : m.layout.context_len])
    assert torch.equal(out.last_hidden_state, out.hidden_states[-1])
    assert not c.action_rows.requires_grad
    # disarmed hooks do nothing; armed twice gives distinct buffers (batch k stays alive)
    with cap.armed(idx, m.layout.context_len, torch.float32, 24) as c2:
        m(images, proprio, tokens)
    assert c2.action_rows.data_ptr() != c.action_rows.data_ptr()
    assert torch.equal(c2.action_rows, c.action_rows)


def test_gradient_accumulation_matches_one_big_batch():
    """grad_accum=2 x batch 4 gives the gradients of batch 8 (same rows), up to float order."""
    def grads_of_first_step(**kw):
        t = make_trainer(tiny_cfg(strategy="two_phase", **kw))
        seen = {}
        step_theta = t.step_theta
        t.step_theta = lambda: (seen.setdefault("g", grads(t.theta)), step_theta())[1]
        t.phase_theta(t.batch(0))
        return seen["g"]

    for x, y in zip(grads_of_first_step(batch_size=8), grads_of_first_step(batch_size=4, grad_accum=2)):
        err = (x - y).abs().max() / x.abs().max().clamp_min(1e-12)
        assert err < 1e-5, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_inside_a_step_on_cuda():
    """Every strategy's step runs under torch.cuda.set_sync_debug_mode('error')."""
    for strategy in STRATEGIES:
        t = make_trainer(tiny_cfg(strategy=strategy, device="cuda", check_data=False,
                                  cache_refresh=2))
        t.train_step()  # warm-up (lazy allocations)
        torch.cuda.set_sync_debug_mode("error")
        try:
            t.train_step()
            t.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert t.flush()
