"""The package's models: OFT's action head and the energy fork's energy model (state_dict-
compatible), their MLPResNet, and the walker to the tensors the ops take. A policy's own
backbone lives with its policy (``energy_train/policies/<name>/``)."""
from .action_head import L1RegressionActionHead, load_oft_state_dict, strip_module_prefix
from .energy import (FORK_VERSIONS, EnergyModel, PositionalEncoding, load_fork_energy,
                     output_transform)
from .mlp import MLPResNet, MLPResNetBlock
from .weights import action_head_weights, energy_weights, mlp_resnet_weights

__all__ = ["MLPResNetBlock", "MLPResNet", "L1RegressionActionHead", "EnergyModel",
           "load_fork_energy", "FORK_VERSIONS",
           "PositionalEncoding", "output_transform", "load_oft_state_dict", "strip_module_prefix",
           "mlp_resnet_weights", "action_head_weights", "energy_weights"]
