"""The tiny VLA of the embedded default: image patches + proprio + instruction + H*Da action
placeholders + a stop token through a small pre-LN transformer.

Token layout (fixed per model, see :class:`Layout`)::

    [ patches (P) | proprio (1) | instruction (Li) | action placeholders (H*Da) | stop (1) ]
      \\______________ context (S = P + 1 + Li) ___/

Per-layer hidden states come two ways:
- the Hugging Face convention, ``forward(..., output_hidden_states=True)``: a tuple of L+1
  (B, T, D) tensors (embeddings, the outputs of blocks 0..L-2, and the final-normed output
  of block L-1, as LLaMA-style models return them);
- :class:`ActionRowCapture`: forward hooks on the same L+1 modules that copy only the
  action-token rows of each hidden state into a buffer (L+1, B, H*Da, D), plus the last
  hidden state's context rows (B, S, D) (energy_train.capture; reused buffers with slot=).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...capture import HiddenStateCapture
from ...checks import check_int, check_multiple, check_tensor


@dataclass(frozen=True)
class Layout:
    num_patches: int
    instr_len: int
    num_action_tokens: int

    @property
    def proprio_pos(self) -> int:
        return self.num_patches

    @property
    def context_len(self) -> int:  # S: patches + proprio + instruction
        return self.num_patches + 1 + self.instr_len

    @property
    def action_start(self) -> int:
        return self.context_len

    @property
    def stop_pos(self) -> int:
        return self.action_start + self.num_action_tokens

    @property
    def num_tokens(self) -> int:  # T
        return self.stop_pos + 1


class TinyVLAOutput(NamedTuple):
    last_hidden_state: torch.Tensor                 # (B, T, D), final norm applied
    hidden_states: tuple[torch.Tensor, ...] | None  # L+1 x (B, T, D) when asked for


class Embed(nn.Module):
    """images (B, 3, R, R), proprio (B, Dp), tokens (B, Li) -> (B, T, D)."""

    def __init__(self, layout: Layout, d_model: int, image_size: int, patch_size: int,
                 proprio_dim: int, vocab_size: int, stop_token: int):
        super().__init__()
        self.layout, self.patch_size, self.stop_token = layout, patch_size, stop_token
        self.patch = nn.Linear(3 * patch_size * patch_size, d_model)
        self.proprio = nn.Linear(proprio_dim, d_model)
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.action = nn.Parameter(torch.zeros(d_model))  # one placeholder, told apart by position
        self.pos = nn.Parameter(torch.randn(layout.num_tokens, d_model) * 0.02)

    def forward(self, images, proprio, tokens):
        B, p = images.shape[0], self.patch_size
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # (B, P, 3*p*p)
        stop = self.tokens(torch.full((B, 1), self.stop_token, device=tokens.device))
        x = torch.cat([self.patch(patches), self.proprio(proprio)[:, None], self.tokens(tokens),
                       self.action.expand(B, self.layout.num_action_tokens, -1), stop], dim=1)
        return x + self.pos


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1 x); x + mlp(ln2 x). Bidirectional attention
    (OFT decodes the action chunk in parallel)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TinyVLA(nn.Module):
    """forward(images (B,3,R,R), proprio (B,Dp), tokens (B,Li)) -> TinyVLAOutput."""

    def __init__(self, *, d_model: int = 64, n_layers: int = 4, n_heads: int = 4,
                 image_size: int = 16, patch_size: int = 4, proprio_dim: int = 4,
                 vocab_size: int = 32, instr_len: int = 4, chunk: int = 8, action_dim: int = 7,
                 stop_token: int = 1, mlp_ratio: int = 4):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads),
                        ("image_size", image_size), ("patch_size", patch_size),
                        ("proprio_dim", proprio_dim), ("vocab_size", vocab_size),
                        ("chunk", chunk), ("action_dim", action_dim), ("mlp_ratio", mlp_ratio)):
            check_int(name, v, low=1)
        check_int("instr_len", instr_len, low=0)
        check_int("stop_token", stop_token, low=0, high=vocab_size - 1)
        check_multiple("image_size", image_size, "patch_size", patch_size)
        check_multiple("d_model", d_model, "n_heads", n_heads)
        self.d_model, self.n_layers, self.chunk, self.action_dim = d_model, n_layers, chunk, action_dim
        self.image_size, self.proprio_dim, self.instr_len = image_size, proprio_dim, instr_len
        self.layout = Layout((image_size // patch_size) ** 2, instr_len, chunk * action_dim)
        self.embed = Embed(self.layout, d_model, image_size, patch_size, proprio_dim, vocab_size,
                           stop_token)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)  # the final norm ("logit lens" for earlier layers)

    def hidden_state_modules(self) -> list[nn.Module]:
        """The L+1 modules whose outputs are the HF-convention hidden states, in order."""
        return [self.embed, *self.blocks[:-1], self.norm]

    def check_inputs(self, images, proprio, tokens) -> None:
        R = self.image_size
        check_tensor("images", images, ndim=4, shape={1: 3, 2: R, 3: R}, floating=True)
        B = images.shape[0]
        check_tensor("proprio", proprio, ndim=2, shape={0: B, 1: self.proprio_dim}, floating=True)
        check_tensor("tokens", tokens, ndim=2, shape={0: B, 1: self.instr_len}, integer=True)

    def forward(self, images, proprio, tokens, output_hidden_states: bool = False) -> TinyVLAOutput:
        self.check_inputs(images, proprio, tokens)
        x = self.embed(images, proprio, tokens)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        x = self.norm(x)
        if not output_hidden_states:
            return TinyVLAOutput(x, None)
        return TinyVLAOutput(x, (*states[:-1], x))


class ActionRowCapture(HiddenStateCapture):
    """Forward hooks on ``model.hidden_state_modules()`` that keep only what the energy phase
    needs: the action-token rows of every layer and the last layer's context rows (see
    :mod:`energy_train.capture`).

    ``with capture.armed(action_index (B, H*Da) int64, context_len) as cap: model(...)``;
    afterwards ``cap`` is a :class:`CapturedStates`, detached from autograd. Outside ``armed``
    the hooks do nothing. Without ``slot=`` each ``armed`` allocates fresh buffers.
    """

    def __init__(self, model: nn.Module):
        super().__init__([(m, "output") for m in model.hidden_state_modules()])
