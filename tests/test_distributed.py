"""Data-parallel training on the CPU: gloo backend, 2 processes
launched by the tests themselves on 127.0.0.1 (a free port), every job under a timeout.

One job (tests/dist_worker.py) runs all trainer-level scenarios in one process group, to pay
the start-up once; the torchrun and dead-rank tests launch the real command line.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from energy_train import distributed
from energy_train.policies.tiny.task import TaskData
from energy_train.trainer import read_metrics
from trainer_helpers import TINY, grads, make_trainer, tiny_cfg

WORLD = 2
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int) -> dict:
    """What torchrun would set, on the loopback address only."""
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), OMP_NUM_THREADS="1")


def spawn(argv: list[str], port: int, logs: Path) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(argv, env=rank_env(r, port), cwd=ROOT,
                             stdout=open(logs / f"rank{r}.out", "w"), stderr=subprocess.STDOUT)
            for r in range(WORLD)]


def wait_all(procs, timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, end - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def tail(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in sorted(logs.glob("*.out")))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Both ranks' results of tests/dist_worker.py (about 30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("dist")
    procs = spawn([sys.executable, str(TESTS / "dist_worker.py"), str(out)], free_port(), out / "logs")
    rcs = wait_all(procs, timeout=240)
    assert rcs == [0] * WORLD, tail(out / "logs")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def rel(ref, out) -> float:
    ref, out = torch.as_tensor(ref, dtype=torch.float64), torch.as_tensor(out, dtype=torch.float64)
    assert not torch.isnan(out).any()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def test_ranks_hold_identical_theta_and_phi(job):
    """After 3 steps every strategy (and the leaky joint, gradient accumulation, FSDP) leaves
    theta and phi bitwise identical on both ranks, and phi has moved; the public fork's
    unwrapped phi drifts apart (the control: the test can fail)."""
    (r0, r1), _ = job
    assert r0["world"] == r1["world"] == WORLD
    for name, a in r0["agree"].items():
        b = r1["agree"][name]
        if name.endswith("-fork"):
            assert same(a["theta"], b["theta"]), name
            assert not same(a["phi"], b["phi"]), "unwrapped phi should differ across ranks"
            continue
        assert same(a["theta"], b["theta"]), f"{name}: theta differs across ranks"
        assert same(a["phi"], b["phi"]), f"{name}: phi differs across ranks"
        assert not same(a["phi0"], a["phi"]), f"{name}: phi never moved"
        if not name.startswith("alternating"):  # alternating: step 2 trains phi only
            moved = [not torch.equal(x, y) for x, y in zip(a["theta0"], a["theta"])]
            assert all(moved), f"{name}: {moved.count(False)} theta tensors never moved"


def test_metrics_are_averaged_over_ranks_at_read_back(job):
    """Each rank's L1 is its own shard's; the flushed records hold the mean over ranks."""
    (r0, r1), _ = job
    a, b = r0["agree"]["two_phase"], r1["agree"]["two_phase"]
    def device_metrics(records):  # phase times are each rank's own host clock
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]

    assert device_metrics(a["records"]) == device_metrics(b["records"])
    assert a["local_l1"] != b["local_l1"], "the ranks should see distinct shards"
    for rec, x, y in zip(a["records"], a["local_l1"], b["local_l1"]):
        assert abs(rec["l1"] - (x + y) / 2) <= 1e-6 * abs(rec["l1"])
    # the gradient-path audit under DDP: zero where the context is detached, > 0 for the leak
    assert all(r["energy_grad_theta"] == 0.0 for r in r0["agree"]["joint"]["records"])
    assert all(r["energy_grad_theta"] > 0.0 for r in r0["agree"]["joint-leaky"]["records"])


def test_fsdp_backbone_matches_ddp(job):
    """FSDP2-sharded backbone (gloo, CPU) trains the same numbers as DDP (float32)."""
    (r0, _), _ = job
    ddp, fsdp = r0["agree"]["two_phase"], r0["agree"]["two_phase-fsdp"]
    for key in ("theta", "phi"):
        for x, y in zip(ddp[key], fsdp[key]):
            assert rel(x, y) < 1e-5, key


def _one_rank_reference(global_negatives=True):
    """1 process x batch 8 in float64: the gradients each optimizer step used, and records."""
    cfg = tiny_cfg(strategy="two_phase", energy_loss="swap", batch_size=8, steps=2,
                   global_negatives=global_negatives)
    t = make_trainer(cfg)
    for m in (t.policy.backbone, t.policy.action_head, t.energy):
        m.double()
    for split in (t.feed.data.train, t.feed.data.probe_data):
        for k, v in split.items():
            if v.is_floating_point():
                split[k] = v.double()
    seen = {"theta": [], "phi": []}
    st, sp = t.step_theta, t.step_phi
    t.step_theta = lambda: (seen["theta"].append(grads(t.theta)), st())[1]
    t.step_phi = lambda: (seen["phi"].append(grads(t.phi)), sp())[1]
    steps = [{k: float(m[k]) for k in ("l1", "energy_loss")} for m in
             (t.train_step() for _ in range(2))]
    return seen, steps, [p.detach() for p in t.phi]


def test_two_ranks_with_global_negatives_equal_one_rank(job):
    """float64: 2 ranks x batch 4 with the expert chunks gathered across ranks give the swap
    InfoNCE loss, the phi and theta gradients (after DDP's averaging) and the weights of 1
    rank x batch 8, to float64 rounding; without the gather the loss differs (the control)."""
    (r0, r1), _ = job
    seen, steps, phi = _one_rank_reference()
    for step, ref in enumerate(steps):  # the mean over ranks of each rank's float64 losses
        for key in ("energy_loss", "l1"):
            mean = sum(r["equiv"]["global"]["steps"][step][key] for r in (r0, r1)) / 2
            assert rel(ref[key], mean) < 1e-12, key
            rec = r0["equiv"]["global"]["records"][step][key]  # read back (as float32)
            assert rel(ref[key], rec) < 1e-6, key
    for r in (r0, r1):
        g = r["equiv"]["global"]
        for part in ("theta", "phi"):
            assert len(g["grads"][part]) == len(seen[part]) == 2
            for step_ref, step_out in zip(seen[part], g["grads"][part]):
                # error relative to the largest gradient of the part: some entries are zero in
                # exact arithmetic (e.g. the attention's key bias) and hold only rounding noise
                scale = max(float(x.abs().max()) for x in step_ref)
                for x, y in zip(step_ref, step_out):
                    assert float((x - y).abs().max()) / scale < 1e-12, part
        # the phi update: AdamW is elementwise and the same on both sides; where a gradient is
        # rounding noise (|g| tiny) Adam's normalisation amplifies the noise, so compare there
        # only entries whose gradient is real
        scale = max(float(x.abs().max()) for x in seen["phi"][0])
        n_real = n_all = 0
        for i, (x, y) in enumerate(zip(phi, g["phi"])):
            real = torch.stack([st[i].abs() for st in seen["phi"]]).amin(0) > 1e-9 * scale
            n_real, n_all = n_real + int(real.sum()), n_all + real.numel()
            if real.any():
                assert rel(x[real], y[real]) < 1e-10
        assert n_real > 0.8 * n_all, (n_real, n_all)
    local = sum(r["equiv"]["local"]["steps"][0]["energy_loss"] for r in (r0, r1)) / 2
    assert rel(steps[0]["energy_loss"], local) > 1e-3


def _final(run_dir: Path):
    ckpt = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "latest.json").read_text())["dir"]
    return load_file(ckpt / "theta.safetensors"), load_file(ckpt / "phi.safetensors")


@pytest.mark.parametrize("strategy", ["cached_negatives", "two_phase"])
def test_resume_from_two_rank_checkpoint_is_bitwise(job, strategy):
    """6 steps == 3 steps, stop, resume on both ranks (per-rank negative cache included)."""
    _, root = job
    full, half = root / f"{strategy}-full", root / f"{strategy}-half"
    assert (full / "complete.json").is_file() and (half / "complete.json").is_file()
    for a, b in zip(_final(full), _final(half)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(full), read_metrics(half)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [-1, *range(6)]
    for key in ("l1", "energy_loss", "rank_acc", "probe_l1"):
        assert [r.get(key) for r in ma] == [r.get(key) for r in mb], key
    assert not list(full.rglob(".*tmp*")), "temporary files left behind"


def _sets(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--set", f"{k}={v}")]


def test_torchrun_command_line(tmp_path):
    """`torchrun --nproc-per-node 2 -m energy_train train` end to end: rank 0 writes a
    complete run directory; the metrics are those of the global batch."""
    out = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "energy_train",
           "train", "--steps", "3", "--no-progress", "--out", str(out), *_sets({**TINY, "steps": 3})]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "summary.json", "complete.json",
                 "checkpoints/latest.json"):
        assert (out / name).is_file(), name
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    assert p.stdout.count("run directory:") == 1, "only rank 0 reports"


def test_a_dead_rank_stops_the_others_with_a_clear_error(tmp_path):
    """Rank 1 is killed mid-run; rank 0 exits non-zero within the bound, saying why."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    argv = [sys.executable, "-m", "energy_train", "train", "--steps", "100000", "--no-progress",
            "--out", str(out), *_sets({**TINY, "steps": 100000, "log_every": 1,
                                        "dist_timeout": 20})]
    procs = spawn(argv, free_port(), logs)
    try:
        end = time.monotonic() + 90
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert time.monotonic() < end and all(p.poll() is None for p in procs), tail(logs)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=45)
        waited = time.monotonic() - t0
    finally:
        wait_all(procs, timeout=1)
    text = (logs / "rank0.out").read_text()
    assert rc != 0 and waited < 45
    assert "another rank probably died" in text, text[-2000:]
    assert "another rank probably died" in (out / "error.txt").read_text()


