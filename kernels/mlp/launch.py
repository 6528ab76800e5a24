"""Launchers of the layer stack (fused.py): a plan of chains of layers, its device tables
(built once per plan and device and kept: no host-to-device copy per call), the launches.

A plan (:class:`StackPlan`) lays chains of :class:`StackLayer` out in three fp32 workspaces -
``ws`` (what the forward saves: every layer's output, pre-activation and row statistics), ``wb``
(the backward's dy / dpre / dx) and ``part`` (dgamma/dbeta partials) - and writes the int64
table the kernels read (one row per layer, columns ``fused.STACK_COLS``). The parameters are
ONE flat tensor P (``mlp_tensors``' order for an MLPResNet, then ``constants``: ones / zeros
that a layer without LayerNorm or bias reads instead); their gradient is one tensor of P's
layout. Launches: ``stack_forward`` (a chain, each program its rows through every layer),
``stack_forward_tiled`` / ``stack_backward_tiled`` (one layer at a time over thousands of rows,
tiled tensor-core launches compiled per layer), ``stack_backward``, ``stack_weight_grads`` (every
dW in one launch, the dgamma/dbeta sums in a second).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from .._utils import ACTIVATIONS, TL_DTYPES, dot_precision, empty, upcast_dot
from .configs import stack_config
from .fused import (STACK_COLS, _linear_dx_kernel, _linear_tiled_kernel, _ln_bwd_rows_kernel,
                    _stack_bwd_kernel, _stack_dgamma_kernel, _stack_dw_kernel,
                    _stack_fwd_kernel)

C = STACK_COLS
X_IN = -1                 # a layer input: the launch's external X (PAD-masked rows)
EXTERNAL, NONE = -1, -2   # an output / dy / dx: the launch's external tensor, or not wanted
_ALIGN = 16               # every workspace region starts on 16 elements (64 B)


@dataclass(frozen=True)
class StackLayer:
    """One layer of a plan: ``y = act(LN(x) @ W^T + b) [+ x] [+ pe[row % H]]``, x (M, K),
    y (M, N); ``w``, ``b``, ``g``, ``beta``: element offsets of W (N, K), b (N,), gamma and
    beta (K,) in the flat parameter tensor (-1: no bias; ``ln=False``: no LayerNorm)."""
    K: int
    N: int
    w: int
    b: int = -1
    g: int = -1
    beta: int = -1
    ln: bool = True
    eps: float = 1e-5
    act: str = "none"
    res: bool = False
    pe: bool = False


@dataclass
class StackPlan:
    """Chains of layers laid out in the workspaces: ``ws`` (fp32, what the forward saves),
    ``wb`` (fp32, the backward's dy/dpre/dx scratch), ``part`` (fp32, the dgamma/dbeta
    partials), sizes in elements; ``rows`` the int64 table (one row per layer). ``ones`` /
    ``zeros``: offsets of constant vectors in the flat parameters (at least as long as any K
    or N), what a layer without LayerNorm or bias reads instead (one code path)."""
    ones: int
    zeros: int
    block_n_dw: int
    block_k_dw: int
    block_k_g: int
    rows: list = field(default_factory=list)
    eps: list = field(default_factory=list)
    ws: int = 0
    wb: int = 0
    part: int = 0
    _tables: dict = field(default_factory=dict)

    def alloc_ws(self, n: int) -> int:
        off, self.ws = self.ws, self.ws + -(-n // _ALIGN) * _ALIGN
        return off

    def alloc_wb(self, n: int) -> int:
        off, self.wb = self.wb, self.wb + -(-n // _ALIGN) * _ALIGN
        return off

    def add_chain(self, M: int, layers: list, x_in: int, dy: int, dx: int = NONE,
                  out: int | None = None) -> tuple:
        """Append layers whose input is the previous layer's output; the first reads ``x_in``
        (a ws offset or X_IN); the last layer's gradient comes from ``dy`` (a wb offset or
        EXTERNAL); the first layer's input gradient goes to ``dx`` (a wb offset, EXTERNAL or
        NONE). ``out=EXTERNAL`` sends the last output to the launch's OUT tensor.
        -> (index of the first layer, of the last, ws offset of the last output or -1)."""
        first = len(self.rows)
        x = x_in
        for j, L in enumerate(layers):
            row = [0] * len(C)
            row[C["K"]], row[C["N"]], row[C["M"]], row[C["IN"]] = L.K, L.N, M, x
            ext = j == len(layers) - 1 and out == EXTERNAL
            row[C["OUT"]] = EXTERNAL if ext else self.alloc_ws(M * L.N)
            row[C["PRE"]] = self.alloc_ws(M * L.N) if L.act != "none" else -1
            row[C["MU"]], row[C["RSTD"]] = self.alloc_ws(M), self.alloc_ws(M)
            row[C["W"]] = row[C["GW"]] = L.w
            row[C["B"]] = L.b if L.b >= 0 else self.zeros
            row[C["GB"]] = L.b
            row[C["LN"]] = int(L.ln)
            row[C["G"]], row[C["BETA"]] = (L.g, L.beta) if L.ln else (self.ones, self.zeros)
            row[C["GG"]], row[C["GBETA"]] = (L.g, L.beta) if L.ln else (-1, -1)
            row[C["ACT"]], row[C["RES"]], row[C["PE"]] = ACTIVATIONS[L.act], int(L.res), int(L.pe)
            if L.ln:
                row[C["PART"]] = self.part
                self.part += 2 * -(-L.N // self.block_n_dw) * L.K
            else:
                row[C["PART"]] = -1
            self.rows.append(row)
            self.eps.append(float(L.eps))
            x = row[C["OUT"]]
        # backward wiring, last layer first: a layer's dx is the previous layer's dy; its dpre
        # (dy * act'(pre)) IS its dy when it has no activation and dy is in wb
        g = dy
        for i in range(len(self.rows) - 1, first - 1, -1):
            row = self.rows[i]
            row[C["DY"]] = g
            row[C["DPRE"]] = (g if (row[C["ACT"]] == 0 and g >= 0) else
                              self.alloc_wb(M * row[C["N"]]))
            row[C["DX"]] = g = (self.alloc_wb(M * row[C["K"]]) if i > first else dx)
            # dxhat in fp32: in dx's own region when that is in wb, else a region of its own
            row[C["SCR"]] = (row[C["DX"]] if row[C["DX"]] >= 0 else
                             self.alloc_wb(M * row[C["K"]]) if row[C["DX"]] == EXTERNAL else -1)
        return first, len(self.rows) - 1, x

    def tables(self, device) -> dict:
        """{"T": int64 table, "EPS": fp32, "DW": (layer, n tile, k tile) work, longest layers
        first, "DG": (LN layer, k tile) work}, built once per device."""
        key = str(device)
        if key not in self._tables:
            dw = []
            order = sorted(range(len(self.rows)), key=lambda i: -self.rows[i][C["M"]] *
                           self.rows[i][C["N"]] * self.rows[i][C["K"]])  # longest first
            for i in order:
                r = self.rows[i]
                for nt in range(-(-r[C["N"]] // self.block_n_dw)):
                    for kt in range(-(-r[C["K"]] // self.block_k_dw)):
                        dw.append((i, nt, kt))
            dg = [(i, kt) for i, r in enumerate(self.rows) if r[C["LN"]]
                  for kt in range(-(-r[C["K"]] // self.block_k_g))]

            def t(x, cols):
                return torch.tensor(x, dtype=torch.int64, device=device).reshape(-1, cols)
            self._tables[key] = dict(
                T=t(self.rows, len(C)), EPS=torch.tensor(self.eps, dtype=torch.float32,
                                                         device=device),
                DW=t(dw, 3), DG=t(dg, 2))
        return self._tables[key]


def _dot_kw(dtype: torch.dtype, precision: str) -> dict:
    return dict(DOT_DTYPE=TL_DTYPES[dtype], UPCAST=upcast_dot(dtype),
                PREC=dot_precision(dtype, precision))


def _launch_kw(cfg: dict) -> dict:
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _pad_bytes(pad):
    return pad.view(torch.uint8) if pad is not None and pad.dtype == torch.bool else pad


def stack_forward(plan: StackPlan, P, ws, first: int, last: int, M: int, *, X=None, pad=None,
                  pe=None, out=None, precision: str = "ieee") -> None:
    """Run layers first..last of ``plan`` on M rows (each program its BLOCK_M rows through
    every layer). X (rows, features), unit feature stride; pad (rows,) bool for X's rows (True
    = padded: read as zeros); pe (H, N) added by layers with ``pe`` at row % H; out: the last
    layer's external output."""
    t = plan.tables(P.device)
    cfg = stack_config("fwd", P.dtype)
    _stack_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), 1)](
        t["T"], t["EPS"], P, ws, X if X is not None else ws, _pad_bytes(pad),
        pe if pe is not None else ws, out if out is not None else ws, first, last - first + 1,
        X.stride(0) if X is not None else 0, pe.shape[0] if pe is not None else 1,
        HAS_X=X is not None, **_dot_kw(P.dtype, precision), **_launch_kw(cfg))


