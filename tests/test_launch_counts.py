"""What predicts GPU speed, counted on the CPU (bench/counts.py; TRITON_INTERPRET=1): launches
and aten kernels per call of the fused paths at reduced shapes with the production call
structure. The energy loss's forward + backward: 18 Triton launches (the issue's target was 12:
the 4800-row context runs one tiled tensor-core launch per layer and pass, since the one-launch
chain was latency-bound on the GPU - kernels/energy/launch.py), at most 20 aten kernels and 2
custom-op dispatches (it was 231 / ~400 / 22); the layer actions of a capture buffer in 2 + 2
x blocks + 1 launches and no aten kernel (no gather, no stack, no host-to-device table copy)."""
import os

import pytest
import torch

from bench.counts import count, energy_swap_step, layer_actions_call

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts the interpreter's launches (CPU)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_energy_swap_fwd_bwd_launch_counts(dtype):
    c = count(energy_swap_step("triton", dtype, B=4, S=20, D=48))
    assert c["triton_launches"] <= 18, c["triton"]
    assert c["triton"] == {"_linear_tiled_kernel": 4, "_stack_fwd_kernel": 2,
                           "_energy_attention_fwd_kernel": 1, "_stack_bwd_kernel": 2,
                           "_energy_attention_bwd_dq_kernel": 1,
                           "_energy_attention_bwd_dkdv_kernel": 1, "_linear_dx_kernel": 3,
                           "_ln_bwd_rows_kernel": 2, "_stack_dw_kernel": 1,
                           "_stack_dgamma_kernel": 1}, c["triton"]
    assert c["aten_kernels"] <= 20, c["aten"]
    assert c["custom_ops"] == {"energy_train::energy_fwd": 1, "energy_train::energy_bwd": 1}


def test_layer_actions_launch_counts():
    """(Counts do not depend on the number of layers: 3 here.)"""
    c = count(layer_actions_call(captured=True, layers=3))
    # norm + fc1 GEMM, (norm + GEMM) per block (OFT's head: 2), LayerNorm2 + fc2
    assert c["triton"] == {"_la_norm_kernel": 4, "_la_gemm_kernel": 3}, c["triton"]
    assert c["aten_kernels"] == 0, c["aten"]  # the layers read in place: no copy, no table
    assert c["custom_ops"] == {"energy_train::layer_actions": 1}
    # separate layer tensors (output_hidden_states): the same launches; the documented
    # fallback gathers the rows inside the op (one gather per layer and a stack)
    c = count(layer_actions_call(captured=False, layers=3))
    assert c["triton_launches"] == 7 and c["aten_kernels"] == 0, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_energy_swap_fwd_bwd_launch_counts_tiled_chains(dtype):
    """v5 (chains="tiled"): the pool's 4 and the head's 5 layers one tiled launch each per pass
    instead of one chain launch: 37 Triton launches (forward 14: 13 layers + the attention;
    backward 23: 11 dx GEMMs, 8 LayerNorm row passes, 2 attention, dW, dgamma), the same aten
    kernels outside the custom ops (inside, like the pool's copy into ws, one more copy: the
    head's external dy into wb)."""
    c = count(energy_swap_step("triton", dtype, B=4, S=20, D=48, chains="tiled"))
    assert c["triton_launches"] == 37, c["triton"]
    assert c["triton"] == {"_linear_tiled_kernel": 13, "_energy_attention_fwd_kernel": 1,
                           "_linear_dx_kernel": 11, "_ln_bwd_rows_kernel": 8,
                           "_energy_attention_bwd_dq_kernel": 1,
                           "_energy_attention_bwd_dkdv_kernel": 1, "_stack_dw_kernel": 1,
                           "_stack_dgamma_kernel": 1}, c["triton"]
    assert c["aten_kernels"] <= 20, c["aten"]
    assert c["custom_ops"] == {"energy_train::energy_fwd": 1, "energy_train::energy_bwd": 1}