def test_bad_distributed_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size: .* multiple of 2, got 5"):
        distributed.check_config(tiny_cfg(batch_size=5), 2)
    with pytest.raises(ValueError, match="fsdp: sharding needs several processes"):
        distributed.check_config(tiny_cfg(fsdp=True), 1)
    with pytest.raises(ValueError, match="leaky"):
        distributed.check_config(tiny_cfg(fsdp=True, strategy="joint", detach_context=False), 2)
    distributed.check_config(tiny_cfg(batch_size=4, fsdp=True), 2)
    assert distributed.setup("cpu", 5.0) is None or os.environ.get("WORLD_SIZE")  # no torchrun env


def test_data_shards_make_up_the_global_batch():
    """world ranks x B/world rows == the rows of one rank x B, for each micro-batch."""
    for accum in (1, 2):
        data = TaskData(0, 32, 4, batch_size=8, grad_accum=accum, image_size=8)
        whole = data.batch(3)
        for w in (2, 4):
            shards = [data.batch(3, r, w) for r in range(w)]
            for a in range(accum):
                for key in ("ids", "actions", "images"):
                    assert torch.equal(torch.cat([s[a][key] for s in shards]), whole[a][key])
    with pytest.raises(ValueError, match="batch_size: expected a multiple of the world size 3"):
        data.batch(0, 0, 3)
