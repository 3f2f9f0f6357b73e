"""Tests of ``softjac.check_properties`` and ``softjac.compare_with_autograd``.

References are independent of softjac: the dense float64 formula written here, mpmath, and
deliberately broken Jacobians that the checker must reject.
"""

from __future__ import annotations

import json
import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softjac
from softjac import _verify

NAMES = [
    "symmetry",
    "row/column sums",
    "positive semidefinite",
    "rank",
    "null vector",
    "diagonal",
    "trace",
    "largest eigenvalue",
]
TUTORIAL = [2.0, 1.0, 0.5, -0.5]


def ref_jacobian(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Dense float64 ``(diag(σ) − σσᵀ) / T`` over the last dim."""
    p = torch.softmax(z.double() / temperature, dim=-1)
    return (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / temperature


def mp_lambda_max(z: list[float], digits: int = 40) -> float:
    """Largest eigenvalue of J at ``z`` with mpmath."""
    with mpmath.workdps(digits):
        e = [mpmath.exp(mpmath.mpf(x)) for x in z]
        s = sum(e)
        p = [x / s for x in e]
        k = len(z)
        J = mpmath.matrix(k, k)
        for i in range(k):
            for j in range(k):
                J[i, j] = (p[i] if i == j else 0) - p[i] * p[j]
        evals = mpmath.eigsy(J, eigvals_only=True)
        return float(max(evals[i] for i in range(k)))


# ---------------------------------------------------------------------------------------------
# the examples of docs/cli.md


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tutorial_example_passes_with_lambda_max_0352(dtype):
    report = softjac.check_properties(torch.tensor(TUTORIAL, dtype=dtype))
    assert report.passed
    assert [p.name for p in report.properties] == NAMES
    lam = mp_lambda_max(TUTORIAL)
    assert lam == pytest.approx(0.3521, abs=1e-4)
    assert lam > 0.25  # the tutorial's 1/4 bound is wrong
    assert report["largest eigenvalue"].detail == f"λ_max = {lam:.4g}"
    assert report["rank"].detail == "rank 3, expected 3"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_logits_attain_the_bound_one_half(dtype):
    report = softjac.check_properties(torch.zeros(2, dtype=dtype))
    assert report.passed
    bound = report["largest eigenvalue"]
    assert bound.statement == "λ_max ≤ 1/2"
    # the dense eigenvalues of [[1/4, -1/4], [-1/4, 1/4]] are {0, 1/2} up to rounding
    assert bound.detail == "λ_max = 0.5"
    assert bound.residual <= bound.tolerance


def test_bound_scales_with_temperature():
    report = softjac.check_properties(torch.zeros(2, dtype=torch.float64), temperature=0.25)
    assert report.passed
    assert report["largest eigenvalue"].statement == "λ_max ≤ 1/(2T) = 2"
    assert report["largest eigenvalue"].detail == "λ_max = 2"
    assert report.temperature == 0.25


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, dims


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "dim"), [((7,), -1), ((3, 5), 0), ((2, 6, 4), 1), ((1,), 0)])
def test_random_inputs_pass(dtype, shape, dim):
    g = torch.Generator().manual_seed(sum(shape) + dim)
    z = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    report = softjac.check_properties(z, dim)
    assert report.passed, str(report)
    assert report.num_classes == shape[dim]
    assert report.num_slices == math.prod(shape) // shape[dim]
    assert report.dtype == str(dtype).replace("torch.", "")


def test_non_contiguous_and_extreme_logits_pass():
    z = torch.tensor(
        [[40.0, 0.0, 0.0], [37.42994775023705, 0.0, -1e3], [1e300, 0.0, -1e300]],
        dtype=torch.float64,
    )
    assert softjac.check_properties(z.t(), dim=0).passed
    assert softjac.check_properties(z.float().t()[:, :2], dim=0).passed


def test_nan_or_plus_inf_logits_fail_without_raising():
    z = torch.tensor([[0.0, math.nan, 1.0], [0.0, 1.0, 2.0], [math.inf, 0.0, 1.0]])
    report = softjac.check_properties(z)
    assert not report.passed
    assert report["symmetry"].worst_index in ((0,), (2,))
    json.dumps(report.to_dict(), allow_nan=False)


def test_default_tolerances_scale_with_dtype_and_k():
    for dtype in (torch.float32, torch.float64):
        for k in (2, 10):
            report = softjac.check_properties(torch.zeros(k, dtype=dtype))
            eps = torch.finfo(dtype).eps
            assert report.rtol == pytest.approx(4 * k * eps)
            assert report.atol == pytest.approx(4 * k * eps * torch.finfo(dtype).tiny)
    report = softjac.check_properties(torch.zeros(3), rtol=1e-3, atol=1e-9)
    assert (report.rtol, report.atol) == (1e-3, 1e-9)


def test_default_rtol_includes_the_conditioning_of_softmax():
    # z / T = (0, 32.33): rounding 97 / 3 in float32 moves σ_1 ≈ 9e-15 by ~1e-6 relative, an
    # inherent error (eps · |z_i − max z| / T) that the float64 reference does not share
    z = torch.tensor([0.0, 97.0])
    report = softjac.check_properties(z, temperature=3.0)
    assert report.passed, str(report)
    assert report.rtol == pytest.approx(4 * torch.finfo(torch.float32).eps * (2 + 97 / 3))
    # entries that underflow in the dtype do not widen the tolerance
    report = softjac.check_properties(torch.tensor([0.0, 0.0, -200.0]))
    assert report.rtol == pytest.approx(4 * torch.finfo(torch.float32).eps * 3)


def test_empty_batch_and_k1_and_fully_masked():
    assert softjac.check_properties(torch.zeros(0, 3)).passed
    assert softjac.check_properties(torch.zeros(4, 1)).passed
    z = torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]])
    report = softjac.check_properties(z)
    assert report.passed
    assert "rank" in [p.name for p in report.properties]


# ---------------------------------------------------------------------------------------------
# rank = (number of nonzero σ) − 1


def test_rank_with_masked_entries():
    z = torch.tensor([1.0, -math.inf, 0.0, -math.inf, 2.0], dtype=torch.float64)
    report = softjac.check_properties(z)
    assert report.passed
    rank = report["rank"]
    assert rank.statement == "rank J = #{σ_i > 0} − 1"
    assert rank.detail == "rank 2, expected 2 (2 σ_i = 0)"
    # independent: the dense float64 rank of the formula
    assert torch.linalg.matrix_rank(ref_jacobian(z)).item() == 2


def test_rank_with_a_boolean_mask_matches_minus_inf():
    z = torch.tensor([[1.0, 0.5, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    a = softjac.check_properties(z, mask=mask)
    b = softjac.check_properties(z.masked_fill(~mask, -math.inf))
    assert a.passed and b.passed
    assert a["rank"].detail == b["rank"].detail == "rank 1, expected 1 (2 σ_i = 0)"


def test_rank_counts_underflowed_sigma_in_the_input_dtype():
    # exp(-120) underflows in float32 (the rounded σ_2 is 0) but not in float64; the exact σ_2
    # is positive either way, so rank J = 1, and float32 cannot resolve that eigenvalue
    z = torch.tensor([0.0, -120.0])
    rank = softjac.check_properties(z)["rank"]
    assert rank.detail.startswith("rank 0, expected 1; 1 σ_i below"), rank.detail
    assert rank.passed
    assert softjac.check_properties(z.double())["rank"].detail == "rank 1, expected 1"


def test_rank_tolerates_sigma_below_the_resolution():
    # σ_3 ≈ 1e-22 > 0, so the exact rank is 2, but its eigenvalue (~1e-22) is below
    # eps·K·‖J‖: the deficit of 1 is explained by that σ_i and allowed.
    report = softjac.check_properties(torch.tensor([0.0, 0.0, -50.0], dtype=torch.float64))
    rank = report["rank"]
    assert rank.passed and rank.residual == 1 and rank.tolerance == 1
    assert rank.detail.startswith("rank 1, expected 2; 1 σ_i below")


# ---------------------------------------------------------------------------------------------
# the checker rejects broken Jacobians, and names the worst slice


def _patched_jacobian(monkeypatch, corrupt):
    real = _verify.jacobian

    def fake(*args, **kwargs):
        return corrupt(real(*args, **kwargs).clone())

    monkeypatch.setattr(_verify, "jacobian", fake)


def test_asymmetric_slice_is_found(monkeypatch):
    def corrupt(J):
        J[1, 2, 0, 1] += 1e-3
        return J

    _patched_jacobian(monkeypatch, corrupt)
    z = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    report = softjac.check_properties(z)
    assert not report.passed
    sym = report["symmetry"]
    assert not sym.passed
    assert sym.worst_index == (1, 2)
    assert sym.residual == pytest.approx(1e-3, rel=1e-9)
    assert "NO" in str(report) and "FAILED" in str(report)


def test_naive_diagonal_is_rejected(monkeypatch):
    # σ_1(1 − σ_1) by subtraction gives 0 at z = (40, 0, 0); the truth is 8.5e-18
    def corrupt(J):
        p = torch.softmax(torch.tensor([40.0, 0.0, 0.0], dtype=torch.float64), -1)
        J[0, 0] = p[0] * (1 - p[0])
        return J

    _patched_jacobian(monkeypatch, corrupt)
    report = softjac.check_properties(torch.tensor([40.0, 0.0, 0.0], dtype=torch.float64))
    assert not report["diagonal"].passed
    assert report["diagonal"].residual == pytest.approx(8.5e-18, rel=0.01)


def test_doubled_jacobian_breaks_the_bound(monkeypatch):
    _patched_jacobian(monkeypatch, lambda J: 2 * J)
    report = softjac.check_properties(torch.zeros(2, dtype=torch.float64))
    failed = {p.name for p in report.properties if not p.passed}
    assert failed == {"largest eigenvalue", "diagonal", "trace"}
    assert report["largest eigenvalue"].residual == pytest.approx(0.5)


def test_non_psd_is_rejected(monkeypatch):
    def corrupt(J):
        return J - 0.01 * torch.eye(J.shape[-1], dtype=J.dtype)

    _patched_jacobian(monkeypatch, corrupt)
    report = softjac.check_properties(torch.tensor(TUTORIAL, dtype=torch.float64))
    assert not report["positive semidefinite"].passed
    assert report["positive semidefinite"].residual == pytest.approx(0.01, rel=1e-6)
    assert not report["rank"].passed  # the null vector is gone: rank 4


# ---------------------------------------------------------------------------------------------
# output formats and errors


def test_to_dict_is_strict_json_and_str_is_a_table():
    z = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 1.0, 0.5]])
    report = softjac.check_properties(z)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["passed"] is True
    assert [p["name"] for p in d["properties"]] == NAMES
    assert all(set(p) >= {"statement", "residual", "tolerance", "passed"} for p in d["properties"])
    text = str(report)
    assert text.splitlines()[0].startswith("softmax Jacobian properties: PASSED (8/8)")
    for name in NAMES:
        assert name in text
    assert "slice" in text  # batched: the worst-slice column


def test_errors_name_the_function():
    with pytest.raises(TypeError, match=r"`softjac\.check_properties`"):
        softjac.check_properties([1.0, 2.0])
    with pytest.raises(TypeError, match="floating dtype"):
        softjac.check_properties(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="`dim` must be in"):
        softjac.check_properties(torch.zeros(3), dim=1)
    with pytest.raises(ValueError, match="`rtol` must be a number >= 0"):
        softjac.check_properties(torch.zeros(3), rtol=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        softjac.check_properties(torch.zeros(3), temperature=0.0)
    with pytest.raises(KeyError):
        softjac.check_properties(torch.zeros(3))["no such property"]
    with pytest.raises(ValueError, match=r"`softjac\.compare_with_autograd`"):
        softjac.compare_with_autograd(torch.zeros(3), dim=2)


# ---------------------------------------------------------------------------------------------
# compare_with_autograd


def test_compare_agrees_on_random_batches():
    z = 2 * torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
    cmp = softjac.compare_with_autograd(z, dim=1)
    assert [d.method for d in cmp.differences] == [
        "torch.func.jacrev",
        "torch.autograd.functional.jacobian",
        "central finite differences",
    ]
    assert cmp.num_slices == 12 and cmp.num_skipped == 0
    assert cmp["jacrev"].max_abs < 1e-15
    assert cmp["torch.autograd.functional.jacobian"].max_abs < 1e-15
    assert cmp["central finite differences"].max_abs < 1e-9
    assert cmp.fd_step == pytest.approx(torch.finfo(torch.float64).eps ** (1 / 3))
    json.dumps(cmp.to_dict(), allow_nan=False)
    assert "central finite differences" in str(cmp)


def test_compare_detects_a_corrupted_slice(monkeypatch):
    def corrupt(J):
        J = J.clone()
        J.view(-1, J.shape[-2], J.shape[-1])[5, 1, 1] += 1e-4
        return J

    _patched_jacobian(monkeypatch, corrupt)
    z = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    cmp = softjac.compare_with_autograd(z, dim=-1)
    for d in cmp.differences:
        assert d.max_abs == pytest.approx(1e-4, rel=1e-4)
        assert d.worst_index == (1, 1)  # flat slice 5 of batch shape (2, 4)


def test_compare_with_temperature_mask_and_fully_masked_slices():
    z = torch.tensor([[0.0, 1.0, 2.0], [-math.inf, -math.inf, -math.inf], [3.0, -math.inf, 0.0]])
    cmp = softjac.compare_with_autograd(z, temperature=0.5)
    assert cmp.num_slices == 2 and cmp.num_skipped == 1
    assert cmp.max_abs < 1e-9
    mask = torch.tensor([True, False, True])
    cmp = softjac.compare_with_autograd(torch.randn(4, 3), mask=mask, temperature=3.0)
    assert cmp.max_abs < 1e-9


def test_compare_is_in_float64_whatever_the_input_dtype():
    z = torch.tensor(TUTORIAL, dtype=torch.float16)
    cmp = softjac.compare_with_autograd(z)
    assert cmp.to_dict()["dtype"] == "float64"
    assert cmp["jacrev"].max_abs < 1e-15  # float16 logits are exact in float64


# ---------------------------------------------------------------------------------------------
# no false alarms: the default tolerances accept softjac's Jacobian on adversarial logits


_logit = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -1.0, 37.42994775023705, -math.inf]),
)


@given(
    rows=st.integers(1, 3).flatmap(
        lambda k: st.lists(st.lists(_logit, min_size=k + 1, max_size=k + 1), min_size=1, max_size=3)
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_defaults_accept_adversarial_logits(rows, dtype, temperature):
    z = torch.tensor(rows, dtype=torch.float64).to(dtype)
    report = softjac.check_properties(z, temperature=temperature)
    assert report.passed, str(report)
    cmp = softjac.compare_with_autograd(z, temperature=temperature)
    assert cmp["central finite differences"].max_abs < 1e-8 / temperature
