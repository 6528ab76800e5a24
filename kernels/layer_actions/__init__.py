"""All-layer action-head inference for the negatives: one batched pass through OFT's MLPResNet
head for every selected layer, sample and chunk step, rows gathered straight from the layers.
reference.py -> fused.py -> launch.py -> op.py; configs.py holds the shipped configs."""
from .configs import resource_configs
from .op import GEMMS, layer_actions_op, layer_actions_triton
from .reference import layer_actions_reference

__all__ = ["layer_actions_triton", "layer_actions_op", "layer_actions_reference",
           "resource_configs", "GEMMS"]
