"""Data-parallel training over torch.distributed, launched by torchrun.

    torchrun --nproc-per-node N -m energy_train train ...           (one machine)
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT -m energy_train train ...      (several)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; :func:`setup` only reads them
(no home-made rendezvous). Backend nccl on CUDA (device cuda:LOCAL_RANK), gloo on the CPU.

What is replicated, what is sharded:

- theta = backbone + action head, phi = energy model. Each module is wrapped in its own DDP,
  through :class:`Apply`, so that what the trainer calls on it (the backbone forward,
  ``head.predict_action``, an energy loss) runs INSIDE DDP's forward: DDP arms its reducer
  there and the backward all-reduces (averages) the gradients. Every rank holds the same
  theta and phi after every step (the public fork leaves phi unwrapped: every rank trains
  its own energy model).
- Each DDP forward is followed by exactly ONE backward. With the context detached (joint,
  shared_forward, adaptive_weights, cached_negatives) the energy loss has no graph into
  theta, so theta's DDP sees only the L1 backward and phi's DDP only the energy backward.
  The leaky diagnostic (``detach_context=False``) sends the energy loss into theta too:
  two backwards through one theta forward would make the reducer mark a parameter ready
  twice, so under DDP its two losses go into ONE backward (same gradients: they add) and the
  audit of what the energy loss deposits into theta is taken with ``autograd.grad``, which
  writes no ``.grad`` and fires no reducer hook. No find_unused_parameters / static_graph is
  needed: every parameter of a wrapped module gets a gradient in its one backward.
- No-grad forwards (phase 2, the negatives, the probe) call the underlying modules, never
  the DDP wrapper: the reducer is not armed, no collective runs (DDP's own forward under
  no_grad would skip prepare_for_backward but still do its pre-forward bookkeeping).
- Gradient accumulation: ``no_sync`` on every micro-batch but the last (FSDP2:
  ``set_requires_gradient_sync(False)``).
- ``fsdp=true``: the backbone is sharded with FSDP2 ``fully_shard`` (every block, then the
  root); head and phi stay DDP (small; the negatives read the head's weights outside any
  forward). Two optimizers unchanged (AdamW #1 steps the backbone's DTensor shards).
- Global in-batch negatives: :meth:`Parallel.gather` all-gathers the (B, H, Da) expert
  chunks (data: no gradient, no context crosses the network).
- Metrics: one all_reduce (mean) of the stacked metric tensors per log interval.
- Checkpoints: rank 0 writes (atomically), every rank waits, every rank loads the same files.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


class Apply(nn.Module):
    """``Apply(m)(fn, *args) == fn(m, *args)``: lets DDP's forward wrap any call on ``m``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn, *args):
        return fn(self.module, *args)


def grad_norm(params) -> torch.Tensor | None:
    """The global L2 norm of the parameters' grads (a device tensor; None without grads)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def clip_grad_norm(params, max_norm: float) -> torch.Tensor | None:
    """Clip to max_norm (> 0) and return the norm, or just the norm: no host sync (no
    non-finite check), foreach kernels on CUDA."""
    if max_norm <= 0:
        return grad_norm(params)
    params = list(params)
    foreach = True if any(p.is_cuda for p in params) else None
    return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False,
                                          foreach=foreach)


class Local:
    """One process: every hook is the identity (the trainer's single-process behaviour)."""
    rank, world_size, local_rank, active, is_main = 0, 1, 0, False, True

    def __init__(self, device: torch.device | None = None):
        self.device = device

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def call(self, module, fn, *args):
        return fn(module, *args)

    def no_sync(self, *modules, sync: bool = True):
        return contextlib.nullcontext()

    def gather(self, expert):
        return None, 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def clip_grad_norm(self, params, max_norm: float):
        return clip_grad_norm(params, max_norm)

    def final_norm(self, model):
        return model.norm

    def load_theta(self, trainer, theta: dict, opt_state: dict) -> None:
        trainer.model.load_state_dict({k[4:]: v for k, v in theta.items() if k.startswith("vla.")})
        trainer.head.load_state_dict({k[5:]: v for k, v in theta.items() if k.startswith("head.")})
        trainer.opt_theta.load_state_dict(opt_state)

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
        if cfg.fsdp:
            raise ValueError("fsdp: sharding needs several processes; launch with torchrun "
                             "--nproc-per-node N (N > 1) or set fsdp=false")
        return
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size: the global batch is split over the {world_size} ranks; "
                         f"expected a multiple of {world_size}, got {cfg.batch_size}")
    if cfg.fsdp:
        if not fsdp_available():
            raise RuntimeError(f"fsdp: this torch ({torch.__version__}) has no "
                               "torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6); "
                               "set fsdp=false (DDP)")
        if cfg.strategy == "joint" and not cfg.detach_context:
            raise ValueError("fsdp: the leaky diagnostic (joint, detach_context=false) is not "
                             "supported with a sharded backbone; set fsdp=false")


