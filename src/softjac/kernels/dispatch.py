"""Pick the implementation of a hot primitive: ``backend="auto" | "torch" | "triton" | "cpu"``.

Every function here takes tensors whose class dimension is the last one (any strides), accepts
float16/bfloat16/float32/float64 and returns the dtype of its first tensor argument, computing
in at least float32. ``"auto"`` chooses the fastest correct path for the device, dtype and
shape and falls back silently; an explicit backend that cannot run raises ``RuntimeError``
with the reason.

Contract (the kernels issue fills in the fast paths; ``"torch"`` is ``softjac._core``):

* ``softmax_vjp(probs, v)`` → ``J v`` with ``J = diag(σ) − σσᵀ`` (argmax entry accurate).
* ``softmax_vjp_from_logits(logits, lse, v)`` → the same with ``σ = exp(logits − lse)``
  recomputed on the fly (``lse`` of shape ``(..., 1)``, float32 or wider).
* ``softmax_jacobian_dense(probs)`` → ``(..., K, K)``.
* ``cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing)`` on 2-D
  logits ``(N, K)`` and int64 class indices ``(N,)`` → ``(loss_rows, lse)``, both float32 of
  shape ``(N,)``, unreduced, ignored rows giving loss 0. With ``w`` the class weights (ones if
  None) and ``ε`` the smoothing:
  ``loss_n = (1 − ε) w[y_n] (lse_n − z_{n,y_n}) + (ε / K) Σ_c w[c] (lse_n − z_{n,c})``.
* ``cross_entropy_backward(logits, target, lse, grad_rows, weight, ignore_index,
  label_smoothing, inplace=False)`` → ``∂(Σ_n grad_rows[n] · loss_n) / ∂logits`` in the logits
  dtype: ``g_n [σ_n ((1 − ε) w[y_n] + (ε/K) Σ_c w[c]) − (1 − ε) w[y_n] e_{y_n} − (ε/K) w]``,
  zero rows where ``y_n == ignore_index``. ``inplace=True`` writes into ``logits``.
"""

from __future__ import annotations

import torch

from softjac import _core
from softjac._checks import as_float_dtype

__all__ = [
    "BACKENDS",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "softmax_jacobian_dense",
    "softmax_vjp",
    "softmax_vjp_from_logits",
]

BACKENDS = ("auto", "torch", "triton", "cpu")


def _check_backend(fn: str, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"`{fn}`: `backend` must be one of {BACKENDS}. Got {backend!r}.")
    if backend in ("triton", "cpu"):
        raise RuntimeError(f"`{fn}`: backend {backend!r} is not available in this build.")
    return "torch"


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(as_float_dtype(x.dtype))


def softmax_vjp(probs: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    _check_backend("softjac.vjp_from_probs", backend)
    return _core.vjp_last(_up(probs), _up(v)).to(probs.dtype)


def softmax_vjp_from_logits(
    logits: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    _check_backend("softjac.vjp", backend)
    probs = (_up(logits) - lse).exp()
    return _core.vjp_last(probs, _up(v)).to(logits.dtype)


def softmax_jacobian_dense(probs: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    _check_backend("softjac.jacobian", backend)
    return _core.jacobian_last(_up(probs)).to(probs.dtype)


def _smoothing_terms(logits32, target, weight, ignore_index, label_smoothing):
    n, k = logits32.shape
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    w = torch.ones(k, dtype=torch.float32, device=logits32.device) if weight is None else weight.float()
    w_y = torch.where(valid, w[safe_t], torch.zeros((), device=logits32.device))
    return valid, safe_t, w, w_y


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backend("softjac.cross_entropy", backend)
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
    backend: str = "auto",
) -> torch.Tensor:
    _check_backend("softjac.cross_entropy", backend)
    z = logits.float()
    k = z.shape[-1]
    valid, safe_t, w, w_y = _smoothing_terms(z, target, weight, ignore_index, label_smoothing)
    p = (z - lse.unsqueeze(-1)).exp()
    eps = label_smoothing
    coef = (1 - eps) * w_y + (eps / k) * torch.where(valid, w.sum(), torch.zeros((), device=z.device))
    g = p * coef.unsqueeze(-1)
    g = g.scatter_add(-1, safe_t.unsqueeze(-1), (-(1 - eps) * w_y).unsqueeze(-1))
    if eps > 0:
        g = g - (eps / k) * w * valid.unsqueeze(-1)
    g = g * grad_rows.float().unsqueeze(-1)
    if inplace:
        return logits.copy_(g)
    return g.to(logits.dtype)
