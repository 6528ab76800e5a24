"""The ``energy-train`` command line (``python -m energy_train`` is the same).

  energy-train train                  the embedded default (tiny VLA, CPU: about two minutes)
  energy-train train --strategy joint --steps 300 --out runs/j
  energy-train train --config my.toml --set optim.lr=3e-4 --set energy.loss=explicit
  energy-train train --policy mypkg.policies:make_policy  your own policy
  energy-train train --resume --out runs/j [--steps 600]
  energy-train compare                the stability study: strategies x seeds -> report
  energy-train compare --preset fork  the public energy fork's recipe and its ablations
  energy-train demo                   the ops once on random tensors
  energy-train plan --case oft-7b     the peak memory of a step per strategy, before renting a GPU
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import Typed, build, default_config, load_toml


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


# what `compare --report-only` does not use: (flag, argparse dest)
REPORT_IGNORES = [("--strategies", "strategies"), ("--preset", "preset"), ("--seeds", "seeds"),
                  ("--init-from", "init_from"), ("--init-phi", "init_phi"), ("--jobs", "jobs"),
                  ("--pretrain-steps", "pretrain_steps"), ("--policy", "policy"),
                  ("--steps", "steps"), ("--batch-size", "batch_size"), ("--device", "device"),
                  ("--seed", "seed"), ("--config", "config"), ("--set", "set")]

FLAGS = {"policy": "run.policy", "strategy": "run.strategy", "steps": "run.steps",
         "batch_size": "run.batch_size", "device": "run.device", "seed": "run.seed",
         "stop_after": "run.stop_after", "log_every": "run.log_every"}


def _sets(args) -> dict:
    """--set key=value pairs (flat or section.key)."""
    out = {}
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        out[key.strip()] = Typed(value.strip())  # text: a free-form [policy] key parses TOML
    return out


def _flags(args) -> dict:
    """The explicit CLI flags as {"section.key": value} (they win over --set)."""
    out = {key: getattr(args, flag) for flag, key in FLAGS.items()
           if getattr(args, flag, None) is not None}
    if getattr(args, "no_progress", False):
        out["run.progress"] = False
    return out


def _layers(args, extra: dict | None = None, where: str = "compare defaults") -> list:
    """defaults (``extra``) < --config TOML < --set < explicit flags."""
    layers = []
    if extra:
        layers.append((extra, where))
    if getattr(args, "config", None):
        layers.append((load_toml(args.config), f"--config {args.config}"))
    layers += [(_sets(args), "--set"), (_flags(args), "command line")]
    return layers


def _train(args) -> int:
    from .trainer import train

    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its saved config; drop --config")
        train(default_config(), args.out, resume=True, overrides={**_sets(args), **_flags(args)})
    else:
        train(build({}, _layers(args)), args.out)
    return 0


def _compare(args) -> int:
    from .study.compare import PRESETS, PRETRAIN_STEPS, STUDY, compare, default_jobs, parse_seeds

    if args.report_only:
        from .study.compare import report_again
        given = [flag for flag, dest in REPORT_IGNORES if getattr(args, dest, None) not in (None, False)]
        if given:
            raise ValueError(f"--report-only rewrites the report of the study in --out from its "
                             f"runs (only --k applies); drop {', '.join(given)}")
        report_again(args.out, args.k)
        return 0
    args.preset = args.preset or "default"
    preset = PRESETS[args.preset]
    cfg = build({}, _layers(args, {**STUDY, **preset["base"]}, f"--preset {args.preset}"))
    specs = [s for s in args.strategies.split(";") if s.strip()] if args.strategies else list(preset["specs"])
    seeds = parse_seeds("3" if args.seeds is None else args.seeds, cfg.run.seed)
    pretrain = args.pretrain_steps
    if pretrain is None:
        pretrain = 0 if args.init_from else PRETRAIN_STEPS
    if pretrain < 0:
        raise ValueError(f"--pretrain-steps: expected an integer >= 0, got {pretrain}")
    compare(cfg, specs, args.out, seeds=seeds, k=4.0 if args.k is None else args.k,
            init_from=args.init_from,
            init_phi=args.init_phi, pretrain_steps=pretrain, title=f"preset {args.preset}",
            jobs=default_jobs() if args.jobs is None else args.jobs)
    return 0


def _plan(args) -> int:
    import json
    from pathlib import Path

    from .plan import STRATEGIES, plan, report

    overrides = {**_sets(args), **_flags(args)}
    strategies = tuple(args.plan_strategies) if args.plan_strategies else STRATEGIES
    capability = None
    if args.capability:
        try:
            capability = tuple(int(v) for v in args.capability.split("."))
            if len(capability) != 2:
                raise ValueError
        except ValueError:
            print(f"--capability: expected MAJOR.MINOR (e.g. 9.0), got {args.capability!r}",
                  file=sys.stderr)
            return 2
    p = plan(args.case, overrides, strategies=strategies, device=args.device,
             target=args.target, checkpointing=not args.no_checkpointing, fsdp_world=args.fsdp,
             capability=capability)
    print(report(p), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1, default=str))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="a registered policy (tiny, the default; oft-standin), "
                   "module:factory or path/to/file.py:factory (your own: factory(cfg, device) -> "
                   "energy_train.policies.Setup)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--device", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="a TOML file: tables [run] [optim] [energy] [strategy] "
                   "[dist] [policy] (flat keys are mapped to their section)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any config key (repeatable), e.g. --set energy.loss=explicit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="energy-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the ops once on random tensors")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train the embedded default (or a configured run)")
    t.add_argument("--strategy", help="joint | two_phase (default) | shared_forward | "
                   "alternating | adaptive_weights | cached_negatives")
    _common(t)
    t.add_argument("--out", help="run directory (default runs/<time>-<strategy>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "latest checkpoint (bitwise the same as an uninterrupted run)")
    t.add_argument("--stop-after", dest="stop_after", type=int,
                   help="stop (checkpointed) after this step; --resume continues")
    t.add_argument("--log-every", dest="log_every", type=int)
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="the stability study: strategies x settings x seeds on the "
                       "same data -> a report (markdown + PNG + JSON)")
    c.add_argument("--strategies", help="';'-separated specs name[:key=value,...] (default: the "
                   "preset's; default preset: joint; joint:detach_context=false; two_phase; "
                   "shared_forward; alternating; adaptive_weights; cached_negatives; "
                   "two_phase:lr=0 (theta frozen: the noise floor))")
    c.add_argument("--preset", choices=("default", "fork"), default=None,
                   help="base config and specs: default (explicit loss with the policy's own "
                   "prediction as a negative) or fork (the public energy fork's first recipe: "
                   "bf16 energy weights, sigmoid output, no phi clipping, lr 5e-4 constant, "
                   "swap loss, whole last hidden state as context; one ablation per setting)")
    c.add_argument("--seeds", default=None, help="N (N seeds from --seed) or a list 0,1,2 (default 3)")
    c.add_argument("--init-from", dest="init_from", metavar="RUN_DIR",
                   help="start every run from this run's latest checkpoint (theta; phi with "
                   "--init-phi) instead of pretraining")
    c.add_argument("--init-phi", dest="init_phi", action="store_true",
                   help="also load phi (the energy model) from the starting checkpoint")
    c.add_argument("--jobs", type=int, help="study runs at once, one process each (default: "
                   "the CPU cores this process may use, at most 2; the numbers do not depend on it)")
    c.add_argument("--pretrain-steps", dest="pretrain_steps", type=int,
                   help="train theta this many steps first (two_phase, into OUT/pretrain) and "
                   "start every run from it (default 300, 0 with --init-from; 0 = start from "
                   "the initialisation)")
    _common(c)
    c.add_argument("--out", default="runs/compare", help="report directory (default runs/compare)")
    c.add_argument("--k", type=float, default=None, help="spike threshold in EMA sigmas (default 4)")
    c.add_argument("--report-only", dest="report_only", action="store_true",
                   help="rewrite the report of the finished study in --out from its runs' "
                   "metrics (no training)")
    c.set_defaults(func=_compare)

    m = sub.add_parser("plan", help="the peak device memory of a training step per strategy "
                       "and part (fake tensors: no GPU, no memory needed)")
    m.add_argument("--case", default="tiny", help="tiny (default), oft-standin, oft-7b "
                   "(OpenVLA-OFT's shapes: Llama-2 7B, LoRA r 32, T ~590, B 8, bf16), oft-1b")
    m.add_argument("--strategy", dest="plan_strategies", action="append",
                   help="a strategy to plan (repeatable; "
                   "default joint, two_phase, shared_forward)")
    m.add_argument("--device", default=None, help="where the fake tensors live: cpu, cuda "
                   "(default cuda when CUDA is present: its autocast and dispatch)")
    m.add_argument("--target", default="cuda", choices=("cuda", "cpu"),
                   help="the device class whose `auto` picks the fused ops (default cuda)")
    m.add_argument("--fsdp", type=int, default=8, help="GPUs of the FSDP estimate (default 8)")
    m.add_argument("--capability", default=None, metavar="MAJOR.MINOR",
                   help="the GPU's compute capability for the cuBLAS/cuBLASLt workspace lines "
                   "(e.g. 9.0 for an H100/H200; default: the planned device's when it is CUDA, "
                   "none on the CPU)")
    m.add_argument("--no-checkpointing", dest="no_checkpointing", action="store_true",
                   help="skip the activation-checkpointing what-if")
    m.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set a config key (repeatable), e.g. --set run.batch_size=4")
    m.add_argument("--batch-size", dest="batch_size", type=int)
    m.add_argument("--json", help="also write the plan as JSON here")
    m.set_defaults(func=_plan)
    return p


# errors whose message names what to fix; any other type is named in front of its message
NAMED = (ValueError, TypeError, RuntimeError, FloatingPointError, OSError, ImportError)


def one_line(e: BaseException) -> str:
    """An error as one line: its message (an OSError: the file and the reason), whitespace
    collapsed; a type outside :data:`NAMED` is named first."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e)
    if not isinstance(e, NAMED) or not msg.strip():
        msg = f"{type(e).__name__}: {msg}"
    return " ".join(msg.split())


def main(argv=None) -> int:
    """The command line; every error a user can cause is one line on stderr, exit code 2 (a
    run's error.txt keeps the traceback; ENERGY_TRAIN_TRACEBACK=1 raises instead)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line too (a run's error.txt says where it stopped)
        if os.environ.get("ENERGY_TRAIN_TRACEBACK") == "1":
            raise
        print(f"energy-train {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one line, error.txt the traceback
        if os.environ.get("ENERGY_TRAIN_TRACEBACK") == "1":
            raise
        print(f"energy-train {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
