"""The fused all-layer action-head pass against the float64 oracles: the eager op
(energy_train.ops.layer_actions, backend="eager") and the public loop (bench.baselines, the
same baseline the benchmark times). CPU: under TRITON_INTERPRET=1; bf16 and production
shapes only on a GPU."""
import pytest
import torch

from bench.baselines import public_layer_actions_loop
from energy_train import L1RegressionActionHead, build_action_index, layer_actions
from energy_train.kernels._utils import POISON_ENV
from energy_train.kernels.layer_actions import layer_actions_reference, layer_actions_triton
from energy_train.models import action_head_weights
from energy_train.tensors import gather_rows
from energy_train.testing import assert_close

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    """Every buffer the launchers allocate starts NaN-filled."""
    monkeypatch.setenv(POISON_ENV, "1")


def _batch(B, T, D, H, Da, L, seed, dtype=F64):
    if T < H * Da:
        raise ValueError(f"_batch: T={T} cannot hold the H*Da={H * Da} action tokens")
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(B, T, D, generator=g, dtype=F64) for _ in range(L + 1)]
    for h in hs:  # LLM-like: a few outlier dimensions
        h[..., torch.randperm(D, generator=g)[:2]] *= 30.0
    starts = torch.randint(0, T - H * Da + 1, (B,), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, starts[b]: starts[b] + H * Da] = True
    return [h.to(dtype).to(DEV) for h in hs], mask.to(DEV)


def _head(D, hidden, Da, H, act, seed, dtype):
    torch.manual_seed(seed)
    head = L1RegressionActionHead(D, hidden, Da, H, activation=act)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases
        for name, p in head.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return head.to(dtype).to(DEV)


def _oracle(hs, idx, head, layers, **kw):
    h64 = L1RegressionActionHead(head.input_dim, head.hidden_dim, head.action_dim,
                                 head.num_actions_chunk, activation=head.activation)
    h64.load_state_dict({k: v.to(F64) for k, v in head.state_dict().items()})
    h64 = h64.double().to(DEV)
    return layer_actions([h.to(F64) for h in hs], idx, h64, layers=layers, backend="eager", **kw), h64


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_actions_triton_matches_oracles(act, dtype, seed):
    B, T, D, H, Da, L, hidden = 3, 37, 96, 3, 5, 4, 80
    hs, mask = _batch(B, T, D, H, Da, L, seed, dtype)
    head = _head(D, hidden, Da, H, act, seed, dtype)
    idx = build_action_index(num_tokens=H * Da, mask=mask)
    out = layer_actions(hs, idx, head, backend="triton")  # layers 1..L: L' = 4
    assert out.shape == (L, B, H, Da) and out.dtype == dtype
    ref, h64 = _oracle(hs, idx, head, None)
    assert_close("layer_actions", ref, out, dtype)
    # the public loop (boolean-mask gather, one predict_action per layer) agrees in float64
    loop = public_layer_actions_loop([h.to(F64) for h in hs], mask, h64)[1:]
    assert_close("public loop", loop, out, dtype)
    # and the module's own step-by-step reference
    ref2 = layer_actions_reference([h.to(F64) for h in hs[1:]], idx, action_head_weights(h64))
    assert_close("reference.py", ref2, out, dtype)


@pytest.mark.parametrize("shape", [(2, 30, 48, 2, 7, 2, 40), (1, 29, 32, 5, 3, 3, 24)],
                         ids=lambda s: "B{}-T{}-D{}-H{}-Da{}-L{}-hid{}".format(*s))
def test_layer_actions_triton_other_shapes_and_layer_lists(shape):
    B, T, D, H, Da, L, hidden = shape
    hs, mask = _batch(B, T, D, H, Da, L, 7, torch.float32)
    head = _head(D, hidden, Da, H, "silu", 7, torch.float32)
    idx = build_action_index(num_tokens=H * Da, mask=mask)
    layers = [0, L, 1]  # embeddings included, out of order
    out = layer_actions(torch.stack(hs), idx, head, layers=layers, backend="triton")
    ref, _ = _oracle(hs, idx, head, layers)
    assert_close("layer_actions(stacked, layers)", ref, out)


