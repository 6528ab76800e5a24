"""OpenVLA-OFT's sequence: its constants, the ONE context function that training and
test-time correction share, and the test-time batch.

OFT's multimodal sequence (``T = L + P`` rows for ``input_ids`` of length L)::

    [ BOS | P = num_patches rows (256 per image, then one proprio row) | input_ids[1:] ]
      input token j >= 1 sits at row j + P; the action token j is read from row j + P - 1

so the action rows are ``build_action_index(labels=labels, offset=P - 1)`` - what OFT's
``hidden[:, P:-1][action_mask(labels[:, 1:])]`` takes - and the action mask comes from
``labels`` only: the pad id (32000) is also above ``action_token_begin_idx`` (31743).

The context the energy model reads (``context_layout``):

- ``"fork"`` (default, the public energy fork's choice): every row (S = T); hidden: the action
  rows, every row after the last action row (the last action token, ``</s>``, right padding)
  and the final row; visible: BOS, the patches, proprio and the prompt but its last token.
- ``"prompt"``: the BOS, patch, proprio and prompt-token rows at their own positions
  (S = T - H*Da, a width fixed by the batch's shape; shorter prompts are padded by the mask).

``context_and_mask`` (test time) and :meth:`OFTPolicy.layout` (training) both call
``context_layout``: the verifier sees at inference exactly the rows it was trained on.
"""
from __future__ import annotations

import torch
from torch import nn

from ...checks import check_int, check_tensor
from ...modes import eval_mode
from ...ops import energy_scores
from ...tensors import gather_rows

IGNORE_INDEX = -100
ACTION_TOKEN_BEGIN_IDX = 31743  # action tokens are ids > this (Llama-2's last 256 ids)
PAD_TOKEN_ID = 32000            # OpenVLA's pad id: also > ACTION_TOKEN_BEGIN_IDX
STOP_INDEX = 2                  # "</s>"
EMPTY_TOKEN_ID = 29871          # "" after "Out:", appended by OFT's predict_action
CONTEXTS = ("fork", "prompt")
REQUIRED = ("input_ids", "attention_mask", "pixel_values", "labels")


class OFTInputError(ValueError):
    """A batch (or module) that does not match what the OFT policy reads."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP (``.module``) and peft (``get_base_model()``) wrappers."""
    for _ in range(8):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
            continue
        get = getattr(model, "get_base_model", None)
        inner = get() if callable(get) else model
        if inner is model:
            return model
        model = inner
    return model


