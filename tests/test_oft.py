"""The OpenVLA-OFT integration on its CPU stand-in (energy_train/integrations/openvla_oft/):
the action rows and the context against OFT's and the energy fork's own expressions, the
test-time path against OFT's predict_action, training with LoRA under three strategies (the
invariants, OFT-layout checkpoints, bf16), test-time correction, and the bad inputs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")  # in the dev extra: runs in CI
pytest.importorskip("peft")

from energy_train import EnergyModel, L1RegressionActionHead, train  # noqa: E402
from energy_train.config import default_config  # noqa: E402
from energy_train.integrations.openvla_oft import (OFTInputError, OFTPolicy,  # noqa: E402
                                                   context_and_mask, load_oft_checkpoint,
                                                   prepare_inference, rerank)
from energy_train.integrations.openvla_oft import standin as S  # noqa: E402
from energy_train.models import load_oft_state_dict  # noqa: E402
from energy_train.trainer import read_metrics  # noqa: E402
from energy_train.trainer.feed import prepare  # noqa: E402
from trainer_helpers import make_trainer, same, snapshot, spy_isolation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(echo=lambda *a: None)
BASE = dict(batch_size=4, steps=3, warmup_steps=1, log_every=1, probe_every=0, progress=False,
            energy_hidden=32, energy_heads=2, energy_loss="explicit")
SMALL = dict(llm_dim=32, llm_heads=4, vision_dims=(16, 8), vision_blocks=3)


def cfg(**kw):
    return default_config(**{**BASE, **kw})


def policy(seed=0, **kw):
    return S.make_standin(seed, **{**SMALL, **kw})


def episodes(n=12, seed=0, **kw):
    return S.StandinEpisodes(n, 8, seed=seed, **kw)


def data(batch_size=4, grad_accum=1, seed=0):
    return S.StandinData(episodes(seed=seed), episodes(4, seed=seed + 1), batch_size=batch_size,
                         grad_accum=grad_accum, seed=seed)


def ragged_batch(d: S.StandinData, step=0) -> dict:
    """A batch whose prompts differ in length (so right padding is present)."""
    for k in range(step, step + 50):
        b = d.batch(k)[0]
        if not bool(b["attention_mask"].all()):
            return b
    raise AssertionError("no batch with padding")


# the public energy fork's context mask, written as it is (the oracle)
def extend_mask_after_last_true(mask):
    B, S_ = mask.shape
    last = torch.where(mask, torch.arange(S_).expand(B, S_), -1).max(dim=1).values
    return (torch.arange(S_).unsqueeze(0).expand(B, S_) >= last.unsqueeze(1)) | mask


def fork_context_mask(labels, num_patches, action_dim=7):
    gt = labels[:, 1:]
    am = S.get_current_action_mask(gt, action_dim) | S.get_next_actions_mask(gt, action_dim)
    am = extend_mask_after_last_true(am)
    B = labels.shape[0]
    return torch.cat([torch.zeros(B, num_patches, dtype=torch.bool), am,
                      torch.ones(B, 1, dtype=torch.bool)], dim=1)


def oft_action_rows(hidden, labels, num_patches, n):
    """OFT's fine-tuning: hidden[:, P:-1][current | next action mask of labels[:, 1:]]."""
    gt = labels[:, 1:]
    mask = S.get_current_action_mask(gt, 7) | S.get_next_actions_mask(gt, 7)
    return hidden[:, num_patches:-1][mask].reshape(labels.shape[0], n, -1)


