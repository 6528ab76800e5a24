"""The checks of what an :class:`~.policy.OFTPolicy` is given - its modules at construction,
a batch in training (``check_batch``) and at test time (``act``) - each error naming the
argument or the batch key and the expected vs received value. The host reads here run on a
DataLoader's CPU batch before the trainer moves it, or at test time: never inside a step."""
from __future__ import annotations

import torch
from torch import nn

from .context import IGNORE_INDEX, OFTInputError, unwrap


def rows(flags: torch.Tensor) -> list[int]:
    """The rows where ``flags`` (B,) bool is True, as host ints (a host read)."""
    return flags.nonzero().flatten().tolist() if bool(flags.any()) else []


def check_projector(pp) -> None:
    """OFT's ProprioProjector: a module with ``fc1`` (a Linear from the proprio width) and
    ``fc2`` (or a ``proprio_dim``); anything else fails deep inside OFT's forward."""
    fc1 = getattr(pp, "fc1", None)
    if not isinstance(pp, nn.Module) or (not isinstance(fc1, nn.Linear)
                                         and getattr(pp, "proprio_dim", None) is None):
        raise OFTInputError(f"proprio_projector: expected OFT's ProprioProjector (fc1: Linear("
                            f"proprio_dim, llm_dim), fc2), got {type(pp).__name__}")


def check_pixels(vla: nn.Module, pix, B: int) -> None:
    """pixel_values (B, C, H, W) with the channels OFT's vision backbone splits: 6 per image
    (SigLIP + DINOv2) when fused, else 3, times the images in the input (when the backbone
    says; shape only)."""
    vb = getattr(unwrap(vla), "vision_backbone", None)
    images = getattr(vb, "get_num_images_in_input", None)
    channels, note = None, ""
    if callable(images):
        fused = bool(getattr(vb, "use_fused_vision_backbone", False))
        channels = (6 if fused else 3) * int(images())
        note = f" ({'6 (a fused backbone)' if fused else '3'} channels per image x {int(images())} image(s))"
    if not isinstance(pix, torch.Tensor) or pix.dim() != 4 or pix.shape[0] != B or (
            channels is not None and pix.shape[1] != channels):
        got = tuple(pix.shape) if isinstance(pix, torch.Tensor) else type(pix).__name__
        raise OFTInputError(f"batch['pixel_values']: expected (B, {channels or 'C'}, H, W) with "
                            f"B = {B}{note}, got {got}")


def vocab_size(language_model: nn.Module) -> int | None:
    emb = getattr(language_model, "get_input_embeddings", None)
    n = getattr(emb() if callable(emb) else None, "num_embeddings", None)
    return int(n) if n is not None else None


def check_tokens(batch: dict, *, vocab: int | None, begin: int, pad_id: int, tokens: int) -> None:
    """Host reads: input ids inside the vocabulary, no pad id inside labels, ``tokens`` = H*Da
    action tokens (labels > ``begin``) in every row."""
    ids, labels = batch["input_ids"], batch["labels"]
    if vocab is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise OFTInputError(f"batch['input_ids']: expected ids in [0, {vocab}) (the language "
                                f"model's vocabulary), got values in [{lo}, {hi}]")
    bad = rows((labels >= pad_id).any(dim=1))
    if bad:
        raise OFTInputError(
            f"batch['labels']: rows {bad[:8]} hold ids >= the pad id {pad_id}, outside the "
            f"action-token range ({begin + 1}..{pad_id - 1}); pad labels with {IGNORE_INDEX} "
            "(IGNORE_INDEX), as OFT's collator does")
    counts = (labels > begin).sum(dim=1)
    bad = rows(counts != tokens)
    if bad:
        raise OFTInputError(
            f"batch['labels']: expected H*Da = {tokens} action tokens (ids > {begin}) in every "
            f"row, got {[int(counts[r]) for r in bad[:8]]} in rows {bad[:8]}")


__all__ = ["rows", "check_projector", "check_pixels", "vocab_size", "check_tokens"]
