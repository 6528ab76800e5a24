"""The policies a memory plan is made for, built without memory: the modules on the meta device
(later made fake where the plan runs), the data real (a few small batches on the host).

- ``tiny``: the embedded default (the [policy] section's sizes, run.batch_size);
- ``oft-standin``: ``--policy oft-standin`` at its [policy] sizes;
- ``oft-7b``: the stand-in at OpenVLA-OFT's shapes on LIBERO - a Llama-2 7B language model
  (D 4096, 32 layers, 32 heads, 32 KV heads, MLP 11008) behind two ViT featurizers per image
  (1024 and 768 wide, 24 blocks: DINOv2 ViT-L-like; OFT's SigLIP is 1152 x 27), two 224 x 224
  images in 14 x 14 patches (2 x 256 patches + proprio + prompt + 56 action tokens: T ~ 590),
  LoRA r 32 on every linear (frozen bf16 base), the L1 head at D 4096 (MLPResNet, ~151M), B 8,
  bf16 autocast, the fork's energy model (hidden 512, 8 heads, fp32). The stand-in's vocabulary
  is small: OFT's 32064-token embeddings and LM head (0.5 GB of frozen bf16, both) and logits
  are not in it;
- ``oft-1b``: the same at ~1B (D 2048, 16 layers, MLP 5504; ViTs 512/384 x 12), what the GPU
  check measures for real beside its plan.
"""
from __future__ import annotations

import torch

from ..config import TrainConfig, default_config
from ..models import EnergyModel, L1RegressionActionHead

_OFT = dict(image_size=224, patch_size=14, num_images=2, lora_rank=32, weights="bf16")
SIZES = {
    "oft-7b": dict(_OFT, vision_dims=(1024, 768), vision_blocks=24, llm_dim=4096, llm_layers=32,
                   llm_heads=32, llm_kv_heads=32, llm_ffn=11008),
    "oft-1b": dict(_OFT, vision_dims=(512, 384), vision_blocks=12, llm_dim=2048, llm_layers=16,
                   llm_heads=16, llm_kv_heads=16, llm_ffn=5504),
}
_OFT_RUN = {"run.policy": "oft-standin", "run.batch_size": 8, "run.precision": "bf16",
            "energy.hidden": 512, "energy.heads": 8, "energy.loss": "explicit"}
CASES = {"tiny": {}, "oft-standin": {"run.policy": "oft-standin"}, "oft-7b": _OFT_RUN,
         "oft-1b": _OFT_RUN}


def case_config(case: str, overrides: dict | None = None) -> TrainConfig:
    """The config of a case: its own values, then ``overrides`` ({"section.key": value})."""
    if case not in CASES:
        raise ValueError(f"--case: expected one of {tuple(CASES)}, got {case!r}")
    return default_config(**{**CASES[case], **(overrides or {})})


def build_policy(case: str, cfg: TrainConfig, device="meta"):
    """The case's policy on ``device`` (weights uninitialised on meta)."""
    with torch.device(device):
        if cfg.run.policy == "tiny":
            from ..policies.tiny import TinyPolicy, TinyVLA
            o = cfg.policy
            model = TinyVLA(d_model=o.d_model, n_layers=o.n_layers, n_heads=o.n_heads,
                            image_size=o.image_size, patch_size=o.patch_size, chunk=o.chunk,
                            action_dim=o.action_dim, mlp_ratio=o.mlp_ratio)
            head = L1RegressionActionHead(input_dim=o.d_model, hidden_dim=o.head_hidden,
                                          action_dim=o.action_dim, num_actions_chunk=o.chunk)
            return TinyPolicy(model, head)
        from ..integrations.openvla_oft.standin import make_standin
        return make_standin(cfg.run.seed, **_standin_sizes(case, cfg), context=cfg.policy.context,
                            save_oft=False)


def _standin_sizes(case: str, cfg: TrainConfig) -> dict:
    if case in SIZES:
        return dict(SIZES[case], chunk=cfg.policy.chunk)
    o = cfg.policy
    return dict(image_size=o.image_size, patch_size=o.patch_size, num_images=o.num_images,
                vision_dims=(o.vision_dim, o.vision_dim * 3 // 4), vision_blocks=o.vision_blocks,
                llm_dim=o.llm_dim, llm_layers=o.llm_layers, llm_heads=o.llm_heads,
                chunk=o.chunk, proprio=o.use_proprio, lora_rank=o.lora_rank if o.lora else 0,
                lora_alpha=o.lora_alpha, weights=o.weights)


def build_energy(cfg: TrainConfig, policy, device="meta") -> EnergyModel:
    """The [energy] section's model for the policy (bf16 already for energy.precision =
    "bf16_weights", as the trainer would cast it)."""
    H, Da = policy.chunk_shape
    with torch.device(device):
        e = cfg.energy
        model = EnergyModel(policy.hidden_size, Da, hidden=e.hidden, heads=e.heads,
                            output=e.output, action_residual=e.action_residual)
    return model.to(torch.bfloat16) if e.precision == "bf16_weights" else model


def batches(case: str, cfg: TrainConfig, steps: int) -> list[list[dict]]:
    """``steps`` steps of micro-batch dicts of the case's data, real, on the host."""
    B, accum = cfg.run.batch_size, cfg.run.grad_accum
    if cfg.run.policy == "tiny":
        from ..policies.tiny import TaskData
        o = cfg.policy
        data = TaskData(cfg.run.seed, max(o.dataset_size, B * accum), o.probe_size,
                        batch_size=B, grad_accum=accum, num_objects=o.num_objects,
                        image_size=o.image_size, chunk=o.chunk, device=torch.device("cpu"))
    else:
        from ..integrations.openvla_oft.standin import StandinData, StandinEpisodes
        sizes = _standin_sizes(case, cfg)
        kw = dict(chunk=sizes["chunk"], num_objects=cfg.policy.num_objects,
                  image_size=sizes["image_size"], wrist=sizes["num_images"] > 1)
        train = StandinEpisodes(1, B * accum, seed=cfg.run.seed, **kw)
        probe = StandinEpisodes(1, 2, seed=cfg.run.seed + 1, **kw)
        data = StandinData(train, probe, batch_size=B, grad_accum=accum, seed=cfg.run.seed)
    return [data.batch(k) for k in range(steps)]
