"""Triton kernels, installed as ``energy_train.kernels`` (never as a top-level ``kernels``).

The op folders live at the top of the repository, ``kernels/<op>/``, mapped to
``energy_train.kernels.<op>`` by pyproject.toml; ``kernels/`` has no ``__init__.py``, so the
repository root on ``sys.path`` can never shadow Hugging Face's ``kernels`` distribution (which
transformers imports). This package (``energy_train/kernels/``) binds them: the shared plumbing
(``_utils``) and the weight tuples (``weights``).

One sub-package per op, every one laid out the same way, read top to bottom:

    reference.py   the eager oracle: readable maths on tensors, float64-friendly, sharing no
                   helper with the fused path
    fused.py       the @triton.jit kernels
    launch.py      the launchers: validate, allocate, pick the config, launch
    op.py          the torch.library custom ops (fake + autograd) and the public functions
    configs.py     the shipped tile configs, read by the launchers and the sm_90 resource report
    __init__.py    re-exports only

``mlp`` (the layer stack: chains of LN-linear layers driven by a table, forward and backward
in a handful of launches; every MLPResNet of the energy model runs through it),
``layer_actions`` (OFT's head on every layer's action rows in one pass: gather + LayerNorm rows
and a persistent TMA GEMM) and ``energy`` (energy scoring of many candidates against a context
encoded once: the attention kernels and the plan that puts the layer stack around them). The ops take tensors: the named
tuples of :mod:`.weights`. Plumbing shared by all (interpreter flag, precision default,
poisoning, dtype and activation tables, argument checks) lives once in ``_utils.py``.
Nothing here imports ``energy_train``; ``energy_train.ops`` dispatches between each op's
reference and its fused path.
"""

#: the op sub-packages, each kernels/<op>/ (mapped: pkgutil does not list them)
OPS = ("mlp", "layer_actions", "energy")