class Parallel(Local):
    """The trainer's data-parallel hooks for one rank of ``ctx``."""
    active = True

    def __init__(self, ctx: Context, trainer, *, fsdp: bool = False):
        super().__init__(ctx.device)
        self.ctx, self.rank, self.world_size, self.local_rank = ctx, ctx.rank, ctx.world_size, ctx.local_rank
        self.is_main = ctx.rank == 0
        self.fsdp = fsdp
        ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        self.wrapped: dict[int, nn.Module] = {}
        mods = [trainer.head, trainer.energy]
        if fsdp:
            from torch.distributed.tensor import DTensor
            if not all(isinstance(p, DTensor) for p in trainer.model.parameters()):
                raise RuntimeError("fsdp: call distributed.shard_backbone(model) BEFORE building "
                                   "the Trainer (its optimizer must hold the sharded parameters)")
        else:
            mods.insert(0, trainer.model)
        for m in mods:
            # DDP's constructor broadcasts rank 0's parameters and buffers: all ranks start
            # identical. The only buffers (the energy model's positional table and gate_a) are
            # constants, so the per-forward buffer broadcast is turned off: no collective
            # rides along with every energy forward.
            self.wrapped[id(m)] = nn.parallel.DistributedDataParallel(
                Apply(m), device_ids=ids, broadcast_buffers=False)

    # ---- forward/backward ------------------------------------------------------------------
    def call(self, module, fn, *args):
        """fn(module, *args) inside module's DDP forward (FSDP modules: directly)."""
        w = self.wrapped.get(id(module))
        return fn(module, *args) if w is None else w(fn, *args)

    @contextlib.contextmanager
    def no_sync(self, *modules, sync: bool = True):
        """Around forward AND backward of a micro-batch: no gradient all-reduce unless sync."""
        if sync:
            yield
            return
        with contextlib.ExitStack() as stack:
            for m in modules:
                w = self.wrapped.get(id(m))
                if w is not None:
                    stack.enter_context(w.no_sync())
                elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
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

    # ---- FSDP ----------------------------------------------------------------------------------
    def clip_grad_norm(self, params, max_norm: float):
        """Global grad norm of mixed sharded (DTensor) and replicated grads, clipped in place."""
        if not self.fsdp:
            return super().clip_grad_norm(params, max_norm)
        from torch.distributed.tensor import DTensor
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        dev = grads[0].device
        sq_sharded = sum((g.float().square().sum() for g in sharded), torch.zeros((), device=dev))
        dist.all_reduce(sq_sharded)  # the shards of one tensor live on different ranks
        sq_plain = sum((g.float().square().sum() for g in plain), torch.zeros((), device=dev))
        norm = (sq_sharded + sq_plain).sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in [*sharded, *plain]:
                g.mul_(coef.to(g.dtype))
        return norm

    def load_theta(self, trainer, theta: dict, opt_state: dict) -> None:
        if not self.fsdp:
            return super().load_theta(trainer, theta, opt_state)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)  # every rank holds the full tensors
        set_model_state_dict(trainer.model, {k[4:]: v for k, v in theta.items()
                                             if k.startswith("vla.")}, options=opts)
        trainer.head.load_state_dict({k[5:]: v for k, v in theta.items() if k.startswith("head.")})
        set_optimizer_state_dict(theta_modules(trainer), trainer.opt_theta, opt_state, options=opts)

    def final_norm(self, model):
        if self.fsdp:
            model.unshard()  # no-op when the root group is already gathered
        return model.norm


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


def shard_backbone(model: nn.Module) -> nn.Module:
    """FSDP2: every transformer block, then the root (embeddings, final norm). The root group
    stays gathered after forward (reshard_after_forward=False); the negatives read the final
    norm through :meth:`Parallel.final_norm`, which gathers it when it is not. Call before the
    optimizer is built: fully_shard replaces the parameters by DTensor shards."""
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model, reshard_after_forward=False)
    return model


def distribute(trainer, ctx: Context, fsdp: bool = False):
    """Install the data-parallel hooks on a freshly built trainer (before any step)."""
    trainer.dp = Parallel(ctx, trainer, fsdp=fsdp)
    trainer.meter.reduce = trainer.dp.mean  # metrics: mean over ranks, once per read-back
    return trainer


def theta_modules(trainer) -> nn.Module:
    """backbone + head under one root ("vla.", "head."): the FQNs of opt_theta's state."""
    return nn.ModuleDict({"vla": trainer.model, "head": trainer.head})


def _cpu(obj):
    return torch.utils._pytree.tree_map(
        lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, obj)


def checkpoint_payload(trainer):
    """(theta, phi, state) to save, on rank 0 (None on the others; a collective under
    torchrun). Per-rank state (RNG, the strategy's, e.g. the negative cache of this rank's
    samples) is gathered into ``state["ranks"]``; FSDP shards into full tensors."""
    dp = trainer.dp
    state = trainer.state_dict()
    if getattr(dp, "fsdp", False):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        theta = {f"vla.{k}": v for k, v in get_model_state_dict(trainer.model, options=opts).items()}
        theta.update({f"head.{k}": v for k, v in trainer.head.state_dict().items()})
        phi = dict(trainer.energy.state_dict())
        state["opt_theta"] = get_optimizer_state_dict(theta_modules(trainer), trainer.opt_theta,
                                                      options=opts)
    else:
        theta, phi = trainer.weights()
    if dp.active:
        ranks = dp.gather_object(_cpu({"rng": state["rng"], "strategy": state["strategy"]}))
        if not dp.is_main:
            return None
        state["ranks"] = ranks
    return theta, phi, state


def per_rank_state(state: dict, dp) -> dict:
    """The loaded state with this rank's RNG and strategy state; a clear error when the
    checkpoint was written by another number of processes."""
    ranks = state.pop("ranks", None)
    written = 1 if ranks is None else len(ranks)
    if written != dp.world_size:
        from .trainer.checkpoint import CheckpointError
        raise CheckpointError(f"--resume: the checkpoint was written by {written} process(es), "
                              f"this run has {dp.world_size}; resume with the same world size")
    if ranks is not None:
        state["rng"], state["strategy"] = ranks[dp.rank]["rng"], ranks[dp.rank]["strategy"]
    return state
