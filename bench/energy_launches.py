"""The energy op's Triton launches, one production fwd+bwd, seen from the CPU: ``python -m
bench.energy_launches [--chains chain|tiled] [--json PATH] [--md PATH]`` (TRITON_INTERPRET
unset; no GPU needed; ``--chains tiled``: v5's variant, written to energy-launches-tiled-sm90.*).

For each case (the swap InfoNCE fwd+bwd at B 8, S 600, D 4096, C = H = 8; fp32 model 512/8 and
1024/16 at "tf32x3", bf16 model 512/8) the launchers of kernels/energy run with every Triton
launch RECORDED instead of run (``JITFunction.run`` replaced: no kernel executes), so the grid,
the arguments and the compile options are exactly the production call's. Each recorded launch
is then compiled for sm_90 (``bench.resources.compile_config``: ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``) and its SASS read with source lines (``nvdisasm -g``):

- per loop of the SASS (a backward branch closes one), the instructions of ONE iteration per
  warp (its own body: nested loops' bodies excluded), the tensor-core MMAs (HGMMA / HMMA),
  global loads (LDG: synchronous; LDGSTS / UTMALDG: asynchronous copies, i.e. the loop is
  software-pipelined), shared-memory traffic and barriers, and the Python ``for`` it compiles;
- registers, shared memory, programs resident per SM (registers, shared memory, warps);
- per program, the trip count of each source loop (from the launch's shapes and tiles);
- a time model: waves x sum over loops of trips x cycles per iteration, where an iteration
  costs max(issue, latency): issue = SASS per warp x warps sharing a scheduler (4 per SM), at
  one instruction per cycle; latency = a global load's latency when the loop has a
  synchronous LDG (nothing in flight for the next iteration), a dependent MMA chain otherwise.
  The latency figures are ASSUMPTIONS (``LAT``), stated in the output; nothing here is measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

CLOCK_GHZ = 1.755   # H200 SXM boost clock
SMS = 132
REGS_PER_SM, SMEM_PER_SM, MAX_WARPS, MAX_BLOCKS = 65536, 228 * 1024, 64, 32
#: assumed cycles (NOT measured): a global load to its first use when nothing hides it (L2 hit
#: ~300, HBM ~600-800 with the address math and the dependent convert), an iteration's MMA
#: chain when the loads are asynchronous (wgmma issue + wait), a barrier round
LAT = dict(ldg_lo=450, ldg_hi=800)
#: the lone-warp CPI that makes the sum of the "hi" model match the three measured totals of
#: bench/results/energy-h200.md (683d510: 10.1 / 30.5 / 5.61 ms give 8.3 / 7.8 / 6.8): a FIT of
#: one free parameter to totals, not a per-kernel measurement
CPI_LONE_FIT = 7.5

LABELS = ("ctx.fc1 fwd (tiled)", "ctx.block fwd (tiled)", "ctx.fc2 fwd (tiled)",
          "ctx.kv fwd (tiled)", "pool chain fwd", "attention fwd", "head chain fwd",
          "head chain bwd", "attention dQ", "attention dK|dV", "pool chain bwd",
          "ctx.kv dx", "ctx.fc2 dx", "ctx.fc2 LN rows", "ctx.block dx", "ctx.block LN rows",
          "grouped dW", "dgamma sums")

#: the same fwd+bwd with chains="tiled" (v5: the pool's and the head's layers one tiled launch
#: each; the production model: action MLPResNet fc1, 1 block, fc2; head fc1, 2 blocks, fc2)
TILED_LABELS = (
    "ctx.fc1 fwd (tiled)", "ctx.block fwd (tiled)", "ctx.fc2 fwd (tiled)", "ctx.kv fwd (tiled)",
    "pool.fc1 fwd", "pool.block fwd", "pool.fc2 fwd (+pe)", "pool.q fwd", "attention fwd",
    "head.out fwd", "head.fc1 fwd", "head.block1 fwd", "head.block2 fwd", "head.fc2 fwd (N=1)",
    "head.fc2 dx", "head.fc2 LN rows", "head.block2 dx", "head.block2 LN rows", "head.block1 dx",
    "head.block1 LN rows", "head.fc1 dx", "head.fc1 LN rows", "head.out dx", "attention dQ",
    "attention dK|dV", "pool.q dx", "pool.fc2 dx", "pool.fc2 LN rows", "pool.block dx",
    "pool.block LN rows", "ctx.kv dx", "ctx.fc2 dx", "ctx.fc2 LN rows", "ctx.block dx",
    "ctx.block LN rows", "grouped dW", "dgamma sums")

CASES = (("fp32-E512h8", 512, 8, "float32"), ("fp32-E1024h16", 1024, 16, "float32"),
         ("bf16-E512h8", 512, 8, "bfloat16"))


# --------------------------------------------------------------------------------------------
# 1. the launches of one production fwd+bwd, recorded
# --------------------------------------------------------------------------------------------
def record_launches(E: int, heads: int, dtype, B=8, S=600, D=4096, H=8, Da=7,
                    chains: str = "chain") -> dict:
    """{"prec", "launches": [(kernel name, grid, {arg: value}, {constexpr / option: value})],
    "plan": the EnergyPlan}: the launches energy_forward + energy_backward make at this shape
    (swap InfoNCE: one shared pool of C = B candidates, context detached), none executed;
    chains: kernels/energy/launch.py CHAINS ("tiled": v5)."""
    import torch
    from triton.runtime.jit import JITFunction
    from energy_train.kernels._utils import resolve_precision
    from energy_train.kernels.energy import launch as L
    from energy_train.models import EnergyModel
    from energy_train.models.weights import energy_weights

    rec = []

    def run(self, *args, grid, warmup, **kwargs):
        rec.append((self.fn.__name__, tuple(grid), dict(zip(self.arg_names, args)), kwargs))

    orig, JITFunction.run = JITFunction.run, run
    try:
        model = EnergyModel(D, Da, hidden=E, heads=heads).to(dtype)
        w = energy_weights(model)
        C = B
        shapes, eps = L.energy_layout(w)
        s = L.EnergyShape(B, S, D, 1, C, H, Da, E, heads)
        ep = L.energy_plan(s, (shapes, eps), w.state.activation, dtype, False, False)
        P = L.flat_parameters(w, ep.n_const).detach()
        prec = resolve_precision(None, dtype)
        ctx = torch.zeros(B * S, D, dtype=torch.bfloat16)  # the bench's context dtype on a GPU
        pad = torch.zeros(B * S, dtype=torch.bool)
        raw = torch.empty(B * C * H, dtype=dtype)
        ws = torch.empty(ep.plan.ws, dtype=torch.float32)
        L.energy_forward(ep, s, P, ctx, pad, torch.zeros(C * H, Da, dtype=dtype),
                         torch.zeros(H, E, dtype=dtype), raw, ws, prec, chains)
        L.energy_backward(ep, s, P, ctx, pad, raw, ws, torch.empty_like(P), None, None, prec,
                          chains)
    finally:
        JITFunction.run = orig
    return dict(prec=prec, launches=rec, plan=ep, shape=s)


def compile_cfg(name, args, kw) -> dict:
    """bench.resources' config dict of a recorded launch."""
    import torch
    from energy_train.kernels.energy import fused as ef
    from energy_train.kernels.mlp import fused as mf
    kernel = getattr(mf, name, None) or getattr(ef, name)
    while hasattr(kernel, "fn") and not hasattr(kernel, "arg_names"):
        kernel = kernel.fn
    types = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
             torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*u8"}
    a = {k: (types[v.dtype] if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    c = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    return dict(name=name, kernel=kernel, args=a, constexprs=c, num_warps=kw["num_warps"],
                num_stages=kw["num_stages"])


# --------------------------------------------------------------------------------------------
# 2. SASS per loop, with source lines
# --------------------------------------------------------------------------------------------
def _nvdisasm() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def sass_with_lines(cubin: bytes) -> list:
    """[(address, instruction, (file, line))] of the kernel."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        text = subprocess.run([_nvdisasm(), "-g", "-c", str(p)], capture_output=True, text=True,
                              timeout=300).stdout
    out, where, labels, pending = [], (None, None), {}, []
    for line in text.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if m:
            a = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = a
            pending = []
            out.append((a, m.group(2).strip(), where))
    end = out[-1][0] + 16 if out else 0
    for lab in pending:
        labels[lab] = end
    # branch targets as addresses (nvdisasm prints labels)
    return [(a, re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels.get(m.group(1), -1)), t), w)
            for a, t, w in out]


_SRC: dict = {}


def _src_line(path, n) -> str:
    if path not in _SRC:
        try:
            _SRC[path] = Path(path).read_text().splitlines()
        except OSError:
            _SRC[path] = []
    lines = _SRC[path]
    return lines[n - 1].strip() if 0 < n <= len(lines) else ""


def loops_of(ins: list) -> list:
    """Loops of the SASS, innermost first: dict(start, end, own instructions per iteration
    (nested loops excluded), counts by kind, the source ``for`` lines in the body, depth)."""
    spans = []
    for a, t, _ in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            spans.append((int(m.group(1), 16), a))
    spans = sorted(set(spans))
    out = []
    for s, e in spans:
        inner = [(s2, e2) for s2, e2 in spans if (s2, e2) != (s, e) and s <= s2 and e2 <= e]
        body = [(a, t, w) for a, t, w in ins if s <= a <= e
                and not any(s2 <= a <= e2 for s2, e2 in inner)]
        # the shortest path: without what a predicated forward branch in the body skips
        skipped = set()
        for a, t, _ in body:
            m = re.search(r"BRA (0x[0-9a-f]+)", t)
            if m and t.startswith("@") and a < int(m.group(1), 16) <= e:
                skipped.update(x for x, _, _ in body if a < x < int(m.group(1), 16))
        short = len([1 for a, _, _ in body if a not in skipped])
        ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t, _ in body)
        fors = Counter()
        for _, _, (f, n) in body:
            if f and _src_line(f, n).startswith("for "):
                fors[f"{Path(f).name}:{n} {_src_line(f, n)}"] += 1
        lines = Counter(f"{Path(f).name}:{n}" for _, _, (f, n) in body if f)
        depth = sum(1 for s2, e2 in spans if (s2, e2) != (s, e) and s2 <= s and e <= e2)
        out.append(dict(start=s, end=e, sass=len(body), sass_short=short,
                        hgmma=ops["HGMMA"], hmma=ops["HMMA"], ldg=ops["LDG"],
                        ldgsts=ops["LDGSTS"], utmaldg=ops["UTMALDG"], lds=ops["LDS"] + ops["LDSM"],
                        sts=ops["STS"], stg=ops["STG"], bar=ops["BAR"],
                        ffma=ops["FFMA"], depth=depth, n_inner=len(inner),
                        fors=[k for k, _ in fors.most_common(3)],
                        top_lines=[k for k, _ in lines.most_common(4)]))
    return out


def occupancy(regs: int, smem: int, warps: int) -> int:
    """Programs resident per SM (registers allocated per warp in units of 256, shared memory
    + 1 KiB reserved per block)."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // warps
    by_smem = SMEM_PER_SM // (smem + 1024) if smem else MAX_BLOCKS
    return max(0, min(by_regs, by_smem, MAX_WARPS // warps, MAX_BLOCKS))


# --------------------------------------------------------------------------------------------
# 3. trip counts per program, from the launch's shapes and tiles
# --------------------------------------------------------------------------------------------
def _cd(a, b):
    return -(-a // b)


def trips(name: str, grid, args: dict, kw: dict, plan) -> dict:
    """{source loop: iterations per program} (the busiest program where programs differ) and
    "programs"; the keys name the loops as ``loops_of`` finds them (by their ``for`` line)."""
    from energy_train.kernels.mlp.launch import C as COL
    bm, bn, bk = kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("BLOCK_K")
    progs = math.prod(grid)
    if name == "_linear_tiled_kernel":
        K = args["K"]
        t = {"main K": _cd(K, bk)}
        if kw["HAS_LN"]:
            t["stats K"] = _cd(K, bk)
        return dict(programs=progs, loops=t)
    if name == "_linear_dx_kernel":
        return dict(programs=progs, loops={"main N": _cd(args["N"], bn)})
    if name == "_ln_bwd_rows_kernel":
        t = {"dx pass": _cd(args["K"], bk)}
        if kw["HAS_LN"]:
            t["stats pass"] = _cd(args["K"], bk)
        return dict(programs=progs, loops=t)
    rows = plan.plan.rows
    if name == "_stack_fwd_kernel":
        t = Counter()
        for li in range(args["layer0"], args["layer0"] + args["n_layers"]):
            r = rows[li]
            K, N = r[COL["K"]], r[COL["N"]]
            if r[COL["LN"]]:
                t["stats K"] += _cd(K, bk)
            t["N tiles"] += _cd(N, bn)
            t["K steps (MMA)"] += _cd(N, bn) * _cd(K, bk)
        t["layers"] = args["n_layers"]
        return dict(programs=progs, loops=dict(t))
    if name == "_stack_bwd_kernel":
        t = Counter()
        for i in range(args["n_layers"]):
            r = rows[args["layer_last"] - i]
            K, N = r[COL["K"]], r[COL["N"]]
            t["dpre N"] += _cd(N, bn)
            if r[COL["DX"]] != -2:
                t["dx K tiles (pass 1)"] += _cd(K, bk)
                t["dx N steps (MMA)"] += _cd(K, bk) * _cd(N, bn)
                t["dx K (pass 2)"] += _cd(K, bk)
        t["layers"] = args["n_layers"]
        return dict(programs=progs, loops=dict(t))
    if name == "_stack_dw_kernel":
        work = []
        for i, r in enumerate(rows):
            n = _cd(r[COL["N"]], bn) * _cd(r[COL["K"]], bk)
            work += [_cd(r[COL["M"]], bm)] * n
        by_m = Counter(work)
        return dict(programs=progs, loops={"M steps (MMA)": max(work)},
                    programs_by_steps=dict(sorted(by_m.items(), reverse=True)))
    if name == "_stack_dgamma_kernel":
        nt = max(_cd(r[COL["N"]], args["BLOCK_N_DW"]) for r in rows if r[COL["LN"]])
        return dict(programs=progs, loops={"N tiles": nt})
    if name == "_energy_attention_fwd_kernel":
        return dict(programs=progs, loops={"key blocks": _cd(args["n_k"], bn)})
    if name == "_energy_attention_bwd_dq_kernel":
        nb = args["n_batch"] if kw["SHARED_Q"] else 1
        return dict(programs=progs, loops={"samples": nb, "key blocks": nb * _cd(args["n_k"], bn)})
    if name == "_energy_attention_bwd_dkdv_kernel":
        return dict(programs=progs, loops={"query blocks": _cd(args["n_q"], bm)})
    raise KeyError(name)


def _match(kernel: str, key: str, loops: list):
    """The SASS loop a trip count drives (by MMA content, nesting and the ``for`` it compiles)."""
    mma = [l for l in loops if l["hgmma"] + l["hmma"]]
    plain = [l for l in loops if not (l["hgmma"] + l["hmma"])]

    def first(c):
        return c[0] if c else None
    if "MMA" in key or key in ("main K", "main N", "key blocks", "query blocks"):
        return first(sorted(mma, key=lambda l: -l["sass"]))
    if kernel == "_linear_tiled_kernel":
        return first(plain)
    if kernel == "_ln_bwd_rows_kernel":
        by_addr = sorted(loops, key=lambda l: l["start"])
        return by_addr[0] if key == "stats pass" else by_addr[-1]
    if kernel == "_stack_dgamma_kernel":
        return first(sorted(loops, key=lambda l: -l["sass"]))
    if key in ("layers", "samples"):
        return first([l for l in loops if l["depth"] == 0])
    if key in ("N tiles", "dx K tiles (pass 1)"):
        return first([l for l in plain if l["depth"] == 1 and l["n_inner"] == 1])
    if key == "stats K":
        return first([l for l in plain if l["depth"] == 1 and l["n_inner"] == 0])
    if key == "dpre N":
        return first([l for l in plain if l["depth"] == 1 and l["n_inner"] == 0
                      and any("n0" in f for f in l["fors"][:1])])
    if key == "dx K (pass 2)":
        return first([l for l in plain if l["depth"] == 1 and l["n_inner"] == 0
                      and any("k0" in f for f in l["fors"][:1])])
    return None


def estimate(entry: dict) -> dict:
    """Cycles per program and ms per launch, (lo, hi), from the loops (module docstring).
    w = warps sharing a scheduler, from the programs actually resident (a grid smaller than
    the SMs leaves ONE program per SM: w = warps / 4). Per iteration, SASS = its own
    instructions per warp (lo: the shortest path, hi: every instruction of the body):
      w = 1 (a lone warp: nothing hides a dependency): SASS x CPI_lone, CPI_lone 2 (lo) - 5 (hi)
      w > 1: SASS x w x CPI, CPI 1 (lo) - 1.5 (hi)
      + a synchronous global load (LDG and no LDGSTS/UTMALDG in the body): lo max(issue, 450),
        hi issue + 800 (assumed latencies, LAT)."""
    loops = entry["sass_loops"]
    progs = entry["trips"]["programs"]
    res = entry["resident_per_sm"]
    active = max(1, min(res, math.ceil(progs / SMS)))
    w = max(1, entry["num_warps"] * active // 4)
    t = entry["trips"]["loops"]

    def cost(l, hi, cpi_lone=None):
        n = l["sass"] if hi else l["sass_short"]
        lone = cpi_lone or (5 if hi else 2)
        issue = n * lone if w == 1 else n * w * (1.5 if hi else 1.0)
        if l["ldg"] and not (l["ldgsts"] or l["utmaldg"]):
            return issue + LAT["ldg_hi"] if hi else max(issue, LAT["ldg_lo"])
        return issue

    lo = hi = fit = 0.0
    used = {}
    for k, n in t.items():
        l = _match(entry["kernel"], k, loops)
        if l is None:
            continue
        lo += n * cost(l, False)
        hi += n * cost(l, True)
        fit += n * cost(l, True, CPI_LONE_FIT)
        used[k] = dict(start=hex(l["start"]), sass=l["sass"], sass_short=l["sass_short"],
                       cyc_lo=cost(l, False), cyc_hi=cost(l, True))
    if entry["kernel"] == "_stack_dw_kernel":  # programs differ: the long ones set the waves
        pb = {int(k): v for k, v in entry["trips"]["programs_by_steps"].items()}
        long_steps = max(pb)
        waves = sum(v * k for k, v in pb.items()) / long_steps / (SMS * res)
    else:
        waves = progs / (SMS * res) if res else float("inf")
    waves_c = max(1, math.ceil(waves - 1e-9))
    launch_us = 3.0  # a launch's fixed cost back to back (ramp, tail, the launch itself)
    return dict(cycles_per_program=(lo, hi), waves=waves, waves_charged=waves_c,
                warps_per_scheduler=w, loops=used,
                ms=(lo * waves_c / CLOCK_GHZ / 1e6 + launch_us / 1e3,
                    hi * waves_c / CLOCK_GHZ / 1e6 + launch_us / 1e3),
                ms_fit=fit * waves_c / CLOCK_GHZ / 1e6 + launch_us / 1e3)


# --------------------------------------------------------------------------------------------
def analyse_case(E, heads, dtype_name, log=print, chains: str = "chain") -> dict:
    import torch
    from bench.resources import compile_config, resource_usage
    dtype = getattr(torch, dtype_name)
    r = record_launches(E, heads, dtype, chains=chains)
    labels = TILED_LABELS if chains == "tiled" else LABELS
    out = []
    cache = {}
    for i, (name, grid, args, kw) in enumerate(r["launches"]):
        cfg = compile_cfg(name, args, kw)
        key = (name, json.dumps({k: str(v) for k, v in cfg["args"].items()}, sort_keys=True),
               json.dumps({k: str(v) for k, v in cfg["constexprs"].items()}, sort_keys=True),
               cfg["num_warps"], cfg["num_stages"])
        if key not in cache:
            k = compile_config(cfg)
            use = resource_usage(k.asm["cubin"])
            ins = sass_with_lines(k.asm["cubin"])
            cache[key] = dict(registers=use["registers"], spill=bool(use["stack"] or use["local"]),
                              shared=getattr(k.metadata, "shared", 0) or 0,
                              wgmma="wgmma.mma_async" in k.asm["ptx"],
                              sass_total=len(ins), sass_loops=loops_of(ins))
        c = cache[key]
        e = dict(index=i + 1, label=labels[i] if len(r["launches"]) == len(labels) else name,
                 kernel=name, grid=list(grid), num_warps=kw["num_warps"],
                 num_stages=kw["num_stages"],
                 tiles={k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw}, **c)
        e["resident_per_sm"] = occupancy(c["registers"], c["shared"], kw["num_warps"])
        e["trips"] = trips(name, grid, args, kw, r["plan"])
        e["estimate"] = estimate(e)
        out.append(e)
        lo, hi = e["estimate"]["ms"]
        log(f"  {e['index']:2d} {e['label']:<22} grid {math.prod(grid):5d} regs {c['registers']:3d}"
            f" res/SM {e['resident_per_sm']} w {e['estimate']['warps_per_scheduler']} loops "
            f"{e['trips']['loops']} -> {lo:.3f}-{hi:.3f} ms (fit {e['estimate']['ms_fit']:.3f})")
    return dict(prec=r["prec"], chains=chains, launches=out)


def markdown(results: dict) -> str:
    first = next(iter(results.values()), {})
    n, chains = len(first.get("launches", ())), first.get("chains", "chain")
    lines = [f"# energy swap fwd+bwd: the {n} Triton launches on sm_90, from the CPU"
             + (f" (chains=\"{chains}\": v5, the pool and the head one tiled launch per layer)"
                if chains != "chain" else ""),
             "",
             "`python -m bench.energy_launches`: launches recorded from the production call "
             "(B 8, S 600, D 4096, C = H = 8, context detached), compiled for sm_90, SASS read "
             "with source lines. ESTIMATES, not measurements: clock "
             f"{CLOCK_GHZ} GHz, {SMS} SMs, assumed latencies {LAT} cycles "
             "(a synchronous global load to use, lo-hi). Cycles per iteration: see "
             "`estimate`'s docstring (w = warps per scheduler; a lone warp, w = 1, at CPI 2-5; "
             "'fit': CPI " f"{CPI_LONE_FIT}" ", the one parameter fitted to the measured totals).",
             ""]
    for case, res in results.items():
        tot = [sum(e["estimate"]["ms"][j] for e in res["launches"]) for j in (0, 1)]
        lines += [f"## {case} (dots: {res['prec'] if case.startswith('fp32') else 'bf16'})", "",
                  "| # | launch | grid | warps/stages | regs | res/SM | waves | hot loop: SASS/iter (MMA, LDG, LDGSTS) | trips per program | est. ms lo-hi | fit ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in sorted(res["launches"], key=lambda e: -e["estimate"]["ms"][1]):
            hot = max(e["sass_loops"], key=lambda l: (l["hgmma"] + l["hmma"], l["sass"]),
                      default=None)
            hs = ("-" if hot is None else
                  f"{hot['sass']} ({hot['hgmma']} HGMMA / {hot['hmma']} HMMA, {hot['ldg']}, "
                  f"{hot['ldgsts'] + hot['utmaldg']})")
            lo, hi = e["estimate"]["ms"]
            lines.append(f"| {e['index']} | {e['label']} | {math.prod(e['grid'])} | "
                         f"{e['num_warps']}/{e['num_stages']} | {e['registers']} | "
                         f"{e['resident_per_sm']} | {e['estimate']['waves']:.2f} | {hs} | "
                         f"{e['trips']['loops']} | {lo:.3f}-{hi:.3f} | "
                         f"{e['estimate']['ms_fit']:.3f} |")
        fit = sum(e["estimate"]["ms_fit"] for e in res["launches"])
        lines += ["", f"Sum of the estimates: {tot[0]:.2f}-{tot[1]:.2f} ms; with the fitted "
                  f"lone-warp CPI {CPI_LONE_FIT}: {fit:.2f} ms.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        os.execve(sys.executable, [sys.executable, "-m", "bench.energy_launches", *sys.argv[1:]],
                  env)
    ap = argparse.ArgumentParser(prog="python -m bench.energy_launches",
                                 description=__doc__.split("\n")[0])
    res_dir = Path(__file__).resolve().parent / "results"
    ap.add_argument("--chains", default="chain", choices=("chain", "tiled"),
                    help="how the pool and the head run (kernels/energy/launch.py CHAINS)")
    ap.add_argument("--json", type=Path, default=None,
                    help="default bench/results/energy-launches[-tiled]-sm90.json")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--case", action="append", default=None,
                    help=f"only these cases ({', '.join(c[0] for c in CASES)})")
    args = ap.parse_args(argv)
    stem = "energy-launches" + ("" if args.chains == "chain" else f"-{args.chains}") + "-sm90"
    args.json = args.json or res_dir / f"{stem}.json"
    args.md = args.md or res_dir / f"{stem}.md"
    results = {}
    for name, E, heads, dt in CASES:
        if args.case and name not in args.case:
            continue
        print(name)
        results[name] = analyse_case(E, heads, dt, chains=args.chains)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    args.md.write_text(markdown(results))
    print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
