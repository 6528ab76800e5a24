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
- :class:`StandinEpisodes`: procedural episodes of the embedded task (energy_train/data.py):
  each episode is one scene rolled forward by its scripted expert; a sample at step t has the
  scene image and a gripper-centred "wrist" image, the gripper state as proprio, and the
  next H expert actions as its chunk, tokenised like OFT's RLDS transform ("In: What action
  should the robot take to {task}?\\nOut:", the empty token, H*Da action tokens, ``</s>``).
- :class:`StandinData`: a step-indexed source of collated batches (exact resume).

Token ids follow OpenVLA's scheme scaled down: a base vocabulary of :data:`VOCAB_SIZE` ids
whose last :data:`N_BINS` are the action bins (ids > :data:`ACTION_TOKEN_BEGIN_IDX`), the pad
id :data:`PAD_TOKEN_ID` = VOCAB_SIZE (also above the begin id, as 32000 is in OpenVLA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.modeling_outputs import ModelOutput

from ...data import MAX_ROT, MAX_STEP, VOCAB as TASK_VOCAB, generate_scenes
from ...models import L1RegressionActionHead
from .policy import IGNORE_INDEX, OFTPolicy

VOCAB_SIZE = 128                                  # Llama-2: 32000
N_BINS = 64                                       # OpenVLA: 256 action bins
ACTION_TOKEN_BEGIN_IDX = VOCAB_SIZE - (N_BINS + 1)  # OpenVLA: 31743
PAD_TOKEN_ID = VOCAB_SIZE                         # OpenVLA: 32000 (> the begin id)
PAD_TO_MULTIPLE_OF = 8                            # embedding rows: VOCAB_SIZE + 8 (OpenVLA: 32064)
BOS, STOP_INDEX = 1, 2
WORDS = ["<unk>", "<s>", "</s>", "In:", "What", "action", "should", "the", "robot", "take", "to",
         "?", "Out:", "\u2581"] + [w for w in TASK_VOCAB[2:] if w not in ("the", "to")]
EMPTY_TOKEN_ID = WORDS.index("\u2581")            # Llama-2: 29871
PROPRIO_DIM = 8                                   # LIBERO's: x y z, 3 rotation, 2 gripper
DATASET_NAME = "standin_reach"
assert len(WORDS) <= ACTION_TOKEN_BEGIN_IDX


# --------------------------------------------------------------------------------------------
# modules (OFT's names)
# --------------------------------------------------------------------------------------------
class ProprioProjector(nn.Module):
    """OFT's proprio projector: fc1 -> GELU -> fc2, (B, proprio_dim) -> (B, llm_dim)."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.llm_dim, self.proprio_dim = llm_dim, proprio_dim
        self.fc1 = nn.Linear(proprio_dim, llm_dim, bias=True)
        self.fc2 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio: torch.Tensor = None) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """A pre-LN ViT block (timm's names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), _Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.num_patches = (image_size // patch_size) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Featurizer(nn.Module):
    """A tiny ViT that, like OFT's featurizers, returns the output of its second-to-last block:
    (B, 3, R, R) -> (B, (R/p)^2, embed_dim). The last block never runs."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        if depth < 2:
            raise ValueError(f"vision_blocks: expected >= 2 (the last block is unused), got {depth}")
        self.embed_dim = dim
        self.patch_embed = _PatchEmbed(image_size, patch_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        for blk in list(self.blocks)[:-1]:
            x = blk(x)
        return x


class StandinVisionBackbone(nn.Module):
    """OFT's fused vision backbone: per image 6 channels (3 to ``featurizer``, 3 to
    ``fused_featurizer``), features concatenated, images concatenated along the patches."""

    def __init__(self, image_size: int, patch_size: int, dims: tuple[int, int], depth: int,
                 heads: int, num_images_in_input: int = 1):
        super().__init__()
        self.use_fused_vision_backbone = True
        self.num_images_in_input = num_images_in_input
        self.featurizer = Featurizer(image_size, patch_size, dims[0], depth, heads)
        self.fused_featurizer = Featurizer(image_size, patch_size, dims[1], depth, heads)
        self.embed_dim = dims[0] + dims[1]

    def get_num_patches(self) -> int:
        return self.featurizer.patch_embed.num_patches

    def get_num_images_in_input(self) -> int:
        return self.num_images_in_input

    def set_num_images_in_input(self, num_images_in_input: int) -> None:
        self.num_images_in_input = num_images_in_input

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        all_patches = []
        for img in torch.split(pixel_values, [6] * self.num_images_in_input, dim=1):
            img_regular, img_fused = torch.split(img, [3, 3], dim=1)
            all_patches.append(torch.cat([self.featurizer(img_regular),
                                          self.fused_featurizer(img_fused)], dim=2))
        return torch.cat(all_patches, dim=1)


class StandinProjector(nn.Module):
    """OFT's fused projector: fc1 -> GELU -> fc2 -> GELU -> fc3."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim, bias=True)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim, bias=True)
        self.fc3 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, img_patches):
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(img_patches)))))


