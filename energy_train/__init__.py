"""energy-train: Triton kernels and a lean two-phase trainer for energy verifiers of robot
action chunks, trained beside an OpenVLA-OFT policy."""
from . import losses, models, ops
from .losses import (EnergyLoss, correct_actions, explicit_infonce, margin_ranking,
                     ranking_accuracy, structured_negatives, swap_infonce)
from .models import EnergyModel, L1RegressionActionHead, MLPResNet, MLPResNetBlock
from .ops import build_action_index, energy_scores, layer_actions
from .policy import BatchLayout, Policy


def train(cfg=None, *, policy=None, energy=None, data=None, probe=None, out=None, **kwargs):
    """Train an energy model beside a policy with the configured strategy (two-phase by
    default) -> :class:`energy_train.trainer.RunResult`. ``cfg``: a TrainConfig (default: the
    defaults); see :func:`energy_train.trainer.train` for the rest."""
    from .config import default_config
    from .trainer import train as _train
    return _train(cfg if cfg is not None else default_config(), out, policy=policy, energy=energy,
                  data=data, probe=probe, **kwargs)


__version__ = "0.1.0"
__all__ = [
    "models", "ops", "losses", "EnergyModel", "L1RegressionActionHead", "MLPResNet",
    "MLPResNetBlock", "build_action_index", "layer_actions", "energy_scores", "swap_infonce",
    "explicit_infonce", "margin_ranking", "structured_negatives", "correct_actions",
    "ranking_accuracy", "EnergyLoss", "Policy", "BatchLayout", "train",
]
