"""Independent references for the SoftmaxJacobian / secular-solver tests.

* float64 dense: ``J = diag(σ) − σσᵀ`` formed literally from ``torch.softmax``.
* mpmath at 50 digits: σ from the logits, the spectrum by bracketed (geometric) bisection of
  the secular equation in the offset from the nearer pole (no float64 anywhere), and dense
  mpmath linear algebra (inverse, LU solve, determinant) for the closed forms.
"""

from __future__ import annotations

import math

import mpmath as mp
import torch

DPS = 50

#: Adversarial float64 logits: spreads up to 1e3, near-ties, exact ties, clustered σ, masked
#: entries (−inf), K = 1 and 2.
ADVERSARIAL = {
    "k1": [0.0],
    "k2_equal": [0.0, 0.0],
    "k2_far": [37.42994775023705, 0.0],
    "k2_spread700": [700.0, 0.0],
    "tutorial": [2.0, 1.0, 0.5, -0.5],
    "spread1e3": [0.0, -100.0, -250.0, -500.0, -700.0, 10.0],
    "near_tie": [1.0, 1.0 + 1e-13, 0.5, -3.0, 1.0 - 2e-14],
    "exact_ties": [0.0, 0.0, 0.0, 2.0, 2.0, -1.0],
    "clustered": [3.0 + 1e-9 * i for i in range(6)] + [-5.0, 0.0],
    "masked": [1.0, float("-inf"), 3.0, -2.0, float("-inf"), 0.5],
    "one_hot_ish": [60.0, 0.0, -1.0, -2.0],
    "wide_tail": [0.0, -30.0, -60.0, -90.0, -120.0, -150.0, -180.0],
}


def mp_softmax(z: list[float], temperature: float = 1.0) -> list:
    with mp.workdps(DPS):
        fin = [mp.mpf(x) / mp.mpf(temperature) for x in z if x != -math.inf]
        if not fin:
            return [mp.mpf(0)] * len(z)
        m = max(fin)
        e = [
            mp.mpf(0) if x == -math.inf else mp.exp(mp.mpf(x) / mp.mpf(temperature) - m) for x in z
        ]
        s = mp.fsum(e)
        return [x / s for x in e]


def stored_support(p: list, dtype: torch.dtype = torch.float64) -> list:
    """σ with the entries that are below the smallest normal number of ``dtype`` (and so
    outside the operator's support) set to 0, as the operator defines them."""
    tiny = torch.finfo(dtype).tiny
    return [x if x >= tiny else mp.mpf(0) for x in p]


def mp_jacobian(p: list) -> mp.matrix:
    """Dense J from σ at the current precision (at least ``DPS`` digits)."""
    k = len(p)
    with mp.workdps(max(DPS, mp.mp.dps)):
        rest = [mp.fsum(p[j] for j in range(k) if j != i) for i in range(k)]
        return mp.matrix(
            [[p[i] * rest[i] if i == j else -p[i] * p[j] for j in range(k)] for i in range(k)]
        )


def _root(d: list, c: list, lo: int, hi: int) -> mp.mpf:
    """The root of Σ c_j/(d_j − λ) in (d[lo], d[hi]) by geometric bisection of the offset
    from the nearer pole (relative accuracy far below 1e-40)."""

    def g(lam):
        return mp.fsum(cj / (dj - lam) for dj, cj in zip(d, c, strict=True))

    a, b = d[lo], d[hi]
    gap = b - a
    mid = a + gap / 2
    left = g(mid) >= 0
    base = a if left else b
    sgn = 1 if left else -1

    shifted = [dj - base for dj in d]  # exact enough at this precision

    def h(t):  # g at base + sgn·t from the differences, times sgn (increasing in t)
        return mp.fsum(cj / (sj - sgn * t) for sj, cj in zip(shifted, c, strict=True)) * sgn

    t_lo = gap * mp.mpf(10) ** -600
    t_hi = gap / 2
    for _ in range(260):
        t = mp.sqrt(t_lo * t_hi)
        if h(t) > 0:
            t_hi = t
        else:
            t_lo = t
    return base + sgn * mp.sqrt(t_lo * t_hi)


def mp_eigvals(p: list) -> list:
    """All eigenvalues of ``diag(p) − ppᵀ`` (Σp = 1), ascending, at ``DPS`` digits."""
    with mp.workdps(DPS + 20):
        k = len(p)
        pos = sorted(x for x in p if x > 0)
        out = [mp.mpf(0)] * (k - len(pos))
        if pos:
            out.append(mp.mpf(0))
        distinct, counts = [], []
        for x in pos:
            if distinct and x == distinct[-1]:
                counts[-1] += 1
            else:
                distinct.append(x)
                counts.append(1)
        c = [m * x for x, m in zip(distinct, counts, strict=True)]
        for x, m in zip(distinct, counts, strict=True):
            out += [x] * (m - 1)
        for i in range(len(distinct) - 1):
            out.append(_root(distinct, c, i, i + 1))
        return sorted(out)


def mp_pinv(p: list) -> mp.matrix:
    """``J⁺`` from the identity ``(J + 1_S1_Sᵀ/n)⁻¹ = J⁺ + 1_S1_Sᵀ/n`` on the support S,
    with a dense 50-digit inverse (independent of the closed form used by the code)."""
    k = len(p)
    smallest = min((x for x in p if x > 0), default=mp.mpf(1))
    # J + 11ᵀ/n has eigenvalues down to ~min σ: carry enough digits to invert it exactly
    dps = DPS + 20 + int(-mp.log10(smallest))
    with mp.workdps(dps):
        sup = [i for i in range(k) if p[i] > 0]
        n = len(sup)
        out = mp.zeros(k, k)
        if n == 0:
            return out
        jac = mp_jacobian(p)
        a = mp.matrix(n, n)
        for r, i in enumerate(sup):
            for s, j in enumerate(sup):
                a[r, s] = jac[i, j] + mp.mpf(1) / n
        inv = mp.inverse(a)
        for r, i in enumerate(sup):
            for s, j in enumerate(sup):
                out[i, j] = inv[r, s] - mp.mpf(1) / n
        return out


def mp_log_pdet(p: list) -> mp.mpf:
    """log of the product of the nonzero eigenvalues (from :func:`mp_eigvals`); −inf when
    there is no support (the documented convention)."""
    if not any(x > 0 for x in p):
        return mp.mpf("-inf")
    with mp.workdps(DPS + 20):
        ev = mp_eigvals(p)  # the zeros are exact (structural), the other values positive
        return mp.fsum(mp.log(x) for x in ev if x != 0)


def mp_solve_damped(p: list, b: list, lam: float) -> list:
    k = len(p)
    with mp.workdps(DPS + 20):
        a = mp_jacobian(p) + mp.mpf(lam) * mp.eye(k)
        return list(mp.lu_solve(a, mp.matrix([mp.mpf(x) for x in b])))


def mp_logdet_damped(p: list, lam: float) -> mp.mpf:
    k = len(p)
    with mp.workdps(DPS + 20):
        return mp.log(mp.det(mp_jacobian(p) + mp.mpf(lam) * mp.eye(k)))


def dense_reference(p: torch.Tensor) -> torch.Tensor:
    """``diag(σ) − σσᵀ`` literally, in float64."""
    p = p.double()
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def rel_err(got: float, want) -> float:
    """|got − want| / |want| (absolute when want = 0), want an mpmath number."""
    want = mp.mpf(want)
    if want == 0:
        return abs(float(got))
    return float(abs((mp.mpf(got) - want) / want))
