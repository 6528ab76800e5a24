"""The ``energy-train`` command line (``python -m energy_train`` is the same)."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    """A tiny end-to-end use of the ops: negatives from every layer, energies, the losses."""
    import torch

    from . import (EnergyModel, L1RegressionActionHead, build_action_index, explicit_infonce,
                   layer_actions, ranking_accuracy, structured_negatives, swap_infonce)

    torch.manual_seed(args.seed)
    B, T, D, L, H, Da = 4, 80, 64, 6, 8, 7
    head = L1RegressionActionHead(input_dim=D, hidden_dim=128, action_dim=Da, num_actions_chunk=H)
    energy = EnergyModel(D, Da, hidden=64, heads=4)
    hidden = [torch.randn(B, T, D) for _ in range(L + 1)]
    index = build_action_index(num_tokens=H * Da, start=torch.full((B,), 10))
    negatives = layer_actions(hidden, index, head)
    expert = torch.randn(B, H, Da)
    swap = swap_infonce(energy, hidden[-1], None, expert)
    expl = explicit_infonce(energy, hidden[-1], None, expert, structured_negatives(expert, negatives))
    print(f"layer actions {tuple(negatives.shape)}; swap InfoNCE {swap.loss.item():.4f} "
          f"(acc {ranking_accuracy(swap).item():.2f}); explicit InfoNCE {expl.loss.item():.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="energy-train", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the ops once on random tensors")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