class StandinConfig(transformers.PretrainedConfig):
    model_type = "openvla_oft_standin"

    def __init__(self, image_size: int = 16, patch_size: int = 4, vision_dims=(32, 24),
                 vision_blocks: int = 3, vision_heads: int = 2, num_images_in_input: int = 2,
                 llm_dim: int = 64, llm_layers: int = 2, llm_heads: int = 4, llm_kv_heads: int = 2,
                 attn_implementation_llm: str = "sdpa", **kwargs):
        self.image_size, self.patch_size = image_size, patch_size
        self.vision_dims, self.vision_blocks = list(vision_dims), vision_blocks
        self.vision_heads, self.num_images_in_input = vision_heads, num_images_in_input
        self.llm_dim, self.llm_layers, self.llm_heads = llm_dim, llm_layers, llm_heads
        self.llm_kv_heads, self.attn_implementation_llm = llm_kv_heads, attn_implementation_llm
        kwargs.setdefault("pad_token_id", PAD_TOKEN_ID)
        super().__init__(**kwargs)

    def text_config(self) -> transformers.LlamaConfig:
        c = transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE + PAD_TO_MULTIPLE_OF, hidden_size=self.llm_dim,
            intermediate_size=2 * self.llm_dim, num_hidden_layers=self.llm_layers,
            num_attention_heads=self.llm_heads, num_key_value_heads=self.llm_kv_heads,
            max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS,
            eos_token_id=STOP_INDEX, use_cache=False, tie_word_embeddings=False)
        c._attn_implementation = self.attn_implementation_llm
        return c


@dataclass
class StandinOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor = None
    hidden_states: tuple | None = None
    projector_features: torch.FloatTensor | None = None


def get_current_action_mask(token_ids, action_dim: int):
    """OFT's: the first Da action tokens (from the first non-IGNORE label on)."""
    cumsum = torch.cumsum(token_ids != IGNORE_INDEX, dim=1)
    return ((1 <= cumsum) & (cumsum <= action_dim)) * (token_ids > ACTION_TOKEN_BEGIN_IDX)


def get_next_actions_mask(token_ids, action_dim: int):
    """OFT's: the action tokens after the first Da."""
    cumsum = torch.cumsum(token_ids != IGNORE_INDEX, dim=1)
    return (cumsum > action_dim) * (token_ids > ACTION_TOKEN_BEGIN_IDX)


def _legacy_4d_mask() -> bool:
    """transformers < 4.41 (OFT's 4.40.1) reads a custom 4-D mask as 1 = attend, 0 = hidden
    and builds the additive one itself (``eq(0.0) * finfo.min``); 4.41 on take the additive
    mask as it is (max 0). Given the other's form, each attends to the pad keys ONLY."""
    from packaging.version import Version
    return Version(transformers.__version__.split("+")[0]) < Version("4.41")


