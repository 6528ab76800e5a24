"""The overlapped two-phase step (energy_train.trainer.overlap) and "no host sync in a step".

CPU: overlap=True runs the same code in order and equals a plain hand-written two-phase loop
bitwise; every strategy's step calls no host-synchronising tensor method (instrumented).
GPU (marked): overlapped == sequential bitwise over 20 steps; phase 2 really runs on the side
stream; steps run under torch.cuda.set_sync_debug_mode("error").
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from energy_train import losses
from energy_train.ops import layer_actions
from energy_train.tensors import gather_rows
from energy_train.trainer import STRATEGIES, Trainer
from trainer_helpers import make_trainer, same, snapshot, tiny_cfg

# bitwise reproducibility of cuBLAS with more than one stream (read before cuBLAS starts)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is the fastest on a shared CPU (as the trainer does)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# CPU: the overlap code path == a plain loop
# --------------------------------------------------------------------------------------------
def plain_two_phase(t: Trainer, steps: int, bf16: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The separated two-phase update written out by hand (output_hidden_states, no hooks,
    no streams) on the trainer's policy, energy model and optimizers; ``bf16``: the policy's
    forwards and head under bf16 autocast, the energy model in fp32. Returns (l1, energy
    loss) per step."""
    cfg, policy = t.cfg, t.policy
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    f32 = lambda x: x.float() if x.dtype == torch.bfloat16 else x  # noqa: E731
    out = []
    for k in range(steps):
        batch = t.batch(k)
        n, l1_sum, e_sum = len(batch), 0.0, 0.0
        for mb in batch:  # phase 1: theta_k -> theta_k+1
            idx = mb.layout.action_index
            with amp():
                h = policy.forward(mb.batch)
                rows = gather_rows(h, idx)
                pred = policy.action_head.predict_action(rows)
            loss = F.l1_loss(f32(pred), mb.expert) / n
            loss.backward()
            l1_sum = l1_sum + loss.detach()
        t.optim.opt_theta.step()
        t.optim.opt_theta.zero_grad(set_to_none=True)
        for mb in batch:  # phase 2: no-grad forward with theta_k+1, negatives, phi step
            with torch.no_grad(), amp():
                hs = policy.forward(mb.batch, output_hidden_states=True).hidden_states
                negs = layer_actions(hs, mb.layout.action_index, policy.action_head,
                                     final_norm=policy.decoder()[1])
            ctx = f32(gather_rows(hs[-1], mb.layout.context_index))
            g = torch.Generator().manual_seed((cfg.run.seed * 1_000_003 + k) * 1024 + mb.index)
            cand = losses.structured_negatives(mb.expert, negs, own_prediction=True, generator=g)
            e = losses.explicit_infonce(t.energy, ctx, mb.layout.pad_mask, mb.expert, cand,
                                        tau=cfg.energy.tau)
            (e.loss / n).backward()
            e_sum = e_sum + e.loss.detach() / n
        torch.nn.utils.clip_grad_norm_(t.phi, cfg.optim.energy_grad_clip)
        t.optim.opt_phi.step()
        t.optim.opt_phi.zero_grad(set_to_none=True)
        t.optim.sched_theta.step()
        t.optim.sched_phi.step()
        out.append((l1_sum, e_sum))
    return out


@pytest.mark.parametrize("accum", [1, 2], ids=["accum1", "accum2"])
def test_overlap_requested_on_cpu_equals_plain_loop(accum):
    steps = 20
    cfg = tiny_cfg(strategy="two_phase", overlap=True, grad_accum=accum, steps=steps,
                   batch_size=4 if accum == 1 else 2)
    t = make_trainer(cfg)
    assert not t.streams.enabled  # the CPU runs in order
    ref = make_trainer(cfg)
    got = [t.train_step() for _ in range(steps)]
    want = plain_two_phase(ref, steps)
    for k, (m, (l1, e)) in enumerate(zip(got, want)):
        assert torch.equal(m["l1"], l1) and torch.equal(m["energy_loss"], e), f"step {k}"
    assert same(snapshot(t.theta), snapshot(ref.theta))
    assert same(snapshot(t.phi), snapshot(ref.phi))


# --------------------------------------------------------------------------------------------
# CPU: no host synchronisation inside a step, every strategy
# --------------------------------------------------------------------------------------------
class HostSyncError(AssertionError):
    pass


