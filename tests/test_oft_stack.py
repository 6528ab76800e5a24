"""The OFT integration on OFT users' own stack: run under the lock's releases (make test) AND
OpenVLA-OFT's pins (make test-oft: transformers 4.40.1, peft 0.11.1, tokenizers 0.19.1).

- resume as OFT does (the example's --resume): the merged model + a fresh LoRA, or the base
  model + the adapter, reproduce the trained model's hidden states; the adapter on the merged
  model (what the example did) does not;
- adapters saved under either peft (committed fixtures, tests/fixtures/make_oft_adapters.py)
  load under the installed one and give the saving stack's hidden states;
- proprio squeezed to (P,) at batch size 1 and the rows cast to the head's dtype, as OFT;
- the example's energy flags are the fork's (bounded output, warm steps skip phi's step).
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from energy_train import train  # noqa: E402
from energy_train.config import default_config  # noqa: E402
from energy_train.integrations.openvla_oft import (OFTPolicy, apply_lora,  # noqa: E402
                                                   load_lora_adapter, load_oft_checkpoint,
                                                   resume_vla, save_oft_checkpoint)
from energy_train.integrations.openvla_oft import standin as S  # noqa: E402
from energy_train.integrations.openvla_oft.checkpoints import (  # noqa: E402
    PEFT_0_11_LORA_KEYS, portable_adapter_config)
from energy_train.testing import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oft_adapters"
SMALL = dict(llm_dim=32, llm_heads=4, vision_dims=(16, 8), vision_blocks=3)
QUIET = dict(echo=lambda *a: None)
F32 = torch.float32


def cfg(**kw):
    return default_config(**{**dict(batch_size=4, steps=3, warmup_steps=1, log_every=1,
                                    probe_every=0, progress=False, energy_hidden=32,
                                    energy_heads=2, energy_loss="explicit"), **kw})


def data(batch_size=4, seed=0):
    return S.StandinData(S.StandinEpisodes(12, 8, seed=seed), S.StandinEpisodes(4, 8, seed=seed + 1),
                         batch_size=batch_size, grad_accum=1, seed=seed)


def example():
    spec = importlib.util.spec_from_file_location("oft_example", ROOT / "examples" / "openvla_oft_two_phase.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lora_modules(model) -> set[str]:
    return {n.split(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A stand-in trained 3 steps with LoRA by the example's own standin build (rank 4, its
    default sizes), its OFT-layout checkpoint, the base model saved beside it, and the merged
    model written into the checkpoint directory as OFT's merge_lora_weights_and_save.py does
    (base + PeftModel.from_pretrained + merge_and_unload + save_pretrained)."""
    tmp = tmp_path_factory.mktemp("resume")
    ex = example()
    args = ex.parse(["--standin", "--lora_rank", "4", "--max_steps", "3", "--batch_size", "4"])
    policy, _ = ex.build_standin(args, torch.device("cpu"))
    base_dir = tmp / "base"
    S.make_standin(0, num_images=2, lora_rank=0).backbone.save_pretrained(str(base_dir))
    res = train(cfg(steps=3, ckpt_every=3), policy=policy, data=data(), out=tmp / "run", **QUIET)
    assert res.complete
    ckpt = tmp / "run" / "oft" / "step_0000003"
    merged = peft.PeftModel.from_pretrained(S.StandinVLA.from_pretrained(str(base_dir)),
                                            str(ckpt / "lora_adapter")).merge_and_unload()
    merged.save_pretrained(str(ckpt))
    batch = data(seed=3).batch(0)[0]
    with torch.no_grad():
        hidden = policy.forward(batch)
    return dict(ex=ex, ckpt=ckpt, base=base_dir, policy=policy, batch=batch, hidden=hidden)


@pytest.mark.parametrize("how", ["merged+fresh", "base+adapter"])
def test_example_resume_reproduces_the_trained_model(trained, how):
    """The example's --resume (build_standin -> start_vla -> resume_vla): the resumed policy's
    hidden states equal the trained model's (the merge rounds in fp32: 1e-5), the head and
    projector are the trained ones, and theta is a LoRA that trains."""
    ex, ckpt = trained["ex"], trained["ckpt"]
    argv = ["--standin", "--lora_rank", "4", "--resume", "True", "--vla_path", str(ckpt)]
    if how == "base+adapter":
        argv += ["--resume_base_vla", str(trained["base"])]
    policy, _ = ex.build_standin(ex.parse(argv), torch.device("cpu"))
    with torch.no_grad():
        hidden = policy.forward(trained["batch"])
    tol = 1e-5 if how == "merged+fresh" else 1e-6
    assert_close(f"resume {how}: hidden states", trained["hidden"], hidden, F32, tol=tol)
    for a, b in zip(trained["policy"].action_head.state_dict().values(),
                    policy.action_head.state_dict().values()):
        assert torch.equal(a, b)
    names = [n for n, _ in policy.named_trainable() if n.startswith("backbone.")]
    assert names and all("lora_" in n for n in names)
    if how == "merged+fresh":  # a FRESH adapter: no effect yet (lora_B = 0)
        assert all(not v.any() for n, v in policy.backbone.named_parameters() if "lora_B" in n)


