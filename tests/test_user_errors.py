"""Every error a user can cause reaches them as ONE line naming the argument, file or key
(exit code 2), error.txt is written when a run directory exists (or why it could not be, on
stderr), and no temporary file is left behind. README "Bring your own policy"."""
from __future__ import annotations

import json
import textwrap

import pytest

from energy_train.cli import main
from trainer_helpers import TINY

# a user's factory without options: its [policy] table is free-form
FREE = '''
from energy_train.config import default_config
from energy_train.policies import tiny

def make(cfg, device):
    t = default_config(d_model=32, n_layers=2, n_heads=2, head_hidden=32, dataset_size=32,
                       probe_size=6, image_size=8, patch_size=4, batch_size=cfg.run.batch_size,
                       energy_hidden=cfg.energy.hidden, energy_heads=cfg.energy.heads)
    return tiny.build(t, device)
'''
ARGS = ["--steps", "1", "--batch-size", "4", "--no-progress", "--set", "energy.hidden=32",
        "--set", "energy.heads=2"]


def _factory(tmp_path, body: str = FREE, name: str = "mine.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return f"{path}:make"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("energy-train "), err
    assert "Traceback" not in err
    return lines[0]


# ---- --set on a free-form [policy] table: TOML literals, or refused ---------------------------
@pytest.mark.parametrize("text,value", [("false", False), ("true", True), ("3", 3), ("0.5", 0.5),
                                        ('"abc"', "abc"), ("[1, 2]", [1, 2])])
def test_set_on_a_free_form_policy_table_parses_toml_literals(tmp_path, text, value):
    out = tmp_path / "run"
    assert main(["train", "--policy", _factory(tmp_path), *ARGS, "--set", f"policy.lora={text}",
                 "--out", str(out)]) == 0
    got = json.loads((out / "config.json").read_text())["policy"]["lora"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["abc", "", "1979-05-27", ".5"])
def test_set_on_a_free_form_policy_table_refuses_what_is_not_a_toml_value(tmp_path, capsys, text):
    out = tmp_path / "run"
    assert main(["train", "--policy", _factory(tmp_path), *ARGS, "--set", f"policy.lora={text}",
                 "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "policy.lora: the [policy] table of a factory without options takes TOML values" in line
    assert not out.exists()


def test_a_toml_file_keeps_its_own_types_for_a_free_form_table(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[policy]\nname = "abc"\nlora = false\n')
    out = tmp_path / "run"
    assert main(["train", "--policy", _factory(tmp_path), *ARGS, "--config", str(toml),
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["policy"] == {"name": "abc", "lora": False}


# ---- a user's policy file and factory ----------------------------------------------------------
BROKEN = {
    "syntax-error": ("def make(cfg, device)\n    return None\n", "SyntaxError"),
    "name-error": ("x = undefined_name\n\ndef make(cfg, device):\n    return None\n",
                   "NameError: name 'undefined_name' is not defined"),
    "no-factory": ("def other(cfg, device):\n    return None\n", "has no attribute 'make'"),
    "signature": ("def make(cfg):\n    return None\n",
                  "is called as factory(cfg, device) -> energy_train.policies.Setup; its signature is make(cfg)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_policy_file_that_cannot_be_used_is_one_line_before_a_run_directory(tmp_path, capsys, case):
    body, expected = BROKEN[case]
    target = _factory(tmp_path, body, name=f"{case.replace('-', '_')}.py")
    out = tmp_path / "run"
    assert main(["train", "--policy", target, *ARGS, "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "run.policy (--policy)" in line and expected in line, line
    if case != "signature":
        assert str(tmp_path / f"{case.replace('-', '_')}.py") in line  # the file is named
    assert not out.exists()


SETUPS = {
    "raises": ("raise RuntimeError('no such checkpoint: /models/x')",
               "the factory raised RuntimeError: no such checkpoint: /models/x (at "),
    "none": ("return None", "the factory must return energy_train.policies.Setup(policy, data, "
             "probe=None, energy=None), got None"),
    "tuple": ("return s.policy, s.data", "got a tuple of 2 (TinyPolicy, TaskData)"),
    "policy": ("return Setup(torch.nn.Linear(2, 2), s.data)",
               "Setup.policy: expected an energy_train.Policy"),
    "data-none": ("return Setup(s.policy, None)", "Setup.data: expected a step-indexed source"),
    "probe": ("return Setup(s.policy, s.data, probe=[1, 2])",
              "Setup.probe: expected a batch dict or None, got list"),
    "energy": ("return Setup(s.policy, s.data, energy=torch.nn.Linear(2, 2))",
               "Setup.energy: expected an energy_train.EnergyModel or None"),
}


@pytest.mark.parametrize("case", list(SETUPS))
def test_a_factory_that_fails_or_returns_the_wrong_thing_is_one_line(tmp_path, capsys, case):
    line_of_code, expected = SETUPS[case]
    body = FREE.replace("    return tiny.build(t, device)",
                        f"    s = tiny.build(t, device)\n    {line_of_code}")
    body = "import torch\nfrom energy_train.policies import Setup\n" + body
    out = tmp_path / "run"
    assert main(["train", "--policy", _factory(tmp_path, body), *ARGS, "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert f"run.policy (--policy) '{tmp_path / 'mine.py'}:make'" in line and expected in line, line
    error = (out / "error.txt").read_text()  # the run directory exists: error.txt says why
    assert expected in error and "Traceback" in error
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


# ---- compare: its arguments checked, a finished study's report never replaced by a bad one ----
STUDY = ["--seeds", "1", "--jobs", "1", "--pretrain-steps", "0", "--strategies", "two_phase",
         *[x for k, v in {**TINY, "steps": 2}.items() for x in ("--set", f"{k}={v}")]]


@pytest.mark.parametrize("args,expected", [
    (["--k", "-1"], "--k: expected a finite number of sigmas > 0"),
    (["--k", "nan"], "--k: expected a finite number of sigmas > 0"),
    (["--seeds", "0"], "--seeds: '0' asks for no seed; give N >= 1"),
], ids=["k-negative", "k-nan", "seeds-0"])
def test_compare_arguments_are_checked_before_a_run(tmp_path, capsys, args, expected):
    out = tmp_path / "cmp"
    assert main(["compare", *STUDY, *args, "--out", str(out)]) == 2
    assert expected in _one_line(capsys)
    assert not out.exists()


def test_compare_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["compare", *STUDY, "--out", str(f)]) == 2
    assert f"--out '{f}': expected a directory, got an existing file" in _one_line(capsys)


def test_report_only_never_overwrites_a_finished_report_with_other_parameters(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *STUDY, "--out", str(out)]) == 0
    report = {p.name: p.read_bytes() for p in out.glob("report.*")}
    assert set(report) == {"report.md", "report.json", "report.png"}
    capsys.readouterr()
    for args, expected in ((["--k", "-3"], "--k: expected a finite number of sigmas > 0"),
                           (["--k", "nan"], "--k: expected a finite number"),
                           (["--strategies", "joint"], "--report-only rewrites the report of the "
                            "study in --out from its runs (only --k applies); drop --strategies"),
                           (["--seeds", "5", "--set", "lr=1"], "drop --seeds, --set")):
        assert main(["compare", "--report-only", "--out", str(out), *args]) == 2
        assert expected in _one_line(capsys)
        assert {p.name: p.read_bytes() for p in out.glob("report.*")} == report
    assert main(["compare", "--report-only", "--out", str(out), "--k", "3"]) == 0  # the use
    assert json.loads((out / "report.json").read_text())["meta"]["k"] == 3


# ---- the filesystem: a read-only run directory, a full disk -----------------------------------
def _os_error(code):
    import errno
    import os
    return lambda path, *a, **k: (_ for _ in ()).throw(OSError(getattr(errno, code),
                                                                os.strerror(getattr(errno, code)),
                                                                str(path)))


def _stopped(tmp_path):
    out = tmp_path / "run"
    sets = [x for k, v in {**TINY, "steps": 4}.items() for x in ("--set", f"{k}={v}")]
    assert main(["train", "--stop-after", "2", "--out", str(out), *sets]) == 0
    return out


def test_resume_of_a_read_only_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    from energy_train.trainer import rundir
    out = _stopped(tmp_path)
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(rundir, "open", _os_error("EACCES"), raising=False)  # .lock cannot open
    assert main(["train", "--resume", "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert f"cannot open {out / '.lock'} (Permission denied); the run directory must be writable" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_read_only_filesystem_during_a_resume_names_the_file_and_why_error_txt_is_missing(
        tmp_path, capsys, monkeypatch):
    from energy_train import files
    out = _stopped(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(files, "write_synced", _os_error("EROFS"))
    assert main(["train", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"energy-train: could not write {out / 'error.txt'} (Read-only file system)"
    assert len(err) == 2 and err[1].startswith("energy-train train: error: ")
    assert "Read-only file system" in err[1] and str(out) in err[1]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("error_txt_too", [False, True], ids=["metrics-only", "whole-disk"])
def test_a_full_disk_while_appending_metrics(tmp_path, capsys, monkeypatch, error_txt_too):
    """No traceback; error.txt names metrics.jsonl (or stderr says why error.txt is missing);
    no temporary file left behind (a stray .error.txt.tmp-PID used to stay)."""
    from energy_train import files
    from energy_train.trainer import rundir
    real = files.write_synced

    def full(path, data):
        if error_txt_too and "error.txt" in str(path):
            real(path, data[:3])  # the write starts, then the disk is full
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(rundir, "append_lines", _os_error("ENOSPC"))
    monkeypatch.setattr(files, "write_synced", full)
    out = tmp_path / "run"
    sets = [x for k, v in {**TINY, "steps": 4}.items() for x in ("--set", f"{k}={v}")]
    assert main(["train", "--out", str(out), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = f"cannot append the metrics of steps 0..1 to {out / 'metrics.jsonl'} (No space left on device)"
    assert expected in err[-1] and err[-1].startswith("energy-train train: error: ")
    if error_txt_too:
        assert err[0] == f"energy-train: could not write {out / 'error.txt'} (No space left on device)"
        assert not (out / "error.txt").exists()
    else:
        assert len(err) == 1 and expected in (out / "error.txt").read_text()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# ---- and the rest: a config file that is not TOML, Ctrl-C, a config that is not a config -----
def test_a_config_file_that_is_not_toml_text(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_bytes(b"\xff\xfe[run]\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert f"--config {bad}: not valid TOML" in _one_line(capsys)
    assert main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "--config: a directory, not a file" in _one_line(capsys)


def test_ctrl_c_is_one_line_and_error_txt_says_where(tmp_path, capsys, monkeypatch):
    from energy_train.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    out = tmp_path / "run"
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert main(["train", "--out", str(out), *sets]) == 130
    assert _one_line(capsys) == "energy-train train: interrupted"
    assert (out / "error.txt").read_text().startswith("KeyboardInterrupt")


def test_train_with_something_else_than_a_config():
    from energy_train.trainer import train
    with pytest.raises(TypeError, match=r"cfg: expected an energy_train.config.TrainConfig .*got dict"):
        train({"run": {"steps": 2}}, "runs/never")
