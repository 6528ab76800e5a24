"""EnergyModel against every published forward of the public energy fork's EnergyModel
(HuskyKingdom/openvla-oft-yhs, vla-scripts/energy/energy_model.py, the nn.MultiheadAttention
layout of 7-13 Sep 2025).

Each fork forward below is written HERE from the fork's published code (its formulas, module
names and state_dict layout; nothing imported from energy_train), run in float64 in eval mode
(the fork's positional-encoding dropout is off in eval), and compared with the package's
model loaded from its state_dict: energies and gradients (context, actions, every parameter).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from energy_train import EnergyModel
from energy_train.models.energy import (FORK_BROKEN, FORK_VERSIONS, ForkVersion, fork_scores,
                                        load_fork_energy, resolve_fork_version)
from energy_train.models.weights import energy_weights
from energy_train.kernels.energy import energy_scores_reference
from energy_train.ops import energy_scores
from energy_train.testing import assert_close

F64 = torch.float64
B, S, H, D, DA, HID, HEADS = 3, 11, 4, 13, 7, 24, 4


# ---- the fork's modules, as published (vla-scripts/energy/*.py) ----------------------------
class ForkPositionalEncoding(nn.Module):  # position_encodings.py: P is a plain attribute
    def __init__(self, num_hiddens, dropout, max_len=64):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.P = torch.zeros((1, max_len, num_hiddens), dtype=F64)
        X = torch.arange(max_len, dtype=F64).reshape(-1, 1) / torch.pow(
            10000, torch.arange(0, num_hiddens, 2, dtype=F64) / num_hiddens)
        self.P[:, :, 0::2] = torch.sin(X)
        self.P[:, :, 1::2] = torch.cos(X)

    def forward(self, X):
        X = X + self.P[:, :X.shape[1], :].to(X.device, X.dtype)
        return self.dropout(X)


class ForkBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, x):
        return self.ffn(x) + x


class ForkMLPResNet(nn.Module):
    def __init__(self, num_blocks, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.act = nn.SiLU()
        self.mlp_resnet_blocks = nn.ModuleList([ForkBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = self.act(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class ForkEnergyModel(nn.Module):
    """The fork's __init__ (7-13 Sep 2025): gate_a as an nn.Parameter in the 7-9 Sep versions.
    ``forward`` is one of the published forwards below (FORWARDS[version])."""

    def __init__(self, state_dim, act_dim, hidden=512, head=8, *, gate_a, forward):
        super().__init__()
        self.cross = nn.MultiheadAttention(hidden, head, batch_first=True)
        self.pe_layer = ForkPositionalEncoding(hidden, 0.2)
        self.state_linear = ForkMLPResNet(1, state_dim, hidden, hidden)
        self.action_linear = ForkMLPResNet(1, act_dim, hidden, hidden)
        self.prediction_head = ForkMLPResNet(2, hidden, hidden, 1)
        if gate_a:
            self.gate_a = nn.Parameter(torch.tensor(0.1, dtype=torch.float32))
        self.T = 30.0
        self.energy_scale, self.energy_offset = 2.0, 0.1
        self._forward = forward

    def pool(self, h):  # SeqPool("mean")
        return h.mean(dim=1)

    def encode(self, hN, a, pad_mask):
        context_mapped = self.state_linear(hN)
        action_mapped = self.pe_layer(self.action_linear(a))
        Z, _ = self.cross(query=action_mapped, key=context_mapped, value=context_mapped,
                          need_weights=False, key_padding_mask=pad_mask)
        return Z

    def forward(self, hN, a, pad_mask=None):
        return self._forward(self, hN, a, pad_mask)


# The forwards (after `hN = hN.float(); a = a.float()`, which float64 here replaces).
def f_98565ff(m, hN, a, pad_mask):   # 98565ff 3eba774 e3c3c27: no mask, no transform
    return m.prediction_head(m.pool(m.encode(hN, a, None)))


def f_0112fc2(m, hN, a, pad_mask):   # 0112fc2 1263de0 8572cc1: no mask, softplus
    return F.softplus(m.prediction_head(m.pool(m.encode(hN, a, None)))) + 1e-6


def f_d88aa38(m, hN, a, pad_mask):   # d88aa38 0d94f80
    return F.softplus(m.prediction_head(m.pool(m.encode(hN, a, pad_mask)))) + 1e-6


def f_0872bb8(m, hN, a, pad_mask):   # 0872bb8: raw = T tanh(raw / T), softplus
    raw = m.prediction_head(m.pool(m.encode(hN, a, pad_mask)))
    raw = m.T * torch.tanh(raw / m.T)
    return F.softplus(raw) + 1e-6


def f_1476b25(m, hN, a, pad_mask):   # 1476b25 ... 4efe6f0: self.act = nn.Sigmoid()
    return torch.sigmoid(m.prediction_head(m.pool(m.encode(hN, a, pad_mask)))) + 1e-6


def f_cb32c95(m, hN, a, pad_mask):
    raw = m.prediction_head(m.pool(m.encode(hN, a, pad_mask)))
    raw = m.T * torch.tanh(raw / m.T)
    return torch.sigmoid(raw) + 1e-6


def f_a160fc3(m, hN, a, pad_mask):   # head per step, pool the raw outputs, sigmoid
    raw = m.pool(m.prediction_head(m.encode(hN, a, pad_mask)))
    return torch.sigmoid(raw) + 1e-6


def f_08a0296(m, hN, a, pad_mask):   # sigmoid per step, then pool
    return m.pool(torch.sigmoid(m.prediction_head(m.encode(hN, a, pad_mask))) + 1e-6)


def f_1ce7b69(m, hN, a, pad_mask):   # pool, head, sigmoid(0.5 raw) * 2 + 0.1
    raw = m.prediction_head(m.pool(m.encode(hN, a, pad_mask)))
    return torch.sigmoid(raw * 0.5) * m.energy_scale + m.energy_offset


def f_final(m, hN, a, pad_mask):     # e161e36 ... 761d5bf (the final model)
    step = m.prediction_head(m.encode(hN, a, pad_mask)) * 0.5
    E = torch.sigmoid(step) * m.energy_scale + m.energy_offset
    return m.pool(E)


FORWARDS = {"98565ff": f_98565ff, "0112fc2": f_0112fc2, "d88aa38": f_d88aa38,
            "0872bb8": f_0872bb8, "1476b25": f_1476b25, "cb32c95": f_cb32c95,
            "a160fc3": f_a160fc3, "08a0296": f_08a0296, "1ce7b69": f_1ce7b69, "e161e36": f_final}
GATED = {"98565ff", "0112fc2", "d88aa38", "0872bb8"}


def fork_model(version, seed=0, scale_head=1.0):
    torch.manual_seed(seed)
    m = ForkEnergyModel(D, DA, HID, HEADS, gate_a=version in GATED, forward=FORWARDS[version])
    with torch.no_grad():  # LayerNorm affines etc. away from 1 / 0, so each one matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        # a head output large enough that where the transform sits matters (sigmoid / tanh
        # saturate): the "x50 from init"
        if scale_head != 1.0:
            m.prediction_head.fc2.weight.mul_(scale_head)
            m.prediction_head.fc2.bias.zero_()
    return m.double().eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    ctx = torch.randn(B, S, D, generator=g, dtype=F64)
    a = torch.randn(B, H, DA, generator=g, dtype=F64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 7:] = True      # a padded tail
    pad[2, ::3] = True     # scattered
    return ctx, a, pad


def energies_and_grads(model, ctx, a, pad):
    ctx, a = ctx.clone().requires_grad_(True), a.clone().requires_grad_(True)
    model.zero_grad()
    e = model(ctx, a, pad)
    w = torch.arange(1, e.numel() + 1, dtype=F64).reshape(e.shape)  # distinct weights per sample
    (e * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return e.detach(), ctx.grad, a.grad, grads


def test_every_version_is_listed_once():
    commits = [c for v in FORK_VERSIONS.values() for c in v.commits]
    # 31 commits of the nn.MultiheadAttention layout (98565ff .. 761d5bf), 4 of them unrunnable
    assert len(commits) == len(set(commits)) == 27
    assert not set(commits) & set(FORK_BROKEN)
    assert set(FORWARDS) == set(FORK_VERSIONS)
    assert {k for k, v in FORK_VERSIONS.items() if v.gate_a} == GATED


@pytest.mark.parametrize("version", sorted(FORWARDS))
@pytest.mark.parametrize("scale_head", [1.0, 50.0], ids=["init", "head-x50"])
def test_fork_checkpoint_loads_strictly_and_gives_the_forks_energies(version, scale_head):
    fork = fork_model(version, scale_head=scale_head)
    sd = fork.state_dict()
    assert ("gate_a" in sd) == (version in GATED)
    model = load_fork_energy(sd, version, heads=HEADS).double().eval()
    assert model.fork_version == version
    assert set(model.state_dict()) == set(sd)
    ctx, a, pad = inputs()
    e_ref, dc_ref, da_ref, g_ref = energies_and_grads(fork, ctx, a, pad)
    e, dc, da, g = energies_and_grads(model, ctx, a, pad)
    assert e.shape == e_ref.shape == (B, 1)
    assert_close(f"{version} energies", e_ref, e, F64, tol=1e-10)
    assert_close(f"{version} d/dcontext", dc_ref, dc, F64, tol=1e-9, floor=1e-6)
    assert_close(f"{version} d/dactions", da_ref, da, F64, tol=1e-9, floor=1e-6)
    assert set(g) == set(g_ref) - {"gate_a"}  # no version reads gate_a: no gradient either way
    for name in g_ref:
        if name != "gate_a":
            assert_close(f"{version} d/d{name}", g_ref[name], g[name], F64, tol=1e-9, floor=1e-6)
    # unmasked versions ignore the pad mask, as the fork's forward did
    masked = energies_and_grads(model, ctx, a, None)[0]
    assert torch.equal(masked, e) == (not FORK_VERSIONS[version].masked)


def test_transform_placement_matters_and_the_final_model_applies_it_per_step():
    """The issue's measurement: with the head's output layer x50 the per-step sigmoid and the
    sigmoid of the mean differ by far more than rounding; the package gives the fork's."""
    fork = fork_model("e161e36", seed=3, scale_head=50.0)
    ctx, a, pad = inputs(3)
    with torch.no_grad():  # centred: the raw outputs straddle 0, where the sigmoid bends
        fork.prediction_head.fc2.bias -= fork.prediction_head(fork.encode(ctx, a, pad)).mean()
    model = EnergyModel(D, DA, hidden=HID, heads=HEADS, output="sigmoid").double().eval()
    model.load_state_dict(fork.state_dict(), strict=True)
    cand = torch.randn(B, 6, H, DA, dtype=F64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = torch.stack([fork(ctx, cand[:, c], pad)[:, 0] for c in range(6)], dim=1)
        out = energy_scores(model, ctx, pad, cand)
        mean_first = fork_scores(energy_weights(model), ctx, pad, cand,
                                 ForkVersion((), "", pool="raw", output="sigmoid"))
    assert_close("final: energies of 6 candidates", ref, out, F64, tol=1e-10)
    gap = (mean_first - ref).abs().max().item()
    assert gap > 0.05, gap  # the old order is measurably another model (the issue: 0.148)
    assert ((out > 0.1) & (out < 2.1)).all()


@pytest.mark.parametrize("version", sorted(FORWARDS))
def test_package_saved_energy_file_loads_into_the_forks_class(version, tmp_path):
    model = EnergyModel(D, DA, hidden=HID, heads=HEADS, fork_version=version).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "energy_model--10_checkpoint.pt"
    torch.save(model.state_dict(), path)
    fork = ForkEnergyModel(D, DA, HID, HEADS, gate_a=version in GATED,
                           forward=FORWARDS[version]).double().eval()
    fork.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ctx, a, pad = inputs(1)
    with torch.no_grad():
        assert_close(f"{version} round trip", fork(ctx, a, pad), model(ctx, a, pad), F64, tol=1e-10)


def test_default_model_has_the_final_layout():
    """No gate_a unless asked for: a default model and the fork's final one load each other."""
    final = fork_model("e161e36")
    model = EnergyModel(D, DA, hidden=HID, heads=HEADS)
    assert "gate_a" not in model.state_dict() and model.gate_a is None
    model.load_state_dict(final.state_dict(), strict=True)
    final.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="gate_a"):  # a gated checkpoint needs its version
        model.load_state_dict(fork_model("0872bb8").state_dict(), strict=True)
    residual = EnergyModel(D, DA, hidden=HID, heads=HEADS, action_residual=True)
    assert isinstance(residual.gate_a, nn.Parameter)
    residual.load_state_dict(fork_model("0872bb8").state_dict(), strict=True)
    gated = EnergyModel(D, DA, hidden=HID, heads=HEADS, fork_version="0872bb8")
    assert "gate_a" in gated.state_dict() and "gate_a" not in dict(gated.named_parameters())


