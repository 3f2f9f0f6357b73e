"""``softjac.cross_entropy`` over a class dim that is not the last one (``dim=1`` of NCHW data):
the C kernel reads the contiguous ``(B, K, M)`` layout in place (no copy of the logits into
rows, the gradient written straight in the input's layout); every backend against
``torch.nn.functional.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softjac
from softjac.kernels import _cpu, dispatch

F64 = torch.float64
INF, NAN = float("inf"), float("nan")

SHAPES = [
    ((2, 5, 3, 4), 1),  # NCHW, M = 12 (no whole vector: the scalar columns)
    ((3, 21, 40), 1),  # M = 40: whole vectors and a scalar rest
    ((2, 7, 300), 1),  # M = 300: more than one tile of columns
    ((1, 600, 20), 1),  # K = 600 > 512: two blocks of the blocked sums
    ((6, 33), 0),  # 2-D logits with the classes first: B = 1, M = 33
    ((2, 3, 5, 4), 2),  # classes in dim 2 of 4
]


def _inputs(shape, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)
    k = shape[d]
    tshape = shape[:d] + shape[d + 1 :]
    t = torch.randint(0, k, tshape, generator=gen)
    t.view(-1)[1] = -100
    w = torch.rand(k, generator=gen, dtype=F64).to(dtype) + 0.5
    return z, t, w


def _to_f(x, d):
    """F.cross_entropy wants the classes at dim 1."""
    return x.movedim(d, 1) if x.ndim > 1 else x


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize(("shape", "d"), SHAPES, ids=str)
@pytest.mark.parametrize("opts", ["plain", "weight+smoothing"])
def test_class_dim_in_the_middle_matches_torch(backend, shape, d, opts):
    z, t, w = _inputs(shape, d, torch.float32)
    kw: dict = {} if opts == "plain" else {"weight": w, "label_smoothing": 0.15}
    for reduction in ("mean", "none"):
        zs = z.clone().requires_grad_()
        loss = softjac.cross_entropy(zs, t, dim=d, reduction=reduction, backend=backend, **kw)
        g_out = torch.rand_like(loss) if reduction == "none" else None
        (g,) = torch.autograd.grad(loss, zs, g_out)
        zr = z.double().requires_grad_()
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        ref = F.cross_entropy(_to_f(zr, d), t, reduction=reduction, **kw64)
        (gref,) = torch.autograd.grad(ref, zr, None if g_out is None else g_out.double())
        torch.testing.assert_close(loss.double(), ref, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(g.double(), gref, atol=2e-7, rtol=1e-5)
        assert g.shape == z.shape and g.dtype == z.dtype
        direct = softjac.cross_entropy_grad(z, t, dim=d, reduction=reduction, backend=backend, **kw)
        if reduction == "mean":
            torch.testing.assert_close(direct.double(), gref, atol=2e-7, rtol=1e-5)


def test_the_c_kernel_reads_the_layout_in_place(monkeypatch):
    """On CPU float32 the row kernels (which need the logits copied into rows) are not
    called for dim=1 of contiguous NCHW logits, and the result equals the row path's."""
    if not _cpu.available():
        pytest.skip(f"no C kernel: {_cpu.unavailable_reason()}")
    z, t, _ = _inputs((2, 5, 3, 4), 1, torch.float32)
    ref_z = z.clone().requires_grad_()
    ref = softjac.cross_entropy(ref_z, t, backend="torch")
    ref.backward()

    calls = []

    def refuse(*args, **kwargs):
        raise AssertionError("the row kernel was called")

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(_cpu, "cross_entropy_forward", refuse)
    monkeypatch.setattr(_cpu, "cross_entropy_backward", refuse)
    monkeypatch.setattr(_cpu, "cross_entropy_forward_inner", spy(_cpu.cross_entropy_forward_inner))
    monkeypatch.setattr(
        _cpu, "cross_entropy_backward_inner", spy(_cpu.cross_entropy_backward_inner)
    )
    zs = z.clone().requires_grad_()
    loss = softjac.cross_entropy(zs, t)
    loss.backward()
    assert calls == ["cross_entropy_forward_inner", "cross_entropy_backward_inner"]
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(zs.grad, ref_z.grad, atol=1e-7, rtol=1e-5)


