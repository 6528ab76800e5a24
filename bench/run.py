"""``python -m bench.run <op> [--quick] [--cpu-shapes] [--device cuda|cpu] [--out DIR]``:
run ``bench/bench_<op>.py``'s benchmark through bench.harness (see its docstring)."""
from __future__ import annotations

import argparse
import importlib
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
        mod.run_standalone(device, args.quick, args.out, args.tag)
    else:
        bench = mod.make_benchmark(device, quick=args.quick,
                                   cpu_shapes=args.cpu_shapes or device.type != "cuda")
        run_benchmark(bench, device, args.out, args.tag)
    print(f"results under {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
