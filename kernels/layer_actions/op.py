"""The all-layer action-head pass as a ``torch.library`` custom op (``energy_train::layer_actions``,
inference only, with a registered fake): a user's ``torch.compile(fullgraph=True)`` traces
``layer_actions_triton`` without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._utils import DTYPES, check_tensor, resolve_precision
from ..weights import ActionHeadWeights, check_weights
from .launch import layer_actions_launch, normed_rows

GEMMS = ("triton", "cublas")


@torch.library.custom_op("energy_train::layer_actions", mutates_args=())
def layer_actions_op(states: list[torch.Tensor], action_index: Optional[torch.Tensor],
                     params: list[torch.Tensor], eps: list[float], activation: str,
                     input_precision: str, H: int, Da: int, gemm: str) -> torch.Tensor:
    """states: L' tensors (B, T, D) gathered by action_index (B, H*Da) (None: T == H*Da, rows
    in chunk order); params as ``MLPResNetWeights.flat()`` -> (L', B, H, Da) in fc1.weight's
    dtype. The layers are read in place when they are one strided stack (launch.layer_stack:
    data pointers, so inside the op, on real tensors)."""
    return layer_actions_launch(states, action_index, params, eps, activation, input_precision,
                                H, Da, gemm)


@layer_actions_op.register_fake
def _layer_actions_fake(states, action_index, params, eps, activation, input_precision, H, Da,
                        gemm):
    return states[0].new_empty((len(states), states[0].shape[0], H, Da), dtype=params[2].dtype)


@torch.no_grad()
def layer_actions_triton(states, action_index, head: ActionHeadWeights, final_norm=None,
                         norm_mask=None, input_precision=None,
                         gemm: str | None = None) -> torch.Tensor:
    """states: L' tensors (B, T, D) (the selected layers); action_index (B, H*Da) integer or
    None (T == H*Da, rows already gathered); ``final_norm`` (a callable, "logit lens") applied
    eagerly to the gathered action rows of the layers where ``norm_mask`` is True. -> (L', B,
    H, Da) in the head's dtype. An index outside [0, T) reads a row of zeros (never memory
    outside its own layer row), as ``layer_actions_reference`` does. ``gemm``: "triton" (the
    persistent TMA GEMM) or "cublas" (torch.addmm) for the head's large GEMMs; default
    "cublas" on CUDA (H200, commit 683d510, bench/results/layer_actions-h200.md: 1.140 against
    1.25 ms at the production shape), "triton" under the interpreter."""
    check_weights("head", head, ActionHeadWeights)
    H, Da, mlp = head.num_actions_chunk, head.action_dim, head.mlp
    wdtype = mlp.fc1.weight.dtype
    if wdtype not in DTYPES:
        raise TypeError(f"head: expected fp16/bf16/fp32 weights for the Triton path, got {wdtype}"
                        " (use backend='eager')")
    if gemm is None:
        gemm = "cublas" if states[0].device.type == "cuda" else "triton"
    if gemm not in GEMMS:
        raise ValueError(f"gemm: expected one of {GEMMS}, got {gemm!r}")
    Lp = len(states)
    B, D = states[0].shape[0], mlp.fc1.weight.shape[1] // Da
    norm_mask = list(norm_mask) if norm_mask is not None else [False] * Lp
    if len(norm_mask) != Lp:
        raise ValueError(f"norm_mask: expected {Lp} entries, got {len(norm_mask)}")
    if any(norm_mask) and final_norm is None:
        raise ValueError("norm_mask: True entries need final_norm")
    for i, s in enumerate(states):
        check_tensor(f"states[{i}]", s, ndim=3, shape={0: B, 2: D}, floating=True)
    if action_index is not None:
        check_tensor("action_index", action_index, ndim=2, shape={0: B, 1: H * Da}, integer=True)
    if any(norm_mask):
        states, action_index = [normed_rows(states, action_index, norm_mask, final_norm,
                                            wdtype)], None
        states = list(states[0].unbind(0))
    params = [p.contiguous() for p in mlp.flat()]
    return layer_actions_op(list(states), action_index, params, mlp.eps(), mlp.activation,
                            resolve_precision(input_precision, wdtype), H, Da, gemm)
