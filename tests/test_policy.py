"""Bring your own policy: the trainer on a Hugging Face LlamaModel behind the Policy interface
(tests/hf_policy.py) - every strategy, the invariants, a frozen base with LoRA adapters, bf16,
iterable data, phase2_every, exact resume, and the start-up errors of a wrong policy."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")  # in the dev extra: runs in CI

from energy_train import BatchLayout, train  # noqa: E402
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
        if self.how == "forward_tuple":
            return (h,)
        if self.how == "forward_sliced":  # drops the patch rows: not what the final norm gives
            return h[:, 1:]
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
        if self.how == "forward_sliced":  # positions of the sliced rows: in range, and wrong
            return BatchLayout(lay.action_index - 1, lay.context_index[:, :-1], lay.pad_mask[:, 1:])
        if self.how == "layout_tuple":
            return lay.action_index, lay.context_index, lay.pad_mask
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
       ("expert", r"Policy.expert\(batch\): expected shape \(\?, 4, 7\) .*got \(6, 4, 5\)"),
       ("forward_tuple", r"Policy.forward\(batch\): expected the \(B, T, D\) last hidden state "
                         r"\(a tensor, or an object with .last_hidden_state\), got tuple"),
       ("layout_tuple", r"Policy.layout\(batch\): expected an energy_train.BatchLayout.*got tuple"),
       ("forward_sliced", r"Policy.decoder\(\) \(2 layers .*\): the layer 0 gives shape \(6, (\d+), "
                          r"32\), expected Policy.forward\(batch\)'s \(6, (?!\1)\d+, 32\).*override "
                          r"Policy.decoder\(\)")]


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


class Tower(torch.nn.Module):
    """A backbone holding a vision tower with more layers than the LM (find_decoder picks the
    tower) and the LM as the decoder forward reads."""

    def __init__(self, llama):
        super().__init__()
        self.lm, self.vision = llama, make_policy(layers=3).backbone

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def forward(self, inputs_embeds, **kw):
        self.vision(inputs_embeds=inputs_embeds[:, :2])
        return self.lm(inputs_embeds=inputs_embeds, **kw)


def test_start_up_names_the_decoder_head_energy_and_missing_keys():
    """A decoder find_decoder cannot find or picks wrongly, a head without the chunk sizes or of
    another dtype, an energy model of other sizes, a batch without a key the policy reads, an
    object that is not a Policy: each an error at start-up naming what to change."""
    p = make_policy()
    p.backbone = Tower(p.backbone)
    with pytest.raises(PolicyError, match=r"Policy.decoder\(\) \(3 layers of LlamaDecoderLayer.*"
                                          r"the layer 0 gives shape \(6, 2, 32\)"):
        trainer(policy=p)
    trainer(policy=p, capture="hidden_states")  # the documented way out trains
    p = make_policy()
    p.backbone.final = p.backbone.norm
    del p.backbone.norm
    with pytest.raises(PolicyError, match=r"Policy.decoder\(\): found no decoder in the backbone "
                                          r"LlamaModel .*override Policy.decoder\(\)"):
        trainer(policy=p)
    p = make_policy()
    p.action_head = torch.nn.Linear(32, 7)
    with pytest.raises(PolicyError, match=r"Policy.chunk_shape / hidden_size: .*num_actions_chunk"):
        trainer(policy=p)
    p = make_policy()
    p.backbone.to(torch.bfloat16)
    with pytest.raises(PolicyError, match=r"Policy.predict_action\(rows\) raised RuntimeError: .*"
                                          r"rows: \(6, 28, 32\) torch.bfloat16 .*run.precision = "
                                          r"'fp32', the head's parameters: torch.float32"):
        trainer(policy=p)
    from energy_train.models import EnergyModel
    with pytest.raises(PolicyError, match=r"energy: expected an energy model for the policy's "
                                          r"D=32, Da=7 .*got state_dim=16, act_dim=7"):
        make_trainer(cfg(), policy=make_policy(), energy=EnergyModel(16, 7, hidden=32, heads=2),
                     data=PromptData())

    class NoLabels(PromptData):
        def batch(self, step, rank, world):
            return [{k: v for k, v in b.items() if k != "labels"}
                    for b in super().batch(step, rank, world)]
    t = trainer(data=NoLabels(batch_size=4))  # the probe batch has the key, the first step not
    with pytest.raises(PolicyError, match=r"Policy.layout\(batch\): the batch has no key "
                                          r"'labels'; it has patches, input_ids"):
        t.train_step()
    with pytest.raises(TypeError, match=r"policy: expected an energy_train.Policy .*got dict"):
        make_trainer(cfg(), policy={"backbone": None}, data=PromptData())


def test_policy_that_does_not_import_is_named(tmp_path, capsys):
    from energy_train.cli import main
    assert main(["train", "--policy", "no_such_module:make", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "run.policy (--policy): cannot import 'no_such_module:make'" in err
    assert "must be importable (PYTHONPATH), or give a file: path/to/file.py:factory" in err
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


def test_a_users_factory_from_a_file(tmp_path, capsys):
    """--policy path/to/file.py:factory loads a file that is on no import path."""
    from energy_train.cli import main
    mine = tmp_path / "my policy" / "mine.py"
    mine.parent.mkdir()
    mine.write_text("import hf_policy\n\ndef make(cfg, device):\n    return hf_policy.factory(cfg, device)\n\n\nmake.options = hf_policy.factory.options\n")
    args = ["train", "--steps", "2", "--batch-size", "4", "--no-progress",
            "--set", "energy.hidden=32", "--set", "energy.heads=2"]
    assert main([*args, "--policy", f"{mine}:make", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "complete.json").is_file()
    missing = mine.parent / "missing.py"
    assert main([*args, "--policy", f"{missing}:make", "--out", str(tmp_path / "r2")]) == 2
    assert f"cannot import '{missing}:make' (ImportError: no file {missing})" in capsys.readouterr().err


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


@pytest.mark.parametrize("data_kw", [dict(batch_size=2), dict(batch_size=4, grad_accum=2)],
                         ids=["rows", "micro-batches"])
def test_a_source_that_ignores_the_configured_batch_is_named(tmp_path, data_kw):
    """A step-indexed source sized by hand (2 rows, or 2 micro-batches, when run.batch_size=4 and
    grad_accum=1 were asked) stops at its first batch with data.batch named, not a run with
    another batch than its config says."""
    with pytest.raises(PolicyError, match=r"data\.batch\(0, 0, 1\): expected run\.grad_accum = 1 "
                                          r"micro-batches of run\.batch_size / world = 4 samples"):
        train(cfg(steps=1, batch_size=4), policy=make_policy(), data=PromptData(**data_kw),
              out=tmp_path / "r", echo=lambda *_: None)
