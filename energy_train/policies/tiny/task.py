"""The embedded task: a procedurally generated table-top reach-and-grasp scene with a
scripted expert. Deterministic given a seed.

A scene holds ``num_objects`` coloured blocks (distinct colours, distinct cells of a 4x4 grid
plus jitter) and a gripper at (x, y, z) with a yaw and an open/closed state. The image
(3, R, R) shows the blocks; the gripper state is the proprio vector (x, y, z, yaw). The
instruction names the target block's colour in one of several templates (padded to a fixed
length; PAD positions are masked out of the energy model's context).

The expert chunk (H steps x Da = 7) is a proportional controller toward the target, simulated
for H steps: dx, dy (toward the block), dz (descend once above it, else travel height), droll
(0), dpitch (tilt while descending), dyaw (toward the colour's grasp yaw), gripper (+1 open,
-1 once within grasp reach). Translational and rotational deltas are divided by the maximum
step, so every action dimension lies in [-1, 1] (OFT normalises actions to that range).

The data stream is a deterministic function of (seed, step): the batch at step k is a slice
of the epoch's permutation (seeded by (seed, epoch)). That is what makes resume bitwise.
"""
from __future__ import annotations

import torch

from ...tensors import index_tensor

PAD, STOP = 0, 1
WORDS = ["<pad>", "<stop>", "pick", "up", "the", "grasp", "block", "move", "to", "reach"]
COLOURS = {  # name -> RGB
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.8), "cyan": (0.1, 0.85, 0.85),
}
VOCAB = WORDS + list(COLOURS)
TEMPLATES = (("pick", "{c}"), ("pick", "up", "the", "{c}"), ("grasp", "the", "{c}", "block"),
             ("reach", "{c}"))
INSTR_LEN = 4
PROPRIO_DIM = 4
MAX_STEP, MAX_ROT = 0.08, 0.15
GRASP_YAW = torch.linspace(-0.75, 0.75, len(COLOURS))  # each colour's grasp orientation


def _tokens(template: int, colour: int) -> list[int]:
    words = [w.format(c=list(COLOURS)[colour]) for w in TEMPLATES[template]]
    ids = [VOCAB.index(w) for w in words]
    return ids + [PAD] * (INSTR_LEN - len(ids))