_METHODS = ("item", "cpu", "tolist", "numpy", "nonzero", "masked_select", "argwhere", "unique",
            "__bool__", "__float__", "__int__", "__index__", "__repr__", "__format__")
_FUNCTIONS = ("nonzero", "masked_select", "argwhere", "unique")


def _bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def forbid_host_sync(allow=lambda t: False):
    """Inside: a tensor method/function that synchronises a CUDA device with the host raises
    HostSyncError (``allow(t)`` exempts host-resident-by-design tensors), as do boolean-mask
    indexing and ``torch.tensor(..., device=<a device variable>)`` (a blocking host-to-device
    copy on CUDA; a literal ``device="cpu"``, as AdamW's step counters use, is host by design)."""
    saved = []

    def patch(owner, name, wrapper):
        saved.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, wrapper)

    def method(name, orig):
        def wrapper(self, *a, **k):
            if not allow(self):
                raise HostSyncError(f"Tensor.{name} inside a step")
            return orig(self, *a, **k)
        return wrapper

    def function(name, orig):
        def wrapper(*a, **k):
            raise HostSyncError(f"torch.{name} inside a step")
        return wrapper

    def indexing(name, orig):
        def wrapper(self, idx, *a):
            if _bool_index(idx):
                raise HostSyncError(f"boolean-mask indexing ({name}) inside a step")
            return orig(self, idx, *a)
        return wrapper

    def where(orig):
        def wrapper(*a, **k):
            if len(a) + len(k) == 1:
                raise HostSyncError("torch.where(cond) inside a step")
            return orig(*a, **k)
        return wrapper

    def creation(name, orig):
        def wrapper(*a, **k):
            dev = k.get("device")
            if dev is not None and not (isinstance(dev, str) and dev == "cpu"):  # literal: by design
                raise HostSyncError(f"torch.{name}(..., device=) (blocking copy) inside a step")
            return orig(*a, **k)
        return wrapper

    try:
        for name in _METHODS:
            patch(torch.Tensor, name, method(name, getattr(torch.Tensor, name)))
        for name in _FUNCTIONS:
            patch(torch, name, function(name, getattr(torch, name)))
        for name in ("__getitem__", "__setitem__"):
            patch(torch.Tensor, name, indexing(name, getattr(torch.Tensor, name)))
        patch(torch, "where", where(torch.where))
        for name in ("tensor", "as_tensor"):
            patch(torch, name, creation(name, getattr(torch, name)))
        yield
    finally:
        for owner, name, orig in reversed(saved):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)


def test_forbid_host_sync_catches_each_pattern():
    x = torch.tensor([1.0, -2.0, 3.0])
    cases = [lambda: x[0].item(), lambda: x.cpu(), lambda: x.tolist(), lambda: x.numpy(),
             lambda: x.nonzero(), lambda: torch.nonzero(x), lambda: bool(x[0]),
             lambda: float(x[0]), lambda: int(x[0]), lambda: x[x > 0], lambda: print(x),
             lambda: f"{x[0]:.3f}", lambda: torch.where(x > 0),
             lambda: torch.tensor([1], device=x.device), lambda: x.masked_select(x > 0),
             lambda: [0, 1][x[0].long()]]
    with forbid_host_sync(allow=lambda t: t is x):
        x.cpu(), x.tolist(), x.numpy()  # x itself is allowed...
        with pytest.raises(HostSyncError):
            x[0].item()                 # ...x[0] is not
    with forbid_host_sync():
        for i, fn in enumerate(cases):
            with pytest.raises(HostSyncError):
                fn()
                pytest.fail(f"case {i} was not caught")
        torch.where(x > 0, x, -x)  # the 3-argument form is fine
        x[x.argmax()] = 0.0        # integer-tensor indexing is fine
    assert x.tolist() == [1.0, -2.0, 0.0] and bool(x[0]) and x[x > 0].numel() == 1  # restored


def test_forbid_host_sync_sees_a_sync_smuggled_into_a_step():
    t = make_trainer(tiny_cfg(strategy="two_phase"))
    t.feed.batch(0)  # the epoch's host permutation
    t.objective.weight = lambda step: float(torch.ones(()))  # a host read inside phase 2
    with forbid_host_sync(allow=_host_state(t)), pytest.raises(HostSyncError, match="__float__"):
        t.train_step()