def test_layer_actions_triton_pregathered_final_norm_and_fallbacks():
    B, T, D, H, Da, L, hidden = 2, 31, 64, 3, 5, 3, 40
    hs, mask = _batch(B, T, D, H, Da, L, 3, torch.float32)
    head = _head(D, hidden, Da, H, "relu", 3, torch.float32)
    idx = build_action_index(num_tokens=H * Da, mask=mask)
    # 1. rows already gathered (action_index=None)
    rows = [gather_rows(h, idx) for h in hs]
    ref, _ = _oracle(hs, idx, head, None)
    assert_close("pregathered", ref, layer_actions(rows, None, head, backend="triton"))
    # 2. logit-lens final norm (every selected layer but the last is normalised)
    norm = torch.nn.LayerNorm(D).to(DEV)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    out = layer_actions(hs, idx, head, final_norm=norm, backend="triton")
    norm64 = torch.nn.LayerNorm(D).double().to(DEV)
    norm64.load_state_dict({k: v.double() for k, v in norm.state_dict().items()})
    ref_n, _ = _oracle(hs, idx, head, None, final_norm=norm64)
    assert_close("final_norm", ref_n, out)
    # 3. a layer with another dtype and one not contiguous along D: gathered eagerly first
    mixed = list(hs)
    mixed[1] = hs[1].double()
    mixed[2] = hs[2].transpose(1, 2).contiguous().transpose(1, 2)
    assert_close("mixed layers", ref, layer_actions(mixed, idx, head, backend="triton"))


def test_layer_actions_triton_d_not_multiple_of_16():
    B, T, D, H, Da, L, hidden = 2, 23, 40, 2, 3, 2, 24
    hs, mask = _batch(B, T, D, H, Da, L, 5, torch.float32)
    head = _head(D, hidden, Da, H, "relu", 5, torch.float32)
    idx = build_action_index(num_tokens=H * Da, mask=mask)
    ref, _ = _oracle(hs, idx, head, None)
    assert_close("D=40", ref, layer_actions(hs, idx, head, backend="triton"))


def test_layer_actions_triton_bad_input():
    hs, mask = _batch(2, 20, 32, 2, 3, 2, 0, torch.float32)
    head = _head(32, 16, 3, 2, "relu", 0, torch.float32)
    idx = build_action_index(num_tokens=6, mask=mask)
    w = action_head_weights(head)
    with pytest.raises(ValueError, match="norm_mask"):
        layer_actions_triton(hs, idx, w, norm_mask=[True, False, False])
    with pytest.raises(ValueError, match=r"states\[1\]"):
        layer_actions_triton([hs[0], hs[1][:, :, :16]], idx, w)
    with pytest.raises(TypeError, match="head"):
        layer_actions_triton(hs, idx, action_head_weights(head.double()))
    with pytest.raises(TypeError, match="head: expected ActionHeadWeights"):
        layer_actions_triton(hs, idx, head)


