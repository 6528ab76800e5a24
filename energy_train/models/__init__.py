"""Models: OFT's action head, the energy fork's energy model (state_dict-compatible)."""
from .action_head import L1RegressionActionHead, load_oft_state_dict, strip_module_prefix
from .energy import EnergyModel, PositionalEncoding, output_transform
from .mlp import MLPResNet, MLPResNetBlock

__all__ = ["MLPResNetBlock", "MLPResNet", "L1RegressionActionHead", "EnergyModel",
           "PositionalEncoding", "output_transform", "load_oft_state_dict", "strip_module_prefix"]
from .tiny_vla import ActionRowCapture, CapturedStates, Layout, TinyVLA, TinyVLAOutput  # noqa: E402

__all__ += ["TinyVLA", "TinyVLAOutput", "ActionRowCapture", "CapturedStates", "Layout"]