def stack_forward_tiled(plan: StackPlan, P, ws, layer: int, M: int, *, X=None, pad=None,
                        pe=None, out=None, precision: str = "ieee", kind: str = "tiled") -> None:
    """One layer of ``plan`` over many rows with its own compiled kernel
    (``_linear_tiled_kernel``): a tiled grid over (rows, N), tensor-core tiles - what the chain
    launch cannot give thousands of rows. Its input is X (the row's IN is X_IN) or ws; its
    output goes to ws, or to ``out`` when the plan says EXTERNAL; pe (H, N): added at row % H
    by a layer with ``pe``. ``kind``: the tile config (``stack_config``): "tiled" (thousands
    of rows), "tiled_head" / "tiled_pool" (a few hundred / a few dozen rows: small tiles, many
    programs)."""
    r = plan.rows[layer]
    if ((r[C["OUT"]] < 0) != (out is not None) or bool(r[C["PE"]]) != (pe is not None)
            or (r[C["IN"]] < 0) != (X is not None)):
        raise ValueError("stack_forward_tiled: out, pe and X must be given exactly when the "
                         "layer writes an external output, adds pe, reads X")
    cfg = stack_config(kind, P.dtype)
    N, K = r[C["N"]], r[C["K"]]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _linear_tiled_kernel[grid](
        X if X is not None else ws, _pad_bytes(pad), P, ws, M, N, K,
        X.stride(0) if X is not None else 0, max(r[C["IN"]], 0), r[C["W"]], r[C["B"]],
        r[C["G"]], r[C["BETA"]], max(r[C["OUT"]], 0), max(r[C["PRE"]], 0), r[C["MU"]],
        r[C["RSTD"]], plan.eps[layer], out, pe, pe.shape[0] if pe is not None else 1,
        IN_X=X is not None, HAS_LN=bool(r[C["LN"]]), ACT=r[C["ACT"]],
        HAS_RES=bool(r[C["RES"]]), GROUP_M=cfg["GROUP_M"], **_dot_kw(P.dtype, precision),
        **_launch_kw(cfg))


