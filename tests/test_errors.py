"""Bad input: the error type and a message that names the function, argument and values."""

from __future__ import annotations

import pytest
import torch

import softjac


def test_non_tensor_and_integer_logits():
    with pytest.raises(TypeError, match=r"`softjac.softmax`: `logits` must be a torch.Tensor"):
        softjac.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match=r"`softjac.jacobian`: `logits` must have a floating"):
        softjac.jacobian(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="floating"):
        softjac.vjp(torch.tensor([True, False]), torch.zeros(2))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(
        ValueError,
        match=r"`softjac.vjp`: `v` must have the shape of `logits`. Got \(4, 10\) and \(4, 9\).",
    ):
        softjac.vjp(torch.zeros(4, 9), torch.zeros(4, 10))
    with pytest.raises(ValueError, match=r"`softjac\.vjp_from_probs`: `v`"):
        softjac.vjp_from_probs(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"`softjac\.hvp`: `w`"):
        softjac.hvp(torch.zeros(3), torch.zeros(2), torch.zeros(3))


def test_dim_out_of_range():
    with pytest.raises(ValueError, match=r"`softjac.softmax`: `dim` must be in \[-2, 1\].*Got 2"):
        softjac.softmax(torch.zeros(2, 3), dim=2)
    with pytest.raises(TypeError, match="`dim` must be an int"):
        softjac.softmax(torch.zeros(2, 3), dim=1.0)
    with pytest.raises(ValueError, match="0-d"):
        softjac.softmax(torch.tensor(1.0))


def test_zero_classes():
    with pytest.raises(ValueError, match="K = 0"):
        softjac.jacobian(torch.zeros(3, 0))


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match=r"`softjac.softmax`: `temperature` must be a finite"):
        softjac.softmax(torch.zeros(3), temperature=t)


def test_bad_mask():
    with pytest.raises(ValueError, match=r"`mask` of shape \(4,\) does not broadcast"):
        softjac.softmax(torch.zeros(2, 3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        softjac.softmax(torch.zeros(2, 3), mask=torch.ones(3))


def test_dense_size_limit_points_to_alternatives():
    z = torch.zeros(64, 1000)
    with pytest.raises(ValueError, match=r"`softjac.jacobian`.*softjac.vjp.*SoftmaxJacobian"):
        softjac.jacobian(z, max_bytes=2**20)
    assert softjac.jacobian(z[:1, :10], max_bytes=2**20).shape == (1, 10, 10)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        softjac.vjp(torch.zeros(3), torch.zeros(3), backend="cuda")
