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
