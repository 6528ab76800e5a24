"""The one walker from the model modules to the tensors the ops take
(:mod:`energy_train.kernels.weights`). The only place outside a module's own file that reads its
attribute paths: renaming a submodule fails here, loudly, once.
"""
from __future__ import annotations

from ..kernels.weights import ActionHeadWeights, EnergyWeights, LNLinear, MLPResNetWeights


def _ln_linear(ln, fc) -> LNLinear:
    return LNLinear(fc.weight, fc.bias, ln.weight, ln.bias, float(ln.eps))


def mlp_resnet_weights(m) -> MLPResNetWeights:
    """An :class:`~energy_train.models.MLPResNet` (OFT's submodule names) -> its tensors."""
    blocks = tuple(_ln_linear(blk.ffn[0], blk.ffn[1]) for blk in m.mlp_resnet_blocks)
    return MLPResNetWeights(_ln_linear(m.layer_norm1, m.fc1), blocks,
                            _ln_linear(m.layer_norm2, m.fc2), m.activation)


def action_head_weights(head) -> ActionHeadWeights:
    """An :class:`~energy_train.models.L1RegressionActionHead` -> its tensors."""
    return ActionHeadWeights(mlp_resnet_weights(head.model), head.num_actions_chunk,
                             head.action_dim)


def energy_weights(model) -> EnergyWeights:
    """An :class:`~energy_train.models.EnergyModel` (the energy fork's names) -> its tensors."""
    return EnergyWeights(
        state=mlp_resnet_weights(model.state_linear),
        action=mlp_resnet_weights(model.action_linear),
        head=mlp_resnet_weights(model.prediction_head),
        in_proj_weight=model.cross.in_proj_weight, in_proj_bias=model.cross.in_proj_bias,
        out_proj_weight=model.cross.out_proj.weight, out_proj_bias=model.cross.out_proj.bias,
        pe=model.pe_layer.P, heads=model.heads, output=model.output,
        gate_a=model.gate_a if getattr(model, "action_residual", False) else None)