# --------------------------------------------------------------------------------------------
# rows, context, collator, the test-time path
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", ["fork", "prompt"])
def test_captured_rows_of_every_layer_equal_ofts_expression(context):
    """The trainer's hook capture (action rows of all L+1 states, context rows) on a batch with
    variable prompt lengths and right padding equals OFT's boolean-mask expression per layer
    and the context rows, bitwise in fp32; the fork-style pad mask equals the fork's."""
    p = policy(context=context)
    t = make_trainer(cfg(), policy=p, data=data())
    b = ragged_batch(data())
    mb = prepare(p, b, t.device, 0, True)
    lens = b["attention_mask"].sum(1)
    assert len(set(lens.tolist())) > 1 and b["input_ids"][b["attention_mask"] == 0].eq(S.PAD_TOKEN_ID).all()
    fwd = t.observe(mb, reuse=False)
    with torch.no_grad():
        out = p.forward(b, output_hidden_states=True)
    assert len(out.hidden_states) == fwd.captured.action_rows.shape[0] == 3
    for layer, h in enumerate(out.hidden_states):
        ref = oft_action_rows(h, b["labels"], p.num_patches, p.num_action_tokens)
        assert torch.equal(fwd.captured.action_rows[layer], ref), layer
    last = out.hidden_states[-1]
    ctx, pad = context_and_mask(last, b["labels"], b["attention_mask"], p.num_patches, context,
                                num_action_tokens=p.num_action_tokens,
                                action_token_begin_idx=S.ACTION_TOKEN_BEGIN_IDX)
    assert torch.equal(fwd.captured.context, ctx) and torch.equal(mb.layout.pad_mask, pad)
    if context == "fork":
        assert torch.equal(pad, fork_context_mask(b["labels"], p.num_patches))
        assert ctx.shape[1] == last.shape[1]
    else:  # visible: BOS, patches + proprio, then every prompt token at its own row
        for r in range(b["labels"].shape[0]):
            prompt = int(((b["labels"][r] == -100) & b["attention_mask"][r]).sum())
            want = torch.zeros(pad.shape[1], dtype=torch.bool)
            want[:p.num_patches + prompt] = True
            assert torch.equal(~pad[r], want), r
    # the forward's hook (final norm) gives hidden_states[-1] exactly
    with torch.no_grad():
        assert torch.equal(p.forward(b), last)


def test_collator_output_is_ofts():
    """OFT's PaddedCollatorForActionPrediction: right padding with the pad id (inside the
    action-token range), labels padded with -100, attention_mask = ids != pad, wrist images
    after the main one, proprio squeezed to 1-D when B = 1, dataset_names kept."""
    ep = episodes()
    col = S.PaddedCollatorForActionPrediction(512, S.PAD_TOKEN_ID)
    items = [ep[i] for i in range(5)]
    out = col(items)
    L = max(len(it["input_ids"]) for it in items)
    assert set(out) == {"pixel_values", "proprio", "input_ids", "attention_mask", "labels",
                        "actions", "dataset_names"}
    assert out["input_ids"].shape == (5, L) and out["pixel_values"].shape == (5, 12, 16, 16)
    assert S.PAD_TOKEN_ID > S.ACTION_TOKEN_BEGIN_IDX
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        assert torch.equal(out["input_ids"][r, :n], it["input_ids"])
        assert (out["input_ids"][r, n:] == S.PAD_TOKEN_ID).all()
        assert (out["labels"][r, n:] == -100).all()
        assert torch.equal(out["attention_mask"][r], out["input_ids"][r] != S.PAD_TOKEN_ID)
        assert torch.equal(out["pixel_values"][r], torch.cat([it["pixel_values"], it["pixel_values_wrist"]]))
        # the label layout of OFT's RLDS transform: H*Da action tokens, then </s>, last
        lab = it["labels"]
        assert (lab[:-57] == -100).all() and (lab[-57:-1] > S.ACTION_TOKEN_BEGIN_IDX).all()
        assert lab[-1] == S.STOP_INDEX and it["input_ids"][-58] == S.EMPTY_TOKEN_ID
    one = col(items[:1])
    assert one["proprio"].shape == (S.PROPRIO_DIM,)  # the squeeze trap, reproduced
    np.testing.assert_array_equal(out["actions"][0].numpy(), items[0]["actions"])


