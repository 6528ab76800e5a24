"""run.cuda_graphs (energy_train/trainer/graphs.py).

CPU: "on" is refused off CUDA with a clear message and "auto" is ignored there (documented);
with the CPU stand-in of a CUDA graph (ET_GPU_STANDIN=1: "capture" keeps the body, a "replay"
runs it on the static buffers and writes into the first replay's outputs) every strategy built
from the phases gives bitwise the metrics and weights of cuda_graphs = "off" - a missed input
copy or output copy would show; each fallback (a policy that is not capturable, a joint
strategy, data parallelism, dynamic shapes, a capture that raises) names its reason, warns
under "auto" and raises under "on"; steps whose host values a graph would bake in run eagerly.
GPU (marked): graphed == eager bitwise over 20 steps (overlap on/off, accumulation, bf16), and
no host sync in a graphed step.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from energy_train.policies import resolve_factory
from energy_train.trainer import Trainer, build_trainer
from energy_train.trainer import graphs as G
from energy_train.trainer.feed import Micro
from energy_train.policy import BatchLayout
from trainer_helpers import make_trainer, same, snapshot, tiny_cfg

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setenv(G.STANDIN_ENV, "1")


def _run(cfg, steps: int, **kw):
    t = make_trainer(cfg, **kw)
    for _ in range(steps):
        t.train_step()
    return t, t.flush()


def _strip(records):
    """The computed metrics of ``records``: phase times (``time_*``) and the GPU telemetry the
    interval's last record carries (``gpu_*``: NVML readings, torch's peak bytes - a graph's
    private pools change it) are measurements of the run, not of the step."""
    return [{k: v for k, v in r.items() if not k.startswith(("time_", "gpu_"))} for r in records]


def _trainer_with(cfg, **attrs) -> Trainer:
    """A tiny trainer whose policy has ``attrs`` set (e.g. capturable=False)."""
    setup = resolve_factory("tiny")(cfg, torch.device("cpu"))
    for k, v in attrs.items():
        setattr(setup.policy, k, v)
    return build_trainer(cfg, torch.device("cpu"), policy=setup.policy, energy=setup.energy,
                         data=setup.data, probe=setup.probe)


# --------------------------------------------------------------------------------------------
# off CUDA: refused ("on") or ignored ("auto")
# --------------------------------------------------------------------------------------------
def test_on_is_refused_off_cuda(monkeypatch):
    monkeypatch.delenv(G.STANDIN_ENV, raising=False)
    with pytest.raises(G.CaptureError, match=r'cuda_graphs = "on": CUDA graphs need a CUDA '
                                             r'device, run.device is cpu'):
        make_trainer(tiny_cfg(cuda_graphs="on"))


def test_auto_is_ignored_off_cuda(monkeypatch):
    monkeypatch.delenv(G.STANDIN_ENV, raising=False)
    a, ra = _run(tiny_cfg(cuda_graphs="auto", steps=3), 3)
    b, rb = _run(tiny_cfg(cuda_graphs="off", steps=3), 3)
    assert not a.graphs.enabled and set(a.graphs.status().values()) == {"off"}
    assert _strip(ra) == _strip(rb)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="run.cuda_graphs: expected one of"):
        tiny_cfg(cuda_graphs="always")


# --------------------------------------------------------------------------------------------
# the stand-in: graphed == eager, bitwise
# --------------------------------------------------------------------------------------------
CASES = {
    "two_phase": dict(strategy="two_phase"),
    "two_phase-swap": dict(strategy="two_phase", energy_loss="swap"),
    "two_phase-accum2": dict(strategy="two_phase", grad_accum=2, batch_size=2, grad_clip=1.0),
    "two_phase-hidden_states": dict(strategy="two_phase", capture="hidden_states"),
    "two_phase-every2": dict(strategy="two_phase", phase2_every=2),
    "shared_forward": dict(strategy="shared_forward", energy_loss="margin"),
    "alternating": dict(strategy="alternating", alternate_every=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_standin_graphs_equal_eager(standin, case):
    steps = 8
    a, ra = _run(tiny_cfg(cuda_graphs="on", steps=steps, **CASES[case]), steps)
    b, rb = _run(tiny_cfg(cuda_graphs="off", steps=steps, **CASES[case]), steps)
    assert _strip(ra) == _strip(rb)
    assert same(snapshot(a.theta), snapshot(b.theta)) and same(snapshot(a.phi), snapshot(b.phi))
    status = a.graphs.status()
    assert status["theta"] == status["opt_theta"] == status["phi"] == "graphed (1)", status
    assert status["phi_read"] == ("warming up" if case == "shared_forward" else "graphed (1)")


def test_standin_chains_parts_without_copies(standin):
    """opt_theta reads theta's output grads in place; phi reads phi_read's outputs in place."""
    t, _ = _run(tiny_cfg(cuda_graphs="on", steps=4), 4)
    (theta, _), = t.graphs.parts["theta"].graphs.values()
    (_, opt_static), = t.graphs.parts["opt_theta"].graphs.values()
    grads_out = [g for g in theta.out[1] if g is not None]
    assert [g.data_ptr() for g in grads_out] == [s.data_ptr() for s in opt_static]
    (read, _), = t.graphs.parts["phi_read"].graphs.values()
    (_, phi_static), = t.graphs.parts["phi"].graphs.values()
    outs = {x.data_ptr() for pair in read.out[1] for x in pair if x is not None}
    assert outs <= {s.data_ptr() for s in phi_static}
    assert all(p.grad is None for p in t.theta + t.phi)  # as an eager step leaves them


@pytest.mark.parametrize("kw", [dict(energy_warmup_steps=5), dict(energy_skip_steps=5)],
                         ids=["energy_warmup", "energy_skip"])
def test_host_values_keep_phi_eager_until_they_settle(standin, kw):
    """The energy loss's warm-up weight and phi's skipped steps are host values: phase 2's
    energy part runs eagerly until they settle, then warms up and is captured; same numbers."""
    steps = 10
    a, ra = _run(tiny_cfg(cuda_graphs="on", steps=steps, **kw), steps)
    b, rb = _run(tiny_cfg(cuda_graphs="off", steps=steps, **kw), steps)
    assert _strip(ra) == _strip(rb)
    assert a.graphs.status()["phi"] == "graphed (1)"
    assert a.graphs.parts["phi"].seen and min(a.graphs.parts["phi"].seen.values()) == G.WARMUP


def test_resume_state_drops_the_graphs(standin):
    t, _ = _run(tiny_cfg(cuda_graphs="on", steps=4), 4)
    state = t.state_dict()
    t.load_state_dict(state)
    assert set(t.graphs.status().values()) == {"warming up"}
    t.train_step()


# --------------------------------------------------------------------------------------------
# fallbacks and their messages
# --------------------------------------------------------------------------------------------
def test_policy_not_capturable(standin):
    cfg = tiny_cfg(cuda_graphs="auto", steps=4)
    with pytest.warns(RuntimeWarning, match=r"part 'theta' runs eagerly: the policy \(TinyPolicy"
                                            r"\) does not declare Policy.capturable = True"):
        t = _trainer_with(cfg, capturable=False)
        for _ in range(4):
            t.train_step()
    st = t.graphs.status()
    assert st["theta"].startswith("eager: the policy") and st["phi_read"].startswith("eager")
    assert st["opt_theta"] == st["phi"] == "graphed (1)"  # the rest of the step still is
    with pytest.raises(G.CaptureError, match=r"part 'theta': the policy \(TinyPolicy\)"):
        _trainer_with(tiny_cfg(cuda_graphs="on"), capturable=False)


def test_joint_strategy_is_not_captured(standin):
    with pytest.raises(G.CaptureError, match="run.strategy = 'joint': its step is the joint loop"):
        make_trainer(tiny_cfg(strategy="joint", cuda_graphs="on"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: nothing to warn about, the step has no parts
        t, _ = _run(tiny_cfg(strategy="joint", cuda_graphs="auto", steps=2), 2)
    assert all(s.startswith("eager: run.strategy = 'joint'") for s in t.graphs.status().values())


def test_data_parallel_refuses(standin):
    class DP:  # the hooks of distributed.Parallel that use_parallel reads
        active = True
        mean = staticmethod(lambda x: x)

    t = make_trainer(tiny_cfg(cuda_graphs="auto"))
    with pytest.warns(RuntimeWarning, match="data parallelism"):
        t.use_parallel(DP())
    assert all("data parallelism" in s for s in t.graphs.status().values())
    t = make_trainer(tiny_cfg(cuda_graphs="on"))
    with pytest.raises(G.CaptureError, match="data parallelism"):
        t.use_parallel(DP())


def _graphs(mode: str, **kw) -> G.Graphs:
    return G.Graphs(mode, torch.device("cpu"), dict.fromkeys(G.PARTS), **kw)


def _body(x):
    return ({"s": x.sum()}, x * 2)


def test_dynamic_shapes_fall_back(standin):
    g = _graphs("auto")
    with pytest.warns(RuntimeWarning, match="part 'phi' runs eagerly: dynamic shapes"):
        for n in range(1, 30):
            m, y = g.run("phi", _body, torch.ones(n))
            assert float(m["s"]) == n and torch.equal(y, 2 * torch.ones(n))
    assert g.status()["phi"].startswith("eager: dynamic shapes")
    g = _graphs("on")
    with pytest.raises(G.CaptureError, match="dynamic shapes"):
        for n in range(1, 30):
            g.run("phi", _body, torch.ones(n))


def test_a_capture_that_raises_falls_back(standin):
    class Refuses:
        def __init__(self, fn, args, stream=None):
            raise RuntimeError("operation not permitted when stream is capturing")

    dropped = []
    g = _graphs("auto", on_failure=lambda: dropped.append(1))
    g.graph_cls = Refuses
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match=r"its capture raised RuntimeError: operation not "
                                            r"permitted when stream is capturing"):
        outs = [g.run("phi", _body, x) for _ in range(G.WARMUP + 2)]
    assert dropped == [1] and all(torch.equal(y, 2 * x) for _, y in outs)
    g = _graphs("on")
    g.graph_cls = Refuses
    with pytest.raises(G.CaptureError, match="its capture raised RuntimeError"):
        for _ in range(G.WARMUP + 1):
            g.run("phi", _body, x)


# --------------------------------------------------------------------------------------------
# the static-buffer plumbing
# --------------------------------------------------------------------------------------------
def test_replays_read_new_inputs_and_copy_metrics_out(standin):
    g = _graphs("on")
    outs = []
    for k in range(G.WARMUP + 3):
        m, y = g.run("phi", _body, torch.full((3,), float(k)))
        outs.append((m, y.clone()))
    assert [float(m["s"]) for m, _ in outs] == [3.0 * k for k in range(G.WARMUP + 3)]
    assert all(torch.equal(y, torch.full((3,), 2.0 * k)) for k, (_, y) in enumerate(outs))
    assert g.status()["phi"] == "graphed (1)"
    # the metrics are copies: the next replay does not change the ones handed out
    first = outs[G.WARMUP][0]["s"]
    assert float(first) == 3.0 * G.WARMUP


def test_flatten_rebuild_micro():
    lay = BatchLayout(torch.zeros(2, 3, dtype=torch.long), torch.arange(4).expand(2, 4),
                      torch.zeros(2, 4, dtype=torch.bool))
    mb = Micro({"x": torch.ones(2, 5), "name": "task"}, lay, torch.zeros(2, 8, 7), 1, True, [3, 4])
    live: list = []
    sig = G.flatten(([mb], None, 0.5), live)
    assert len(live) == 5 and hash(sig)
    static = [G.static_copy(t) for t in live]
    (mb2,), none, half = G.rebuild(([mb], None, 0.5), iter(static))
    assert none is None and half == 0.5 and mb2.batch["name"] == "task" and mb2.ids_host == [3, 4]
    assert mb2.batch["x"] is static[0] and mb2.expert is static[4] and (mb2.index, mb2.last) == (1, True)
    assert torch.equal(mb2.layout.context_index, lay.context_index)  # expanded -> contiguous
    live2: list = []
    assert G.flatten(([mb2], None, 0.5), live2) != sig  # strides are part of the signature
    static[0].zero_()
    G.copy_in(static, live)
    assert torch.equal(static[0], mb.batch["x"])
    before = static[1].clone()
    G.copy_in([static[1]], [static[1]])  # itself: skipped
    assert torch.equal(static[1], before)


def test_copy_out_copies_tensors_only():
    m = {"a": torch.tensor(1.0), "b": torch.tensor(2, dtype=torch.int64), "c": 0.5, "d": None}
    out = G.copy_out(m)
    m["a"].fill_(7.0)
    assert float(out["a"]) == 1.0 and int(out["b"]) == 2 and out["c"] == 0.5 and out["d"] is None


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overlap,accum,precision,loss",
                         [(True, 1, "fp32", "explicit"), (False, 1, "fp32", "explicit"),
                          (True, 2, "fp32", "swap"), (True, 1, "bf16", "explicit")],
                         ids=["overlap", "sequential", "overlap-accum2-swap", "overlap-bf16"])
def test_graphed_equals_eager_on_cuda(overlap, accum, precision, loss):
    """20 steps: every metric, theta and phi bitwise equal with cuda_graphs on and off; every
    part graphed; the replays run on the streams the eager parts use."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            runs = {}
            for mode in ("on", "off"):
                cfg = tiny_cfg(device="cuda", strategy="two_phase", cuda_graphs=mode,
                               overlap=overlap, grad_accum=accum, batch_size=8 // accum,
                               precision=precision, energy_loss=loss, steps=20, log_every=5,
                               probe_every=5)
                runs[mode] = _run(cfg, 20)
    finally:
        torch.use_deterministic_algorithms(False)
    (a, ra), (b, rb) = runs["on"], runs["off"]
    assert set(a.graphs.status().values()) == {"graphed (1)"}, a.graphs.status()
    assert _strip(ra) == _strip(rb)
    assert same(snapshot(a.theta), snapshot(b.theta)) and same(snapshot(a.phi), snapshot(b.phi))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_step_has_no_host_sync_on_cuda():
    t = make_trainer(tiny_cfg(device="cuda", strategy="two_phase", cuda_graphs="on"))
    for _ in range(G.WARMUP + 1):  # warm-up and the one capture (it synchronises once)
        t.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(t.graphs.status().values()) == {"graphed (1)"}
    assert len(t.flush()) == G.WARMUP + 4


def test_docs_name_every_part():
    assert all(f'"{p}"' in G.__doc__ for p in G.PARTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert G.standin() in (True, False)
