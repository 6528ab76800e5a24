"""Triton kernels, installed as ``energy_train.kernels`` (never as a top-level ``kernels``).

One sub-package per op, every one laid out the same way, read top to bottom:

    reference.py   the eager oracle: readable maths on tensors, float64-friendly, sharing no
                   helper with the fused path
    fused.py       the @triton.jit kernels
    launch.py      the launchers: validate, allocate, pick the config, launch
    op.py          the torch.library custom ops (fake + autograd) and the public functions
    configs.py     the shipped tile configs, read by the launchers and the sm_90 resource report
    __init__.py    re-exports only

``mlp`` (``ln_linear``: the LayerNorm-prologue GEMM and the MLPResNet built on it),
``layer_actions`` (OFT's head on every layer's action rows in one pass) and ``energy`` (energy
scoring of many candidates against a context encoded once). The ops take tensors: the named
tuples of :mod:`.weights`. Plumbing shared by all (interpreter flag, precision default,
poisoning, dtype and activation tables, argument checks) lives once in ``_utils.py``.
Nothing here imports ``energy_train``; ``energy_train.ops`` dispatches between each op's
reference and its fused path.
"""
