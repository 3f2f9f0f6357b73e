"""Layer 1: dense, obviously correct formulas — the tutorial's math, used as the test oracle.

These are written for clarity, not accuracy or speed: float64, the class dimension last,
``σ`` from the shifted exponentials, and ``J = diag(σ) − σσᵀ`` formed literally. They are what
the fast and accurate paths are checked against in ordinary (non-extreme) regimes; on extreme
logits the tests use an mpmath reference instead.
"""

from __future__ import annotations

import torch

__all__ = ["hessian_ref", "jacobian_ref", "softmax_ref", "vjp_ref"]


def softmax_ref(z: torch.Tensor) -> torch.Tensor:
    """``σ = exp(z − max z) / Σ exp(z − max z)`` over the last dim, in float64 (masked −inf
    entries give 0; a fully masked row gives zeros)."""
    z = z.double()
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def jacobian_ref(z: torch.Tensor) -> torch.Tensor:
    """``J = diag(σ) − σσᵀ`` (the tutorial's ``diag_embed(σ) − σ σᵀ``), float64, ``(..., K, K)``."""
    p = softmax_ref(z)
    return torch.diag_embed(p) - p.unsqueeze(-1) @ p.unsqueeze(-2)


def vjp_ref(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` by a dense matrix-vector product, float64."""
    return (jacobian_ref(z) @ v.double().unsqueeze(-1)).squeeze(-1)


def hessian_ref(z: torch.Tensor) -> torch.Tensor:
    """``H_ijk = σ_i(δ_ij − σ_j)(δ_ik − σ_k) − σ_iσ_j(δ_jk − σ_k)`` term by term, float64."""
    p = softmax_ref(z)
    k = p.shape[-1]
    eye = torch.eye(k, dtype=p.dtype, device=p.device)
    a = eye - p.unsqueeze(-2)  # [i, j] = δ_ij − σ_j
    pi = p[..., :, None, None]
    pj = p[..., None, :, None]
    return pi * a[..., :, :, None] * a[..., :, None, :] - pi * pj * a[..., None, :, :]
