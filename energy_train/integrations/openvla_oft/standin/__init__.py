"""A tiny random-weight stand-in for OpenVLA-OFT, with OFT's interface and sequence layout,
that runs the integration on the CPU without downloading anything.

- :class:`StandinVLA`: OFT's ``OpenVLAForActionPrediction`` in miniature, module names kept
  (``vision_backbone.featurizer`` / ``.fused_featurizer``, ``projector.fc1..fc3``,
  ``language_model`` = a Hugging Face ``LlamaForCausalLM`` with a tiny config). Its training
  forward takes OFT's keyword arguments and runs OFT's steps in order: action-token
  embeddings multiplied by zero (the mask from ``labels``), the patches of every image
  (2 x 3 channels each: the two featurizers) projected and, after them, one projected
  proprio row, all inserted after BOS; labels extended with IGNORE_INDEX; the LLM called with
  ``inputs_embeds`` and a float 4-D mask that hides only pad keys (additive 0 / finfo.min;
  1 / 0 on transformers < 4.41, OFT's 4.40.1, which reads the other convention) - the
  bidirectional attention OFT gets from its patched transformers. Each featurizer returns
  its second-to-last block (as OFT's), so the last block never gets a gradient (DDP needs
  ``find_unused_parameters``). :meth:`StandinVLA.predict_action` is OFT's test-time path.
- :class:`ProprioProjector` (``fc1, act_fn1, fc2``) and the L1 head
  (``energy_train.models.L1RegressionActionHead``): OFT's names.
- :class:`PaddedCollatorForActionPrediction`: OFT's collator, same output (right padding with
  the pad id, labels padded with IGNORE_INDEX, proprio squeezed by ``np.squeeze``).
- :class:`StandinEpisodes`: procedural episodes of the embedded task (energy_train/policies/tiny/task.py):
  each episode is one scene rolled forward by its scripted expert; a sample at step t has the
  scene image and a gripper-centred "wrist" image, the gripper state as proprio, and the
  next H expert actions as its chunk, tokenised like OFT's RLDS transform ("In: What action
  should the robot take to {task}?\\nOut:", the empty token, H*Da action tokens, ``</s>``).
- :class:`StandinData`: a step-indexed source of collated batches (exact resume).

Files: ``vla.py`` (the VLA, its projector, the token ids), ``data.py`` (collator, episodes,
the step-indexed source), this module (:func:`make_standin`, the factory :func:`build`).

Token ids follow OpenVLA's scheme scaled down: a base vocabulary of :data:`VOCAB_SIZE` ids
whose last :data:`N_BINS` are the action bins (ids > :data:`ACTION_TOKEN_BEGIN_IDX`), the pad
id :data:`PAD_TOKEN_ID` = VOCAB_SIZE (also above the begin id, as 32000 is in OpenVLA).
"""
from __future__ import annotations

import torch

from ....models import L1RegressionActionHead
from ....policies import Setup
from ..checkpoints import apply_lora
from ..policy import OFTPolicy
from .data import (PaddedCollatorForActionPrediction, StandinData, StandinEpisodes, action_tokens,
                   prompt_ids)
from .vla import (ACTION_TOKEN_BEGIN_IDX, EMPTY_TOKEN_ID, N_BINS, PAD_TOKEN_ID, PROPRIO_DIM,
                  STOP_INDEX, VOCAB_SIZE, ProprioProjector, StandinConfig, StandinVLA,
                  bidirectional_mask, get_current_action_mask, get_next_actions_mask)


