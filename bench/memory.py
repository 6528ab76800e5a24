"""What an autograd graph keeps alive between forward and backward, measured on any device.

``saved_bytes(fn, exclude=())`` runs ``fn()`` under ``torch.autograd.graph.saved_tensors_hooks``
and returns the bytes of the distinct storages the graph saved for its backward (a storage saved
by several nodes, or several views of one storage, counts once), leaving out the storages of
``exclude`` (the parameters and inputs the caller holds anyway). This is the CPU stand-in for
the device-memory figure: on a GPU, ``torch.cuda.max_memory_allocated`` gives the peak itself.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def _key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> dict:
    """-> {"bytes": total, "tensors": number of saved tensors, "storages": distinct storages,
    "result": fn()} for the storages saved by the graph ``fn`` builds, minus ``exclude``'s."""
    skip = {_key(t)[0] for t in exclude}
    seen: dict = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        k, n = _key(t)
        if k not in skip:
            seen[k] = n
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return dict(bytes=sum(seen.values()), tensors=count, storages=len(seen), result=result)


def peak_bytes(fn: Callable[[], object]) -> dict:
    """-> {"peak": the most bytes of torch tensors alive at once while ``fn()`` runs, above
    what was alive when it started, "end": the bytes still alive after it (e.g. .grad)}.
    CPU stand-in for ``torch.cuda.max_memory_allocated`` (the tensors a Triton kernel writes
    under the interpreter are torch allocations too; the interpreter's own numpy copies are
    not counted). From the profiler's memory timeline (torch.profiler, a private module)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    # no with_stack: the Python tracer would record every call the Triton interpreter makes
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return dict(peak=peak, end=live)
