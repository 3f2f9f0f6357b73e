"""mpmath references at high precision for the accuracy ("golden") tests."""

from __future__ import annotations

import math

import mpmath as mp

DPS = 50


def _mpf(x: float):
    return mp.mpf("-inf") if x == -math.inf else mp.mpf(x)


def softmax(z: list[float], temperature: float = 1.0) -> list:
    """σ of a list of float logits (−inf = masked) with ``DPS`` digits."""
    with mp.workdps(DPS):
        zs = [_mpf(x) / mp.mpf(temperature) for x in z]
        finite = [x for x in zs if x != mp.mpf("-inf")]
        if not finite:
            return [mp.mpf(0)] * len(z)
        m = max(finite)
        e = [mp.mpf(0) if x == mp.mpf("-inf") else mp.exp(x - m) for x in zs]
        s = mp.fsum(e)
        return [x / s for x in e]


def jacobian(z: list[float], temperature: float = 1.0) -> list[list]:
    p = softmax(z, temperature)
    k = len(p)
    with mp.workdps(DPS):
        t = mp.mpf(temperature)
        # 1 − σ_i as Σ_{j≠i} σ_j: at 50 digits, 1 − σ_i itself cancels for σ_i ≈ 1 − 1e-162.
        rest = [mp.fsum(p[j] for j in range(k) if j != i) for i in range(k)]
        return [
            [(p[i] * rest[i] if i == j else -p[i] * p[j]) / t for j in range(k)] for i in range(k)
        ]


def jvp(z: list[float], v: list[float], temperature: float = 1.0) -> tuple[list, list]:
    """Returns ``(J v, scale)`` where ``scale_i = σ_i Σ_j σ_j |v_i − v_j| / T`` bounds the
    size of the terms of entry i (the natural condition of the sum)."""
    p = softmax(z, temperature)
    k = len(p)
    with mp.workdps(DPS):
        t = mp.mpf(temperature)
        vs = [mp.mpf(x) for x in v]
        out, scale = [], []
        for i in range(k):
            out.append(mp.fsum(p[i] * p[j] * (vs[i] - vs[j]) for j in range(k)) / t)
            scale.append(mp.fsum(p[i] * p[j] * abs(vs[i] - vs[j]) for j in range(k)) / t)
        return out, scale