def stack_backward_tiled(plan: StackPlan, P, ws, wb, first: int, last: int, M: int, *,
                         X=None, pad=None, dy=None, dx=None, precision: str = "ieee",
                         kind: str = "dx") -> None:
    """The backward of layers last..first over many rows with tiled launches: per layer
    ``_linear_dx_kernel`` ((dpre @ W) * gamma) then, unless that already is the previous
    layer's dpre (no LayerNorm, and the previous layer has no activation), the row pass
    ``_ln_bwd_rows_kernel`` (the LayerNorm backward, + dy of a residual block) which also
    writes the previous layer's dpre. The last layer must have no activation (its dpre is its
    dy); when its dy is EXTERNAL (``dy``, e.g. the head's N = 1 output), dy is copied into its
    dpre region of wb first (one aten copy). X: when the first layer's dx is wanted and reads
    X (dx: the external tensor). ``kind``: the dx GEMM's tile config ("dx", "dx_head",
    "dx_pool")."""
    rl = plan.rows[last]
    if rl[C["ACT"]] != 0:
        raise ValueError("stack_backward_tiled: the last layer must have no activation")
    if (rl[C["DY"]] == EXTERNAL) != (dy is not None):
        raise ValueError("stack_backward_tiled: dy must be given exactly when the last layer's "
                         "dy is external")
    if dy is not None:
        n = M * rl[C["N"]]
        wb[rl[C["DPRE"]]: rl[C["DPRE"]] + n].copy_(dy.reshape(-1))
    cfg = stack_config(kind, P.dtype)
    rows_cfg = stack_config("rows", P.dtype)
    for i in range(last, first - 1, -1):
        r = plan.rows[i]
        if r[C["DX"]] == NONE:
            break
        N, K = r[C["N"]], r[C["K"]]
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
        _linear_dx_kernel[grid](P, wb, M, N, K, r[C["DPRE"]], r[C["W"]], r[C["G"]],
                                r[C["SCR"]], GROUP_M=cfg["GROUP_M"],
                                **_dot_kw(P.dtype, precision), **_launch_kw(cfg))
        prev = plan.rows[i - 1] if i > first else None
        act_next = prev[C["ACT"]] if prev is not None else 0
        ext = r[C["DX"]] == EXTERNAL
        if not r[C["LN"]] and not r[C["RES"]] and act_next == 0 and not ext:
            continue  # dxhat is dx, and dx is the previous layer's dpre (aliased in the plan)
        in_x = r[C["IN"]] < 0
        _ln_bwd_rows_kernel[(triton.cdiv(M, rows_cfg["BLOCK_M"]),)](
            X if in_x else ws, _pad_bytes(pad) if in_x else None, ws, wb,
            dx if ext else wb, M, K, X.stride(0) if in_x else 0, max(r[C["IN"]], 0),
            r[C["MU"]], r[C["RSTD"]], r[C["SCR"]], max(r[C["DY"]], 0), max(r[C["DX"]], 0),
            max(prev[C["PRE"]], 0) if prev is not None else 0,
            prev[C["DPRE"]] if prev is not None else 0, IN_X=in_x, HAS_LN=bool(r[C["LN"]]),
            HAS_RES=bool(r[C["RES"]]), DX_EXT=ext, ACT_NEXT=act_next,
            BLOCK_M=rows_cfg["BLOCK_M"], BLOCK_K=rows_cfg["BLOCK_K"],
            num_warps=rows_cfg["num_warps"], num_stages=rows_cfg["num_stages"])


