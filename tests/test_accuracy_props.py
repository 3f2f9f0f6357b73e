"""Property test: every public quantity against mpmath, on logits at the float extremes.

Hypothesis draws float64 and float32 logits with K = 1 … 6, spreads from 0 to 1e4, common
offsets up to 1e8 (and −1e300 in float64, 1e30 in float32, where the spread rounds into
ties), exact ties, masked (−inf) entries and fully masked slices, and vectors from the
subnormal to the overflow range. Each quantity is compared with a 50-digit mpmath
evaluation of its formula from the same (rounded) logits, and must satisfy

    |x̂ − x| ≤ C_q · ε · (1 + Δ) · s + F

where ε is the dtype's machine epsilon, Δ the largest ``|z_i − max z|`` over the entries
whose σ_i the dtype can hold (the conditioning of softmax itself: rounding ``z_i − max z``
moves σ_i by ``ε·|z_i − max z|``; for the factors and log_pdet, which use every entry's
log σ, the largest gap of any unmasked entry), ``s`` the natural size of the entry (below,
per quantity) and ``F`` a floor for gradual underflow (a few times the smallest subnormal;
``K · tiny`` for eigenvalues, which deflate σ below the smallest normal number). ``C_q`` is
the constant in :data:`BOUNDS`; the measured worst cases are in ``docs/operator.md``.

The default run draws a handful of examples per quantity; ``-m slow`` runs the same checks
with many more. ``python -m tests.test_accuracy_props N`` prints the worst measured
``C_q`` over N examples per quantity (what the documented numbers come from).
"""

from __future__ import annotations

import math
import sys

import mpmath as mp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softjac

from ._operator_helpers import mp_eigvals

F64, F32 = torch.float64, torch.float32
DPS = 50

#: C_q per quantity: the asserted constant (about twice the worst case measured over 900
#: drawn cases, see docs/operator.md).
BOUNDS = {
    "softmax": 2.0,
    "jacobian": 6.0,
    "log_softmax_jacobian": 2.0,
    "vjp": 6.0,
    "jvp": 6.0,
    "hvp": 4.0,
    "hessian": 6.0,
    "eigvalsh": 2.0,
    "spectral_norm": 2.0,
    "eigh_orthogonality": 2.0,
    "eigh_reconstruction": 4.0,
    "pinv": 2.0,
    "log_pdet": 2.0,
    "solve_damped": 4.0,
    "logdet_damped": 6.0,
    "frobenius_norm": 3.0,
    "cholesky_factor": 3.0,
    "sqrt_factor": 3.0,
}


# --------------------------------------------------------------------------- the inputs
@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([F64, F32]))
    k = draw(st.integers(1, 6))
    spread = draw(st.sampled_from([0.0, 1e-6, 1.0, 30.0, 300.0, 1e4]))
    offsets = [0.0, 1e3, -1e4] + ([1e8, -1e300] if dtype == F64 else [1e30])
    offset = draw(st.sampled_from(offsets))
    u = draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    z = [offset - spread * x for x in u]
    for i in range(1, k):  # exact ties
        if draw(st.integers(0, 4)) == 0:
            z[i] = z[draw(st.integers(0, i - 1))]
    for i in range(k):  # masked entries (a fully masked slice now and then)
        if draw(st.integers(0, 5)) == 0:
            z[i] = -math.inf
    z = torch.tensor(z, dtype=dtype).tolist()  # the rounded logits are the exact input
    big = 1.7e308 if dtype == F64 else 3.3e38
    small = 1e-310 if dtype == F64 else 1e-42
    mags = [1.0, small, big / 4]

    def vec():
        m = draw(st.sampled_from(mags))
        xs = draw(st.lists(st.floats(-1.0, 1.0), min_size=k, max_size=k))
        return torch.tensor([m * x for x in xs], dtype=dtype).tolist()

    damping = draw(st.sampled_from([1e-6, 1e-2, 0.5]))
    return dtype, z, vec(), vec(), damping


# --------------------------------------------------------------------------- references
def _softmax(z):
    with mp.workdps(DPS):
        fin = [mp.mpf(x) for x in z if x != -math.inf]
        if not fin:
            return [mp.mpf(0)] * len(z)
        m = max(fin)
        e = [mp.mpf(0) if x == -math.inf else mp.exp(mp.mpf(x) - m) for x in z]
        s = mp.fsum(e)
        return [x / s for x in e]


def _rest(p):
    """``1 − σ_i`` as the sum of the others (exact at this precision)."""
    k = len(p)
    with mp.workdps(DPS):
        return [mp.fsum(p[j] for j in range(k) if j != i) for i in range(k)]


