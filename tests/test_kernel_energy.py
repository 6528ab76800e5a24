"""Parity of the fused energy scoring (kernels/energy) with the float64 eager oracle.

CPU: the Triton kernels run under TRITON_INTERPRET=1 (fp32, input_precision="ieee", every
kernel output NaN-poisoned first). Odd shapes: S=37 (not a multiple of the 16-row tiles),
C=5, H=3, heads=3, hidden=48 (dh=16), state_dim=40, act_dim=5, B=3, random key padding with
one sample whose keys are ALL masked. GPU-marked tests: bf16 context/model, production
shapes, torch.compile with inductor. torch.compile traceability (fullgraph=True, one graph, no
break, forward and backward) is checked on the CPU with the aot_eager backend.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from bench.baselines import (replicated_energy_scores, replicated_explicit_infonce,
                             replicated_swap_infonce)
from energy_train import losses, ops
from energy_train.kernels.energy import energy_chains
from energy_train.models import EnergyModel, energy_weights
from energy_train.testing import assert_close, assert_close_to_eager

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(not (CUDA or INTERP),
                                  reason="needs CUDA or TRITON_INTERPRET=1 (CPU interpreter)")
gpu = pytest.mark.gpu

B, S, C, H, DS, DA, HIDDEN, HEADS = 3, 37, 5, 3, 40, 5, 48, 3
FP32_TOL = 1e-5


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from energy_train.kernels._utils import POISON_ENV
    monkeypatch.setenv(POISON_ENV, "1")


def make_model(seed, output="unbounded", device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    m = EnergyModel(DS, DA, hidden=HIDDEN, heads=HEADS, output=output)
    with torch.no_grad():  # move LayerNorm affines etc. away from 1/0 so each one matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(device=device, dtype=dtype), copy.deepcopy(m).double()


def make_inputs(seed, b=B, s=S, c=C, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1000)
    ctx = torch.randn(b, s, DS, generator=g)
    pad = torch.rand(b, s, generator=g) < 0.3
    pad[0] = False          # no padding at all
    if b > 1:
        pad[1] = True       # every key masked: zero attention output
    cand = torch.randn(b, c, H, DA, generator=g)
    return ctx.to(device), pad.to(device), cand.to(device)


def grads(model, extra=()):
    out = {n: p.grad for n, p in model.named_parameters()}
    for i, t in enumerate(extra):
        out[f"input{i}"] = t.grad
    return out


# --------------------------------------------------------------------------------------------
# the attention kernels alone
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample-q", "shared-q"])
def test_attention_kernels_match_reference(shared):
    """The attention launchers (fp32 workspace tensors, products in fp32): out, dq (summed over
    samples for a shared pool), dk|dv against autograd through the float64 reference."""
    from energy_train.kernels.energy import energy_attention_reference
    from energy_train.kernels.energy.launch import attention_bwd, attention_fwd
    from energy_train.testing import poison
    torch.manual_seed(3)
    Q, E = C * H, HIDDEN
    q = torch.randn(1 if shared else B, Q, E, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, S, 2 * E, dtype=torch.float64, requires_grad=True)
    _, pad, _ = make_inputs(3)
    g = torch.randn(B, Q, E, dtype=torch.float64)
    ref = energy_attention_reference(q, kv[..., :E], kv[..., E:], pad, HEADS)
    ref_dq, ref_dkv = torch.autograd.grad((ref * g).sum(), (q, kv))
    qf, kvf = q.detach().float(), kv.detach().float()
    kvf[pad] = float("nan")  # a padded key is never read
    out, lse = poison((B, Q, E)), poison((B, HEADS, Q))
    attention_fwd(qf, kvf, pad, out, lse, HEADS, torch.float32, "ieee")
    dq, dkv = poison(tuple(q.shape)), poison((B, S, 2 * E))
    attention_bwd(g.float(), qf, kvf, pad, out, lse, dq, dkv, HEADS, torch.float32, "ieee")
    assert_close("out", ref, out, tol=FP32_TOL)
    assert (out[1] == 0).all(), "all-masked sample must give a zero output"
    assert_close("dq", ref_dq, dq, tol=FP32_TOL)
    assert_close("dkv", ref_dkv, dkv, tol=FP32_TOL)
    assert (dkv[pad] == 0).all(), "padded keys must get exactly zero gradient"


@needs_triton
def test_mlp_resnet_stack_values_and_grads(seed):
    """One MLPResNet through the layer stack (kernels/mlp: 1 forward + 3 backward launches)
    against autograd through the float64 reference: output, input and parameter gradients,
    rows with |mean|/std of 0, 100 and 1000 (where fp32 itself loses ~1e-4: the tolerance is
    twice eager fp32's own error, measured on the same inputs)."""
    from energy_train.kernels.mlp import mlp_resnet_reference, mlp_resnet_stack
    from energy_train.models.mlp import MLPResNet
    from energy_train.models.weights import mlp_resnet_weights
    torch.manual_seed(seed)
    m = MLPResNet(2, 37, 48, 5, "silu")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    m64 = copy.deepcopy(m).double()
    x = torch.randn(3, 23, 37)
    x[1] += 100.0
    x[2] = x[2] * 0.01 + 10.0  # |mean| / std = 1000
    me = copy.deepcopy(m)
    x32, x64, xe = (x.clone().requires_grad_(), x.double().requires_grad_(),
                    x.clone().requires_grad_())
    y = mlp_resnet_stack(x32, mlp_resnet_weights(m))
    y64 = mlp_resnet_reference(x64, mlp_resnet_weights(m64))
    ye = mlp_resnet_reference(xe, mlp_resnet_weights(me))
    g = torch.randn_like(y64)
    for out in (y, y64, ye):
        (out.double() * g).sum().backward()
    assert_close_to_eager("y", y64, y, ye)
    assert_close_to_eager("dx", x64.grad, x32.grad, xe.grad)
    for (n, p), (_, p64), (_, pe) in zip(m.named_parameters(), m64.named_parameters(),
                                         me.named_parameters()):
        assert_close_to_eager(f"grad {n}", p64.grad, p.grad, pe.grad)


# --------------------------------------------------------------------------------------------
# energies and their gradients: every parameter, the candidates, the context
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("chains", ["chain", "tiled"])
@pytest.mark.parametrize("output,seed", [("unbounded", 0), ("sigmoid", 1), ("softplus", 2)])
def test_energy_scores_values_and_grads(output, seed, chains):
    """Energies, every parameter's, the context's and the candidates' gradients against
    float64, both ways of running the pool and the head (launch.CHAINS: "tiled" is v5's one
    tiled launch per layer; 45 head / pool rows, hidden 48: no tile is full)."""
    m, m64 = make_model(seed, output)
    ctx, pad, cand = make_inputs(seed)
    g = torch.randn(B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    ctx64 = ctx.double().requires_grad_()
    cand64 = cand.double().requires_grad_()
    ref = ops.energy_scores(m64, ctx64, pad, cand64, backend="eager")
    (ref * g).sum().backward()

    ctx32 = ctx.clone().requires_grad_()
    cand32 = cand.clone().requires_grad_()
    with energy_chains(chains):
        out = ops.energy_scores(m, ctx32, pad, cand32, backend="triton")
    assert out.shape == (B, C)
    (out * g.float()).sum().backward()

    assert_close("energies", ref, out, tol=FP32_TOL)
    want, got = grads(m64, (ctx64, cand64)), grads(m, (ctx32, cand32))
    assert set(want) == set(got)
    for name in want:
        assert_close(f"grad {name}", want[name], got[name], tol=FP32_TOL)


@needs_triton
@pytest.mark.parametrize("b,s,c,seed", [(2, 21, 7, 21), (1, 9, 11, 22), (4, 13, 3, 23)])
def test_tiled_chains_match_float64_at_odd_shapes(b, s, c, seed):
    """v5's chains="tiled" alone at more odd shapes (head / pool rows 42, 33, 36: never a
    multiple of the tiles; one sample; no context gradient): energies, every parameter's and
    the candidates' gradients against float64, and the same values as the chain launches up
    to fp32 rounding."""
    m, m64 = make_model(seed, "softplus")
    ctx, pad, cand = make_inputs(seed, b=b, s=s, c=c)
    g = torch.randn(b, c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    cand64 = cand.double().requires_grad_()
    ref = ops.energy_scores(m64, ctx.double(), pad, cand64, backend="eager")
    (ref * g).sum().backward()
    got = {}
    for chains in ("tiled", "chain"):
        m.zero_grad(set_to_none=True)
        cand32 = cand.clone().requires_grad_()
        with energy_chains(chains):
            out = ops.energy_scores(m, ctx, pad, cand32, backend="triton")
        (out * g.float()).sum().backward()
        got[chains] = (out.detach(), grads(m, (cand32,)))
    want = grads(m64, (cand64,))
    for chains, (out, gr) in got.items():
        assert_close(f"energies ({chains})", ref, out, tol=FP32_TOL)
        for name in want:
            assert_close(f"grad {name} ({chains})", want[name], gr[name], tol=FP32_TOL)
    for name in want:
        assert_close(f"grad {name}: tiled vs chain", got["chain"][1][name].double(),
                     got["tiled"][1][name], tol=FP32_TOL)


@needs_triton
def test_energy_scores_no_padding_and_context_without_grad():
    m, m64 = make_model(5)
    ctx, _, cand = make_inputs(5, b=2, s=21, c=2)
    ref = ops.energy_scores(m64, ctx.double(), None, cand.double(), backend="eager")
    out = ops.energy_scores(m, ctx, None, cand, backend="triton")
    assert_close("energies (no pad)", ref, out, tol=FP32_TOL)
    out.sum().backward()          # context and candidates need no grad: none computed
    assert ctx.grad is None and cand.grad is None
    assert all(p.grad is not None for p in m.parameters())


@needs_triton
def test_shared_candidate_pool_is_encoded_once(monkeypatch):
    """An expanded (stride-0) pool reaches the attention kernel as ONE (1, C*H, E) query set."""
    import energy_train.kernels.energy.launch as energy
    seen = []
    real = energy.attention_fwd

    def spy(q, *args, **kwargs):
        seen.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(energy, "attention_fwd", spy)
    m, m64 = make_model(6)
    ctx, pad, _ = make_inputs(6)
    expert = torch.randn(B, H, DA)
    out = losses.swap_infonce(m, ctx, pad, expert, backend="triton")
    assert seen == [(1, B * H, HIDDEN)]
    ref = losses.swap_infonce(m64, ctx.double(), pad, expert.double(), backend="eager")
    assert_close("swap energies", ref.energies, out.energies, tol=FP32_TOL)


# --------------------------------------------------------------------------------------------
# the three losses (cross-entropy / margin on the tiny (B, C) energies) and their gradients
# --------------------------------------------------------------------------------------------
def _loss(kind, model, ctx, pad, expert, negs, backend):
    if kind == "swap":
        return losses.swap_infonce(model, ctx, pad, expert, backend=backend)
    if kind == "explicit":
        return losses.explicit_infonce(model, ctx, pad, expert, negs, backend=backend)
    return losses.margin_ranking(model, ctx, pad, expert, negs, backend=backend)


@needs_triton
@pytest.mark.parametrize("chains", ["chain", "tiled"])
@pytest.mark.parametrize("kind,output,seed", [("swap", "unbounded", 7), ("explicit", "softplus", 8),
                                              ("margin", "sigmoid", 9)])
def test_losses_values_and_grads(kind, output, seed, chains):
    m, m64 = make_model(seed, output)
    ctx, pad, _ = make_inputs(seed)
    gen = torch.Generator().manual_seed(seed)
    expert = torch.randn(B, H, DA, generator=gen)
    negs = torch.randn(B, C - 1, H, DA, generator=gen)
    e64 = expert.double().requires_grad_()
    n64 = negs.double().requires_grad_()
    ref = _loss(kind, m64, ctx.double(), pad, e64, n64, "eager")
    ref.loss.backward()
    e32, n32 = expert.clone().requires_grad_(), negs.clone().requires_grad_()
    with energy_chains(chains):
        out = _loss(kind, m, ctx, pad, e32, n32, "triton")
        out.loss.backward()
    assert_close("loss", ref.loss, out.loss, tol=FP32_TOL)
    assert_close("energies", ref.energies, out.energies, tol=FP32_TOL)
    want, got = grads(m64, (e64, n64)), grads(m, (e32, n32))
    # InfoNCE gradients of biases feeding every logit cancel (sum_c softmax - onehot = 0): the
    # prediction head's last bias has an exactly-zero gradient, and any fp32 sum of its terms
    # leaves ~1e-7 of their scale (eager fp32 7e-6, the fused path 1.1e-5 against a 5% floor),
    # so each gradient's error is measured against a floor of 10% of the model's largest.
    floor = 0.1 * max(w.abs().max().item() for w in want.values() if w is not None)
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
            continue
        assert_close(f"grad {name}", want[name], got[name], tol=FP32_TOL, floor=floor)


# --------------------------------------------------------------------------------------------
# the public fork's replicated formulation equals the encode-once one (bench baselines)
# --------------------------------------------------------------------------------------------
def test_replicated_baseline_equals_encode_once():
    _, m64 = make_model(11, "softplus")
    ctx, pad, cand = make_inputs(11)
    ctx, cand = ctx.double(), cand.double()
    assert_close("energies", m64.score(ctx, pad, cand),
                 replicated_energy_scores(m64, ctx, pad, cand), tol=1e-12)
    expert, negs = cand[:, 0], cand[:, 1:]
    loss, _ = replicated_swap_infonce(m64, ctx, pad, expert)
    assert_close("swap", losses.swap_infonce(m64, ctx, pad, expert, backend="eager").loss, loss, tol=1e-12)
    loss, _ = replicated_explicit_infonce(m64, ctx, pad, expert, negs)
    assert_close("explicit", losses.explicit_infonce(m64, ctx, pad, expert, negs,
                                                     backend="eager").loss, loss, tol=1e-12)


# --------------------------------------------------------------------------------------------
# memory: what the fused path keeps for the backward
# --------------------------------------------------------------------------------------------
@needs_triton
def test_saved_bytes_are_the_workspace():
    """The graph keeps, beyond the parameters and the inputs, the flat parameter copy and ONE
    fp32 workspace: per context row the state encoder's saved tensors (fc1's pre-activation
    and output, the block's pre-activation and output, fc2's output, K|V: 7E floats and 8 row
    statistics), the query side's, the attention output and lse; nothing else."""
    from bench.memory import saved_bytes
    from energy_train.kernels.energy import energy_scores_triton
    b, s, c = 2, 64, 2
    m, _ = make_model(14)
    ctx, pad, cand = make_inputs(14, b=b, s=s, c=c)
    n_params = sum(p.numel() for p in m.parameters())
    ctx_bound = b * s * (7 * HIDDEN + 8 + DS) * 4
    query_bound = 16 * (b * c * H) * HIDDEN * 4
    got = saved_bytes(lambda: energy_scores_triton(energy_weights(m), ctx, pad, cand).sum(),
                      exclude=[*m.parameters(), ctx, pad, cand])["bytes"]
    assert b * s * 2 * HIDDEN * 4 <= got - 4 * n_params <= ctx_bound + query_bound, got


# --------------------------------------------------------------------------------------------
# torch.compile: the registered ops (fakes + autograd) let a user's compile trace the whole
# loss and its backward in ONE graph; the numbers are the eager ones
# --------------------------------------------------------------------------------------------
def _compiled_loss_matches_eager(kind, backend, device="cpu", b=B, s=S):
    m, m64 = make_model(12, device=device)
    ctx, pad, _ = make_inputs(12, b=b, s=s, device=device)
    gen = torch.Generator().manual_seed(12)
    expert = torch.randn(b, H, DA, generator=gen).to(device)
    negs = torch.randn(b, 2, H, DA, generator=gen).to(device)

    def f(ctx, pad, expert, negs):
        return _loss(kind, m, ctx, pad, expert, negs, "triton").loss

    def run(fn):
        m.zero_grad(set_to_none=True)
        e, n = expert.clone().requires_grad_(), negs.clone().requires_grad_()
        loss = fn(ctx, pad, e, n)
        loss.backward()
        return loss, grads(m, (e,))

    torch._dynamo.reset()
    # fullgraph=True: any graph break raises instead of silently splitting the graph
    loss_c, got = run(torch.compile(f, fullgraph=True, backend=backend))
    loss_e, want = run(f)
    assert_close("compiled loss", loss_e, loss_c, tol=FP32_TOL)
    # float64 eager on the CPU tells which gradients are zero in exact arithmetic (a bias that
    # shifts every candidate's energy of a context equally: the prediction head's last bias and
    # its LayerNorm's bias under InfoNCE); the others are held to FP32_TOL relative to eager
    e64, n64 = expert.double().cpu().requires_grad_(), negs.double().cpu().requires_grad_()
    _loss(kind, m64, ctx.double().cpu(), pad.cpu(), e64, n64, "eager").loss.backward()
    exact = grads(m64, (e64,))
    scale = max(g.abs().max().item() for g in exact.values())
    for name in want:
        if exact[name].abs().max().item() < 1e-9 * scale:
            # rounding noise only, on both paths: within the fp32 tolerance of the gradients'
            # scale (H200 inductor: 9.2e-9 vs eager 4.1e-8 on layer_norm2.bias; scale ~0.5)
            assert got[name].abs().max().item() <= FP32_TOL * scale, name
            continue
        assert_close(f"compiled grad {name}", want[name], got[name], tol=FP32_TOL,
                     floor=1e-6)


@needs_triton
@pytest.mark.parametrize("kind", ["swap", "explicit"])
def test_torch_compile_traces_loss_and_backward_without_graph_breaks(kind):
    """CPU: dynamo + AOTAutograd (backend "aot_eager": forward AND backward graphs traced with
    the registered fakes), fullgraph=True; the kernels run under the interpreter (B=2, S=21:
    the shared-pool and the per-sample query paths)."""
    _compiled_loss_matches_eager(kind, backend="aot_eager", b=2, s=21)


@needs_triton
@pytest.mark.slow
def test_torch_compile_inductor_on_the_cpu():
    """Inductor (not only aot_eager) lowers the traced forward and backward graphs around the
    custom ops on the CPU: values and grads equal eager's."""
    _compiled_loss_matches_eager("swap", backend="inductor", b=2, s=21)


@needs_triton
@pytest.mark.parametrize("kind", ["swap", "explicit"])
def test_traced_graphs_hold_no_bitcast_view(kind):
    """No dtype bit-cast view (``aten.view.dtype``, e.g. the bool pad mask viewed as uint8)
    outside the custom ops' bodies: inductor's CUDA lowering rejects one (it failed the GPU
    compile tests on torch 2.11), though the CPU lowering accepts it."""
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def inspect(gm, example_inputs):
        seen.extend(str(n) for n in gm.graph.nodes
                    if n.op == "call_function" and n.target is torch.ops.aten.view.dtype)
        inspect.graphs += 1
        return gm.forward

    inspect.graphs = 0
    _compiled_loss_matches_eager(kind, backend=aot_autograd(fw_compiler=inspect,
                                                            bw_compiler=inspect), b=2, s=21)
    assert inspect.graphs >= 2, "expected a forward and a backward graph"
    assert not seen, f"bit-cast views in the traced graphs: {seen}"


@needs_triton
@pytest.mark.parametrize("chains", ["chain", "tiled"])
def test_registered_ops_pass_opcheck(chains):
    """torch.library.opcheck: schema, fake vs real outputs, autograd registration of the custom
    ops (the energy path's two, the MLPResNet stack's two), tiny shapes."""
    from energy_train.kernels.energy import energy_bwd, energy_fwd
    from energy_train.kernels.energy.launch import energy_layout, energy_plan, flat_parameters
    from energy_train.kernels.energy.op import _shape
    from energy_train.kernels.mlp import mlp_stack_bwd, mlp_stack_fwd
    from energy_train.kernels.mlp.launch import constants, mlp_tensors
    from energy_train.models.mlp import MLPResNet
    from energy_train.models.weights import mlp_resnet_weights
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    g = torch.Generator().manual_seed(0)
    w = mlp_resnet_weights(MLPResNet(1, 12, 16, 3, "silu"))
    shapes = [d for lin in w.layers for d in lin.weight.shape]
    flat = torch.cat([t.reshape(-1) for t in mlp_tensors(w)] + [constants(16, torch.float32, "cpu")])
    x = torch.randn(7, 12, generator=g)
    args = (shapes, w.eps(), "silu", "ieee")
    torch.library.opcheck(mlp_stack_fwd, (x.requires_grad_(), flat.detach().requires_grad_()) + args,
                          test_utils=quick)
    _, ws = mlp_stack_fwd(x.detach(), flat.detach(), *args)
    torch.library.opcheck(mlp_stack_bwd, (torch.randn(7, 3, generator=g), x.detach(),
                                          flat.detach(), ws) + args + (True,), test_utils=quick)
    m, _ = make_model(15)
    ew = energy_weights(m)
    ctx, pad, cand = make_inputs(15, b=2, s=9, c=2)
    shapes, eps = energy_layout(ew)
    dims = [2, 9, DS, 2, 2, H, DA, HIDDEN, HEADS, *(len(t) for t in shapes),
            *(d for t in shapes for ab in t for d in ab)]
    feps = [e for es in eps for e in es]
    ep = energy_plan(*_shape(dims, feps), "silu", torch.float32, False, False)
    flat = flat_parameters(ew, ep.n_const).detach()
    pool = cand.reshape(-1, DA)
    pe = ew.pe[:H].float().contiguous()
    fargs = (dims, feps, "silu", "ieee")
    torch.library.opcheck(energy_fwd, (ctx, pad, pool.requires_grad_(), flat.requires_grad_(), pe)
                          + fargs + (chains,), test_utils=quick)
    raw, ws = energy_fwd(ctx, pad, pool.detach(), flat.detach(), pe, *fargs, chains)
    torch.library.opcheck(energy_bwd, (torch.randn_like(raw), ctx, pad, pool.detach(),
                                       flat.detach(), ws) + fargs + (True, True, chains),
                          test_utils=quick)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@needs_triton
def test_bad_input_names_the_argument():
    from energy_train.kernels.energy import energy_scores_triton
    m, _ = make_model(0)
    ctx, pad, cand = make_inputs(0)
    with pytest.raises(ValueError, match="candidates"):
        ops.energy_scores(m, ctx, pad, cand[..., :4], backend="triton")
    with pytest.raises(TypeError, match="pad_mask"):
        ops.energy_scores(m, ctx, pad.float(), cand, backend="triton")
    with pytest.raises(ValueError, match="input_precision"):
        energy_scores_triton(energy_weights(m), ctx, pad, cand, input_precision="fast")


# --------------------------------------------------------------------------------------------
# GPU (not run on the CPU)
# --------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                         ids=["fp32-ieee", "bf16"])
def test_gpu_parity(dtype, tol):
    m, m64 = make_model(21, "softplus", device="cuda", dtype=dtype)
    m64 = m64.cuda()
    ctx, pad, cand = make_inputs(21, device="cuda")
    ctx_in = ctx.to(dtype)
    g = torch.randn(B, C, device="cuda", dtype=torch.float64)
    ref = ops.energy_scores(m64, ctx_in.double(), pad, cand.double(), backend="eager")
    (ref * g).sum().backward()
    from energy_train.kernels.energy import energy_scores_triton
    out = energy_scores_triton(energy_weights(m), ctx_in, pad, cand.to(dtype),
                               input_precision="ieee")
    (out.float() * g.float()).sum().backward()
    assert_close("energies", ref, out, tol=tol)
    want, got = grads(m64), grads(m)
    for name in want:
        assert_close(f"grad {name}", want[name], got[name], tol=tol * (5 if dtype != torch.float32 else 1))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden,heads", [(512, 8), (1024, 16)])
def test_gpu_production_shape_swap_loss(hidden, heads, dtype):
    """Loss and every parameter gradient at the production shape, held to a multiple of the
    eager path's OWN error against float64 in the same dtype on the same inputs (x2 fp32, x1.5
    bf16): at this shape eager fp32 already reaches ~9e-6 on some gradients."""
    torch.manual_seed(0)
    b, s, d = 8, 600, 4096
    m = EnergyModel(d, 7, hidden=hidden, heads=heads).cuda().to(dtype)
    m_eager, m64 = copy.deepcopy(m), copy.deepcopy(m).double()
    ctx = torch.randn(b, s, d, device="cuda", dtype=torch.bfloat16)
    pad = torch.rand(b, s, device="cuda") < 0.2
    expert = torch.randn(b, 8, 7, device="cuda")
    runs = {}
    for name, model, x, e, backend in (("triton", m, ctx, expert.to(dtype), "triton"),
                                       ("eager", m_eager, ctx, expert.to(dtype), "eager"),
                                       ("f64", m64, ctx.double(), expert.double(), "eager")):
        out = losses.swap_infonce(model, x, pad, e, backend=backend)
        out.loss.backward()
        runs[name] = (out.loss, dict(model.named_parameters()))
    # the fixed tolerance of the dtype is the floor (bf16: 2e-2, the design's); the "1.5x eager
    # bf16" target is reported by scripts/gpu_check.py, not asserted: the prediction head's
    # last bias has an exactly-zero gradient whose bf16 noise differs run to run
    factor, min_tol = (2.0, 1e-5) if dtype == torch.float32 else (1.5, 2e-2)
    assert_close_to_eager("loss", runs["f64"][0], runs["triton"][0], runs["eager"][0],
                          factor=factor, min_tol=min_tol)
    floor = 0.1 * max(p.grad.abs().max().item() for p in m64.parameters())
    for n, p64 in runs["f64"][1].items():
        out, eager = runs["triton"][1][n].grad, runs["eager"][1][n].grad
        if p64.grad.abs().max().item() < 1e-9 * floor:
            # zero in exact arithmetic (the prediction head's last bias: the InfoNCE gradient
            # of a bias feeding every logit equally): both paths leave rounding noise only; the
            # fused path's within 4x eager's (H200 bf16: 8.5e-4 vs 3.7e-4 at a 1.2e-2 floor)
            assert out.abs().max().item() <= 4 * eager.abs().max().item() + 1e-3 * floor, n
            continue
        assert_close_to_eager(f"grad {n}", p64.grad, out, eager, factor=factor, floor=floor,
                              min_tol=min_tol)


@gpu
@pytest.mark.parametrize("kind", ["swap", "explicit"])
def test_gpu_torch_compile_inductor_traces_without_graph_breaks(kind):
    """The CPU test above with inductor: the custom ops stay opaque nodes; values and grads."""
    _compiled_loss_matches_eager(kind, backend="inductor", device="cuda")