def stack_backward(plan: StackPlan, P, ws, wb, first: int, last: int, M: int, *, X=None,
                   pad=None, dy=None, dx=None, precision: str = "ieee") -> None:
    """The backward of layers last..first on M rows: dpre per layer into wb, dx chained; dy /
    dx: the external gradient tensors where the plan says EXTERNAL; X: only when the first
    layer's dx is wanted and reads X."""
    t = plan.tables(P.device)
    cfg = stack_config("bwd_x" if X is not None else "bwd", P.dtype)
    _stack_bwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        t["T"], P, ws, wb, X if X is not None else ws, _pad_bytes(pad),
        dy if dy is not None else wb, dx if dx is not None else wb, last, last - first + 1,
        X.stride(0) if X is not None else 0, HAS_X=X is not None,
        **_dot_kw(P.dtype, precision), **_launch_kw(cfg))


def stack_weight_grads(plan: StackPlan, P, ws, wb, grad, *, X=None, pad=None,
                       precision: str = "ieee") -> None:
    """Every layer's dW, db and dgamma, dbeta into ``grad`` (the flat gradient, P's layout and
    dtype), from the dpre the backward launches left in wb: one launch for every layer's dW
    and db (the layers reading X - the context's first Linear - are why it is compiled with
    HAS_X), one that sums the dgamma/dbeta partials."""
    t = plan.tables(P.device)
    cfg = stack_config("dw", P.dtype)
    if (cfg["BLOCK_N"], cfg["BLOCK_K"]) != (plan.block_n_dw, plan.block_k_dw):
        raise RuntimeError("stack_weight_grads: the plan was laid out for other dW tiles")
    part = empty((max(plan.part, 1),), torch.float32, P.device)
    if t["DW"].shape[0]:
        _stack_dw_kernel[(t["DW"].shape[0],)](
            t["T"], t["DW"], P, ws, wb, X if X is not None else ws,
            _pad_bytes(pad) if X is not None else None, grad, part,
            X.stride(0) if X is not None else 0, HAS_X=X is not None,
            **_dot_kw(P.dtype, precision), **_launch_kw(cfg))
    if t["DG"].shape[0]:
        g = stack_config("dgamma", P.dtype)
        _stack_dgamma_kernel[(t["DG"].shape[0],)](t["T"], t["DG"], part, grad, plan.block_n_dw,
                                                  BLOCK_K=g["BLOCK_K"], num_warps=g["num_warps"],
                                                  num_stages=1)


