"""``softjac.cross_entropy``, ``cross_entropy_grad``, ``cross_entropy_hessian`` and
``fisher_sqrt`` against ``torch.nn.functional.cross_entropy``, its autograd and
``torch.func.hessian`` of it, and dense matrices built independently."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import softjac

F64 = torch.float64

# (logits shape, class dim) — classic (N, K), spatial (N, C, d1), classes last of a 3-D
# tensor, and 1-D logits with a 0-d target
LAYOUTS = [((6, 5), 1), ((3, 4, 2), 1), ((2, 3, 4), -1), ((5,), 1)]
OPTIONS = list(
    itertools.product(
        [False, True],  # weight
        [False, True],  # an ignored sample (class targets only)
        [0.0, 0.3],  # label smoothing
        ["mean", "sum", "none"],
        ["index", "probs"],
    )
)


def _case(layout, opt, dtype=F64, seed=0):
    """Logits, target and kwargs for one option combination, plus the same for F (classes
    moved to dim 1 where F expects them)."""
    (shape, dim) = layout
    use_w, ignore, eps, reduction, kind = opt
    gen = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)
    nd = len(shape)
    d = 0 if nd == 1 else dim % nd
    k = shape[d]
    if kind == "index":
        tshape = shape[:d] + shape[d + 1 :]
        target = torch.randint(0, k, tshape, generator=gen)
        if ignore:
            target.view(-1)[0] = -100
    else:
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=F64), d).to(dtype)
    w = (torch.rand(k, generator=gen, dtype=F64) + 0.2).to(dtype) if use_w else None
    kw = dict(weight=w, label_smoothing=eps, reduction=reduction)
    to_f = (lambda x: x) if nd == 1 else (lambda x: x.movedim(d, 1))
    return z, target, dim, kw, to_f, d


def _f_target(target, to_f, kind):
    return to_f(target) if kind == "probs" else target


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}d{l[1]}")
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(map(str, o)))
def test_cross_entropy_and_grad_match_torch(layout, opt):
    kind = opt[4]
    z, target, dim, kw, to_f, _ = _case(layout, opt)
    zs = z.clone().requires_grad_()
    zr = z.clone().requires_grad_()
    out = softjac.cross_entropy(zs, target, dim, **kw)
    ref = F.cross_entropy(to_f(zr), _f_target(target, to_f, kind), **kw)
    if kw["reduction"] == "none" and kind == "index" and len(layout[0]) > 1:
        assert out.shape == target.shape
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=1e-13, equal_nan=True)
    cot = torch.rand(ref.shape, dtype=F64) + 0.5
    (g_ref,) = torch.autograd.grad(ref, zr, cot, retain_graph=True)
    (g_auto,) = torch.autograd.grad(out, zs, cot)
    torch.testing.assert_close(g_auto, g_ref, atol=1e-14, rtol=0)
    # the direct gradient of the (summed, for 'none') loss
    (g_sum,) = torch.autograd.grad(ref.sum(), zr)
    g_direct = softjac.cross_entropy_grad(z, target, dim, **kw)
    assert g_direct.shape == z.shape and g_direct.dtype == z.dtype
    torch.testing.assert_close(g_direct, g_sum, atol=1e-14, rtol=0)


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o[3] != "none"][::3])
def test_second_derivatives_match_torch(opt):
    kind = opt[4]
    z, target, dim, kw, to_f, _ = _case(((4, 3, 2), 1), opt, seed=3)

    def ours(z):
        return softjac.cross_entropy(z, target, dim, **kw)

    def ref(z):
        return F.cross_entropy(to_f(z), _f_target(target, to_f, kind), **kw)

    torch.testing.assert_close(hessian(ours)(z), hessian(ref)(z), atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_low_precision_matches_torch(dtype, kind):
    opt = (True, True, 0.1, "mean", kind)
    z, target, dim, kw, to_f, _ = _case(((8, 7), 1), opt, dtype=dtype, seed=5)
    zs = z.clone().requires_grad_()
    out = softjac.cross_entropy(zs, target, dim, **kw)
    assert out.dtype == dtype
    out.backward()
    assert zs.grad.dtype == dtype
    # reference: the same (rounded) inputs in float64
    zr = z.double().requires_grad_()
    kw64 = dict(kw, weight=kw["weight"].double())
    ref = F.cross_entropy(zr, _f_target(target, to_f, kind).double()
                          if kind == "probs" else target, **kw64)  # fmt: skip
    ref.backward()
    loss_tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), atol=0, rtol=loss_tol)
    grad_tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    torch.testing.assert_close(zs.grad.double(), zr.grad, atol=grad_tol, rtol=0)
    g_direct = softjac.cross_entropy_grad(z, target, dim, **kw)
    assert g_direct.dtype == dtype
    torch.testing.assert_close(g_direct.double(), zr.grad, atol=grad_tol, rtol=0)
    # half logits also match PyTorch's own half result
    torch.testing.assert_close(out, F.cross_entropy(z, target, **kw), atol=0, rtol=2 * loss_tol)


def test_all_ignored_mean_is_nan_with_zero_gradient_like_torch():
    z = torch.randn(3, 4, dtype=F64, requires_grad=True)
    t = torch.full((3,), -100)
    zr = z.detach().clone().requires_grad_()
    out = softjac.cross_entropy(z, t)
    ref = F.cross_entropy(zr, t)
    assert torch.isnan(out) and torch.isnan(ref)
    out.backward()
    ref.backward()
    torch.testing.assert_close(z.grad, zr.grad, atol=0, rtol=0)
    torch.testing.assert_close(softjac.cross_entropy_grad(z.detach(), t), zr.grad, atol=0, rtol=0)


def test_empty_batch_like_torch():
    z = torch.randn(0, 4)
    t = torch.zeros(0, dtype=torch.long)
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(
            softjac.cross_entropy(z, t, reduction=red),
            F.cross_entropy(z, t, reduction=red),
            equal_nan=True,
        )


def test_uint8_and_int32_class_targets():
    z = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0, 2, 1, 1])
    ref = F.cross_entropy(z, t)
    torch.testing.assert_close(softjac.cross_entropy(z, t.to(torch.uint8)), ref)
    torch.testing.assert_close(softjac.cross_entropy(z, t.int()), ref)


def test_weight_with_grad_gets_its_gradient():
    # F.cross_entropy refuses a weight that requires grad for class targets; softjac gives
    # its gradient. Reference: the weighted smoothed loss written out with log_softmax.
    z = torch.randn(5, 4, dtype=F64)
    t = torch.tensor([0, 3, -100, 1, 1])
    w = (torch.rand(4, dtype=F64) + 0.5).requires_grad_()
    wr = w.detach().clone().requires_grad_()
    eps, keep = 0.2, t != -100
    loss = softjac.cross_entropy(z, t, weight=w, label_smoothing=eps)
    logp = torch.log_softmax(z[keep], -1)
    tk = t[keep]
    rows = -(1 - eps) * wr[tk] * logp[torch.arange(len(tk)), tk] - eps / 4 * (wr * logp).sum(-1)
    ref = rows.sum() / wr[tk].sum()
    torch.testing.assert_close(loss, ref, atol=1e-14, rtol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-14, rtol=0)


def test_logits_are_never_modified():
    z = torch.randn(6, 9)
    before = z.clone()
    zs = z.clone().requires_grad_()
    softjac.cross_entropy(zs, torch.randint(0, 9, (6,))).backward()
    softjac.cross_entropy_grad(z, torch.randint(0, 9, (6,)))
    assert torch.equal(z, before) and torch.equal(zs.detach(), before)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("func", [softjac.cross_entropy, softjac.cross_entropy_grad])
def test_bad_input(func):
    z = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 0])
    name = func.__name__
    with pytest.raises(TypeError, match=f"`softjac.{name}`: `logits`"):
        func(z.long(), t)
    with pytest.raises(TypeError, match="`target`"):
        func(z, t.bool())
    with pytest.raises(TypeError, match=r"`target` must be a torch\.Tensor"):
        func(z, [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"`target`.*\(4,\).*Got \(3,\)"):
        func(z, t[:3])
    with pytest.raises(ValueError, match="probability `target`"):
        func(z, torch.rand(4, 4))
    with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0, 1\]. Got 1.5"):
        func(z, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="`label_smoothing`"):
        func(z, t, label_smoothing=-0.1)
    with pytest.raises(ValueError, match=r"`reduction` must be one of .* Got 'avg'"):
        func(z, t, reduction="avg")
    with pytest.raises(ValueError, match=r"`weight` must have shape \(3,\)"):
        func(z, t, weight=torch.ones(4))
    with pytest.raises(ValueError, match="`dim`"):
        func(z, t, dim=2)


def test_bad_input_hessian_and_fisher():
    with pytest.raises(ValueError, match=r"`softjac\.cross_entropy_hessian`: `logits`"):
        softjac.cross_entropy_hessian(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="`weight` needs a `target`"):
        softjac.cross_entropy_hessian(torch.randn(2, 3), weight=torch.ones(3))
    with pytest.raises(ValueError, match="`reduction`"):
        softjac.cross_entropy_hessian(torch.randn(2, 3), reduction="avg")
    with pytest.raises(ValueError, match="`num_samples`"):
        softjac.fisher_sqrt(torch.randn(2, 3), num_samples=0)
    with pytest.raises(ValueError, match=r"`x` must have shape \(2, 3\)"):
        softjac.cross_entropy_hessian(torch.randn(2, 3)) @ torch.randn(3, 2)


# ---------------------------------------------------------------------------------------------
# the Hessian operator
# ---------------------------------------------------------------------------------------------


def _dense_jacobians(logits):
    p = torch.softmax(logits, -1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _blocks(h_full):
    """Diagonal (N, K, K) blocks of a (N, K, N, K) Hessian; asserts the rest is zero."""
    n = h_full.shape[0]
    blocks = torch.stack([h_full[i, :, i, :] for i in range(n)])
    off = h_full.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    assert off.abs().max() == 0
    return blocks


HESS_CASES = [
    # (use target, use weight, reduction, probability target)
    (False, False, "mean", False),
    (False, False, "sum", False),
    (True, True, "mean", False),
    (True, True, "sum", False),
    (True, False, "mean", False),
    (True, True, "mean", True),
    (True, False, "sum", True),
]


@pytest.mark.parametrize("case", HESS_CASES)
def test_cross_entropy_hessian_against_torch_hessian(case):
    use_t, use_w, reduction, probs = case
    gen = torch.Generator().manual_seed(9)
    n, k = 5, 4
    z = 2 * torch.randn(n, k, generator=gen, dtype=F64)
    if probs:
        t = torch.softmax(torch.randn(n, k, generator=gen, dtype=F64), -1)
    else:
        t = torch.randint(0, k, (n,), generator=gen)
        t[2] = -100
    w = torch.rand(k, generator=gen, dtype=F64) + 0.2 if use_w else None
    if use_t:
        ref = _blocks(hessian(lambda z: F.cross_entropy(z, t, weight=w, reduction=reduction))(z))
        op = softjac.cross_entropy_hessian(z, t, weight=w, reduction=reduction)
    else:
        # without labels: the Hessian of the loss for any labels (it does not depend on them)
        t_any = torch.randint(0, k, (n,), generator=gen)
        ref = _blocks(hessian(lambda z: F.cross_entropy(z, t_any, reduction=reduction))(z))
        op = softjac.cross_entropy_hessian(z, reduction=reduction)
    assert isinstance(op, softjac.CrossEntropyHessian)
    assert op.shape == (n, k, k) and op.dtype == F64 and op.is_symmetric and op.T is op
    assert op.is_positive_semidefinite
    torch.testing.assert_close(op.to_dense(), ref, atol=1e-15, rtol=0)
    x = torch.randn(n, k, generator=gen, dtype=F64)
    xm = torch.randn(n, k, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(op @ x, torch.einsum("nij,nj->ni", ref, x), atol=1e-15, rtol=0)
    torch.testing.assert_close(op @ xm, ref @ xm, atol=1e-15, rtol=0)
    torch.testing.assert_close(x @ op, torch.einsum("ni,nij->nj", x, ref), atol=1e-15, rtol=0)
    xr = xm.transpose(1, 2)
    torch.testing.assert_close(xr @ op, xr @ ref, atol=1e-15, rtol=0)
    torch.testing.assert_close(op.diagonal(), ref.diagonal(dim1=-2, dim2=-1), atol=1e-16, rtol=0)
    torch.testing.assert_close(
        op.trace(), ref.diagonal(dim1=-2, dim2=-1).sum(-1), atol=1e-15, rtol=0
    )


def test_cross_entropy_hessian_per_sample_none_and_1d():
    z = torch.randn(3, 6, dtype=F64)
    t = torch.tensor([1, -100, 5])
    w = torch.rand(6, dtype=F64)
    op = softjac.cross_entropy_hessian(z, t, weight=w, reduction="none")
    for i in range(3):
        ref = hessian(lambda zi, i=i: F.cross_entropy(zi[None], t[i : i + 1], weight=w,
                                                      reduction="sum"))(z[i])  # fmt: skip
        torch.testing.assert_close(op.to_dense()[i], ref, atol=1e-15, rtol=0)
    op1 = softjac.cross_entropy_hessian(z[0])
    torch.testing.assert_close(op1.to_dense()[0], _dense_jacobians(z[0]), atol=1e-16, rtol=0)


def test_cross_entropy_hessian_memory_is_n_times_k():
    op = softjac.cross_entropy_hessian(torch.randn(4, 32768))
    held = op.probs.numel() + op.coef.numel()
    assert held == 4 * 32768 + 4  # the dense blocks would be 4 * 32768**2


def test_cross_entropy_hessian_spectrum():
    z = torch.randn(3, 5, dtype=F64)
    t = torch.tensor([0, 4, 2])
    op = softjac.cross_entropy_hessian(z, t, weight=torch.rand(5, dtype=F64) + 0.1)
    dense = op.to_dense()
    lam = op.eigvalsh()
    # Dense eigvalsh is accurate to about eps·‖H‖ (absolute), hence the absolute tolerance.
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(dense), atol=1e-14, rtol=0)
    lam2, q = op.eigh()
    torch.testing.assert_close(lam2, lam, atol=1e-15, rtol=0)
    torch.testing.assert_close(q @ torch.diag_embed(lam2) @ q.mT, dense, atol=1e-14, rtol=0)
    assert isinstance(op.jacobian, softjac.SoftmaxJacobian)
    torch.testing.assert_close(op.jacobian.to_dense(), _dense_jacobians(z), atol=1e-16, rtol=0)


# ---------------------------------------------------------------------------------------------
# Fisher square roots
# ---------------------------------------------------------------------------------------------


def test_fisher_sqrt_exact():
    z = 3 * torch.randn(4, 6, dtype=F64)
    z[1, 2] = float("-inf")  # a masked class
    z[3] = float("-inf")  # a fully masked sample
    s = softjac.fisher_sqrt(z)
    assert s.shape == (4, 6, 6)
    jac = _dense_jacobians(z[:3])
    torch.testing.assert_close((s @ s.transpose(1, 2))[:3], jac, atol=1e-15, rtol=0)
    assert (s[3] == 0).all()
    s1 = softjac.fisher_sqrt(z[0])
    torch.testing.assert_close(s1[0], s[0])


def test_fisher_sqrt_monte_carlo_is_unbiased():
    z = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, float("-inf")]], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    m = 20000
    s = softjac.fisher_sqrt(z, num_samples=m, generator=gen)
    assert s.shape == (2, 4, m)
    est = s @ s.transpose(1, 2)
    jac = _dense_jacobians(z)
    # each entry is a mean of m bounded terms: standard error <= 1 / sqrt(m) ≈ 0.007
    torch.testing.assert_close(est, jac, atol=0.02, rtol=0)
    assert (s[1, 3] == 0).all()  # a masked class is never sampled and has σ = 0
    # reproducible with the same generator
    s2 = softjac.fisher_sqrt(z, num_samples=m, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)
    # a single sample's columns: (σ − e_y) / √M with y a class
    one = softjac.fisher_sqrt(z, num_samples=1, generator=gen)
    diff = torch.softmax(z, -1).unsqueeze(-1) - one
    assert ((diff == 1).sum(dim=1) == 1).all()


def test_fisher_sqrt_fully_masked_monte_carlo():
    z = torch.full((1, 3), float("-inf"))
    s = softjac.fisher_sqrt(z, num_samples=5, generator=torch.Generator().manual_seed(1))
    assert (s == 0).all()


# -- results that are not differentiable refuse inputs that carry a derivative ----------------


def _not_differentiable_cases():
    t = torch.tensor([0, 2, 1])
    return [
        ("softjac.cross_entropy_grad", lambda z: softjac.cross_entropy_grad(z, t)),
        ("softjac.cross_entropy_hessian", lambda z: softjac.cross_entropy_hessian(z, t)),
        ("softjac.fisher_sqrt", lambda z: softjac.fisher_sqrt(z)),
        ("softjac.SoftmaxJacobian.eigvalsh", lambda z: softjac.SoftmaxJacobian(z).eigvalsh()),
        ("softjac.SoftmaxJacobian.eigh", lambda z: softjac.SoftmaxJacobian(z).eigh()),
        (
            "softjac.SoftmaxJacobian.spectral_norm",
            lambda z: softjac.SoftmaxJacobian(z).spectral_norm(),
        ),
        ("softjac.SoftmaxJacobian.sqrtm", lambda z: softjac.SoftmaxJacobian(z).sqrtm()),
    ]


@pytest.mark.parametrize("case", range(7))
def test_not_differentiable_results_refuse_derivatives(case):
    """Reverse mode (requires grad with grad mode on) and forward mode (a dual tensor) both
    raise a named ValueError instead of returning a result without the derivative; detached
    input, or grad mode off, gives the same values as before."""
    import torch.autograd.forward_ad as fwad

    name, f = _not_differentiable_cases()[case]
    z = torch.randn(3, 4, dtype=F64)
    expected = f(z)
    with pytest.raises(ValueError, match=rf"`{name}`: .* requires grad, but this result is not"):
        f(z.clone().requires_grad_())
    with fwad.dual_level():
        with pytest.raises(ValueError, match=rf"`{name}`: .* forward-mode tangent"):
            f(fwad.make_dual(z, torch.randn_like(z)))
    with torch.no_grad():
        got = f(z.clone().requires_grad_())
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