def make_standin(seed: int = 0, *, image_size: int = 16, patch_size: int = 4,
                 num_images: int = 2, vision_dims=(32, 24), vision_blocks: int = 3,
                 llm_dim: int = 64, llm_layers: int = 2, llm_heads: int = 4, chunk: int = 8,
                 action_dim: int = 7, proprio: bool = True, lora_rank: int = 0,
                 lora_alpha: int = 0, weights: str = "fp32", context: str = "fork",
                 save_oft: bool = True, llm_kv_heads: int = 0, llm_ffn: int = 0) -> OFTPolicy:
    """The stand-in VLA, an L1 head (OFT's sizes: hidden = llm_dim) and a proprio projector,
    initialised from ``seed``, optionally with OFT's LoRA (``lora_rank`` > 0) and with the VLA
    and head in bf16 as OFT holds them (``weights="bf16"``; adapters and the projector stay
    fp32), behind :class:`OFTPolicy`. ``llm_kv_heads`` / ``llm_ffn``: the LLM's key/value heads
    and MLP width (0: half the heads, 2 x llm_dim; Llama-2 7B: 32 and 11008)."""
    torch.manual_seed(seed)
    cfg = StandinConfig(image_size=image_size, patch_size=patch_size, vision_dims=vision_dims,
                        vision_blocks=vision_blocks, num_images_in_input=num_images,
                        llm_dim=llm_dim, llm_layers=llm_layers, llm_heads=llm_heads,
                        llm_kv_heads=llm_kv_heads or max(1, llm_heads // 2), llm_ffn=llm_ffn)
    vla = StandinVLA(cfg, action_dim=action_dim)
    head = L1RegressionActionHead(input_dim=llm_dim, hidden_dim=llm_dim, action_dim=action_dim,
                                  num_actions_chunk=chunk)
    projector = ProprioProjector(llm_dim, PROPRIO_DIM) if proprio else None
    if weights == "bf16":
        vla, head = vla.to(torch.bfloat16), head.to(torch.bfloat16)
    elif weights != "fp32":
        raise ValueError(f"weights: expected 'fp32' or 'bf16', got {weights!r}")
    if lora_rank:
        vla = apply_lora(vla, rank=lora_rank, alpha=lora_alpha or None)
    return OFTPolicy(vla, head, projector, context=context,
                     action_token_begin_idx=ACTION_TOKEN_BEGIN_IDX, pad_token_id=PAD_TOKEN_ID,
                     save_oft=save_oft)


def build(cfg, device: torch.device):
    """``energy-train train --policy oft-standin``: the stand-in policy (options: the [policy]
    section, :class:`~energy_train.integrations.openvla_oft.options.StandinOptions`) and its
    episodes, from run.seed."""
    o = cfg.policy
    policy = make_standin(cfg.run.seed, image_size=o.image_size, patch_size=o.patch_size,
                          num_images=o.num_images, vision_dims=(o.vision_dim, o.vision_dim * 3 // 4),
                          vision_blocks=o.vision_blocks, llm_dim=o.llm_dim,
                          llm_layers=o.llm_layers, llm_heads=o.llm_heads, chunk=o.chunk,
                          proprio=o.use_proprio, lora_rank=o.lora_rank if o.lora else 0,
                          lora_alpha=o.lora_alpha, weights=o.weights, context=o.context,
                          save_oft=o.save_oft)
    for m in policy.modules().values():
        m.to(device)
    kw = dict(chunk=o.chunk, num_objects=o.num_objects, image_size=o.image_size,
              wrist=o.num_images > 1)
    train = StandinEpisodes(o.episodes, o.episode_len, seed=cfg.run.seed, **kw)
    probe = StandinEpisodes(o.probe_size, o.episode_len, seed=cfg.run.seed + 7919, **kw)
    data = StandinData(train, probe, batch_size=cfg.run.batch_size, grad_accum=cfg.run.grad_accum,
                       seed=cfg.run.seed)
    return Setup(policy, data)


__all__ = ["StandinVLA", "StandinConfig", "ProprioProjector", "PaddedCollatorForActionPrediction",
           "StandinEpisodes", "StandinData", "make_standin", "build", "bidirectional_mask",
           "get_current_action_mask", "get_next_actions_mask",
           "action_tokens", "prompt_ids", "VOCAB_SIZE", "N_BINS", "ACTION_TOKEN_BEGIN_IDX",
           "PAD_TOKEN_ID", "EMPTY_TOKEN_ID", "STOP_INDEX", "PROPRIO_DIM"]
