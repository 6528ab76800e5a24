"""Bring your own policy: the trainer on a Hugging Face LlamaModel behind the Policy interface
(tests/hf_policy.py) - every strategy, the invariants, a frozen base with LoRA adapters, bf16,
iterable data, phase2_every, exact resume, and the start-up errors of a wrong policy."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")  # in the dev extra: runs in CI

from energy_train import train  # noqa: E402
from energy_train.config import default_config  # noqa: E402
from energy_train.trainer import STRATEGIES, PolicyError, read_metrics, split_theta  # noqa: E402
from hf_policy import LlamaPolicy, PromptData, make_policy  # noqa: E402
from test_overlap import plain_two_phase  # noqa: E402
from trainer_helpers import make_trainer, same, snapshot, spy_isolation  # noqa: E402

QUIET = dict(echo=lambda *a: None)
BASE = dict(batch_size=4, steps=3, warmup_steps=1, log_every=1, probe_every=0, progress=False,
            energy_hidden=32, energy_heads=2, energy_loss="explicit")


def cfg(**kw):
    return default_config(**{**BASE, **kw})


def trainer(policy=None, data=None, **kw):
    c = cfg(**kw)
    return make_trainer(c, policy=policy or make_policy(),
                        data=data or PromptData(batch_size=c.run.batch_size,
                                                grad_accum=c.run.grad_accum))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains_the_llama_policy(strategy):
    """phase 2 / the phi step leave theta bitwise unchanged, the energy backward deposits
    nothing into theta, theta and phi move."""
    t = trainer(strategy=strategy, alternate_every=1, cache_refresh=2, adaptive_window=2)
    theta0, phi0, seen = snapshot(t.theta), snapshot(t.phi), spy_isolation(t)
    metrics = [t.train_step() for _ in range(3)]
    assert seen and all(seen)
    assert all(float(m["energy_grad_theta"]) == 0.0 for m in metrics if "energy_grad_theta" in m)
    assert not same(phi0, snapshot(t.phi)) and not same(theta0, snapshot(t.theta))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_overlap_path_equals_a_plain_two_phase_loop(precision):
    """The trainer (overlap requested, hook capture) == the two-phase update written out by
    hand (output_hidden_states), bitwise, on the Llama policy, in fp32 and under bf16 autocast."""
    t = trainer(overlap=True, steps=4, precision=precision)
    ref = trainer(overlap=False, steps=4, precision=precision)
    got = [t.train_step() for _ in range(4)]
    want = plain_two_phase(ref, 4, bf16=precision == "bf16")
    for k, (m, (l1, e)) in enumerate(zip(got, want)):
        assert torch.equal(m["l1"], l1) and torch.equal(m["energy_loss"], e), k
    assert same(snapshot(t.theta), snapshot(ref.theta)) and same(snapshot(t.phi), snapshot(ref.phi))


def test_frozen_base_with_lora_adapters(tmp_path):
    """Only the adapters, the head and the extras train; the frozen base is bitwise unchanged
    and absent from the checkpoint, whose names load back into fresh modules."""
    policy = make_policy(lora=True)
    frozen = {n: p.detach().clone() for n, p in policy.backbone.named_parameters()
              if not p.requires_grad}
    assert frozen and any("lora_" in n for n, _ in policy.named_trainable())
    res = train(cfg(steps=3), policy=policy, data=PromptData(), out=tmp_path / "run", **QUIET)
    assert res.complete
    for n, p in policy.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    theta = load_file(ckpt / "theta.safetensors")
    assert set(theta) == {n for n, _ in policy.named_trainable()}
    assert not any(n.split(".", 1)[1] in frozen for n in theta if n.startswith("backbone."))
    parts = split_theta(theta)
    fresh = make_policy(lora=True, seed=1)
    missing, unexpected = fresh.backbone.load_state_dict(parts["backbone"], strict=False)
    assert not unexpected and all(n in frozen for n in missing)
    fresh.action_head.load_state_dict(parts["action_head"])
    fresh.extras["patch"].load_state_dict(parts["extras.patch"])
    for n, p in fresh.named_trainable():
        assert torch.equal(p, theta[n]), n


def test_bf16_run_and_phase2_every(tmp_path):
    res = train(cfg(steps=4, precision="bf16", phase2_every=2), policy=make_policy(),
                data=PromptData(), out=tmp_path / "run", **QUIET)
    recs = read_metrics(res.run_dir)
    assert [("energy_loss" in r) for r in recs] == [True, False, True, False]
    assert all(torch.isfinite(torch.tensor(r["l1"])) for r in recs)


def test_resume_is_exact_for_step_indexed_data(tmp_path):
    c = cfg(steps=4, probe_every=2, strategy="cached_negatives", cache_refresh=2)
    train(c, policy=make_policy(), data=PromptData(), out=tmp_path / "full", **QUIET)
    train(cfg(steps=4, probe_every=2, stop_after=2, strategy="cached_negatives", cache_refresh=2),
          policy=make_policy(), data=PromptData(), out=tmp_path / "half", **QUIET)
    train(c, policy=make_policy(), data=PromptData(), out=tmp_path / "half", resume=True, **QUIET)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "half")
    for key in ("l1", "energy_loss", "probe_l1", "drift_context"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key


def test_iterable_data_trains_and_resume_skips_what_was_consumed(tmp_path):
    """A plain iterable of batch dicts (a DataLoader stand-in): the probe is given, each step
    takes grad_accum batches, a resume skips the consumed ones (this one replays its order, so
    the resumed run equals the uninterrupted one)."""
    data = PromptData()
    probe = data.probe()
    iterable = list(iter(data))  # re-iterable, 8 batches per pass; 10 steps wrap around
    c = cfg(steps=10, strategy="two_phase")
    train(c, policy=make_policy(), data=iterable, probe=probe, out=tmp_path / "full", **QUIET)
    train(cfg(steps=10, stop_after=5), policy=make_policy(), data=iterable, probe=probe,
          out=tmp_path / "half", **QUIET)
    train(c, policy=make_policy(), data=iterable, probe=probe, out=tmp_path / "half",
          resume=True, **QUIET)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "half")
    assert [r["l1"] for r in a] == [r["l1"] for r in b] and len(a) == 10


# --------------------------------------------------------------------------------------------
# bad policies: clear errors at start-up naming the Policy method, expected vs received
# --------------------------------------------------------------------------------------------
class Broken(LlamaPolicy):
    def __init__(self, how):
        base = make_policy()
        super().__init__(base.backbone, base.action_head, base.extras["patch"])
        self.how = how

    def forward(self, batch, output_hidden_states=False):
        h = super().forward(batch, output_hidden_states)
        if self.how == "forward_shape":
            return h[..., :-1]
        if self.how == "forward_dtype":
            return h.long()
        return h

    def layout(self, batch):
        lay = super().layout(batch)
        if self.how == "index_range":
            lay.action_index = lay.action_index + 100
        if self.how == "index_width":
            lay.action_index = lay.action_index[:, :-1]
        if self.how == "pad_shape":
            lay.pad_mask = lay.pad_mask[:, :-2]
        if self.how == "pad_dtype":
            lay.pad_mask = lay.pad_mask.long()
        return lay

    def expert(self, batch):
        e = super().expert(batch)
        return e[:, :, :5] if self.how == "expert" else e


BAD = [("forward_shape", r"Policy.forward\(batch\): expected shape \(6, \?, 32\) .*got \(6, \d+, 31\)"),
       ("forward_dtype", r"Policy.forward\(batch\): expected a floating dtype"),
       ("index_range", r"action_index: positions must lie in \[0, T=\d+\)"),
       ("index_width", r"action_index: expected shape \(6, 28\) .*H\*Da=28, got \(6, 27\)"),
       ("pad_shape", r"pad_mask: expected shape \(6, \d+\)"),
       ("pad_dtype", r"pad_mask: expected dtype torch.bool"),
       ("expert", r"Policy.expert\(batch\): expected shape \(\?, 4, 7\) .*got \(6, 4, 5\)")]


@pytest.mark.parametrize("how,match", BAD, ids=[b[0] for b in BAD])
def test_a_wrong_policy_is_a_clear_error_at_start_up(how, match):
    with pytest.raises(PolicyError, match=match):
        trainer(policy=Broken(how))


def test_a_head_that_disagrees_with_the_layout_and_shared_parameters():
    p = make_policy(chunk=4)
    p.action_head = make_policy(chunk=3).action_head  # H = 3, the data's chunks have 4 steps
    with pytest.raises(PolicyError, match=r"expert\(batch\): expected shape \(\?, 3, 7\) .*"
                                          r"H=3, Da=7, got \(6, 4, 7\)"):
        trainer(policy=p)
    p = make_policy()
    from energy_train.models import EnergyModel
    energy = EnergyModel(32, 7, hidden=32, heads=2)
    energy.stolen = p.extras["patch"].weight
    with pytest.raises(ValueError, match="disjoint"):
        make_trainer(cfg(), policy=p, energy=energy, data=PromptData())


def test_policy_that_does_not_import_is_named(tmp_path, capsys):
    from energy_train.cli import main
    assert main(["train", "--policy", "no_such_module:make", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "run.policy (--policy): cannot import 'no_such_module:make'" in err
    assert not (tmp_path / "r").exists()


def test_a_users_factory_from_the_command_line(tmp_path, capsys):
    """--policy module:factory with its own checked [policy] options."""
    import json

    from energy_train.cli import main
    out = tmp_path / "run"
    args = ["train", "--policy", "hf_policy:factory", "--steps", "2", "--batch-size", "4",
            "--no-progress", "--set", "energy.hidden=32", "--set", "energy.heads=2"]
    assert main([*args, "--set", "policy.d=4", "--out", str(out)]) == 2
    assert "policy.d: expected an integer >= 8, got 4" in capsys.readouterr().err
    assert main([*args, "--set", "policy.lora=true", "--set", "probe_every=1",
                 "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["policy"] == "hf_policy:factory" and cfg["policy"] == {"d": 32, "layers": 2,
                                                                             "lora": True}
    assert (out / "complete.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama_policy_overlapped_equals_sequential_on_cuda_bf16():
    """The Llama policy with LoRA, bf16 autocast, on CUDA: overlapped == sequential bitwise
    (deterministic kernels; a sequential-vs-sequential control tells nondeterminism apart)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(overlap):
        policy = make_policy(lora=True)
        for m in policy.modules().values():
            m.cuda()
        t = make_trainer(cfg(device="cuda", overlap=overlap, steps=6, precision="bf16"),
                         policy=policy, data=PromptData())
        assert t.streams.enabled == overlap
        ms = [t.train_step() for _ in range(6)]
        t.flush()
        return [float(m["l1"]) for m in ms], snapshot(t.theta), snapshot(t.phi)

    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            a, b, c = run(True), run(False), run(False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert b[0] == c[0] and same(b[1], c[1]), "sequential runs differ: nondeterministic kernels"
    assert a[0] == b[0] and same(a[1], b[1]) and same(a[2], b[2])
