"""Data-parallel training over torch.distributed, launched by torchrun.

    torchrun --nproc-per-node N -m energy_train train ...           (one machine)
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT -m energy_train train ...      (several)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; :func:`setup` only reads them
(no home-made rendezvous). Backend nccl on CUDA (device cuda:LOCAL_RANK), gloo on the CPU.

What is replicated, what is sharded:

- theta = the policy's trainable modules (backbone + action head + extras, under
  ``policy.root()``), phi = energy model. Each is wrapped in its own DDP through
  :class:`Apply`, so that what the trainer runs on it (the policy forward + head + L1 loss;
  an energy loss) runs INSIDE DDP's forward: DDP arms its reducer there and the backward
  all-reduces (averages) the gradients. Every rank holds the same theta and phi after every
  step (the public fork leaves phi unwrapped: every rank trains its own energy model).
  ``dist.find_unused_parameters`` is passed to theta's DDP (OpenVLA-OFT needs it: its last
  vision block gets no gradient).
- Each DDP forward is followed by exactly ONE backward. With the context detached (joint,
  shared_forward, adaptive_weights, cached_negatives) the energy loss has no graph into
  theta, so theta's DDP sees only the L1 backward and phi's DDP only the energy backward.
  The leaky diagnostic (``detach_context=False``) sends the energy loss into theta too:
  two backwards through one theta forward would make the reducer mark a parameter ready
  twice, so under DDP its two losses go into ONE backward (same gradients: they add) and the
  audit of what the energy loss deposits into theta is taken with ``autograd.grad``, which
  writes no ``.grad`` and fires no reducer hook. The tiny policy needs no
  find_unused_parameters / static_graph (every trainable parameter gets a gradient in its
  backward); the OpenVLA-OFT stand-in does (its last vision block gets none, as OFT's).
- No-grad forwards (phase 2, the negatives, the probe) call the underlying modules, never
  the DDP wrapper: the reducer is not armed, no collective runs (DDP's own forward under
  no_grad would skip prepare_for_backward but still do its pre-forward bookkeeping).
- Gradient accumulation: ``no_sync`` on every micro-batch but the last (FSDP2:
  ``set_requires_gradient_sync(False)``).
- ``fsdp=true``: the backbone is sharded with FSDP2 ``fully_shard`` (every decoder layer the
  policy names in ``decoder()``, then the backbone root); head, extras and phi stay DDP (the
  negatives read the head's weights outside any forward). Two optimizers unchanged (AdamW #1
  steps the backbone's DTensor shards).
- Global in-batch negatives: :meth:`Parallel.gather` all-gathers the (B, H, Da) expert
  chunks (data: no gradient, no context crosses the network).
- Metrics: one all_reduce (mean) of the stacked metric tensors per log interval.

Checkpoint I/O (gathering shards, per-rank state) lives in energy_train/trainer/checkpoint.py;
gradient norms in energy_train/grads.py.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .grads import clip_grad_norm, clip_grad_norm_sharded


class Apply(nn.Module):
    """``Apply(m)(fn, *args) == fn(*args)`` run as m's forward: lets DDP wrap any computation
    that uses m's parameters (fn reaches them through its closure)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn, *args):
        return fn(*args)


class Local:
    """One process: every hook is the identity (the trainer's single-process behaviour)."""
    rank, world_size, local_rank, active, is_main, fsdp = 0, 1, 0, False, True, False

    def __init__(self, device: torch.device | None = None):
        self.device = device

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def call(self, which: str, fn, *args):
        return fn(*args)

    def no_sync(self, *which: str, sync: bool = True):
        return contextlib.nullcontext()

    def gather(self, expert):
        return None, 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def clip_grad_norm(self, params, max_norm: float):
        return clip_grad_norm(params, max_norm)

    def final_norm(self, norm: nn.Module) -> nn.Module:
        return norm

    def barrier(self) -> None:
        pass

    def run_on_main(self, fn):
        return fn()

    def gather_object(self, obj):
        return [obj]


LOCAL = Local()


