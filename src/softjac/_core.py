"""Layer 2: the core math of softmax and its derivatives, on the last dimension.

Everything here works on tensors whose class dimension is the *last* one, in the dtype it is
given (callers up-cast half types to float32 first, see :func:`softjac._checks.as_float_dtype`),
and knows nothing of autograd, ``dim`` handling or validation. These are the pure-PyTorch
implementations; ``softjac.kernels`` provides fused versions of the hot ones and is tested
against these.

Accuracy (``shared/MATH.md``, "Accuracy on extreme logits"):

* ``σ = exp(z − lse(z))`` with masked (−inf) entries giving exactly 0 and a fully masked
  slice giving all zeros (the log-sum-exp of an empty slice is replaced by 0, never −inf).
* Only the argmax ``i*`` can have ``σ_i > 1/2``, so ``1 − σ_i`` is formed by subtraction for
  every other entry and as ``r = Σ_{j≠i*} σ_j`` for ``i*``.
* ``J v = σ ⊙ (v − ⟨σ, v⟩)`` cancels in entry ``i*``; there it is evaluated as
  ``σ_{i*} · Σ_{j≠i*} σ_j (v_{i*} − v_j)``, which has no cancellation beyond what the data
  itself has.
"""

from __future__ import annotations

import torch

__all__ = [
    "argmax_index",
    "hessian_last",
    "hvp_last",
    "jacobian_last",
    "log_softmax_jacobian_last",
    "log_softmax_last",
    "masked_scaled_logits",
    "max_complement",
    "softmax_last",
    "vjp_last",
]


def masked_scaled_logits(
    z: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """``z / T`` with the entries where ``mask`` is False set to −inf (a new tensor)."""
    out = z / temperature if temperature != 1.0 else z
    if mask is not None:
        out = out.masked_fill(~mask, float("-inf"))
    return out


def _safe_max(z: torch.Tensor) -> torch.Tensor:
    """Row maximum (keepdim) with non-finite maxima (fully masked rows) replaced by 0."""
    m = z.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def log_softmax_last(z: torch.Tensor) -> torch.Tensor:
    """``log σ(z)`` over the last dim; masked (−inf) entries give −inf, and so does a fully
    masked row (log 0), without NaN."""
    m = _safe_max(z)
    shifted = z - m
    s = shifted.exp().sum(dim=-1, keepdim=True)
    return shifted - torch.where(s > 0, s, torch.ones_like(s)).log()


def softmax_last(z: torch.Tensor) -> torch.Tensor:
    """``σ(z) = exp(z − max z) / Σ exp(z − max z)`` over the last dim; zeros for a fully
    masked row. O(K) per row."""
    m = _safe_max(z)
    e = (z - m).exp()
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def argmax_index(p: torch.Tensor) -> torch.Tensor:
    """Index of the largest entry of each row, shape ``(..., 1)`` (int64)."""
    return p.argmax(dim=-1, keepdim=True)


def max_complement(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``r = Σ_{j≠i*} p_j`` (keepdim), i.e. ``1 − p_{i*}`` without cancellation."""
    return p.scatter(-1, idx, 0.0).sum(dim=-1, keepdim=True)


def vjp_last(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v = p ⊙ (v − ⟨p, v⟩)`` with ``J = diag(p) − p pᵀ``; O(K) per row, J never formed.

    The argmax entry is ``p_{i*} Σ_{j≠i*} p_j (v_{i*} − v_j)`` (no cancellation). J is
    symmetric, so this is both the VJP and the JVP.
    """
    s = (p * v).sum(dim=-1, keepdim=True)
    out = p * (v - s)
    idx = argmax_index(p)
    v_star = v.gather(-1, idx)
    t = (p * (v_star - v)).scatter(-1, idx, 0.0).sum(dim=-1, keepdim=True)
    return out.scatter(-1, idx, p.gather(-1, idx) * t)


def jacobian_last(p: torch.Tensor) -> torch.Tensor:
    """Dense ``J = diag(p) − p pᵀ`` of shape ``(..., K, K)``; O(K²) per row.

    The diagonal is ``p_i (1 − p_i)`` with ``1 − p_{i*}`` taken as ``Σ_{j≠i*} p_j``.
    """
    idx = argmax_index(p)
    one_minus = (1 - p).scatter(-1, idx, max_complement(p, idx))
    jac = -(p.unsqueeze(-1) * p.unsqueeze(-2))
    jac.diagonal(dim1=-2, dim2=-1).copy_(p * one_minus)
    return jac


def log_softmax_jacobian_last(p: torch.Tensor) -> torch.Tensor:
    """Dense ``∂ log σ / ∂z = I − 1 pᵀ`` restricted to the support (rows of entries with
    ``p_i = 0`` are zero: ``log σ_i = −∞`` is constant there); O(K²) per row.

    The diagonal entry of the argmax, ``1 − p_{i*}``, is taken as ``Σ_{j≠i*} p_j``.
    """
    keep = (p > 0).to(p.dtype)
    out = -(keep.unsqueeze(-1) * p.unsqueeze(-2))
    idx = argmax_index(p)
    diag = (keep * (1 - p)).scatter(-1, idx, max_complement(p, idx))
    out.diagonal(dim1=-2, dim2=-1).copy_(diag * keep)
    return out


def hvp_last(p: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(∇² ⟨w, σ⟩) v = b ⊙ v − b ⟨p, v⟩ − p ⟨b, v⟩`` with ``b = J w``; O(K) per row."""
    b = vjp_last(p, w)
    pv = (p * v).sum(dim=-1, keepdim=True)
    bv = (b * v).sum(dim=-1, keepdim=True)
    return b * v - b * pv - p * bv


def hessian_last(p: torch.Tensor) -> torch.Tensor:
    """``H[..., i, j, k] = ∂²σ_i / ∂z_j ∂z_k = J_ij (δ_ik − p_k) − p_i J_jk``; O(K³) per row.

    (Equal to ``σ_i(δ_ij − σ_j)(δ_ik − σ_k) − σ_iσ_j(δ_jk − σ_k)``, ``shared/MATH.md``.)
    """
    jac = jacobian_last(p)
    idx = argmax_index(p)
    lsj = -p.unsqueeze(-2).expand(jac.shape).clone()  # [i, k] = δ_ik − p_k
    lsj.diagonal(dim1=-2, dim2=-1).copy_((1 - p).scatter(-1, idx, max_complement(p, idx)))
    first = jac.unsqueeze(-1) * lsj.unsqueeze(-2)  # [i, j, k] = J_ij (δ_ik − p_k)
    second = p[..., :, None, None] * jac.unsqueeze(-3)  # [i, j, k] = p_i J_jk
    return first - second
