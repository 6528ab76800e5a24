"""kernels/ is installed as energy_train.kernels only - never as a top-level `kernels`
(the name of a Hugging Face package that transformers probes for)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import importlib.util, energy_train.kernels, energy_train;"
         "print(energy_train.kernels.__file__);"
         "s = importlib.util.find_spec('kernels');"
         "print(s.origin if s else 'NONE')")


def _declared_packages():
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_directory_is_declared():
    found = set()
    for top, name in (("energy_train", "energy_train"), ("kernels", "energy_train.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == _declared_packages(), "pyproject's [tool.setuptools] packages is out of date"


def _probe(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_editable_install_imports_kernels_under_energy_train_only(tmp_path):
    kernels_file, top_level = _probe(tmp_path)
    assert Path(kernels_file).resolve().parent == (ROOT / "kernels").resolve()
    assert top_level == "NONE" or str(ROOT) not in top_level


@pytest.mark.slow
def test_wheel_holds_energy_train_kernels_and_no_top_level_kernels(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = wheel_dir.glob("energy_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "energy_train/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    # install the wheel into a target dir and import it from there, away from the source tree
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    kernels_file, top_level = _probe(tmp_path, env)
    assert Path(kernels_file).resolve().is_relative_to(target.resolve())
    assert top_level == "NONE" or str(ROOT) not in top_level
