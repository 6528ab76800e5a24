"""``ln_linear``: ``y = act(LN(x) @ W^T + b) [+ residual]``, a LayerNorm-prologue GEMM with a
bias / activation / residual epilogue, forward and backward; and the MLPResNet built on it.
reference.py -> fused.py -> launch.py -> op.py; configs.py holds the shipped tile configs."""
from .configs import bwd_config, gemm_config, stats_config
from .launch import ln_linear, ln_linear_backward, ln_stats
from .op import ln_linear_autograd, ln_linear_bwd_op, ln_linear_fwd_op, mlp_resnet
from .reference import ln_linear_reference, mlp_resnet_reference

__all__ = ["ln_linear", "ln_stats", "ln_linear_backward", "ln_linear_autograd",
           "ln_linear_fwd_op", "ln_linear_bwd_op", "mlp_resnet", "ln_linear_reference",
           "mlp_resnet_reference", "gemm_config", "stats_config", "bwd_config"]