def test_test_time_path_equals_ofts_predict_action_and_training_context():
    """prepare_inference + OFTPolicy.act on a prompt gives bitwise the actions and action rows
    of OFT's predict_action (the stand-in's copy, whose rows sit at NUM_PATCHES +
    NUM_PROMPT_TOKENS), and the context + mask the trainer captures for the same sample at
    training time (one context function)."""
    p = policy()
    ep = episodes()
    item = ep[3]
    col = S.PaddedCollatorForActionPrediction(512, S.PAD_TOKEN_ID)
    train_batch = col([item])
    train_batch["proprio"] = train_batch["proprio"].reshape(1, -1)
    n_prompt = len(item["input_ids"]) - p.num_action_tokens - 1
    ids = item["input_ids"][None, :n_prompt - 1]  # the processor's prompt: no empty token yet
    batch = prepare_inference(ids, torch.ones_like(ids, dtype=torch.bool),
                              train_batch["pixel_values"], proprio=item["proprio"],
                              num_action_tokens=p.num_action_tokens,
                              action_token_begin_idx=S.ACTION_TOKEN_BEGIN_IDX,
                              empty_token_id=S.EMPTY_TOKEN_ID)
    actions, ctx, pad = p.act(batch)
    ref_actions, ref_rows = p.backbone.predict_action(
        ids, torch.ones_like(ids, dtype=torch.bool), train_batch["pixel_values"],
        proprio=torch.as_tensor(item["proprio"])[None], proprio_projector=p.proprio_projector,
        action_head=p.action_head, num_actions_chunk=8)
    assert torch.equal(actions, ref_actions)
    t = make_trainer(cfg(), policy=p, data=data())
    fwd = t.observe(prepare(p, train_batch, t.device, 0, True), reuse=False)
    pad_train = p.layout(train_batch).pad_mask
    assert torch.equal(fwd.captured.context, ctx) and torch.equal(pad_train, pad)
    assert torch.equal(fwd.captured.action_rows[-1], ref_rows)


# --------------------------------------------------------------------------------------------
# training with LoRA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["two_phase", "shared_forward", "joint"])
def test_strategies_with_lora_keep_the_invariants(strategy):
    """LoRA on the stand-in: only adapters + head + proprio projector train; the frozen base
    is bitwise unchanged; phase 2 and the phi step leave theta bitwise unchanged; the energy
    backward deposits nothing into theta; theta and phi move."""
    p = policy(lora_rank=4)
    frozen = {n: v.detach().clone() for n, v in p.backbone.named_parameters() if not v.requires_grad}
    names = [n for n, _ in p.named_trainable()]
    assert frozen and all("lora_" in n for n in names if n.startswith("backbone."))
    assert any("proprio_projector" in n for n in names)
    # lm_head: wrapped by peft 0.11.1's all-linear (OFT's pin), not by recent peft; never trained
    lm_head = [v for n, v in p.backbone.named_parameters() if "lm_head" in n and "lora_B" in n]
    t = make_trainer(cfg(strategy=strategy), policy=p, data=data())
    theta0, phi0, seen = snapshot(t.theta), snapshot(t.phi), spy_isolation(t)
    metrics = [t.train_step() for _ in range(3)]
    assert seen and all(seen)
    assert all(float(m["energy_grad_theta"]) == 0.0 for m in metrics if "energy_grad_theta" in m)
    assert not same(phi0, snapshot(t.phi)) and not same(theta0, snapshot(t.theta))
    for n, v in p.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(v, frozen[n]), n
    assert all(not v.any() for v in lm_head)
    unused = [v for n, v in p.backbone.named_parameters() if "blocks.2." in n and v.requires_grad]
    assert unused and all(v.grad is None or not v.grad.any() for v in unused)  # why DDP needs
    # find_unused_parameters: the last vision block's adapters never get a gradient


