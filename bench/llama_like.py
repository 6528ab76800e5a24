"""A Llama-style decoder defined locally (random weights, nothing downloaded) and a VLA made of
it, for the step benchmark and the capture tests.

- :class:`LlamaLikeModel`: ``embed_tokens`` (optional), ``layers`` (a ModuleList of
  :class:`LlamaLikeDecoderLayer`: RMSNorm -> GQA attention with RoPE (causal SDPA) ->
  residual -> RMSNorm -> SwiGLU MLP -> residual; returns a 1-tuple like Hugging Face's
  decoder layers before 4.56), ``norm`` (final RMSNorm). ``forward(input_ids=None,
  inputs_embeds=None, output_hidden_states=False) -> (last_hidden_state, hidden_states)``
  with the HF convention: (embeddings, outputs of layers 0..L-2, normed output of layer L-1).
- :class:`DecoderVLA`: the TinyVLA interface (``layout``, ``norm``, ``d_model``,
  ``forward(images, proprio, tokens, output_hidden_states)``) with TinyVLA's token embedding
  in front of a LlamaLikeModel, so :class:`energy_train.policies.tiny.TinyPolicy` wraps it
  unchanged; its decoder is found by :func:`energy_train.capture.find_decoder`
  (``decoder.layers`` + ``decoder.norm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from energy_train.policies.tiny.model import Embed, Layout, TinyVLAOutput


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rope(q, k, base: float = 10000.0):
    """Rotary position embedding over the last dim of q, k (B, h, T, dh)."""
    T, dh = q.shape[-2], q.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dh, 2, device=q.device, dtype=torch.float32) / dh)
    ang = torch.arange(T, device=q.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().to(q.dtype), torch.cat([ang, ang], -1).sin().to(q.dtype)

    def rot(x):
        x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin
    return rot(q), rot(k)


class LlamaLikeDecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.q_proj = nn.Linear(d, heads * self.dh, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.o_proj = nn.Linear(heads * self.dh, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, hidden_states):
        B, T, D = hidden_states.shape
        x = self.input_layernorm(hidden_states)
        q = self.q_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.dh).transpose(1, 2)
        q, k = _rope(q, k)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = hidden_states + self.o_proj(a.transpose(1, 2).reshape(B, T, D))
        x = self.post_attention_layernorm(h)
        return (h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)),)


class LlamaLikeModel(nn.Module):
    def __init__(self, d: int = 64, layers: int = 3, heads: int = 4, kv_heads: int = 2,
                 ffn: int | None = None, vocab: int | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d) if vocab else None
        self.layers = nn.ModuleList(LlamaLikeDecoderLayer(d, heads, kv_heads, ffn or 4 * d)
                                    for _ in range(layers))
        self.norm = RMSNorm(d)

    def forward(self, input_ids=None, inputs_embeds=None, output_hidden_states: bool = False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        states = [x]
        for layer in self.layers:
            x = layer(x)[0]
            states.append(x)
        x = self.norm(x)
        return x, ((*states[:-1], x) if output_hidden_states else None)


class DecoderVLA(nn.Module):
    """TinyVLA's interface on a Llama-style decoder (see the module docstring)."""

    def __init__(self, *, d_model: int, n_layers: int, n_heads: int, kv_heads: int, ffn: int,
                 image_size: int = 92, patch_size: int = 4, proprio_dim: int = 4,
                 vocab_size: int = 32, instr_len: int = 4, chunk: int = 8, action_dim: int = 7,
                 stop_token: int = 1):
        super().__init__()
        self.d_model, self.chunk, self.action_dim = d_model, chunk, action_dim
        self.layout = Layout((image_size // patch_size) ** 2, instr_len, chunk * action_dim)
        self.embed = Embed(self.layout, d_model, image_size, patch_size, proprio_dim, vocab_size,
                           stop_token)
        self.decoder = LlamaLikeModel(d_model, n_layers, n_heads, kv_heads, ffn)

    @property
    def norm(self) -> nn.Module:
        return self.decoder.norm

    def forward(self, images, proprio, tokens, output_hidden_states: bool = False) -> TinyVLAOutput:
        dtype = self.embed.patch.weight.dtype
        x = self.embed(images.to(dtype), proprio.to(dtype), tokens)
        last, states = self.decoder(inputs_embeds=x, output_hidden_states=output_hidden_states)
        return TinyVLAOutput(last, states)