def _deltas(dtype, z, p):
    fin = [x for x in z if x != -math.inf]
    if not fin:
        return 0.0, 0.0
    m = max(fin)
    gaps = [m - x for x in fin]
    tiny = torch.finfo(dtype).tiny
    held = [m - x for x, q in zip(z, p, strict=True) if x != -math.inf and q >= tiny]
    return max(held, default=0.0), max(gaps)


class _Meter:
    """Collects ``(err − F)/(ε·(1 + Δ)·s)`` per entry; ``worst`` is the measured C_q."""

    def __init__(self, name, dtype, delta):
        self.name, self.eps, self.delta = name, torch.finfo(dtype).eps, delta
        self.sub = 2.0 ** (-1074 if dtype == F64 else -149)
        self.fmax = torch.finfo(dtype).max
        self.worst = 0.0

    def add(self, got, want, scale, floor=None, where=""):
        floor = max(4 * self.sub, 0.0 if floor is None else floor)
        want, scale = mp.mpf(want), mp.mpf(scale)
        if math.isinf(got) and abs(want) >= self.fmax and (got > 0) == (want > 0):
            return  # an exact value beyond the float range: ±inf is its honest rounding
        err = abs(mp.mpf(got) - want) if math.isfinite(got) else mp.inf
        unit = self.eps * (1 + self.delta) * scale
        excess = err - floor
        if excess <= 0 or unit * 1e3 >= self.fmax:
            return  # within the floor, or the natural size of the terms is beyond the range
        ratio = float(excess / unit) if unit > 0 else math.inf
        if ratio > self.worst:
            self.worst = ratio
            self.where = f"{where}: got {got!r}, want {mp.nstr(want, 17)}"


def _dense(t):
    return t.double().tolist() if t.ndim else t.item()