LEGACY_4D_MASK = _legacy_4d_mask()


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) padding mask -> (B, 1, T, T) float mask for the installed transformers, every
    query seeing every real key and no pad key (no causal part): additive (0 for a real key,
    finfo(dtype).min for a pad key), or 1 / 0 on transformers < 4.41 (:data:`LEGACY_4D_MASK`),
    which turns it into that additive mask itself."""
    B, T = attention_mask.shape
    keep = attention_mask.bool()[:, None, None, :]
    if LEGACY_4D_MASK:
        return keep.to(dtype).expand(B, 1, T, T)
    m = torch.zeros(B, 1, 1, T, dtype=dtype, device=attention_mask.device)
    return m.masked_fill(~keep, torch.finfo(dtype).min).expand(B, 1, T, T)


class StandinVLA(transformers.PreTrainedModel):
    """OFT's VLA in miniature (see the module docstring). A ``PreTrainedModel`` like OFT's, so
    peft's ``target_modules="all-linear"`` picks what it picks for OFT (recent peft: not the LM
    head; peft 0.11.1: the LM head and the patch-embedding convs too)."""

    config_class = StandinConfig
    base_model_prefix = "model"
    _no_split_modules = ["StandinProjector"]

    def __init__(self, config: StandinConfig, action_dim: int = 7):
        super().__init__(config)
        self.action_dim = action_dim
        self.vision_backbone = StandinVisionBackbone(
            config.image_size, config.patch_size, tuple(config.vision_dims), config.vision_blocks,
            config.vision_heads, config.num_images_in_input)
        self.projector = StandinProjector(self.vision_backbone.embed_dim, config.llm_dim)
        self.language_model = transformers.LlamaForCausalLM(config.text_config())
        self.vocab_size = VOCAB_SIZE + PAD_TO_MULTIPLE_OF
        self.pad_token_id = PAD_TOKEN_ID
        self.llm_dim = config.llm_dim
        self.post_init()

    def _init_weights(self, module):  # every submodule initialised itself (seeded by the caller)
        pass

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- OFT's helpers, same steps -----------------------------------------------------------
    def _process_action_masks(self, labels):
        return (get_current_action_mask(labels, self.action_dim)
                | get_next_actions_mask(labels, self.action_dim))

    def _process_vision_features(self, pixel_values):
        return self.projector(self.vision_backbone(pixel_values))

    def _process_proprio_features(self, projected_patch_embeddings, proprio, proprio_projector):
        if proprio_projector is not None and proprio is not None:
            proprio = proprio.reshape(projected_patch_embeddings.shape[0], -1)
            proprio_features = proprio_projector(proprio).unsqueeze(dim=1)
            return torch.cat((projected_patch_embeddings, proprio_features), dim=1)
        return projected_patch_embeddings

    def _build_multimodal_attention(self, input_embeddings, projected_patch_embeddings, attention_mask):
        patch_mask = torch.full(projected_patch_embeddings.shape[:2], True,
                                dtype=attention_mask.dtype, device=attention_mask.device)
        embeddings = torch.cat([input_embeddings[:, :1, :], projected_patch_embeddings,
                                input_embeddings[:, 1:, :]], dim=1)
        mask = torch.cat([attention_mask[:, :1], patch_mask, attention_mask[:, 1:]], dim=1)
        return embeddings, mask

    def _build_multimodal_labels(self, labels, projected_patch_embeddings):
        patch_labels = torch.full(projected_patch_embeddings.shape[:2], IGNORE_INDEX,
                                  dtype=labels.dtype, device=labels.device)
        return torch.cat([labels[:, :1], patch_labels, labels[:, 1:]], dim=1)

    def _language_model(self, embeddings, mask, labels, output_hidden_states):
        dev = embeddings.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else embeddings.dtype)
        return self.language_model(inputs_embeds=embeddings,
                                   attention_mask=bidirectional_mask(mask, dtype), labels=labels,
                                   use_cache=False, output_hidden_states=output_hidden_states,
                                   return_dict=True)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None,
                inputs_embeds=None, past_key_values=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, output_projector_features=None, return_dict=None,
                proprio=None, proprio_projector=None, noisy_actions=None,
                noisy_action_projector=None, diffusion_timestep_embeddings=None,
                use_film: bool = False) -> StandinOutput:
        """OFT's multimodal training forward (L1 regression: no diffusion, no FiLM)."""
        if noisy_actions is not None or diffusion_timestep_embeddings is not None or use_film:
            raise NotImplementedError("the OFT stand-in runs the L1-regression path only "
                                      "(no diffusion, no FiLM)")
        if input_ids is None or pixel_values is None or labels is None or attention_mask is None:
            raise ValueError("StandinVLA.forward: needs input_ids, attention_mask, pixel_values "
                             "and labels (the multimodal training forward)")
        input_embeddings = self.get_input_embeddings()(input_ids)
        all_actions_mask = self._process_action_masks(labels)
        projected = self._process_vision_features(pixel_values)
        projected = self._process_proprio_features(projected, proprio, proprio_projector)
        input_embeddings = input_embeddings * ~all_actions_mask.unsqueeze(-1)
        embeddings, mask = self._build_multimodal_attention(input_embeddings, projected, attention_mask)
        mm_labels = self._build_multimodal_labels(labels, projected)
        out = self._language_model(embeddings, mask, mm_labels, bool(output_hidden_states))
        return StandinOutput(loss=out.loss, logits=out.logits, hidden_states=out.hidden_states,
                             projector_features=projected)

    @torch.no_grad()
    def predict_action(self, input_ids, attention_mask, pixel_values, *, proprio=None,
                       proprio_projector=None, action_head=None, num_actions_chunk: int = 8):
        """OFT's test-time path, step by step (normalised actions; no un-normalising):
        -> (actions (B, H, Da), actions_hidden_states (B, H*Da, D))."""
        B = input_ids.shape[0]
        if not torch.all(input_ids[:, -1] == EMPTY_TOKEN_ID):
            input_ids = torch.cat((input_ids, input_ids.new_full((B, 1), EMPTY_TOKEN_ID)), dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        num_prompt_tokens = input_ids.shape[-1] - 1
        n = self.action_dim * num_actions_chunk
        input_ids = torch.cat([input_ids, input_ids.new_ones(B, n),
                               input_ids.new_full((B, 1), STOP_INDEX)], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(
            B, input_ids.shape[-1] - attention_mask.shape[-1])], dim=-1)
        labels = torch.cat([labels, labels.new_full((B, input_ids.shape[-1] - labels.shape[-1]),
                                                    ACTION_TOKEN_BEGIN_IDX + 1)], dim=-1)
        labels[:, -1] = STOP_INDEX
        input_embeddings = self.get_input_embeddings()(input_ids)
        all_actions_mask = self._process_action_masks(labels)
        projected = self._process_vision_features(pixel_values)
        use_proprio = proprio_projector is not None and proprio is not None
        if use_proprio:
            projected = self._process_proprio_features(projected, proprio.to(projected.dtype),
                                                       proprio_projector)
        num_patches = (self.vision_backbone.get_num_patches()
                       * self.vision_backbone.get_num_images_in_input() + int(use_proprio))
        input_embeddings = input_embeddings * ~all_actions_mask.unsqueeze(-1)
        embeddings, mask = self._build_multimodal_attention(input_embeddings, projected, attention_mask)
        last = self._language_model(embeddings, mask, None, True).hidden_states[-1]
        start = num_patches + num_prompt_tokens
        rows = last[:, start:start + n, :]
        return action_head.predict_action(rows), rows


