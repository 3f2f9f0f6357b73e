"""``softjac.linear_model.SoftmaxRegression`` against scikit-learn, autograd and itself.

References: scikit-learn's ``LogisticRegression`` (newton-cholesky, tight tol) for the
optimum, ``torch.autograd.functional.hessian`` of an objective written with
``F.cross_entropy`` for the Newton step, and the dense ``diag(p) − ppᵀ`` for the factors.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

import softjac
from softjac import _reference, fisher_sqrt
from softjac.linear_model import SoftmaxRegression
from softjac.linear_model._solvers import (
    Problem,
    _FullKroneckerPreconditioner,
    choose_solver,
    reduced_factor,
    serial_if_small,
    step_dual,
    step_newton_cg,
    step_primal,
)

SOLVERS = ["primal", "dual", "newton-cg"]


def _data(n=150, d=6, k=4, seed=0, noise=1.5):
    """Overlapping classes (no separation, so C=inf has an optimum)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((k, d))
    y = (X @ W.T + noise * rng.gumbel(size=(n, k))).argmax(1)
    return X, y


def _sklearn(X, y, C=1.0, fit_intercept=True, sample_weight=None):
    return LogisticRegression(
        C=C, fit_intercept=fit_intercept, tol=1e-13, max_iter=500, solver="newton-cholesky"
    ).fit(X, y, sample_weight=sample_weight)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# -- the factor and the Newton step --------------------------------------------------------


def test_reduced_factor_reproduces_the_jacobian():
    z = torch.cat(
        [
            torch.randn(20, 5, dtype=torch.float64) * 3,
            torch.tensor([[0.0, -30, -60, -5, 40]], dtype=torch.float64),
            torch.tensor([[0.0, 0.0, 0.0, 0.0, 80.0]], dtype=torch.float64),  # p_K ≈ 1
        ]
    )
    p = torch.softmax(z, -1)
    F_ = reduced_factor(p)
    assert F_.shape == (22, 5, 4)
    FFt = F_ @ F_.mT
    # softjac.jacobian (exact diagonal; the naive σ_K(1 − σ_K) loses digits when σ_K ≈ 1)
    # and fisher_sqrt's S Sᵀ, to a few ulps of each slice.
    J = softjac.jacobian(z)
    scale = J.abs().amax((1, 2), keepdim=True)
    assert bool(((FFt - J).abs() <= 8e-15 * scale).all())
    S = fisher_sqrt(z)
    assert bool(((FFt[:20] - S[:20] @ S[:20].mT).abs() <= 8e-15 * scale[:20]).all())
    # the dense formula where it is accurate (no σ near 1)
    mild = p.amax(1) < 0.9
    Jn = torch.stack([_reference.jacobian_ref(zi) for zi in z[mild]])
    assert bool(((FFt[mild] - Jn).abs() <= 8e-15 * scale[mild]).all())
    # p_K ≈ 1: every entry to full relative accuracy
    torch.testing.assert_close(FFt[20:], softjac.jacobian(z[20:]), rtol=1e-14, atol=0)
    # two classes: the single column is √(p q) (1, −1)
    p2 = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    expect = (0.21**0.5) * torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    assert torch.allclose(reduced_factor(p2)[0], expect, rtol=1e-15, atol=0)


def _autograd_step(X, y, c, k, lam, fit_intercept, W, b):
    """−H⁺ g for f(W, b) written with F.cross_entropy; H by autograd."""
    Xt = torch.as_tensor(X)
    d = Xt.shape[1]

    def f(theta):
        Wt = theta[: k * d].view(k, d)
        bt = theta[k * d :] if fit_intercept else torch.zeros(k, dtype=theta.dtype)
        z = Xt @ Wt.T + bt
        loss = (c * F.cross_entropy(z, y, reduction="none")).sum()
        return loss + 0.5 * lam * (Wt * Wt).sum()

    theta = torch.cat([W.reshape(-1), b]) if fit_intercept else W.reshape(-1).clone()
    g = torch.autograd.functional.jacobian(f, theta)
    H = torch.autograd.functional.hessian(f, theta)
    step = -torch.linalg.pinv(H, hermitian=True) @ g
    sw = step[: k * d].view(k, d)
    sb = step[k * d :] if fit_intercept else torch.zeros(k, dtype=step.dtype)
    return sw, sb


