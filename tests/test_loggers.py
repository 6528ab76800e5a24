"""run.log: metrics also to TensorBoard or W&B, with the keys and steps of metrics.jsonl; a
missing package is a clear error; neither is needed otherwise."""
from __future__ import annotations

import sys
import types

import pytest

from energy_train.trainer import read_metrics, train
from trainer_helpers import tiny_cfg

QUIET = dict(echo=lambda *a: None)


def cfg(**kw):
    return tiny_cfg(**{"steps": 4, "log_every": 2, "probe_every": 2, **kw})


def scalars(r: dict) -> dict:
    return {k: float(v) for k, v in r.items() if k != "step"}


def test_tensorboard_events_hold_the_metrics_jsonl_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    res = train(cfg(log="tensorboard"), tmp_path / "run", **QUIET)
    recs = read_metrics(res.run_dir)
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    keys = {k for r in recs for k in r if k != "step"}
    assert set(acc.Tags()["scalars"]) == keys and "l1" in keys and "probe_l1" in keys
    for key in keys:
        want = [(r["step"], r[key]) for r in recs if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key  # fp32
    assert recs[0]["step"] == -1  # the probe before training, at step -1


def test_tensorboard_resume_purges_the_steps_it_recomputes(tmp_path):
    """A run that died after its step-2 checkpoint had logged steps 2 and 3: the resume from
    step 2 logs them again, and TensorBoard keeps each step once (purge_step)."""
    pytest.importorskip("tensorboard")
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    c = cfg(log="tensorboard", log_every=1, probe_every=0, ckpt_every=2)
    train(c, out, **QUIET)
    latest = out / "checkpoints" / "latest.json"  # as if it had died before the final save
    latest.write_text(json.dumps({"step": 2, "dir": "step_0000002"}))
    train(c, out, resume=True, **QUIET)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    recs = read_metrics(out)
    assert [e.step for e in acc.Scalars("l1")] == [r["step"] for r in recs] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("l1")] == pytest.approx([r["l1"] for r in recs], rel=1e-6)


class FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.logged, self.metrics, self.finished = kwargs, [], [], False

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, values):
        self.logged.append(dict(values))

    def finish(self):
        self.finished = True


def fake_wandb(runs: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    def init(**kwargs):
        runs.append(FakeRun(kwargs))
        return runs[-1]
    mod.init = init
    return mod


def test_wandb_gets_every_record_with_its_step_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    runs: list[FakeRun] = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(runs))
    out = tmp_path / "run"
    train(cfg(log="wandb", stop_after=2), out, **QUIET)
    train(cfg(log="wandb"), out, resume=True, **QUIET)
    first, second = runs
    assert first.finished and second.finished
    assert first.kwargs["id"] == second.kwargs["id"] == (out / "wandb_id.txt").read_text()
    assert first.kwargs["dir"] == str(out) and first.kwargs["resume"] == "allow"
    assert first.kwargs["config"]["run"]["log"] == "wandb"
    assert ("*", "step") in first.metrics
    recs = read_metrics(out)
    logged = first.logged + second.logged
    assert [r["step"] for r in logged] == [r["step"] for r in recs] == [-1, 0, 1, 2, 3]
    for got, want in zip(logged, recs):
        assert scalars(got) == scalars(want)


def test_wandb_offline_writes_its_run_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = train(cfg(log="wandb", steps=2), tmp_path / "run", **QUIET)
    rid = (res.run_dir / "wandb_id.txt").read_text()
    assert list((res.run_dir / "wandb").glob(f"offline-run-*-{rid}/run-{rid}.wandb"))


def test_a_missing_logger_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match=r"run.log = 'wandb': wandb is not installed "
                                           r"\(pip install 'energy-train\[wandb\]'\)"):
        train(cfg(log="wandb"), tmp_path / "run", **QUIET)
    with pytest.raises(ValueError, match=r"run.log: expected one of \('none', 'wandb', "
                                         r"'tensorboard'\), got 'mlflow'"):
        cfg(log="mlflow")