# --------------------------------------------------------------------------------------------
# data: OFT's collator, procedural episodes, a step-indexed source
# --------------------------------------------------------------------------------------------
@dataclass
class PaddedCollatorForActionPrediction:
    """OFT's collator (same output): right padding with ``pad_token_id``, labels padded with
    IGNORE_INDEX, ``attention_mask = input_ids != pad``, wrist images stacked after the main
    one along the channels, ``proprio`` through ``np.squeeze`` (1-D when B = 1)."""
    model_max_length: int
    pad_token_id: int
    padding_side: str = "right"
    pixel_values_dtype: torch.dtype = torch.float32

    def __call__(self, instances: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        input_ids, labels = tuple([instance[key] for instance in instances] for key in ("input_ids", "labels"))
        pixel_values = [instance["pixel_values"] for instance in instances]
        if "dataset_name" in instances[0]:
            dataset_names = [instance["dataset_name"] for instance in instances]
        else:
            dataset_names = None
        assert self.padding_side == "right", f"Invalid Tokenizer `{self.padding_side = }`"
        input_ids = pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id)
        labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        input_ids, labels = input_ids[:, : self.model_max_length], labels[:, : self.model_max_length]
        attention_mask = input_ids.ne(self.pad_token_id)
        assert all([pv is not None for pv in pixel_values]), "Invalid VLA Example with `pixel_values = None`!"
        if isinstance(pixel_values[0], torch.Tensor):
            if "pixel_values_wrist" in instances[0]:
                pixel_values_wrist = [instance["pixel_values_wrist"] for instance in instances]
                pixel_values = torch.cat((torch.stack(pixel_values), torch.stack(pixel_values_wrist)), dim=1)
            else:
                pixel_values = torch.stack(pixel_values)
        else:
            raise ValueError(f"Unsupported `pixel_values` type = {type(pixel_values)}")
        actions = [torch.from_numpy(np.copy(instance["actions"])) for instance in instances]
        actions = torch.stack(actions)
        if "proprio" in instances[0]:
            proprio = [instance["proprio"] for instance in instances]
            proprio = torch.Tensor(np.squeeze(np.stack(proprio)))
        else:
            proprio = None
        output = dict(pixel_values=pixel_values, proprio=proprio, input_ids=input_ids,
                      attention_mask=attention_mask, labels=labels, actions=actions)
        if dataset_names is not None:
            output["dataset_names"] = dataset_names
        return output