@pytest.mark.parametrize(
    ("solver", "lam", "fit_intercept"),
    [(s, 0.05, True) for s in SOLVERS]
    + [(s, 0.05, False) for s in SOLVERS]
    + [("primal", 0.0, True), ("newton-cg", 0.0, True)],  # the dual needs a penalty
)
def test_newton_step_is_the_pseudo_inverse_step(solver, lam, fit_intercept):
    X, y = _data(n=30, d=4, k=3, seed=1)
    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y)
    gen = torch.Generator().manual_seed(3)
    c = torch.rand(30, generator=gen, dtype=torch.float64) + 0.1
    c = c / c.sum()
    k, d = 3, 4
    W = _centre(torch.randn(k, d, generator=gen, dtype=torch.float64))
    b = torch.randn(k, generator=gen, dtype=torch.float64) if fit_intercept else torch.zeros(k)
    b = (b - b.mean()).double()
    prob = Problem(Xt, yt, c, k, lam, fit_intercept)
    _, P = prob.value(W, prob.logits(W, b))
    gw, gb = prob.gradient(W, P)
    if solver == "newton-cg":
        dw, db = step_newton_cg(prob, P, gw, gb, forcing=1e-13)
    else:
        dw, db = {"primal": step_primal, "dual": step_dual}[solver](prob, P, gw, gb)
    ew, eb = _autograd_step(X, yt, c, k, lam, fit_intercept, W, b)
    scale = float(torch.cat([ew.reshape(-1), eb]).abs().max())
    assert float((dw - ew).abs().max()) <= 1e-9 * scale
    assert float((db - eb).abs().max()) <= 1e-9 * scale


def _centre(W):
    return W - W.mean(0, keepdim=True)


# -- the optimum: scikit-learn's -----------------------------------------------------------

INF = float("inf")
CASES = [
    # (C, fit_intercept, weighted)
    (1.0, True, False),
    (0.05, True, True),
    (30.0, False, False),
    (INF, True, True),
]


