"""Pure-PyTorch implementations of the dispatched primitives (``backend="torch"``).

These are the fallbacks on every device and the reference the fast kernels are tested
against; the contract each function meets is in ``softjac.kernels.dispatch``.
"""

from __future__ import annotations

import torch

from softjac import _core
from softjac._checks import as_float_dtype

__all__ = [
    "ce_grad_from_probs",
    "ce_terms",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "softmax",
    "softmax_jacobian_dense",
    "softmax_vjp",
    "softmax_vjp_from_logits",
]


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(as_float_dtype(x.dtype))


def softmax(z: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused softmax (one read for the max, one for the sum, one write) in at least
    float32, then the fully masked rows — where it gives NaN — set to 0; NaN or +inf inputs
    still give NaN. On CPU a look at σ's first column (N values) skips the extra passes when
    no row can be dead: one strided sum (σ ≤ 1, so it is NaN exactly when one of the N values
    is). Elsewhere (GPU: no sync; torch.compile: no data-dependent branch) the rows are always
    fixed."""
    up = as_float_dtype(z.dtype)
    # (no dtype argument when z already has it: that skips a conversion check)
    p = torch.softmax(z, dim=-1) if up == z.dtype else torch.softmax(z, dim=-1, dtype=up)
    if z.device.type == "cpu" and not torch.compiler.is_compiling():
        if p.numel() == 0 or not (p.select(-1, 0) if p.dim() else p).sum().isnan().item():
            return p if p.dtype == z.dtype else p.to(z.dtype)
    dead = z.amax(dim=-1, keepdim=True) == float("-inf")
    p = p.masked_fill_(dead, 0.0)
    return p if p.dtype == z.dtype else p.to(z.dtype)


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


def ce_terms(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    eps: float,
    k: int,
    device: torch.device,
    dtype: torch.dtype,
):
    """Per-row terms of cross-entropy with class-index targets, in ``dtype``: ``valid (N,)``,
    ``y (N,)`` (ignored rows → class 0), ``w (K,)`` (ones if None), ``w_y (N,)`` (0 for ignored
    rows) and ``a_n = (1 − ε) w[y_n] + (ε/K) Σ_c w[c]`` (0 for ignored rows)."""
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    w = torch.ones(k, dtype=dtype, device=device) if weight is None else weight.to(dtype)
    w_y = torch.where(valid, w[y], torch.zeros((), dtype=dtype, device=device))
    a = (1.0 - eps) * w_y
    if eps > 0:
        a = a + (eps / k) * w.sum() * valid
    return valid, y, w, w_y, a


def ce_grad_from_probs(
    p: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    eps: float,
) -> torch.Tensor:
    """``∂loss_n/∂z_n = a_n σ_n − (1 − ε) w[y_n] e_{y_n} − (ε/K) w`` (0 for ignored rows) from
    ``p = σ`` ``(N, K)``, with differentiable torch ops in σ's dtype."""
    k = p.shape[-1]
    valid, y, w, w_y, a = ce_terms(target, weight, ignore_index, eps, k, p.device, p.dtype)
    out = p * a.unsqueeze(-1)
    out = out.scatter_add(-1, y.unsqueeze(-1), (-(1.0 - eps) * w_y).unsqueeze(-1))
    if eps > 0:
        out = out - (eps / k) * w * valid.unsqueeze(-1)
    return out


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and log-sum-exp in at least float32 (float64 for float64 logits)."""
    z = _up(logits)
    k = z.shape[-1]
    eps = label_smoothing
    lse = torch.logsumexp(z, dim=-1)
    valid, y, w, w_y, _ = ce_terms(target, weight, ignore_index, eps, k, z.device, z.dtype)
    loss = (1 - eps) * w_y * (lse - z.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    if eps > 0:
        smooth = (w * (lse.unsqueeze(-1) - z)).sum(-1)
        loss = loss + (eps / k) * torch.where(valid, smooth, torch.zeros_like(smooth))
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
    """``grad_rows[n] · ∂loss_n/∂z_n`` in at least float32, returned in the logits dtype."""
    z = _up(logits)
    p = (z - lse.to(z.dtype).unsqueeze(-1)).exp()
    g = ce_grad_from_probs(p, target, weight, ignore_index, label_smoothing)
    g = g * grad_rows.to(z.dtype).unsqueeze(-1)
    if inplace:
        return logits.copy_(g)
    return g.to(logits.dtype)
