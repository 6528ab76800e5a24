"""The parity helper itself: it must fail on NaN, on errors above tolerance, on shape mismatch."""
import pytest
import torch

from energy_train.testing import TOLERANCES, assert_close, poison, relative_error, tolerance


def test_tolerances_are_the_designs():
    assert (tolerance(torch.float32), tolerance("tf32"), tolerance(torch.float16),
            tolerance(torch.bfloat16)) == (1e-5, 1e-3, 5e-3, 2e-2)
    with pytest.raises(ValueError, match="dtype"):
        tolerance(torch.int32)


def test_assert_close_passes_and_fails():
    ref = torch.randn(7, 5, dtype=torch.float64)
    assert_close("same", ref, ref.float(), torch.float32)
    bumped = ref.clone()
    bumped[3, 2] += 1e-3 * ref.abs().max()
    with pytest.raises(AssertionError, match=r"bumped: relative error 1.000e-03 > 1.0e-05 at \(3, 2\)"):
        assert_close("bumped", ref, bumped, torch.float32)
    assert_close("bumped-bf16", ref, bumped, torch.bfloat16)
    with pytest.raises(AssertionError, match="shape"):
        assert_close("shape", ref, ref[:3])


def test_nan_never_passes_and_poison_is_nan():
    out = poison((4, 3))
    assert torch.isnan(out).all()
    out[:, :2] = 1.0  # an "unwritten" column stays NaN
    with pytest.raises(AssertionError, match=r"poisoned: 4 NaN values \(first at \(0, 2\)\)"):
        assert_close("poisoned", torch.ones(4, 3), out, tol=1.0)
    assert relative_error(torch.ones(2), torch.tensor([1.0, float("nan")])) == float("inf")
    assert set(TOLERANCES) >= {"fp32", "tf32", "fp16", "bf16"}
