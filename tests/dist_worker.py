"""One rank of the distributed tests' jobs: ``python tests/dist_worker.py OUT``, launched by
tests/test_distributed.py with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and
MASTER_PORT in the environment. Runs every scenario in one process group (one start-up)
and writes ``OUT/rank<r>.pt`` for the test to compare."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from energy_train import distributed
from energy_train.policies.tiny import build as build_tiny
from energy_train.trainer import Trainer, train
from trainer_helpers import grads, tiny_cfg

# (name, config) of the trainer variants whose ranks must agree after a few steps
AGREE = {
    "two_phase": dict(strategy="two_phase"),
    "two_phase-swap": dict(strategy="two_phase", energy_loss="swap"),
    "two_phase-accum2": dict(strategy="two_phase", grad_accum=2),
    "joint": dict(strategy="joint"),
    "joint-leaky": dict(strategy="joint", detach_context=False),
    "joint-swap-accum2": dict(strategy="joint", energy_loss="swap", grad_accum=2),
    "shared_forward": dict(strategy="shared_forward"),
    "alternating": dict(strategy="alternating", alternate_every=1),
    "adaptive_weights": dict(strategy="adaptive_weights", adaptive_window=2),
    "cached_negatives": dict(strategy="cached_negatives", cache_refresh=2),
    "two_phase-fsdp": dict(strategy="two_phase", fsdp=True),
    "shared_forward-fsdp-accum2": dict(strategy="shared_forward", fsdp=True, grad_accum=2),
    "two_phase-fork": dict(strategy="two_phase"),  # phi left unwrapped, as the public fork does
    # the Llama policy, LoRA adapters on a frozen base, find_unused_parameters as OFT runs DDP
    "llama-lora-two_phase": dict(strategy="two_phase", find_unused_parameters=True),
    "llama-lora-joint-accum2": dict(strategy="joint", grad_accum=2, batch_size=8),
}


def full(p: torch.Tensor) -> torch.Tensor:
    p = p.detach()
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()


def build(cfg, ctx, dtype=None) -> Trainer:
    setup = build_tiny(cfg, ctx.device)
    policy, data = setup.policy, setup.data
    if cfg.dist.fsdp:
        distributed.shard_backbone(policy)
    if dtype is not None:
        for m in (policy.backbone, policy.action_head, setup.energy):
            m.to(dtype)
        for split in (data.train, data.probe_data):
            for k, v in split.items():
                if v.is_floating_point():
                    split[k] = v.to(dtype)
    t = Trainer(cfg, policy, setup.energy, data, ctx.device)
    return distributed.distribute(t, ctx)


def record_grads(t: Trainer) -> dict:
    """Spy: the (already all-reduced) gradients each optimizer step is about to use."""
    seen = {"theta": [], "phi": []}
    st, sp = t.step_theta, t.step_phi
    t.step_theta = lambda: (seen["theta"].append([full(g) for g in grads(t.theta)]), st())[1]
    t.step_phi = lambda: (seen["phi"].append([full(g) for g in grads(t.phi)]), sp())[1]
    return seen


def build_llama(cfg, ctx) -> Trainer:
    """The transformers Llama policy with LoRA on a frozen base (tests/hf_policy.py)."""
    from energy_train.models import EnergyModel
    from hf_policy import PromptData, make_policy
    policy = make_policy(lora=True)
    energy = EnergyModel(32, 7, hidden=32, heads=2)
    t = Trainer(cfg, policy, energy, PromptData(batch_size=cfg.run.batch_size,
                                                grad_accum=cfg.run.grad_accum), ctx.device)
    return distributed.distribute(t, ctx)


def agree(ctx) -> dict:
    out = {}
    for name, kw in AGREE.items():
        if name.startswith("llama"):
            t = build_llama(tiny_cfg(steps=3, **kw), ctx)
        else:
            t = build(tiny_cfg(steps=3, **kw), ctx)
        if name.endswith("-fork"):
            del t.dp.wrapped["phi"]
        phi0, theta0 = [full(p) for p in t.phi], [full(p) for p in t.theta]
        local = [float(t.train_step().get("l1", float("nan"))) for _ in range(3)]
        out[name] = {"theta": [full(p) for p in t.theta], "phi": [full(p) for p in t.phi],
                     "phi0": phi0, "theta0": theta0, "records": t.flush(), "local_l1": local}
    return out


def equiv(ctx) -> dict:
    """float64, global batch 8 (4 per rank), swap InfoNCE: gradients, losses, weights."""
    out = {}
    for name, gn in (("global", True), ("local", False)):
        t = build(tiny_cfg(strategy="two_phase", energy_loss="swap", batch_size=8, steps=2,
                           global_negatives=gn), ctx, torch.float64)
        seen = record_grads(t)
        steps = [{k: float(m[k]) for k in ("l1", "energy_loss")} for m in
                 (t.train_step() for _ in range(2))]  # this rank's float64 losses
        out[name] = {"grads": seen, "steps": steps, "records": t.flush(), "phi": [full(p) for p in t.phi],
                     "theta": [full(p) for p in t.theta]}
    return out


def resume(ctx, root: Path) -> None:
    quiet = dict(echo=lambda *a, **k: None)
    for strategy in ("cached_negatives", "two_phase"):
        kw = dict(strategy=strategy, steps=6, cache_refresh=2, probe_every=3,
                  energy_loss="explicit" if strategy == "cached_negatives" else "swap")
        train(tiny_cfg(**kw), root / f"{strategy}-full", **quiet)
        train(tiny_cfg(stop_after=3, **kw), root / f"{strategy}-half", **quiet)
        train(tiny_cfg(**kw), root / f"{strategy}-half", resume=True,
              overrides={"stop_after": 0}, **quiet)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu", 60.0)
    res = {"rank": ctx.rank, "world": ctx.world_size, "agree": agree(ctx), "equiv": equiv(ctx)}
    resume(ctx, out)
    torch.save(res, out / f"rank{ctx.rank}.pt")
    distributed.teardown(ctx)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
