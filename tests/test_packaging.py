"""kernels/<op>/ is installed as energy_train.kernels.<op> only - never as a top-level `kernels`
(the name of a Hugging Face distribution that transformers imports): kernels/ has no
__init__.py, so even with the repository root on sys.path an installed `kernels` wins."""
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
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the repository root shadow Hugging Face's `kernels`"
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
    assert Path(kernels_file).resolve().parent == (ROOT / "energy_train" / "kernels").resolve()
    assert top_level == "NONE" or not Path(top_level).resolve().is_relative_to(ROOT / "kernels")
    out = subprocess.run([sys.executable, "-c", "import energy_train.kernels.energy as m;"
                          "print(m.__file__)"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().parent == (ROOT / "kernels" / "energy").resolve()


# A stand-in for Hugging Face's `kernels` distribution, at a version transformers accepts: every
# name transformers imports from it is a permissive class, and `FAKE_KERNELS` marks it as ours.
_FAKE_INIT = """
FAKE_KERNELS = True
class _Stub:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return a[0] if a else None
    def __getattr__(self, name): return _Stub()
    def __or__(self, other): return self
    __ror__ = __or__
    def __hash__(self): return id(self)
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Stub,), {})
"""


def _fake_kernels_site(tmp_path) -> Path:
    from transformers.utils import import_utils
    version = import_utils.KERNELS_MIN_VERSION
    site = tmp_path / "fake_site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(_FAKE_INIT)
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    return site


@pytest.mark.slow
def test_repository_root_never_shadows_an_installed_kernels_distribution(tmp_path):
    """From the repository root (which `python -c`, `python -m` and pytest put on sys.path),
    with a distribution named `kernels` installed: `import kernels` is that distribution, and
    transformers, the OFT tests and a benchmark that imports transformers all run."""
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=str(_fake_kernels_site(tmp_path)))
    env.pop("TRITON_INTERPRET", None)
    env.pop("PYTEST_XDIST_WORKER", None)

    def run(*args, timeout=600):
        out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, f"{args}: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    assert run("-c", "import kernels; print(kernels.FAKE_KERNELS)").strip() == "True"
    run("-c", "import transformers.modeling_utils, transformers.integrations.hub_kernels, "
              "energy_train.kernels.energy")
    assert " passed" in run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                             "tests/test_oft.py::test_captured_rows_of_every_layer_equal_ofts_expression",
                             "tests/test_oft.py::test_collator_output_is_ofts")
    run("-m", "bench.run", "step", "--quick", "--case", "oftstandin", "--provider",
        "two_phase_seq", "--out", str(tmp_path / "bench"))


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
    assert top_level == "NONE" or not Path(top_level).resolve().is_relative_to(ROOT / "kernels")
