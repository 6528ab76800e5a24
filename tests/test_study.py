"""The stability study: losses that can learn (no ties by construction, ties counted, chance
from the candidate count, a margin that cannot collapse, the action residual), the trainer's
mechanism measurements (lag effect, context diversity, the training candidate set on the
probe) and ``compare`` (seeds, --init-from, presets, identity groups, the report)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from energy_train import EnergyModel, losses
from energy_train.cli import main
from energy_train.ops import energy_scores
from energy_train.study.analysis import find_spikes
from energy_train.study.compare import PRESETS, parse_seeds, parse_spec
from energy_train.trainer.checkpoint import load_checkpoint
from energy_train.trainer.diagnostics import row_diversity
from energy_train.trainer.rundir import read_metrics
from tests.public_models import ForkEnergy
from trainer_helpers import TINY, make_trainer, tiny_cfg

F64 = torch.float64


def _sets(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--set", f"{k}={v}")]


# ---- ranking accuracy, ties and chance ----------------------------------------------------------
def test_ranking_accuracy_counts_ties_as_ties():
    E = torch.tensor([[0.0, 0.0, 1.0],    # 2-way tie at the top: 1/2
                      [0.0, 1.0, 2.0],    # strictly lowest: 1
                      [1.0, 0.0, 0.0],    # another is lower: 0
                      [3.0, 3.0, 3.0]])   # every candidate the same: 1/3 = chance
    out = losses.EnergyLoss(torch.zeros(()), E, torch.zeros(4, dtype=torch.int64))
    assert losses.ranking_accuracy(out).item() == pytest.approx((0.5 + 1 + 0 + 1 / 3) / 4)
    assert losses.tie_rate(out).item() == pytest.approx(3 / 8)
    # within 1e-4 relative is a tie; 1e-3 is not
    near = losses.EnergyLoss(torch.zeros(()), torch.tensor([[10.0, 10.0005, 10.02]]),
                             torch.zeros(1, dtype=torch.int64))
    assert losses.ranking_accuracy(near).item() == pytest.approx(0.5)
    # the positive need not be column 0
    swap = losses.EnergyLoss(torch.zeros(()), torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                             torch.tensor([1, 0]))
    assert losses.ranking_accuracy(swap).item() == pytest.approx(0.5)


def _boosted_trainer(**kw):
    """A tiny explicit-loss trainer whose energy model is made sensitive (fc2 x 50), so its
    energies differ by O(1) between candidates that differ."""
    t = make_trainer(tiny_cfg(energy_loss="explicit", **kw))
    with torch.no_grad():
        t.energy.prediction_head.fc2.weight.mul_(50.0)
    return t


def _candidate_energies(t):
    mb = t.batch(0)[0]
    fwd = t.observe(mb, reuse=False)
    with torch.no_grad():
        return t.objective.evaluate(t.objective.context(fwd), mb, t.objective.negatives(fwd), t.step)


def test_default_explicit_negatives_never_tie():
    """The default candidate set has no negative that ties with the expert by construction;
    the amplitude negatives (x0.3, x1.7) do, under the action encoder's per-step LayerNorm."""
    out = _candidate_energies(_boosted_trainer())
    M = out.energies.shape[1] - 1
    assert M == 5  # first + middle layer, own prediction, noise, sign flip
    assert losses.tie_rate(out).item() == 0.0
    out = _candidate_energies(_boosted_trainer(**{"energy.amplitudes": "0.3,1.7"}))
    assert out.energies.shape[1] - 1 == 7
    assert losses.tie_rate(out).item() == pytest.approx(2 / 7)  # exactly the two amplitudes
    E = out.energies
    assert ((E[:, 5:7] - E[:, :1]).abs() <= losses.TIE_TOL * E[:, :1].abs().clamp_min(1)).all()


