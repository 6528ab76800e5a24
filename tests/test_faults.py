"""Bad values and faults, table-driven: every config value checked at start-up with an error
naming the key; nothing lost when a run or a save is interrupted (a crash injected at every
point of a save, a torn metrics line, an edited meta.json, a corrupt checkpoint, a second
process, a full disk, a run killed before its first checkpoint)."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from energy_train import files
from energy_train.cli import main
from energy_train.config import default_config
from energy_train.trainer import CheckpointError, RunError, is_complete, read_metrics, train
from energy_train.trainer import checkpoint as ck
from energy_train.trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer_helpers import TINY, tiny_cfg

QUIET = dict(echo=lambda *a: None)

# ---- 1. configuration values: (values, expected error) -------------------------------------
CONFIG = [
    ({"tau": -1}, "energy.tau: expected a number > 0.0, got -1"),
    ({"tau": 0}, "energy.tau: expected a number > 0.0, got 0"),
    ({"min_lr_ratio": -3}, "optim.min_lr_ratio: expected a number >= 0.0 and <= 1.0, got -3"),
    ({"ckpt_every": -1}, "run.ckpt_every: expected an integer >= 0, got -1"),
    ({"probe_every": -2}, "run.probe_every: expected an integer >= 0, got -2"),
    ({"warmup_steps": -5}, "optim.warmup_steps: expected an integer >= 0, got -5"),
    ({"lr": -0.1}, "optim.lr: expected a number >= 0.0, got -0.1"),
    ({"optim.energy_lr": "nan"}, "optim.energy_lr: expected a number >= 0.0, got"),
    ({"energy_grad_clip": -1}, "optim.energy_grad_clip: expected a number >= 0.0, got -1"),
    ({"n_heads": 0}, "policy.n_heads: expected an integer >= 1, got 0"),
    ({"d_model": 30, "n_heads": 4}, "policy.d_model: expected a multiple of policy.n_heads=4, got 30"),
    ({"image_size": 10}, "policy.image_size: expected a multiple of policy.patch_size=4, got 10"),
    ({"dataset_size": -5}, "policy.dataset_size: expected an integer >= 1, got -5"),
    ({"dataset_size": 8}, "policy.dataset_size: expected >= run.batch_size * run.grad_accum = 16, got 8"),
    ({"probe_size": 0}, "policy.probe_size: expected an integer >= 1, got 0"),
    ({"action_dim": 5}, "policy.action_dim: expected 7 (the task's action dimensions), got 5"),
    ({"chunk": 0}, "policy.chunk: expected an integer >= 1, got 0"),
    ({"energy_hidden": 30, "energy_heads": 4}, "energy.hidden: expected a multiple of energy.heads=4, got 30"),
    ({"steps": "abc"}, "run.steps: expected an integer >= 1, got 'abc'"),
    ({"steps": 2.5}, "run.steps: expected an integer >= 1, got 2.5"),
    ({"steps": 4, "stop_after": 9}, "run.stop_after: expected 0..run.steps=4, got 9"),
    ({"batch_size": 0}, "run.batch_size: expected an integer >= 1, got 0"),
    # the swap loss at B = 1: a loss of exactly 0 and accuracy 1.0 (chance) every step
    ({"batch_size": 1, "energy_loss": "swap"}, "run.batch_size: the swap loss (energy.loss='swap') "
     "scores each sample against the batch's other chunks; expected >= 2, got 1"),
    ({"energy_loss": "explicit", "layer_picks": "", "own_prediction": False, "noise_sigma": 0,
      "sign_flip": False}, "energy.loss='explicit': every kind of negative is off"),
    ({"seed": -1}, "run.seed: expected an integer >= 0, got -1"),
    ({"device": "gpu"}, "run.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"precision": "fp16"}, "run.precision: expected one of ('fp32', 'bf16'), got 'fp16'"),
    ({"progress": "maybe"}, "run.progress: expected a boolean, got 'maybe'"),
    ({"threads": -1}, "run.threads: expected an integer >= 0, got -1"),
    ({"log_every": 0}, "run.log_every: expected an integer >= 1, got 0"),
    ({"strategy": "jiont"}, "run.strategy: expected one of"),
    ({"energy_loss": "swapp"}, "did you mean 'swap'"),
    ({"phase2_every": 0}, "strategy.phase2_every: expected an integer >= 1, got 0"),
    ({"adaptive_window": 1}, "strategy.adaptive_window: expected an integer >= 2, got 1"),
    ({"dist_timeout": 0}, "dist.timeout: expected a number > 0.0, got 0"),
    ({"stepz": 1}, "unknown config key 'stepz'; did you mean 'steps'?"),
    ({"optim.lrr": 1}, "unknown config key 'optim.lrr'"),
    # cached_negatives caches the negatives made from theta: a loss that uses none has nothing
    ({"strategy": "cached_negatives", "energy_loss": "swap"},
     "run.strategy: cached_negatives caches the negatives made from the policy's weights"),
    ({"strategy": "cached_negatives", "energy.layer_picks": "", "energy.own_prediction": False},
     "run.strategy: cached_negatives caches the negatives made from the policy's weights"),
]


@pytest.mark.parametrize("values,error", CONFIG, ids=[next(iter(v)) for v, _ in CONFIG])
def test_config_value_is_checked(values, error):
    with pytest.raises(ValueError) as e:
        default_config(**values)
    assert error in str(e.value)


def test_swap_loss_needs_two_chunks_per_rank_without_global_negatives():
    from energy_train import distributed
    lone = default_config(batch_size=2, **{"dist.global_negatives": False})
    with pytest.raises(ValueError, match=r"expected >= 2 per rank, got 2 over 2 ranks"):
        distributed.check_config(lone, 2)
    distributed.check_config(default_config(batch_size=2), 2)  # global negatives: a pool of 2


# ---- the same through the CLI: an error, exit code 2, and no run directory -------------------
CLI = [
    (["--set", "steps=abc", "--steps", "2"], "run.steps: expected an integer >= 1, got 'abc'"),
    (["--set", "tau=-1"], "energy.tau: expected a number > 0.0, got -1"),
    (["--set", "lr=-0.1"], "optim.lr: expected a number >= 0.0, got -0.1"),
    (["--set", "n_heads=0"], "policy.n_heads: expected an integer >= 1, got 0"),
    (["--policy", "tiny", "--set", "policy.lora=1"], "unknown config key 'policy.lora'"),
    (["--batch-size", "1"], "run.batch_size: the swap loss (energy.loss='swap')"),
]


@pytest.mark.parametrize("args,error", CLI, ids=[a[1] for a, _ in CLI])
def test_cli_checks_every_value_before_a_run_directory_exists(tmp_path, capsys, args, error):
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out)]) == 2
    assert error in capsys.readouterr().err
    assert not out.exists()


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "--out", str(f)]) == 2
    assert "expected a directory, got an existing file" in capsys.readouterr().err
    assert main(["train", "--out", str(f / "sub")]) == 2
    assert "cannot write the run directory" in capsys.readouterr().err


def test_compare_checks_every_spec_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "cmp"
    sets = [x for k, v in {**TINY, "steps": 2}.items() for x in ("--set", f"{k}={v}")]
    assert main(["compare", "--out", str(out), "--seeds", "1", "--strategies",
                 "two_phase;joint:tau=-1", *sets]) == 2
    assert "energy.tau: expected a number > 0.0, got -1" in capsys.readouterr().err
    assert not (out / "pretrain").exists() and not (out / "seed0").exists()


# ---- 4. checkpoints and runs: nothing lost ---------------------------------------------------
class Crash(BaseException):
    """A kill: not an Exception, so no handler in the code under test catches it."""


def crash_at(monkeypatch, k: int) -> list:
    """Make the k-th filesystem action of a save (a file written, an fsync of a directory, a
    rename, a removal, latest.json written - energy_train.files and the os/shutil calls of
    the checkpoint module) crash; returns the call log."""
    calls = []

    def wrap(name, fn):
        def inner(*a, **kw):
            calls.append(name)
            if len(calls) == k:
                raise Crash(f"crash at {name} (#{k})")
            return fn(*a, **kw)
        return inner

    monkeypatch.setattr(files, "write_synced", wrap("write", files.write_synced))
    monkeypatch.setattr(files, "fsync_dir", wrap("fsync_dir", files.fsync_dir))
    monkeypatch.setattr(files, "atomic_write_text", wrap("latest", files.atomic_write_text))
    monkeypatch.setattr(ck.os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(ck.shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    return calls


def _state(v: float):
    return {"w": torch.full((3,), v)}, {"e": torch.full((2,), -v)}, {"step": None}


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "re-save"])
def test_a_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, resave):
    """For every action k of a save (fresh step or a re-save of the same step): crash there;
    the previous or the new checkpoint loads (never a mix, never nothing), and the next save
    completes and leaves no temporary directory."""
    k, seen_new = 1, False
    while True:
        run = tmp_path / f"k{k}"
        th, ph, st = _state(1.0)
        save_checkpoint(run, 2, th, ph, {**st, "step": 2})
        new_step = 2 if resave else 3
        th2, ph2, _ = _state(2.0)
        with monkeypatch.context() as m:
            calls = crash_at(m, k)
            try:
                save_checkpoint(run, new_step, th2, ph2, {"step": new_step})
                crashed = False
            except Crash:
                crashed = True
        got = load_checkpoint(run)
        value = float(got.theta["w"][0])
        assert (got.step, value) in ((2, 1.0), (new_step, 2.0)), (k, calls)
        assert float(got.phi["e"][0]) == -value, k
        seen_new |= value == 2.0
        save_checkpoint(run, 5, th2, ph2, {"step": 5})
        assert load_checkpoint(run).step == 5 and not list((run / "checkpoints").glob(".tmp*"))
        if not crashed:
            break
        k += 1
    assert k > 5 and seen_new  # every point was hit, and the new one loads once it is written


@pytest.mark.parametrize("where", ["rename", "latest"])
def test_resume_after_a_crash_inside_a_periodic_save_is_exact(tmp_path, monkeypatch, where):
    """A run killed inside its checkpoint of step 4 (at the rename into place, or while
    latest.json is written), resumed, equals the uninterrupted run: metrics, drift, weights."""
    cfg = tiny_cfg(steps=6, ckpt_every=2, probe_every=2, log_every=1)
    train(cfg, tmp_path / "full", **QUIET)
    run = tmp_path / where
    with monkeypatch.context() as m:
        if where == "rename":
            real_replace = os.replace

            def replace(src, dst):
                if "step_0000004" in str(src):
                    raise Crash("killed at the rename")
                return real_replace(src, dst)
            m.setattr(ck.os, "replace", replace)
        else:
            real = files.atomic_write_text

            def write(path, text):
                if str(path).endswith("latest.json") and "step_0000004" in text:
                    raise Crash("killed while writing latest.json")
                return real(path, text)
            m.setattr(files, "atomic_write_text", write)
        with pytest.raises(Crash):
            train(cfg, run, **QUIET)
    assert not is_complete(run)
    assert train(cfg, run, resume=True, **QUIET).complete
    a, b = read_metrics(tmp_path / "full"), read_metrics(run)
    for key in ("step", "l1", "energy_loss", "drift_context", "probe_l1"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    wa, wb = load_checkpoint(tmp_path / "full"), load_checkpoint(run)
    assert all(torch.equal(wa.theta[k], wb.theta[k]) for k in wa.theta)


def test_corrupt_latest_falls_back_to_the_previous_checkpoint_and_keeps_metrics(tmp_path):
    cfg = tiny_cfg(steps=6, ckpt_every=2, stop_after=4, log_every=1)
    train(cfg, tmp_path / "run", **QUIET)
    run = tmp_path / "run"
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["dir"]
    blob = run / "checkpoints" / latest / "phi.safetensors"
    blob.write_bytes(blob.read_bytes()[:-9] + b"corrupted")
    said = []
    res = train(tiny_cfg(), run, resume=True, overrides={"stop_after": 0}, echo=said.append)
    assert res.complete
    assert any("skipped a newer checkpoint" in s and "corrupt" in s for s in said), said
    assert any("resumed" in s and "at step 2" in s for s in said), said
    moved = [json.loads(line)["step"] for line in (run / "metrics.discarded.jsonl").read_text().splitlines()]
    assert moved == [2, 3]  # rows after the checkpoint used: moved, not deleted
    full = tmp_path / "full"
    train(tiny_cfg(steps=6, ckpt_every=2, log_every=1), full, **QUIET)
    assert [r["l1"] for r in read_metrics(run)] == [r["l1"] for r in read_metrics(full)]


def test_an_edited_meta_json_cannot_delete_metrics(tmp_path):
    """meta.json is not checksummed: the step comes from the checksummed state; a meta that
    disagrees marks that checkpoint corrupt."""
    run = tmp_path / "run"
    train(tiny_cfg(steps=4, ckpt_every=2, stop_after=4, log_every=1), run, **QUIET)
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["dir"]
    meta = run / "checkpoints" / latest / "meta.json"
    m = json.loads(meta.read_text())
    m["step"] = 0
    meta.write_text(json.dumps(m))
    loaded = load_checkpoint(run)
    assert loaded.step == 2 and "meta.json says step 0" in loaded.skipped[0]


def test_a_torn_metrics_line_does_not_block_a_resume(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(steps=4, stop_after=2, log_every=1), run, **QUIET)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "l1": 0.4')  # a crash mid-write
    assert len(read_metrics(run)) == 2
    assert train(tiny_cfg(steps=4, log_every=1), run, resume=True, **QUIET).complete
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]
    assert '{"step": 2, "l1": 0.4' in (run / "metrics.discarded.jsonl").read_text()


def test_one_process_per_run_directory(tmp_path):
    from energy_train.trainer.rundir import RunLock
    run = tmp_path / "run"
    train(tiny_cfg(steps=4, stop_after=2), run, **QUIET)
    lock = RunLock(run)
    try:
        with pytest.raises(RunError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            train(tiny_cfg(steps=4), run, resume=True, **QUIET)
    finally:
        lock.close()
    assert train(tiny_cfg(steps=4), run, resume=True, **QUIET).complete


def test_disk_full_is_a_clear_error_and_leaves_nothing_in_the_way(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = files.write_synced

    def full(path, data):
        if "state.pt" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(files, "write_synced", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*state.pt \(No space left on device\)"):
        train(tiny_cfg(steps=2), run, **QUIET)
    assert "No space left" in (run / "error.txt").read_text()
    assert not list((run / "checkpoints").glob(".tmp*"))
    monkeypatch.setattr(files, "write_synced", real)
    assert train(tiny_cfg(steps=2), run, resume=True, **QUIET).complete  # the way out


def test_a_failed_resume_keeps_the_original_error(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(steps=4, stop_after=2), run, **QUIET)
    (run / "error.txt").write_text("FloatingPointError: the original cause\n")
    for d in (run / "checkpoints").glob("step_*"):
        (d / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train(tiny_cfg(steps=4), run, resume=True, **QUIET)
    text = (run / "error.txt").read_text()
    assert "the original cause" in text and "--resume at" in text and "no intact checkpoint" in text


def test_wall_time_counts_every_part_of_a_resumed_run(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(steps=4, stop_after=2), run, **QUIET)
    first = load_checkpoint(run).state["wall_seconds"]
    res = train(tiny_cfg(steps=4), run, resume=True, **QUIET)
    assert first > 0 and res.summary["wall_seconds"] > first
