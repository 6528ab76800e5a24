"""``energy-train plan``: the peak device memory of a training step, per strategy and part,
before a GPU is rented.

Each strategy's step runs for real through the Trainer, under torch's ``FakeTensorMode`` (no
memory, no arithmetic: shapes, dtypes and devices only) with :class:`~.tracker.LiveBytes`
counting every storage from its creation to its release, in 512-byte blocks as the CUDA
caching allocator counts ``max_memory_allocated``. The modules are built on the meta device
and made fake on the planned device (``cpu``, or ``cuda`` where CUDA is present: CUDA's
autocast and dispatch); the data is the policy's own, real, a few batches. The fused ops
follow what ``backend="auto"`` picks on ``target`` (default: CUDA, whatever the planned
device - the Triton energy path for a bf16 energy model, with its fp32 workspace and backward
scratch from the kernels' own plans; eager for fp32 ones).

Per strategy (steps 1-2 of 3; step 0 creates the optimizer state): ``base`` - what is live at
the start of a step (weights, optimizer state, the batch); the transient above it of phase 1
(forward activations, theta's grads, its step), of phase 2's read (the no-grad forward, the
captured rows, the negatives) and of phase 2's energy part (the energy model's activations
or workspace, phi's grads and step); ``peak``, sequential. Derived: the overlapped peak
(phase 2(k) beside phase 1(k+1): base + phase 1 + phase 2, an upper bound) and the CUDA
graphs' (each part keeps its own memory pool: base + phase 1 + read + energy, an upper bound
on the reserved bytes). What-ifs: activation checkpointing of the decoder layers in phase 1
(measured the same way), FSDP over N GPUs (from the measured parts: the backbone's weights,
the decoder's trainable grads and AdamW state divided by N, two decoder layers gathered), and
``strategy.phase2_every`` (no change: a peak is a maximum over steps, not a mean).

On CUDA (the planned device, or ``capability=`` for a GPU this machine does not have) the
plan has separate lines for the library workspaces torch allocates through its caching
allocator, outside any tensor (:mod:`.workspace`): "cuBLAS workspace" (one per cuBLAS handle
and stream: 2 handles - the caller's thread, autograd's device thread - per stream; 32 MiB
each on an H100/H200 by default) and "cuBLASLt workspace" (separate up to torch 2.11: 1 MiB
per stream), per execution mode (sequential: 1 stream; overlapped: + the side stream; CUDA
graphs: + the capture stream). They sit on top of every peak above (allocated at the first
matmul, kept); ``peak + workspaces`` is what ``max_memory_allocated`` reports. The CPU plan
has none.

Not counted: the CUDA context (~0.5 GB), cuDNN workspaces, allocator fragmentation
(``memory_reserved`` above ``memory_allocated``), what a kernel allocates outside torch.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch

from .. import ops
from ..config import TrainConfig
from ..trainer import Trainer
from ..trainer.feed import prepare
from .cases import CASES, SIZES, batches, build_energy, build_policy, case_config
from .tracker import LiveBytes, RegionTimer, rounded
from .workspace import blas_workspaces, for_device, streams_of

STRATEGIES = ("joint", "two_phase", "shared_forward")


@dataclass
class Weights:
    theta: int      # trainable policy parameters (backbone adapters, head, extras)
    frozen: int     # the policy's frozen parameters and buffers
    phi: int        # the energy model
    layers: int     # the decoder layers' parameters (what FSDP shards per layer)
    n_layers: int
    decoder_theta: int  # the decoder layers' trainable parameters


def _bytes(tensors) -> int:
    return sum(rounded(t.numel() * t.element_size()) for t in tensors)


def weights_of(policy, energy) -> Weights:
    theta = [p for _, p in policy.named_trainable()]
    ids = {id(p) for p in theta}
    frozen = [t for m in policy.modules().values() for t in (*m.parameters(), *m.buffers())
              if id(t) not in ids]
    layers = list(policy.decoder()[0])
    lp = [p for m in layers for p in m.parameters()]
    return Weights(_bytes(theta), _bytes({id(t): t for t in frozen}.values()),
                   _bytes(energy.parameters()) + _bytes(energy.buffers()), _bytes(lp), len(layers),
                   _bytes(p for p in lp if p.requires_grad))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_bytes(v for v in st.values() if isinstance(v, torch.Tensor))
               for st in opt.state.values())


@contextlib.contextmanager
def auto_as(target: str):
    """``backend="auto"`` picks what it would pick on ``target`` ("cuda" / "cpu")."""
    real = ops.auto_backend

    def as_target(op, device, dtype=None):
        return real(op, torch.device(target), dtype)
    ops.auto_backend = as_target
    try:
        yield
    finally:
        ops.auto_backend = real


@contextlib.contextmanager
def checkpointed(policy):
    """The decoder layers' forwards under activation checkpointing while grad is enabled."""
    from torch.utils.checkpoint import checkpoint
    layers = list(policy.decoder()[0])
    saved = [layer.forward for layer in layers]
    for layer, fwd in zip(layers, saved):
        def run(*a, _fwd=fwd, **k):
            if torch.is_grad_enabled():
                return checkpoint(_fwd, *a, use_reentrant=False, **k)
            return _fwd(*a, **k)
        layer.forward = run
    try:
        yield
    finally:
        for layer, fwd in zip(layers, saved):
            layer.forward = fwd


