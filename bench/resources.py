"""Hopper evidence without a GPU: compile every shipped kernel config for sm_90 and report
registers, spills (local memory / stack), shared memory, whether the PTX uses wgmma, and the
SASS of its hottest loop (``loop_sass``: instructions per iteration of the loop with the most
tensor-core MMAs, ``loop_mma``: the HGMMA / HMMA in it) - what a K step costs the issue slots.

``python -m bench.resources [--filter SUBSTR] [--json PATH]`` (or ``make resources``).
TRITON_INTERPRET must be unset (the command re-executes itself without it).

Registering configs: every op's ``energy_train.kernels.<op>.configs`` module may define
``resource_configs()``, a list of dicts built with the same pickers its launchers use::

    dict(name="op.pass.dtype", kernel=<@triton.jit fn, optionally under @triton.heuristics>,
         args={"x_ptr": "*bf16", "b_ptr": None, "M": 2112, "eps": 1e-5, ...},  # every runtime
               # argument: pointer type strings, None (an absent optional pointer), or example
               # ints / floats (ints equal to 1 become the constexpr 1 and multiples of 16 get
               # the divisibility hint, as the JIT does)
         constexprs={"BLOCK_M": 128, "DOT_DTYPE": "bf16", ...},  # dtype constexprs as strings;
               # flags a @triton.heuristics derives are computed from args, as at launch
         num_warps=8, num_stages=4,
         expect_wgmma=True)   # optional: the report flags (and the test fails) a GEMM without it

Compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; the cubin
goes through the ``cuobjdump --dump-resource-usage`` shipped in Triton's wheel.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _ensure_not_interpreting():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        os.execve(sys.executable, [sys.executable, "-m", "bench.resources", *sys.argv[1:]], env)


def collect_configs() -> list[dict]:
    import energy_train.kernels as kpkg
    out = []
    for op in kpkg.OPS:
        try:
            mod = importlib.import_module(f"energy_train.kernels.{op}.configs")
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "resource_configs"):
            out += list(mod.resource_configs())
    return out


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return str(path)


def compile_config(cfg: dict):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Heuristics

    fn, given = cfg["kernel"], dict(cfg.get("constexprs", {}))
    if isinstance(fn, Heuristics):  # derive its flags from the arguments, as a launch would
        for name, rule in fn.values.items():
            given[name] = rule({**cfg["args"], **given})
        fn = fn.fn
    signature, constexprs, attrs = {}, {}, {}
    for name in fn.arg_names:
        if name in given:
            v = given[name]
            if isinstance(v, str) and v in ("bf16", "fp16", "fp32"):
                v = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[v]
            signature[name] = "constexpr"
            constexprs[name] = v
            continue
        v = cfg["args"][name]
        i = fn.arg_names.index(name)
        if v is None:  # an absent optional pointer: a constexpr None, as the JIT specialises it
            signature[name] = "constexpr"
            constexprs[name] = None
        elif isinstance(v, str):
            signature[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{cfg['name']}: argument {name}: unsupported example {v!r}")
        elif v == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def sass_loops(cubin: bytes) -> list:
    """[(instructions, tensor-core MMAs: HGMMA or HMMA)] per loop of the SASS: a backward branch closes a loop, whose
    body runs from the branch's target to it; counted along its shortest path, i.e. without
    the blocks that a predicated forward branch inside the body skips (a persistent kernel's
    once-per-tile epilogue and set-up): what one K step issues."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_cuobjdump(), "--dump-sass", str(path)], capture_output=True,
                              text=True, timeout=120).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    branches = [(a, int(m.group(1), 16), t.startswith("@")) for a, t in ins
                for m in [re.search(r"BRA (?:`\(\.L_x_\d+\) )?(0x[0-9a-f]+)", t)] if m]
    loops = []
    for end, start, _ in branches:
        if start >= end:
            continue
        skipped = set()
        for a, target, cond in branches:
            if cond and start <= a < target <= end:
                skipped.update(x for x, _ in ins if a < x < target)
        body = [t for a, t in ins if start <= a <= end and a not in skipped]
        loops.append((len(body), sum(("HGMMA" in t or "HMMA" in t) for t in body)))
    return loops


def resource_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, timeout=120).stdout
    res = {}
    for key, pat in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"),
                     ("shared", r"SHARED:(\d+)"), ("local", r"LOCAL:(\d+)")):
        m = re.search(pat, out)
        res[key] = int(m.group(1)) if m else None
    res["raw"] = out.strip().splitlines()[-1] if out.strip() else ""
    return res


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):  # @triton.heuristics -> @triton.jit -> the Python function
        kernel = kernel.fn
    return kernel.__name__


def report(configs: list[dict], log=print) -> list[dict]:
    rows = []
    for cfg in configs:
        k = compile_config(cfg)
        use = resource_usage(k.asm["cubin"])
        ptx = k.asm["ptx"]
        smem = getattr(k.metadata, "shared", None)
        row = dict(name=cfg["name"], kernel=_kernel_name(cfg["kernel"]), num_warps=cfg["num_warps"],
                   num_stages=cfg["num_stages"], registers=use["registers"], stack=use["stack"],
                   local=use["local"], shared_static=use["shared"], shared_dynamic=smem,
                   wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                   spills=bool(use["stack"] or use["local"]),
                   ld_local=ptx.count("ld.local"), st_local=ptx.count("st.local"),
                   expect_wgmma=bool(cfg.get("expect_wgmma", False)))
        loops = sass_loops(k.asm["cubin"])
        hot = max(loops, key=lambda x: (x[1], -x[0]), default=(0, 0))
        row.update(loop_sass=hot[0], loop_mma=hot[1], n_loops=len(loops))
        rows.append(row)
        log(f"| {row['name']} | {row['num_warps']} | {row['num_stages']} | {row['registers']} | "
            f"{row['stack']} | {row['local']} | {row['shared_dynamic']} | "
            f"{'yes' if row['wgmma'] else ('mma.sync' if row['mma_sync'] else 'no')} | "
            f"{row['loop_sass']} | {row['loop_mma']} |")
    return rows


HEADER = ("| config | warps | stages | registers/thread | stack B | local B | shared B | wgmma "
          "| SASS/iter of the hot loop | MMAs in it |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    _ensure_not_interpreting()
    ap = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__.split("\n")[0])
    ap.add_argument("--filter", default="", help="only configs whose name contains this")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    import triton
    configs = [c for c in collect_configs() if args.filter in c["name"]]
    print(f"sm_90 resource report: {len(configs)} shipped configs, triton {triton.__version__}")
    print(HEADER)
    rows = report(configs)
    spills = [r["name"] for r in rows if r["spills"]]
    no_tc = [r["name"] for r in rows if r["expect_wgmma"] and not r["wgmma"]]
    print(f"\nspilling configs: {spills or 'none'}")
    print(f"configs expecting wgmma without it: {no_tc or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
