"""``softjac.SoftmaxJacobian``: every method against ``to_dense()`` and against independent
references (the literal float64 formula ``diag(σ) − σσᵀ`` and dense torch.linalg on benign
cases, 50-digit mpmath on adversarial ones), gradients, and bad input."""

from __future__ import annotations

import math
import re
import zlib

import mpmath as mp
import pytest
import torch

import softjac
from softjac import (
    SoftmaxJacobian,
    SoftmaxJacobianCholeskyFactor,
    SoftmaxJacobianPinv,
    SoftmaxJacobianSqrtFactor,
)

from ._operator_helpers import (
    ADVERSARIAL,
    dense_reference,
    mp_log_pdet,
    mp_logdet_damped,
    mp_pinv,
    mp_softmax,
    mp_solve_damped,
    rel_err,
    stored_support,
)

F64 = torch.float64

# (name, batch, K, dim, dtype, logit scale, temperature, masked)
CASES = [
    ("single", (), 7, -1, F64, 1.0, 1.0, False),
    ("batch", (3,), 9, -1, F64, 3.0, 1.0, False),
    ("batch2_dim0", (2, 3), 6, 0, F64, 2.0, 1.0, False),
    ("masked", (4,), 8, -1, F64, 2.0, 1.0, True),
    ("temperature", (2,), 5, 1, F64, 2.0, 0.5, False),
    ("extreme", (2,), 6, -1, F64, 40.0, 1.0, False),
    ("k1", (3,), 1, -1, F64, 1.0, 1.0, False),
    ("k2", (3,), 2, -1, F64, 1.0, 2.0, False),
    ("float32", (3,), 10, -1, torch.float32, 2.0, 1.0, True),
    ("bfloat16", (2,), 6, -1, torch.bfloat16, 1.0, 1.0, False),
]
TOL = {F64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}


def _make(case):
    name, batch, k, dim, dtype, scale, temp, masked = case
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # stable across runs
    z = (torch.randn(*batch, k, generator=g, dtype=F64) * scale).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(*batch, k, generator=g) > 0.3
        mask[..., 0] = True
        if len(batch):
            mask[(0,) * len(batch)] = False  # one fully masked slice
    nd = len(batch) + 1
    d = dim % nd
    zz = z.movedim(-1, d)
    mm = None if mask is None else mask.movedim(-1, d)
    op = SoftmaxJacobian(zz, dim=d, mask=mm, temperature=temp)
    # independent reference: float64 softmax of the (masked, scaled) logits, J literally
    zr = z.double() / temp
    if mask is not None:
        zr = zr.masked_fill(~mask, float("-inf"))
    p = torch.softmax(zr, -1).nan_to_num(0.0)
    return op, p, temp, TOL[dtype]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return _make(request.param)


