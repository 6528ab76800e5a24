"""``python -m bench.run <op> [--quick] [--cpu-shapes] [--device cuda|cpu] [--out DIR]
[--case NAME ...] [--provider NAME ...] [--ceilings FILE]``: run ``bench/bench_<op>.py``'s
benchmark through bench.harness (see its docstring), optionally on a subset of its cases and
providers (scripts/gpu_check.py runs each provider group in its own process this way)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

from .harness import RESULTS, run_benchmark


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("op", help="benchmark name: bench/bench_<op>.py")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--cpu-shapes", action="store_true",
                    help="the reduced CPU shape set (default on a CPU device)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--tag", default=None, help="suffix for the result file names")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU only: torch threads (default 1: ratios stay stable on a shared "
                         "machine, where spinning OpenMP threads can slow a run 100x)")
    ap.add_argument("--case", action="append", default=None, metavar="NAME",
                    help="run only this case (repeatable; default: every case of the shape set)")
    ap.add_argument("--provider", action="append", default=None, metavar="NAME",
                    help="run only this provider (repeatable; default: every provider)")
    ap.add_argument("--ceilings", type=Path, default=None, metavar="FILE",
                    help="JSON of ceilings measured earlier on this device (bench.harness."
                         "measure_ceilings' keys) instead of measuring them again")
    args = ap.parse_args(argv)
    try:
        mod = importlib.import_module(f"bench.bench_{args.op}")
    except ModuleNotFoundError as e:
        ap.error(f"op: no bench/bench_{args.op}.py ({e})")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile-worker pool
    if hasattr(mod, "run_standalone"):  # times outside the harness (e.g. a C++ process)
        if args.case or args.provider or args.ceilings:
            ap.error(f"--case / --provider / --ceilings: bench_{args.op} runs all of its cases")
        mod.run_standalone(device, args.quick, args.out, args.tag)
        print(f"results under {args.out}/")
        return 0
    bench = mod.make_benchmark(device, quick=args.quick,
                               cpu_shapes=args.cpu_shapes or device.type != "cuda")
    for attr, wanted in (("cases", args.case), ("providers", args.provider)):
        if wanted is None:
            continue
        known = [x.name for x in getattr(bench, attr)]
        unknown = [w for w in wanted if w not in known]
        if unknown:
            ap.error(f"--{attr[:-1]}: {', '.join(unknown)} not in bench_{args.op}'s {attr} "
                     f"for this shape set: {', '.join(known)}")
        setattr(bench, attr, [x for x in getattr(bench, attr) if x.name in wanted])
    ceilings = None if args.ceilings is None else json.loads(args.ceilings.read_text())
    run_benchmark(bench, device, args.out, args.tag, ceilings=ceilings)
    print(f"results under {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
