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
