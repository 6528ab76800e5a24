"""``ln_linear`` as differentiable ``torch.library`` custom ops; the fused MLPResNet built on it.

``ln_linear_autograd(x, weight, bias, ...)``: the forward launcher (saving the LayerNorm
mean/rstd) and ``ln_linear_backward`` as ``energy_train::ln_linear_fwd`` / ``ln_linear_bwd``,
with registered fakes and autograd; the residual's gradient is dy itself.
``mlp_resnet(x, weights)``: an MLPResNet (:class:`~energy_train.kernels.weights.MLPResNetWeights`),
one ``ln_linear_autograd`` per Linear; ``mlp_resnet_reference`` is its oracle.

Why custom_op + register_fake (not triton_op): torch.compile (any backend) traces a user's code
with fake tensors; a custom op is then one node whose output metadata comes from the registered
fake, so the graph has no break and the kernels run only on real tensors. That works on CUDA
(the Triton kernels compiled) and on the CPU (the same kernels under TRITON_INTERPRET=1), so the
CPU tests check compile-traceability of exactly the op that runs on the GPU. A triton_op's
automatic fake re-runs the launcher under fake tensors, which under the interpreter reaches the
data pointers. APIs used: torch 2.4+.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..weights import MLPResNetWeights
from .launch import ln_linear, ln_linear_backward


def _none_if_empty(t, present: bool):
    return t if present else None


@torch.library.custom_op("energy_train::ln_linear_fwd", mutates_args=())
def ln_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], ln_eps: float, normalize: bool,
                     activation: str, input_precision: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K), residual (M, N) -> y (M, N) in weight.dtype, mean and rstd (M,) fp32 (empty
    (0,) without ``normalize``)."""
    kw = dict(ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, normalize=normalize,
              activation=activation, residual=residual, input_precision=input_precision)
    if normalize:
        return ln_linear(x, weight, bias, return_stats=True, **kw)
    y = ln_linear(x, weight, bias, **kw)
    none = x.new_empty((0,), dtype=torch.float32)
    return y, none, none.clone()


@ln_linear_fwd_op.register_fake
def _ln_linear_fwd_fake(x, weight, bias, ln_weight, ln_bias, residual, ln_eps, normalize,
                        activation, input_precision):
    M, N = x.shape[0], weight.shape[0]
    stats = x.new_empty((M if normalize else 0,), dtype=torch.float32)
    return x.new_empty((M, N), dtype=weight.dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("energy_train::ln_linear_bwd", mutates_args=())
def ln_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                     ln_bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                     ln_eps: float, normalize: bool, activation: str, needs_dx: bool,
                     input_precision: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, K), dW, db, dgamma, dbeta; an absent gradient is an empty (0,) tensor (custom
    ops return tensors only). The pre-activation is recomputed from the saved statistics."""
    h = None
    if activation != "none":  # recompute the pre-activation (the forward GEMM again)
        h = ln_linear(x, weight, bias, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps,
                      normalize=normalize, input_precision=input_precision,
                      out_dtype=torch.float32, stats=(mean, rstd) if normalize else None)
    grads = ln_linear_backward(
        dy, x, weight, bias, ln_weight=ln_weight, ln_bias=ln_bias, normalize=normalize,
        mean=mean if normalize else None, rstd=rstd if normalize else None, h=h,
        activation=activation, needs_dx=needs_dx, input_precision=input_precision)
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)  # a fresh one each: no aliasing


@ln_linear_bwd_op.register_fake
def _ln_linear_bwd_fake(dy, x, weight, bias, ln_weight, ln_bias, mean, rstd, ln_eps, normalize,
                        activation, needs_dx, input_precision):
    empty = x.new_empty((0,))
    dx = torch.empty_like(x) if needs_dx else empty
    db = torch.empty_like(bias) if bias is not None else empty.clone()
    dg = torch.empty_like(ln_weight) if (normalize and ln_weight is not None) else empty.clone()
    dbeta = torch.empty_like(ln_bias) if (normalize and ln_bias is not None) else empty.clone()
    return dx, torch.empty_like(weight), db, dg, dbeta


def _ln_linear_setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, residual, ln_eps, normalize, activation, prec = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, ln_weight, ln_bias, mean, rstd)
    ctx.cfg = (ln_eps, normalize, activation, prec)
    ctx.present = (bias is not None, ln_weight is not None, ln_bias is not None,
                   residual is not None)


def _ln_linear_backward(ctx, dy, dmean, drstd):
    x, weight, bias, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    ln_eps, normalize, activation, prec = ctx.cfg
    has_b, has_g, has_beta, has_res = ctx.present
    needs_dx = ctx.needs_input_grad[0]
    dx, dw, db, dg, dbeta = ln_linear_bwd_op(dy.contiguous(), x, weight, bias, ln_weight, ln_bias,
                                             mean, rstd, ln_eps, normalize, activation, needs_dx,
                                             prec)
    return (_none_if_empty(dx, needs_dx), dw, _none_if_empty(db, has_b),
            _none_if_empty(dg, has_g), _none_if_empty(dbeta, has_beta),
            dy if has_res else None, None, None, None, None)


ln_linear_fwd_op.register_autograd(_ln_linear_backward, setup_context=_ln_linear_setup_context)


def ln_linear_autograd(x, weight, bias=None, *, ln_weight=None, ln_bias=None, ln_eps=1e-5,
                       normalize=False, activation="none", residual=None, input_precision="ieee"):
    """Differentiable ``ln_linear``: y (..., N) = act(LN(x) @ W^T + b) [+ residual], x (..., K).

    Forward: the Triton ``ln_linear`` (saving the LayerNorm mean/rstd). Backward: the
    pre-activation is recomputed from the saved statistics (no (M, N) activation kept alive),
    then ``ln_linear_backward``. Gradients for every tensor input that requires one; the
    residual's is dy. Traceable by torch.compile with fullgraph=True (one op node each way).
    """
    K, N = x.shape[-1], weight.shape[0]
    res2 = residual.reshape(-1, N) if residual is not None else None
    y, _, _ = ln_linear_fwd_op(x.reshape(-1, K), weight, bias, ln_weight, ln_bias, res2,
                               float(ln_eps), bool(normalize), activation, input_precision)
    return y.reshape(*x.shape[:-1], N)


def mlp_resnet(x: torch.Tensor, w: MLPResNetWeights, input_precision: str = "ieee",
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MLPResNet (..., K) -> (..., N) [+ residual (..., N)]: ln1 -> fc1 -> act -> blocks
    (x + act(fc(ln x))) -> ln2 -> fc2, one differentiable LN-prologue GEMM per Linear."""
    def layer(x, lin, activation="none", res=None):
        return ln_linear_autograd(x, lin.weight, lin.bias, ln_weight=lin.ln_weight,
                                  ln_bias=lin.ln_bias, ln_eps=lin.ln_eps, normalize=True,
                                  activation=activation, residual=res,
                                  input_precision=input_precision)

    x = layer(x, w.fc1, w.activation)
    for block in w.blocks:
        x = layer(x, block, w.activation, res=x)
    return layer(x, w.fc2, res=residual)