def test_oft_layout_checkpoint_is_written_and_loads_back(tmp_path):
    """A run writes OFT's files at <run>/oft/step_N/ beside its own checkpoints: lora_adapter/,
    action_head / proprio_projector (keys prefixed "module.") and energy_model; they load into
    fresh modules with strict keys and hold the trained values. theta.safetensors holds no
    frozen base tensor."""
    p = policy(lora_rank=4)
    res = train(cfg(steps=2, ckpt_every=1), policy=p, data=data(), out=tmp_path / "run", **QUIET)
    assert res.complete
    oft = tmp_path / "run" / "oft"
    assert sorted(x.name for x in oft.iterdir()) == ["step_0000001", "step_0000002"]
    d = oft / "step_0000002"
    assert sorted(x.name for x in d.iterdir()) == [
        "action_head--2_checkpoint.pt", "energy_model--2_checkpoint.pt", "lora_adapter",
        "proprio_projector--2_checkpoint.pt"]
    head_sd = torch.load(d / "action_head--2_checkpoint.pt", weights_only=True)
    assert head_sd and all(k.startswith("module.") for k in head_sd)
    fresh = policy(seed=5, lora_rank=4)
    energy = EnergyModel(32, 7, hidden=32, heads=2)
    loaded = load_oft_checkpoint(d, vla=fresh.backbone, action_head=fresh.action_head,
                                 proprio_projector=fresh.proprio_projector, energy=energy)
    assert set(loaded) == {"action_head", "proprio_projector", "energy_model", "lora_adapter"}
    for (n, a), (_, b) in zip(p.named_trainable(), fresh.named_trainable()):
        assert torch.equal(a, b), n
    for a, b in zip(res.trainer.energy.state_dict().values(), energy.state_dict().values()):
        assert torch.equal(a, b)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    theta = load_file(ckpt / "theta.safetensors")
    assert set(theta) == {n for n, _ in p.named_trainable()}
    # FiLM's extra file (the whole vision backbone) goes the same way
    from energy_train.integrations.openvla_oft import save_oft_checkpoint
    film = save_oft_checkpoint(tmp_path / "film", 7, vision_backbone=p.backbone.vision_backbone)
    vb = fresh.backbone.vision_backbone
    load_oft_checkpoint(film, vision_backbone=vb)
    assert same(list(vb.state_dict().values()), list(p.backbone.vision_backbone.state_dict().values()))
    wrong = policy(seed=5, lora_rank=2)  # another LoRA rank: the adapter does not fit
    with pytest.raises((ValueError, RuntimeError)):
        load_oft_checkpoint(d, vla=wrong.backbone)


def test_bf16_weights_and_autocast_with_lora(tmp_path):
    """The VLA and head in bf16 (as OFT holds them), adapters in fp32 (recent peft; peft
    0.11.1, OFT's pin, keeps them in the base's bf16) and projector in fp32, bf16 autocast:
    trains, L1 finite, the bf16 base unchanged."""
    import peft
    from packaging.version import Version
    p = policy(lora_rank=4, weights="bf16")
    dtypes = {v.dtype for n, v in p.backbone.named_parameters() if "lora_" in n}
    lora = torch.float32 if Version(peft.__version__) >= Version("0.12") else torch.bfloat16
    assert dtypes == {lora} and p.action_head.model.fc1.weight.dtype == torch.bfloat16
    frozen = {n: v.detach().clone() for n, v in p.backbone.named_parameters() if not v.requires_grad}
    assert {v.dtype for v in frozen.values()} == {torch.bfloat16}
    res = train(cfg(steps=3, precision="bf16"), policy=p, data=data(), out=tmp_path / "run", **QUIET)
    recs = read_metrics(res.run_dir)
    assert len(recs) == 3 and all(np.isfinite(r["l1"]) and np.isfinite(r["energy_loss"]) for r in recs)
    for n, v in p.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(v, frozen[n]), n


