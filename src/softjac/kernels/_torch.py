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
    "split_lse",
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


# The cross-entropy math lives in ``softjac._core`` (``ce_*``); these re-exports keep the
# kernel-module names that callers use.
ce_terms = _core.ce_terms
ce_grad_from_probs = _core.ce_grad_from_probs


def split_lse(lse, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, ls)`` from a log-sum-exp given either as the pair (``lse = m + ls``, the accurate
    form the forwards return with ``stats=True``) or as one tensor (then ``m = lse``,
    ``ls = 0``: σ as ``exp(z − lse)``, accurate only to ``eps · |lse|``), each ``(N,)`` in the
    dtype of ``like``."""
    if isinstance(lse, (tuple, list)):
        m, ls = lse
        return m.reshape(-1).to(like.dtype), ls.reshape(-1).to(like.dtype)
    m = lse.reshape(-1).to(like.dtype)
    return m, torch.zeros_like(m)


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    stats: bool = False,
):
    """Per-row losses and the log-sum-exp in at least float32 (float64 for float64 logits), by
    ``softjac._core.ce_forward_last``: ``(loss, lse)``, or ``(loss, (m, ls))`` with
    ``stats=True`` (the accurate pair that :func:`cross_entropy_backward` takes)."""
    loss, m, ls = _core.ce_forward_last(_up(logits), target, weight, ignore_index, label_smoothing)
    return (loss, (m, ls)) if stats else (loss, m + ls)


def cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse,
    grad_rows: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``grad_rows[n] · ∂loss_n/∂z_n`` in at least float32 by
    ``softjac._core.ce_backward_last``, returned in the logits dtype; ``lse`` is the pair
    ``(m, ls)`` or one tensor (see :func:`split_lse`)."""
    z = _up(logits)
    m, ls = split_lse(lse, z)
    g = _core.ce_backward_last(
        z, target, m, ls, grad_rows.reshape(-1), weight, ignore_index, label_smoothing
    )
    if inplace:
        return logits.copy_(g)
    return g.to(logits.dtype)
