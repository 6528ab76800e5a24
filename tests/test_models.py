"""Models load the public code's state_dicts (strict) and compute the same outputs."""
import pytest
import torch

from energy_train.models import EnergyModel, L1RegressionActionHead, load_oft_state_dict
from energy_train.testing import assert_close
from tests.public_models import ForkEnergy, OFTActionHead

OFT_KEYS = {
    "model.layer_norm1.weight", "model.layer_norm1.bias", "model.fc1.weight", "model.fc1.bias",
    "model.layer_norm2.weight", "model.layer_norm2.bias", "model.fc2.weight", "model.fc2.bias",
} | {f"model.mlp_resnet_blocks.{i}.ffn.{j}.{p}" for i in range(2) for j in (0, 1)
     for p in ("weight", "bias")}


def test_action_head_names_are_ofts():
    head = L1RegressionActionHead(input_dim=12, hidden_dim=20, action_dim=3, num_actions_chunk=2)
    assert set(head.state_dict()) == OFT_KEYS
    assert head.model.fc1.weight.shape == (20, 12 * 3)


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp-prefix"])
def test_action_head_loads_oft_checkpoint(prefix, seed):
    D, hid, Da, H, B = 11, 19, 3, 4, 5
    public = OFTActionHead(D, hid, Da, H).double()
    sd = {prefix + k: v for k, v in public.state_dict().items()}
    head = L1RegressionActionHead(D, hid, Da, H).double()
    load_oft_state_dict(head, sd, strict=True)
    x = torch.randn(B, H * Da, D, dtype=torch.float64)
    assert_close("predict_action", public.predict_action(x), head.predict_action(x),
                 torch.float64, tol=1e-12)
    assert head.predict_action(x).shape == (B, H, Da)


@pytest.mark.parametrize("output", ["unbounded", "sigmoid"])
@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp-prefix"])
def test_energy_model_loads_fork_checkpoint(prefix, output, seed):
    S_dim, Da, hid, heads, B, S, H = 13, 5, 24, 3, 4, 9, 3
    public = ForkEnergy(S_dim, Da, hid, heads, output).double()
    sd = {prefix + k: v for k, v in public.state_dict().items()}
    model = EnergyModel(S_dim, Da, hidden=hid, heads=heads, output=output).double()
    load_oft_state_dict(model, sd, strict=True)
    assert set(model.state_dict()) == set(public.state_dict())
    ctx = torch.randn(B, S, S_dim, dtype=torch.float64)
    a = torch.randn(B, H, Da, dtype=torch.float64)
    pm = torch.zeros(B, S, dtype=torch.bool)
    pm[1, 5:] = True
    pm[2, :2] = True
    assert_close("energy", public(ctx, a, pm), model(ctx, a, pm), torch.float64, tol=1e-12)


@pytest.mark.parametrize("output", ["unbounded", "sigmoid", "softplus"])
def test_energy_output_transforms(output):
    torch.manual_seed(0)
    m = EnergyModel(8, 3, hidden=16, heads=2, output=output).double()
    e = m(torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 2, 3, dtype=torch.float64))
    assert e.shape == (3, 1)
    if output == "sigmoid":
        assert ((e > 0.1) & (e < 2.1)).all()
    if output == "softplus":
        assert (e > 0).all()


def test_energy_model_casts_context_and_has_no_pe_in_state_dict():
    m = EnergyModel(8, 3, hidden=16, heads=2)
    assert not any(k.startswith("pe_layer") for k in m.state_dict())
    e = m(torch.randn(2, 5, 8, dtype=torch.bfloat16), torch.randn(2, 4, 3))
    assert e.dtype == torch.float32 and torch.isfinite(e).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=10, heads=3), "hidden"),
    (dict(output="tanh"), "output"),
    (dict(activation="gelu"), "activation"),
])
def test_energy_model_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyModel(8, 3, **kwargs)
