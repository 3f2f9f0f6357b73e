"""The autograd Functions of ``softjac._autograd``: softmax and cross-entropy.

References are independent of softjac: ``torch.softmax`` / ``F.cross_entropy`` and their
autograd, ``torch.func`` transforms of them, and finite differences (``gradcheck``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.func import hessian, jacfwd, jacrev

import softjac
from softjac._autograd import SoftmaxLast, cross_entropy_rows, softmax_last_autograd
from softjac._functional import hessian as sj_hessian
from softjac._functional import hvp as sj_hvp

F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# absolute tolerances on σ-sized quantities, per dtype (half: values are rounded on output)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# second derivatives for O(1) cotangents (half: the first derivative is rounded to the dtype)
HESS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-1, torch.float16: 1e-2}


def local_softmax(logits, dim=-1, *, mask=None, temperature=1.0):
    """What ``softjac.softmax`` does once wired to the Function: move ``dim`` last, mask,
    scale, compute in ≥ float32 and return the input dtype."""
    z = logits.movedim(dim, -1)
    if temperature != 1.0:
        z = z / temperature
    if mask is not None:
        z = z.masked_fill(~torch.broadcast_to(mask, logits.shape).movedim(dim, -1), float("-inf"))
    return softmax_last_autograd(z).movedim(-1, dim)


def ref_softmax(logits, dim=-1, *, mask=None, temperature=1.0):
    z = logits.double() / temperature
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    return torch.softmax(z, dim)


# ---------------------------------------------------------------------------------------------
# softmax: gradcheck and gradgradcheck (finite differences, float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 2), (4, 1), (3, 2)])
def test_softmax_gradcheck(shape):
    z = torch.randn(shape, dtype=F64, requires_grad=True)
    assert gradcheck(
        softmax_last_autograd,
        (z,),
        check_forward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 2)])
def test_softmax_gradgradcheck(shape):
    z = torch.randn(shape, dtype=F64, requires_grad=True)
    assert gradgradcheck(
        softmax_last_autograd,
        (z,),
        check_fwd_over_rev=True,
        check_rev_over_rev=True,
        check_batched_grad=True,
    )


def test_softmax_gradcheck_with_dim_mask_temperature():
    z = torch.randn(3, 5, 2, dtype=F64, requires_grad=True)
    mask = torch.rand(3, 5, 1) > 0.3
    mask[:, 0] = True  # every slice keeps an entry (finite differences need a finite output)

    def f(z):
        return local_softmax(z, 1, mask=mask, temperature=0.7)

    assert gradcheck(f, (z,), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(f, (z,), check_batched_grad=True)


# ---------------------------------------------------------------------------------------------
# softmax: agreement with torch.softmax for values, first and second derivatives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_softmax_matches_torch_first_and_second_derivatives(dtype, dim, temperature):
    gen = torch.Generator().manual_seed(11)
    x = (3 * torch.randn(4, 6, 5, generator=gen)).to(dtype)
    g = torch.randn(4, 6, 5, generator=gen).to(dtype)
    h = torch.randn(4, 6, 5, generator=gen, dtype=F64)
    z = x.clone().requires_grad_()
    p = local_softmax(z, dim, temperature=temperature)
    assert p.dtype == dtype
    (gz,) = torch.autograd.grad(p, z, g, create_graph=True)
    assert gz.dtype == dtype
    (hz,) = torch.autograd.grad(gz, z, h.to(dtype))

    zr = x.double().requires_grad_()
    pr = ref_softmax(zr, dim, temperature=temperature)
    (gr,) = torch.autograd.grad(pr, zr, g.double(), create_graph=True)
    (hr,) = torch.autograd.grad(gr, zr, h)
    tol = TOL[dtype]
    torch.testing.assert_close(p.double(), pr, atol=tol, rtol=0)
    # first derivatives are O(|g|) and second O(|g||h|): scale the tolerance a little
    torch.testing.assert_close(gz.double(), gr, atol=8 * tol, rtol=0)
    torch.testing.assert_close(hz.double(), hr, atol=HESS_TOL[dtype] / temperature, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_partial_mask_matches_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=gen, dtype=dtype)
    mask = torch.rand(5, 7, generator=gen) > 0.4
    mask[:, 2] = True
    g = torch.randn(5, 7, generator=gen, dtype=dtype)
    z = x.clone().requires_grad_()
    p = local_softmax(z, mask=mask, temperature=2.0)
    (gz,) = torch.autograd.grad(p, z, g)
    zr = x.double().requires_grad_()
    pr = ref_softmax(zr, mask=mask, temperature=2.0)
    (gr,) = torch.autograd.grad(pr, zr, g.double())
    torch.testing.assert_close(p.double(), pr, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(gz.double(), gr, atol=4 * TOL[dtype], rtol=0)
    assert (p[~mask] == 0).all() and (gz[~mask] == 0).all()


def test_fully_masked_rows_give_zeros_where_torch_gives_nan():
    x = torch.randn(3, 4, dtype=F64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False  # row 1 fully masked
    z = x.clone().requires_grad_()
    p = local_softmax(z, mask=mask)
    (gz,) = torch.autograd.grad(p, z, torch.randn(3, 4, dtype=F64), create_graph=True)
    (hz,) = torch.autograd.grad(gz.sum(), z)
    assert (p[1] == 0).all() and (gz[1] == 0).all() and (hz[1] == 0).all()
    assert torch.isfinite(p).all() and torch.isfinite(gz).all() and torch.isfinite(hz).all()
    torch.testing.assert_close(p[[0, 2]], torch.softmax(x[[0, 2]], -1), atol=1e-15, rtol=0)
    # the reference poisons the batch: NaN in the masked row, so any loss over the batch is NaN
    pt = torch.softmax(x.masked_fill(~mask, float("-inf")), -1)
    assert torch.isnan(pt[1]).all() and torch.isnan(pt.sum())
    assert torch.isfinite(p.sum())


def test_all_minus_inf_input_row():
    z = torch.tensor([[float("-inf")] * 3, [0.0, 1.0, float("-inf")]], dtype=F64)
    z.requires_grad_()
    p = softmax_last_autograd(z)
    p.backward(torch.ones_like(p))
    assert (p[0] == 0).all() and (z.grad == 0).all()
    torch.testing.assert_close(p[1], torch.softmax(z[1].detach(), -1), atol=1e-15, rtol=0)


def test_backward_keeps_the_argmax_entry_accurate():
    # foundation issue's example: autograd through torch.softmax returns 0 here
    z = torch.tensor([37.42994775023705, 0.0], dtype=F64, requires_grad=True)
    p = softmax_last_autograd(z)
    (g,) = torch.autograd.grad(p, z, torch.tensor([1.0, 0.0], dtype=F64))
    assert abs(g[0].item()) == pytest.approx(5.551115123125775e-17, rel=1e-15)
    assert g[0].item() == -g[1].item()
    zt = z.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(torch.softmax(zt, -1), zt, torch.tensor([1.0, 0.0], dtype=F64))
    assert gt[0].item() == 0.0  # PyTorch's backward cancels to zero


def test_only_sigma_is_saved():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    z = torch.randn(4, 6, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        p = SoftmaxLast.apply(z, "auto")
    assert len(saved) == 1 and torch.equal(saved[0], p)


def test_softmax_explicit_backends():
    z = torch.randn(3, 5, requires_grad=True)
    p = softmax_last_autograd(z, backend="torch")
    p.backward(torch.ones_like(p))
    torch.testing.assert_close(z.grad, torch.zeros_like(z), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"`softjac\.softmax`: `backend` must be one of"):
        softmax_last_autograd(z, backend="nope")
    with pytest.raises(ValueError, match=r"`softjac\.cross_entropy`: `backend` must be one of"):
        softjac.cross_entropy(z.double(), torch.tensor([0, 1, 2]), backend="nope")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_kernel_backends_agree_with_torch(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels are float32/half kernels")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 33, generator=gen, dtype=F64)
    g = torch.randn(7, 33, generator=gen, dtype=F64)
    z = x.to(dtype).requires_grad_()
    try:
        p = softmax_last_autograd(z, backend=backend)
        (gz,) = torch.autograd.grad(p, z, g.to(dtype), create_graph=True)
        (hz,) = torch.autograd.grad(gz.square().sum(), z)
    except RuntimeError as err:
        pytest.skip(f"backend {backend!r} cannot run here: {err}")
    zr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(torch.softmax(zr, -1), zr, g, create_graph=True)
    (hr,) = torch.autograd.grad(gr.square().sum(), zr)
    torch.testing.assert_close(gz.double(), gr, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(hz.double(), hr, atol=10 * TOL[dtype], rtol=0)


def test_softmax_non_contiguous_input():
    x = torch.randn(5, 4, 6, dtype=F64)
    z = x.transpose(0, 2).requires_grad_()  # (6, 4, 5), non-contiguous, classes last
    g = torch.randn(6, 4, 5, dtype=F64)
    p = softmax_last_autograd(z)
    (gz,) = torch.autograd.grad(p, z, g)
    zr = x.transpose(0, 2).contiguous().requires_grad_()
    (gr,) = torch.autograd.grad(torch.softmax(zr, -1), zr, g)
    torch.testing.assert_close(p, torch.softmax(zr, -1), atol=1e-15, rtol=0)
    torch.testing.assert_close(gz, gr, atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------------------------
# softmax: the second-derivative tensor and hvp against jacfwd(jacrev(torch.softmax))
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_hessian_tensor_and_hvp_against_torch(k):
    gen = torch.Generator().manual_seed(k)
    z = torch.randn(k, generator=gen, dtype=F64)
    ref = jacfwd(jacrev(lambda z: torch.softmax(z, -1)))(z)  # (K, K, K)
    torch.testing.assert_close(hessian(softmax_last_autograd)(z), ref, atol=1e-15, rtol=0)
    torch.testing.assert_close(sj_hessian(z), ref, atol=1e-15, rtol=0)
    w = torch.randn(k, generator=gen, dtype=F64)
    v = torch.randn(k, generator=gen, dtype=F64)
    hv_ref = torch.einsum("i,ijk,k->j", w, ref, v)
    torch.testing.assert_close(sj_hvp(z, w, v), hv_ref, atol=1e-14, rtol=0)
    # the same product by double backward through the Function
    zz = z.clone().requires_grad_()
    (gz,) = torch.autograd.grad(softmax_last_autograd(zz), zz, w, create_graph=True)
    (hv,) = torch.autograd.grad(gz, zz, v)
    torch.testing.assert_close(hv, hv_ref, atol=1e-14, rtol=0)


def test_third_derivative_matches_torch():
    z = torch.randn(4, dtype=F64)
    ours = jacrev(jacrev(jacrev(softmax_last_autograd)))(z)
    ref = jacrev(jacrev(jacrev(lambda z: torch.softmax(z, -1))))(z)
    torch.testing.assert_close(ours, ref, atol=1e-14, rtol=0)


# ---------------------------------------------------------------------------------------------
# cross-entropy Function
# ---------------------------------------------------------------------------------------------

CE_OPTIONS = [
    dict(weight=False, ignore=False, eps=0.0),
    dict(weight=True, ignore=True, eps=0.0),
    dict(weight=True, ignore=True, eps=0.3),
    dict(weight=False, ignore=True, eps=1.0),
]


def _ce_inputs(opt, n=4, k=5, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=gen, dtype=dtype)
    t = torch.randint(0, k, (n,), generator=gen)
    if opt["ignore"]:
        t[1] = -100
    w = torch.rand(k, generator=gen, dtype=F64) + 0.1 if opt["weight"] else None
    return z, t, w


@pytest.mark.parametrize("opt", CE_OPTIONS)
def test_cross_entropy_rows_gradcheck_and_gradgradcheck(opt):
    z, t, w = _ce_inputs(opt)
    z.requires_grad_()

    def f(z):
        return cross_entropy_rows(z, t, w, -100, opt["eps"])

    assert gradcheck(
        f, (z,), check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
    )
    assert gradgradcheck(f, (z,), check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("opt", CE_OPTIONS)
def test_cross_entropy_rows_values_grad_hessian_match_torch(opt):
    z, t, w = _ce_inputs(opt, seed=1)
    eps = opt["eps"]
    rows = cross_entropy_rows(z, t, w, -100, eps)
    ref_rows = F.cross_entropy(z, t, weight=w, label_smoothing=eps, reduction="none")
    torch.testing.assert_close(rows, ref_rows, atol=1e-14, rtol=0)

    def ours(z):
        return cross_entropy_rows(z, t, w, -100, eps).sum()

    def ref(z):
        return F.cross_entropy(z, t, weight=w, label_smoothing=eps, reduction="sum")

    torch.testing.assert_close(jacrev(ours)(z), jacrev(ref)(z), atol=1e-14, rtol=0)
    h_ref = hessian(ref)(z)
    torch.testing.assert_close(jacrev(jacrev(ours))(z), h_ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(jacfwd(jacrev(ours))(z), h_ref, atol=1e-14, rtol=0)


def test_cross_entropy_hessian_depends_on_grad_output():
    # d/dg of the backward: mixed second derivative ∂²(g·loss)/∂g∂z = a σ − b per row
    z, t, w = _ce_inputs(dict(weight=True, ignore=True, eps=0.2), seed=2)
    g = torch.rand(4, dtype=F64, requires_grad=True)

    def f(g, z):
        return cross_entropy_rows(z, t, w, -100, 0.2)

    def mixed(fun):
        def grad_z(g, z):
            return torch.func.vjp(lambda z: fun(g, z), z)[1](g)[0]

        return jacrev(grad_z, argnums=0)(g.detach(), z)

    def fr(g, z):
        return F.cross_entropy(z, t, weight=w, label_smoothing=0.2, reduction="none")

    torch.testing.assert_close(mixed(f), mixed(fr), atol=1e-14, rtol=0)
    zz = z.clone().requires_grad_()
    assert gradgradcheck(
        lambda z, g: cross_entropy_rows(z, t, w, -100, 0.2) * g, (zz, g), check_batched_grad=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_rows_low_precision(dtype):
    z64, t, w = _ce_inputs(dict(weight=True, ignore=True, eps=0.1), n=6, k=9, seed=4)
    z = (3 * z64).to(dtype).requires_grad_()
    before = z.detach().clone()
    rows = cross_entropy_rows(z, t, w.to(dtype), -100, 0.1)
    assert rows.dtype == torch.float32
    rows.sum().backward()
    assert z.grad.dtype == dtype
    assert torch.equal(z.detach(), before)  # never in place on the logits
    zr = z.detach().double().requires_grad_()
    ref = F.cross_entropy(zr, t, weight=w.to(dtype).double(), label_smoothing=0.1, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(rows.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), zr.grad, atol=TOL[dtype], rtol=0)


def test_public_cross_entropy_uses_the_function():
    z = torch.randn(3, 4, requires_grad=True)
    loss = softjac.cross_entropy(z, torch.tensor([0, 1, 2]), reduction="none")
    # the graph contains the fused Function, not nll_loss/log_softmax
    names = []
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert any("CrossEntropyRows" in n for n in names)
    assert not any("LogSoftmax" in n or "Nll" in n for n in names)


# ---------------------------------------------------------------------------------------------
# needs the lead's wiring of softjac.softmax to SoftmaxLast (issue 4 §1)
# ---------------------------------------------------------------------------------------------


class TestPublicSoftmaxWiring:
    def test_softmax_is_backed_by_the_function(self):
        z = torch.randn(3, 5, requires_grad=True)
        p = softjac.softmax(z, dim=0, temperature=2.0)
        names = []
        stack = [p.grad_fn]
        while stack:
            node = stack.pop()
            if node is None:
                continue
            names.append(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
        assert any("SoftmaxLast" in n for n in names), names

    def test_public_softmax_double_backward_and_masks(self):
        x = torch.randn(4, 6, dtype=F64)
        mask = torch.rand(4, 6) > 0.3
        mask[:, 0] = True
        mask[2] = False
        z = x.clone().requires_grad_()
        p = softjac.softmax(z, mask=mask, temperature=0.5)
        g = torch.randn(4, 6, dtype=F64)
        (gz,) = torch.autograd.grad(p, z, g, create_graph=True)
        (hz,) = torch.autograd.grad(gz.square().sum(), z)
        keep = [0, 1, 3]
        zr = x[keep].clone().requires_grad_()
        pr = ref_softmax(zr, mask=mask[keep], temperature=0.5)
        (gr,) = torch.autograd.grad(pr, zr, g[keep], create_graph=True)
        (hr,) = torch.autograd.grad(gr.square().sum(), zr)
        torch.testing.assert_close(gz[keep], gr, atol=1e-13, rtol=0)
        torch.testing.assert_close(hz[keep], hr, atol=1e-12, rtol=0)
        assert (p[2] == 0).all() and (gz[2] == 0).all() and (hz[2] == 0).all()
        assert gradgradcheck(
            lambda z: softjac.softmax(z, dim=0, temperature=0.5),
            (x[:, :3].clone().requires_grad_(),),
            check_fwd_over_rev=True,
        )


def test_vmap_over_class_weights_is_refused_clearly():
    z = torch.randn(3, 4, dtype=F64)
    t = torch.tensor([0, 1, 3])
    weights = torch.rand(2, 4, dtype=F64)
    with pytest.raises(NotImplementedError, match="vmap over `weight`"):
        torch.func.vmap(lambda w: softjac.cross_entropy(z, t, weight=w))(weights)


# ---------------------------------------------------------------------------------------------
# No derivative dropped: every public function, every backend, reverse and forward mode
# ---------------------------------------------------------------------------------------------

_PUBLIC = {
    "softmax": lambda z, v, b: softjac.softmax(z, dim=0, temperature=0.7, backend=b),
    "vjp": lambda z, v, b: softjac.vjp(z, v, dim=0, backend=b),
    "jvp": lambda z, v, b: softjac.jvp(z, v, temperature=1.5, backend=b),
    # σ through torch: finite differences of z stay on the simplex
    "vjp_from_probs": lambda z, v, b: softjac.vjp_from_probs(torch.softmax(z, 0), v, 0, backend=b),
    "jacobian": lambda z, v, b: softjac.jacobian(z, temperature=2.0, backend=b),
    "hvp": lambda z, v, b: softjac.hvp(z, v, v.flip(-1)),  # no backend: PyTorch code
}


def _cpu_or_skip(backend):
    from softjac.kernels import _cpu

    if backend == "cpu" and not _cpu.available():
        pytest.skip(f"C kernels unavailable: {_cpu.unavailable_reason()}")


@pytest.mark.parametrize("name", list(_PUBLIC))
@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_public_functions_record_every_derivative(name, backend):
    """gradcheck (reverse, forward mode with dual tensors, batched) and gradgradcheck of each
    public differentiable function under each backend, against finite differences."""
    _cpu_or_skip(backend)
    if name == "hvp" and backend != "auto":
        pytest.skip("hvp has no backend argument")
    z = torch.randn(2, 3, dtype=F64, requires_grad=True)
    v = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def f(z, v):
        return _PUBLIC[name](z, v, backend)

    # fast mode: the Jacobians are compared along random directions (what keeps this fast)
    assert gradcheck(f, (z, v), check_forward_ad=True, check_batched_grad=True, fast_mode=True)
    assert gradgradcheck(
        f, (z, v), check_fwd_over_rev=True, check_batched_grad=True, fast_mode=True
    )


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("fn", ["vjp", "vjp_from_probs", "jacobian", "softmax"])
def test_explicit_kernel_backend_records_the_graph(fn, backend):
    _cpu_or_skip(backend)
    z = torch.randn(3, 5, requires_grad=True)
    v = torch.randn(3, 5)
    out = _PUBLIC[fn](z, v, backend)
    assert out.grad_fn is not None
    w = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, z, w)
    zr = z.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_PUBLIC[fn](zr, v.double(), "torch"), zr, w.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("shape,dim", [((5,), 0), ((5, 5), 0), ((2, 4, 3), -1), ((2, 4, 3), 1)])
def test_vjp_from_probs_on_softmax_backward_data_samples(shape, dim, backend):
    """The samples PyTorch checks ``_softmax_backward_data`` with (grad_output, output =
    softmax(input, dim)), both differentiated independently: forward-mode tangents are kept
    under every backend and the derivative in σ is that of the product as computed (which
    evaluates the argmax entry without cancellation), also off the simplex."""
    _cpu_or_skip(backend)
    out = torch.softmax(torch.randn(shape, dtype=F64), dim).requires_grad_()
    g = torch.randn(shape, dtype=F64, requires_grad=True)

    def f(g, out):
        return softjac.vjp_from_probs(out, g, dim, backend=backend)

    assert gradcheck(
        f,
        (g, out),
        check_forward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
        fast_mode=True,
    )
    assert gradgradcheck(f, (g, out), check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_dual_tensors_through_the_public_functions(backend):
    import torch.autograd.forward_ad as fwd

    _cpu_or_skip(backend)
    z = torch.randn(4, 6, dtype=F64)
    v = torch.randn(4, 6, dtype=F64)
    t = torch.randn(4, 6, dtype=F64)

    def ref(z, v):
        p = torch.softmax(z, -1)
        return p * (v - (p * v).sum(-1, keepdim=True))

    _, want = torch.func.jvp(ref, (z, v), (t, t))
    with fwd.dual_level():
        got = fwd.unpack_dual(
            softjac.vjp(fwd.make_dual(z, t), fwd.make_dual(v, t), backend=backend)
        )
        assert got.tangent is not None
        torch.testing.assert_close(got.tangent, want, atol=1e-14, rtol=0)
        jd = fwd.unpack_dual(softjac.jacobian(fwd.make_dual(z, t), backend=backend)).tangent
    _, jwant = torch.func.jvp(_dense, (z,), (t,))
    torch.testing.assert_close(jd, jwant, atol=1e-14, rtol=0)


def _dense(z):
    p = torch.softmax(z, -1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