def test_cli_trains_the_registered_standin(tmp_path, capsys):
    """`energy-train train --policy oft-standin`: the [policy] options are checked, the run
    completes with LoRA, writes the OFT layout, and the config parses without transformers."""
    from energy_train.cli import main
    out = tmp_path / "run"
    args = ["train", "--policy", "oft-standin", "--steps", "2", "--batch-size", "4",
            "--no-progress", "--set", "energy.hidden=32", "--set", "energy.heads=2",
            "--set", "policy.llm_dim=32", "--set", "policy.episodes=8", "--set", "policy.episode_len=4"]
    assert main([*args, "--set", "policy.context=neither", "--out", str(out)]) == 2
    assert "policy.context: expected one of ('fork', 'prompt'), got 'neither'" in capsys.readouterr().err
    assert main([*args, "--out", str(out)]) == 0
    assert (out / "complete.json").is_file()
    assert (out / "oft" / "step_0000002" / "lora_adapter" / "adapter_config.json").is_file()
    code = ("import sys; from energy_train.config import default_config; "
            "c = default_config(**{'run.policy': 'oft-standin', 'policy.lora_rank': 8}); "
            "assert c.policy.lora_rank == 8; print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


# --------------------------------------------------------------------------------------------
# test time: correction and reranking on the trained verifier
# --------------------------------------------------------------------------------------------
def test_correct_actions_lowers_the_energy_of_a_perturbed_chunk():
    p = policy()
    t = make_trainer(cfg(strategy="two_phase", energy_loss="swap"), policy=p, data=data())
    for _ in range(6):
        t.train_step()
    b = data().probe()
    _, ctx, pad = p.act(b)
    g = torch.Generator().manual_seed(0)
    perturbed = b["actions"] + 0.3 * torch.randn(b["actions"].shape, generator=g)
    e0 = t.energy(ctx, perturbed, pad)
    from energy_train import correct_actions
    fixed = correct_actions(t.energy, ctx, pad, perturbed, alpha=0.05, steps=3)
    e1 = t.energy(ctx, fixed, pad)
    assert (e1 < e0).all(), (e0.flatten(), e1.flatten())
    pred, corrected = p.correct(t.energy, b, alpha=0.05, steps=1)
    assert corrected.shape == b["actions"].shape and not torch.equal(pred, corrected)
    pred16, fixed16 = p.correct(t.energy, b, alpha=0.05, steps=1, autocast=torch.bfloat16)
    assert pred16.dtype == torch.bfloat16 and fixed16.dtype == torch.float32
    assert torch.isfinite(fixed16).all()
    cands = torch.stack([perturbed, fixed, b["actions"]], dim=1)
    best, idx, e = rerank(t.energy, ctx, pad, cands)
    assert torch.equal(idx, e.argmin(1))
    assert torch.equal(best, cands[torch.arange(len(idx)), idx])


# --------------------------------------------------------------------------------------------
# OFT's own modules (duck-typed) and bad input
# --------------------------------------------------------------------------------------------
NUM_ACTIONS_CHUNK = 8  # the global OFT's head reads (prismatic.vla.constants)


class OFTHead(torch.nn.Module):
    """OFT's L1RegressionActionHead as written: H from a module global, MLPResNet(num_blocks=2)."""

    def __init__(self, input_dim=4096, hidden_dim=4096, action_dim=7):
        super().__init__()
        from energy_train.models import MLPResNet
        self.action_dim = action_dim
        self.model = MLPResNet(2, input_dim * action_dim, hidden_dim, action_dim)

    def predict_action(self, actions_hidden_states):
        B = actions_hidden_states.shape[0]
        return self.model(actions_hidden_states.reshape(B, NUM_ACTIONS_CHUNK, -1))


def test_ofts_own_head_is_accepted_and_its_weights_convert():
    p = policy()
    head = OFTHead(32, 32, 7)
    sd = {f"module.{k}": v for k, v in p.action_head.state_dict().items()}  # as OFT saves it
    load_oft_state_dict(head, sd)
    q = OFTPolicy(p.backbone, head, p.proprio_projector, num_actions_chunk=8,
                  action_token_begin_idx=S.ACTION_TOKEN_BEGIN_IDX, pad_token_id=S.PAD_TOKEN_ID)
    assert q.chunk_shape == (8, 7) and q.hidden_size == 32 and q.num_patches == 33
    b = data().batch(0)[0]
    a, _, _ = q.act(b)
    a2, _, _ = p.act(b)
    assert torch.equal(a, a2)
    with pytest.raises(OFTInputError, match=r"action_head: predict_action\(\(1, H\*Da=35, D=32\)\) "
                                            r"failed for H=5, Da=7"):
        OFTPolicy(p.backbone, head, p.proprio_projector, num_actions_chunk=5)
    with pytest.raises(OFTInputError, match=r"failed for H=5, Da=7"):  # this package's head
        OFTPolicy(p.backbone, p.action_head, p.proprio_projector, num_actions_chunk=5)
    with pytest.raises(OFTInputError, match="action_head: expected input width D = the VLA's "
                                            "hidden size 32, got 16"):
        OFTPolicy(p.backbone, L1RegressionActionHead(16, 16, 7, 8), p.proprio_projector)


def _bad(kind: str, b: dict) -> dict:
    b = dict(b)
    if kind == "no_labels":
        del b["labels"]
    elif kind == "no_proprio":
        del b["proprio"]
    elif kind == "count":
        lab = b["labels"].clone()
        lab[1, (lab[1] > S.ACTION_TOKEN_BEGIN_IDX).nonzero()[0]] = -100
        b["labels"] = lab
    elif kind == "proprio_width":  # (B = 1 squeezed to (P,) is OFT's collator: accepted)
        b["proprio"] = b["proprio"][:, :5]
    elif kind == "head":
        b["actions"] = b["actions"][:, :5]
    elif kind == "channels":  # OFT's fused backbone reads 6 channels per image
        b["pixel_values"] = b["pixel_values"][:, :5]
    elif kind == "vocab":
        ids = b["input_ids"].clone()
        ids[0, 1] = 10 ** 6
        b["input_ids"] = ids
    elif kind == "pad_in_labels":
        lab = b["labels"].clone()
        r = int((~b["attention_mask"].all(1)).nonzero()[0])  # a padded row: pad ids as labels
        lab[r][b["attention_mask"][r] == 0] = S.PAD_TOKEN_ID
        b["labels"] = lab
    return b


BAD = [("no_labels", r"batch\['labels'\]: missing"),
       ("no_proprio", r"batch\['proprio'\]: missing; the proprio projector reads \(B, 8\)"),
       ("count", r"batch\['labels'\]: expected H\*Da = 56 action tokens .* got \[55\] in rows \[1\]"),
       ("proprio_width", r"batch\['proprio'\]: expected \(B, proprio_dim\) = \(4, 8\) \(or "
                         r"\(8,\) at B = 1, as OFT's collator squeezes it\), got \(4, 5\)"),
       ("head", r"batch\['actions'\]: expected \(B, H, Da\) = \(4, 8, 7\) from the action head, "
                r"got \(4, 5, 7\)"),
       ("pad_in_labels", r"batch\['labels'\]: rows \[\d\] hold ids >= the pad id 128, outside the "
                         r"action-token range \(64..127\)"),
       ("channels", r"batch\['pixel_values'\]: expected \(B, 12, H, W\) with B = 4 \(6 \(a fused "
                    r"backbone\) channels per image x 2 image\(s\)\), got \(4, 5, 16, 16\)"),
       ("vocab", r"batch\['input_ids'\]: expected ids in \[0, 136\) \(the language model's "
                 r"vocabulary\), got values in \[\d+, 1000000\]")]


@pytest.mark.parametrize("kind,match", BAD, ids=[b[0] for b in BAD])
def test_bad_batches_are_clear_errors(kind, match, tmp_path):
    """Each bad batch is named by check_batch (the trainer runs it on every batch before the
    move); the same batches through energy_train.train fail at start-up with that message."""
    p = policy()
    good = ragged_batch(data())
    b = _bad(kind, good)
    with pytest.raises(OFTInputError, match=match):
        p.check_batch(b)
    with pytest.raises(OFTInputError, match=match):
        train(cfg(steps=1), policy=p, data=[b], probe=b, out=tmp_path / "run", **QUIET)
    assert (tmp_path / "run" / "error.txt").is_file()


def test_standin_under_ddp_two_gloo_ranks(tmp_path):
    """2 gloo ranks, LoRA, find_unused_parameters (the last vision block's adapters get no
    gradient): theta and phi bitwise identical on both ranks after 3 steps; rank 0 alone
    writes the run directory and the OFT-layout files; without find_unused_parameters the
    stand-in's config is refused under torchrun."""
    from test_distributed import free_port, rank_env, tail, wait_all
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "oft_dist_worker.py"),
                               str(tmp_path)], env=rank_env(r, port), cwd=ROOT,
                              stdout=open(logs / f"rank{r}.out", "w"), stderr=subprocess.STDOUT)
             for port in [free_port()] for r in range(2)]
    assert wait_all(procs, timeout=240) == [0, 0], tail(logs)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["refused"] and "dist.find_unused_parameters: expected true" in a["refused"]
    assert a["theta"].keys() == b["theta"].keys() and a["theta"]
    for k in a["theta"]:
        assert torch.equal(a["theta"][k], b["theta"][k]), k
    for k in a["phi"]:
        assert torch.equal(a["phi"][k], b["phi"][k]), k
    assert not same(list(a["theta"].values()), list(a["theta0"].values()))
    run = tmp_path / "run"
    assert (run / "complete.json").is_file()
    assert (run / "oft" / "step_0000003" / "lora_adapter" / "adapter_model.safetensors").is_file()


