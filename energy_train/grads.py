"""Gradient norms and clipping on the device (no host sync), plain or FSDP-sharded."""
from __future__ import annotations

import torch
import torch.distributed as dist


def grad_norm(params) -> torch.Tensor | None:
    """The global L2 norm of the parameters' grads (a device tensor; None without grads)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def clip_grad_norm(params, max_norm: float) -> torch.Tensor | None:
    """Clip to max_norm (> 0) and return the norm, or just the norm: no host sync (no
    non-finite check), foreach kernels on CUDA."""
    if max_norm <= 0:
        return grad_norm(params)
    params = list(params)
    if not any(p.grad is not None for p in params):
        return None
    foreach = True if any(p.is_cuda for p in params) else None
    return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False,
                                          foreach=foreach)


def clip_grad_norm_sharded(params, max_norm: float) -> torch.Tensor | None:
    """The global grad norm of mixed FSDP-sharded (DTensor) and replicated grads (the shards of
    one tensor live on different ranks: one all_reduce), clipped in place when max_norm > 0."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    dev = grads[0].device
    sq_sharded = sum((g.float().square().sum() for g in sharded), torch.zeros((), device=dev))
    dist.all_reduce(sq_sharded)
    sq_plain = sum((g.float().square().sum() for g in plain), torch.zeros((), device=dev))
    norm = (sq_sharded + sq_plain).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in [*sharded, *plain]:
            g.mul_(coef.to(g.dtype))
    return norm
