"""Bad input: the error type and a message that names the function, argument and values."""

from __future__ import annotations

import warnings

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


# ---------------------------------------------------------------------------------------------
# layouts, devices and dtypes no path can read: one softjac error from the shared check, the
# same under every backend (before any kernel is chosen)


def _quiet(make):
    def build():
        with warnings.catch_warnings():  # sparse CSR is beta, nested a prototype, qint deprecated
            warnings.simplefilter("ignore")
            return make()

    return build


_Z = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 0.0, -3.0], [0.0, 2.0, 1.0, 4.0]])
ODD_TENSORS = {
    "sparse_coo": (_quiet(lambda: _Z.to_sparse()), TypeError, r"Got layout torch\.sparse_coo"),
    "sparse_csr": (_quiet(lambda: _Z.to_sparse_csr()), TypeError, r"Got layout torch\.sparse_csr"),
    "sparse_csc": (_quiet(lambda: _Z.to_sparse_csc()), TypeError, r"Got layout torch\.sparse_csc"),
    "nested": (
        _quiet(lambda: torch.nested.nested_tensor([_Z[0], _Z[1, :3]])),
        TypeError,
        "Got a nested tensor",
    ),
    "meta": (lambda: torch.empty(3, 4, device="meta"), ValueError, "on the meta device"),
    "quantized": (
        _quiet(lambda: torch.quantize_per_tensor(_Z, 0.1, 0, torch.qint8)),
        TypeError,
        r"quantized dtype torch\.qint8.*dequantize",
    ),
    "complex": (lambda: _Z.to(torch.complex64), TypeError, "real floating dtype"),
}


def _call(name, x, backend):
    v = torch.ones(3, 4)
    target = torch.tensor([0, 1, 2])
    calls = {
        "softmax": lambda: softjac.softmax(x, backend=backend),
        "jacobian": lambda: softjac.jacobian(x, backend=backend),
        "log_softmax_jacobian": lambda: softjac.log_softmax_jacobian(x),
        "hessian": lambda: softjac.hessian(x),
        "vjp": lambda: softjac.vjp(x, v, backend=backend),
        "jvp": lambda: softjac.jvp(x, v, backend=backend),
        "vjp_from_probs": lambda: softjac.vjp_from_probs(x, v, backend=backend),
        "hvp": lambda: softjac.hvp(x, v, v),
        "cross_entropy": lambda: softjac.cross_entropy(x, target, backend=backend),
        "cross_entropy_grad": lambda: softjac.cross_entropy_grad(x, target),
        "SoftmaxJacobian": lambda: softjac.SoftmaxJacobian(x),
        "check_properties": lambda: softjac.check_properties(x),
        "compare_with_autograd": lambda: softjac.compare_with_autograd(x),
    }
    return calls[name]()


FUNCTIONS = [
    "softmax",
    "jacobian",
    "log_softmax_jacobian",
    "hessian",
    "vjp",
    "jvp",
    "vjp_from_probs",
    "hvp",
    "cross_entropy",
    "cross_entropy_grad",
    "SoftmaxJacobian",
    "check_properties",
    "compare_with_autograd",
]


@pytest.mark.parametrize("kind", list(ODD_TENSORS))
@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
def test_odd_layouts_devices_and_dtypes_are_named(kind, function, backend):
    make, error, message = ODD_TENSORS[kind]
    x = make()
    arg = "probs" if function == "vjp_from_probs" else "logits"
    with pytest.raises(error, match=rf"^`softjac\.{function}`: `{arg}` .*{message}"):
        _call(function, x, backend)


@pytest.mark.parametrize("argument", ["v", "mask"])
def test_odd_second_arguments_are_named(argument):
    z = torch.zeros(3, 4)
    if argument == "v":
        with pytest.raises(TypeError, match=r"^`softjac\.vjp`: `v` must be a dense"):
            softjac.vjp(z, _quiet(lambda: torch.ones(3, 4).to_sparse())(), backend="cpu")
    else:
        mask = torch.ones(3, 4, dtype=torch.bool).to_sparse()
        with pytest.raises(TypeError, match=r"^`softjac\.softmax`: `mask` must be a dense"):
            softjac.softmax(z, mask=mask)


def test_sparse_message_says_how_to_convert():
    with pytest.raises(TypeError) as info:
        softjac.vjp(_Z.to_sparse(), torch.ones(3, 4), backend="cpu")
    assert str(info.value) == (
        "`softjac.vjp`: `logits` must be a dense (strided) tensor. Got layout torch.sparse_coo; "
        "convert it first, e.g. `logits.to_dense()`."
    )