def test_fused_and_eager_paths_of_versions():
    ctx, a, pad = inputs(2)
    cand = torch.randn(B, 3, H, DA, dtype=F64)
    for version, v in FORK_VERSIONS.items():
        model = EnergyModel(D, DA, hidden=HID, heads=HEADS, fork_version=version).double()
        assert model.fused == v.fused == (version == "e161e36")
        e = energy_scores(model, ctx, pad, cand)  # auto: eager for the historic ones
        assert_close(version, model.score(ctx, pad, cand), e, F64, tol=0)
        if not v.fused:
            with pytest.raises(NotImplementedError, match=f"fork_version='{version}'"):
                energy_scores(model, ctx, pad, cand, backend="triton")
    # fork_scores with the standard pooling IS the reference (the two copies cannot drift)
    model = EnergyModel(D, DA, hidden=HID, heads=HEADS).double()
    for output in ("unbounded", "sigmoid", "softplus"):
        model.output = output
        w = energy_weights(model)
        assert_close(output, energy_scores_reference(w, ctx, pad, cand),
                     fork_scores(w, ctx, pad, cand, ForkVersion((), "", "energy", output)),
                     F64, tol=1e-12)


def test_version_names_and_errors():
    assert resolve_fork_version("final")[0] == "e161e36"
    assert resolve_fork_version("761d5bf")[0] == "e161e36"
    assert resolve_fork_version("761d5bf0123456789abcdef")[0] == "e161e36"
    assert resolve_fork_version("8572cc1")[0] == "0112fc2"
    with pytest.raises(ValueError, match="cannot run"):
        resolve_fork_version("a65df8f")
    with pytest.raises(ValueError, match="fork_version: expected 'final'"):
        EnergyModel(D, DA, hidden=HID, heads=HEADS, fork_version="v2")
    with pytest.raises(ValueError, match="output: fork_version='0872bb8' computes 'softplus', "
                                         "got 'sigmoid'"):
        EnergyModel(D, DA, hidden=HID, heads=HEADS, fork_version="0872bb8", output="sigmoid")
    with pytest.raises(ValueError, match="action_residual"):
        EnergyModel(D, DA, hidden=HID, heads=HEADS, fork_version="final", action_residual=True)
    with pytest.raises(ValueError, match="output"):  # logistic only with a fork version
        EnergyModel(D, DA, hidden=HID, heads=HEADS, output="logistic")
    gated = fork_model("0872bb8").state_dict()
    with pytest.raises(ValueError, match=r"'final' .* has no 'gate_a', the checkpoint has one; "
                                         r"the versions with gate_a are \['0112fc2', '0872bb8', "
                                         r"'98565ff', 'd88aa38'\]"):
        load_fork_energy(gated)
    with pytest.raises(ValueError, match="energy_bc"):
        load_fork_energy({"energy_bc.layers.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        load_fork_energy({"cross.in_proj_weight": torch.zeros(3, 1)})
    # a DDP prefix and a file path are accepted
    sd = {f"module.{k}": v for k, v in fork_model("d88aa38").state_dict().items()}
    assert load_fork_energy(sd, "0d94f80", heads=HEADS).fork_version == "d88aa38"


@pytest.mark.parametrize("version", ["e161e36", "0872bb8"], ids=["final", "gate_a"])
def test_oft_layout_energy_files_load_both_ways(version, tmp_path):
    """load_oft_checkpoint(energy=...) reads the fork's energy_model--N_checkpoint.pt strictly
    (the fork saves its plain state_dict), and the file save_oft_checkpoint writes loads into
    the fork's class strictly."""
    from energy_train.integrations.openvla_oft import load_oft_checkpoint, save_oft_checkpoint
    fork = fork_model(version)
    (tmp_path / "fork").mkdir()
    torch.save(fork.state_dict(), tmp_path / "fork" / "energy_model--20_checkpoint.pt")
    model = EnergyModel(D, DA, hidden=HID, heads=HEADS, fork_version=version).double().eval()
    load_oft_checkpoint(tmp_path / "fork", energy=model)
    ctx, a, pad = inputs(4)
    with torch.no_grad():
        assert_close("fork file -> package", fork(ctx, a, pad), model(ctx, a, pad), F64, tol=1e-10)
    d = save_oft_checkpoint(tmp_path / "pkg", 30, energy=model)
    back = ForkEnergyModel(D, DA, HID, HEADS, gate_a=version in GATED,
                           forward=FORWARDS[version]).double().eval()
    back.load_state_dict(torch.load(d / "energy_model--30_checkpoint.pt", weights_only=True),
                         strict=True)
    with torch.no_grad():
        assert_close("package file -> fork", fork(ctx, a, pad), back(ctx, a, pad), F64, tol=0)
