"""Pure-PyTorch implementations of the dispatched primitives (``backend="torch"``).

These are the fallbacks on every device and the reference the fast kernels are tested
against; the contract each function meets is in ``softjac.kernels.dispatch``.
"""

from __future__ import annotations

import torch

from softjac import _core
from softjac._checks import as_float_dtype

__all__ = [
    "cross_entropy_backward",
    "cross_entropy_forward",
    "softmax_jacobian_dense",
    "softmax_vjp",
    "softmax_vjp_from_logits",
]


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(as_float_dtype(x.dtype))


def softmax_vjp(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` by ``softjac._core.vjp_last`` in at least float32."""
    return _core.vjp_last(_up(probs), _up(v)).to(probs.dtype)


def softmax_vjp_from_logits(
    logits: torch.Tensor, lse: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``J v`` with ``σ = exp(z − lse)`` (masked −inf logits give σ = 0 whatever ``lse`` is)."""
    z = _up(logits)
    probs = torch.where(z == float("-inf"), torch.zeros((), dtype=z.dtype), (z - lse).exp())
    return _core.vjp_last(probs, _up(v)).to(logits.dtype)


def softmax_jacobian_dense(probs: torch.Tensor) -> torch.Tensor:
    """Dense ``diag(σ) − σσᵀ`` by ``softjac._core.jacobian_last``."""
    return _core.jacobian_last(_up(probs)).to(probs.dtype)


def _smoothing_terms(logits32, target, weight, ignore_index, label_smoothing):
    k = logits32.shape[-1]
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    if weight is None:
        w = torch.ones(k, dtype=torch.float32, device=logits32.device)
    else:
        w = weight.float()
    w_y = torch.where(valid, w[safe_t], torch.zeros((), device=logits32.device))
    return valid, safe_t, w, w_y


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float()
    k = z.shape[-1]
    lse = torch.logsumexp(z, dim=-1)
    valid, safe_t, w, w_y = _smoothing_terms(z, target, weight, ignore_index, label_smoothing)
    nll = lse - z.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    loss = (1 - label_smoothing) * w_y * nll
    if label_smoothing > 0:
        smooth = (w * (lse.unsqueeze(-1) - z)).sum(-1)
        loss = loss + (label_smoothing / k) * torch.where(valid, smooth, torch.zeros_like(smooth))
    return loss, lse


def cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    z = logits.float()
    k = z.shape[-1]
    valid, safe_t, w, w_y = _smoothing_terms(z, target, weight, ignore_index, label_smoothing)
    p = (z - lse.unsqueeze(-1)).exp()
    eps = label_smoothing
    coef = (1 - eps) * w_y + (eps / k) * torch.where(
        valid, w.sum(), torch.zeros((), device=z.device)
    )
    g = p * coef.unsqueeze(-1)
    g = g.scatter_add(-1, safe_t.unsqueeze(-1), (-(1 - eps) * w_y).unsqueeze(-1))
    if eps > 0:
        g = g - (eps / k) * w * valid.unsqueeze(-1)
    g = g * grad_rows.float().unsqueeze(-1)
    if inplace:
        return logits.copy_(g)
    return g.to(logits.dtype)
