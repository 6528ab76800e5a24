"""OpenVLA-OFT behind the Policy interface (:class:`OFTPolicy`): training batches of OFT's
collator, OFT's checkpoint layout after each trainer checkpoint, and the test-time path
(:meth:`OFTPolicy.act`, :meth:`OFTPolicy.correct`). Its context rows come from the one context
function, :func:`.context.context_layout`, which test time uses too.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ...capture import find_decoder
from ...checks import check_int
from ...losses import correct_actions
from ...modes import eval_mode
from ...ops import build_action_index
from ...policy import BatchLayout, Policy
from ...tensors import gather_rows
from .checkpoints import is_peft, oft_checkpoint_dir, save_oft_checkpoint
from .context import (ACTION_TOKEN_BEGIN_IDX, CONTEXTS, PAD_TOKEN_ID, REQUIRED, OFTInputError,
                      context_and_mask, context_layout, unwrap)
from .inputs import check_pixels, check_projector, check_tokens, vocab_size


# --------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------
class _LastHidden:
    """A forward hook on the LLM's final norm that keeps its output (= ``hidden_states[-1]``)
    while armed, so the forward needs no ``output_hidden_states`` tuple of L+1 states."""

    def __init__(self, norm: nn.Module):
        self.value, self.armed = None, False
        norm.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.armed:
            self.value = out[0] if isinstance(out, (tuple, list)) else out

    def take(self, run) -> torch.Tensor:
        self.value, self.armed = None, True
        try:
            run()
        finally:
            self.armed = False
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("OFTPolicy.forward: the language model's final norm did not run")
        return value


class OFTPolicy(Policy):
    """OpenVLA-OFT (``OpenVLAForActionPrediction``, peft-wrapped or not, any dtype) with its L1
    head and proprio projector, run the way OFT's fine-tuning runs them.

    Args:
        vla: the VLA; its forward takes OFT's keyword arguments (``input_ids, attention_mask,
            pixel_values, labels, proprio, proprio_projector, use_film, output_hidden_states``).
        action_head: ``predict_action((B, H*Da, D)) -> (B, H, Da)``: this package's
            ``L1RegressionActionHead`` or OFT's own (whose H is the global NUM_ACTIONS_CHUNK;
            ``energy_train.models.load_oft_state_dict`` loads one's weights into the other).
        proprio_projector: OFT's ``ProprioProjector`` (``fc1, fc2``) or None (no proprio).
        num_patches: P, the rows between BOS and the text; default as OFT's fine-tuning counts it:
            patches per image x images (+1 with a proprio projector).
        num_actions_chunk: H; default the head's ``num_actions_chunk`` or OFT's global.
        context: "fork" | "prompt" (see the module docstring).
        action_token_begin_idx, pad_token_id: OpenVLA's 31743 and 32000.
        save_oft: at every trainer checkpoint also write OFT's layout (:meth:`save_extra`),
            with ``dataset_statistics`` (a dict) and ``processor`` when given.

    Batches are the output of OFT's ``PaddedCollatorForActionPrediction`` (``pixel_values,
    input_ids, attention_mask, labels, actions, proprio``; other keys pass through).
    ``forward`` moves what it passes to the VLA's device itself (a no-grad call on the bare
    module gets no input move from DDP). Host reads of a batch happen in
    :meth:`check_batch` only, before the trainer moves it.
    """

    def __init__(self, vla: nn.Module, action_head: nn.Module, proprio_projector: nn.Module | None = None,
                 *, num_patches: int | None = None, num_actions_chunk: int | None = None,
                 use_film: bool = False, context: str = "fork",
                 action_token_begin_idx: int = ACTION_TOKEN_BEGIN_IDX,
                 pad_token_id: int = PAD_TOKEN_ID, save_oft: bool = True,
                 dataset_statistics: dict | None = None, processor=None):
        if context not in CONTEXTS:
            raise ValueError(f"context: expected one of {CONTEXTS}, got {context!r}")
        check_int("action_token_begin_idx", action_token_begin_idx, low=0)
        check_int("pad_token_id", pad_token_id, low=0)
        if num_patches is not None:
            check_int("num_patches", num_patches, low=1)
        if num_actions_chunk is not None:
            check_int("num_actions_chunk", num_actions_chunk, low=1)
        if proprio_projector is not None:
            check_projector(proprio_projector)
        self.backbone, self.action_head = vla, action_head
        self.extras = {} if proprio_projector is None else {"proprio_projector": proprio_projector}
        self.proprio_projector, self.use_film, self.context = proprio_projector, use_film, context
        self.begin, self.pad_id = int(action_token_begin_idx), int(pad_token_id)
        self.save_oft, self.dataset_statistics, self.processor = save_oft, dataset_statistics, processor
        base = unwrap(vla)
        self.language_model = getattr(base, "language_model", None)
        if self.language_model is None:
            raise OFTInputError(f"vla: expected an OpenVLA model with .language_model, got "
                                f"{type(base).__name__}")
        self.num_patches = int(num_patches) if num_patches is not None else self._count_patches(base)
        self._shape = self._chunk(action_head, num_actions_chunk)
        self._D = self._hidden(base, action_head, self._shape[1])
        self._check_head()
        self._last = _LastHidden(self.decoder()[1])
        self._checked_on_device = False

    # ---- construction -------------------------------------------------------------------------
    def _count_patches(self, base) -> int:
        vb = getattr(base, "vision_backbone", None)
        if vb is None or not hasattr(vb, "get_num_patches"):
            raise OFTInputError("num_patches: the VLA has no vision_backbone.get_num_patches(); "
                                "give num_patches= (patches per image x images + proprio)")
        n = int(vb.get_num_patches()) * int(vb.get_num_images_in_input())
        return n + (1 if self.proprio_projector is not None else 0)

    @staticmethod
    def _chunk(head, H) -> tuple[int, int]:
        Da = getattr(head, "action_dim", None)
        if Da is None:
            raise OFTInputError("action_head: expected an .action_dim attribute (Da)")
        if H is None:
            H = getattr(head, "num_actions_chunk", None)
        if H is None:
            try:  # OFT's head reshapes with this global: read the same value
                from prismatic.vla.constants import NUM_ACTIONS_CHUNK as H
            except ImportError:
                raise OFTInputError("num_actions_chunk: the head has no num_actions_chunk and "
                                    "prismatic.vla.constants is not importable; give "
                                    "num_actions_chunk= (H)") from None
        return int(H), int(Da)

    def _hidden(self, base, head, Da) -> int:
        D = getattr(head, "input_dim", None)
        if D is None:
            fc1 = getattr(getattr(head, "model", None), "fc1", None)
            if fc1 is None:
                raise OFTInputError("action_head: expected .input_dim or .model.fc1 (OFT's MLPResNet)")
            D = fc1.in_features // Da
        llm = getattr(getattr(self.language_model, "config", None), "hidden_size", None)
        if llm is not None and int(llm) != int(D):
            raise OFTInputError(f"action_head: expected input width D = the VLA's hidden size "
                                f"{llm}, got {D}")
        return int(D)

    def _check_head(self) -> None:
        """One zero batch through the head: its (H, Da) must be the policy's (OFT's head reads
        H from a global, so a mismatch would otherwise surface deep inside a step)."""
        H, Da = self._shape
        p = next(self.action_head.parameters())
        x = torch.zeros(1, H * Da, self._D, dtype=p.dtype, device=p.device)
        try:
            with torch.no_grad():
                out = self.action_head.predict_action(x)
        except (RuntimeError, ValueError) as e:
            raise OFTInputError(f"action_head: predict_action((1, H*Da={H * Da}, D={self._D})) "
                                f"failed for H={H}, Da={Da} ({e})") from None
        if tuple(out.shape) != (1, H, Da):
            raise OFTInputError(f"action_head: predict_action((1, H*Da, D)) expected (1, {H}, "
                                f"{Da}), got {tuple(out.shape)}")

    # ---- Policy ----------------------------------------------------------------------------------
    @property
    def chunk_shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def hidden_size(self) -> int:
        return self._D

    @property
    def num_action_tokens(self) -> int:
        return self._shape[0] * self._shape[1]

    @property
    def proprio_dim(self) -> int | None:
        pp = self.proprio_projector
        if pp is None:
            return None
        dim = getattr(pp, "proprio_dim", None)
        return int(dim if dim is not None else pp.fc1.in_features)

    def decoder(self):
        """The LLM's decoder layers and final norm (never the vision towers' blocks)."""
        return find_decoder(self.language_model)

    def forward(self, batch: dict, output_hidden_states: bool = False):
        """OFT's training forward (its keyword arguments) -> (B, T, D) last hidden
        state, read by a hook on the final norm (``hidden_states[-1]``)."""
        self._check_keys(batch)
        p = next(self.backbone.parameters())
        dev = p.device
        vision = getattr(unwrap(self.backbone), "vision_backbone", None)
        pix_dtype = next(vision.parameters()).dtype if vision is not None else p.dtype
        kw = dict(input_ids=batch["input_ids"].to(dev, non_blocking=True),
                  attention_mask=batch["attention_mask"].to(dev, non_blocking=True),
                  pixel_values=batch["pixel_values"].to(dev, pix_dtype, non_blocking=True),
                  labels=batch["labels"].to(dev, non_blocking=True),
                  proprio=None, proprio_projector=None, use_film=self.use_film)
        if self.proprio_projector is not None:
            pp_dtype = next(self.proprio_projector.parameters()).dtype
            proprio = batch["proprio"].reshape(batch["input_ids"].shape[0], -1)  # OFT's reshape:
            # its collator squeezes (1, P) to (P,) at B = 1
            kw.update(proprio=proprio.to(dev, pp_dtype, non_blocking=True),
                      proprio_projector=self.proprio_projector)
        if output_hidden_states:
            out = self.backbone(**kw, output_hidden_states=True)
            return SimpleNamespace(last_hidden_state=out.hidden_states[-1],
                                   hidden_states=out.hidden_states)
        return self._last.take(lambda: self.backbone(**kw, output_hidden_states=False))

    def predict_action(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, H*Da, D) action rows -> (B, H, Da): the rows cast to the head's dtype first, as
        OFT's training forward does (``.to(torch.bfloat16)`` for its bf16 head), so an fp32 VLA
        feeds a bf16 head (differentiable: the gradient flows back in the rows' dtype)."""
        p = next(self.action_head.parameters(), None)
        return self.action_head.predict_action(rows if p is None else rows.to(p.dtype))

    def layout(self, batch: dict) -> BatchLayout:
        labels = batch["labels"]
        index = build_action_index(num_tokens=self.num_action_tokens, labels=labels,
                                   action_token_begin_idx=self.begin, offset=self.num_patches - 1)
        ctx, pad = context_layout(labels, batch.get("attention_mask"), self.num_patches,
                                  self.context, num_action_tokens=self.num_action_tokens,
                                  action_token_begin_idx=self.begin)
        return BatchLayout(index, ctx, pad)

    def expert(self, batch: dict) -> torch.Tensor:
        if "actions" not in batch:
            raise OFTInputError("batch['actions']: missing (the (B, H, Da) expert chunk)")
        return batch["actions"]

    # ---- checks ----------------------------------------------------------------------------------
    def _check_keys(self, batch: dict) -> None:
        """Keys and shapes (no host sync)."""
        missing = [k for k in REQUIRED if k not in batch]
        if missing:
            raise OFTInputError(f"batch[{missing[0]!r}]: missing (OFTPolicy reads {REQUIRED}"
                                f"{' and proprio' if self.proprio_projector is not None else ''})")
        ids, labels = batch["input_ids"], batch["labels"]
        if labels.shape != ids.shape:
            raise OFTInputError(f"batch['labels']: expected the shape of input_ids "
                                f"{tuple(ids.shape)}, got {tuple(labels.shape)}")
        B = ids.shape[0]
        check_pixels(self.backbone, batch["pixel_values"], B)
        if self.proprio_projector is not None:
            if batch.get("proprio") is None:
                raise OFTInputError(f"batch['proprio']: missing; the proprio projector reads "
                                    f"(B, {self.proprio_dim})")
            p = batch["proprio"]
            squeezed = B == 1 and tuple(p.shape) == (self.proprio_dim,)  # OFT's collator at B = 1
            if tuple(p.shape) != (B, self.proprio_dim) and not squeezed:
                raise OFTInputError(f"batch['proprio']: expected (B, proprio_dim) = "
                                    f"({B}, {self.proprio_dim}) (or ({self.proprio_dim},) at "
                                    f"B = 1, as OFT's collator squeezes it), got {tuple(p.shape)}")

    def _check_tokens(self, batch: dict) -> None:
        check_tokens(batch, vocab=vocab_size(self.language_model), begin=self.begin,
                     pad_id=self.pad_id, tokens=self.num_action_tokens)

    def check_batch(self, batch: dict) -> None:
        """Every check of a batch, with host reads (the trainer calls it before moving the
        batch: a DataLoader's CPU batch costs no device sync): keys and shapes, the expert
        chunk against the head's (H, Da), the pad id inside labels, H*Da action tokens per row.
        A batch already on the GPU is read back in full only the first time (later ones get
        the shape checks): every other read would synchronise a step."""
        if not isinstance(batch, dict):
            return  # the trainer's own error names it
        self._check_keys(batch)
        H, Da = self._shape
        a = self.expert(batch)
        B = batch["labels"].shape[0]
        if tuple(a.shape) != (B, H, Da):
            raise OFTInputError(f"batch['actions']: expected (B, H, Da) = ({B}, {H}, {Da}) from "
                                f"the action head, got {tuple(a.shape)}")
        on_device = batch["labels"].device.type != "cpu"
        if on_device and self._checked_on_device:
            return  # host reads of a device batch would synchronise: the first one only
        self._checked_on_device |= on_device
        self._check_tokens(batch)

    def save_extra(self, run_dir, step: int, theta: dict, phi: dict) -> None:
        """OFT's checkpoint layout at ``<run>/oft/step_<N>/`` (see checkpoints.py): the LoRA
        adapter from theta's backbone tensors, the head and proprio projector, the energy
        model, and with FiLM the vision backbone."""
        if not self.save_oft:
            return
        adapter = {k[len("backbone."):]: v for k, v in theta.items() if k.startswith("backbone.")}
        peft_vla = self.backbone if is_peft(self.backbone) else None
        save_oft_checkpoint(oft_checkpoint_dir(run_dir, step), step, vla=peft_vla,
                            adapter_state=adapter if peft_vla is not None and adapter else None,
                            action_head=self.action_head, proprio_projector=self.proprio_projector,
                            vision_backbone=(unwrap(self.backbone).vision_backbone
                                             if self.use_film else None),
                            energy=phi, dataset_statistics=self.dataset_statistics,
                            processor=self.processor)

    # ---- test time -------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, batch: dict, *, autocast: torch.dtype | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (normalised actions (B, H, Da), context (B, S, D), pad_mask (B, S)) of a batch
        (:func:`prepare_inference` for test time; a training batch works too), the context by
        :func:`context_and_mask`: the rows the verifier was trained on. ``autocast``: the
        dtype the policy was trained under (``torch.bfloat16`` for run.precision = bf16).
        Checked like a training batch: H*Da action placeholders in every row (a chunk with a
        non-action row is refused), ids inside the vocabulary, pixel_values' channels."""
        if not isinstance(batch, dict):
            raise OFTInputError(f"batch: expected a dict (prepare_inference's), got "
                                f"{type(batch).__name__}")
        self._check_keys(batch)
        self._check_tokens(batch)  # test time: host reads are fine (H*Da placeholders, ids)
        dev = next(self.backbone.parameters()).device
        with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None), \
                eval_mode(*self.modules().values()):  # test time: eval mode, restored after
            h = self.forward(batch)
            labels = batch["labels"].to(h.device)
            index = build_action_index(num_tokens=self.num_action_tokens, labels=labels,
                                       action_token_begin_idx=self.begin, offset=self.num_patches - 1)
            actions = self.predict_action(gather_rows(h, index))
        ctx, pad = context_and_mask(h, labels, batch["attention_mask"].to(h.device),
                                    self.num_patches, self.context,
                                    num_action_tokens=self.num_action_tokens,
                                    action_token_begin_idx=self.begin)
        return actions, ctx, pad

    def correct(self, energy, batch: dict, *, alpha: float = 0.1, steps: int = 1,
                clip_frac: float = 0.2, autocast: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, corrected) normalised actions (B, H, Da): :meth:`act` (under
        ``autocast``), then ``correct_actions`` on the same context in the energy model's
        dtype with autocast off (as the trainer runs it). Un-normalise after this."""
        actions, ctx, pad = self.act(batch, autocast=autocast)
        e_dtype = next(energy.parameters()).dtype  # correct_actions runs it in eval mode
        with torch.autocast(ctx.device.type, enabled=False):
            fixed = correct_actions(energy, ctx.to(e_dtype), pad, actions.to(e_dtype),
                                    alpha=alpha, steps=steps, clip_frac=clip_frac)
        return actions, fixed


__all__ = ["OFTPolicy"]
