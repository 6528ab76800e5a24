"""The stand-in's VLA: OFT's ``OpenVLAForActionPrediction`` in miniature (module names kept),
its proprio projector, and the token ids of its vocabulary (OpenVLA's scheme scaled down).
See the package docstring."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.modeling_outputs import ModelOutput

from ....policies.tiny.task import VOCAB as TASK_VOCAB
from ..context import IGNORE_INDEX

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
                 attn_implementation_llm: str = "sdpa", llm_ffn: int = 0, **kwargs):
        self.image_size, self.patch_size = image_size, patch_size
        self.vision_dims, self.vision_blocks = list(vision_dims), vision_blocks
        self.vision_heads, self.num_images_in_input = vision_heads, num_images_in_input
        self.llm_dim, self.llm_layers, self.llm_heads = llm_dim, llm_layers, llm_heads
        self.llm_kv_heads, self.attn_implementation_llm = llm_kv_heads, attn_implementation_llm
        self.llm_ffn = llm_ffn  # the MLP's width; 0 = 2 x llm_dim
        kwargs.setdefault("pad_token_id", PAD_TOKEN_ID)
        super().__init__(**kwargs)

    def text_config(self) -> transformers.LlamaConfig:
        c = transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE + PAD_TO_MULTIPLE_OF, hidden_size=self.llm_dim,
            intermediate_size=getattr(self, "llm_ffn", 0) or 2 * self.llm_dim,
            num_hidden_layers=self.llm_layers,
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