class TestAgainstDense:
    """The linear_operator pattern: every method against ``to_dense()`` and the reference."""

    def test_metadata(self, case):
        op, p, _, _ = case
        k = p.shape[-1]
        assert op.shape == (*p.shape[:-1], k, k)
        assert op.batch_shape == p.shape[:-1] and op.num_classes == k
        assert op.is_symmetric and op.is_positive_semidefinite
        assert op.T is op and op.transpose() is op
        assert op.device == p.device
        assert op.dtype in (torch.float32, F64)
        assert "SoftmaxJacobian" in repr(op)

    def test_to_dense(self, case):
        op, p, t, tol = case
        ref = dense_reference(p) / t
        assert (op.to_dense().double() - ref).abs().max() <= tol

    def test_products(self, case):
        op, p, t, tol = case
        dense = op.to_dense().double()
        ref = dense_reference(p) / t
        g = torch.Generator().manual_seed(3)
        x = torch.randn(p.shape, generator=g, dtype=F64)
        xm = torch.randn(*p.shape, 4, generator=g, dtype=F64)
        xr = torch.randn(*p.shape[:-1], 4, p.shape[-1], generator=g, dtype=F64)
        cast = op.dtype
        for got, want in [
            (op @ x.to(cast), (ref @ x.unsqueeze(-1)).squeeze(-1)),
            (op.matmul(xm.to(cast)), ref @ xm),
            (op @ xm.to(cast), dense @ xm),
            (x.to(cast) @ op, (ref @ x.unsqueeze(-1)).squeeze(-1)),
            (xr.to(cast) @ op, xr @ ref),
        ]:
            assert (got.double() - want).abs().max() <= 4 * tol
        # a single vector broadcasts over the batch
        v = torch.randn(p.shape[-1], generator=g, dtype=F64)
        assert (op @ v.to(cast)).shape == p.shape

    def test_diagonal_trace_frobenius(self, case):
        op, p, t, tol = case
        ref = dense_reference(p) / t
        assert (op.diagonal().double() - ref.diagonal(dim1=-2, dim2=-1)).abs().max() <= tol
        assert (op.trace().double() - ref.diagonal(dim1=-2, dim2=-1).sum(-1)).abs().max() <= tol
        fro = torch.linalg.matrix_norm(ref)
        assert (op.frobenius_norm().double() - fro).abs().max() <= tol

    def test_spectrum(self, case):
        op, p, t, tol = case
        ref = torch.linalg.eigvalsh(dense_reference(p) / t)
        lam = op.eigvalsh()
        assert (lam.double() - ref).abs().max() <= tol
        lam2, q = op.eigh()
        assert torch.equal(lam2, lam)
        k = p.shape[-1]
        eye = torch.eye(k, dtype=q.dtype)
        assert (q.mT @ q - eye).abs().max() <= 10 * tol
        recon = q @ torch.diag_embed(lam2) @ q.mT
        assert (recon - op.to_dense()).abs().max() <= 10 * tol
        assert (op.spectral_norm().double() - ref[..., -1]).abs().max() <= tol
        assert (op.spectral_norm() <= 0.5 / t + tol).all()

    def test_sqrtm_and_apply_function(self, case):
        op, p, t, tol = case
        ref = dense_reference(p) / t
        r = op.sqrtm().double()
        assert (r - r.mT).abs().max() <= 10 * tol
        assert (r @ r - ref).abs().max() <= 10 * tol
        ev, vec = torch.linalg.eigh(ref)
        expm_ref = vec @ torch.diag_embed(ev.exp()) @ vec.mT
        assert (op.apply_function(torch.exp).double() - expm_ref).abs().max() <= 10 * tol

    def test_pinv(self, case):
        op, p, t, tol = case
        pinv = op.pinv()
        assert isinstance(pinv, SoftmaxJacobianPinv)
        ref = dense_reference(p) / t
        dense = pinv.to_dense().double()
        big = dense.abs().amax((-2, -1), keepdim=True).clamp_min(1)
        scale = big * tol * 10
        sup = p > 0
        if bool((p[sup] > 1e-3).all()):  # benign: dense torch.linalg.pinv is a fine reference
            want = torch.linalg.pinv(ref, hermitian=True)
            assert ((dense - want).abs() <= scale * 100).all()
            assert ((ref @ dense @ ref - ref).abs() <= tol * 100).all()
        assert (dense - dense.mT).abs().max() <= 0
        g = torch.Generator().manual_seed(5)
        xm = torch.randn(*p.shape, 3, generator=g, dtype=F64).to(op.dtype)
        assert ((pinv @ xm).double() - dense @ xm.double()).abs().le(scale).all()
        assert pinv.T is pinv and pinv.shape == op.shape

    def test_log_pdet(self, case):
        op, p, t, tol = case
        ref = torch.linalg.eigvalsh(dense_reference(p) / t)
        n = (p > 0).sum(-1, keepdim=True)
        k = p.shape[-1]
        # float64 reference: Σ log of the n − 1 largest eigenvalues (the nonzero ones)
        top = torch.arange(k) >= k - n + 1
        want = torch.where(top, ref.clamp_min(1e-300).log(), 0.0).sum(-1)
        want = torch.where(n.squeeze(-1) > 0, want, -math.inf)
        if bool((p[p > 0] < 1e-6).any()):
            pytest.skip("dense eigvalsh is not a reference here; see the mpmath tests")
        got = op.log_pdet().double()
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin)
        assert (got[fin] - want[fin]).abs().le(1e3 * tol * (1 + want[fin].abs())).all()

    def test_damped(self, case):
        op, p, t, tol = case
        k = p.shape[-1]
        ref = dense_reference(p) / t
        lam = 0.37
        a = ref + lam * torch.eye(k, dtype=F64)
        g = torch.Generator().manual_seed(7)
        b = torch.randn(p.shape, generator=g, dtype=F64)
        bm = torch.randn(*p.shape, 2, generator=g, dtype=F64)
        x = op.solve_damped(b.to(op.dtype), lam).double()
        assert (x - torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)).abs().max() <= 10 * tol
        xm = op.solve_damped(bm.to(op.dtype), lam).double()
        assert (xm - torch.linalg.solve(a, bm)).abs().max() <= 10 * tol
        assert (op.logdet_damped(lam).double() - torch.logdet(a)).abs().max() <= 10 * tol * k

    def test_factors(self, case):
        op, p, t, tol = case
        ref = dense_reference(p) / t
        g = torch.Generator().manual_seed(9)
        xm = torch.randn(*p.shape, 3, generator=g, dtype=F64).to(op.dtype)
        xr = torch.randn(*p.shape[:-1], 3, p.shape[-1], generator=g, dtype=F64).to(op.dtype)
        for f in (op.sqrt_factor(), op.cholesky_factor()):
            d = f.to_dense()
            assert ((d.double() @ d.double().mT) - ref).abs().max() <= 10 * tol
            assert ((f @ xm) - d @ xm).abs().max() <= 10 * tol
            assert ((f.T @ xm) - d.mT @ xm).abs().max() <= 10 * tol
            assert ((xr @ f) - xr @ d).abs().max() <= 10 * tol
            assert torch.equal(f.T.to_dense(), d.mT)
        assert isinstance(op.sqrt_factor(), SoftmaxJacobianSqrtFactor)
        chol = op.cholesky_factor()
        assert isinstance(chol, SoftmaxJacobianCholeskyFactor)
        assert (chol.to_dense().triu(1) == 0).all()


