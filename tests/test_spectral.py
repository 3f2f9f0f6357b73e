"""The secular-equation eigen-solver (softjac._spectral) against independent references:
50-digit mpmath secular roots on adversarial logits, float64 dense ``torch.linalg.eigh`` on
benign ones, and hypothesis properties (interlacing, trace, orthogonality)."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softjac import SoftmaxJacobian, _spectral
from softjac._spectral import secular_eigh, secular_eigvalsh, secular_spectral_norm

from ._operator_helpers import (
    ADVERSARIAL,
    dense_reference,
    mp_eigvals,
    mp_softmax,
    rel_err,
    stored_support,
)

F64 = torch.float64


def _probs(z, dtype=F64):
    return torch.softmax(torch.as_tensor(z, dtype=dtype), -1).nan_to_num(0.0)


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test with the fused C loop (when it builds) and with the PyTorch iteration."""
    monkeypatch.setattr(_spectral, "USE_NATIVE", request.param == "native")
    return request.param


def test_native_loop_builds_where_a_compiler_exists():
    from softjac.kernels import _cpu

    if not _cpu.available():  # not built (or disabled): the secular loop is not either
        pytest.skip(f"C kernels unavailable: {_cpu.unavailable_reason()}")
    assert _spectral._native_lib() is not None


def test_native_and_torch_iterations_agree(monkeypatch):
    torch.manual_seed(4)
    for dtype, tol in ((F64, 1e-14), (torch.float32, 1e-5)):
        z = (
            torch.randn(6, 50, dtype=dtype)
            * torch.tensor([0.1, 1, 3, 10, 30, 80], dtype=dtype)[:, None]
        )
        p = torch.softmax(z, -1)
        monkeypatch.setattr(_spectral, "USE_NATIVE", False)
        ref = secular_eigvalsh(p)
        monkeypatch.setattr(_spectral, "USE_NATIVE", True)
        got = secular_eigvalsh(p)
        assert ((got - ref).abs() <= tol * ref.abs()).all()


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_eigvalsh_relative_accuracy_against_mpmath(name, path):
    z = ADVERSARIAL[name]
    ref = mp_eigvals(stored_support(mp_softmax(z)))
    got = SoftmaxJacobian(torch.tensor(z, dtype=F64)).eigvalsh().tolist()
    errs = [rel_err(a, b) for a, b in zip(got, ref, strict=True)]
    assert max(errs) <= 1e-12, (name, errs)
    # the exact zeros are exact
    assert sum(1 for x in got if x == 0) == sum(1 for x in ref if x == 0)


def test_mpmath_reference_agrees_with_dense_mpmath_eigensolver():
    # validates the secular-root reference itself on a benign case
    z = [0.3, -1.2, 2.0, 0.7, 0.7]
    p = mp_softmax(z)
    with mp.workdps(50):
        k = len(p)
        jac = mp.matrix(
            [[(p[i] if i == j else 0) - p[i] * p[j] for j in range(k)] for i in range(k)]
        )
        dense = sorted(mp.eigsy(jac)[0])
    sec = mp_eigvals(p)
    assert max(abs(a - b) for a, b in zip(dense, sec, strict=True)) < mp.mpf(10) ** -40


def test_dense_eigvalsh_loses_relative_accuracy_ours_does_not():
    # σ spans e^0 … e^-180: the small eigenvalues are far below eps·‖J‖.
    z = ADVERSARIAL["wide_tail"]
    ref = mp_eigvals(mp_softmax(z))
    op = SoftmaxJacobian(torch.tensor(z, dtype=F64))
    ours = op.eigvalsh().tolist()
    dense = torch.linalg.eigvalsh(op.to_dense()).tolist()
    ours_err = max(rel_err(a, b) for a, b in zip(ours, ref, strict=True))
    dense_err = max(rel_err(a, b) for a, b in zip(dense, ref, strict=True))
    assert ours_err <= 1e-14
    assert dense_err >= 1e-3  # dense loses (measured ~0.25 and more)


def _clustered(k, dtype=F64):
    z = torch.cat(
        [
            3.0 + 1e-10 * torch.arange(k - 3, dtype=dtype),
            torch.tensor([-4.0, 0.0, 1.0], dtype=dtype),
        ]
    )
    return torch.softmax(z, -1)


@pytest.mark.parametrize("k", [8, 64, 300])
def test_eigenvectors_orthogonal_and_reconstruct_on_clustered(k, path):
    p = _clustered(k)
    lam, q = secular_eigh(p)
    eye = torch.eye(k, dtype=F64)
    assert (q.mT @ q - eye).abs().max() <= 1e-12 * k
    jac = dense_reference(p)
    assert (q @ torch.diag(lam) @ q.mT - jac).abs().max() <= 1e-13
    # each column is an eigenvector: J q = λ q
    assert (jac @ q - q * lam).abs().max() <= 1e-13


def test_ties_deflate_exactly():
    p = _probs([0.0, 0.0, 1.0, 0.0])  # three tied entries
    lam, q = secular_eigh(p)
    s = p[0].item()
    assert (lam == s).sum() == 2  # m − 1 = 2 exact copies of the tied value
    # their eigenvectors are supported on the tied entries and orthogonal to 1 there
    for col in (lam == s).nonzero().flatten().tolist():
        v = q[:, col]
        assert v[2] == 0
        assert abs(v.sum().item()) <= 1e-15
    # a pair gives (e_i − e_j)/√2 exactly
    p2 = _probs([1.0, 0.0, 1.0])
    lam2, q2 = secular_eigh(p2)
    col = (lam2 == p2[0]).nonzero().flatten()
    assert col.numel() == 1
    v = q2[:, col[0]]
    assert v[1] == 0
    assert abs(abs(v[0].item()) - math.sqrt(0.5)) <= 2e-16
    assert v[0] == -v[2]