def test_layer_actions_triton_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) over the public op: the pass is one registered custom op
    (kernels/layer_actions/op.py, a fake for the shapes); same numbers as eager. CPU:
    backend "eager" (dynamo; inference, no backward), kernels under the interpreter."""
    B, T, D, H, Da, L, hidden = 2, 23, 32, 2, 3, 2, 24
    hs, mask = _batch(B, T, D, H, Da, L, 6, torch.float32)
    head = _head(D, hidden, Da, H, "silu", 6, torch.float32)
    idx = build_action_index(num_tokens=H * Da, mask=mask)

    def f(hs, idx):
        return layer_actions(hs, idx, head, backend="triton")

    torch._dynamo.reset()
    backend = "inductor" if DEV == "cuda" else "eager"
    out = torch.compile(f, fullgraph=True, backend=backend)(hs, idx)
    assert_close("compiled layer_actions", f(hs, idx), out)
    ref, _ = _oracle(hs, idx, head, None)
    assert_close("compiled vs float64", ref, out)


# --------------------------------------------------------------------------------------------
# GPU only: bf16, tf32, production and chunk shapes (LIBERO, BRIDGE, ALOHA)
# --------------------------------------------------------------------------------------------
CHUNKS = {"LIBERO": (8, 7), "BRIDGE": (5, 7), "ALOHA": (25, 14)}


def _chunk_case(chunk, D, hidden, L, dtype, act, B=3):
    """A batch whose sequence holds the chunk's H*Da action tokens plus 50 others (T = 300 for
    LIBERO/BRIDGE, 400 for ALOHA's 350 action tokens)."""
    H, Da = CHUNKS[chunk]
    T = max(300, H * Da + 50)
    hs, mask = _batch(B, T, D, H, Da, L, 0, dtype)
    head = _head(D, hidden, Da, H, act, 0, dtype)
    return hs, build_action_index(num_tokens=H * Da, mask=mask), head


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("chunk", list(CHUNKS))
def test_layer_actions_triton_chunks(chunk, precision):
    """Every robot's chunk shape through the fused path (the GPU test's shapes at D = 32), fp32
    with IEEE and with tf32 dots (operands rounded to the nearest tf32: the interpreter then
    computes what the GPU's MMA does)."""
    hs, idx, head = _chunk_case(chunk, 32, 48, 1, torch.float32, "relu", B=1)
    out = layer_actions_triton(hs[1:], idx, action_head_weights(head), input_precision=precision)
    ref, _ = _oracle(hs, idx, head, None)
    assert_close("layer_actions", ref, out, "fp32" if precision == "ieee" else "tf32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32-tf32"])
@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_layer_actions_triton_gpu_chunks(chunk, dtype, act):
    hs, idx, head = _chunk_case(chunk, 512, 512, 5, dtype, act)
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
    try:
        out = layer_actions(hs, idx, head, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    ref, _ = _oracle(hs, idx, head, None)
    assert_close("layer_actions", ref, out, "tf32" if dtype == torch.float32 else dtype)


@pytest.mark.gpu
@pytest.mark.slow
def test_layer_actions_triton_gpu_production_shape():
    B, T, D, H, Da, L, hidden = 8, 600, 4096, 8, 7, 32, 4096
    hs, mask = _batch(B, T, D, H, Da, L, 0, torch.bfloat16)
    head = _head(D, hidden, Da, H, "relu", 0, torch.bfloat16)
    idx = build_action_index(num_tokens=H * Da, mask=mask)
    out = layer_actions(hs, idx, head, include_embeddings=True, backend="triton")
    ref, _ = _oracle(hs, idx, head, None, include_embeddings=True)
    assert_close("layer_actions production", ref, out, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("ratio", [0.0, 100.0, 1000.0], ids=["mean0", "mean100sigma", "mean1000sigma"])
def test_layer_actions_rows_with_large_mean_over_sigma(ratio, dtype):
    """The row kernel's LayerNorm statistics (sums shifted by the first chunk's mean) at
    |mean| / sigma of 0, 100 and 1000 - where E[x^2] - E[x]^2 in fp32 loses the variance - held
    to 2x eager's own error against float64 (eager normalises each row in its dtype too)."""
    from energy_train.testing import assert_close_to_eager
    B, T, D, H, Da, L, hidden = 2, 30, 48, 2, 3, 2, 40
    g = torch.Generator().manual_seed(int(ratio) + 7)
    hs = [(ratio + torch.randn(B, T, D, generator=g, dtype=F64)).to(dtype).to(DEV)
          for _ in range(L + 1)]
    head = _head(D, hidden, Da, H, "relu", 3, dtype)
    idx = build_action_index(num_tokens=H * Da, start=torch.tensor([1, 4], device=DEV))
    out = layer_actions_triton(hs[1:], idx, action_head_weights(head))
    eager = layer_actions_reference(hs[1:], idx, action_head_weights(head))
    ref, _ = _oracle(hs, idx, head, None)
    assert_close_to_eager("layer_actions", ref, out, eager, dtype=dtype)
