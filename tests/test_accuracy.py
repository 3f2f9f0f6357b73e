"""Golden accuracy tests: every entry relative to its own size, against mpmath at 50 digits.

The bound for an entry x is ``|x̂ − x| ≤ c · eps · (1 + Δ) · scale + tiny`` where Δ is the
largest finite ``|z_i − max z| / T`` (the inherent error of any method, ``docs/math.md``),
``scale`` is ``|x|`` for σ and J and the sum of the magnitudes of the terms of the entry for
``J v``, and ``tiny`` (1e-300) only forgives float64 underflow.
"""

from __future__ import annotations

import math

import pytest
import torch

import softjac
from tests import _mp

EPS = torch.finfo(torch.float64).eps
INF = math.inf
FMAX = 1.7976931348623157e308

CASES = [
    [37.42994775023705, 0.0],
    [40.0, 0.0, 0.0],
    [0.0, 0.0],
    [5.0, 5.0, 5.0, 0.0],
    [1.0, -INF, 2.0, -INF],
    [0.0, -10.0, -100.0, -700.0, -740.0, -1000.0],
    [1000.0, 999.5, -1000.0, 0.0],
    [1e3, 1e3 - 1e-9, 1e3 - 2e-9],
    [FMAX, 0.0, -1.0],
    [FMAX, FMAX, 0.0],
    [-FMAX, 3.0, -3.0],
    [20.0, 19.999999, -15.0, 7.5, 0.25],
    [0.1 * i for i in range(30)],
    [-50.0 * i for i in range(12)],
]
IDS = [f"case{i}" for i in range(len(CASES))]


def _delta(z: list[float], t: float) -> float:
    """Largest ``|z_i − max z| / T`` over the entries whose σ does not underflow."""
    finite = [x for x in z if math.isfinite(x)]
    m = max(finite)
    gaps = [(m - x) / t for x in finite]
    return max(g for g in gaps if g < 800)


def _check(name, got: torch.Tensor, exact, scale, delta: float, c: float = 8.0):
    got = got.flatten().tolist()
    exact = [float(x) for x in exact]
    scale = [float(x) for x in scale]
    for i, (g, x, s) in enumerate(zip(got, exact, scale, strict=True)):
        bound = c * EPS * (1 + delta) * s + 1e-300
        assert abs(g - x) <= bound, f"{name}[{i}]: got {g!r}, exact {x!r}, bound {bound:.3g}"


@pytest.mark.parametrize("t", [1.0, 0.1, 3.0])
@pytest.mark.parametrize("z", CASES, ids=IDS)
def test_softmax_and_jacobian_entries(z, t):
    zt = torch.tensor(z, dtype=torch.float64)
    delta = _delta(z, t)
    p = _mp.softmax(z, t)
    _check("softmax", softjac.softmax(zt, temperature=t), p, [abs(x) for x in p], delta)
    jac = [x for row in _mp.jacobian(z, t) for x in row]
    _check("jacobian", softjac.jacobian(zt, temperature=t), jac, [abs(x) for x in jac], delta)


@pytest.mark.parametrize("t", [1.0, 0.1])
@pytest.mark.parametrize("z", CASES, ids=IDS)
def test_vjp_entries(z, t):
    g = torch.Generator().manual_seed(len(z))
    zt = torch.tensor(z, dtype=torch.float64)
    delta = _delta(z, t)
    for v in (torch.randn(len(z), generator=g, dtype=torch.float64), torch.eye(len(z))[0].double()):
        exact, scale = _mp.jvp(z, v.tolist(), t)
        _check("vjp", softjac.vjp(zt, v, temperature=t), exact, scale, delta)
        _check("jvp", softjac.jvp(zt, v, temperature=t), exact, scale, delta)