def generate_scenes(n: int, seed: int, *, num_objects: int = 3, image_size: int = 16,
                    chunk: int = 8) -> dict[str, torch.Tensor]:
    """n scenes -> images (n,3,R,R), proprio (n,4), tokens (n,Li), expert (n,H,7). CPU, fp32."""
    if not 1 <= num_objects <= len(COLOURS):
        raise ValueError(f"num_objects: expected 1..{len(COLOURS)}, got {num_objects}")
    g = torch.Generator().manual_seed(int(seed))
    colours = torch.argsort(torch.rand(n, len(COLOURS), generator=g), dim=1)[:, :num_objects]
    cells = torch.argsort(torch.rand(n, 16, generator=g), dim=1)[:, :num_objects]
    obj_xy = (torch.stack([cells % 4, cells // 4], -1).float() + 0.5 +
              0.3 * (torch.rand(n, num_objects, 2, generator=g) - 0.5)) / 4  # in (0, 1)
    target = torch.randint(0, num_objects, (n,), generator=g)
    template = torch.randint(0, len(TEMPLATES), (n,), generator=g)
    grip = torch.cat([torch.rand(n, 2, generator=g), 0.2 + 0.6 * torch.rand(n, 1, generator=g),
                      torch.rand(n, 1, generator=g) * 2 - 1], dim=1)  # x, y, z, yaw

    # --- render: background, then each block as a square of its colour ------------------------
    R = image_size
    palette = torch.tensor(list(COLOURS.values()))
    centre = (torch.arange(R).float() + 0.5) / R
    py, px = torch.meshgrid(centre, centre, indexing="ij")  # (R, R)
    images = torch.full((n, 3, R, R), 0.15)
    half = 0.75 / R + 0.02
    for j in range(num_objects):
        x, y = obj_xy[:, j, 0, None, None], obj_xy[:, j, 1, None, None]
        inside = ((px - x).abs() < half) & ((py - y).abs() < half)  # (n, R, R)
        rgb = palette[colours[:, j]][:, :, None, None]  # (n, 3, 1, 1)
        images = torch.where(inside[:, None], rgb, images)

    tgt_colour = colours[torch.arange(n), target]
    tokens = torch.tensor([_tokens(int(t), int(c)) for t, c in zip(template, tgt_colour)])
    expert = scripted_expert(grip, obj_xy[torch.arange(n), target], GRASP_YAW[tgt_colour], chunk)
    return {"images": images, "proprio": grip, "tokens": tokens, "expert": expert}


def scripted_expert(grip: torch.Tensor, target_xy: torch.Tensor, target_yaw: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """grip (n, 4) = x, y, z, yaw; target_xy (n, 2); target_yaw (n,) -> actions (n, H, 7)."""
    pos, yaw = grip[:, :3].clone(), grip[:, 3].clone()
    steps = []
    for _ in range(chunk):
        d_xy = (0.5 * (target_xy - pos[:, :2])).clamp(-MAX_STEP, MAX_STEP)
        above = (target_xy - pos[:, :2]).norm(dim=1) < 0.06
        z_goal = torch.where(above, torch.full_like(yaw, 0.02), torch.full_like(yaw, 0.5))
        d_z = (0.5 * (z_goal - pos[:, 2])).clamp(-MAX_STEP, MAX_STEP)
        d_yaw = (0.5 * (target_yaw - yaw)).clamp(-MAX_ROT, MAX_ROT)
        grasp = above & (pos[:, 2] < 0.08)
        a = torch.stack([d_xy[:, 0] / MAX_STEP, d_xy[:, 1] / MAX_STEP, d_z / MAX_STEP,
                         torch.zeros_like(yaw), -0.5 * d_z / MAX_STEP, d_yaw / MAX_ROT,
                         torch.where(grasp, -1.0, 1.0)], dim=1)
        steps.append(a)
        pos = pos + torch.cat([d_xy, d_z[:, None]], dim=1)
        yaw = yaw + d_yaw
    return torch.stack(steps, dim=1)


class TaskData:
    """A step-indexed source of the embedded task: ``size`` scenes (ids 0..size-1) plus a
    disjoint probe set, made from ``seed`` and held on ``device``.

    ``batch(step, rank, world)`` returns the ``grad_accum`` micro-batches of optimizer step
    ``step`` - rank ``rank``'s shard (batch_size / world rows) of each - as dicts::

        images (B, 3, R, R) float, proprio (B, 4) float, tokens (B, INSTR_LEN) int64,
        actions (B, H, 7) float (the expert chunk), ids (B,) int64 on the CPU (dataset rows)

    A pure function of (seed, step): that is what makes resume exact.
    """

    def __init__(self, seed: int, size: int = 1024, probe_size: int = 32, *, batch_size: int = 16,
                 grad_accum: int = 1, num_objects: int = 3, image_size: int = 16, chunk: int = 8,
                 device="cpu"):
        self.seed, self.size, self.device = int(seed), int(size), torch.device(device)
        self.batch_size, self.grad_accum = int(batch_size), int(grad_accum)
        if self.batch_size * self.grad_accum > self.size:
            raise ValueError(f"batch_size*grad_accum: expected <= the dataset size {self.size}, "
                             f"got {self.batch_size * self.grad_accum}")
        data = generate_scenes(size + probe_size, seed, num_objects=num_objects,
                               image_size=image_size, chunk=chunk)
        self.host = data  # the CPU copy, for check()
        self.train = {k: v[:size].to(self.device) for k, v in data.items()}
        self.probe_data = {k: v[size:].to(self.device) for k, v in data.items()}
        self.probe_size = probe_size
        self._perm_epoch, self._perm = None, None
        self._probe: dict | None = None

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation, made on the host once per epoch (a host list)."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=g).tolist(), epoch
        return self._perm

    def indices(self, step: int, n: int) -> list[int]:
        """The n dataset rows of optimizer step ``step`` (epochs wrap, never a partial batch)."""
        per_epoch = self.size // n
        epoch, slot = divmod(step, per_epoch)
        return self._order(epoch)[slot * n:(slot + 1) * n]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[dict]:
        """Rank ``rank``'s shard (batch_size / world rows) of each of the step's micro-batches:
        world ranks x B/world hold exactly the rows of one rank x B, whatever world is."""
        B = self.batch_size
        if B % world:
            raise ValueError(f"run.batch_size: expected a multiple of the world size {world}, "
                             f"got {B}")
        rows = self.indices(step, B * self.grad_accum)
        per = B // world
        return [self._make(self.train, rows[a * B + rank * per:a * B + (rank + 1) * per])
                for a in range(self.grad_accum)]

    def probe(self) -> dict:
        """The fixed probe batch (made once)."""
        if self._probe is None:
            self._probe = self._make(self.probe_data, list(range(self.probe_size)))
        return self._probe

    def check(self) -> None:
        """Host-side check of every scene (train and probe) for NaN/inf, naming the field and
        the rows; the trainer runs it once at start-up (``run.check_data``)."""
        for name in ("images", "proprio", "expert"):
            t = self.host[name]
            bad = ~torch.isfinite(t.flatten(1)).all(dim=1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                train = [r for r in rows if r < self.size]
                probe = [r - self.size for r in rows if r >= self.size]
                where = (f"dataset rows {train[:8]}{'...' if len(train) > 8 else ''}" if train
                         else f"probe rows {probe[:8]}")
                raise ValueError(f"data: {name} holds NaN/inf in {where}")

    def _make(self, src, ids_host: list[int]) -> dict:
        ids = torch.tensor(ids_host, dtype=torch.int64)
        dev = index_tensor(ids_host, self.device)
        return {"images": src["images"][dev], "proprio": src["proprio"][dev],
                "tokens": src["tokens"][dev], "actions": src["expert"][dev], "ids": ids}