def _kernel_caches():
    """The kernels' module-level tensor caches (a fake tensor must not stay in one)."""
    from ..kernels.mlp import launch
    return [launch._CONSTANTS]


def workspaces(dev: torch.device, capability=None) -> dict | None:
    """The plan's library-workspace lines (:mod:`.workspace`): for ``capability`` (a stand-in
    GPU, e.g. (9, 0)) when given, else for the planned device when it is CUDA; None on the
    CPU. {"capability", "source", "cublas", "cublas_rule", "cublaslt", "cublaslt_rule",
    "modes": {"sequential" | "overlapped" | "graphs": {"streams", <line>: bytes, "total"}}}."""
    if capability is not None:
        ws, source = blas_workspaces(tuple(capability)), "stand-in capability"
    elif dev.type == "cuda":
        ws, source = for_device(dev), "this device"
    else:
        return None
    modes = {}
    for mode, n in (("sequential", streams_of()), ("overlapped", streams_of(overlap=True)),
                    ("graphs", streams_of(cuda_graphs=True))):
        modes[mode] = dict(streams=n, **ws.lines(n), total=ws.total(n))
    return dict(capability=list(ws.capability), source=source, cublas=ws.cublas,
                cublas_rule=ws.cublas_rule, cublaslt=ws.cublaslt, cublaslt_rule=ws.cublaslt_rule,
                modes=modes)


def workspace_bytes(p: dict, mode: str = "sequential") -> int:
    """The library workspaces of a plan in ``mode`` (0 on the CPU)."""
    ws = p.get("workspaces")
    return ws["modes"][mode]["total"] if ws else 0