def action_tokens(actions: np.ndarray) -> np.ndarray:
    """OpenVLA's ActionTokenizer ids: clip to [-1, 1], ``np.digitize`` into N_BINS bins, id =
    VOCAB_SIZE - bin (the last N_BINS ids of the base vocabulary)."""
    bins = np.linspace(-1, 1, N_BINS)
    return VOCAB_SIZE - np.digitize(np.clip(actions, -1.0, 1.0), bins)


def prompt_ids(task: str) -> list[int]:
    """BOS + "In: What action should the robot take to {task}?\\nOut:" + the empty token."""
    words = ["In:", "What", "action", "should", "the", "robot", "take", "to", *task.split(), "?",
             "Out:", "\u2581"]
    return [BOS] + [WORDS.index(w) for w in words]


class StandinEpisodes:
    """``episodes`` procedural episodes of ``episode_len`` steps (seeded), as a map-style
    dataset of OFT RLDS-transform samples: ``pixel_values`` (6, R, R) (the scene, normalised
    two ways for the two featurizers), ``pixel_values_wrist`` (6, R, R) (the scene rolled so
    the gripper is centred), ``input_ids`` / ``labels`` (L,) int64 (labels IGNORE_INDEX but on
    the H*Da action tokens and ``</s>``), ``actions`` (H, 7) float32 numpy (the expert's next H
    actions), ``proprio`` (8,) float32 numpy, ``dataset_name``."""

    def __init__(self, episodes: int, episode_len: int = 16, *, seed: int = 0, chunk: int = 8,
                 num_objects: int = 3, image_size: int = 16, wrist: bool = True):
        self.episodes, self.episode_len, self.chunk, self.wrist = episodes, episode_len, chunk, wrist
        s = generate_scenes(episodes, seed, num_objects=num_objects, image_size=image_size,
                            chunk=episode_len + chunk - 1)  # one expert rollout per episode
        self.images, self.expert = s["images"], s["expert"].numpy().astype(np.float32)
        names = TASK_VOCAB
        self.tasks = [" ".join(names[t] for t in row.tolist() if t > 1) for row in s["tokens"]]
        # the gripper state along each rollout: integrate the expert's (de-normalised) deltas
        grip = s["proprio"].numpy().astype(np.float64)
        steps = self.expert.astype(np.float64)
        pos = grip[:, None, :3] + np.concatenate(
            [np.zeros((episodes, 1, 3)), np.cumsum(steps[:, :, :3] * MAX_STEP, axis=1)], axis=1)
        yaw = grip[:, None, 3] + np.concatenate(
            [np.zeros((episodes, 1)), np.cumsum(steps[:, :, 5] * MAX_ROT, axis=1)], axis=1)
        gripper = np.concatenate([np.ones((episodes, 1)), steps[:, :, 6]], axis=1)
        self.state = np.stack([pos[..., 0], pos[..., 1], pos[..., 2], np.zeros_like(yaw),
                               np.zeros_like(yaw), yaw, gripper, -gripper], axis=-1).astype(np.float32)

    def __len__(self) -> int:
        return self.episodes * self.episode_len

    @staticmethod
    def _six(img: torch.Tensor) -> torch.Tensor:
        """(3, R, R) in [0, 1] -> (6, R, R): SigLIP-style (x - 0.5) / 0.5, then ImageNet-style."""
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        return torch.cat([(img - 0.5) / 0.5, (img - mean) / std], dim=0)

    def __getitem__(self, i: int) -> dict:
        e, t = divmod(int(i), self.episode_len)
        img = self.images[e]
        H = self.chunk
        actions = self.expert[e, t:t + H]
        state = self.state[e, t]
        ids = prompt_ids(self.tasks[e]) + action_tokens(actions).reshape(-1).tolist() + [STOP_INDEX]
        input_ids = torch.tensor(ids, dtype=torch.int64)
        labels = input_ids.clone()
        labels[: -(actions.size + 1)] = IGNORE_INDEX
        out = {"pixel_values": self._six(img), "input_ids": input_ids, "labels": labels,
               "dataset_name": DATASET_NAME, "actions": actions.copy(), "proprio": state.copy()}
        if self.wrist:
            R = img.shape[-1]
            shift = (int(round(R / 2 - float(state[1]) * R)), int(round(R / 2 - float(state[0]) * R)))
            out["pixel_values_wrist"] = self._six(torch.roll(img, shifts=shift, dims=(1, 2)))
        return out


