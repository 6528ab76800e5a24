"""OpenVLA-OFT integration: train an energy verifier beside an OFT policy with the trainer.

    OFTPolicy              OFT's VLA + L1 head + proprio projector behind the Policy interface
                           (policy.py)
    context_layout / context_and_mask   the ONE context function (training and test time;
                           context.py, with OFT's token constants)
    prepare_inference, OFTPolicy.act / .correct, rerank   test-time correction and reranking
    apply_lora             OFT's LoraConfig (peft; r, alpha = min(r, 16), all-linear, dropout 0)
    save_oft_checkpoint / load_oft_checkpoint   OFT's checkpoint file layout
    load_lora_adapter / resume_vla   an adapter (saved under either peft) on a base model;
                           resuming as OFT does (merged model + fresh LoRA, or base + adapter)
    standin                a tiny random-weight OFT with the same interface (needs transformers)

Importing this package needs torch only; ``standin`` imports transformers when first used.
"""
from __future__ import annotations

import importlib

from .checkpoints import (apply_lora, load_lora_adapter, load_oft_checkpoint, oft_checkpoint_dir,
                          resume_vla, save_oft_checkpoint)
from .context import (ACTION_TOKEN_BEGIN_IDX, CONTEXTS, EMPTY_TOKEN_ID, IGNORE_INDEX,
                      PAD_TOKEN_ID, STOP_INDEX, OFTInputError, context_and_mask, context_layout,
                      prepare_inference, rerank, unwrap)
from .policy import OFTPolicy


def __getattr__(name: str):
    if name == "standin":
        return importlib.import_module(f"{__name__}.standin")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OFTPolicy", "OFTInputError", "context_layout", "context_and_mask", "rerank",
           "prepare_inference", "unwrap", "apply_lora", "save_oft_checkpoint",
           "load_oft_checkpoint", "oft_checkpoint_dir", "load_lora_adapter", "resume_vla",
           "IGNORE_INDEX", "ACTION_TOKEN_BEGIN_IDX",
           "PAD_TOKEN_ID", "STOP_INDEX", "EMPTY_TOKEN_ID", "CONTEXTS", "standin"]