def test_chance_comes_from_the_candidate_count(tmp_path):
    from energy_train.trainer import train
    from energy_train.trainer.summary import chance_level
    cfg = tiny_cfg(**{"energy.layer_picks": "first", "energy.own_prediction": False,
                      "probe_every": 2, "steps": 2})
    assert chance_level(cfg) == pytest.approx(1 / 4)  # expert + layer + noise + flip
    res = train(cfg, tmp_path / "e", echo=lambda *_: None)
    assert res.summary["rank_acc_chance"] == pytest.approx(1 / 4)
    recs = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    # the probe ranks the TRAINING loss's candidate set, not the probe batch's experts
    assert all(r["probe_chance"] == pytest.approx(1 / 4) for r in recs if "probe_chance" in r)
    swap = tiny_cfg(energy_loss="swap", batch_size=4, probe_every=2, steps=2)
    assert chance_level(swap) == pytest.approx(1 / 4)
    res = train(swap, tmp_path / "s", echo=lambda *_: None)
    recs = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert res.summary["rank_acc_chance"] == pytest.approx(1 / 4)
    probe = [r["probe_chance"] for r in recs if "probe_chance" in r]
    assert probe and all(c == pytest.approx(1 / 6) for c in probe)  # swap: the probe batch (6)


def test_explicit_loss_without_theta_negatives_trains(tmp_path):
    """energy.layer_picks="" and own_prediction=false: only the expert's noise and sign flip
    are negatives (no layer actions are made) - a run, not an error about layer_picks."""
    from energy_train.trainer import train
    cfg = tiny_cfg(**{"energy.layer_picks": "", "energy.own_prediction": False,
                      "probe_every": 2, "steps": 2})
    res = train(cfg, tmp_path / "r", echo=lambda *_: None)
    assert res.complete and res.summary["rank_acc_chance"] == pytest.approx(1 / 3)


# ---- margin ---------------------------------------------------------------------------------------
def test_margin_cannot_lower_its_loss_by_shifting_every_energy():
    torch.manual_seed(0)
    E = torch.randn(6, 5, dtype=F64, requires_grad=True)
    dist = torch.rand(6, 4, dtype=F64)
    loss = losses.margin_from_energies(E, dist)
    for c in (-3.0, 0.5, 40.0):
        assert losses.margin_from_energies(E + c, dist).item() == pytest.approx(loss.item(), abs=1e-12)
    (g,) = torch.autograd.grad(loss, E)
    assert g.sum(dim=1).abs().max().item() < 1e-12  # no gradient along a common shift
    # gradient descent on free energies: each sample's mean energy stays put; with the fork's
    # detached positive every step raises all of them together (the collapse)
    for detach in (False, True):
        e = E.detach().clone().requires_grad_(True)
        for _ in range(100):
            (g,) = torch.autograd.grad(losses.margin_from_energies(e, dist, detach_positive=detach), e)
            e = (e - 0.5 * g).detach().requires_grad_(True)
        rise = (e.mean(dim=1) - E.mean(dim=1)).min().item()
        if detach:
            assert rise > 0.01, rise  # every sample: only the negatives move, upwards
        else:
            assert abs(rise) < 1e-9 and (e.mean(dim=1) - E.mean(dim=1)).abs().max().item() < 1e-9


def test_margin_gives_no_gradient_to_a_common_energy_offset():
    """The prediction head's output bias shifts every candidate's energy alike: the margin
    loss must leave it alone (it did not with the positive detached: the collapse)."""
    torch.manual_seed(1)
    model = EnergyModel(12, 5, hidden=16, heads=2).double()
    ctx, expert = torch.randn(3, 7, 12, dtype=F64), torch.randn(3, 4, 5, dtype=F64)
    negs = losses.structured_negatives(expert, sigma=0.5, generator=torch.Generator().manual_seed(0))
    for detach, zero in ((False, True), (True, False)):
        model.zero_grad()
        losses.margin_ranking(model, ctx, None, expert, negs, detach_positive=detach).loss.backward()
        g = model.prediction_head.fc2.bias.grad.abs().item()
        assert (g < 1e-12) == zero, (detach, g)


# ---- the action residual --------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True])
def test_action_residual_keeps_energy_candidate_dependent_under_uniform_attention(residual):
    torch.manual_seed(2)
    model = EnergyModel(12, 5, hidden=16, heads=2, action_residual=residual).double()
    ctx = torch.randn(3, 1, 12, dtype=F64).expand(3, 9, 12).contiguous()  # collapsed rows
    cand = torch.randn(3, 6, 4, 5, dtype=F64)
    E = energy_scores(model, ctx, None, cand)
    spread = (E - E[:, :1]).abs().max().item()
    if residual:
        assert spread > 1e-3  # the action reaches the energy through gate_a * encoded action
    else:
        assert spread < 1e-10  # uniform attention: the same output for every candidate
    # attention is not uniform on a real context: both variants depend on the candidate
    E2 = energy_scores(model, torch.randn(3, 9, 12, dtype=F64), None, cand)
    assert (E2 - E2[:, :1]).abs().max().item() > 1e-4