# --------------------------------------------------------------------------- mpmath accuracy


def _mp_case(name):
    # the support is every unmasked entry, also where σ underflows in float64
    z = ADVERSARIAL[name]
    p = mp_softmax(z)
    return z, p, SoftmaxJacobian(torch.tensor(z, dtype=F64))


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_log_pdet_against_mpmath(name):
    _, p, op = _mp_case(name)
    want = mp_log_pdet(p)
    got = op.log_pdet().item()
    if want == mp.mpf("-inf"):
        assert got == -math.inf
    else:
        # relative to the value, or absolute where log pdet is 0 (a 1×1 support / log 1)
        assert abs(mp.mpf(got) - want) <= 1e-11 * max(abs(want), 1), (got, want)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_pinv_entries_against_mpmath(name):
    z, p, op = _mp_case(name)
    want = mp_pinv(p)
    got = op.pinv().to_dense()
    k = len(z)
    inv = [1 / x if x > 0 else mp.mpf(0) for x in p]
    n = sum(1 for x in p if x > 0)
    for i in range(k):
        for j in range(k):
            # componentwise: relative to the size of the closed form's terms
            terms = (
                (abs(inv[i]) * (i == j) + (inv[i] + inv[j]) / n + mp.fsum(inv) / n**2) if n else 0
            )
            err = abs(mp.mpf(got[i, j].item()) - want[i, j])
            assert err <= 1e-11 * (abs(want[i, j]) + 1e-4 * terms) + 1e-300, (i, j)