def plan(case: str = "tiny", overrides: dict | None = None, *, strategies=STRATEGIES,
         device: str | None = None, target: str = "cuda", checkpointing: bool = True,
         fsdp_world: int = 8, capability=None) -> dict:
    """The memory plan of ``case`` (cases.CASES) with ``overrides`` ({"section.key": value}):
    {"case", "config", "device", "target", "weights", "strategies": {name: parts},
    "checkpointing": parts of two_phase with checkpointed decoder layers, "fsdp": ...,
    "workspaces": the cuBLAS / cuBLASLt workspace lines (None on the CPU unless
    ``capability``, a stand-in GPU's (major, minor), is given)}. The strategies' figures are
    the tensors' (what fake tensors see); the workspaces come on top of each."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cfg = case_config(case, overrides)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    steps = 3
    host = batches(case, cfg, steps)
    policy = build_policy(case, cfg)
    energy = build_energy(cfg, policy)
    tracker = LiveBytes()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    caches = {id(c): dict(c) for c in _kernel_caches()}
    out = dict(case=case, device=str(dev), target=target, config=cfg.to_dict(), strategies={},
               workspaces=workspaces(dev, capability))
    # layouts and expert chunks on the host, real (a policy's check_batch reads values)
    mbs = [[prepare(policy, d, torch.device("cpu"), i, i == len(b) - 1)
            for i, d in enumerate(b)] for b in host]
    try:
        with fake, tracker, auto_as(target):
            for m in [*policy.modules().values(), energy]:
                m.to_empty(device=dev)
            out["weights"] = weights_of(policy, energy).__dict__
            for name in strategies:
                out["strategies"][name] = _measure(cfg, name, policy, energy, mbs, dev, tracker,
                                                   fake)
            if checkpointing and "two_phase" in strategies:
                with checkpointed(policy):
                    out["checkpointing"] = _measure(cfg, "two_phase", policy, energy, mbs, dev,
                                                    tracker, fake)
    finally:
        for c in _kernel_caches():
            for k in [k for k in c if k not in caches[id(c)]]:
                del c[k]
    out["scratch"] = dict(tracker.scratch_ops)  # the fused ops' launcher scratch, largest
    out["fsdp"] = fsdp_estimate(out, fsdp_world)
    return out


def _to_device(mb, dev, fake):
    return mb.with_fields(_map(mb.static_fields(), lambda t: fake.from_tensor(t).to(dev,
                                                                                  copy=True)))


def _map(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return x


def _measure(cfg: TrainConfig, strategy: str, policy, energy, mbs, dev, tracker, fake) -> dict:
    c = cfg.with_values({"run.strategy": strategy, "run.overlap": False,
                         "run.cuda_graphs": "off", "run.probe_every": 0, "run.lag_every": 0,
                         "run.check_data": False, "strategy.alternate_every": 1}, "plan")

    class Premade:  # the Feed's interface; the batches come from t.batch below
        def batch(self, step, rank=0, world=1):
            return []

    t = Trainer(c, policy, energy, Premade(), dev)
    t.timer = RegionTimer(tracker)
    t.batch = lambda k: [_to_device(mb, dev, fake) for mb in mbs[k]]  # made at the step's start
    res = {}
    try:
        for k in range(len(mbs)):
            if k == 1:
                res["base"] = tracker.reset_peaks()
            with tracker.region("step"):
                t.train_step()
            t.meter.discard()
        rp, ip = tracker.region_peak, tracker.inner_peak
        base = res["base"]
        res.update(peak=tracker.peak, step=rp.get("step", base) - base,
                   phase1=rp["phase1"] - base if "phase1" in rp else None,
                   read=rp["phase2_read"] - base if "phase2_read" in rp else None,
                   energy=ip["phase2"] - base if "phase2" in ip else None,
                   opt_theta=state_bytes(t.optim.opt_theta), opt_phi=state_bytes(t.optim.opt_phi))
    finally:
        if t.capture is not None:
            t.capture.remove()
        for p in (*t.theta, *t.phi):
            p.grad = None
        del t
        gc.collect()
    if res.get("phase1") is not None:
        p2 = max(res["read"] or 0, res["energy"] or 0)
        res["overlapped"] = res["base"] + res["phase1"] + p2
        res["graphs"] = res["base"] + res["phase1"] + (res["read"] or 0) + (res["energy"] or 0)
    return res


def fsdp_estimate(out: dict, world: int) -> dict | None:
    """two_phase's peak per GPU with the backbone sharded over ``world`` GPUs (FSDP2,
    dist.fsdp): the backbone's frozen weights, the decoder's trainable weights, their grads and
    AdamW state divided by ``world``, plus two decoder layers gathered (the one computing and
    the one prefetched); the rest (head, energy model, activations) as measured."""
    s = out["strategies"].get("two_phase")
    w = out["weights"]
    if s is None or not w["n_layers"]:
        return None
    dec_theta, layer = w["decoder_theta"], w["layers"] / w["n_layers"]
    sharded = w["frozen"] + dec_theta
    state_share = s["opt_theta"] * dec_theta / max(w["theta"], 1)
    saved = (1 - 1 / world) * (sharded + state_share + dec_theta)  # weights, state, grads
    return dict(world=world, peak=s["peak"] - saved + 2 * layer, saved=saved, gathered=2 * layer)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def report(p: dict) -> str:
    """A markdown table of one plan (GiB, or MiB when every peak is under 1 GiB)."""
    big = max(s["peak"] for s in p["strategies"].values()) >= 2**30
    unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)

    def gib(n) -> str:
        return "-" if n is None else f"{n / scale:.2f}" if big else f"{n / scale:.1f}"
    w = p["weights"]
    cfg = p["config"]
    ws = p.get("workspaces")
    lines = [f"# Memory plan: {p['case']} (B {cfg['run']['batch_size']} x grad_accum "
             f"{cfg['run']['grad_accum']}, run.precision {cfg['run']['precision']}, energy "
             f"{cfg['energy']['hidden']}/{cfg['energy']['heads']} {cfg['energy']['precision']}, "
             f"loss {cfg['energy']['loss']})", "",
             f"Fake tensors on `{p['device']}`, fused ops as `auto` picks them on "
             f"`{p['target']}`; {unit} allocated (torch's max_memory_allocated; no CUDA context "
             "or fragmentation" + ("; the library workspaces on their own lines below" if ws
                                    else "; on the CPU: no library workspaces") + ").", "",
             f"Weights: theta (trainable) {gib(w['theta'])}, frozen {gib(w['frozen'])}, phi "
             f"{gib(w['phi'])} {unit}.", "",
             "| strategy | peak | " + ("peak + workspaces | " if ws else "")
             + "base (weights, AdamW, batch) | phase 1 (acts + grads) | "
             "phase 2 read | phase 2 energy | overlapped | CUDA graphs |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if ws else "")]
    for name, s in p["strategies"].items():
        if s.get("phase1") is None:  # the joint loop: one region
            cells = [gib(s["peak"]), gib(s["base"]), f"(step {gib(s['step'])})", "-", "-", "-",
                     "-"]
        else:
            cells = [gib(s["peak"]), gib(s["base"]), gib(s["phase1"]), gib(s["read"]),
                     gib(s["energy"]), gib(s["overlapped"]), gib(s["graphs"])]
        if ws:
            cells.insert(1, gib(s["peak"] + workspace_bytes(p)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if ws:
        m = ws["modes"]
        cap = "sm_{}{}".format(*ws["capability"])
        lines += ["", f"Library workspaces ({cap}, {ws['source']}; torch allocates them at the "
                  "first matmul per cuBLAS handle and stream and keeps them: on top of every "
                  f"figure above; {unit}):", "",
                  "| line | sequential | overlapped | CUDA graphs | rule |",
                  "|---|---|---|---|---|",
                  f"| streams that run matmuls | {m['sequential']['streams']} | "
                  f"{m['overlapped']['streams']} | {m['graphs']['streams']} | current; + the "
                  "overlap's side stream; + the graphs' capture stream |"]
        for line, each, rule in (
                ("cuBLAS workspace", ws["cublas"], f"{ws['cublas'] / 2**20:g} MiB each "
                 f"({ws['cublas_rule']}) x 2 handles (caller, autograd's device thread) x "
                 "streams"),
                ("cuBLASLt workspace", ws["cublaslt"], f"{ws['cublaslt_rule']}" + (
                    f": {ws['cublaslt'] / 2**20:g} MiB x 1 handle x streams"
                    if ws["cublaslt"] else ""))):
            lines.append(f"| {line} | " + " | ".join(gib(m[k][line]) for k in
                                                      ("sequential", "overlapped", "graphs"))
                         + f" | {rule} |")
    tp = p["strategies"].get("two_phase")
    if tp is not None:
        lines += ["", "What changes the two_phase peak:", "",
                  "| change | peak | note |", "|---|---|---|",
                  f"| none (two_phase, sequential) | {gib(tp['peak'])} | |",
                  f"| strategy.phase2_every = k | {gib(tp['peak'])} | a peak is a maximum: "
                  "phase 2 still runs every k-th step |"]
        ck = p.get("checkpointing")
        if ck is not None:
            lines.append(f"| activation checkpointing (decoder layers, phase 1) | "
                         f"{gib(ck['peak'])} | phase 1 {gib(tp['phase1'])} -> "
                         f"{gib(ck['phase1'])} (measured) |")
        f = p.get("fsdp")
        if f is not None:
            lines.append(f"| FSDP over {f['world']} GPUs (dist.fsdp) | {gib(f['peak'])} | "
                         f"-{gib(f['saved'])} sharded, +{gib(f['gathered'])} two layers "
                         "gathered (estimate) |")
        def plus(mode):
            return (f"; workspaces {gib(ws['modes'][mode]['total'])} on top "
                    f"({ws['modes'][mode]['streams']} streams)" if ws else "")
        lines.append(f"| overlap (run.overlap, CUDA) | {gib(tp['overlapped'])} | phase 2(k) "
                     f"beside phase 1(k+1): both transients (bound){plus('overlapped')} |")
        lines.append(f"| CUDA graphs (run.cuda_graphs) | {gib(tp['graphs'])} | each part's "
                     f"pool kept (bound, reserved){plus('graphs')} |")
    return "\n".join(lines) + "\n"


__all__ = ["plan", "report", "workspace_bytes", "CASES", "SIZES", "STRATEGIES", "LiveBytes"]