def test_action_residual_checkpoints_and_backends():
    sd = ForkEnergy(12, 5, 16, 2).state_dict()  # the fork's final layout: no gate_a
    EnergyModel(12, 5, hidden=16, heads=2).load_state_dict(sd, strict=True)
    gated = {**sd, "gate_a": torch.tensor(0.3)}  # a 7-9 Sep 2025 version's layout
    model = EnergyModel(12, 5, hidden=16, heads=2, action_residual=True)
    model.load_state_dict(gated, strict=True)
    assert "gate_a" in dict(model.named_parameters()) and model.gate_a.item() == pytest.approx(0.3)
    model = EnergyModel(12, 5, hidden=16, heads=2, action_residual=True)
    ctx, cand = torch.randn(2, 5, 12), torch.randn(2, 3, 4, 5)
    E = energy_scores(model, ctx, None, cand)  # auto: the eager path
    E.sum().backward()
    assert model.gate_a.grad is not None and model.gate_a.grad.abs().item() > 0
    with pytest.raises(NotImplementedError, match="action_residual"):
        energy_scores(model, ctx, None, cand, backend="triton")


def test_config_and_model_must_agree_on_action_residual():
    from energy_train.trainer import build_trainer
    cfg = tiny_cfg(**{"energy.action_residual": True})
    t = make_trainer(cfg)
    assert t.energy.action_residual
    with pytest.raises(ValueError, match="energy.action_residual"):
        build_trainer(cfg, torch.device("cpu"), policy=t.policy, data=t.feed.data,
                      energy=EnergyModel(32, 7, hidden=32, heads=2))


# ---- mechanism measurements in the trainer --------------------------------------------------------
def test_row_diversity_detects_collapse():
    x = torch.randn(2, 6, 8)
    assert row_diversity(x[:, :1].expand(2, 6, 8), None).item() < 1e-6
    assert row_diversity(x, None).item() > 0.5
    pad = torch.zeros(2, 6, dtype=torch.bool)
    y = x[:, :1].expand(2, 6, 8).clone()
    y[:, 5] = 100.0  # a differing row that the mask hides
    pad[:, 5] = True
    assert row_diversity(y, pad).item() < 1e-6 < row_diversity(y, None).item()


@pytest.mark.parametrize("loss", ["explicit", "swap"])
def test_lag_effect_is_measured_and_does_not_disturb_training(loss):
    kw = dict(energy_loss=loss, steps=6, probe_every=0)
    a, b = make_trainer(tiny_cfg(**kw)), make_trainer(tiny_cfg(lag_every=2, **kw))
    got_a = [a.train_step() for _ in range(6)]
    got_b = [b.train_step() for _ in range(6)]
    for ma, mb in zip(got_a, got_b):
        assert torch.equal(ma["l1"], mb["l1"]) and torch.equal(ma["energy_loss"], mb["energy_loss"])
    lagged = [i for i, m in enumerate(got_b) if "lag_theta" in m]
    assert lagged == [0, 2, 4]
    for i in lagged:
        lt, lb = got_b[i]["lag_theta"].item(), got_b[i]["lag_batch"].item()
        assert lt > 0 and lb > 0 and lt == lt and lb == lb
    # theta frozen: switching theta_k -> theta_k+1 changes nothing, the next batch still does
    frozen = make_trainer(tiny_cfg(lag_every=2, lr=0.0, **kw))
    got = [frozen.train_step() for _ in range(3)]
    assert got[0]["lag_theta"].item() == 0.0 and got[0]["lag_batch"].item() > 0


def test_lag_effect_equals_a_manual_recomputation():
    """lag_theta = |L(phi_1, theta_1, b_0) - L(phi_1, theta_0, b_0)|, by hand with copies."""
    import copy
    t = make_trainer(tiny_cfg(lag_every=5, steps=3, probe_every=0))
    ref = copy.deepcopy(t.policy)  # theta_0
    m = t.train_step()
    mb = t.batch(0)[0]
    with torch.no_grad():
        ctx1, negs1 = t.diagnostics.lag_inputs(t, mb)
        l_new = t.objective.evaluate(ctx1, mb, negs1, t.step).loss
        live = t.policy  # theta_0's forward and head: where the trainer and its objective hold it
        t.policy = t.objective.policy = ref
        try:
            ctx0, negs0 = t.diagnostics.lag_inputs(t, mb)
        finally:
            t.policy = t.objective.policy = live
        l_old = t.objective.evaluate(ctx0, mb, negs0, t.step).loss
    assert m["lag_theta"].item() == pytest.approx((l_new - l_old).abs().item(), rel=1e-6, abs=1e-9)


