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
