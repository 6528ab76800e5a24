"""Energy scoring of many candidate action chunks against a context encoded once: the fused
masked cross-attention, the context encoder recomputed in the backward, the whole scoring.
reference.py -> fused.py -> launch.py -> op.py; configs.py holds the shipped configs."""
from .configs import attn_config, resource_configs
from .op import (context_kv, context_kv_bwd, context_kv_fwd, energy_attention, energy_attention_bwd,
                 energy_attention_fwd, energy_scores_triton, is_shared_pool)
from .reference import (energy_attention_reference, energy_scores_reference, output_transform)

__all__ = ["energy_scores_triton", "energy_attention", "context_kv", "is_shared_pool",
           "energy_attention_fwd", "energy_attention_bwd", "context_kv_fwd", "context_kv_bwd",
           "energy_scores_reference", "energy_attention_reference", "output_transform",
           "attn_config", "resource_configs"]
