"""All-layer action-head inference for the negatives, fused: one batched pass through the
OFT MLPResNet head for every selected layer, sample and chunk step (M = L'*B*H rows), reading
the head's weights once per pass.

    layer_actions_triton(states, action_index, head, final_norm=None, norm_mask=None,
                         input_precision=None) -> (L', B, H, Da)

Reached through ``energy_train.ops.layer_actions(..., backend="triton"|"auto")``. Launches
(kernels in kernels/mlp/fused.py, the plan in ./fused.py):
  1. fc1: LN statistics pre-pass over Da*D + the LN-prologue GEMM whose A rows are gathered
     straight from every layer's (B, T, D) tensor (Da segments of D per row, element offsets
     from one base pointer), bias + activation in the epilogue;
  2. per block: statistics pre-pass + LN-prologue GEMM, bias + activation + residual epilogue;
  3. layer_norm2 + fc2 (N = Da): one row-wise kernel, statistics inline.
``final_norm`` (logit-lens) is applied eagerly to the gathered action rows of the layers in
``norm_mask`` only ((B, H*Da, D) each; those layers are then read from that compact buffer).
Outputs are in the head's dtype; rows are rounded to it first, as the eager path does.
The launches run inside one ``torch.library.custom_op`` (``energy_train::layer_actions``, with a
registered fake; inference only), so ``torch.compile(fullgraph=True)`` traces the public op:
checked on the CPU with the eager backend (tests/test_kernel_layer_actions.py), with inductor
by the same test on a GPU.
"""
from .fused import RESOURCE_CONFIGS, layer_actions_triton

__all__ = ["layer_actions_triton", "RESOURCE_CONFIGS"]
