"""Hidden-state capture by forward hooks (energy_train.capture): the same rows as
output_hidden_states (bitwise), preallocated reused buffers, no full (L+1, B, T, D) stack,
per-call/per-thread arming. TinyVLA, a local Llama-style decoder, and (when installed) a tiny
transformers LlamaModel built from a config."""
from __future__ import annotations

import threading
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.llama_like import DecoderVLA, LlamaLikeModel
from energy_train.capture import HiddenStateCapture, find_decoder, gather_hidden_states
from energy_train.policies.tiny import TinyVLA
from energy_train.ops import build_action_index
from trainer_helpers import make_trainer, same, snapshot, tiny_cfg


class LiveBytes(TorchDispatchMode):
    """Live (and peak) bytes of the storages that ops inside the mode allocate (freed when their
    last tensor dies; views and out= results add nothing), and the shape of every op output."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.shapes, self._seen = 0, 0, [], set()

    def _free(self, key, n):
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                st = t.untyped_storage()
                if id(st) not in self._seen and id(st) not in inputs:  # views/out=: no new memory
                    self._seen.add(id(st))
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, id(st), st.nbytes())
        return out


def _tiny_vla(seed=0, L=4):
    torch.manual_seed(seed)
    m = TinyVLA(d_model=24, n_layers=L, n_heads=2, image_size=8, patch_size=4, chunk=3,
                action_dim=5, mlp_ratio=2)
    B = 3
    inputs = (torch.rand(B, 3, 8, 8), torch.randn(B, 4), torch.randint(0, 16, (B, 4)))
    idx = build_action_index(num_tokens=15, start=m.layout.action_start, batch_size=B)
    return m, inputs, idx


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_vla_hooks_equal_hidden_states_and_reuse_buffers(seed):
    m, inputs, idx = _tiny_vla(seed)
    S = m.layout.context_len
    cap = HiddenStateCapture.for_model(m)
    with torch.no_grad():
        ref = gather_hidden_states(m(*inputs, output_hidden_states=True).hidden_states, idx, S)
        with cap.armed(idx, S, slot="a") as got:
            m(*inputs)
    assert got.action_rows.shape == (5, 3, 15, 24) and got.context.shape == (3, S, 24)
    assert torch.equal(got.action_rows, ref.action_rows) and torch.equal(got.context, ref.context)
    ptr = got.action_rows.data_ptr()
    with torch.no_grad(), cap.armed(idx, S, slot="a") as again:
        m(*inputs)
    assert again.action_rows.data_ptr() == ptr, "a slot's buffers are preallocated and reused"
    with torch.no_grad(), cap.armed(idx, S, slot="b") as other:
        m(*inputs)
    assert other.action_rows.data_ptr() != ptr, "the other parity slot is a distinct buffer"
    before = got.action_rows.clone()
    with torch.no_grad():
        m(inputs[0] + 1, *inputs[1:])  # disarmed: the hooks write nothing
    assert torch.equal(got.action_rows, before)


def test_no_full_stack_is_allocated():
    """The capture path never allocates an (L+1, B, T, D) tensor, and what a forward leaves
    alive is the buffers (L+1, B, N, D) + (B, S, D) + the last state, where the
    output_hidden_states path keeps L+1 full (B, T, D) states."""
    m, inputs, idx = _tiny_vla(0, L=6)
    S, T, N, B, D, L1 = m.layout.context_len, m.layout.num_tokens, 15, 3, 24, 7
    cap = HiddenStateCapture.for_model(m)
    with torch.no_grad():
        with LiveBytes() as hooks:
            with cap.armed(idx, S) as got:
                out_h = m(*inputs)
            kept_hooks = hooks.live
        with LiveBytes() as hs:
            out_s = m(*inputs, output_hidden_states=True)
            kept_hs = hs.live
    assert torch.equal(got.action_rows, gather_hidden_states(out_s.hidden_states, idx, S).action_rows)
    assert (L1, B, T, D) not in hooks.shapes
    assert max(s.numel() for s in map(torch.Size, hooks.shapes)) < L1 * B * T * D
    assert kept_hooks == 4 * (L1 * B * N * D + B * S * D + B * T * D), kept_hooks
    assert kept_hs == 4 * L1 * B * T * D, kept_hs
    del out_h


def test_arming_is_per_call_and_per_thread():
    m, inputs, idx = _tiny_vla(0)
    S = m.layout.context_len
    cap = HiddenStateCapture.for_model(m)
    with pytest.raises(RuntimeError, match="already armed"):
        with cap.armed(idx, S), cap.armed(idx, S):
            pass
    # a forward on another thread while armed here captures nothing: no point fires
    with pytest.raises(RuntimeError, match=r"fire once .* got \[\]"):
        with torch.no_grad(), cap.armed(idx, S, slot="x"):
            th = threading.Thread(target=lambda: m(*inputs))
            th.start()
            th.join()
    # two forwards in one armed block: each point fired twice -> an error, not a silent mix
    with pytest.raises(RuntimeError, match="fire once"):
        with torch.no_grad(), cap.armed(idx, S):
            m(*inputs)
            m(*inputs)


def test_llama_like_decoder_found_and_bitwise():
    torch.manual_seed(0)
    model = LlamaLikeModel(d=32, layers=3, heads=4, kv_heads=2, vocab=50)
    layers, norm = find_decoder(model)
    assert layers is model.layers and norm is model.norm
    ids = torch.randint(0, 50, (2, 19))
    idx = build_action_index(num_tokens=5, start=torch.tensor([3, 9]))
    cap = HiddenStateCapture.for_model(model)
    with torch.no_grad():
        _, hs = model(ids, output_hidden_states=True)
        ref = gather_hidden_states(hs, idx, 7)
        with cap.armed(idx, 7) as got:
            model(ids)
    assert len(hs) == 4 and got.action_rows.shape == (4, 2, 5, 32)
    assert torch.equal(got.action_rows, ref.action_rows) and torch.equal(got.context, ref.context)


def test_trainer_hooks_equal_hidden_states_path_on_a_decoder_vla():
    """The Trainer on a Llama-style VLA (hooks found by find_decoder) trains bitwise like the
    output_hidden_states path."""
    from energy_train.policies.tiny.task import TaskData
    from energy_train.models import EnergyModel, L1RegressionActionHead
    from energy_train.policies.tiny import TinyPolicy

    def run(capture):
        cfg = tiny_cfg(capture=capture, image_size=8, steps=3)
        torch.manual_seed(0)
        model = DecoderVLA(d_model=32, n_layers=2, n_heads=4, kv_heads=2, ffn=48, image_size=8)
        head = L1RegressionActionHead(32, 32, 7, 8)
        energy = EnergyModel(32, 7, hidden=32, heads=2)
        data = TaskData(0, 32, 6, batch_size=4, image_size=8)
        t = make_trainer(cfg, policy=TinyPolicy(model, head), energy=energy, data=data)
        losses = [t.train_step() for _ in range(3)]
        return t, [float(m["energy_loss"]) for m in losses]

    a, la = run("hooks")
    b, lb = run("hidden_states")
    assert la == lb
    assert same(snapshot(a.theta), snapshot(b.theta)) and same(snapshot(a.phi), snapshot(b.phi))


def test_trainer_capture_paths_equal_on_tiny_vla():
    a, b = make_trainer(tiny_cfg(capture="hooks")), make_trainer(tiny_cfg(capture="hidden_states"))
    for _ in range(3):
        ma, mb = a.train_step(), b.train_step()
        assert torch.equal(ma["energy_loss"], mb["energy_loss"])
    assert same(snapshot(a.phi), snapshot(b.phi)) and same(snapshot(a.theta), snapshot(b.theta))


def test_transformers_llama_hooks():
    """Skipped (not run) without transformers; the GPU image has 5.x."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    for model in (transformers.LlamaModel(cfg).eval(), transformers.LlamaForCausalLM(cfg).eval()):
        layers, norm = find_decoder(model)
        assert len(layers) == 3
        ids = torch.randint(0, 50, (2, 17))
        idx = build_action_index(num_tokens=4, start=torch.tensor([2, 11]))
        cap = HiddenStateCapture.for_model(model)
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            ref = gather_hidden_states(hs, idx, 6)
            with cap.armed(idx, 6) as got:
                model(input_ids=ids)
        assert len(hs) == 4
        assert torch.equal(got.action_rows, ref.action_rows)
        assert torch.equal(got.context, ref.context)
        cap.remove()