# --------------------------------------------------------------------------- the checks
def check(name, case):
    """Run quantity ``name`` on ``case``; return its meter (``worst`` = the measured C_q)."""
    dtype, z, v, w, damping = case
    k = len(z)
    zt = torch.tensor(z, dtype=dtype)
    vt = torch.tensor(v, dtype=dtype)
    wt = torch.tensor(w, dtype=dtype)
    p = _softmax(z)
    rest = _rest(p)
    d_held, d_all = _deltas(dtype, z, p)
    sup = [x != -math.inf for x in z]
    n = sum(sup)
    uses_log = ("log_pdet", "cholesky_factor", "sqrt_factor", "pinv")
    meter = _Meter(name, dtype, d_all if name in uses_log else d_held)
    tiny = torch.finfo(dtype).tiny
    op = softjac.SoftmaxJacobian(zt)
    with mp.workdps(DPS):
        jac = [[p[i] * rest[i] if i == j else -p[i] * p[j] for j in range(k)] for i in range(k)]
        if name == "softmax":
            got = softjac.softmax(zt).tolist()
            for i in range(k):
                meter.add(got[i], p[i], p[i], where=f"σ[{i}]")
        elif name == "jacobian":
            got = softjac.jacobian(zt).tolist()
            for i in range(k):
                for j in range(k):
                    meter.add(got[i][j], jac[i][j], abs(jac[i][j]), where=f"J[{i},{j}]")
        elif name == "log_softmax_jacobian":
            got = softjac.log_softmax_jacobian(zt).tolist()
            for i in range(k):
                for j in range(k):
                    want = 0 if not sup[i] else (rest[i] if i == j else -p[j])
                    meter.add(got[i][j], want, abs(want), where=f"[{i},{j}]")
        elif name in ("vjp", "jvp"):
            got = getattr(softjac, name)(zt, vt).tolist()
            vs = [mp.mpf(x) for x in v]
            # σ below the smallest normal number carries only an absolute accuracy of the
            # smallest float (and is 0 below that): terms σ_j v_j lose up to tiny·|v|
            floor = 4 * tiny * max((abs(x) for x in v), default=0.0)
            # the argmax entry is formed without cancellation: relative to the size of its
            # terms σ_i Σ_j σ_j |v_i − v_j|; the others as σ_i (v_i − ⟨σ, v⟩), relative to
            # σ_i (|v_i| + Σ_j σ_j |v_j|) (v with a large common part cancels there)
            top = max(range(k), key=lambda i: (z[i], -i))
            apv = mp.fsum(p[j] * abs(vs[j]) for j in range(k))
            for i in range(k):
                want = mp.fsum(p[i] * p[j] * (vs[i] - vs[j]) for j in range(k))
                if i == top:
                    scale = mp.fsum(p[i] * p[j] * abs(vs[i] - vs[j]) for j in range(k))
                else:
                    scale = p[i] * (abs(vs[i]) + apv)
                meter.add(got[i], want, scale, floor=floor, where=f"Jv[{i}]")
        elif name == "hvp":
            got = softjac.hvp(zt, wt, vt).tolist()
            floor = 8 * tiny * max((abs(x) for x in w), default=0.0)
            floor *= max((abs(x) for x in v), default=0.0)
            vs = [mp.mpf(x) for x in v]
            ws = [mp.mpf(x) for x in w]
            b = [mp.fsum(p[i] * p[j] * (ws[i] - ws[j]) for j in range(k)) for i in range(k)]
            apw = mp.fsum(p[j] * abs(ws[j]) for j in range(k))
            ab = [p[i] * (abs(ws[i]) + apw) for i in range(k)]  # the size of b's terms
            pv = mp.fsum(p[i] * vs[i] for i in range(k))
            apv = mp.fsum(p[i] * abs(vs[i]) for i in range(k))
            bv = mp.fsum(b[i] * vs[i] for i in range(k))
            abv = mp.fsum(ab[i] * abs(vs[i]) for i in range(k))
            for i in range(k):
                want = b[i] * vs[i] - b[i] * pv - p[i] * bv
                scale = ab[i] * abs(vs[i]) + ab[i] * apv + p[i] * abv
                meter.add(got[i], want, scale, floor=floor, where=f"Hv[{i}]")
        elif name == "hessian":
            got = softjac.hessian(zt).tolist()

            def a(i, j):  # δ_ij − σ_j, with 1 − σ_i as the sum of the others
                return rest[i] if i == j else -p[j]

            for i in range(k):
                for j in range(k):
                    for m in range(k):
                        t1 = p[i] * a(i, j) * a(i, m)
                        t2 = p[i] * p[j] * a(j, m)
                        meter.add(got[i][j][m], t1 - t2, abs(t1) + abs(t2), where=f"H[{i},{j},{m}]")
        elif name in ("eigvalsh", "spectral_norm"):
            want = mp_eigvals(p)
            got = op.eigvalsh().tolist() if name == "eigvalsh" else [op.spectral_norm().item()]
            if name == "spectral_norm":
                want = want[-1:]
            for g, x in zip(got, want, strict=True):
                meter.add(g, x, abs(x), floor=k * tiny, where="λ")
        elif name in ("eigh_orthogonality", "eigh_reconstruction"):
            lam, q = op.eigh()
            q64 = q.double()
            if name == "eigh_orthogonality":
                # ‖QᵀQ − I‖_max in units of K·ε (a float64 product of the stored Q)
                meter.delta = 0.0
                dev = (q64.mT @ q64 - torch.eye(k, dtype=F64)).abs().max().item() if k else 0.0
                meter.add(dev, 0, k, floor=0.0, where="QᵀQ − I")
            else:
                # Σ_m λ_m Q_im Q_jm at 50 digits against J_ij, relative to the size of the
                # sum's terms Σ_m |λ_m Q_im Q_jm|. That is |J_ij| itself when the terms do not
                # cancel, but the exact decomposition can cancel: a tie σ_a = σ_b has the
                # eigenvector (e_a − e_b)/√2, whose term σ_a/2 in entry (a, b) the others cancel
                # down to −σ_aσ_b, and a graded σ (1, 1e-84, …, 1e-118) has eigenvectors with
                # O(1) entries, whose terms ~1e-119 cancel down to J_04 ~ 1e-225.
                lm = [mp.mpf(x) for x in lam.tolist()]
                qm = [[mp.mpf(x) for x in row] for row in q.tolist()]
                for i in range(k):
                    for j in range(k):
                        terms = [lm[m] * qm[i][m] * qm[j][m] for m in range(k)]
                        meter.add(
                            float(mp.fsum(terms)),
                            jac[i][j],
                            abs(jac[i][j]) + mp.fsum(abs(t) for t in terms),
                            floor=4 * k * tiny,
                            where=f"QΛQᵀ[{i},{j}]",
                        )
        elif name == "pinv":
            got = op.pinv().to_dense().tolist()
            inv = [1 / p[i] if sup[i] and p[i] > 0 else mp.mpf(0) for i in range(k)]
            tot = mp.fsum(inv)
            for i in range(k):
                for j in range(k):
                    if not (sup[i] and sup[j]):
                        meter.add(got[i][j], 0, 0, where=f"pinv[{i},{j}]")
                        continue
                    terms = [inv[i] * (i == j), -(inv[i] + inv[j]) / n, tot / n**2]
                    want = mp.fsum(terms)
                    meter.add(got[i][j], want, mp.fsum(abs(x) for x in terms), where=f"[{i},{j}]")
        elif name == "log_pdet":
            got = op.log_pdet().item()
            if n == 0:
                assert got == -math.inf
            else:
                logs = [mp.log(p[i]) for i in range(k) if sup[i]]
                want = mp.fsum(logs) + mp.log(n)
                meter.add(got, want, mp.fsum(abs(x) for x in logs) + mp.log(n), where="log pdet")
        elif name == "solve_damped":
            got = op.solve_damped(vt, damping).tolist()
            a_mat = mp.matrix(jac) + mp.mpf(damping) * mp.eye(k) if k else None
            if k:
                x = mp.lu_solve(a_mat, mp.matrix([mp.mpf(t) for t in v]))
                # normwise: the condition number of J + λI is at most (1/2 + λ)/λ
                size = max(abs(t) for t in x)
                cond = (mp.mpf(0.5) + damping) / damping
                for i in range(k):
                    meter.add(got[i], x[i], min(size * cond, abs(x[i]) + size), where=f"x[{i}]")
        elif name == "logdet_damped":
            got = op.logdet_damped(damping).item()
            if k:
                want = mp.log(mp.det(mp.matrix(jac) + mp.mpf(damping) * mp.eye(k)))
                scale = mp.fsum(abs(mp.log(p[i] + damping)) for i in range(k)) + 1
                meter.add(got, want, scale, where="logdet")
        elif name == "frobenius_norm":
            got = op.frobenius_norm().item()
            want = mp.sqrt(mp.fsum(jac[i][j] ** 2 for i in range(k) for j in range(k)))
            meter.add(got, want, want, where="‖J‖_F")
        elif name == "cholesky_factor":
            got = op.cholesky_factor().to_dense().tolist()
            c = [mp.fsum(p[j] for j in range(i + 1, k)) for i in range(k)]
            for i in range(k):
                ci1 = p[i] + c[i]
                for j in range(k):
                    if c[i] == 0 or j < i:
                        want = mp.mpf(0)
                    elif j == i:
                        want = mp.sqrt(p[i] * c[i] / ci1)
                    else:
                        want = -p[j] * mp.sqrt(p[i] / (ci1 * c[i]))
                    # dense is L: row j, column i
                    meter.add(got[j][i], want, abs(want), floor=4 * tiny, where=f"L[{j},{i}]")
        elif name == "sqrt_factor":
            got = op.sqrt_factor().to_dense().tolist()
            for i in range(k):
                for j in range(k):
                    want = mp.sqrt(p[i]) * rest[i] if i == j else -p[i] * mp.sqrt(p[j])
                    meter.add(got[i][j], want, abs(want), floor=4 * tiny, where=f"S[{i},{j}]")
        else:  # pragma: no cover - a typo in BOUNDS
            raise KeyError(name)
    return meter


