"""Triton kernels, installed as ``energy_train.kernels`` (never as a top-level ``kernels``).

One sub-package per fused op: ``__init__`` (launchers and the autograd wrapper),
``reference.py`` (the eager oracle), ``fused.py`` (the ``@triton.jit`` kernels).
Reach them through :mod:`energy_train.ops`, which dispatches.
"""
