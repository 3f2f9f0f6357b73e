"""The registered operators ``torch.ops.softjac.*`` (``softjac.kernels._ops``).

References are independent of the ops: float64 dense formulas (``softjac._reference``),
``torch.func.jacrev`` of ``torch.softmax``, and finite differences (``gradcheck``).
``torch.library.opcheck`` checks each op's schema, fake implementation, autograd registration
and its use under AOT autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import softjac
from softjac import _reference
from softjac.kernels import _cpu, _ops, dispatch

F64 = torch.float64
OPS = ("softmax", "softmax_vjp", "softmax_vjp_logits", "softmax_jacobian", "jacobian_logits")
KERNEL_BACKENDS = ["cpu", "torch", "auto"]


def _needs_c(backend):
    if backend == "cpu" and not _cpu.available():
        pytest.skip(f"C kernels unavailable: {_cpu.unavailable_reason()}")


def _args(name, z, v, backend):
    """The op's arguments for logits ``z`` and a vector ``v`` (σ from torch for the
    probability-based ops)."""
    p = torch.softmax(z, -1)
    return {
        "softmax": (z, backend),
        "softmax_vjp": (p, v, backend),
        "softmax_vjp_logits": (z, v, backend),
        "softmax_jacobian": (p, backend),
        "jacobian_logits": (z, backend),
    }[name]


def _expected(name, z, v):
    """float64 reference values from ``torch.softmax`` and dense ``jacrev``."""
    zd, vd = z.double(), v.double()
    jac = torch.func.jacrev(lambda x: torch.softmax(x, -1))
    dense = torch.stack([jac(row) for row in zd.reshape(-1, zd.shape[-1])])
    dense = dense.reshape(*zd.shape, zd.shape[-1])
    return {
        "softmax": torch.softmax(zd, -1),
        "softmax_vjp": (dense @ vd.unsqueeze(-1)).squeeze(-1),
        "softmax_vjp_logits": (dense @ vd.unsqueeze(-1)).squeeze(-1),
        "softmax_jacobian": dense,
        "jacobian_logits": dense,
    }[name]


def test_every_softmax_op_is_registered_in_the_softjac_namespace():
    for name in OPS:
        packet = getattr(torch.ops.softjac, name)
        assert packet.default is getattr(_ops, name)
        schema = str(packet.default._schema)
        assert schema.startswith(f"softjac::{name}(") and "str backend" in schema


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_op_values_match_the_reference(name, backend, dtype):
    _needs_c(backend)
    z = torch.randn(2, 3, 7, dtype=dtype) * 3
    v = torch.randn(2, 3, 7, dtype=dtype)
    out = getattr(_ops, name)(*_args(name, z, v, backend))
    assert out.dtype == dtype
    tol = 1e-13 if dtype == F64 else 1e-6
    torch.testing.assert_close(out.double(), _expected(name, z, v), atol=tol, rtol=0)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """Schema, fake implementation, registered autograd and AOT dispatch of each op."""
    z = torch.randn(3, 5, dtype=F64, requires_grad=True)
    v = torch.randn(3, 5, dtype=F64, requires_grad=True)
    args = _args(name, z, v, "auto")
    args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(_ops, name), args)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_op_gradcheck_and_gradgradcheck(name, backend):
    """Registered autograd against finite differences, to second order (the backward is built
    from the ops again)."""
    _needs_c(backend)
    shape = (2, 3) if "jacobian" in name else (3, 4)
    z = torch.randn(shape, dtype=F64, requires_grad=True)
    v = torch.randn(shape, dtype=F64, requires_grad=True)
    op = getattr(_ops, name)

    def f(z, v):  # σ through torch for the σ-based ops: finite differences stay on the simplex
        return op(*_args(name, z, v, backend))

    assert gradcheck(f, (z, v), fast_mode=True)
    assert gradgradcheck(f, (z, v), fast_mode=True)


@pytest.mark.parametrize("name", OPS)
def test_op_vmap_rule_folds_the_batch_into_rows(name):
    z = torch.randn(4, 3, 6, dtype=F64)
    v = torch.randn(4, 3, 6, dtype=F64)
    op = getattr(_ops, name)

    def f(z, v):
        return op(*_args(name, z, v, "auto"))

    got = torch.func.vmap(f, in_dims=(1, 1))(z, v)
    want = torch.stack([f(z[:, i], v[:, i]) for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-15, rtol=0)
    # one input not vmapped (expanded in the rule)
    got = torch.func.vmap(f, in_dims=(None, 0))(z[0], v)
    want = torch.stack([f(z[0], v[i]) for i in range(4)])
    torch.testing.assert_close(got, want, atol=1e-15, rtol=0)


def test_fake_implementations_give_shape_dtype_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode  # test-only: fake inputs

    with FakeTensorMode():
        z = torch.empty(4, 6, 5).movedim(1, -1)  # class dim not innermost
        p = _ops.softmax_vjp(z, z, "auto")
        assert p.shape == z.shape and p.stride() == z.stride()
        j = _ops.jacobian_logits(torch.empty(2, 3, dtype=torch.bfloat16), "auto")
        assert j.shape == (2, 3, 3) and j.dtype == torch.bfloat16 and j.is_contiguous()


def test_real_outputs_have_the_layout_the_fake_promises():
    if not _cpu.available():
        pytest.skip("C kernels unavailable")
    z = torch.randn(4, 6, 5, dtype=F64)
    p = torch.softmax(z, 1).movedim(1, -1)  # class dim not innermost: read in place
    v = torch.randn(4, 6, 5, dtype=F64).movedim(1, -1)
    out = _ops.softmax_vjp(p, v, "cpu")
    assert out.stride() == torch.empty_like(p).stride() == p.stride()
    torch.testing.assert_close(out, _reference.vjp_ref(z.movedim(1, -1), v), atol=1e-15, rtol=0)


def test_registration_helpers_work_for_a_new_op():
    """``register`` + ``vmap_folding_rows``: what another kernel family (cross-entropy) uses."""

    def impl(x: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return x * scale + rows.unsqueeze(-1)

    def setup(ctx, inputs, output):
        ctx.scale = inputs[2]

    def backward(ctx, g):
        return g * ctx.scale, g.sum(-1), None

    op = _ops.register(
        "_test_scaled_rows",
        "(Tensor x, Tensor rows, float scale) -> Tensor",
        impl,
        fake=_ops.fake_like(0),
        backward=backward,
        setup_context=setup,
        vmap=None,
    )
    torch.library.register_vmap(op, _ops.vmap_folding_rows(op, row_args=(0, 1)))
    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    r = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert gradcheck(lambda x, r: op(x, r, 2.0), (x, r))
    got = torch.func.vmap(lambda x, r: op(x, r, 2.0))(x.detach(), r.detach())
    torch.testing.assert_close(got, x.detach() * 2 + r.detach().unsqueeze(-1))
    assert torch.ops.softjac._test_scaled_rows.default is op


# ---------------------------------------------------------------------------------------------
# dispatch: one decision, recorded or raised
# ---------------------------------------------------------------------------------------------


def test_info_names_a_backend_and_a_reason_for_every_op():
    got = dispatch.info()
    assert set(got) == set(dispatch.OPS)
    for cases in got.values():
        assert "cpu float32" in cases and "cpu float64" in cases
        for case in cases.values():
            assert case["backend"] in ("torch", "cpu", "triton") and case["reason"]
    want = "cpu" if _cpu.available() else "torch"
    assert got["softmax_vjp"]["cpu float32"]["backend"] == want
    assert got["softmax"]["cpu float64"]["backend"] == "torch"  # no float64 C softmax


def test_dispatch_records_the_op_when_inputs_require_grad():
    if not _cpu.available():
        pytest.skip("C kernels unavailable")
    z = torch.randn(3, 5, dtype=F64, requires_grad=True)
    v = torch.randn(3, 5, dtype=F64, requires_grad=True)
    out = dispatch.softmax_vjp(torch.softmax(z, -1), v, backend="cpu")
    assert out.grad_fn is not None
    # σ from torch, so that finite differences stay on the simplex
    assert gradcheck(
        lambda z, v: dispatch.softmax_vjp(torch.softmax(z, -1), v, backend="cpu"), (z, v)
    )


def test_dispatch_never_drops_a_forward_mode_tangent():
    import torch.autograd.forward_ad as fwd

    z = torch.randn(3, 5, dtype=F64)
    t = torch.randn(3, 5, dtype=F64)
    with fwd.dual_level():
        dual = fwd.make_dual(z, t)
        got = fwd.unpack_dual(dispatch.softmax(dual)).tangent  # auto: PyTorch code records it
        with pytest.raises(RuntimeError, match=r"`softjac.softmax`: backend 'cpu' cannot record"):
            dispatch.softmax(dual, backend="cpu")
    p = torch.softmax(z, -1)
    torch.testing.assert_close(got, p * (t - (p * t).sum(-1, keepdim=True)), atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------------------------
# Triton: the exact from-logits VJP kernel and the public API under backend="triton"
# (CPU tensors through the Triton interpreter; tiny sizes)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def triton_kernels(monkeypatch):
    """``softjac.kernels._triton`` under the interpreter (no CUDA here), with
    ``TRITON_INTERPRET=1`` set for the test so that ``backend="triton"`` accepts CPU tensors."""
    import importlib.util
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("these run the interpreter on CPU tensors")
    if "triton" in sys.modules and "softjac.kernels._triton" not in sys.modules:
        pytest.skip("triton was imported without the interpreter in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when triton is first imported
    from softjac.kernels import _triton

    return _triton


@pytest.mark.parametrize("k,threshold,chunk", [(5, 8192, 4096), (37, 8192, 4096), (40, 16, 8)])
def test_triton_exact_vjp_from_logits(triton_kernels, k, threshold, chunk):
    """One-row and split-row paths against the float64 exact formula of ``_core``, relative
    to each entry's size on a row whose argmax dominates (r below float32 eps), and the
    non-finite contract (NaN or +inf → NaN row, fully masked → zeros)."""
    from softjac import _core

    z = torch.randn(5, k, dtype=F64) * 5
    z[1, 3] = float("-inf")
    z[2] = float("-inf")
    z[3, 1] = 60.0  # σ of the others below 1e-20: r < float32 eps
    z = z.float()
    v = torch.randn(5, k).float()
    z[4, 2], z[0, 0] = float("nan"), float("inf")
    got = triton_kernels.softmax_vjp_logits(z, v, split_threshold=threshold, split_chunk=chunk)
    want = _core.vjp_logits_last(z[1:4].double(), v[1:4].double())
    assert got.dtype == torch.float32
    assert got[0].isnan().all() and got[4].isnan().all()
    assert (got[2] == 0).all()
    torch.testing.assert_close(got[1:4].double(), want, atol=1e-6, rtol=0)
    rel = ((got[3].double() - want[2]).abs() / want[2].abs()).max()
    assert rel < 1e-5, rel  # every entry, even those of size 1e-27, to float32 accuracy


_TRITON_PUBLIC = {
    "softmax": lambda z, v: softjac.softmax(z, dim=0, backend="triton"),
    "vjp": lambda z, v: softjac.vjp(z, v, backend="triton"),
    "jvp": lambda z, v: softjac.jvp(z, v, dim=0, backend="triton"),
    "vjp_from_probs": lambda z, v: softjac.vjp_from_probs(
        torch.softmax(z, -1), v, backend="triton"
    ),
    "jacobian": lambda z, v: softjac.jacobian(z, backend="triton"),
}
# The kernels compute in float32: float32-sized finite-difference step and tolerances.
_TRITON_TOL = dict(eps=1e-3, atol=2e-3, rtol=2e-3, fast_mode=True)


@pytest.mark.parametrize("name", list(_TRITON_PUBLIC))
def test_triton_backend_records_every_derivative(triton_kernels, name):
    """The public functions under backend="triton": reverse mode, forward mode with dual
    tensors and batched gradients, against finite differences."""
    z = torch.randn(2, 3, dtype=F64, requires_grad=True)
    v = torch.randn(2, 3, dtype=F64, requires_grad=True)
    f = _TRITON_PUBLIC[name]
    assert f(z, v).grad_fn is not None
    assert gradcheck(f, (z, v), check_forward_ad=True, check_batched_grad=True, **_TRITON_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_TRITON_PUBLIC))
def test_triton_backend_second_order(triton_kernels, name):
    """gradgradcheck (reverse over reverse, forward over reverse) under backend="triton"
    (slow under the interpreter: tens of seconds each)."""
    z = torch.randn(2, 3, dtype=F64, requires_grad=True)
    v = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert gradgradcheck(_TRITON_PUBLIC[name], (z, v), check_fwd_over_rev=True, **_TRITON_TOL)
