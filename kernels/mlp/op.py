"""An MLPResNet through the layer stack as two ``torch.library`` custom ops with registered
fakes and autograd (``energy_train::mlp_stack_fwd`` / ``mlp_stack_bwd``): one forward launch
and four backward launches (the dx chain, every dW, the dgamma/dbeta sums) whatever the number
of blocks; ``torch.compile(fullgraph=True)`` traces ``mlp_resnet_stack`` as one node each way.
Why custom_op + register_fake (not triton_op): torch.compile traces a user's code with fake
tensors; a custom op is then one node whose output metadata comes from the registered fake,
so the kernels run only on real tensors - on CUDA, and on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .._utils import empty
from ..weights import MLPResNetWeights
from .launch import (EXTERNAL, NONE, X_IN, constants, mlp_layers, mlp_tensors, new_plan,
                     stack_backward, stack_forward, stack_weight_grads)


@lru_cache(maxsize=64)
def mlp_plan(w_shapes: tuple, M: int, eps: tuple, activation: str, dtype: torch.dtype,
             needs_dx: bool):
    """(plan, first, last, n_params) of one MLPResNet on M rows; the flat parameters are
    ``mlp_tensors`` then ``constants`` (the forward layout does not depend on ``needs_dx``;
    only the first layer's backward wiring does)."""
    layers, n = mlp_layers(w_shapes, 0, eps, activation)
    nc = max(max(s) for s in w_shapes)
    plan = new_plan(dtype, ones=n, zeros=n + nc)
    first, last, _ = plan.add_chain(M, layers, X_IN, EXTERNAL, EXTERNAL if needs_dx else NONE,
                                    out=EXTERNAL)
    return plan, first, last, n


def _shapes(w_shapes: list) -> tuple:
    return tuple(zip(w_shapes[0::2], w_shapes[1::2]))


@torch.library.custom_op("energy_train::mlp_stack_fwd", mutates_args=())
def mlp_stack_fwd(x: torch.Tensor, flat: torch.Tensor, w_shapes: list[int], eps: list[float],
                  activation: str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> y (M, N) in flat's dtype, ws (fp32: what the backward reads)."""
    M = x.shape[0]
    plan, first, last, _ = mlp_plan(_shapes(w_shapes), M, tuple(eps), activation, flat.dtype,
                                    False)
    ws = empty((max(plan.ws, 1),), torch.float32, x.device)
    y = empty((M, w_shapes[-2]), flat.dtype, x.device)
    if M:
        stack_forward(plan, flat, ws, first, last, M, X=x, out=y, precision=precision)
    return y, ws


@mlp_stack_fwd.register_fake
def _mlp_stack_fwd_fake(x, flat, w_shapes, eps, activation, precision):
    plan, _, _, _ = mlp_plan(_shapes(w_shapes), x.shape[0], tuple(eps), activation, flat.dtype,
                             False)
    return (x.new_empty((x.shape[0], w_shapes[-2]), dtype=flat.dtype),
            x.new_empty((max(plan.ws, 1),), dtype=torch.float32))


@torch.library.custom_op("energy_train::mlp_stack_bwd", mutates_args=())
def mlp_stack_bwd(dy: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, ws: torch.Tensor,
                  w_shapes: list[int], eps: list[float], activation: str, precision: str,
                  needs_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dflat (flat's layout and dtype; the constants' entries unwritten), dx (M, K) in x's
    dtype (an empty (0,) unless needs_dx)."""
    M = x.shape[0]
    plan, first, last, _ = mlp_plan(_shapes(w_shapes), M, tuple(eps), activation, flat.dtype,
                                    needs_dx)
    wb = empty((max(plan.wb, 1),), torch.float32, x.device)
    dflat = empty(flat.shape, flat.dtype, x.device)
    dx = empty(x.shape, x.dtype, x.device) if needs_dx else x.new_empty((0,))
    if M:
        stack_backward(plan, flat, ws, wb, first, last, M, X=x if needs_dx else None, dy=dy,
                       dx=dx if needs_dx else None, precision=precision)
        stack_weight_grads(plan, flat, ws, wb, dflat, X=x, precision=precision)
    else:
        dflat.zero_()
    return dflat, dx


@mlp_stack_bwd.register_fake
def _mlp_stack_bwd_fake(dy, x, flat, ws, w_shapes, eps, activation, precision, needs_dx):
    return torch.empty_like(flat), (torch.empty_like(x) if needs_dx else x.new_empty((0,)))


def _mlp_stack_setup(ctx, inputs, output):
    x, flat, w_shapes, eps, activation, precision = inputs
    ctx.save_for_backward(x, flat, output[1])
    ctx.cfg = (w_shapes, eps, activation, precision)


def _mlp_stack_backward(ctx, dy, dws):
    x, flat, ws = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dflat, dx = mlp_stack_bwd(dy.contiguous(), x, flat, ws, *ctx.cfg, needs_dx)
    return (dx if needs_dx else None), dflat, None, None, None, None


mlp_stack_fwd.register_autograd(_mlp_stack_backward, setup_context=_mlp_stack_setup)


def mlp_resnet_stack(x: torch.Tensor, w: MLPResNetWeights,
                     input_precision: str = "ieee") -> torch.Tensor:
    """MLPResNet (..., K) -> (..., N) through the layer stack: one forward launch, four
    backward launches (dx chain, dW of the first layer, every other dW, dgamma);
    differentiable w.r.t. x and every parameter (the parameters are concatenated into one
    flat tensor: one copy per call)."""
    K = x.shape[-1]
    shapes = [d for lin in w.layers for d in lin.weight.shape]
    nc = max(shapes)
    flat = torch.cat([t.reshape(-1) for t in mlp_tensors(w)]
                     + [constants(nc, w.fc1.weight.dtype, x.device)])
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y, _ = mlp_stack_fwd(x2, flat, shapes, w.eps(), w.activation, input_precision)
    return y.reshape(*x.shape[:-1], y.shape[-1])
