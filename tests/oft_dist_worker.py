"""One rank of the OFT stand-in's DDP test: ``python tests/oft_dist_worker.py OUT`` with the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, ...), launched by
tests/test_oft.py. Trains ``--policy oft-standin`` with LoRA for 3 steps through
``energy_train.train`` (rank 0 writes OUT/run) and writes OUT/rank<r>.pt: theta and phi after
training, theta before, and the error a config without find_unused_parameters gets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from energy_train import train
from energy_train.config import default_config
from energy_train.integrations.openvla_oft.standin import build

OPTS = {"run.policy": "oft-standin", "run.steps": 3, "run.batch_size": 4, "run.log_every": 1,
        "run.probe_every": 0, "run.progress": False, "energy.hidden": 32, "energy.heads": 2,
        "energy.loss": "explicit", "policy.llm_dim": 32, "policy.vision_dim": 16,
        "policy.episodes": 8, "policy.episode_len": 4, "policy.lora_rank": 4}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    try:
        default_config(**OPTS)
        refused = None
    except ValueError as e:
        refused = str(e)
    cfg = default_config(**OPTS, **{"dist.find_unused_parameters": True})
    theta0 = {n: p.detach().clone() for n, p in build(cfg, torch.device("cpu")).policy.named_trainable()}
    res = train(cfg, out=out / "run", echo=lambda *a: None)
    t = res.trainer
    torch.save({"refused": refused, "theta0": theta0,
                "theta": {n: p.detach().clone() for n, p in t.policy.named_trainable()},
                "phi": {k: v.detach().clone() for k, v in t.energy.state_dict().items()}},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