def new_plan(dtype: torch.dtype, ones: int, zeros: int) -> StackPlan:
    """An empty plan whose partials are laid out for the dW launch's tiles of ``dtype``."""
    dw, g = stack_config("dw", dtype), stack_config("dgamma", dtype)
    return StackPlan(ones, zeros, dw["BLOCK_N"], dw["BLOCK_K"], g["BLOCK_K"])


def mlp_layers(w_shapes: tuple, offset: int, eps: tuple, activation: str) -> tuple:
    """The StackLayers of an MLPResNet whose parameters sit in the flat tensor from ``offset``
    on, per layer [gamma (K), beta (K), W (N, K), b (N)] (``mlp_tensors``' order);
    ``w_shapes``: (N, K) of fc1, the blocks, fc2. -> (layers, offset after them)."""
    layers = []
    n = len(w_shapes)
    for i, ((N, K), e) in enumerate(zip(w_shapes, eps)):
        g, beta, W = offset, offset + K, offset + 2 * K
        b = W + N * K
        offset = b + N
        layers.append(StackLayer(K, N, W, b, g, beta, ln=True, eps=e,
                                 act="none" if i == n - 1 else activation, res=0 < i < n - 1))
    return layers, offset


def mlp_tensors(w) -> list:
    """An MLPResNet's parameters in ``mlp_layers``' order (an absent LayerNorm weight, bias or
    Linear bias as ones / zeros: their gradients are discarded)."""
    out = []
    for lin in w.layers:
        N, K = lin.weight.shape
        ones = lin.weight.new_ones(K) if lin.ln_weight is None else lin.ln_weight
        zeros = lin.weight.new_zeros(K) if lin.ln_bias is None else lin.ln_bias
        out += [ones, zeros, lin.weight,
                lin.bias if lin.bias is not None else lin.weight.new_zeros(N)]
    return out


def constants(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[ones(n), zeros(n)]: the tail of a flat parameter tensor (cached per size/dtype/device)."""
    key = (n, dtype, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.cat([torch.ones(n, dtype=dtype, device=device),
                                     torch.zeros(n, dtype=dtype, device=device)])
    return _CONSTANTS[key]


_CONSTANTS: dict = {}
