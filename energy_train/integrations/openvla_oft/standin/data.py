"""The stand-in's data: OFT's collator, procedural episodes of the embedded task tokenised
like OFT's RLDS transform, and a step-indexed source of collated batches. See the package
docstring."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ....policies.tiny.task import MAX_ROT, MAX_STEP, VOCAB as TASK_VOCAB, generate_scenes
from ..context import IGNORE_INDEX
from .vla import BOS, DATASET_NAME, N_BINS, PAD_TOKEN_ID, STOP_INDEX, VOCAB_SIZE, WORDS


@dataclass
class PaddedCollatorForActionPrediction:
    """OFT's collator (same output): right padding with ``pad_token_id``, labels padded with
    IGNORE_INDEX, ``attention_mask = input_ids != pad``, wrist images stacked after the main
    one along the channels, ``proprio`` through ``np.squeeze`` (1-D when B = 1)."""
    model_max_length: int
    pad_token_id: int
    padding_side: str = "right"
    pixel_values_dtype: torch.dtype = torch.float32

    def __call__(self, instances: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        input_ids, labels = tuple([instance[key] for instance in instances] for key in ("input_ids", "labels"))
        pixel_values = [instance["pixel_values"] for instance in instances]
        if "dataset_name" in instances[0]:
            dataset_names = [instance["dataset_name"] for instance in instances]
        else:
            dataset_names = None
        assert self.padding_side == "right", f"Invalid Tokenizer `{self.padding_side = }`"
        input_ids = pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id)
        labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        input_ids, labels = input_ids[:, : self.model_max_length], labels[:, : self.model_max_length]
        attention_mask = input_ids.ne(self.pad_token_id)
        assert all([pv is not None for pv in pixel_values]), "Invalid VLA Example with `pixel_values = None`!"
        if isinstance(pixel_values[0], torch.Tensor):
            if "pixel_values_wrist" in instances[0]:
                pixel_values_wrist = [instance["pixel_values_wrist"] for instance in instances]
                pixel_values = torch.cat((torch.stack(pixel_values), torch.stack(pixel_values_wrist)), dim=1)
            else:
                pixel_values = torch.stack(pixel_values)
        else:
            raise ValueError(f"Unsupported `pixel_values` type = {type(pixel_values)}")
        actions = [torch.from_numpy(np.copy(instance["actions"])) for instance in instances]
        actions = torch.stack(actions)
        if "proprio" in instances[0]:
            proprio = [instance["proprio"] for instance in instances]
            proprio = torch.Tensor(np.squeeze(np.stack(proprio)))
        else:
            proprio = None
        output = dict(pixel_values=pixel_values, proprio=proprio, input_ids=input_ids,
                      attention_mask=attention_mask, labels=labels, actions=actions)
        if dataset_names is not None:
            output["dataset_names"] = dataset_names
        return output


def action_tokens(actions: np.ndarray) -> np.ndarray:
    """OpenVLA's ActionTokenizer ids: clip to [-1, 1], ``np.digitize`` into N_BINS bins, id =
    VOCAB_SIZE - bin (the last N_BINS ids of the base vocabulary)."""
    bins = np.linspace(-1, 1, N_BINS)
    return VOCAB_SIZE - np.digitize(np.clip(actions, -1.0, 1.0), bins)


def prompt_ids(task: str) -> list[int]:
    """BOS + "In: What action should the robot take to {task}?\\nOut:" + the empty token."""
    words = ["In:", "What", "action", "should", "the", "robot", "take", "to", *task.split(), "?",
             "Out:", "\u2581"]
    return [BOS] + [WORDS.index(w) for w in words]


class StandinEpisodes:
    """``episodes`` procedural episodes of ``episode_len`` steps (seeded), as a map-style
    dataset of OFT RLDS-transform samples: ``pixel_values`` (6, R, R) (the scene, normalised
    two ways for the two featurizers), ``pixel_values_wrist`` (6, R, R) (the scene rolled so
    the gripper is centred), ``input_ids`` / ``labels`` (L,) int64 (labels IGNORE_INDEX but on
    the H*Da action tokens and ``</s>``), ``actions`` (H, 7) float32 numpy (the expert's next H
    actions), ``proprio`` (8,) float32 numpy, ``dataset_name``."""

    def __init__(self, episodes: int, episode_len: int = 16, *, seed: int = 0, chunk: int = 8,
                 num_objects: int = 3, image_size: int = 16, wrist: bool = True):
        self.episodes, self.episode_len, self.chunk, self.wrist = episodes, episode_len, chunk, wrist
        s = generate_scenes(episodes, seed, num_objects=num_objects, image_size=image_size,
                            chunk=episode_len + chunk - 1)  # one expert rollout per episode
        self.images, self.expert = s["images"], s["expert"].numpy().astype(np.float32)
        names = TASK_VOCAB
        self.tasks = [" ".join(names[t] for t in row.tolist() if t > 1) for row in s["tokens"]]
        # the gripper state along each rollout: integrate the expert's (de-normalised) deltas
        grip = s["proprio"].numpy().astype(np.float64)
        steps = self.expert.astype(np.float64)
        pos = grip[:, None, :3] + np.concatenate(
            [np.zeros((episodes, 1, 3)), np.cumsum(steps[:, :, :3] * MAX_STEP, axis=1)], axis=1)
        yaw = grip[:, None, 3] + np.concatenate(
            [np.zeros((episodes, 1)), np.cumsum(steps[:, :, 5] * MAX_ROT, axis=1)], axis=1)
        gripper = np.concatenate([np.ones((episodes, 1)), steps[:, :, 6]], axis=1)
        self.state = np.stack([pos[..., 0], pos[..., 1], pos[..., 2], np.zeros_like(yaw),
                               np.zeros_like(yaw), yaw, gripper, -gripper], axis=-1).astype(np.float32)

    def __len__(self) -> int:
        return self.episodes * self.episode_len

    @staticmethod
    def _six(img: torch.Tensor) -> torch.Tensor:
        """(3, R, R) in [0, 1] -> (6, R, R): SigLIP-style (x - 0.5) / 0.5, then ImageNet-style."""
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        return torch.cat([(img - 0.5) / 0.5, (img - mean) / std], dim=0)

    def __getitem__(self, i: int) -> dict:
        e, t = divmod(int(i), self.episode_len)
        img = self.images[e]
        H = self.chunk
        actions = self.expert[e, t:t + H]
        state = self.state[e, t]
        ids = prompt_ids(self.tasks[e]) + action_tokens(actions).reshape(-1).tolist() + [STOP_INDEX]
        input_ids = torch.tensor(ids, dtype=torch.int64)
        labels = input_ids.clone()
        labels[: -(actions.size + 1)] = IGNORE_INDEX
        out = {"pixel_values": self._six(img), "input_ids": input_ids, "labels": labels,
               "dataset_name": DATASET_NAME, "actions": actions.copy(), "proprio": state.copy()}
        if self.wrist:
            R = img.shape[-1]
            shift = (int(round(R / 2 - float(state[1]) * R)), int(round(R / 2 - float(state[0]) * R)))
            out["pixel_values_wrist"] = self._six(torch.roll(img, shifts=shift, dims=(1, 2)))
        return out


class StandinData:
    """A step-indexed source of collated batches of :class:`StandinEpisodes` (exact resume):
    the batch of step k is a slice of the epoch's permutation (seeded by (seed, epoch));
    ``batch(step, rank, world)`` -> rank's share of each of the step's micro-batches, each the
    collator's output plus ``ids`` (dataset rows, a CPU int64 tensor). ``probe()`` -> one
    collated batch of one sample per held-out episode."""

    def __init__(self, train: StandinEpisodes, probe: StandinEpisodes, *, batch_size: int,
                 grad_accum: int = 1, seed: int = 0):
        self.train, self.probe_set = train, probe
        self.batch_size, self.grad_accum, self.seed = int(batch_size), int(grad_accum), int(seed)
        self.collator = PaddedCollatorForActionPrediction(512, PAD_TOKEN_ID)
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.train), generator=g).tolist())
        return self._perm[1]

    def collate(self, dataset: StandinEpisodes, rows: list[int]) -> dict:
        out = self.collator([dataset[r] for r in rows])
        out["ids"] = torch.tensor(rows, dtype=torch.int64)
        return out

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[dict]:
        B, n = self.batch_size, self.batch_size * self.grad_accum
        if B % world:
            raise ValueError(f"run.batch_size: expected a multiple of the world size {world}, got {B}")
        epoch, slot = divmod(step, len(self.train) // n)
        rows = self._order(epoch)[slot * n:(slot + 1) * n]
        per = B // world
        return [self.collate(self.train, rows[a * B + rank * per:a * B + (rank + 1) * per])
                for a in range(self.grad_accum)]

    def probe(self) -> dict:
        """One sample of each held-out episode, at steps spread over the episode."""
        n, E = self.probe_set.episodes, self.probe_set.episode_len
        return self.collate(self.probe_set, [e * E + (5 * e) % E for e in range(n)])
