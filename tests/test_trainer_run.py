"""Run directories: resume (bitwise), atomic checkpoints, bad input, NaN batches."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from energy_train.policies.tiny.task import TaskData
from energy_train.trainer import CheckpointError, RunError, is_complete, read_metrics, train
from energy_train.trainer import checkpoint as ck
from energy_train.trainer.checkpoint import load_checkpoint
from trainer_helpers import make_trainer, tiny_cfg

QUIET = dict(echo=lambda *a: None)


def _final_weights(run_dir):
    ckpt = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "latest.json").read_text())["dir"]
    return load_file(ckpt / "theta.safetensors"), load_file(ckpt / "phi.safetensors")


@pytest.mark.parametrize("strategy", ["two_phase", "cached_negatives", "adaptive_weights"])
def test_resume_is_bitwise(tmp_path, strategy):
    """N steps == stop after 4, --resume for the rest: theta, phi, every loss and the drift
    (the stop is between two probes: the drift reference travels in the checkpoint)."""
    cfg = tiny_cfg(strategy=strategy, steps=6, cache_refresh=2, adaptive_window=2, probe_every=3)
    assert train(cfg, tmp_path / "full", **QUIET).complete
    half = train(tiny_cfg(strategy=strategy, steps=6, stop_after=4, cache_refresh=2,
                          adaptive_window=2, probe_every=3), tmp_path / "half", **QUIET)
    assert not half.complete and not is_complete(tmp_path / "half")
    resumed = train(cfg, tmp_path / "half", resume=True, overrides={"stop_after": 0}, **QUIET)
    assert resumed.complete and is_complete(tmp_path / "half")
    for a, b in zip(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "half")):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "half")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert any(r.get("drift_context") is not None for r in ma if r["step"] > 4)
    for key in ("l1", "energy_loss", "rank_acc", "probe_l1", "drift_context", "drift_negatives"):
        assert [r.get(key) for r in ma] == [r.get(key) for r in mb], key


def test_checkpoint_contents_and_corruption(tmp_path):
    res = train(tiny_cfg(steps=2), tmp_path / "run", **QUIET)
    step, theta, phi, state, _, _ = load_checkpoint(res.run_dir)
    assert step == 2 and state["step"] == 2 and "opt_theta" in state and "rng" in state
    assert any(k.startswith("backbone.") for k in theta)
    assert any(k.startswith("action_head.") for k in theta)
    assert "cross.in_proj_weight" in phi
    assert not list((res.run_dir / "checkpoints").glob(".tmp*")), "temporary files left behind"
    ckpt = res.run_dir / "checkpoints" / "step_0000002" / "theta.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):  # the only checkpoint: no fallback
        train(tiny_cfg(steps=4), res.run_dir, resume=True, overrides={"steps": 4}, **QUIET)
    assert is_complete(res.run_dir)  # the finished run is still the finished run


def test_missing_run_and_a_run_that_died_before_its_first_checkpoint(tmp_path):
    with pytest.raises(RunError, match="no run"):
        train(tiny_cfg(), tmp_path / "nothing", resume=True, **QUIET)
    # config.json but no checkpoint (killed before the first one): --resume starts it over
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text(json.dumps(tiny_cfg(steps=2).to_dict()))
    said = []
    assert train(tiny_cfg(), tmp_path / "cfgonly", resume=True, echo=said.append).complete
    assert any("starting it over from step 0" in s for s in said)
    train(tiny_cfg(steps=2), tmp_path / "fresh", **QUIET)
    assert [r["l1"] for r in read_metrics(tmp_path / "cfgonly")] == \
        [r["l1"] for r in read_metrics(tmp_path / "fresh")]


def test_resume_cannot_change_the_recipe(tmp_path):
    train(tiny_cfg(steps=2), tmp_path / "run", **QUIET)
    with pytest.raises(RunError, match="cannot change"):
        train(tiny_cfg(), tmp_path / "run", resume=True, overrides={"lr": 0.5}, **QUIET)


def test_existing_run_dir_is_not_overwritten(tmp_path):
    train(tiny_cfg(steps=2), tmp_path / "run", **QUIET)
    with pytest.raises(RunError, match="already holds files"):
        train(tiny_cfg(steps=2), tmp_path / "run", **QUIET)


def _task(cfg, cls=TaskData):
    p = cfg.policy
    return cls(cfg.run.seed, p.dataset_size, p.probe_size, batch_size=cfg.run.batch_size,
               image_size=p.image_size)


def _nan_data(cfg, field="images", row=5):
    data = _task(cfg)
    data.train[field][row].view(-1)[3] = float("nan")
    return data


def test_nan_batch_host_check(tmp_path):
    cfg = tiny_cfg(steps=8)
    with pytest.raises(ValueError, match=r"images holds NaN/inf in dataset rows \[5\]"):
        train(cfg, tmp_path / "run", data=_nan_data(cfg), **QUIET)
    assert not is_complete(tmp_path / "run")
    assert "NaN" in (tmp_path / "run" / "error.txt").read_text()


def test_nan_batch_readback_check(tmp_path):
    """With the host check off, the non-finite loss is caught when metrics are read back."""
    cfg = tiny_cfg(steps=8, check_data=False)
    with pytest.raises(FloatingPointError, match="non-finite loss at step"):
        train(cfg, tmp_path / "run", data=_nan_data(cfg, "expert"), **QUIET)
    assert not is_complete(tmp_path / "run")
    assert (tmp_path / "run" / "error.txt").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda(tmp_path):
    """--resume on CUDA continues the run (the same weights within GPU rounding), and the
    resumed trainer steps with no host sync."""
    kw = dict(strategy="two_phase", steps=4, device="cuda", overlap=True)
    assert train(tiny_cfg(**kw), tmp_path / "full", **QUIET).complete
    assert not train(tiny_cfg(stop_after=2, **kw), tmp_path / "half", **QUIET).complete
    resumed = train(tiny_cfg(**kw), tmp_path / "half", resume=True, overrides={"stop_after": 0},
                    **QUIET)
    assert resumed.complete
    for a, b in zip(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "half")):
        for k in a:  # same maths; cuBLAS/atomics may differ in the last bits between runs
            err = (a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12)
            assert err < 1e-4, (k, float(err))
    # a resumed trainer steps without a host sync: on CUDA the AdamWs are capturable, their
    # "step" counters and learning rates live on the device (no .item() per step)
    t = make_trainer(tiny_cfg(**kw))
    ck.restore(t, tmp_path / "half")
    for opt in (t.optim.opt_theta, t.optim.opt_phi):
        assert all(s["step"].device.type == "cuda" for s in opt.state.values())
        assert all(g["capturable"] and g["lr"].device.type == "cuda" for g in opt.param_groups)
    t.train_step()  # warm-up (lazy allocations)
    torch.cuda.set_sync_debug_mode("error")
    try:
        t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.flush()


def test_restore_reads_the_state_on_the_cpu(tmp_path, monkeypatch):
    """restore() loads state.pt onto the CPU whatever the trainer's device: each consumer moves
    what it needs (AdamW its moments to the parameters, keeping its step counters on the CPU:
    CUDA ones would make every optimizer step read them back with .item(), a host sync)."""
    train(tiny_cfg(steps=2), tmp_path / "run", **QUIET)
    seen = []
    real = ck.load_checkpoint
    monkeypatch.setattr(ck, "load_checkpoint",
                        lambda run_dir, map_location="cpu": seen.append(map_location) or
                        real(run_dir, map_location))
    t = make_trainer(tiny_cfg(steps=2))
    t.device = torch.device("meta")  # what a CUDA trainer passed here before: its own device
    ck.restore(t, tmp_path / "run")
    assert seen == ["cpu"] and t.step == 2


class _CrashAt(TaskData):
    """A dataset whose batch of step ``crash`` raises (a crash in the middle of a run)."""
    crash = -1

    def batch(self, step, *a, **k):
        if step == self.crash:
            raise KeyboardInterrupt("simulated crash")
        return super().batch(step, *a, **k)


def test_metrics_survive_a_crash_after_an_unaligned_checkpoint(tmp_path):
    """ckpt_every not a multiple of log_every: the steps before the checkpoint must be in
    metrics.jsonl when a crash after it is resumed (they were lost: never flushed)."""
    kw = dict(steps=6, log_every=4, ckpt_every=3)
    cfg = tiny_cfg(**kw)
    train(cfg, tmp_path / "full", **QUIET)
    data = _task(cfg, _CrashAt)
    data.crash = 3  # the 4th step: after the checkpoint at step 3, before the flush at step 4
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "crashed", data=data, **QUIET)
    assert train(cfg, tmp_path / "crashed", resume=True, **QUIET).complete
    full, crashed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "crashed")
    assert [r["step"] for r in crashed] == [r["step"] for r in full] == list(range(6))
    assert [r["l1"] for r in crashed] == [r["l1"] for r in full]
