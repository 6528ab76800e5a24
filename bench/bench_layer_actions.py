"""Layer-actions benchmark: the action head on the action rows of every hidden state.

``python -m bench.run layer_actions [--quick] [--cpu-shapes]`` (see bench/harness.py).
Providers (all compute every one of the L+1 hidden states, embeddings included, as the public
code does):
- reference_loop: the public code (bench.baselines.public_layer_actions_loop): one
  predict_action per layer after a boolean-mask gather - the baseline;
- eager_batched: energy_train.ops.layer_actions(backend="eager"): one batched head call;
- torch_compile: the same under torch.compile (mode max-autotune-no-cudagraphs on a GPU,
  the default mode on the CPU);
- triton: energy_train.ops.layer_actions(backend="triton") (GPU only): the gather +
  LayerNorm row kernel and the persistent TMA GEMM (kernels/layer_actions);
- triton_cublas: the same with the head's GEMMs on cuBLAS (torch.addmm), the row kernels Triton's.
The L+1 hidden states are views of ONE (L+1, B, T, D) buffer (as the trainer's hook capture
gives them; Hugging Face's separate output_hidden_states tensors take the fused path's
documented gather fallback instead). FLOPs: 2*M*N*K over the head's GEMMs, M = (L+1)*B*H; bytes: head weights + action rows read
once + actions written.
"""
from __future__ import annotations

import torch

from bench.baselines import public_layer_actions_loop
from bench.harness import Benchmark, Case, Provider
from energy_train import L1RegressionActionHead, build_action_index, layer_actions
from energy_train.kernels.layer_actions import layer_actions_reference
from energy_train.models import action_head_weights


def _flops_bytes(L1, B, H, Da, D, hidden, nb, esize):
    M = L1 * B * H
    flops = 2 * M * hidden * Da * D + 2 * nb * M * hidden * hidden + 2 * M * Da * hidden
    params = Da * D * (hidden + 2) + hidden + nb * (hidden * hidden + 3 * hidden) + 2 * hidden + Da * hidden + Da
    byts = params * esize + M * Da * D * esize + M * Da * esize
    return flops, byts


def _case(name, *, L1, B, H, Da, D, T, hidden=None, nb=2, dtype=torch.bfloat16, act="relu"):
    hidden = hidden or D
    esize = torch.finfo(dtype).bits // 8
    flops, byts = _flops_bytes(L1, B, H, Da, D, hidden, nb, esize)

    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        hs = tuple(torch.randn(L1, B, T, D, generator=g).to(device=device, dtype=dtype).unbind(0))
        starts = torch.randint(0, T - H * Da, (B,), generator=g)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            mask[b, starts[b]: starts[b] + H * Da] = True
        torch.manual_seed(0)
        head = L1RegressionActionHead(D, hidden, Da, H, num_blocks=nb, activation=act)
        head = head.to(device=device, dtype=dtype).eval()
        return dict(hs=hs, mask=mask.to(device), head=head, H=H, Da=Da)

    params = dict(L1=L1, B=B, H=H, Da=Da, D=D, T=T, hidden=hidden, dtype=str(dtype).split(".")[-1],
                  act=act, M=L1 * B * H)
    return Case(name, params, make, flops=flops, bytes=byts)


def _reference_loop(inp):
    return lambda: public_layer_actions_loop(inp["hs"], inp["mask"], inp["head"])


def _batched(backend):
    def factory(inp):
        def run():
            idx = build_action_index(num_tokens=inp["H"] * inp["Da"], mask=inp["mask"])
            return layer_actions(inp["hs"], idx, inp["head"], include_embeddings=True,
                                 backend=backend)
        return run
    return factory


def _triton_cublas(inp):
    from energy_train.kernels.layer_actions import layer_actions_triton

    def run():
        idx = build_action_index(num_tokens=inp["H"] * inp["Da"], mask=inp["mask"])
        return layer_actions_triton(list(inp["hs"]), idx, action_head_weights(inp["head"]),
                                    gemm="cublas")
    return run


_COMPILED = {}


def _compiled(mode):
    def factory(inp):
        head = inp["head"]
        if mode not in _COMPILED:
            def batched(hs, mask, head):
                idx = build_action_index(num_tokens=head.num_actions_chunk * head.action_dim,
                                         mask=mask)
                return layer_actions_reference(list(hs), idx, action_head_weights(head))
            _COMPILED[mode] = torch.compile(batched, mode=mode, dynamic=False)
        fn = _COMPILED[mode]
        return lambda: torch.no_grad()(fn)(inp["hs"], inp["mask"], head)
    return factory


def gpu_cases(quick: bool):
    prod = dict(L1=33, H=8, Da=7, T=600)
    cases = [_case("prod-D4096-L33-B8-H8-Da7", B=8, D=4096, **prod),
             _case("aloha-D4096-L33-B8-H25-Da14", L1=33, B=8, H=25, Da=14, D=4096, T=900)]
    if quick:
        return cases
    cases += [_case(f"B{b}-D4096", B=b, D=4096, **prod) for b in (1, 2, 4, 16, 32, 64)]
    cases += [_case(f"D{d}-B8", B=8, D=d, **prod) for d in (1024, 2048, 3072)]
    cases += [_case("prod-silu", B=8, D=4096, act="silu", **prod),
              _case("bridge-D4096-L33-B8-H5-Da7", L1=33, B=8, H=5, Da=7, D=4096, T=600)]
    return cases


def cpu_cases(quick: bool):
    f32 = torch.float32
    cases = [_case("cpu-D256-L9-B4-H8-Da7", L1=9, B=4, H=8, Da=7, D=256, T=80, dtype=f32),
             _case("cpu-aloha-D128-L9-B2-H25-Da14", L1=9, B=2, H=25, Da=14, D=128, T=400, dtype=f32)]
    if quick:
        return cases
    cases += [_case("cpu-D512-L17-B8-H8-Da7", L1=17, B=8, H=8, Da=7, D=512, T=80, dtype=f32)]
    return cases


def make_benchmark(device: torch.device, quick: bool = False, cpu_shapes: bool = False) -> Benchmark:
    gpu = device.type == "cuda"
    cases = cpu_cases(quick) if (cpu_shapes or not gpu) else gpu_cases(quick)
    providers = [
        Provider("reference_loop", _reference_loop),
        Provider("eager_batched", _batched("eager")),
        Provider("torch_compile", _compiled("max-autotune-no-cudagraphs" if gpu else "default")),
        Provider("triton", _batched("triton"), gpu_only=True),
        Provider("triton_cublas", _triton_cublas, gpu_only=True),
    ]
    notes = ["every provider computes all L+1 hidden states (embeddings included)",
             "FLOPs = 2*M*N*K over fc1, the blocks and fc2, M = (L+1)*B*H; bytes = weights + "
             "action rows + actions, each once"]
    if not gpu:
        notes.append("CPU: float32, reduced shapes, 1 torch thread (python -m bench.run --threads); "
                     "torch_compile in the default mode (inductor C++); triton skipped "
                     "(interpreter timings mean nothing)")
    return Benchmark("layer_actions", cases, providers, baseline="reference_loop", notes=notes)
