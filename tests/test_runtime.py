"""The C++ runtime (CMakeLists.txt, runtime/) against the Python eager ops.

A small energy model is trained for a few steps, exported with
``energy_train.deploy.export_verifier`` (AOTInductor packages + manifest) while CMake builds the
runtime in the background (Torch found through ``torch.utils.cmake_prefix_path``); then
``et-verify`` runs score / correct / rerank on safetensors files and the ctest suite runs on
the same package. Outputs are compared with ``energy_scores`` / ``correct_actions`` (fp32:
relative error <= 1e-5) and with a float64 eager reference. The export and the build happen
once per test session (session fixture).

Needs cmake, a C++ compiler, OpenSSL's headers and the nlohmann-json wheel (dev extra). Where
one is missing the tests are skipped with the reason - except under CI=true, where they fail.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from energy_train import EnergyModel, correct_actions, energy_scores, swap_infonce
from energy_train import deploy
from energy_train.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
D, H, DA, HIDDEN, HEADS = 24, 5, 7, 16, 2
RANGES = dict(batch=(1, 8), context_len=(1, 48), candidates=(1, 16))
STEPS, ALPHA, CLIP = 2, 0.1, 0.2


def _missing() -> list[str]:
    out = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    try:
        import nlohmann_json  # noqa: F401
    except ImportError:
        if not Path("/usr/include/nlohmann/json.hpp").exists():
            out.append("nlohmann-json (pip install nlohmann-json)")
    if not Path("/usr/include/openssl/evp.h").exists():
        out.append("OpenSSL headers (libssl-dev)")
    return out


def _require_toolchain():
    missing = _missing()
    if missing:
        msg = "C++ runtime not built: missing " + ", ".join(missing)
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(msg + " (CI must run these tests)")
        pytest.skip(msg)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="session")
def trained():
    """A small energy model after 30 Adam steps of the swap InfoNCE (weights off their init)."""
    torch.manual_seed(0)
    model = EnergyModel(D, DA, hidden=HIDDEN, heads=HEADS, output="softplus")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        ctx, expert = torch.randn(6, 12, D, generator=g), torch.randn(6, H, DA, generator=g)
        loss = swap_infonce(model, ctx, None, expert, backend="eager").loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class Runtime:
    verifier: Path  # the export_verifier directory
    build: Path
    data: Path  # reference data for the ctest model cases

    @property
    def et_verify(self) -> Path:
        return self.build / "et-verify"


def _inputs(B, S, C, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, S, D, generator=g, dtype=dtype)
    pad_mask = torch.rand(B, S, generator=g) < 0.3
    pad_mask[:, 0] = False
    candidates = torch.randn(B, C, H, DA, generator=g, dtype=dtype)
    actions = torch.randn(B, H, DA, generator=g, dtype=dtype)
    return dict(context=context, pad_mask=pad_mask, candidates=candidates, actions=actions)


@pytest.fixture(scope="session")
def runtime(tmp_path_factory, trained) -> Runtime:
    _require_toolchain()
    root = tmp_path_factory.mktemp("runtime")
    build, verifier = root / "build", root / "verifier"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # no CMAKE_BUILD_TYPE: unoptimised, quicker to compile; the numerics live in the packages
    r = _run(["cmake", "-S", ROOT, "-B", build, *generator, f"-DET_PYTHON={sys.executable}"])
    assert r.returncode == 0, "CMake configure failed:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    log = open(root / "build.log", "w")
    proc = subprocess.Popen(["cmake", "--build", str(build), "-j", "2"], stdout=log,
                            stderr=subprocess.STDOUT)
    try:  # export while CMake builds
        with torch._inductor.config.patch(compile_threads=1):
            deploy.export_verifier(trained, path=verifier, chunk=(H, DA), steps=STEPS, alpha=ALPHA,
                                   clip_frac=CLIP, **RANGES)
    finally:
        rc = proc.wait(timeout=900)
        log.close()
    assert rc == 0, "CMake build failed:\n" + (root / "build.log").read_text()[-4000:]
    x = _inputs(3, 20, 5, seed=5)
    with torch.no_grad():
        x["energies"] = energy_scores(trained, x["context"], x["pad_mask"], x["candidates"],
                                      backend="eager")
    x["corrected"] = correct_actions(trained, x["context"], x["pad_mask"], x["actions"],
                                     steps=STEPS, alpha=ALPHA, clip_frac=CLIP, backend="eager")
    save_file(x, root / "data.safetensors")
    return Runtime(verifier, build, root / "data.safetensors")


def _et_verify(rt: Runtime, command: str, inputs: dict, tmp_path: Path, *extra):
    src, dst = tmp_path / f"{command}-in.safetensors", tmp_path / f"{command}-out.safetensors"
    save_file(inputs, src)
    r = _run([rt.et_verify, command, "--model", rt.verifier, "--in", src, "--out", dst, *extra])
    return r, (load_file(dst) if r.returncode == 0 else None)


def _eager(model, name, x, dtype=torch.float32):
    """energy_scores / correct_actions of ``model`` (a float64 copy for dtype=float64)."""
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    args = [x["context"].to(dtype), x["pad_mask"]]
    if name == "correct":
        return correct_actions(m, *args, x["actions"].to(dtype), steps=STEPS, alpha=ALPHA,
                               clip_frac=CLIP, backend="eager")
    with torch.no_grad():
        return energy_scores(m, *args, x["candidates"].to(dtype), backend="eager")


def _report(name, ref, out):
    err = (out.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()
    print(f"{name}: relative error {err:.2e}" + (" (bitwise equal)" if torch.equal(out, ref) else ""))


# ---------------------------------------------------------------------------------------------
SHAPES = [(1, 1, 1), (3, 17, 5), (8, 48, 16)]  # (B, S, C): both ends of every exported range


@pytest.mark.parametrize("B,S,C", SHAPES, ids=lambda v: str(v))
def test_et_verify_matches_python(runtime, trained, tmp_path, B, S, C):
    x = _inputs(B, S, C, seed=B * 100 + S)
    for command, output, oracle in (("score", "energies", "energy_scores"),
                                    ("correct", "actions", "correct_actions")):
        r, out = _et_verify(runtime, command, x, tmp_path)
        assert r.returncode == 0, r.stderr
        ref = _eager(trained, command, x)
        _report(f"{command} B{B}-S{S}-C{C} vs {oracle}", ref, out[output])
        assert_close(f"{command} vs {oracle}", ref, out[output], torch.float32)
        assert_close(f"{command} vs float64 eager", _eager(trained, command, x, torch.float64),
                     out[output], torch.float32)
    if S > 1:  # with one key the attention weights, the energy's only path to the actions, are 1
        assert not torch.equal(out["actions"], x["actions"])

    r, out = _et_verify(runtime, "rerank", x, tmp_path, "--correct-best")
    assert r.returncode == 0, r.stderr
    energies = _eager(trained, "score", x)
    best = energies.argmin(dim=1)
    assert torch.equal(out["index"], best)
    chunk = x["candidates"][torch.arange(B), best]
    y = dict(x, actions=chunk)
    assert_close("rerank --correct-best vs correct_actions(best)", _eager(trained, "correct", y),
                 out["chunk"], torch.float32)


def test_ctest_suite(runtime):
    """Every C++ case runs (none skipped) and passes on the exported package."""
    env = dict(os.environ, ET_TEST_MODEL_DIR=str(runtime.verifier), ET_TEST_DATA=str(runtime.data))
    r = _run(["ctest", "--test-dir", runtime.build, "--output-on-failure", "-j", "2"], env=env)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr
    cases = re.findall(r"^ET_TEST\((\w+)\)", (ROOT / "runtime/tests/runtime_tests.cpp").read_text(),
                       flags=re.M)
    assert len(cases) >= 15
    assert f"100% tests passed, 0 tests failed out of {len(cases)}" in r.stdout
    assert "Skipped" not in r.stdout and "Not Run" not in r.stdout


def test_manifest_describes_the_packages(runtime, trained):
    m = json.loads((runtime.verifier / "manifest.json").read_text())
    assert m["format"] == deploy.FORMAT and m["torch"] == torch.__version__
    assert m["device"] == "cpu" and m["dtype"] == "float32"
    assert m["dims"] == {k: list(v) for k, v in RANGES.items()}
    assert m["correction"] == dict(steps=STEPS, alpha=ALPHA, clip_frac=CLIP)
    assert m["chunk"] == [H, DA] and m["model"]["state_dim"] == D
    assert m["model"]["output"] == "softplus" and m["model"]["hidden"] == HIDDEN
    assert set(m["functions"]) == {"score", "correct"}
    score = m["functions"]["score"]
    assert [t["name"] for t in score["inputs"]] == ["context", "pad_mask", "candidates"]
    assert score["inputs"][2]["shape"] == ["batch", "candidates", H, DA]
    assert m["functions"]["correct"]["output"]["shape"] == ["batch", H, DA]
    for file, sha in m["files"].items():
        assert hashlib.sha256((runtime.verifier / file).read_bytes()).hexdigest() == sha
    for dim, (lo, hi) in RANGES.items():  # traced off the range ends
        assert lo < m["examples"][dim] < hi


def _copy(runtime, tmp_path) -> Path:
    dst = tmp_path / "verifier"
    shutil.copytree(runtime.verifier, dst)
    return dst


def test_et_verify_errors(runtime, tmp_path):
    x = _inputs(2, 49, 3, seed=0)  # context_len 49 > 48
    r, _ = _et_verify(runtime, "score", x, tmp_path)
    assert r.returncode == 1
    assert "input 'context': dim 1 (context_len) = 49 is outside the exported range [1, 48]" in r.stderr
    x = _inputs(2, 9, 3, seed=0, dtype=torch.float64)
    r, _ = _et_verify(runtime, "correct", x, tmp_path)
    assert r.returncode == 1 and "expected dtype float32, got float64" in r.stderr
    x = _inputs(2, 9, 3, seed=0)
    del x["candidates"]
    r, _ = _et_verify(runtime, "score", x, tmp_path)
    assert r.returncode == 1 and "has no tensor 'candidates'" in r.stderr
    broken = _copy(runtime, tmp_path)
    data = bytearray((broken / "correct.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "correct.pt2").write_bytes(bytes(data))
    r = _run([runtime.et_verify, "info", "--model", broken])
    assert r.returncode == 1 and "correct.pt2 does not match its sha256" in r.stderr
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # a package compiled for this CPU's vector ISA, run where ATen reports none
        r = _run([runtime.et_verify, "info", "--model", runtime.verifier],
                 env=dict(os.environ, ATEN_CPU_CAPABILITY="default"))
        assert r.returncode == 1 and "was compiled for AVX" in r.stderr, r.stderr
    r = _run([runtime.et_verify, "score", "--model", runtime.verifier])
    assert r.returncode == 2 and "--in FILE and --out FILE are required" in r.stderr
    r = _run([runtime.et_verify, "info", "--model", runtime.verifier])
    assert r.returncode == 0 and "context_len [1, 48]" in r.stdout, r.stderr


def test_et_verify_timings(runtime, tmp_path):
    x = _inputs(1, 10, 4, seed=1)
    r, _ = _et_verify(runtime, "score", x, tmp_path, "--repeat", "3", "--timings",
                      tmp_path / "t.json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    t = json.loads((tmp_path / "t.json").read_text())
    assert len(t["ms"]) == 3 and all(v > 0 for v in t["ms"]) and t["threads"] == 1


# ---------------------------------------------------------------------------------------------
# Python side, no compilation
# ---------------------------------------------------------------------------------------------
def test_exported_programs_equal_eager_bitwise(trained):
    """The graphs that AOTInductor compiles are the eager ops: bitwise equal on the CPU."""
    programs = deploy.export_programs(trained, chunk=(H, DA), steps=STEPS, alpha=ALPHA,
                                      clip_frac=CLIP, **RANGES)
    for B, S, C in SHAPES:
        x = _inputs(B, S, C, seed=7)
        args = (x["context"], x["pad_mask"])
        assert torch.equal(programs["score"].module()(*args, x["candidates"]),
                           _eager(trained, "score", x))
        assert torch.equal(programs["correct"].module()(*args, x["actions"]),
                           _eager(trained, "correct", x))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(chunk=(H, DA + 1)), ValueError, "chunk: expected Da = the model's act_dim 7, got 8"),
    (dict(chunk=(H,)), ValueError, "chunk: expected"),
    (dict(context_len=(0, 5)), ValueError, r"context_len: expected 1 <= min <= max, got \(0, 5\)"),
    (dict(batch=(4, 2)), ValueError, "batch: expected 1 <= min <= max"),
    (dict(candidates="many"), TypeError, "candidates: expected an int or a"),
    (dict(steps=0), ValueError, "steps: expected an int >= 1, got 0"),
    (dict(alpha=-1.0), ValueError, "alpha: expected a positive number"),
    (dict(dtype=torch.int32), TypeError, "dtype: expected one of"),
    (dict(device="meta"), ValueError, "device: expected cpu or cuda"),
    (dict(functions=("score", "train")), ValueError, "functions: expected a non-empty subset"),
    (dict(examples={"batch": 2, "seq": 3}), ValueError, "examples: expected keys among"),
], ids=["chunk-Da", "chunk-len", "context_len-0", "batch-reversed", "candidates-str", "steps-0",
        "alpha-negative", "dtype-int", "device-meta", "functions-unknown", "examples-unknown"])
def test_export_verifier_rejects_bad_arguments(trained, tmp_path, kwargs, error, match):
    args = dict(path=tmp_path, chunk=(H, DA))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        deploy.export_verifier(trained, **args)
    assert not any(tmp_path.iterdir())  # nothing written


def test_export_verifier_needs_an_energy_model(tmp_path):
    with pytest.raises(TypeError, match="energy_model: expected an EnergyModel, got Linear"):
        deploy.export_verifier(torch.nn.Linear(2, 2), path=tmp_path, chunk=(H, DA))


@pytest.mark.parametrize("fault", ["specialised", "perturbed"])
def test_check_refuses_a_package_that_disagrees_with_eager(trained, tmp_path, monkeypatch, fault):
    """export_verifier(check=True) raises when the compiled package is wrong at sizes other
    than its tracing sizes (a package specialised to the example batch; wrong numbers)."""
    plan = deploy._plan(trained, (H, DA), RANGES["context_len"], RANGES["batch"],
                        RANGES["candidates"], STEPS, ALPHA, CLIP, "cpu", torch.float32,
                        ("score",), None)
    ex = plan.examples

    def runner(context, pad_mask, candidates):
        e = plan.eager("score", context, pad_mask, candidates)
        if fault == "specialised":  # the output of the example batch, whatever came in
            return torch.zeros(ex["batch"], candidates.shape[1])
        return e * (1 + 1e-4)

    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: runner)
    with pytest.raises(deploy.ExportError, match="score: the compiled package disagrees with eager"):
        deploy._check_package(plan, "score", tmp_path / "none.pt2")


def test_a_failed_check_writes_no_package_and_no_manifest(trained, tmp_path, monkeypatch):
    def compile_stub(program, package_path, inductor_configs):
        Path(package_path).write_bytes(b"not a package")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_stub)
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path: lambda c, m, x: torch.zeros(1, 1))
    with pytest.raises(deploy.ExportError, match="score: the compiled package disagrees"):
        deploy.export_verifier(trained, path=tmp_path / "v", chunk=(H, DA), functions=("score",),
                               **RANGES)
    assert list((tmp_path / "v").iterdir()) == []