def test_zero_entries_and_null_vector():
    z = torch.tensor([1.0, float("-inf"), 0.0, float("-inf"), 2.0], dtype=F64)
    p = torch.softmax(z, -1)
    lam, q = secular_eigh(p)
    assert (lam == 0).sum() == 3  # two masked + the null vector
    # masked coordinates: eigenvectors e_1, e_3
    for i in (1, 3):
        cols = (q[i].abs() == 1).nonzero().flatten()
        assert cols.numel() == 1 and lam[cols[0]] == 0
    # the null vector 1_S/√3 is among the zero eigenvalues' eigenvectors
    sup = torch.tensor([1.0, 0, 1, 0, 1], dtype=F64) / math.sqrt(3)
    zero_cols = q[:, lam == 0]
    assert (zero_cols.mT @ sup).abs().max().item() == pytest.approx(1.0, abs=1e-15)


def test_fully_masked_and_trivial_slices():
    p = torch.zeros(2, 4, dtype=F64)
    p[1, 2] = 1.0  # one support entry: J = 0
    assert (secular_eigvalsh(p) == 0).all()
    lam, q = secular_eigh(p)
    assert (lam == 0).all()
    assert torch.equal(q.mT @ q, torch.eye(4, dtype=F64).expand(2, 4, 4))
    assert (secular_spectral_norm(p) == 0).all()
    assert secular_eigvalsh(torch.ones(1, dtype=F64)).tolist() == [0.0]


def test_batched_equals_per_slice_and_dense(path):
    torch.manual_seed(0)
    z = torch.randn(3, 4, 17, dtype=F64) * 2
    p = torch.softmax(z, -1)
    lam = secular_eigvalsh(p)
    assert lam.shape == (3, 4, 17)
    for i in range(3):
        for j in range(4):
            one = secular_eigvalsh(p[i, j])
            assert ((lam[i, j] - one).abs() <= 1e-14 * one.abs()).all()
    ref = torch.linalg.eigvalsh(dense_reference(p))
    assert (lam - ref).abs().max() <= 1e-15
    assert (secular_spectral_norm(p) - ref[..., -1]).abs().max() <= 1e-15


def test_float32_against_float64(path):
    torch.manual_seed(1)
    z = torch.randn(5, 40) * 3
    p32 = torch.softmax(z, -1)
    lam32 = secular_eigvalsh(p32)
    assert lam32.dtype == torch.float32
    lam64 = secular_eigvalsh(p32.double() / p32.double().sum(-1, keepdim=True))
    rel = ((lam32.double() - lam64).abs() / lam64.abs().clamp_min(1e-30)).max()
    assert rel <= 1e-5
    _, q = secular_eigh(p32)
    assert (q.mT @ q - torch.eye(40)).abs().max() <= 1e-5


@st.composite
def _logits(draw):
    k = draw(st.integers(1, 24))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 40.0]))
    vals = draw(st.lists(st.integers(-20, 20), min_size=k, max_size=k))
    masked = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    z = torch.tensor(vals, dtype=F64) * scale / 20
    m = torch.tensor(masked) & (torch.arange(k) > 0)
    return z.masked_fill(m, float("-inf"))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(_logits())
def test_property_interlacing_trace_orthogonality(z):
    p = torch.softmax(z, -1)
    lam, q = secular_eigh(p)
    k = p.numel()
    # ascending, non-negative, ≤ 1/2
    assert (lam[1:] >= lam[:-1]).all()
    assert (lam >= 0).all() and (lam <= 0.5).all()
    # interlacing with the sorted σ: 0 ≤ λ_1 ≤ σ_(1) ≤ λ_2 ≤ … ≤ λ_K ≤ σ_(K)
    s = torch.sort(p).values
    assert (lam <= s).all()
    assert (lam[1:] >= s[:-1]).all()
    # strict between distinct positive values
    for i in range(k - 1):
        if 0 < s[i] < s[i + 1]:
            assert s[i] < lam[i + 1] < s[i + 1]
    # trace = Σλ, ‖J‖_F² = Σλ²
    jac = dense_reference(p)
    assert abs(lam.sum().item() - jac.trace().item()) <= 1e-15 * max(k, 1)
    assert abs((lam**2).sum().item() - (jac**2).sum().item()) <= 1e-15 * max(k, 1)
    # the PyTorch iteration gives the same eigenvalues as the fused C loop
    try:
        _spectral.USE_NATIVE = False
        lam_torch = secular_eigvalsh(p)
    finally:
        _spectral.USE_NATIVE = True
    assert ((lam_torch - lam).abs() <= 1e-14 * lam.abs()).all()
    # orthogonality and reconstruction
    assert (q.mT @ q - torch.eye(k, dtype=F64)).abs().max() <= 1e-13 * max(k, 1)
    assert (q @ torch.diag(lam) @ q.mT - jac).abs().max() <= 1e-15 * max(k, 1)
