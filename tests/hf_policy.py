"""A second, independent backbone for the trainer tests: a Hugging Face ``LlamaModel`` with a
tiny random config (nothing downloaded) behind the Policy interface, and a step-indexed source
of OFT-like batches: patch rows, a prompt of per-sample length, H*Da action tokens, right
padding with a pad id INSIDE the action-token range (so the action rows come from labels).

    [ patches (P) | prompt (3..6 tokens) | H*Da action tokens | pads ]
      context = patches + prompt (pads, actions masked)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from energy_train import BatchLayout, Policy, build_action_index
from energy_train.knobs import knob
from energy_train.models import L1RegressionActionHead
from energy_train.policies.tiny.task import generate_scenes
from energy_train.policy import prefix_context

VOCAB, ACTION_BEGIN, ACTION_ID, PAD_ID = 64, 40, 41, 63
PATCH, PATCHES = 48, 16  # 4x4x3 patches of a 16x16 image


class LlamaPolicy(Policy):
    def __init__(self, llama: nn.Module, head: L1RegressionActionHead, patch: nn.Linear):
        self.backbone, self.action_head, self.extras = llama, head, {"patch": patch}

    def forward(self, batch, output_hidden_states=False):
        emb = self.backbone.get_input_embeddings()(batch["input_ids"])
        x = torch.cat([self.extras["patch"](batch["patches"]).to(emb.dtype), emb], dim=1)
        ones = torch.ones(x.shape[0], PATCHES, dtype=batch["attention_mask"].dtype, device=x.device)
        out = self.backbone(inputs_embeds=x, attention_mask=torch.cat([ones, batch["attention_mask"]], 1),
                            output_hidden_states=output_hidden_states)
        return out if output_hidden_states else out.last_hidden_state

    def layout(self, batch):
        labels, B = batch["labels"], batch["labels"].shape[0]
        index = build_action_index(num_tokens=self.chunk_shape[0] * self.chunk_shape[1],
                                   labels=labels, action_token_begin_idx=ACTION_BEGIN, offset=PATCHES)
        visible = torch.cat([torch.ones(B, PATCHES, dtype=torch.bool, device=labels.device),
                             (batch["attention_mask"] > 0) & (labels < 0)], dim=1)
        return BatchLayout(index, prefix_context(B, visible.shape[1], labels.device), ~visible)

    def expert(self, batch):
        return batch["actions"]


def make_policy(seed=0, d=32, layers=2, chunk=4, dtype=torch.float32, lora=False) -> LlamaPolicy:
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128)
    llama = transformers.LlamaModel(cfg).to(dtype)
    if lora:  # a frozen base with trainable adapters
        import peft
        llama = peft.get_peft_model(llama, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"]))
    head = L1RegressionActionHead(d, 2 * d, 7, chunk)
    return LlamaPolicy(llama, head, nn.Linear(PATCH, d))


class PromptData:
    """Step-indexed OFT-like batches from the embedded task's scenes and expert."""

    def __init__(self, seed=0, size=32, probe_size=6, *, batch_size=4, grad_accum=1, chunk=4):
        self.size, self.batch_size, self.grad_accum, self.chunk = size, batch_size, grad_accum, chunk
        s = generate_scenes(size + probe_size, seed, image_size=16, chunk=chunk)
        patches = torch.nn.functional.unfold(s["images"], 4, stride=4).transpose(1, 2)
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 7, (size + probe_size,), generator=g)
        prompt = torch.randint(2, ACTION_BEGIN, (size + probe_size, 6), generator=g)
        n, T = chunk * 7, 6 + chunk * 7
        ids = torch.full((size + probe_size, T), PAD_ID)
        labels = torch.full_like(ids, -100)
        for i, L in enumerate(lengths.tolist()):
            ids[i, :L] = prompt[i, :L]
            ids[i, L:L + n] = ACTION_ID
            labels[i, L:L + n] = ACTION_ID
        self.rows = {"patches": patches, "input_ids": ids, "labels": labels,
                     "attention_mask": (ids != PAD_ID).long(), "actions": s["expert"]}

    def _make(self, rows: list[int]) -> dict:
        idx = torch.tensor(rows)
        return {**{k: v[idx] for k, v in self.rows.items()}, "ids": idx}

    def batch(self, step, rank=0, world=1):
        B, per = self.batch_size, self.batch_size // world
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(step // (self.size // (B * self.grad_accum))))
        start = (step % (self.size // (B * self.grad_accum))) * B * self.grad_accum
        rows = perm[start:start + B * self.grad_accum].tolist()
        return [self._make(rows[a * B + rank * per:a * B + (rank + 1) * per]) for a in range(self.grad_accum)]

    def probe(self):
        return self._make(list(range(self.size, self.size + 6)))

    def __iter__(self):  # the same stream as an iterable (a DataLoader stand-in)
        for step in range(self.size // (self.batch_size * self.grad_accum)):
            yield from self.batch(step)


@dataclass
class LlamaOptions:
    """The [policy] section of ``--policy hf_policy:factory``."""
    d: int = knob(32, ge=8)
    layers: int = knob(2, ge=1)
    lora: bool = knob(False)


def factory(cfg, device):
    """``energy-train train --policy hf_policy:factory`` (a user's own factory)."""
    from energy_train.policies import Setup
    o = cfg.policy
    policy = make_policy(seed=cfg.run.seed, d=o.d, layers=o.layers, lora=o.lora)
    for m in policy.modules().values():
        m.to(device)
    return Setup(policy, PromptData(batch_size=cfg.run.batch_size, grad_accum=cfg.run.grad_accum))


factory.options = LlamaOptions