@dataclass
class Context:
    """What :func:`setup` found: this process's place in the job and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # setup initialised the process group (and destroys it)


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str, timeout_s: float) -> Context | None:
    """Initialise torch.distributed from torchrun's environment; None when not launched with
    WORLD_SIZE > 1 (and no process group exists). Device: cuda:LOCAL_RANK (nccl) when CUDA is
    asked for or available ("auto"), else the CPU (gloo)."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = world_from_env(), int(os.environ.get("RANK", "0"))
    if world <= 1:
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {device_name!r} asked for, but CUDA is not available")
        if ":" in device_name and int(device_name.split(":")[1]) != local:
            raise ValueError(f"device: under torchrun each rank uses cuda:LOCAL_RANK (here "
                             f"cuda:{local}); got {device_name!r} - use device=cuda or auto")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun "
                                   "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        dist.init_process_group("nccl" if want_cuda else "gloo",
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if want_cuda else None)
        owns = True
    return Context(dist.get_rank(), dist.get_world_size(), local, device, owns)


def teardown(ctx: Context | None) -> None:
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError:
        return False
    return True


def check_config(cfg, world_size: int) -> None:
    """Clear errors for what a distributed run cannot do."""
    if world_size <= 1:
        if cfg.dist.fsdp:
            raise ValueError("dist.fsdp: sharding needs several processes; launch with torchrun "
                             "--nproc-per-node N (N > 1) or set dist.fsdp=false")
        return
    if cfg.run.batch_size % world_size:
        raise ValueError(f"run.batch_size: the global batch is split over the {world_size} ranks;"
                         f" expected a multiple of {world_size}, got {cfg.run.batch_size}")
    if (cfg.energy.loss == "swap" and not cfg.dist.global_negatives
            and cfg.run.batch_size // world_size < 2):
        raise ValueError(f"run.batch_size: with dist.global_negatives=false the swap loss scores "
                         f"each rank's {cfg.run.batch_size // world_size} sample(s) against "
                         "themselves alone (a loss of 0); expected >= 2 per rank, got "
                         f"{cfg.run.batch_size} over {world_size} ranks; set "
                         "dist.global_negatives=true or raise run.batch_size")
    if cfg.dist.fsdp:
        if not fsdp_available():
            raise RuntimeError(f"dist.fsdp: this torch ({torch.__version__}) has no "
                               "torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6); "
                               "set dist.fsdp=false (DDP)")
        if cfg.run.strategy == "joint" and not cfg.strategy.detach_context:
            raise ValueError("dist.fsdp: the leaky diagnostic (joint, strategy.detach_context="
                             "false) is not supported with a sharded backbone; set dist.fsdp=false")


class Parallel(Local):
    """The trainer's data-parallel hooks for one rank of ``ctx``: theta (``policy.root()``;
    with FSDP only head + extras, the backbone being sharded) and phi each in one DDP."""
    active = True

    def __init__(self, ctx: Context, policy, energy: nn.Module, *, fsdp: bool = False,
                 find_unused_parameters: bool = False):
        super().__init__(ctx.device)
        self.ctx, self.rank, self.world_size, self.local_rank = ctx, ctx.rank, ctx.world_size, ctx.local_rank
        self.is_main = ctx.rank == 0
        self.fsdp = fsdp
        ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        if fsdp:
            from torch.distributed.tensor import DTensor
            if not any(isinstance(p, DTensor) for p in policy.backbone.parameters()):
                raise RuntimeError("dist.fsdp: call distributed.shard_backbone(policy) BEFORE "
                                   "building the Trainer (its optimizer must hold the shards)")
            theta = nn.ModuleDict({"action_head": policy.action_head,
                                   "extras": nn.ModuleDict(policy.extras)})
        else:
            theta = policy.root()
        # DDP's constructor broadcasts rank 0's parameters and buffers: all ranks start
        # identical. The per-forward buffer broadcast is off: the built-in models' buffers are
        # constants, and no collective should ride along with every forward.
        self.theta = nn.parallel.DistributedDataParallel(
            Apply(theta), device_ids=ids, broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters)
        self.phi = nn.parallel.DistributedDataParallel(Apply(energy), device_ids=ids,
                                                       broadcast_buffers=False)
        self._shards = [policy.backbone] if fsdp else []
        self.wrapped = {"theta": self.theta, "phi": self.phi}

    # ---- forward/backward ------------------------------------------------------------------
    def call(self, which: str, fn, *args):
        """fn(*args) inside the DDP forward of ``which`` ("theta" or "phi"); a side left
        unwrapped (``wrapped`` without it) runs fn directly."""
        w = self.wrapped.get(which)
        return fn(*args) if w is None else w(fn, *args)

    @contextlib.contextmanager
    def no_sync(self, *which: str, sync: bool = True):
        """Around forward AND backward of a micro-batch: no gradient all-reduce unless sync."""
        if sync:
            yield
            return
        with contextlib.ExitStack() as stack:
            for name in which:
                w = self.wrapped.get(name)
                if w is not None:
                    stack.enter_context(w.no_sync())
                if name == "theta":
                    for m in self._shards:  # FSDP2
                        m.set_requires_gradient_sync(False)
                        stack.callback(m.set_requires_gradient_sync, True)
            yield

    def deposit(self, loss: torch.Tensor, params) -> torch.Tensor:
        """Norm of d loss / d params without writing .grad (no reducer hook fires)."""
        params = [p for p in params if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads = [g for g in grads if g is not None]
        if not grads:
            return torch.zeros((), device=loss.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    # ---- collectives -------------------------------------------------------------------------
    def gather(self, expert: torch.Tensor):
        """(B, H, Da) per rank -> (world*B, H, Da) in rank order, and this rank's offset."""
        parts = [torch.empty_like(expert) for _ in range(self.world_size)]
        dist.all_gather(parts, expert.detach().contiguous())
        return torch.cat(parts), self.rank * expert.shape[0]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)  # SUM: gloo has no AVG
        return t / self.world_size

    def barrier(self) -> None:
        if self.ctx.device.type == "cuda":
            dist.barrier(device_ids=[self.ctx.local_rank])
        else:
            dist.barrier()

    def run_on_main(self, fn):
        return run_on_main(fn)

    def gather_object(self, obj):
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def clip_grad_norm(self, params, max_norm: float):
        if not self.fsdp:
            return super().clip_grad_norm(params, max_norm)
        return clip_grad_norm_sharded(params, max_norm)

    def final_norm(self, norm: nn.Module) -> nn.Module:
        for m in self._shards:
            m.unshard()  # the root group (final norm) gathered; a no-op when it already is
        return norm


def run_on_main(fn):
    """Rank 0 runs fn(); its result (or its error, re-raised on every rank) is broadcast."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("err", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "err":
        raise value
    return value


def explain(e: BaseException, ctx: Context, timeout_s: float) -> BaseException:
    """A collective that failed because a peer died or hung -> a clear error."""
    text = str(e)
    lost = isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Broken pipe",
                            "Timed out", "timed out", "NCCL", "Gloo", "gloo"))
    if not lost:
        return e
    return RuntimeError(
        f"rank {ctx.rank} of {ctx.world_size}: a collective failed - another rank probably "
        f"died or stopped responding (see its log; collective timeout {timeout_s:g} s): "
        f"{text.splitlines()[0] if text else type(e).__name__}")


def shard_backbone(policy) -> None:
    """FSDP2: every decoder layer of ``policy.decoder()``, then the backbone root (embeddings,
    final norm), kept gathered after forward (the negatives read the final norm). Call before
    the optimizer is built: fully_shard replaces the parameters by DTensor shards."""
    from torch.distributed.fsdp import fully_shard
    layers, _ = policy.decoder()
    for layer in layers:
        fully_shard(layer)
    fully_shard(policy.backbone, reshard_after_forward=False)


def distribute(trainer, ctx: Context):
    """Install the data-parallel hooks on a freshly built trainer (before any step)."""
    cfg = trainer.cfg
    trainer.use_parallel(Parallel(ctx, trainer.policy, trainer.energy, fsdp=cfg.dist.fsdp,
                                  find_unused_parameters=cfg.dist.find_unused_parameters))
    return trainer