class StandinData:
    """A step-indexed source of collated batches of :class:`StandinEpisodes` (exact resume):
    the batch of step k is a slice of the epoch's permutation (seeded by (seed, epoch));
    ``batch(step, rank, world)`` -> rank's share of each of the step's micro-batches, each the
    collator's output plus ``ids`` (dataset rows, a CPU int64 tensor). ``probe()`` -> one
    collated batch of one sample per held-out episode."""

    def __init__(self, train: StandinEpisodes, probe: StandinEpisodes, *, batch_size: int,
                 grad_accum: int = 1, seed: int = 0):
        self.train, self.probe_set = train, probe
        self.batch_size, self.grad_accum, self.seed = int(batch_size), int(grad_accum), int(seed)
        self.collator = PaddedCollatorForActionPrediction(512, PAD_TOKEN_ID)
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.train), generator=g).tolist())
        return self._perm[1]

    def collate(self, dataset: StandinEpisodes, rows: list[int]) -> dict:
        out = self.collator([dataset[r] for r in rows])
        out["ids"] = torch.tensor(rows, dtype=torch.int64)
        return out

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[dict]:
        B, n = self.batch_size, self.batch_size * self.grad_accum
        if B % world:
            raise ValueError(f"run.batch_size: expected a multiple of the world size {world}, got {B}")
        epoch, slot = divmod(step, len(self.train) // n)
        rows = self._order(epoch)[slot * n:(slot + 1) * n]
        per = B // world
        return [self.collate(self.train, rows[a * B + rank * per:a * B + (rank + 1) * per])
                for a in range(self.grad_accum)]

    def probe(self) -> dict:
        """One sample of each held-out episode, at steps spread over the episode."""
        n, E = self.probe_set.episodes, self.probe_set.episode_len
        return self.collate(self.probe_set, [e * E + (5 * e) % E for e in range(n)])


# --------------------------------------------------------------------------------------------
# building it
# --------------------------------------------------------------------------------------------
def make_standin(seed: int = 0, *, image_size: int = 16, patch_size: int = 4,
                 num_images: int = 2, vision_dims=(32, 24), vision_blocks: int = 3,
                 llm_dim: int = 64, llm_layers: int = 2, llm_heads: int = 4, chunk: int = 8,
                 action_dim: int = 7, proprio: bool = True, lora_rank: int = 0,
                 lora_alpha: int = 0, weights: str = "fp32", context: str = "fork",
                 save_oft: bool = True) -> OFTPolicy:
    """The stand-in VLA, an L1 head (OFT's sizes: hidden = llm_dim) and a proprio projector,
    initialised from ``seed``, optionally with OFT's LoRA (``lora_rank`` > 0) and with the VLA
    and head in bf16 as OFT holds them (``weights="bf16"``; adapters and the projector stay
    fp32), behind :class:`OFTPolicy`."""
    torch.manual_seed(seed)
    cfg = StandinConfig(image_size=image_size, patch_size=patch_size, vision_dims=vision_dims,
                        vision_blocks=vision_blocks, num_images_in_input=num_images,
                        llm_dim=llm_dim, llm_layers=llm_layers, llm_heads=llm_heads,
                        llm_kv_heads=max(1, llm_heads // 2))
    vla = StandinVLA(cfg, action_dim=action_dim)
    head = L1RegressionActionHead(input_dim=llm_dim, hidden_dim=llm_dim, action_dim=action_dim,
                                  num_actions_chunk=chunk)
    projector = ProprioProjector(llm_dim, PROPRIO_DIM) if proprio else None
    if weights == "bf16":
        vla, head = vla.to(torch.bfloat16), head.to(torch.bfloat16)
    elif weights != "fp32":
        raise ValueError(f"weights: expected 'fp32' or 'bf16', got {weights!r}")
    if lora_rank:
        from .checkpoints import apply_lora
        vla = apply_lora(vla, rank=lora_rank, alpha=lora_alpha or None)
    return OFTPolicy(vla, head, projector, context=context,
                     action_token_begin_idx=ACTION_TOKEN_BEGIN_IDX, pad_token_id=PAD_TOKEN_ID,
                     save_oft=save_oft)


def build(cfg, device: torch.device):
    """``energy-train train --policy oft-standin``: the stand-in policy (options: the [policy]
    section, :class:`~energy_train.integrations.openvla_oft.options.StandinOptions`) and its
    episodes, from run.seed."""
    from ...policies import Setup
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
           "action_tokens", "prompt_ids", "VOCAB_SIZE", "N_BINS", "ACTION_TOKEN_BEGIN_IDX",
           "PAD_TOKEN_ID", "EMPTY_TOKEN_ID", "STOP_INDEX", "PROPRIO_DIM"]
