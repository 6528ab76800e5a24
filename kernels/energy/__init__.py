"""Energy scoring of many candidates against a context encoded once, forward and backward.
reference.py -> fused.py (the attention kernels) -> launch.py (the plan: the layer stack of
kernels/mlp around the attention) -> op.py; configs.py holds the shipped configs."""
from .configs import attn_config, resource_configs
from .op import energy_bwd, energy_chains, energy_fwd, energy_scores_triton, is_shared_pool
from .reference import (OUTPUTS, energy_attention_reference, energy_scores_reference,
                        output_transform)

__all__ = ["energy_scores_triton", "energy_chains", "energy_fwd", "energy_bwd", "is_shared_pool",
           "energy_scores_reference", "energy_attention_reference", "output_transform",
           "OUTPUTS", "attn_config", "resource_configs"]
