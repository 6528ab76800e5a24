"""Start-up checks of a policy against its data: one no-grad forward of the probe batch, before
the first step, so a wrong shape, dtype or position is a clear error naming the Policy method
and the expected vs received value - not a deep traceback in step 1000. Host reads are fine
here (once, at start-up)."""
from __future__ import annotations

import torch

from ..policy import hidden


class PolicyError(ValueError):
    pass


def _shape(name: str, t, shape: tuple, dtypes: tuple | None = None, what: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise PolicyError(f"{name}: expected a tensor {what}, got {type(t).__name__}")
    want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
    if t.dim() != len(shape) or any(s is not None and s != g for s, g in zip(shape, t.shape)):
        raise PolicyError(f"{name}: expected shape {want} {what}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise PolicyError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def _positions(name: str, index: torch.Tensor, T: int) -> None:
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= T:
        raise PolicyError(f"{name}: positions must lie in [0, T={T}) of the hidden states, got "
                          f"values in [{lo}, {hi}]")


def check_policy(trainer) -> None:
    """Check the policy's layout, expert, forward and head on the probe batch."""
    policy, cfg = trainer.policy, trainer.cfg
    H, Da = policy.chunk_shape
    D = policy.hidden_size
    mb = trainer.probe_batch()
    lay = mb.layout
    _shape("Policy.expert(batch)", mb.expert, (None, H, Da), what="(B, H, Da) from the head's "
           f"H={H}, Da={Da}")
    B = mb.expert.shape[0]
    if not mb.expert.is_floating_point():
        raise PolicyError(f"Policy.expert(batch): expected a floating dtype, got {mb.expert.dtype}")
    _shape("Policy.layout(batch).action_index", lay.action_index, (B, H * Da), (torch.int64,),
           f"(B, H*Da) for the head's H*Da={H * Da}")
    _shape("Policy.layout(batch).context_index", lay.context_index, (B, None), (torch.int64,),
           "(B, S)")
    S = lay.context_index.shape[1]
    _shape("Policy.layout(batch).pad_mask", lay.pad_mask, (B, S), (torch.bool,),
           "(B, S), like context_index")
    with torch.no_grad(), trainer.autocast():
        h = hidden(policy.forward(mb.batch))
        _shape("Policy.forward(batch)", h, (B, None, D), what=f"(B, T, D) with the policy's D={D}")
        if not h.is_floating_point():
            raise PolicyError(f"Policy.forward(batch): expected a floating dtype, got {h.dtype}")
        T = h.shape[1]
        _positions("Policy.layout(batch).action_index", lay.action_index, T)
        _positions("Policy.layout(batch).context_index", lay.context_index, T)
        rows = h.gather(1, lay.action_index[:, :, None].expand(-1, -1, D))
        pred = policy.predict_action(rows)
    _shape("Policy.predict_action(rows (B, H*Da, D))", pred, (B, H, Da), what="(B, H, Da)")
    if cfg.run.capture == "hidden_states":
        with torch.no_grad(), trainer.autocast():
            out = policy.forward(mb.batch, output_hidden_states=True)
        if not hasattr(out, "hidden_states") or not out.hidden_states:
            raise PolicyError("run.capture = hidden_states: Policy.forward(batch, "
                              "output_hidden_states=True) must return an object with "
                              ".last_hidden_state and .hidden_states (L+1 tensors)")
    if bool(lay.pad_mask.all(dim=1).any()):
        rows = lay.pad_mask.all(dim=1).nonzero().flatten().tolist()
        raise PolicyError(f"Policy.layout(batch).pad_mask: samples {rows[:8]} of the probe batch "
                          "mask every context row (True = ignore)")