@pytest.mark.parametrize(
    ("solver", "C", "fit_intercept", "weighted"),
    [(s, *case) for case in CASES for s in SOLVERS if not (s == "dual" and case[0] == INF)],
)
def test_matches_sklearn_multinomial(solver, C, fit_intercept, weighted):
    X, y = _data()
    sw = np.random.default_rng(5).uniform(0, 3, len(y)) if weighted else None
    ref = _sklearn(X, y, C, fit_intercept, sw)
    m = SoftmaxRegression(C=C, fit_intercept=fit_intercept, tol=1e-11, solver=solver)
    m.fit(X, y, sample_weight=sw)
    assert m.solver_ == solver
    assert m.coef_.shape == (4, 6) and m.intercept_.shape == (4,)
    assert _rel(m.coef_, ref.coef_) <= 1e-6
    if fit_intercept:
        assert _rel(m.intercept_, ref.intercept_) <= 1e-6
    assert np.abs(m.intercept_.sum()) <= 1e-12  # centred
    assert np.abs(m.coef_.sum(0)).max() <= 1e-12  # symmetric parameterisation
    np.testing.assert_allclose(m.predict_proba(X), ref.predict_proba(X), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(m.decision_function(X), ref.decision_function(X), rtol=1e-6)
    np.testing.assert_array_equal(m.predict(X), ref.predict(X))
    assert m.score(X, y) == ref.score(X, y)
    # the reported objective, recomputed from sklearn's coefficients
    P = ref.predict_proba(X)
    s = np.ones(len(y)) if sw is None else sw
    f = np.sum(s * -np.log(P[np.arange(len(y)), y])) / s.sum()
    if np.isfinite(C):
        f += np.sum(ref.coef_**2) / (2 * C * s.sum())
    assert abs(m.objective_ - f) <= 1e-12 * abs(f)


@pytest.mark.parametrize(
    ("solver", "C"), [(s, 0.3) for s in SOLVERS] + [("primal", INF), ("newton-cg", INF)]
)
def test_matches_sklearn_binary(solver, C):
    X, y = _data(k=2, seed=2)
    ref = _sklearn(X, y, C)
    m = SoftmaxRegression(C=C, tol=1e-11, solver=solver).fit(X, y)
    assert m.coef_.shape == (1, 6) and m.intercept_.shape == (1,)
    assert _rel(m.coef_, ref.coef_) <= 1e-6
    assert _rel(m.intercept_, ref.intercept_) <= 1e-6
    assert m.decision_function(X).shape == (len(y),)
    np.testing.assert_allclose(m.predict_proba(X), ref.predict_proba(X), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(
        m.predict_log_proba(X), ref.predict_log_proba(X), rtol=1e-6, atol=1e-12
    )


def test_regimes_agree_where_d_exceeds_n():
    X, y = _data(n=20, d=40, k=5, seed=3)
    fits = {s: SoftmaxRegression(C=0.5, tol=1e-12, solver=s).fit(X, y) for s in SOLVERS}
    # on the row space of X (d = n = 20): n(K−1) = 80 < Kd' = 105
    assert SoftmaxRegression(C=0.5).fit(X, y).solver_ == "dual"
    for s in ("dual", "newton-cg"):
        assert _rel(fits[s].coef_, fits["primal"].coef_) <= 1e-9
        assert _rel(fits[s].intercept_, fits["primal"].intercept_) <= 1e-9
    ref = _sklearn(X, y, 0.5)
    assert _rel(fits["dual"].coef_, ref.coef_) <= 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_more_features_than_samples_matches_sklearn_and_the_full_gradient(solver):
    # d = 60 > 1.5 n: the fit runs on the row space of X (n × n data) and maps back.
    X, y = _data(n=25, d=60, k=4, seed=8)
    sw = np.random.default_rng(2).uniform(0.5, 2, len(y))
    ref = _sklearn(X, y, 0.7, sample_weight=sw)
    m = SoftmaxRegression(C=0.7, tol=1e-10, solver=solver).fit(X, y, sample_weight=sw)
    assert m.coef_.shape == (4, 60)
    assert _rel(m.coef_, ref.coef_) <= 1e-6
    assert _rel(m.intercept_, ref.intercept_) <= 1e-6
    # max |∇f| ≤ tol in the original coordinates, by autograd on F.cross_entropy
    W = torch.tensor(m.coef_, requires_grad=True)
    b = torch.tensor(m.intercept_, requires_grad=True)
    c = torch.as_tensor(sw / sw.sum())
    z = torch.as_tensor(X) @ W.T + b
    loss = (c * F.cross_entropy(z, torch.as_tensor(y), reduction="none")).sum()
    loss = loss + (W * W).sum() / (2 * 0.7 * sw.sum())
    gw, gb = torch.autograd.grad(loss, (W, b))
    assert max(float(gw.abs().max()), float(gb.abs().max())) <= 1e-10 * (1 + 1e-6)


def test_more_features_than_samples_warm_start_without_penalty_keeps_the_start():
    # Without a penalty, the part of W outside the row space of X changes no logit; a
    # fit with max_iter=0 must hand back the starting coefficients unchanged.
    X, y = _data(n=10, d=30, k=3, seed=9)
    m = SoftmaxRegression(C=INF, warm_start=True, max_iter=0)
    m.coef_ = np.random.default_rng(1).standard_normal((3, 30))
    m.coef_ -= m.coef_.mean(0)
    m.intercept_ = np.array([0.5, -0.25, -0.25])
    start = m.coef_.copy()
    with pytest.warns(ConvergenceWarning):
        m.fit(X, y)
    np.testing.assert_allclose(m.coef_, start, rtol=0, atol=1e-13)


@pytest.mark.parametrize("weighted", [False, True])
def test_full_kronecker_preconditioner_inverts_the_hessian_when_probabilities_agree(weighted):
    # W = 0 gives every sample the same p, so J_i = J and H = (X̃ᵀ C X̃) ⊗ J + λI_W exactly;
    # without an intercept λ covers every coordinate and the preconditioner is H⁻¹ on
    # the centred subspace.
    X, y = _data(n=40, d=5, k=4, seed=10)
    gen = torch.Generator().manual_seed(0)
    c = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1 if weighted else torch.ones(40)
    c = (c / c.sum()).double()
    prob = Problem(torch.as_tensor(X), torch.as_tensor(y), c, 4, 0.03, False)
    W = torch.zeros(4, 5, dtype=torch.float64)
    _, P = prob.value(W, prob.logits(W, torch.zeros(4, dtype=torch.float64)))
    pre = _FullKroneckerPreconditioner(prob, P)
    V = _centre(torch.randn(4, 5, generator=gen, dtype=torch.float64))
    PT = P.T.contiguous()
    HV = prob.hvp(PT, PT * c, V)
    assert float((pre(HV) - V).abs().max()) <= 1e-12 * float(V.abs().max())


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_newton_cg_without_the_copy_of_x_and_with_a_sampled_preconditioner(
    monkeypatch, fit_intercept
):
    # Over the copy budget X and the intercept column are multiplied separately, and the
    # full Kronecker preconditioner is estimated from every ⌈n / rows⌉-th sample.
    import softjac.linear_model._solvers as solvers

    monkeypatch.setattr(solvers, "_AUGMENT_BYTES", 0)
    monkeypatch.setattr(solvers, "_KRON_ROWS", 40)
    X, y = _data(n=150, d=6, k=4, seed=11)
    m = SoftmaxRegression(fit_intercept=fit_intercept, tol=1e-11, solver="newton-cg").fit(X, y)
    ref = _sklearn(X, y, 1.0, fit_intercept)
    assert _rel(m.coef_, ref.coef_) <= 1e-6
    if fit_intercept:
        assert _rel(m.intercept_, ref.intercept_) <= 1e-6


def test_blocked_gradient_product_and_fit(monkeypatch):
    # Rᵀ X̃ accumulated over column blocks of X̃ᵀ (long data) equals the one product.
    import softjac.linear_model._solvers as solvers

    X, y = _data(n=150, d=6, k=4, seed=12)
    Xt = torch.as_tensor(X)
    c = torch.full((150,), 1 / 150, dtype=torch.float64)
    RT = torch.randn(4, 150, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Xa = torch.cat([Xt, torch.ones(150, 1, dtype=torch.float64)], dim=1)
    monkeypatch.setattr(solvers, "_XTR_CHUNK", 16)
    prob = Problem(Xt, torch.as_tensor(y), c, 4, 0.01, True)
    torch.testing.assert_close(prob.xtr_t(RT), RT @ Xa, rtol=1e-13, atol=1e-13)
    m = SoftmaxRegression(tol=1e-11, solver="newton-cg").fit(X, y)
    assert _rel(m.coef_, _sklearn(X, y).coef_) <= 1e-6


def test_small_fits_run_on_one_thread_and_restore_the_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cpu = torch.device("cpu")
        with serial_if_small(cpu, 1000):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with serial_if_small(cpu, 10**9):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), serial_if_small(cpu, 1000):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        X, y = _data(n=40, d=30, k=4)
        with pytest.raises(MemoryError):
            SoftmaxRegression(solver="primal", max_bytes=100_000).fit(X, y)
        assert torch.get_num_threads() == 2
        m = SoftmaxRegression(tol=1e-10).fit(X, y)
        assert torch.get_num_threads() == 2
        assert _rel(m.coef_, _sklearn(X, y).coef_) <= 1e-6
    finally:
        torch.set_num_threads(before)


def test_sample_weight_equals_repetition():
    X, y = _data(n=60, seed=4)
    w = np.random.default_rng(0).integers(0, 4, len(y))
    a = SoftmaxRegression(tol=1e-11).fit(X, y, sample_weight=w)
    b = SoftmaxRegression(tol=1e-11).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    assert _rel(a.coef_, b.coef_) <= 1e-9
    assert _rel(a.intercept_, b.intercept_) <= 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
def test_sparse_equals_dense(solver):
    X, y = _data(n=80, seed=6)
    X[np.abs(X) < 0.7] = 0.0
    dense = SoftmaxRegression(tol=1e-11, solver=solver).fit(X, y)
    formats = (
        (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix) if solver == "primal" else (sp.csr_matrix,)
    )
    for fmt in formats:
        sparse = SoftmaxRegression(tol=1e-11, solver=solver).fit(fmt(X), y)
        assert _rel(sparse.coef_, dense.coef_) <= 1e-9
        np.testing.assert_allclose(sparse.predict_proba(fmt(X)), dense.predict_proba(X), rtol=1e-9)


def test_any_label_type():
    X, y = _data(k=3, seed=7)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    a = SoftmaxRegression(tol=1e-10).fit(X, names)
    b = SoftmaxRegression(tol=1e-10).fit(X, y)
    assert list(a.classes_) == ["setosa", "versicolor", "virginica"]
    np.testing.assert_array_equal(a.predict(X), a.classes_[b.predict(X)])
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-12, atol=0)


# -- torch in, torch out; dtypes; devices -------------------------------------------------


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensors_in_tensors_out(device, dtype):
    X, y = _data(seed=8)
    ref = SoftmaxRegression(tol=1e-11).fit(X, y)
    Xt = torch.as_tensor(X, dtype=dtype, device=device)
    yt = torch.as_tensor(y, device=device)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    m = SoftmaxRegression(tol=tol).fit(Xt, yt)
    for a in (m.coef_, m.intercept_):
        assert isinstance(a, torch.Tensor) and a.dtype == dtype and a.device.type == device
    proba = m.predict_proba(Xt)
    assert isinstance(proba, torch.Tensor) and proba.dtype == dtype
    pred = m.predict(Xt)
    assert isinstance(pred, torch.Tensor) and pred.device.type == device
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    assert _rel(m.coef_.cpu().numpy(), ref.coef_) <= rtol
    # NumPy in after a tensor fit gives NumPy out
    assert isinstance(m.predict_proba(X), np.ndarray)
    assert m.score(Xt, yt) == ref.score(X, y)


def test_float32_numpy_keeps_float32_and_dtype_parameter():
    X, y = _data(seed=9)
    m = SoftmaxRegression(tol=1e-5).fit(X.astype(np.float32), y)
    assert m.coef_.dtype == np.float32
    m64 = SoftmaxRegression(tol=1e-5, dtype="float64").fit(X.astype(np.float32), y)
    assert m64.coef_.dtype == np.float64
    ref = _sklearn(X.astype(np.float32).astype(np.float64), y)
    assert _rel(m.coef_, ref.coef_) <= 1e-4
    assert _rel(m64.coef_, ref.coef_) <= 1e-5


def test_warm_start_converges_immediately():
    X, y = _data(seed=10)
    m = SoftmaxRegression(tol=1e-10, warm_start=True).fit(X, y)
    first = m.coef_.copy()
    m.fit(X, y)
    assert m.n_iter_ == 0
    np.testing.assert_allclose(m.coef_, first, rtol=1e-14, atol=1e-16)
    cold = SoftmaxRegression(tol=1e-10, max_iter=2)
    with pytest.warns(ConvergenceWarning):
        cold.fit(X, y)


def test_convergence_warning_at_max_iter():
    X, y = _data(seed=11)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        m = SoftmaxRegression(max_iter=1, tol=1e-12).fit(X, y)
    assert m.n_iter_ == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SoftmaxRegression(tol=1e-8).fit(X, y)


def test_verbose_prints_each_step(capsys):
    X, y = _data(seed=12)
    m = SoftmaxRegression(verbose=1).fit(X, y)
    out = capsys.readouterr().out
    assert out.count("Newton iteration") == m.n_iter_ >= 1


# -- regime choice and the memory budget ------------------------------------------------------


def _choose(solver, n, d, k, **kw):
    args = dict(
        fit_intercept=True, penalised=True, sparse=False, itemsize=8, max_bytes=2**32, fn="f"
    )
    args.update(kw)
    return choose_solver(solver, n, d, k, **args)


def test_auto_regime_choice():
    # Kd' = 18: the whole Hessian is cheaper than a few Hessian-vector products
    assert _choose("auto", 500, 5, 3) == "primal"
    # n(K−1) = 180 ≪ Kd' = 10010: the Gram matrix is small
    assert _choose("auto", 20, 1000, 10) == "dual"
    assert _choose("auto", 20, 1000, 10, penalised=False) != "dual"
    # large n·d·K: products only
    assert _choose("auto", 10**6, 1000, 10) == "newton-cg"
    # the budget rules out the Hessian (8 · 1010² bytes)
    assert _choose("auto", 10**5, 100, 10, max_bytes=4 * 2**20) == "newton-cg"
    # sparse X: once densifying it would take over a quarter of the budget the dense regimes
    # are dropped (here where dense X of the same size gets the dual regime)
    assert _choose("auto", 10, 100, 2, max_bytes=4096) == "dual"
    assert _choose("auto", 10, 100, 2, sparse=True, max_bytes=4096) == "newton-cg"


def test_memory_budget_error_suggests_a_regime():
    X, y = _data(n=40, d=30, k=4)
    with pytest.raises(
        MemoryError, match=r"solver='primal' needs about .* solver='newton-cg' fits"
    ):
        SoftmaxRegression(solver="primal", max_bytes=100_000).fit(X, y)
    m = SoftmaxRegression(max_bytes=100_000).fit(X, y)
    assert m.solver_ == "newton-cg"


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input():
    X, y = _data(n=20, k=3)
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SoftmaxRegression().fit(Xn, y)
    Xi = X.copy()
    Xi[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        SoftmaxRegression().fit(Xi, y)
    with pytest.raises(ValueError, match="infinity"):
        SoftmaxRegression().fit(torch.as_tensor(Xi), torch.as_tensor(y))
    with pytest.raises(ValueError, match=r"only one class: 1\.0"):
        SoftmaxRegression().fit(X, np.ones(20))
    with pytest.raises(ValueError, match=r"(?i)negative"):
        SoftmaxRegression().fit(X, y, sample_weight=-np.ones(20))
    with pytest.raises(ValueError, match=r"sample_weight.shape == \(19,\), expected \(20,\)"):
        SoftmaxRegression().fit(X, y, sample_weight=np.ones(19))
    with pytest.raises(ValueError, match="0 sample"):
        SoftmaxRegression().fit(X[:0], y[:0])
    with pytest.raises(ValueError, match="0 samples"):
        SoftmaxRegression().fit(torch.as_tensor(X[:0]), torch.as_tensor(y[:0]))
    with pytest.raises(ValueError, match=r"`SoftmaxRegression\.fit`: `C` must be a positive"):
        SoftmaxRegression(C=0).fit(X, y)
    with pytest.raises(ValueError, match="`solver` must be one of"):
        SoftmaxRegression(solver="lbfgs").fit(X, y)
    with pytest.raises(ValueError, match="solver='dual' needs a penalty"):
        SoftmaxRegression(C=float("inf"), solver="dual").fit(X, y)
    m = SoftmaxRegression().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but SoftmaxRegression is expecting 6"):
        m.predict(X[:, :5])
    with pytest.raises(ValueError, match="X has 5 features"):
        m.predict(torch.as_tensor(X[:, :5]))


# -- scikit-learn's own estimator checks ---------------------------------------------------------


@parametrize_with_checks([SoftmaxRegression()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
