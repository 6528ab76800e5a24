"""``energy-train train --policy oft-standin``: its ``[policy]`` options and its factory.

This module imports no transformers (the config reads a policy's options class while it
parses); the factory imports the stand-in (energy_train/integrations/openvla_oft/standin/)
when it runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ...checks import check_multiple
from ...knobs import knob


@dataclass
class StandinOptions:
    """The [policy] section of the OFT stand-in: its sizes, its data, LoRA, dtypes."""
    episodes: int = knob(96, ge=1)          # procedural training episodes
    episode_len: int = knob(16, ge=1)       # steps per episode (samples = episodes x episode_len)
    probe_size: int = knob(16, ge=1)        # held-out episodes (one sample each)
    num_objects: int = knob(3, ge=1, le=6)
    image_size: int = knob(16, ge=1)
    patch_size: int = knob(4, ge=1)
    num_images: int = knob(2, ge=1, le=2)   # the scene (+ a gripper-centred "wrist" view)
    use_proprio: bool = knob(True)          # a proprio row after the patches (OFT's projector)
    chunk: int = knob(8, ge=1)              # H (NUM_ACTIONS_CHUNK); Da = 7
    vision_dim: int = knob(32, ge=8)        # featurizer width (the fused one: 3/4 of it)
    vision_blocks: int = knob(3, ge=2)      # the last one is unused, as in OFT
    llm_dim: int = knob(64, ge=8)
    llm_layers: int = knob(2, ge=1)
    llm_heads: int = knob(4, ge=1)
    lora: bool = knob(True)                 # OFT's LoRA (all-linear, dropout 0) on a frozen base
    lora_rank: int = knob(16, ge=1)
    lora_alpha: int = knob(0, ge=0)         # 0 = min(lora_rank, 16), as OFT sets it
    weights: str = knob("fp32", choices=("fp32", "bf16"))  # bf16: VLA + head as OFT holds them
    context: str = knob("fork", choices=("fork", "prompt"))
    save_oft: bool = knob(True)             # OFT-layout files at <run>/oft/step_N/ per checkpoint

    def validate(self, cfg) -> None:
        check_multiple("policy.image_size", self.image_size, "policy.patch_size", self.patch_size)
        check_multiple("policy.llm_dim", self.llm_dim, "policy.llm_heads", self.llm_heads)
        if self.vision_dim % 8:
            raise ValueError(f"policy.vision_dim: expected a multiple of 8 (two heads per "
                             f"featurizer), got {self.vision_dim}")
        need = cfg.run.batch_size * cfg.run.grad_accum
        if need > self.episodes * self.episode_len:
            raise ValueError(f"policy.episodes: expected episodes x episode_len >= "
                             f"run.batch_size * run.grad_accum = {need}, got "
                             f"{self.episodes} x {self.episode_len}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.dist.find_unused_parameters:
            raise ValueError("dist.find_unused_parameters: expected true for the OFT stand-in "
                             "under torchrun (its last vision block gets no gradient, as "
                             "OFT's), got false")


def build_standin(cfg, device):
    """The factory of ``--policy oft-standin`` (see standin.build)."""
    from .standin import build
    return build(cfg, device)


build_standin.options = StandinOptions
