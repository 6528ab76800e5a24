"""Bad input gets a clear error naming the argument, expected and received - never a crash
deep inside torch."""
import pytest
import torch

from energy_train import (EnergyModel, L1RegressionActionHead, build_action_index,
                          energy_scores, explicit_infonce, layer_actions, swap_infonce)
from energy_train.ops import resolve_backend

B, T, D, H, Da = 2, 30, 8, 2, 3


@pytest.fixture
def head():
    return L1RegressionActionHead(D, 12, Da, H)


@pytest.fixture
def model():
    return EnergyModel(D, Da, hidden=16, heads=2)


def _hs(d=D, b=B, n=3, dtype=torch.float32):
    return [torch.randn(b, T, d).to(dtype) for _ in range(n)]


def _idx(b=B, n=H * Da):
    return build_action_index(num_tokens=n, start=torch.zeros(b, dtype=torch.long))


@pytest.mark.parametrize("make,match", [
    (lambda: (_hs(d=D + 1), _idx()), r"hidden_states\[0\]: expected size 8 at dim 2, got shape \(2, 30, 9\)"),
    (lambda: (_hs(), _idx(n=H * Da + 1)), r"action_index: expected size 6 at dim 1, got shape \(2, 7\)"),
    (lambda: (_hs(), _idx(b=B + 1)), r"action_index: expected size 2 at dim 0, got shape \(3, 6\)"),
    (lambda: (_hs(dtype=torch.int32), _idx()), r"hidden_states\[0\]: expected a floating dtype"),
    (lambda: (_hs(), _idx().float()), r"action_index: expected an integer dtype, got torch.float32"),
    (lambda: ([torch.randn(B, T, D), torch.randn(B + 1, T, D)], _idx()), r"hidden_states\[1\]: expected size 2 at dim 0"),
    (lambda: (torch.randn(B, T, D), _idx()), r"hidden_states: expected 4 dimensions"),
    (lambda: ([], _idx()), r"hidden_states: expected a non-empty"),
], ids=["wrong-D", "wrong-HDa", "batch-mismatch", "int-hidden", "float-index", "layer-batch",
        "3d-tensor", "empty"])
def test_layer_actions_bad_input(head, make, match):
    hs, idx = make()
    with pytest.raises((ValueError, TypeError), match=match):
        layer_actions(hs, idx, head)


def test_layer_actions_bad_layers_and_index_values(head):
    with pytest.raises(ValueError, match="layers: index 5 out of range for 3 hidden states"):
        layer_actions(_hs(), _idx(), head, layers=[5])
    bad = _idx() + T  # past the end
    with pytest.raises(ValueError, match=r"action_index: positions must lie in \[0, 30\)"):
        layer_actions(_hs(), bad, head, validate=True)
    with pytest.raises(TypeError, match="head: expected an L1RegressionActionHead"):
        layer_actions(_hs(), _idx(), torch.nn.Linear(2, 2))


def test_predict_action_bad_input(head):
    with pytest.raises(ValueError, match=r"actions_hidden_states: expected size 6 at dim 1, got shape \(2, 5, 8\)"):
        head.predict_action(torch.randn(B, 5, D))


def _energy_args(S=7, b=B, d=D, da=Da, c=3):
    return torch.randn(b, S, d), torch.zeros(b, S, dtype=torch.bool), torch.randn(b, c, H, da)


@pytest.mark.parametrize("mutate,match", [
    (lambda c, m, a: (torch.randn(B, 7, D + 2), m, a), r"context: expected size 8 at dim 2, got shape \(2, 7, 10\)"),
    (lambda c, m, a: (c, m, torch.randn(B, 3, H, Da + 1)), r"candidates: expected size 3 at dim 3, got shape \(2, 3, 2, 4\)"),
    (lambda c, m, a: (c, m, torch.randn(B + 1, 3, H, Da)), r"candidates: expected size 2 at dim 0, got shape \(3, 3, 2, 3\)"),
    (lambda c, m, a: (c, m[:, :5], a), r"pad_mask: expected size 7 at dim 1, got shape \(2, 5\)"),
    (lambda c, m, a: (c, m.float(), a), r"pad_mask: expected dtype \(torch.bool,\), got torch.float32"),
    (lambda c, m, a: (c.to(torch.int64), m, a), r"context: expected a floating dtype"),
    (lambda c, m, a: (c[0], m, a), r"context: expected 3 dimensions, got shape \(7, 8\)"),
    (lambda c, m, a: (c, m, a[:, 0]), r"candidates: expected 4 dimensions"),
], ids=["wrong-D", "wrong-Da", "batch-mismatch", "mask-shape", "mask-dtype", "int-context",
        "2d-context", "3d-candidates"])