def test_pinv_dense_loses_ours_does_not():
    z, p, op = _mp_case("wide_tail")
    want = mp_pinv(p)
    ours = op.pinv().to_dense()
    dense = torch.linalg.pinv(op.to_dense(), hermitian=True)
    k = len(z)
    ours_err = max(rel_err(ours[i, j].item(), want[i, j]) for i in range(k) for j in range(k))
    dense_err = max(rel_err(dense[i, j].item(), want[i, j]) for i in range(k) for j in range(k))
    assert ours_err <= 1e-13
    assert dense_err >= 1e-2


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("lam", [1e-8, 0.3])
def test_damped_against_mpmath(name, lam):
    z, p, op = _mp_case(name)
    k = len(z)
    b = [math.sin(1.0 + i) for i in range(k)]
    want = mp_solve_damped(p, b, lam)
    got = op.solve_damped(torch.tensor(b, dtype=F64), lam).tolist()
    norm = max(abs(x) for x in want)
    for g, w in zip(got, want, strict=True):
        assert abs(mp.mpf(g) - w) <= 1e-11 * max(abs(w), 1e-3 * norm)
    ld = mp_logdet_damped(p, lam)
    assert rel_err(op.logdet_damped(lam).item(), ld) <= 1e-11


def test_float32_damped_denominator_is_stable():
    # the naive 1 − Σσ²/(σ+λ) is ~5% off in float32 at small λ; the stable form is not
    z = [3.0, 0.0, -1.0, -2.0]
    lam = 1e-5
    op = SoftmaxJacobian(torch.tensor(z, dtype=torch.float32))
    p = stored_support(mp_softmax(z))
    want = mp_logdet_damped(p, lam)
    assert rel_err(op.logdet_damped(lam).item(), want) <= 1e-5
    b = [1.0, 0.0, 0.0, 0.0]
    sol = mp_solve_damped(p, b, lam)
    got = op.solve_damped(torch.tensor(b), lam).tolist()
    assert max(rel_err(g, w) for g, w in zip(got, sol, strict=True)) <= 1e-3


# --------------------------------------------------------------------------- gradients


def test_gradcheck():
    torch.manual_seed(0)
    z = torch.randn(2, 5, dtype=F64, requires_grad=True)
    x = torch.randn(2, 5, 3, dtype=F64)
    b = torch.randn(2, 5, dtype=F64)
    mask = torch.tensor([[True, True, False, True, True], [True] * 5])
    for t in (1.0, 0.7):
        fns = [
            lambda z, t=t: SoftmaxJacobian(z, temperature=t) @ x,
            lambda z, t=t: SoftmaxJacobian(z, mask=mask, temperature=t).log_pdet(),
            lambda z, t=t: SoftmaxJacobian(z, temperature=t).solve_damped(b, 0.1),
            lambda z, t=t: SoftmaxJacobian(z, mask=mask, temperature=t).logdet_damped(0.1),
            lambda z, t=t: SoftmaxJacobian(z, temperature=t).frobenius_norm(),
            lambda z, t=t: SoftmaxJacobian(z, temperature=t).sqrt_factor() @ x,
        ]
        for f in fns:
            assert torch.autograd.gradcheck(f, (z,))


def test_log_pdet_gradient_matches_closed_form():
    # d/dz [log K + Σ log σ] = 1 − K σ (full support)
    z = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64, requires_grad=True)
    SoftmaxJacobian(z).log_pdet().backward()
    p = torch.softmax(z.detach(), -1)
    assert (z.grad - (1 - 4 * p)).abs().max() <= 1e-14


# --------------------------------------------------------------------------- probs, masks, edge


def test_from_probs_matches_from_logits():
    torch.manual_seed(2)
    z = torch.randn(3, 6, dtype=F64)
    a = SoftmaxJacobian(z)
    b = SoftmaxJacobian(probs=torch.softmax(z, -1))
    assert (a.to_dense() - b.to_dense()).abs().max() <= 1e-15
    assert (a.log_pdet() - b.log_pdet()).abs().max() <= 1e-13
    bm = SoftmaxJacobian(
        probs=torch.tensor([0.5, 0.0, 0.5], dtype=F64), mask=torch.tensor([True, False, True])
    )
    assert bm.log_pdet().item() == pytest.approx(math.log(2 * 0.25), abs=1e-15)


