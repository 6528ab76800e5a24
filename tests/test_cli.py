"""The command line: a short end-to-end run, compare smoke test, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from energy_train.cli import main
from trainer_helpers import TINY

LEARN = dict(d_model=32, n_layers=2, n_heads=2, head_hidden=64, energy_hidden=32, energy_heads=2,
             dataset_size=256, probe_size=16, lr=3e-3, energy_lr=3e-3, warmup_steps=5,
             log_every=10, probe_every=40)


def _sets(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("seed", [0, 1])
def test_train_end_to_end_learns(tmp_path, seed):
    """L1 falls and the energy ranking accuracy rises well above chance; outputs parse."""
    out = tmp_path / "run"
    rc = main(["train", "--steps", "120", "--batch-size", "16", "--seed", str(seed), "--out",
               str(out), "--no-progress", *_sets(LEARN)])
    assert rc == 0
    for name in ("config.json", "metrics.jsonl", "summary.md", "summary.json", "complete.json",
                 "curves.png", "checkpoints/latest.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())["run"]
    assert cfg["seed"] == seed and cfg["strategy"] == "two_phase" and cfg["steps"] == 120
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["step"] >= 0] == list(range(120))
    s = json.loads((out / "summary.json").read_text())
    assert s["l1_last"] < 0.85 * s["l1_first"], s
    assert s["energy_last"] < s["energy_first"], s
    assert s["rank_acc_last"] >= 2 * s["rank_acc_chance"], s
    assert s["rank_acc_last"] > s["rank_acc_first"], s
    assert s["energy_grad_theta_max"] == 0.0
    assert "| L1 (train" in (out / "summary.md").read_text()


def test_compare_smoke(tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--steps", "4", "--seeds", "1", "--pretrain-steps", "0", "--jobs", "1", "--out", str(out),
               "--strategies", "joint;joint:detach_context=false;two_phase",
               *_sets(TINY | {"steps": 4, "probe_every": 1})])
    assert rc == 0
    rows = {r["spec"]: r for r in json.loads((out / "report.json").read_text())["runs"]}
    assert rows["joint"]["energy_grad_theta_max"] == 0.0
    assert rows["two_phase"]["energy_grad_theta_max"] == 0.0
    assert rows["joint:detach_context=false"]["energy_grad_theta_max"] > 0.0
    assert rows["two_phase"]["drift_context"] > 0.0
    report = (out / "report.md").read_text()
    assert "| `joint:detach_context=false` |" in report
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_strategy_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--strategy", "two_phse", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "strategy" in err and "did you mean 'two_phase'" in err
    assert not out.exists()


def test_misspelled_config_key(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('strategy = "joint"\nbatch_sise = 4\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(toml), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'batch_sise'" in err and "did you mean 'batch_size'" in err
    toml.write_text('[optim]\nlr = 0.1\nlrr = 2\n')
    assert main(["train", "--config", str(toml), "--out", str(out)]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "--set", "lerning_rate=1", "--out", str(out)]) == 2
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.toml"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_values(tmp_path, capsys):
    assert main(["train", "--set", "energy_loss=swapp", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'swap'" in capsys.readouterr().err
    assert main(["train", "--set", "progress=maybe", "--out", str(tmp_path / "r")]) == 2
    assert "expected a boolean" in capsys.readouterr().err


def test_resume_without_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_stop_and_resume_via_cli(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--steps", "4", "--out", str(out), "--no-progress", *_sets(TINY)]
    assert main([*args, "--stop-after", "2"]) == 0
    assert not (out / "complete.json").exists()
    assert main(["train", "--resume", "--out", str(out), "--stop-after", "0"]) == 0
    assert (out / "complete.json").is_file()


def test_python_dash_m_is_the_same_cli():
    r = subprocess.run([sys.executable, "-m", "energy_train", "train", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "--strategy" in r.stdout


def test_toml_config_fills_the_dataclass_and_flags_win(tmp_path):
    toml = tmp_path / "c.toml"
    body = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                     for k, v in TINY.items())
    toml.write_text(body + '\nstrategy = "alternating"\nalternate_every = 1\nseed = 5\n'
                    '[optim]\nenergy_lr = 0.002\n[policy]\nhead_hidden = 24\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(toml), "--seed", "6", "--steps", "2", "--out", str(out),
                 "--set", "strategy.alternate_every=2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["strategy"] == "alternating" and cfg["strategy"]["alternate_every"] == 2
    assert cfg["run"]["seed"] == 6 and cfg["run"]["steps"] == 2
    assert cfg["policy"]["d_model"] == TINY["d_model"] and cfg["policy"]["head_hidden"] == 24
    assert cfg["optim"]["energy_lr"] == 0.002


def test_plain_resume_continues_a_stopped_run(tmp_path):
    """`--stop-after K`, then the command the trainer prints (`--resume --out DIR`, no new
    --stop-after) runs to the end; it used to stop at once at K and print the same advice."""
    out = tmp_path / "run"
    args = ["train", "--steps", "4", "--out", str(out), "--no-progress", *_sets(TINY)]
    assert main([*args, "--stop-after", "2"]) == 0
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert (out / "complete.json").is_file()
    assert json.loads((out / "config.json").read_text())["run"]["stop_after"] == 0


# ---- the one --resume rule (README "Training"): to run.steps unless the command gives a new
# --stop-after / --steps; a fallback to an older checkpoint does not move the stop point; a
# target the run is already past is refused, naming the step ------------------------------------
def _stopped_run(tmp_path, steps=6, stop_after=4):
    out = tmp_path / "run"
    assert main(["train", "--steps", str(steps), "--stop-after", str(stop_after), "--out", str(out),
                 "--no-progress", *_sets(TINY | {"steps": steps, "ckpt_every": 2, "log_every": 1})]) == 0
    assert not (out / "complete.json").exists()
    return out


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] >= 0]


def test_resume_after_a_fallback_runs_to_the_end(tmp_path, capsys):
    """The newest checkpoint (step 4, the saved stop point) is corrupt: --resume loads step 2
    and runs to run.steps = 6 - it used to stop again at the old --stop-after 4."""
    out = _stopped_run(tmp_path)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["dir"]
    (out / "checkpoints" / latest / "state.pt").write_bytes(b"garbage")
    assert main(["train", "--resume", "--out", str(out)]) == 0
    err_out = capsys.readouterr().out
    assert "skipped a newer checkpoint" in err_out and "resumed" in err_out and "at step 2" in err_out
    assert (out / "complete.json").is_file() and _steps(out) == list(range(6))
    run = json.loads((out / "config.json").read_text())["run"]
    assert run["steps"] == 6 and run["stop_after"] == 0


def test_resume_with_a_new_stop_point_then_a_plain_resume(tmp_path):
    out = _stopped_run(tmp_path)
    assert main(["train", "--resume", "--out", str(out), "--stop-after", "5"]) == 0
    assert not (out / "complete.json").exists() and _steps(out) == list(range(5))
    assert main(["train", "--resume", "--out", str(out), "--steps", "7"]) == 0
    assert (out / "complete.json").is_file() and _steps(out) == list(range(7))


@pytest.mark.parametrize("args", [["--steps", "2"], ["--steps", "2", "--stop-after", "0"],
                                  ["--stop-after", "4"], ["--stop-after", "3"]],
                         ids=["steps", "steps-stop-0", "stop-at", "stop-before"])
def test_resume_to_a_step_the_run_is_past_is_refused(tmp_path, capsys, args):
    """--steps 2 at step 4 (with --stop-after 0 it used to mark the run complete at step 4 with
    config.json saying 2) and a --stop-after at or before step 4 are refused."""
    out = _stopped_run(tmp_path)
    config = (out / "config.json").read_text()
    assert main(["train", "--resume", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the run is already at step 4" in err, err
    assert (out / "config.json").read_text() == config  # nothing rewritten
    assert not (out / "complete.json").exists() and _steps(out) == list(range(4))
    assert main(["train", "--resume", "--out", str(out)]) == 0  # the way on
    assert (out / "complete.json").is_file() and _steps(out) == list(range(6))