def test_energy_scores_bad_input(model, mutate, match):
    c, m, a = mutate(*_energy_args())
    with pytest.raises((ValueError, TypeError), match=match):
        energy_scores(model, c, m, a)


def test_energy_value_checks_behind_validate(model):
    c, m, a = _energy_args()
    c[1, 3, 2] = float("nan")
    out = energy_scores(model, c, m, a)  # hot path: no value check, no sync
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    with pytest.raises(ValueError, match=r"context: holds 1 non-finite values \(first at \(1, 3, 2\)\)"):
        energy_scores(model, c, m, a, validate=True)


def test_losses_bad_input(model):
    c, m, _ = _energy_args()
    with pytest.raises(ValueError, match="expert: expected 3 dimensions"):
        swap_infonce(model, c, m, torch.randn(B, H * Da))
    with pytest.raises(ValueError, match=r"negatives: expected size 2 at dim 2"):
        explicit_infonce(model, c, m, torch.randn(B, H, Da), torch.randn(B, 4, H + 1, Da))
    with pytest.raises(TypeError, match="energy_model: expected an EnergyModel"):
        energy_scores(torch.nn.Linear(2, 2), c, m, torch.randn(B, 3, H, Da))


def test_backend_errors():
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'eager', 'triton'\), got 'cuda'"):
        resolve_backend("layer_actions", "cuda", torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="no_such_op: no Triton kernel for this op"):
        resolve_backend("no_such_op", "triton", torch.device("cpu"))
    assert resolve_backend("no_such_op", "auto", torch.device("cpu")) == "eager"


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_energy_scores_too_many_chunk_steps(backend, monkeypatch):
    """H beyond the positional table: a clear error naming candidates on both backends (the
    Triton path used to fail inside an expand with a message naming no argument)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = EnergyModel(D, Da, hidden=8, heads=2, max_steps=4)
    c, mask, _ = _energy_args()
    with pytest.raises(ValueError, match=r"candidates: at most 4 chunk steps \(dim 2\), got shape \(2, 3, 5, 3\)"):
        energy_scores(m, c, mask, torch.randn(B, 3, 5, Da), backend=backend)


def test_auto_runs_the_measured_faster_path():
    """backend="auto" follows ops.AUTO, and every CUDA entry cites a committed measurement."""
    from pathlib import Path

    from energy_train import ops
    root = Path(__file__).resolve().parents[1]
    for (op, kind, dtype), (backend, evidence) in ops.AUTO.items():
        assert backend in ("eager", "triton"), (op, kind)
        dt = None if dtype == "*" else getattr(torch, dtype)
        assert ops.resolve_backend(op, "auto", torch.device(kind), dt) == backend
        if kind == "cuda":
            files = [w.strip("(),:") for w in evidence.split() if w.startswith(("(bench/", "bench/"))]
            assert files and all((root / f).is_file() for f in files), (op, evidence)


def test_inputs_on_another_device_than_the_model(model):
    """Named at the door (it used to be a torch error 23 frames deep); the meta device stands
    in for a GPU on the CPU."""
    c, m, a = _energy_args()
    with pytest.raises(ValueError, match=r"context: on cpu, the energy model's weights on meta; "
                                         r"move the inputs to the model's device"):
        energy_scores(model.to("meta"), c, m, a)


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm(D + 1), torch.nn.RMSNorm(D + 1)],
                         ids=["layernorm", "rmsnorm"])
def test_a_final_norm_of_another_width(head, norm):
    with pytest.raises(ValueError, match=rf"final_norm: normalises shape \({D + 1},\) \({type(norm).__name__}\), "
                                         rf"the hidden states have D = {D}"):
        layer_actions(_hs(), _idx(), head, final_norm=norm)
    from energy_train import Policy

    class Other(Policy):  # another head: the default layer_actions stacks the layers
        backbone, action_head = torch.nn.Identity(), torch.nn.Identity()
        forward = layout = expert = None

    with pytest.raises(ValueError, match="final_norm: normalises shape"):
        Other().layer_actions([torch.randn(B, H * Da, D)] * 3, norm)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only torch")
def test_export_verifier_for_cuda_on_a_cpu_only_torch(tmp_path, model):
    from energy_train.deploy import export_verifier
    with pytest.raises(RuntimeError, match=r"device: 'cuda' asked for, but this torch .* has no "
                                           r"CUDA device; export on a CUDA machine, or device='cpu'"):
        export_verifier(model, path=tmp_path / "v", chunk=(H, Da), device="cuda")
    assert not (tmp_path / "v").exists()