# --------------------------------------------------------------------------------------------
# the context: one function for training and test time
# --------------------------------------------------------------------------------------------
def context_layout(labels: torch.Tensor, attention_mask: torch.Tensor | None, num_patches: int,
                   context: str = "fork", *, num_action_tokens: int | None = None,
                   action_token_begin_idx: int = ACTION_TOKEN_BEGIN_IDX
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (context_index (B, S) int64, pad_mask (B, S) bool, True = ignore) into OFT's (B, T, D)
    hidden states, T = L + num_patches for labels (B, L). Tensor ops only (no host sync).

    ``context="fork"``: S = T (index = every row), the mask of the public energy fork;
    ``context="prompt"``: S = T - num_action_tokens, the BOS/patch/proprio/prompt rows.
    """
    if context not in CONTEXTS:
        raise ValueError(f"context: expected one of {CONTEXTS}, got {context!r}")
    B, L = labels.shape
    P, dev = int(num_patches), labels.device
    T = L + P
    if context == "fork":
        act = labels[:, 1:] > action_token_begin_idx                      # row P + i, i < L - 1
        pos = torch.arange(L - 1, device=dev)
        last = torch.where(act, pos, -1).amax(dim=1, keepdim=True)        # -1: no action row
        hide = act | (pos >= last)                                        # actions and after
        pad = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=dev), hide,
                         torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
        return torch.arange(T, device=dev).expand(B, T), pad
    if num_action_tokens is None:
        raise ValueError("context_layout(context='prompt'): needs num_action_tokens= (H*Da)")
    S = T - int(num_action_tokens)
    prompt = labels == IGNORE_INDEX
    if attention_mask is not None:
        prompt = prompt & attention_mask.bool()
    visible = torch.cat([torch.ones(B, P + 1, dtype=torch.bool, device=dev), prompt[:, 1:]], 1)
    return torch.arange(S, device=dev).expand(B, S), ~visible[:, :S]


def context_and_mask(hidden: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None, num_patches: int, context: str = "fork",
                     *, num_action_tokens: int | None = None,
                     action_token_begin_idx: int = ACTION_TOKEN_BEGIN_IDX
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, S, D), pad_mask (B, S)) of OFT's last hidden state ``hidden`` (B, T, D):
    the rows :func:`context_layout` names (what the trainer captures for the same batch)."""
    index, pad = context_layout(labels, attention_mask, num_patches, context,
                                num_action_tokens=num_action_tokens,
                                action_token_begin_idx=action_token_begin_idx)
    T = labels.shape[1] + int(num_patches)
    if hidden.dim() != 3 or hidden.shape[:2] != (labels.shape[0], T):
        raise OFTInputError(f"hidden: expected (B, T, D) with B={labels.shape[0]} and "
                            f"T = L + num_patches = {T}, got {tuple(hidden.shape)}")
    if index.shape[1] == T:
        return hidden, pad
    return gather_rows(hidden, index), pad


@torch.no_grad()
def rerank(energy, context: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor):
    """The lowest-energy candidate per sample: candidates (B, C, H, Da) -> (best (B, H, Da),
    index (B,), energies (B, C)), each context encoded once, the energy model in eval mode.

    The rule the C++ runtime's ``Verifier::rerank`` shares: a candidate whose energy is not
    finite (NaN, inf) or whose chunk holds a non-finite value is never picked; a sample with
    no such candidate is an error (a ValueError naming the samples; a host read)."""
    with eval_mode(energy):
        e = energy_scores(energy, context, mask, candidates)
    ok = torch.isfinite(e) & torch.isfinite(candidates).flatten(2).all(dim=2)
    none = ~ok.any(dim=1)
    if bool(none.any()):
        rows = none.nonzero().flatten().tolist()
        raise ValueError(f"rerank: samples {rows[:8]} have no candidate with a finite energy and "
                         "finite values (NaN/inf in the candidates, the context or the model); "
                         "nothing safe to pick")
    idx = e.masked_fill(~ok, float("inf")).argmin(dim=1)
    best = candidates.gather(1, idx[:, None, None, None].expand(-1, 1, *candidates.shape[2:]))
    return best[:, 0], idx, e


def prepare_inference(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor, *, num_action_tokens: int, proprio=None,
                      action_token_begin_idx: int = ACTION_TOKEN_BEGIN_IDX,
                      empty_token_id: int = EMPTY_TOKEN_ID, stop_id: int = STOP_INDEX) -> dict:
    """A test-time batch exactly as OFT's ``predict_action`` builds it from the processor's
    prompt ("In: What action should the robot take to {task}?\\nOut:"): the empty token
    appended if missing, H*Da placeholder ids (1) and the stop id, the attention mask extended
    with ones, labels IGNORE_INDEX on the prompt, ``begin + 1`` on the placeholders, the stop
    id last. Feed it to :meth:`OFTPolicy.act`. ``num_action_tokens`` = H*Da, an int >= 1."""
    n = check_int("num_action_tokens", num_action_tokens, low=1)
    for name, v in (("action_token_begin_idx", action_token_begin_idx),
                    ("empty_token_id", empty_token_id), ("stop_id", stop_id)):
        check_int(name, v, low=0)
    check_tensor("input_ids", input_ids, ndim=2, integer=True)
    check_tensor("attention_mask", attention_mask, ndim=2, shape=dict(enumerate(input_ids.shape)))
    B, dev = input_ids.shape[0], input_ids.device
    if not bool((input_ids[:, -1] == empty_token_id).all()):
        input_ids = torch.cat([input_ids, input_ids.new_full((B, 1), empty_token_id)], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    ids = torch.cat([input_ids, input_ids.new_ones(B, n), input_ids.new_full((B, 1), stop_id)], 1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(B, ids.shape[1] - attention_mask.shape[1])], 1)
    labels = torch.cat([labels, labels.new_full((B, n + 1), action_token_begin_idx + 1)], 1)
    labels[:, -1] = stop_id
    out = {"input_ids": ids, "attention_mask": mask.to(dev), "labels": labels,
           "pixel_values": pixel_values}
    if proprio is not None:
        p = torch.as_tensor(proprio, dtype=torch.float32)
        out["proprio"] = p.reshape(B, -1).to(dev)
    return out


__all__ = ["context_layout", "context_and_mask", "rerank", "prepare_inference", "unwrap",
           "OFTInputError", "IGNORE_INDEX", "ACTION_TOKEN_BEGIN_IDX", "PAD_TOKEN_ID",
           "STOP_INDEX", "EMPTY_TOKEN_ID", "CONTEXTS", "REQUIRED"]