def test_non_contiguous_logits_take_the_row_path():
    z, t, _ = _inputs((2, 4, 6), 1, torch.float32)
    zt = z.transpose(0, 2).contiguous().transpose(0, 2)  # same values, not contiguous
    assert not zt.is_contiguous()
    torch.testing.assert_close(
        softjac.cross_entropy(zt, t, reduction="none"), F.cross_entropy(z, t, reduction="none")
    )


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_non_finite_and_ignored_columns_in_the_layout(backend):
    z, t, _ = _inputs((2, 4, 5), 1, torch.float32)
    z[0, 1, 0] = NAN  # a NaN in column (0, 0)
    z[0, 0, 1] = INF  # a +inf in column (0, 1)
    z[0, :, 2] = -INF  # a fully masked column
    z[1, 2, 3] = -INF  # one masked class
    z[1, 0, 4] = NAN  # a NaN in an ignored column
    t[0, :3] = torch.tensor([1, 1, 0])
    t[1, 3] = 2  # the masked class is the target: loss +inf
    t[1, 4] = -100
    zs = z.clone().requires_grad_()
    loss = softjac.cross_entropy(zs, t, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(loss.sum(), zs)
    zr = z.clone().requires_grad_()
    ref = F.cross_entropy(zr, t, reduction="none")
    (gref,) = torch.autograd.grad(ref.sum(), zr)
    gref[1, :, 4] = 0.0  # an ignored column's gradient is exactly 0 (torch: NaN)
    assert torch.equal(loss.isnan(), ref.isnan()) and torch.equal(g.isnan(), gref.isnan())
    fin = ~ref.isnan()
    assert torch.equal(loss[fin].isinf(), ref[fin].isinf())
    torch.testing.assert_close(loss.nan_to_num(0, 1e30), ref.nan_to_num(0, 1e30))
    torch.testing.assert_close(g.nan_to_num(0), gref.nan_to_num(0), atol=1e-6, rtol=1e-5)
    assert loss[1, 4] == 0 and (g[1, :, 4] == 0).all()


def test_dim1_gradcheck_and_gradgradcheck_float64():
    z, t, w = _inputs((2, 4, 3), 1, F64)
    z.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: softjac.cross_entropy(z, t, weight=w, label_smoothing=0.1, reduction="none"),
        (z,),
        check_forward_ad=True,
        check_batched_grad=True,
    )
    assert torch.autograd.gradgradcheck(lambda z: softjac.cross_entropy(z, t, weight=w), (z,))


def test_dim1_float32_double_backward_uses_the_layout_too():
    """Second derivatives through the (B, K, M) path against torch's."""
    z, t, w = _inputs((2, 4, 3), 1, torch.float32)
    v = torch.randn_like(z)

    def hvp(fn):
        x = z.double().clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v.double()).sum(), x)
        return h

    x32 = z.clone().requires_grad_()
    (g32,) = torch.autograd.grad(softjac.cross_entropy(x32, t, weight=w), x32, create_graph=True)
    (h32,) = torch.autograd.grad((g32 * v).sum(), x32)
    ref = hvp(lambda x: F.cross_entropy(x, t, weight=w.double()))
    torch.testing.assert_close(h32.double(), ref, atol=1e-6, rtol=1e-5)


def test_dispatch_inner_layout_keeps_the_old_lse_form():
    """``dispatch.cross_entropy_backward`` on (B, K, M) logits accepts one lse tensor, as for
    rows."""
    z, t, _ = _inputs((2, 4, 3), 1, torch.float32)
    loss, lse = dispatch.cross_entropy_forward(z, t, None, -100, 0.0)
    assert loss.shape == (2, 3) and lse.shape == (2, 3)
    ref = F.cross_entropy(z, t, reduction="none")
    torch.testing.assert_close(loss, ref)
    g = dispatch.cross_entropy_backward(z, t, lse, torch.ones(2, 3), None, -100, 0.0)
    zr = z.clone().requires_grad_()
    F.cross_entropy(zr, t, reduction="sum").backward()
    torch.testing.assert_close(g, zr.grad, atol=1e-6, rtol=1e-5)