def test_whole_hidden_state_context_and_bf16_weights():
    t = make_trainer(tiny_cfg(**{"energy.context": "all", "energy.precision": "bf16_weights"}))
    assert all(p.dtype == torch.bfloat16 for p in t.energy.parameters())
    mb = t.batch(0)[0]
    fwd = t.observe(mb, reuse=False)
    with torch.no_grad():
        T = t.policy.forward(mb.batch).shape[1]  # every row of the last hidden state
    assert T > mb.layout.context_index.shape[1]
    assert t.objective.context(fwd).shape[:2] == (mb.size, T) and t.objective.pad_mask(mb) is None
    for _ in range(3):
        m = t.train_step()
    assert torch.isfinite(m["energy_loss"]) and torch.isfinite(m["l1"])


# ---- compare: seeds, init, presets, identity, report ----------------------------------------------
def test_parse_seeds_and_specs():
    assert parse_seeds("0,1,2", 0) == [0, 1, 2]
    assert parse_seeds("3", 5) == [5, 6, 7]
    assert parse_seeds(None, 4) == [4]
    for bad in ("a", "1,1", "0", "-1,2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad, 0)
    assert parse_spec("joint:energy.layer_picks=first,last,lr=0") == (
        "joint", {"energy.layer_picks": "first,last", "lr": "0"})
    with pytest.raises(ValueError, match="expected key=value"):
        parse_spec("joint:oops")


def test_find_spikes_reports_the_largest_excess():
    v = [1.0] * 30 + [5.0] + [1.0] * 5
    idx, z = find_spikes(np.asarray(v), k=4.0)
    assert idx == [30] and z > 4
    # after a flat (stalled) stretch a move of 1% is no spike; sigma is at least 1% of the EMA
    assert find_spikes(np.asarray([1.0] * 30 + [1.01]), k=4.0)[0] == []
    assert find_spikes(np.asarray([1.0] * 30 + [1.05]), k=4.0)[0] == [30]
    idx, z = find_spikes(np.asarray([1.0] * 25 + [float("nan")]), k=4.0)
    assert idx == [25]


STUDY_SETS = _sets({**TINY, "steps": 6, "energy_loss": "explicit", "log_every": 3})


def test_compare_seeds_identity_and_report(tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--seeds", "0,1", "--pretrain-steps", "3", "--jobs", "1", "--out", str(out),
               "--strategies", "joint;shared_forward;two_phase;two_phase:lr=0", *STUDY_SETS])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert {(r["spec"], r["seed"]) for r in rep["runs"]} == {
        (s, k) for s in ("joint", "shared_forward", "two_phase", "two_phase:lr=0") for k in (0, 1)}
    ident = rep["study"]["identity"]
    assert ["joint", "shared_forward"] in ident["all"]  # the same run, provably and bitwise
    assert any({"joint", "shared_forward", "two_phase"} <= set(g) for g in ident["l1"])
    assert not any("two_phase:lr=0" in g for g in ident["l1"])
    per = rep["study"]["per_spec"]
    assert per["two_phase:lr=0"]["frozen"] and rep["study"]["floor"]["spec"] == "two_phase:lr=0"
    assert per["joint"]["energy_spikes"]["n"] == 2
    assert per["two_phase:lr=0"]["lag_theta"]["max"] == 0.0
    assert per["two_phase"]["lag_batch"]["min"] > 0
    assert rep["meta"]["init"]["run_dir"].endswith("pretrain") and rep["meta"]["init"]["step"] == 3
    md = (out / "report.md").read_text()
    for needle in ("## Conclusion", "Noise floor", "`joint` = `shared_forward`",
                   "## The mechanism, measured", "| `two_phase:lr=0` |"):
        assert needle in md, needle
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "seed1" / "twophase-lr0" / "complete.json").is_file()
    # the report again from the same runs (another threshold), no training
    (out / "report.md").unlink()
    assert main(["compare", "--report-only", "--out", str(out), "--k", "3"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["meta"]["k"] == 3 and "loss > EMA + 3 sigma" in (out / "report.md").read_text()
    assert [r["l1_last"] for r in again["runs"]] == [r["l1_last"] for r in rep["runs"]]
    assert main(["compare", "--report-only", "--out", str(out / "seed0")]) == 2


def test_compare_jobs_do_not_change_the_numbers(tmp_path):
    """Two runs at once, each in its own process, give the numbers of one at a time."""
    args = ["compare", "--seeds", "1", "--pretrain-steps", "0", "--strategies", "joint;two_phase",
            *STUDY_SETS]
    assert main([*args, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0

    def numbers(out):
        runs = json.loads((out / "report.json").read_text())["runs"]
        return {(r["spec"], r["seed"]): [{k: v for k, v in rec.items() if not k.startswith("time_")}
                                         for rec in read_metrics(out / r["dir"])] for r in runs}
    one, two = numbers(tmp_path / "one"), numbers(tmp_path / "two")
    assert one == two and len(one) == 2 and all(len(v) == 6 for v in one.values())


def test_compare_init_from_loads_theta_and_phi(tmp_path):
    src = tmp_path / "src"
    assert main(["train", "--out", str(src), "--no-progress", *_sets({**TINY, "steps": 3})]) == 0
    trained = load_checkpoint(src)
    out = tmp_path / "cmp"
    rc = main(["compare", "--seeds", "1", "--init-from", str(src), "--init-phi", "--jobs", "1", "--out", str(out),
               "--strategies", "two_phase:lr=0,energy_lr=0", *_sets({**TINY, "steps": 2})])
    assert rc == 0
    got = load_checkpoint(out / "seed0" / "twophase-lr0-energylr0")
    for k, v in trained.theta.items():  # frozen: the run ends where it started
        assert torch.equal(got.theta[k], v), k
    for k, v in trained.phi.items():
        assert torch.equal(got.phi[k], v), k
    assert not (out / "pretrain").exists()


def test_compare_bad_input_is_a_clear_error(tmp_path, capsys):
    base = ["compare", "--seeds", "1", "--jobs", "1", "--strategies", "two_phase", *_sets({**TINY, "steps": 2})]
    assert main([*base, "--init-from", str(tmp_path / "none"), "--out", str(tmp_path / "a")]) == 2
    assert "--init-from" in capsys.readouterr().err
    src = tmp_path / "src"
    assert main(["train", "--out", str(src), "--no-progress", *_sets({**TINY, "steps": 1})]) == 0
    assert main([*base, "--init-from", str(src), "--set", "d_model=16", "--set", "n_heads=2",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"--init-from '{src}'" in err and "expected shape" in err
    assert main([*base, "--init-from", str(src), "--set", "n_layers=3",
                 "--out", str(tmp_path / "b2")]) == 2  # other parameter names
    err = capsys.readouterr().err
    assert f"--init-from '{src}'" in err and "does not match" in err and "--resume" not in err
    assert main([*base, "--seeds", "x", "--out", str(tmp_path / "c")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main([*base, "--init-phi", "--pretrain-steps", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--init-phi" in capsys.readouterr().err


def test_fork_preset_runs_and_diverged_runs_are_recorded(tmp_path, monkeypatch):
    """The fork preset's settings reach the runs; a run that hits a non-finite loss is recorded
    as diverged and the study goes on."""
    from energy_train.study import compare as cmp
    cfgs = []
    real = cmp.train

    def spy(cfg, run_dir, **kw):
        cfgs.append(cfg)
        if cfg.energy.output == "unbounded":
            raise FloatingPointError("non-finite loss at step(s) [1]")
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(cmp, "train", spy)
    out = tmp_path / "fork"
    rc = main(["compare", "--preset", "fork", "--seeds", "1", "--pretrain-steps", "0", "--jobs", "1", "--out", str(out),
               "--strategies", "joint;joint:energy.output=unbounded", *_sets({**TINY, "steps": 3})])
    assert rc == 0
    fork = cfgs[0]
    set_here = {"energy.loss", "optim.warmup_steps"}  # TINY's --set values win over the preset
    for key, want in PRESETS["fork"]["base"].items():
        sec, name = key.split(".")
        if key not in set_here:
            assert getattr(getattr(fork, sec), name) == want, key
    assert fork.energy.loss == "explicit" and fork.optim.warmup_steps == 1
    rep = json.loads((out / "report.json").read_text())
    assert rep["study"]["per_spec"]["joint:energy.output=unbounded"]["diverged"] == 1
    assert "Diverged (non-finite loss)" in (out / "report.md").read_text()
