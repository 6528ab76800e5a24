"""The layer stack: chains of LN-linear layers ``y = act(LN(x) @ W^T + b) [+ x]`` (every
MLPResNet of the energy model; any MLPResNet through ``mlp_resnet_stack``), forward and
backward, driven by a table. reference.py -> fused.py -> launch.py -> op.py; configs.py holds
the shipped tile configs."""
from .configs import stack_config, stack_resources
from .launch import (EXTERNAL, NONE, X_IN, StackLayer, StackPlan, constants, mlp_layers,
                     mlp_tensors, new_plan, stack_backward, stack_backward_tiled, stack_forward,
                     stack_forward_tiled, stack_weight_grads)
from .op import mlp_plan, mlp_resnet_stack, mlp_stack_bwd, mlp_stack_fwd
from .reference import ln_linear_reference, mlp_resnet_reference

__all__ = ["StackLayer", "StackPlan", "new_plan", "mlp_layers", "mlp_tensors", "constants",
           "stack_forward", "stack_forward_tiled", "stack_backward", "stack_backward_tiled",
           "stack_weight_grads",
           "EXTERNAL", "NONE", "X_IN", "mlp_plan", "mlp_resnet_stack", "mlp_stack_fwd",
           "mlp_stack_bwd", "mlp_resnet_reference", "ln_linear_reference", "stack_config",
           "stack_resources"]
