"""CPU proxies of GPU speed that need no GPU: per call of an op, the Triton launches (per
kernel), the aten ops that launch a kernel, the aten ops that only touch metadata, and the
custom-op dispatches - counted under TRITON_INTERPRET=1 (``count``); and the host time of a
call with every Triton kernel stubbed out (``host_ms``): what the Python and torch layers cost
before any kernel runs.

Deterministic counts go in tests (tests/test_launch_counts.py); times go in bench/
(bench/bench_host.py).
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that launch no kernel (views, allocation, metadata)
NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "t", "transpose",
             "permute", "unsqueeze", "squeeze", "detach", "alias", "as_strided", "empty",
             "empty_strided", "new_empty", "empty_like", "lift_fresh", "unbind", "split",
             "split_with_sizes", "chunk", "narrow", "_reshape_alias", "view_as", "expand_as",
             "new_empty_strided", "is_same_size", "unsafe_view", "set_"}


def _custom_ops() -> dict:
    from torch._library.custom_ops import CustomOpDef

    from energy_train.kernels.energy import op as energy_op
    from energy_train.kernels.layer_actions import op as la_op
    from energy_train.kernels.mlp import op as mlp_op
    return {v._qualname: v for mod in (mlp_op, energy_op, la_op) for v in vars(mod).values()
            if isinstance(v, CustomOpDef)}


class _Count(TorchDispatchMode):
    """aten ops outside the custom ops' bodies (a custom op is one dispatch: its body, which
    launches the Triton kernels, is counted by the launch hook)."""

    def __init__(self, custom: dict):
        super().__init__()
        self.custom, self.ops, self.dispatches = custom, Counter(), Counter()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if self.inside:
            return func(*args, **kwargs)
        if name in self.custom:
            self.dispatches[name] += 1
            self.inside += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.inside -= 1
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _triton_hook(stub: bool):
    """Count (and with ``stub`` skip) every Triton kernel launch under the interpreter."""
    import triton.runtime.interpreter as interp
    calls = Counter()
    orig = interp.InterpretedFunction.run

    def run(self, *args, **kwargs):
        calls[self.fn.__name__] += 1
        return None if stub else orig(self, *args, **kwargs)
    interp.InterpretedFunction.run = run
    try:
        yield calls
    finally:
        interp.InterpretedFunction.run = orig


def count(fn) -> dict:
    """{"triton": {kernel: launches}, "triton_launches", "aten_kernels", "aten": {op: n},
    "aten_meta", "custom_ops": {op: dispatches}} for one call of ``fn`` (after a warm-up call);
    needs TRITON_INTERPRET=1 (CPU tensors)."""
    fn()
    mode = _Count(_custom_ops())
    with _triton_hook(stub=False) as calls, mode:
        fn()
    kern = {k: v for k, v in mode.ops.items() if k not in NO_KERNEL}
    return dict(triton=dict(calls), triton_launches=sum(calls.values()),
                aten=dict(sorted(kern.items(), key=lambda kv: -kv[1])),
                aten_kernels=sum(kern.values()),
                aten_meta=sum(v for k, v in mode.ops.items() if k in NO_KERNEL),
                custom_ops=dict(mode.dispatches))


def host_ms(fns: dict, rounds: int = 7, reps: int = 5) -> dict:
    """{name: best ms per call over ``rounds`` interleaved rounds of ``reps`` calls} with every
    Triton kernel stubbed (TRITON_INTERPRET=1): the host side alone."""
    best = {k: float("inf") for k in fns}
    with _triton_hook(stub=True):
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t0) / reps * 1e3)
    return best


# the production call structure at reduced sizes (every kernel path the production shape takes)
def energy_swap_step(backend: str = "triton", dtype=torch.float32, B: int = 8, S: int = 60,
                     D: int = 64, chains: str = "chain"):
    """One swap-InfoNCE forward + backward of the energy model (grads of every parameter, the
    context detached) at B 8, S 60, D 64, hidden 64/4, H 8, Da 7 (hidden wider than the
    interpreter's tiles, as 512 is than the GPU's); chains: the triton path's pool and head
    ("chain" or "tiled", kernels/energy/launch.py CHAINS)."""
    from energy_train import losses
    from energy_train.kernels.energy import energy_chains
    from energy_train.models import EnergyModel
    torch.manual_seed(0)
    model = EnergyModel(D, 7, hidden=64, heads=4).to(dtype)
    ctx = torch.randn(B, S, D)
    pad = torch.rand(B, S) < 0.1
    expert = torch.randn(B, 8, 7).to(dtype)

    def step():
        for p in model.parameters():
            p.grad = None
        with energy_chains(chains):
            losses.swap_infonce(model, ctx, pad, expert, backend=backend).loss.backward()
    return step


def layer_actions_call(backend: str = "triton", captured: bool = True, layers: int = 33):
    """One all-layer action-head pass: ``layers`` layers, B 2, H 8, Da 7, D 64, hidden 64; the
    layers as views of one capture buffer (``captured``, what the trainer passes) or separate
    tensors (Hugging Face's output_hidden_states)."""
    from energy_train import L1RegressionActionHead, layer_actions
    torch.manual_seed(0)
    head = L1RegressionActionHead(64, 64, 7, 8).eval()
    if captured:
        hs = list(torch.randn(layers, 2, 56, 64).unbind(0))
        idx = None
    else:
        hs = [torch.randn(2, 64, 64) for _ in range(layers)]
        idx = (torch.arange(56)[None] + torch.tensor([[0], [3]])).long()

    def call():
        return layer_actions(hs, idx, head, include_embeddings=True, backend=backend)
    return call