def test_golden_two_class_example():
    """TensorFlow's public example: z = [37.42994775023705, 0], v = [1, 0] in float64."""
    z = torch.tensor([37.42994775023705, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = softjac.vjp(z, v)
    assert out[0].item() == 5.551115123125775e-17
    assert out[1].item() == -out[0].item()
    # PyTorch's own backward loses the value entirely (documented motivation).
    zz = z.clone().requires_grad_(True)
    (torch.softmax(zz, 0) @ v).backward()
    assert zz.grad[0].item() == 0.0


def test_diagonal_where_naive_is_zero():
    """σ_i(1 − σ_i) at z = (40, 0, 0): naive gives 0 for the argmax, truth is 8.5e-18."""
    z = [40.0, 0.0, 0.0]
    jac = softjac.jacobian(torch.tensor(z, dtype=torch.float64))
    exact = float(_mp.jacobian(z)[0][0])
    assert exact == pytest.approx(8.5e-18, rel=0.01)
    assert jac[0, 0].item() == pytest.approx(exact, rel=4 * EPS * 41)
    sigma = torch.softmax(torch.tensor(z, dtype=torch.float64), 0)
    assert (sigma[0] * (1 - sigma[0])).item() == 0.0  # the cancellation softjac avoids


def test_vjp_from_probs_argmax_entry_relative():
    z = [30.0, 0.0, -1.0, 2.0]
    p = softjac.softmax(torch.tensor(z, dtype=torch.float64))
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    exact, scale = _mp.jvp(z, v.tolist())
    _check("vjp_from_probs", softjac.vjp_from_probs(p, v), exact, scale, _delta(z, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32])
def test_float32_relative_accuracy(dtype):
    z = [25.0, 0.0, -3.0, 1.0]
    zt = torch.tensor(z, dtype=dtype)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype)
    exact, scale = _mp.jvp(z, v.tolist())
    eps32 = torch.finfo(dtype).eps
    for g, x, s in zip(softjac.vjp(zt, v).tolist(), exact, scale, strict=True):
        assert abs(g - float(x)) <= 8 * eps32 * 26 * float(s)


# ---------------------------------------------------------------- support from the logits
@pytest.mark.parametrize(
    "dtype, gap", [(torch.float32, 120.0), (torch.float32, 105.0), (torch.float64, 800.0)]
)
def test_log_softmax_jacobian_keeps_underflowed_support(dtype, gap):
    # σ_1 = e^-gap underflows to 0, but log σ_1 is finite and moves: row 1 is e_1 − σ
    got = softjac.log_softmax_jacobian(torch.tensor([0.0, -gap], dtype=dtype))
    assert got.tolist() == [[0.0, 0.0], [-1.0, 1.0]]


def test_log_softmax_jacobian_entries_against_mpmath():
    # float32 gaps beyond the exp range of σ (and subnormal σ) next to ordinary entries
    z = [0.0, -1.0, -90.0, -104.0, -120.0, float("-inf"), 2.5]
    got = softjac.log_softmax_jacobian(torch.tensor(z))
    p = _mp.softmax(z)
    eps32 = torch.finfo(torch.float32).eps
    tiny32 = torch.finfo(torch.float32).tiny
    for i in range(len(z)):
        for j in range(len(z)):
            if z[i] == -INF:
                want = 0  # a masked row does not move
            elif i == j:
                want = sum(p[k] for k in range(len(z)) if k != i)  # 1 − σ_i
            else:
                want = -p[j]
            err = abs(got[i, j].item() - float(want))
            assert err <= 8 * eps32 * (1 + 3) * abs(float(want)) + tiny32 * eps32, (i, j)


# ---------------------------------------------------------------- scaled products
def test_vjp_with_cotangent_near_overflow_is_finite_and_exact():
    # |v| near the largest float: v_i·S and v_i* − v_j would overflow without the scaling
    z = [0.0, -1.2]
    v = [1.7e308, -1.7e308]
    want, _ = _mp.jvp(z, v)
    for fn in (softjac.vjp, softjac.jvp):
        got = fn(torch.tensor(z, dtype=torch.float64), torch.tensor(v, dtype=torch.float64))
        assert torch.isfinite(got).all()
        for g, w in zip(got.tolist(), want, strict=True):
            assert abs(g - float(w)) <= 4 * EPS * abs(float(w)), (g, w)
    # float32 likewise (3.4e38)
    got = softjac.vjp(torch.tensor(z), torch.tensor([3.3e38, -3.3e38]))
    want, _ = _mp.jvp(z, [3.3e38, -3.3e38])
    eps32 = torch.finfo(torch.float32).eps
    for g, w in zip(got.tolist(), want, strict=True):
        assert abs(g - float(w)) <= 8 * eps32 * abs(float(w)), (g, w)


def test_vjp_with_subnormal_cotangent_keeps_its_digits():
    z = [0.0, -0.5, 1.0]
    v = [3e-310, -1e-310, 2e-311]
    want, scale = _mp.jvp(z, v)
    got = softjac.vjp(torch.tensor(z, dtype=torch.float64), torch.tensor(v, dtype=torch.float64))
    for g, w, s in zip(got.tolist(), want, scale, strict=True):
        # subnormal results: one unit of the smallest subnormal is the floor
        assert abs(g - float(w)) <= 8 * EPS * float(s) + 5e-324 * 4, (g, w)


def _mp_hvp(z, w, v):
    """(∇²⟨w, σ⟩) v = b⊙v − b⟨σ,v⟩ − σ⟨b,v⟩, b = J w, at 50 digits."""
    p = _mp.softmax(z)
    k = len(z)
    with _mp.mp.workdps(_mp.DPS):
        ws = [_mp.mp.mpf(x) for x in w]
        vs = [_mp.mp.mpf(x) for x in v]
        sw = _mp.mp.fsum(p[i] * ws[i] for i in range(k))
        b = [p[i] * (ws[i] - sw) for i in range(k)]
        pv = _mp.mp.fsum(p[i] * vs[i] for i in range(k))
        bv = _mp.mp.fsum(b[i] * vs[i] for i in range(k))
        return [b[i] * vs[i] - b[i] * pv - p[i] * bv for i in range(k)]


def test_hvp_with_large_and_tiny_vectors_is_finite_and_exact():
    z = [0.3, -1.0, 0.8]
    cases = (
        ([1.7e308, -1.7e308, 0.5e308], [0.3, 0.1, -0.2]),
        ([0.5, -1.0, 2.0], [1.5e308, -1.7e308, 1e308]),
        ([1e-200, 3e-200, 0.0], [1e-170, -1e-170, 2e-170]),
    )
    for w, v in cases:
        want = _mp_hvp(z, w, v)
        got = softjac.hvp(*(torch.tensor(x, dtype=torch.float64) for x in (z, w, v)))
        assert torch.isfinite(got).all()
        size = max(abs(float(x)) for x in want)
        for g, x in zip(got.tolist(), want, strict=True):
            assert abs(g - float(x)) <= 32 * EPS * size, (g, x)


def test_temperature_that_underflows_the_dtype_is_refused():
    z = torch.tensor([1.0, 0.0])
    for call in (
        lambda: softjac.softmax(z, temperature=1e-46),
        lambda: softjac.jacobian(z, temperature=1e-40),
        lambda: softjac.vjp(z, z, temperature=1e-40),
        lambda: softjac.log_softmax_jacobian(z.half(), temperature=1e-39),
    ):
        with pytest.raises(ValueError, match=r"`temperature` must be at least the smallest normal"):
            call()
    # at the smallest normal float32 it works and σ sums to 1
    p = softjac.softmax(z, temperature=torch.finfo(torch.float32).tiny)
    assert p.tolist() == [1.0, 0.0]
    p = softjac.softmax(z.double(), temperature=1e-46)  # float64 holds 1e-46: fine
    assert p.tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_posinf_slices_give_nan_in_dense_and_second_order(bad):
    z = torch.tensor([[0.0, bad, 1.0], [0.0, 1.0, -INF]], dtype=torch.float64)
    w = torch.ones_like(z)
    v = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    for name, out in (
        ("log_softmax_jacobian", softjac.log_softmax_jacobian(z)),
        ("hessian", softjac.hessian(z)),
        ("hvp", softjac.hvp(z, w, v)),
    ):
        assert torch.isnan(out[0]).all(), name
        assert torch.isfinite(out[1]).all(), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_power_of_two_scaling_helpers(dtype):
    from softjac import _core

    fi = torch.finfo(dtype)
    sub = 2.0 ** (-1074 if dtype == torch.float64 else -149)
    x = torch.tensor([[fi.max, -fi.max / 3], [sub, 3 * sub], [1e-3, 2.5], [0.0, 0.0]], dtype=dtype)
    # the cautious exponent: scale down only near overflow, up only below 1, else leave alone
    e = _core.pow2_exponent(x)
    assert e[0].item() > 0 and e[2].item() == 0 and e[3].item() == 0
    assert e[1].item() < 0
    # normalising: every nonzero row to a largest entry in [1/2, 2) (log2 rounds), exactly
    en = _core.pow2_exponent(x, normalise=True)
    y = _core.ldexp(x, -en)
    top = y.abs().amax(-1)
    assert ((top[:3] >= 0.5) & (top[:3] < 2)).all() and top[3] == 0
    assert torch.equal(_core.ldexp(y, en), x)  # exact both ways, subnormals included
    # ldexp of any exponent never makes NaN: 0 stays 0, others saturate to ±inf or 0
    big = torch.tensor([[1e6], [-1e6]], dtype=dtype)
    out = _core.ldexp(torch.tensor([[0.0, 1.0, -1.0]] * 2, dtype=dtype), big)
    assert out.tolist() == [[0.0, math.inf, -math.inf], [0.0, 0.0, -0.0]]