def test_example_script_runs_with_the_standin(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "openvla_oft_two_phase.py"),
                        "--standin", "--max_steps", "3", "--batch_size", "4",
                        "--run_root_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1 and (runs[0] / "complete.json").is_file()
    assert any((runs[0] / "oft").glob("step_*/action_head--*_checkpoint.pt"))


@pytest.mark.parametrize("crash_at", ["replace:1", "replace:2", "rmtree:last"])
def test_a_crash_during_a_re_save_of_the_oft_files_loses_neither_copy(tmp_path, monkeypatch, crash_at):
    """Re-saving a step's OFT directory (a --resume of a finished run) replaces it by renames:
    killed after any of them, the directory loads with the previous or the new weights, and
    the next save leaves exactly the new ones."""
    from energy_train.integrations.openvla_oft import checkpoints as oc
    d = tmp_path / "oft" / "step_0000002"
    old, new = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    oc.save_oft_checkpoint(d, 2, action_head=old)
    kind, n = crash_at.split(":")
    real = {"replace": oc.os.replace, "rmtree": oc.shutil.rmtree}
    calls = {"replace": 0, "rmtree": 0}

    class Killed(Exception):
        pass

    def fault(which):
        def f(*a, **k):
            calls[which] += 1
            if which == kind and (calls[which] == int(n) if n != "last" else a[0].name.startswith(oc.ASIDE)):
                raise Killed(crash_at)
            return real[which](*a, **k)
        return f
    monkeypatch.setattr(oc.os, "replace", fault("replace"))
    monkeypatch.setattr(oc.shutil, "rmtree", fault("rmtree"))
    with pytest.raises(Killed):
        oc.save_oft_checkpoint(d, 2, action_head=new)
    monkeypatch.undo()
    got = torch.nn.Linear(3, 2)
    oc.load_oft_checkpoint(d, action_head=got)
    assert any(same(list(got.state_dict().values()), list(m.state_dict().values()))
               for m in (old, new))
    oc.save_oft_checkpoint(d, 2, action_head=new)
    oc.load_oft_checkpoint(d, action_head=got)
    assert same(list(got.state_dict().values()), list(new.state_dict().values()))
    assert sorted(x.name for x in d.parent.iterdir()) == ["step_0000002"]