def test_fully_masked_slice():
    z = torch.randn(2, 4, dtype=F64)
    mask = torch.tensor([[False] * 4, [True] * 4])
    op = SoftmaxJacobian(z, mask=mask)
    assert (op.to_dense()[0] == 0).all()
    assert (op.eigvalsh()[0] == 0).all()
    assert op.log_pdet()[0].item() == -math.inf
    assert math.isfinite(op.log_pdet()[1].item())
    assert (op.pinv().to_dense()[0] == 0).all()
    assert op.logdet_damped(0.5)[0].item() == pytest.approx(4 * math.log(0.5), abs=1e-14)
    b = torch.ones(2, 4, dtype=F64)
    assert (op.solve_damped(b, 0.5)[0] == 2.0).all()
    assert torch.isfinite(op.solve_damped(b, 0.5)).all()
    assert (op.spectral_norm()[0] == 0).all()


def test_log_pdet_finite_where_product_underflows():
    z = torch.cat([torch.zeros(1), -torch.linspace(30, 600, 40)]).double()
    op = SoftmaxJacobian(z)
    assert torch.softmax(z, -1).prod() == 0
    lp = op.log_pdet().item()
    assert math.isfinite(lp)
    want = mp_log_pdet(mp_softmax(z.tolist()))
    assert abs(mp.mpf(lp) - want) <= 1e-11 * abs(want)


def test_to_scipy():
    pytest.importorskip("scipy")
    import numpy as np

    z = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=F64)
    op = SoftmaxJacobian(z)
    lo = op.to_scipy()
    x = np.arange(4.0)
    assert np.allclose(lo @ x, (op.to_dense() @ torch.tensor(x)).numpy(), atol=1e-16)
    assert np.allclose(lo.matmat(np.eye(4)), op.to_dense().numpy(), atol=1e-16)
    assert lo.shape == (4, 4)
    with pytest.raises(ValueError, match="one slice"):
        SoftmaxJacobian(torch.zeros(2, 3)).to_scipy()


def test_public_names():
    for name in (
        "SoftmaxJacobian",
        "SoftmaxJacobianPinv",
        "SoftmaxJacobianSqrtFactor",
        "SoftmaxJacobianCholeskyFactor",
    ):
        assert name in softjac.__all__ and hasattr(softjac, name)


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=r"exactly one of `logits` and `probs`\. Got both"):
        SoftmaxJacobian(z, probs=torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="Got neither"):
        SoftmaxJacobian()
    with pytest.raises(ValueError, match="non-negative"):
        SoftmaxJacobian(probs=torch.tensor([0.5, -0.1, 0.6]))
    with pytest.raises(ValueError, match="must sum to 1"):
        SoftmaxJacobian(probs=torch.tensor([0.5, 0.1, 0.6]))
    op = SoftmaxJacobian(z)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`softjac.SoftmaxJacobian.solve_damped`: `damping` must be a finite number > 0. "
            "Got -1.0."
        ),
    ):
        op.solve_damped(torch.ones(3), -1.0)
    with pytest.raises(ValueError, match=r"`damping` must be a finite number > 0\. Got 0"):
        op.logdet_damped(0)
    with pytest.raises(ValueError, match="`x` must have shape"):
        op @ torch.ones(4)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        op @ [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="temperature"):
        SoftmaxJacobian(z, temperature=0.0)
    with pytest.raises(TypeError):
        SoftmaxJacobian(torch.zeros(3, dtype=torch.int64))


def test_product_keeps_the_argmax_entry_accurate():
    # TensorFlow's test case: J v at z = [37.43…, 0], v = [1, 0] is ±σ₁σ₂ ≈ ±5.5511e-17,
    # exactly antisymmetric (the naive σ ⊙ (v − ⟨σ, v⟩) gives 0 in the first entry).
    z = [37.42994775023705, 0.0]
    p = mp_softmax(z)
    want = p[0] * p[1]
    op = SoftmaxJacobian(torch.tensor(z, dtype=F64))
    out = op @ torch.tensor([1.0, 0.0], dtype=F64)
    assert out[0] == -out[1]
    assert rel_err(out[0].item(), want) <= 3e-16
    cols = op @ torch.eye(2, dtype=F64)
    assert torch.equal(cols[:, 0], out)


