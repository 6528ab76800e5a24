"""Step benchmark: one optimizer step of each strategy, on three backbones.

``python -m bench.run step [--quick]`` (see bench/harness.py). Providers (each builds a fresh,
seeded Trainer and times ``train_step``; energy loss "explicit", so phase 2 makes the layer
actions):
- joint: one forward, both losses, both steps (the public loop);
- two_phase_seq: two_phase with overlap=False - the baseline;
- two_phase_overlap: two_phase with phase 2(k) on a side stream beside phase 1(k+1)
  (energy_train/trainer/overlap.py); on a CPU it runs in order (nothing can overlap);
- shared_forward: one forward, energy step on detached snapshots;
- two_phase_hidden_states: overlapped two_phase with output_hidden_states=True instead of the
  hook capture (shows what keeping L+1 full hidden states costs in peak memory);
- two_phase_seq_graphs / two_phase_overlap_graphs / shared_forward_graphs: the same steps with
  run.cuda_graphs = "on" (every part of the step a CUDA graph: energy_train/trainer/graphs.py);
  the providers above run with cuda_graphs = "off" (eager). On a CPU without the GPU
  stand-ins the graphed providers are not applicable; with them (the gpu-check dry run) they
  run the graphs' static-buffer plumbing on the CPU.
Backbones (cases):
- tiny: the embedded default (TinyVLA d=64, 4 layers, batch 16, T=79);
- oftstandin: ``--policy oft-standin``, the OpenVLA-OFT stand-in with OFT's LoRA (r=16) on a
  frozen random base (a Llama d=64, 2 layers, two 3-block ViTs per image, 2 images + proprio:
  T = 104-106), batch 16 (energy_train/integrations/openvla_oft/standin/);
- llama1b (GPU only): a Llama-style decoder, hidden 2048, 16 layers, 32 heads / 8 KV heads,
  FFN 8192 (~1.0B parameters), T=591 (529 patches), B=8, bf16, random weights (bench/llama_like.py);
- prodhead (GPU only): the production action head (D=4096, H*Da=56, hidden 4096, ~151M
  parameters) on 2 Llama-style D=4096 layers (FFN 11008), T=591, B=8, bf16.
Reported per (case, provider): ms/step (GPU: do_bench median of consecutive steps - the
overlapped steps really overlap from one call to the next; CPU: perf_counter), samples/s,
peak memory (GPU), per-phase times from the trainer's CUDA events (means over 20 steps), NVML
utilisation/power (GPU, when NVML answers). ``finish`` draws a Gantt chart of 3 overlapped
steps (CUDA events per phase per stream): results/step-timeline-<device>.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bench.harness import Benchmark, Case, Provider
from bench.llama_like import DecoderVLA
from energy_train.config import default_config
from energy_train.models import EnergyModel, L1RegressionActionHead
from energy_train.policies.tiny import TaskData, TinyPolicy
from energy_train.telemetry import GpuTelemetry
from energy_train.trainer import Trainer, build_trainer
from energy_train.trainer.graphs import WARMUP, standin

PROVIDERS = {
    "joint": dict(strategy="joint", cuda_graphs="off"),
    "two_phase_seq": dict(strategy="two_phase", overlap=False, cuda_graphs="off"),
    "two_phase_overlap": dict(strategy="two_phase", overlap=True, cuda_graphs="off"),
    "shared_forward": dict(strategy="shared_forward", cuda_graphs="off"),
    "two_phase_hidden_states": dict(strategy="two_phase", overlap=True, capture="hidden_states",
                                    cuda_graphs="off"),
    "two_phase_seq_graphs": dict(strategy="two_phase", overlap=False, cuda_graphs="on"),
    "two_phase_overlap_graphs": dict(strategy="two_phase", overlap=True, cuda_graphs="on"),
    "shared_forward_graphs": dict(strategy="shared_forward", cuda_graphs="on"),
}
BACKBONES = {
    "tiny": dict(kind="tiny", B=16),
    "oftstandin": dict(kind="oft-standin", B=16),
    "llama1b": dict(kind="decoder", B=8, d_model=2048, n_layers=16, n_heads=32, kv_heads=8,
                    ffn=8192, head_hidden=2048, image_size=92),
    "prodhead": dict(kind="decoder", B=8, d_model=4096, n_layers=2, n_heads=32, kv_heads=32,
                     ffn=11008, head_hidden=4096, image_size=92),
}
PHASES = ("step", "phase1", "opt_theta", "phase2", "phase2_read")


def make_trainer(spec: dict, provider: str, device: torch.device) -> Trainer:
    cfg = default_config(**PROVIDERS[provider], batch_size=spec["B"], steps=100_000,
                         warmup_steps=0, probe_every=0, log_every=10 ** 9, progress=False,
                         energy_loss="explicit", device=str(device))
    if spec["kind"] == "tiny":
        return build_trainer(cfg, device)
    if spec["kind"] == "oft-standin":
        return build_trainer(cfg.with_values({"run.policy": "oft-standin"}, "bench"), device)
    torch.manual_seed(0)
    with torch.device(device):
        model = DecoderVLA(d_model=spec["d_model"], n_layers=spec["n_layers"], n_heads=spec["n_heads"],
                           kv_heads=spec["kv_heads"], ffn=spec["ffn"], image_size=spec["image_size"])
        head = L1RegressionActionHead(spec["d_model"], spec["head_hidden"], 7, 8)
        energy = EnergyModel(spec["d_model"], 7, hidden=512, heads=8)
    policy = TinyPolicy(model.to(torch.bfloat16), head.to(torch.bfloat16))
    data = TaskData(0, 64, 8, batch_size=spec["B"], image_size=spec["image_size"], device=device)
    return build_trainer(cfg, device, policy=policy, energy=energy, data=data)


def graphs_apply(provider: str, device: torch.device) -> bool:
    """A graphed provider runs on CUDA, or on the CPU with the GPU stand-ins (dry run)."""
    return PROVIDERS[provider].get("cuda_graphs") != "on" or device.type == "cuda" or standin()


def _factory(provider: str):
    def factory(inputs):
        dev = inputs["device"]
        if not graphs_apply(provider, dev):
            return None  # "not applicable": cuda_graphs = "on" needs CUDA (or the stand-ins)
        inputs["trainers"].pop(provider, None)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        t = make_trainer(inputs["spec"], provider, dev)
        inputs["trainers"][provider] = t
        if PROVIDERS[provider].get("cuda_graphs") == "on":
            for _ in range(WARMUP + 1):  # warm-up and capture before anything is timed
                t.train_step()
            t.discard_metrics()

        def step():
            t.train_step()
            if t.step % 32 == 0:
                t.discard_metrics()  # no read-back (no sync) while timing
        return step
    return factory


def annotate(case: Case, provider: str, inputs: dict, rec: dict, device: torch.device) -> dict:
    """Per-phase times (means over n steps), wall ms/step, samples/s, peak memory, NVML."""
    t: Trainer = inputs["trainers"][provider]
    n = 20 if device.type == "cuda" else 5
    t.flush()
    tel = GpuTelemetry(device)
    tel.sample()  # resets torch's peak counter
    t0 = time.perf_counter()
    for _ in range(n):
        t.train_step()
    records = t.flush()  # drains and synchronises
    wall = (time.perf_counter() - t0) / n
    out = {"samples_per_s": inputs["spec"]["B"] / (rec["median_ms"] * 1e-3),
           "wall_ms_per_step": wall * 1e3}
    for name in PHASES:
        vals = [r[f"time_{name}"] for r in records if f"time_{name}" in r]
        if vals:
            out[f"ms_{name}"] = 1e3 * sum(vals) / len(vals)
    out.update({k: v for k, v in records[-1].items() if k.startswith("gpu_")})
    out["graphed_parts"] = sum(s.startswith("graphed") for s in t.graphs.status().values())
    inputs["trainers"].pop(provider, None)
    return out


TIMELINE = ("two_phase_overlap", "two_phase_overlap_graphs")


def timeline(device: torch.device, out_dir: Path | None, case: str) -> dict:
    """Intervals of 3 overlapped two_phase steps per phase per stream (CUDA events), eager and
    with CUDA graphs (where they apply), + a PNG with one panel each."""
    runs = {p: _timeline_run(device, case, p) for p in TIMELINE if graphs_apply(p, device)}
    res = dict(case=case, device=str(device), runs=runs)
    if out_dir is not None:
        dev = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
        stem = out_dir / f"step-timeline-{dev}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
        draw_timeline(res, stem.with_suffix(".png"))
    return res


def _timeline_run(device: torch.device, case: str, provider: str) -> dict:
    t = make_trainer(BACKBONES[case], provider, device)
    for _ in range(3):  # warm-up (and, with graphs, the capture)
        t.train_step()
    t.flush()
    t.timer.history = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        ref = torch.cuda.Event(enable_timing=True)
        ref.record()
    t0 = time.perf_counter()
    for _ in range(3):
        t.train_step()
    t.flush()
    side = t.streams.side
    bars = []
    for step, name, stream, a, b in t.timer.history:
        if name == "step":
            continue
        if device.type == "cuda":
            start, end = ref.elapsed_time(a), ref.elapsed_time(b)
            lane = "side stream" if stream == side else "main stream"
        else:
            start, end = (a - t0) * 1e3, (b - t0) * 1e3
            lane = "CPU (in order)"
        bars.append(dict(step=step, name=name, lane=lane, start_ms=start, end_ms=end))
    return dict(overlap_enabled=t.streams.enabled, graphs=t.graphs.status(), bars=bars)


def draw_timeline(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"phase1": "tab:blue", "opt_theta": "tab:cyan", "phase2": "tab:orange",
               "phase2_read": "tab:red"}
    labels = {"phase1": "phase 1 (L1 fwd/bwd + opt_theta)", "opt_theta": "opt_theta (incl. wait)",
              "phase2": "phase 2 (no-grad fwd, negatives, energy, opt_phi)",
              "phase2_read": "phase 2 reads theta (fwd + negatives)"}
    runs = res["runs"]
    heights = [1.2 + 1.1 * len({b["lane"] for b in r["bars"]}) for r in runs.values()]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw=dict(height_ratios=heights))
    for ax, (provider, run) in zip(axes[:, 0], runs.items()):
        lanes = sorted({b["lane"] for b in run["bars"]}, key=lambda s: (s != "main stream", s))
        seen = set()
        for b in run["bars"]:
            y = lanes.index(b["lane"])
            sub = b["name"] in ("opt_theta", "phase2_read")
            h, off = (0.2, -0.55) if sub else (0.6, -0.3)
            ax.broken_barh([(b["start_ms"], b["end_ms"] - b["start_ms"])], (y + off, h),
                           facecolors=colours.get(b["name"], "grey"), edgecolor="black",
                           linewidth=0.4,
                           label=None if b["name"] in seen else labels.get(b["name"], b["name"]))
            seen.add(b["name"])
            if not sub:
                tag = "P1" if b["name"] == "phase1" else "P2"
                ax.text((b["start_ms"] + b["end_ms"]) / 2, y + 0.36, f"{tag}({b['step']})",
                        ha="center", va="bottom", fontsize=7)
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels(lanes)
        ax.set_ylim(-0.8, len(lanes) - 1 + 0.7)
        ax.set_xlabel("ms since the first of 3 timed steps")
        how = ("CUDA events per phase per stream" if run["overlap_enabled"]
               else "CPU: the overlap code runs in order (nothing can overlap)")
        graphed = sum(s.startswith("graphed") for s in run["graphs"].values())
        ax.set_title(f"{provider} ({graphed} of 4 parts graphed), {res['case']} on "
                     f"{res['device']}: {how}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_benchmark(device: torch.device, quick: bool, cpu_shapes: bool) -> Benchmark:
    names = ["tiny", "oftstandin"] if (cpu_shapes or device.type != "cuda") else (
        ["tiny", "llama1b"] if quick else ["tiny", "llama1b", "prodhead"])
    cases = [Case(name, dict(BACKBONES[name]),
                  make=lambda dev, spec=BACKBONES[name]: dict(spec=spec, device=torch.device(dev),
                                                              trainers={}))
             for name in names]
    providers = [Provider(p, _factory(p)) for p in PROVIDERS]
    notes = ["one call = one train_step of a fresh seeded Trainer (energy loss explicit: phase 2 "
             "makes the layer actions); overlapped calls overlap with the next call's phase 1",
             "per-phase ms: trainer CUDA events (perf_counter on the CPU), mean over 20 (CPU 5) "
             "steps; phase1/phase2 overlap in time when overlapped, so they do not add up"]
    if device.type != "cuda":
        notes.append("CPU: two_phase_overlap runs the SAME code in order (no streams on a CPU, "
                     "nothing can overlap): its ratio vs two_phase_seq only shows the bookkeeping "
                     "costs nothing; the GPU backbones (llama1b, prodhead) need CUDA")
    columns = [("samples_per_s", "samples/s", ".1f"), ("wall_ms_per_step", "wall ms/step", ".2f"),
               ("ms_phase1", "phase1 ms", ".2f"), ("ms_opt_theta", "opt_theta ms", ".2f"),
               ("ms_phase2", "phase2 ms", ".2f"), ("ms_phase2_read", "phase2 read ms", ".2f"),
               ("peak_mem_bytes", "+peak B", ".3g"), ("gpu_mem_peak_bytes", "peak alloc B", ".3g"),
               ("gpu_util_pct", "GPU util %", ".0f"), ("gpu_power_w", "power W", ".0f"),
               ("graphed_parts", "graphed parts", "d")]
    # CPU: ~100 ms steps on a shared machine: ~3 s of repeats per provider, in rounds
    return Benchmark("step", cases, providers, baseline="two_phase_seq", notes=notes,
                     annotate=annotate, columns=columns, cpu_budget_s=3.0,
                     finish=lambda dev, out, recs: timeline(dev, out, "llama1b" if "llama1b" in names else "tiny"))