# --------------------------------------------------------------------------------------------
# test-time inputs are checked like training inputs
# --------------------------------------------------------------------------------------------
def _prompt(p):
    item = episodes()[3]
    n_prompt = len(item["input_ids"]) - p.num_action_tokens - 1
    ids = item["input_ids"][None, :n_prompt - 1]
    pix = S.PaddedCollatorForActionPrediction(512, S.PAD_TOKEN_ID)([item])["pixel_values"]
    return ids, torch.ones_like(ids, dtype=torch.bool), pix, item["proprio"]


def _inference(p, **kw):
    ids, mask, pix, proprio = _prompt(p)
    args = dict(proprio=proprio, num_action_tokens=p.num_action_tokens,
                action_token_begin_idx=S.ACTION_TOKEN_BEGIN_IDX, empty_token_id=S.EMPTY_TOKEN_ID)
    return prepare_inference(ids, mask, pix, **{**args, **kw})


TEST_TIME = [
    ("tokens-zero", lambda p: _inference(p, num_action_tokens=0), ValueError,
     "num_action_tokens: expected an int >= 1, got 0"),
    ("tokens-float", lambda p: _inference(p, num_action_tokens=2.7), TypeError,
     "num_action_tokens: expected an int >= 1, got 2.7"),
    ("begin-str", lambda p: _inference(p, action_token_begin_idx="x"), TypeError,
     "action_token_begin_idx: expected an int >= 0, got 'x'"),
    ("mask-length", lambda p: prepare_inference(*_prompt(p)[:1], torch.ones(1, 3, dtype=torch.bool),
                                                _prompt(p)[2], num_action_tokens=56), ValueError,
     "attention_mask: expected size"),
    ("act-placeholders", lambda p: p.act(_inference(p, num_action_tokens=p.num_action_tokens - 1)),
     OFTInputError, "batch['labels']: expected H*Da = 56 action tokens (ids > 63) in every row, got [55]"),
    ("num-patches", lambda p: OFTPolicy(p.backbone, p.action_head, p.proprio_projector, num_patches=-1),
     ValueError, "num_patches: expected an int >= 1, got -1"),
    ("policy-begin-str", lambda p: OFTPolicy(p.backbone, p.action_head, p.proprio_projector,
                                             action_token_begin_idx="x"), TypeError,
     "action_token_begin_idx: expected an int >= 0, got 'x'"),
    ("projector-class", lambda p: OFTPolicy(p.backbone, p.action_head, torch.nn.Linear(8, 32)),
     OFTInputError, "proprio_projector: expected OFT's ProprioProjector (fc1: Linear(proprio_dim, "
     "llm_dim), fc2), got Linear"),
    ("nan-weights", lambda p: load_oft_state_dict(p.action_head, {
        **p.action_head.state_dict(), "model.fc1.weight": torch.full_like(
            p.action_head.state_dict()["model.fc1.weight"], float("nan"))}), ValueError,
     "state_dict['model.fc1.weight']: holds"),
]