def _host_state(t: Trainer):
    """Tensors that live on the host by design (CPU even in a CUDA run): AdamW's step counts
    and the sample ids the data hands over on the CPU (read before they move)."""
    host, batch = [], t.feed.batch

    def recording(*a):
        out = batch(*a)
        host.extend(d["ids"] for d in out)
        return out

    t.feed.batch = recording

    def allow(x):
        return any(x is h for h in host) or any(
            x is st.get("step") for opt in (t.optim.opt_theta, t.optim.opt_phi) for st in opt.state.values())
    return allow


VARIANTS = [(s, {}) for s in STRATEGIES] + [
    ("joint", {"detach_context": False}), ("two_phase", {"energy_loss": "swap"}),
    ("two_phase", {"energy_loss": "margin", "grad_accum": 2, "batch_size": 2, "grad_clip": 1.0,
                   "probe_every": 2}),
    ("two_phase", {"capture": "hidden_states"}), ("shared_forward", {"grad_accum": 2, "batch_size": 2})]


@pytest.mark.parametrize("strategy,kw", VARIANTS,
                         ids=[s + "".join(f"-{k}={v}" for k, v in kw.items()) for s, kw in VARIANTS])
def test_no_host_sync_inside_a_step(strategy, kw):
    """Steps 0-3 (first optimizer steps, both phases of alternating, cache refreshes, the
    adaptive window filling up, probes) call nothing that would synchronise a GPU."""
    cfg = tiny_cfg(strategy=strategy, alternate_every=1, cache_refresh=2, adaptive_window=2,
                   overlap=True, **kw)
    t = make_trainer(cfg)
    t.feed.batch(0)  # the epoch's host permutation (made once per epoch, on the host)
    with forbid_host_sync(allow=_host_state(t)):
        for _ in range(4):
            t.train_step()
    records = t.flush()
    assert len(records) == 4 and all("energy_loss" in r or "l1" in r for r in records)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
def _cuda_trainer(**kw) -> Trainer:
    return make_trainer(tiny_cfg(device="cuda", **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("accum,precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")],
                         ids=["accum1", "accum2", "accum1-bf16"])
def test_overlapped_equals_sequential_on_cuda(accum, precision):
    """20 steps: theta, phi and every loss bitwise equal with and without the overlap; a
    sequential-vs-sequential control tells nondeterministic kernels apart from an ordering bug."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            runs = {}
            for name, overlap in (("overlap", True), ("seq", False), ("seq2", False)):
                t = _cuda_trainer(strategy="two_phase", overlap=overlap, steps=20, grad_accum=accum,
                                  batch_size=8 // accum, log_every=5, probe_every=5,
                                  precision=precision)
                assert t.streams.enabled == overlap
                if overlap:
                    t.timer.history = []
                for _ in range(20):
                    t.train_step()
                runs[name] = (t, t.flush())
    finally:
        torch.use_deterministic_algorithms(False)
    (a, ra), (b, rb), (c, rc) = runs["overlap"], runs["seq"], runs["seq2"]
    keys = ("l1", "energy_loss", "rank_acc", "grad_norm_theta", "grad_norm_phi", "probe_l1")
    strip = lambda rs: [{k: r[k] for k in keys if k in r} for r in rs]  # noqa: E731
    assert strip(rb) == strip(rc) and same(snapshot(b.theta), snapshot(c.theta)), \
        "sequential runs differ from each other: nondeterministic kernels, not the overlap"
    assert strip(ra) == strip(rb)
    assert same(snapshot(a.theta), snapshot(b.theta)) and same(snapshot(a.phi), snapshot(b.phi))
    side = a.streams.side
    streams = {name: s for _, name, s, *_ in a.timer.history}
    assert streams["phase2"] == side and streams["phase1"] != side


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [dict(overlap=True), dict(overlap=False),
                                dict(overlap=True, capture="hidden_states", grad_accum=2)])
def test_overlapped_step_has_no_host_sync_on_cuda(kw):
    t = _cuda_trainer(strategy="two_phase", **kw)
    t.train_step()  # warm-up: lazy allocations, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(t.flush()) == 4