def test_to_scipy_without_scipy(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        SoftmaxJacobian(torch.zeros(3)).to_scipy()


# ---------------------------------------------------------------- support from the logits
def test_log_pdet_keeps_underflowed_support():
    # σ of the three small entries is e^-1000 (0 in float64), but they are in the support
    op = SoftmaxJacobian(torch.tensor([1000.0, 0.0, 0.0, 0.0], dtype=F64))
    assert (op.probs[1:] == 0).all()
    want = mp.log(4) - 3000
    assert rel_err(op.log_pdet().item(), want) <= 2 * 2.0**-52
    assert rel_err(op.log_pdet().item(), mp_log_pdet(mp_softmax([1000.0, 0.0, 0.0, 0.0]))) < 1e-15
    # float32: the same from float32 log-softmax
    op32 = SoftmaxJacobian(torch.tensor([1000.0, 0.0, 0.0, 0.0]))
    assert rel_err(op32.log_pdet().item(), want) <= 2 * 2.0**-23


def test_pinv_with_underflowed_support_is_exact_or_overflows_honestly():
    # σ_1 = e^-700 / (1 + e^-700) is representable: 1/σ_1 ≈ 1.0e304 and the entries are exact
    z = [0.0, -700.0, -1.0]
    got = SoftmaxJacobian(torch.tensor(z, dtype=F64)).pinv().to_dense()
    want = mp_pinv(mp_softmax(z))
    for i in range(3):
        for j in range(3):
            assert rel_err(got[i, j].item(), want[i, j]) <= 1e-12, (i, j)
    # σ_1 = e^-800 underflows: the exact entries involving 1/σ_1 ≈ e^800 overflow → ±inf with
    # the right signs, never NaN
    z = [0.0, -800.0, -1.0]
    got = SoftmaxJacobian(torch.tensor(z, dtype=F64)).pinv().to_dense()
    want = mp_pinv(mp_softmax(z))
    big = torch.finfo(F64).max
    for i in range(3):
        for j in range(3):
            w = want[i, j]
            if abs(w) > big:
                assert got[i, j].item() == (math.inf if w > 0 else -math.inf), (i, j)
            else:
                assert rel_err(got[i, j].item(), w) <= 1e-12, (i, j)
    # the structured product is exact on a vector whose product stays small (a dense
    # product would cancel terms of 1e304 here)
    z = [0.0, -700.0, -1.0]
    x = [1.0, 0.0, -1.0]
    prod = SoftmaxJacobian(torch.tensor(z, dtype=F64)).pinv() @ torch.tensor(x, dtype=F64)
    want = mp_pinv(mp_softmax(z)) * mp.matrix(x)
    for i in range(3):
        assert rel_err(prod[i].item(), want[i]) <= 1e-13, i


def test_rank_counts_underflowed_support():
    # σ_2 = e^-800 underflows; the exact rank is 2 and the property says so (the unresolvable
    # tiny eigenvalue is reported in the tolerance)
    report = softjac.check_properties(torch.tensor([0.0, 1.0, -800.0], dtype=F64))
    rank = report["rank"]
    assert rank.detail.startswith("rank 1, expected 2"), rank.detail
    assert rank.passed


# ---------------------------------------------------------------- the corners
def test_eigh_orthonormal_for_tiny_eigenvalues():
    z = [0.0, -1.0, -400.0, -402.0]
    op = SoftmaxJacobian(torch.tensor(z, dtype=F64))
    lam, q = op.eigh()
    eye = torch.eye(4, dtype=F64)
    assert (q.mT @ q - eye).abs().max().item() <= 1e-12 * 4
    # the eigenvalues span 1e-175 .. 0.39; every one relative to itself (mpmath)
    from ._operator_helpers import mp_eigvals

    want = mp_eigvals(mp_softmax(z))
    for g, w in zip(lam.tolist(), want, strict=True):
        assert rel_err(g, w) <= 4 * 2.0**-52 if w != 0 else g == 0
    # Q Λ Qᵀ reconstructs J entrywise relative to the entry (entries down to 1e-176)
    p = mp_softmax(z)
    rec = (q * lam.unsqueeze(-2)) @ q.mT
    for i in range(4):
        for j in range(4):
            w = p[i] * (1 - p[i]) if i == j else -p[i] * p[j]
            if abs(w) >= torch.finfo(F64).tiny:
                assert rel_err(rec[i, j].item(), w) <= 16 * 2.0**-52, (i, j)
            else:
                assert abs(rec[i, j].item()) <= 1e-300


def _mp_softmax_hi(z: list[float]) -> list:
    """σ at 700 digits (so that Σσ = 1 holds far below the smallest entries)."""
    with mp.workdps(700):
        m = max(z)
        e = [mp.exp(mp.mpf(x) - m) for x in z]
        s = mp.fsum(e)
        return [x / s for x in e]


def _mp_cholesky(p: list) -> list[list]:
    """The Tanabe–Sagae factor from 700-digit tail sums (an independent evaluation)."""
    k = len(p)
    with mp.workdps(700):
        c = [mp.fsum(p[j] for j in range(i + 1, k)) for i in range(k)]  # c_i = Σ_{j>i}
        L = [[mp.mpf(0)] * k for _ in range(k)]
        for i in range(k):
            ci1 = p[i] + c[i]
            if c[i] == 0 or ci1 == 0:
                continue
            L[i][i] = mp.sqrt(p[i] * c[i] / ci1)
            beta = mp.sqrt(p[i] / (ci1 * c[i]))
            for j in range(i + 1, k):
                L[j][i] = -p[j] * beta
        return L


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cholesky_factor_wide_spread_is_finite_and_exact(dtype):
    z = [-5.0, 0.0, -300.0, -650.0, -690.0] if dtype == F64 else [-5.0, 0.0, -30.0, -65.0, -80.0]
    p = _mp_softmax_hi(z)
    L = _mp_cholesky(p)
    k = len(z)
    with mp.workdps(700):  # the reference factor reproduces J (a check of the check)
        for i in range(k):
            for j in range(k):
                lj = mp.fsum(L[i][m] * L[j][m] for m in range(k))
                jj = p[i] * (1 - p[i]) if i == j else -p[i] * p[j]
                assert abs(lj - jj) <= mp.mpf(10) ** -40 * (abs(jj) + mp.mpf(10) ** -600)
    got = SoftmaxJacobian(torch.tensor(z, dtype=dtype)).cholesky_factor().to_dense()
    assert torch.isfinite(got).all()
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    spread = max(z) - min(z)
    for i in range(k):
        for j in range(k):
            w = L[i][j]
            if abs(w) >= tiny:
                # conditioning eps·|z_i − max z| of σ itself, as everywhere
                assert rel_err(got[i, j].item(), w) <= 8 * eps * (k + spread), (i, j)
            else:
                assert abs(got[i, j].item()) <= 2 * tiny, (i, j)


def test_frobenius_norm_does_not_underflow():
    op = SoftmaxJacobian(torch.tensor([0.0, -500.0], dtype=F64))
    p = mp_softmax([0.0, -500.0])
    want = mp.sqrt(2 * (p[0] * p[1]) ** 2 + (p[0] * p[1]) ** 2 * 2)
    got = op.frobenius_norm().item()
    assert 1.4e-217 < got < 1.43e-217
    assert rel_err(got, want) <= 4 * 2.0**-52


# ---------------------------------------------------------------- non-finite input
def test_nan_and_posinf_logits_give_nan_slices():
    nan, inf = float("nan"), float("inf")
    z = torch.tensor([[nan, 0.0, 1.0], [0.0, 1.0, 2.0], [inf, 0.0, 1.0], [-inf, 0.0, 1.0]])
    op = SoftmaxJacobian(z)
    bad = torch.tensor([True, False, True, False])
    x = torch.ones(4, 3)
    outs = {
        "probs": op.probs,
        "eigvalsh": op.eigvalsh(),
        "eigh.values": op.eigh()[0],
        "eigh.vectors": op.eigh()[1],
        "spectral_norm": op.spectral_norm(),
        "frobenius_norm": op.frobenius_norm(),
        "trace": op.trace(),
        "diagonal": op.diagonal(),
        "log_pdet": op.log_pdet(),
        "logdet_damped": op.logdet_damped(0.1),
        "solve_damped": op.solve_damped(x, 0.1),
        "matmul": op @ x,
        "to_dense": op.to_dense(),
        "pinv": op.pinv().to_dense(),
        "pinv@": op.pinv() @ x,
        "sqrt": op.sqrt_factor().to_dense(),
        "sqrt@": op.sqrt_factor() @ x,
        "cholesky": op.cholesky_factor().to_dense(),
        "cholesky@": op.cholesky_factor() @ x,
    }
    for name, out in outs.items():
        flat = out.reshape(4, -1)
        assert torch.isnan(flat[bad]).all(), name
        assert torch.isfinite(flat[~bad]).all(), name
    # the good slices are untouched by the bad ones
    ref = SoftmaxJacobian(z[~bad])
    torch.testing.assert_close(op.eigvalsh()[~bad], ref.eigvalsh())
    torch.testing.assert_close(op.log_pdet()[~bad], ref.log_pdet())


# ---------------------------------------------------------------- memory guards
def _dense_calls(op):
    return {
        "softjac.SoftmaxJacobian.to_dense": lambda mb: op.to_dense(max_bytes=mb),
        "softjac.SoftmaxJacobian.eigh": lambda mb: op.eigh(max_bytes=mb),
        "softjac.SoftmaxJacobian.sqrtm": lambda mb: op.sqrtm(max_bytes=mb),
        "softjac.SoftmaxJacobian.apply_function": lambda mb: op.apply_function(
            torch.exp, max_bytes=mb
        ),
        "softjac.SoftmaxJacobianPinv.to_dense": lambda mb: op.pinv().to_dense(max_bytes=mb),
        "softjac.SoftmaxJacobianSqrtFactor.to_dense": lambda mb: op.sqrt_factor().to_dense(
            max_bytes=mb
        ),
        "softjac.SoftmaxJacobianCholeskyFactor.to_dense": lambda mb: op.cholesky_factor().to_dense(
            max_bytes=mb
        ),
    }


def test_every_dense_method_is_guarded():
    op = SoftmaxJacobian(torch.randn(3, 40, dtype=F64))
    for fn, call in _dense_calls(op).items():
        with pytest.raises(ValueError, match=re.escape(f"`{fn}`: the dense result of shape")):
            call(1000)
        with pytest.raises(TypeError, match=re.escape(f"`{fn}`: `max_bytes` must be an int")):
            call("x")
        with pytest.raises(ValueError, match=re.escape(f"`{fn}`: `max_bytes` must be > 0")):
            call(0)
        assert call(2**30) is not None  # well under the limit: computed


def test_temperature_below_the_dtype_range_is_refused():
    z = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match=r"`softjac.SoftmaxJacobian`: `temperature` must be"):
        SoftmaxJacobian(z, temperature=1e-46)
    with pytest.raises(ValueError, match=r"`softjac.SoftmaxJacobian`: `temperature` must be"):
        SoftmaxJacobian(probs=torch.tensor([0.5, 0.5]), temperature=1e-40)
    op = SoftmaxJacobian(z.double(), temperature=1e-46)  # representable in float64: fine
    assert op.probs.tolist() == [1.0, 0.0]


def test_cross_entropy_hessian_and_fisher_sqrt_are_guarded():
    z = torch.randn(8, 20, dtype=F64)
    y = torch.randint(0, 20, (8,))
    h = softjac.cross_entropy_hessian(z, y)
    for fn, call in {
        "softjac.CrossEntropyHessian.to_dense": lambda mb: h.to_dense(max_bytes=mb),
        "softjac.fisher_sqrt": lambda mb: softjac.fisher_sqrt(z, max_bytes=mb),
    }.items():
        with pytest.raises(ValueError, match=re.escape(f"`{fn}`: the dense result of shape")):
            call(1000)
        with pytest.raises(TypeError, match=re.escape(f"`{fn}`: `max_bytes` must be an int")):
            call("x")
        assert call(2**30).shape == (8, 20, 20)