def test_the_adapter_on_the_merged_model_is_not_the_trained_model(trained):
    """What the example did before: the trained update applied twice - the check above would
    see it; resume_vla refuses the checkpoint directory as the base."""
    wrong = load_lora_adapter(S.StandinVLA.from_pretrained(str(trained["ckpt"])),
                              trained["ckpt"] / "lora_adapter")
    p = trained["policy"]
    policy = OFTPolicy(wrong, p.action_head, p.proprio_projector,
                       action_token_begin_idx=S.ACTION_TOKEN_BEGIN_IDX, pad_token_id=S.PAD_TOKEN_ID)
    with torch.no_grad():
        hidden = policy.forward(trained["batch"])
    with pytest.raises(AssertionError, match="relative error"):
        assert_close("adapter on merged", trained["hidden"], hidden, F32, tol=1e-3)
    with pytest.raises(ValueError, match="apply the trained update twice"):
        resume_vla(trained["ckpt"], S.StandinVLA.from_pretrained, base=trained["ckpt"])
    with pytest.raises(FileNotFoundError, match="holds no merged model"):
        resume_vla(trained["ckpt"] / "lora_adapter", S.StandinVLA.from_pretrained)


# --------------------------------------------------------------------------------------------
# adapters across peft versions
# --------------------------------------------------------------------------------------------
SAVED = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def base_vla():
    return S.make_standin(0, lora_rank=0, **SMALL).backbone


def hidden_of(vla, expected):
    ref = S.make_standin(0, lora_rank=0, **SMALL)
    policy = OFTPolicy(vla, ref.action_head, ref.proprio_projector,
                       action_token_begin_idx=S.ACTION_TOKEN_BEGIN_IDX, pad_token_id=S.PAD_TOKEN_ID)
    with torch.no_grad():
        return policy.forward(expected["batch"])


def test_fixtures_cover_both_stacks():
    assert {"peft-0.11.1", "peft-0.21.2"} <= set(SAVED), SAVED


@pytest.mark.parametrize("kind", ["package", "peft"])
@pytest.mark.parametrize("saved", SAVED)
def test_adapter_saved_under_either_peft_goes_on_the_base_model(saved, kind):
    """load_lora_adapter(base, dir): the LoRA layers the adapter's own config names (lm_head
    and the patch-embedding convs when peft 0.11.1 saved it), every tensor set, and the
    saving stack's hidden states (another transformers release: 1e-5)."""
    expected = torch.load(FIXTURES / saved / "expected.pt", weights_only=True)
    d = FIXTURES / saved / kind / "lora_adapter"
    vla = load_lora_adapter(base_vla(), d)
    convs = {m for m in lora_modules(vla) if "patch_embed" in m}
    assert bool(convs) == (saved == "peft-0.11.1")
    assert_close(f"{saved}/{kind}", expected["hidden"], hidden_of(vla, expected), F32, tol=1e-5)


@pytest.mark.parametrize("saved", SAVED)
def test_adapter_saved_under_either_peft_loads_into_apply_lora(saved, tmp_path):
    """load_oft_checkpoint(vla=apply_lora(base)): lm_head / conv entries on one side only are
    handled - absent from the file: no effect; present without effect (lm_head): skipped;
    present WITH effect (0.11.1's trained convs into a recent peft's LoRA): a clear error that
    points to load_lora_adapter."""
    expected = torch.load(FIXTURES / saved / "expected.pt", weights_only=True)
    vla = apply_lora(base_vla(), rank=4)
    mine = {m for m in lora_modules(vla) if "patch_embed" in m}
    theirs = saved == "peft-0.11.1"
    if theirs and not mine:
        with pytest.raises(ValueError, match=r"non-zero LoRA on 2 module\(s\) .*patch_embed\.proj"
                                             r".*load_lora_adapter"):
            load_oft_checkpoint(FIXTURES / saved / "package", vla=vla)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_oft_checkpoint(FIXTURES / saved / "package", vla=vla)
    notes = [str(w.message) for w in caught if "LoRA" in str(w.message)]
    assert bool(notes) == (bool(mine) != theirs)  # a note only where the sets differ
    assert_close(saved, expected["hidden"], hidden_of(vla, expected), F32, tol=1e-5)