# --------------------------------------------------------------------------- the tests
def _assert(name, case):
    meter = check(name, case)
    assert meter.worst <= BOUNDS[name], (
        f"{name}: C = {meter.worst:.3g} > {BOUNDS[name]} at {meter.where} (case {case!r})"
    )


@pytest.mark.parametrize("name", sorted(BOUNDS))
@settings(max_examples=6)
@given(case=cases())
def test_quantity_within_documented_bound(name, case):
    _assert(name, case)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BOUNDS))
@settings(max_examples=150)
@given(case=cases())
def test_quantity_within_documented_bound_many(name, case):
    _assert(name, case)


def test_the_checks_can_fail():
    # a meter fed a wrong value reports it: the property test is not vacuous
    meter = _Meter("softmax", F64, 0.0)
    meter.add(0.5 + 1e-12, mp.mpf(0.5), mp.mpf(0.5))
    assert meter.worst > BOUNDS["softmax"]


def _measure(n: int) -> dict[str, tuple[float, str]]:  # pragma: no cover - a tool
    import warnings

    warnings.simplefilter("ignore")
    strategy = cases()
    drawn = [strategy.example() for _ in range(n)]
    out = {}
    for name in sorted(BOUNDS):
        worst, where = 0.0, ""
        for case in drawn:
            meter = check(name, case)
            if meter.worst > worst:
                worst, where = meter.worst, f"{meter.where} {case!r}"
        out[name] = (worst, where)
    return out


if __name__ == "__main__":  # pragma: no cover
    for name, (worst, where) in _measure(int(sys.argv[1]) if len(sys.argv) > 1 else 50).items():
        print(f"{name:22s} C = {worst:8.3f}   {where}", flush=True)
