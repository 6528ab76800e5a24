"""Start-up checks of a policy against its data: one no-grad forward of the probe batch, before
the first step, so a wrong shape, dtype or position is a clear error naming the Policy method
and the expected vs received value - not a deep traceback in step 1000. Host reads are fine
here (once, at start-up)."""
from __future__ import annotations

import contextlib

import torch

from ..capture import NORM_NAMES, layer_output
from ..modes import module_mode
from ..policy import BatchLayout
from ..tensors import gather_rows


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


def check_sizes(policy) -> None:
    """Policy.chunk_shape and hidden_size (read from the head by default) are there."""
    try:
        policy.chunk_shape, policy.hidden_size
    except AttributeError as e:
        raise PolicyError(f"Policy.chunk_shape / hidden_size: {e}; the default reads the action "
                          "head's num_actions_chunk, action_dim and input_dim (as "
                          "energy_train.L1RegressionActionHead has them): override chunk_shape "
                          "-> (H, Da), hidden_size -> D and predict_action(rows) for another "
                          "head") from e


def _keys(batch) -> str:
    return ", ".join(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__


def _forward(policy, batch) -> torch.Tensor:
    """Policy.forward(batch) as a (B, T, D) tensor, or a PolicyError naming the method."""
    try:
        out = policy.forward(batch)
    except Exception as e:
        raise PolicyError(f"Policy.forward(batch) raised {type(e).__name__}: {e} (batch keys: "
                          f"{_keys(batch)})") from e
    if isinstance(out, torch.Tensor):
        return out
    h = getattr(out, "last_hidden_state", None)
    if not isinstance(h, torch.Tensor):
        raise PolicyError(f"Policy.forward(batch): expected the (B, T, D) last hidden state (a "
                          f"tensor, or an object with .last_hidden_state), got {type(out).__name__}")
    return h


FIX_DECODER = ('override Policy.decoder() -> (layers, final norm) of the decoder whose last '
               'hidden state forward returns, or set run.capture = "hidden_states"')


def decoder_of(policy) -> tuple:
    """Policy.decoder(), or a PolicyError saying how to name the decoder when the default
    (find_decoder on the backbone) finds none."""
    try:
        return policy.decoder()
    except ValueError as e:
        raise PolicyError(f"Policy.decoder(): found no decoder in the backbone "
                          f"{type(policy.backbone).__name__} (a ModuleList of layers beside a final "
                          f"norm named one of {NORM_NAMES}); {FIX_DECODER}") from e


@contextlib.contextmanager
def _recording(policy):
    """Record the output of every layer and of the final norm of Policy.decoder() (the points
    the hook capture reads) during one forward: yields {name: tensor} and the decoder's name."""
    layers, norm = decoder_of(policy)
    points = [(m, f"layer {i}") for i, m in enumerate(layers)] + [(norm, "final norm")]
    seen = {}

    def record(name):
        def hook(_module, _args, out) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, layer_output(out))
        return hook
    handles = [m.register_forward_hook(record(name)) for m, name in points]
    where = (f"Policy.decoder() ({len(layers)} layers of {type(layers[0]).__name__}, final norm "
             f"{type(norm).__name__})" if len(layers) else "Policy.decoder()")
    try:
        yield seen, [name for _, name in points], where
    finally:
        for handle in handles:
            handle.remove()


def _check_decoder(seen: dict, names: list, where: str, h: torch.Tensor) -> None:
    """run.capture = "hooks" reads the rows at the layout's positions from the hidden states of
    Policy.decoder(): every layer and the final norm must run in the forward and give (B, T, D),
    and the final norm's output must be the forward's output (the rows the head reads)."""
    for name in names:
        got = seen.get(name)
        if got is None:
            raise PolicyError(f"{where}: the {name} did not run in Policy.forward(batch); "
                              f"{FIX_DECODER}")
        if tuple(got.shape) != tuple(h.shape):
            raise PolicyError(f"{where}: the {name} gives shape {tuple(got.shape)}, expected "
                              f"Policy.forward(batch)'s {tuple(h.shape)} (B, T, D); {FIX_DECODER}")
    if not torch.equal(seen["final norm"].to(h.dtype), h):
        raise PolicyError(f"{where}: the final norm's output is not what Policy.forward(batch) "
                          f"returns; {FIX_DECODER}")


def check_policy(trainer) -> None:
    """Check the policy's layout, expert, forward and head on the probe batch."""
    policy, cfg = trainer.policy, trainer.cfg
    H, Da = policy.chunk_shape
    D = policy.hidden_size
    mb = trainer.diagnostics.probe_batch(trainer)
    lay = mb.layout
    if not isinstance(lay, BatchLayout):
        raise PolicyError("Policy.layout(batch): expected an energy_train.BatchLayout(action_index, "
                          f"context_index, pad_mask), got {type(lay).__name__}")
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
    hooks = cfg.run.capture == "hooks"
    theta = policy.modules().values()  # no-grad forwards: eval mode (energy_train/modes.py)
    with torch.no_grad(), trainer.autocast(), module_mode(theta, False), \
            (_recording(policy) if hooks else contextlib.nullcontext()) as recorded:
        h = _forward(policy, mb.batch)
        _shape("Policy.forward(batch)", h, (B, None, D), what=f"(B, T, D) with the policy's D={D}")
        if not h.is_floating_point():
            raise PolicyError(f"Policy.forward(batch): expected a floating dtype, got {h.dtype}")
        T = h.shape[1]
        _positions("Policy.layout(batch).action_index", lay.action_index, T)
        _positions("Policy.layout(batch).context_index", lay.context_index, T)
        rows = gather_rows(h, lay.action_index)
        try:
            pred = policy.predict_action(rows)
        except Exception as e:
            dtypes = sorted({str(p.dtype) for p in policy.action_head.parameters()})
            raise PolicyError(f"Policy.predict_action(rows) raised {type(e).__name__}: {e}; rows: "
                              f"{tuple(rows.shape)} {rows.dtype} from Policy.forward(batch) under "
                              f"run.precision = {cfg.run.precision!r}, the head's parameters: "
                              f"{', '.join(dtypes) or 'none'}") from e
        if hooks:
            _check_decoder(*recorded, h)
    _shape("Policy.predict_action(rows (B, H*Da, D))", pred, (B, H, Da), what="(B, H, Da)")
    sizes = (getattr(trainer.energy, "state_dim", D), getattr(trainer.energy, "act_dim", Da))
    if sizes != (D, Da):
        raise PolicyError(f"energy: expected an energy model for the policy's D={D}, Da={Da} "
                          f"(state_dim, act_dim), got state_dim={sizes[0]}, act_dim={sizes[1]}")
    if cfg.run.capture == "hidden_states":
        with torch.no_grad(), trainer.autocast(), module_mode(theta, False):
            out = policy.forward(mb.batch, output_hidden_states=True)
        if not hasattr(out, "hidden_states") or not out.hidden_states:
            raise PolicyError("run.capture = hidden_states: Policy.forward(batch, "
                              "output_hidden_states=True) must return an object with "
                              ".last_hidden_state and .hidden_states (L+1 tensors)")
    if bool(lay.pad_mask.all(dim=1).any()):
        rows = lay.pad_mask.all(dim=1).nonzero().flatten().tolist()
        raise PolicyError(f"Policy.layout(batch).pad_mask: samples {rows[:8]} of the probe batch "
                          "mask every context row (True = ignore)")