def test_adapter_config_is_written_for_both_pefts(tmp_path):
    """The package writes adapter_config.json with only keys peft 0.11.1 knows (or settings
    that are on); reading one from a newer peft drops its off-switches and refuses a setting
    the installed peft lacks."""
    p = S.make_standin(0, lora_rank=4, **SMALL)
    d = save_oft_checkpoint(tmp_path / "c", 1, vla=p.backbone)
    written = json.loads((d / "lora_adapter" / "adapter_config.json").read_text())
    assert set(written) <= PEFT_0_11_LORA_KEYS and written["r"] == 4
    newer = {**written, "peft_version": "0.99.0", "lora_bias": False, "eva_config": None,
             "qalora_group_size": 16}
    assert portable_adapter_config(newer) == written
    with pytest.raises(ValueError, match="'use_qalora' = True is a LoRA setting the installed peft"):
        portable_adapter_config({**written, "use_qalora": True}, known=PEFT_0_11_LORA_KEYS,
                                where="adapter_config.json")
    # and it is what peft itself reads back
    vla = peft.PeftModel.from_pretrained(base_vla(), str(d / "lora_adapter"))
    assert lora_modules(vla) == lora_modules(p.backbone)


def test_lm_head_lora_never_trains():
    """Why skipping a file's lm_head LoRA is exact: where peft's all-linear wraps lm_head
    (0.11.1), the L1 loss never reaches it, so its lora_B stays zero."""
    p = S.make_standin(0, lora_rank=4, **SMALL)
    res = train(cfg(steps=2), policy=p, data=data(), out=None, **QUIET)
    assert res.complete
    lm = [v for n, v in p.backbone.named_parameters() if "lm_head" in n and "lora_B" in n]
    assert all(not v.any() for v in lm)


# --------------------------------------------------------------------------------------------
# OFT's batch-size-1 proprio and the head's dtype
# --------------------------------------------------------------------------------------------
def test_proprio_squeezed_at_batch_size_one_as_ofts_collator_gives_it(tmp_path):
    """OFT's collator squeezes proprio (1, P) to (P,) at B = 1; OFT's model reshapes it back:
    the policy accepts it and computes what (1, P) gives; the trainer runs on such batches."""
    p = S.make_standin(0, **SMALL)
    d = data(batch_size=1)
    b = d.batch(0)[0]
    assert tuple(b["proprio"].shape) == (S.PROPRIO_DIM,)  # the collator's np.squeeze
    p.check_batch(b)
    with torch.no_grad():
        squeezed = p.forward(b)
        full = p.forward({**b, "proprio": b["proprio"][None]})
    assert torch.equal(squeezed, full)
    res = train(cfg(batch_size=1, steps=2), policy=p, data=d, out=tmp_path / "run", **QUIET)
    assert res.complete


def test_fp32_vla_feeds_a_bf16_head_as_oft_does(tmp_path):
    """OFT casts the action rows to the head's dtype (bf16) before the head: an fp32 VLA with
    a bf16 head passes the start-up checks and trains; predict_action = head(rows.bf16())."""
    p = S.make_standin(0, lora_rank=4, **SMALL)
    p.action_head.to(torch.bfloat16)
    rows = torch.randn(2, p.num_action_tokens, p.hidden_size)
    with torch.no_grad():
        assert torch.equal(p.predict_action(rows), p.action_head.predict_action(rows.bfloat16()))
    res = train(cfg(steps=2), policy=p, data=data(), out=tmp_path / "run", **QUIET)
    assert res.complete


# --------------------------------------------------------------------------------------------
# the example's energy recipe
# --------------------------------------------------------------------------------------------
def test_example_uses_the_forks_energy_recipe():
    ex = example()
    args = ex.parse(["--standin", "--energy_warm_steps", "10", "--grad_accumulation_steps", "2"])
    c = ex.make_config(args, 1, torch.device("cpu"))
    assert c.energy.output == "sigmoid"           # the fork's bounded output, per step
    assert c.optim.energy_skip_steps == 5         # 10 micro-batches = 5 optimizer steps skipped
    assert c.energy.warmup_steps == 0             # the loss-weight ramp is its own flag
    args = ex.parse(["--standin", "--energy_loss_warmup_steps", "7"])
    c = ex.make_config(args, 1, torch.device("cpu"))
    assert c.energy.warmup_steps == 7 and c.optim.energy_skip_steps == 0


# --------------------------------------------------------------------------------------------
# the stand-in's attention under the installed transformers
# --------------------------------------------------------------------------------------------
def test_standin_attention_is_bidirectional_with_pad_keys_hidden():
    """OFT's attention (its transformers fork): every real row sees every real key, later
    ones included, and no pad key. transformers < 4.41 reads a 4-D mask as 1 / 0 and later
    releases as additive: given the other form, the stand-in attended to pad keys only."""
    p = S.make_standin(0, **SMALL)
    vla = p.backbone
    B, T, D = 2, 9, vla.llm_dim
    x = torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # sample 1: 3 pad rows at the end

    def last(emb):
        with torch.no_grad():
            return vla._language_model(emb, mask, None, True).hidden_states[-1]

    h = last(x)
    y = x.clone()
    y[1, 7] += 5.0           # a pad row of sample 1
    assert torch.equal(last(y)[1, :6], h[1, :6])     # pad keys hidden from real rows
    y = x.clone()
    y[0, 8] += 5.0           # the last real row of sample 0
    assert (last(y)[0, 0] - h[0, 0]).abs().max() > 1e-3  # row 0 sees a later key