@pytest.mark.parametrize("call,exc,message", [c[1:] for c in TEST_TIME], ids=[c[0] for c in TEST_TIME])
def test_test_time_inputs_are_checked_like_training_inputs(call, exc, message):
    p = policy()
    with pytest.raises(exc) as info:
        call(p)
    assert message in str(info.value), str(info.value)


def test_nan_weights_in_an_oft_checkpoint_are_refused(tmp_path):
    from energy_train.integrations.openvla_oft import save_oft_checkpoint
    p = policy()
    save_oft_checkpoint(tmp_path / "ckpt", 1, action_head=p.action_head)
    path = next((tmp_path / "ckpt").glob("action_head--*"))
    sd = torch.load(path, weights_only=True)
    sd[next(iter(sd))].view(-1)[0] = float("inf")
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"action_head--1_checkpoint.pt\['.*'\]: holds 1 non-finite"):
        load_oft_checkpoint(tmp_path / "ckpt", action_head=policy().action_head)


def test_rerank_never_returns_a_non_finite_candidate():
    """The rule the C++ runtime shares: a NaN/inf energy or chunk is never picked; a sample with
    no finite candidate is an error (the Python rerank used to pick a NaN-energy candidate)."""
    torch.manual_seed(0)
    energy = EnergyModel(32, 7, hidden=16, heads=2)
    ctx, pad = torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.bool)
    cands = torch.randn(2, 3, 8, 7)
    e = rerank(energy, ctx, pad, cands)[2]
    low = e.argmin(1)
    bad = cands.clone()
    bad[0, low[0], 0, 0] = float("nan")   # its energy becomes NaN
    bad[1, low[1], 2, 3] = float("inf")   # a chunk with inf
    best, idx, e2 = rerank(energy, ctx, pad, bad)
    assert (idx != low).all() and torch.isfinite(best).all()
    assert idx[0] == e2[0].masked_fill(e2[0].isnan(), float("inf")).argmin()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match=r"rerank: samples \[1\] have no candidate with a finite energy"):
        rerank(energy, ctx, pad, bad)
    energy.train()
    rerank(energy, ctx, pad, cands)
    assert energy.training  # run in eval mode, its mode restored
