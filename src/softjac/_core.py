"""Layer 2: the core math of softmax and its derivatives, on the last dimension.

Everything here works on tensors whose class dimension is the *last* one, in the dtype it is
given (callers up-cast half types to float32 first, see :func:`softjac._checks.as_float_dtype`),
and knows nothing of autograd, ``dim`` handling or validation. These are the pure-PyTorch
implementations; ``softjac.kernels`` provides fused versions of the hot ones and is tested
against these.

Accuracy (``docs/math.md``, "Accuracy on extreme logits"):

* ``σ = exp(z − lse(z))`` with masked (−inf) entries giving exactly 0 and a fully masked
  slice giving all zeros (the log-sum-exp of an empty slice is replaced by 0, never −inf).
* Only the argmax ``i*`` can have ``σ_i > 1/2``, so ``1 − σ_i`` is formed by subtraction for
  every other entry and as ``r = Σ_{j≠i*} σ_j`` for ``i*``.
* ``J v = σ ⊙ (v − ⟨σ, v⟩)`` cancels in entry ``i*``; there it is evaluated as
  ``σ_{i*} · Σ_{j≠i*} σ_j (v_{i*} − v_j)``, which has no cancellation beyond what the data
  itself has.
* From logits, σ is never rounded on its own: with ``e = exp(z − max z)`` (so ``e_{i*} = 1``),
  ``r = Σ_{j≠i*} e_j`` and ``S = 1 + r``, every entry of ``J`` and ``J v`` is
  ``(product of e's) / S²``, and ``1 / S² = 1 − r(2 + r)/S²`` keeps the part of ``S`` that
  ``fl(1 + r)`` drops when ``r < eps``. That is what makes ``z = [37.42994775023705, 0]``,
  ``v = [1, 0]`` give ``±5.551115123125775e-17`` (the correctly rounded ``σ₁σ₂``) where a
  product of rounded probabilities is one unit in the last place off and PyTorch gives 0.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "argmax_index",
    "centred_last",
    "exp_parts",
    "from_last",
    "jacobian_logits_last",
    "ldexp",
    "pow2_exponent",
    "scale_pow2",
    "vjp_logits_last",
    "hessian_last",
    "hvp_last",
    "jacobian_last",
    "log_softmax_jacobian_last",
    "log_softmax_last",
    "logsumexp_last",
    "masked_scaled_logits",
    "max_complement",
    "one_minus",
    "softmax_and_log_last",
    "softmax_last",
    "to_last",
    "vjp_last",
]


def masked_scaled_logits(
    z: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """``(z − max z) / T`` with the entries where ``mask`` is False set to −inf.

    Softmax is shift invariant; shifting *before* dividing by T keeps ``(z_i − max z) / T``
    accurate to one rounding (``z / T`` first would add an error of ``eps · |z| / T``) and
    cannot overflow for finite logits. The shift is detached from autograd: it changes no
    derivative (softmax is exactly shift invariant) and keeps the graph small. With no mask
    and ``T = 1`` this returns ``z`` itself.
    """
    out = z if mask is None else z.masked_fill(~mask, float("-inf"))
    if temperature != 1.0:
        out = (out - _safe_max(out).detach()) / temperature
    return out


def _safe_max(z: torch.Tensor) -> torch.Tensor:
    """Row maximum (keepdim) with a −inf maximum (a fully masked row) replaced by 0.

    A +inf or NaN maximum is kept, so that ``z − max z`` is NaN in every entry of such a row
    (``inf − inf``) and σ, log σ and every product are NaN there, as ``torch.softmax`` gives.
    """
    m = z.amax(dim=-1, keepdim=True)
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def pow2_exponent(x: torch.Tensor, *, normalise: bool = False) -> torch.Tensor:
    """A power-of-two exponent ``e`` per row (keepdim, in ``x``'s dtype) for scaling the row
    by ``2^−e`` before a reduction over K entries, so that nothing in it overflows or loses
    digits to gradual underflow.

    Only as much as needed: a row whose largest entry is below 1 is scaled up to about 1
    (its small entries gain their lost digits back), a row whose largest entry is within a
    factor ``8K`` of the overflow threshold is scaled down below it, and any other row is left
    alone (``e = 0``, so small entries next to large ones keep their digits). 0 for a row
    that is all zero or has a non-finite entry. ``|e|`` stays below the dtype's largest
    exponent, so ``2^±e`` are normal numbers and the scaling is exact.

    With ``normalise`` every row is brought to a largest entry in [1/2, 2) (for products of
    the row with other large factors, or squares, which the cautious default would let
    overflow); ``e`` then spans the whole exponent range: scale with :func:`ldexp`.
    """
    m = x.abs().amax(dim=-1, keepdim=True)
    ok = torch.isfinite(m) & (m > 0)
    lg = torch.floor(torch.log2(torch.where(ok, m, torch.ones_like(m))))
    top = math.floor(math.log2(torch.finfo(x.dtype).max))  # 1023 / 127
    hi = float(top - 3 - max(math.ceil(math.log2(max(x.shape[-1], 1))), 0))
    if normalise:
        return lg
    up = lg.clamp(min=-(top - 24), max=0.0)
    down = (lg - hi).clamp_min(0.0)
    return up + down


def ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``x · 2^e`` for integral ``e`` (a float tensor, broadcast), exact unless the result
    over- or underflows, for any ``e``: in three factors of at most the dtype's largest
    exponent each (beyond three of those every nonzero float over- or underflows anyway)."""
    cap = float(math.floor(math.log2(torch.finfo(x.dtype).max)) - 1)
    e = e.clamp(-3 * cap, 3 * cap)
    a = torch.floor(e / 3)
    b = torch.floor((e - a) / 2)
    return x * torch.exp2(a) * torch.exp2(b) * torch.exp2(e - a - b)


def scale_pow2(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``x · 2^e`` for ``|e|`` within the cap of :func:`pow2_exponent` (one exact product)."""
    return x * torch.exp2(e)


def log_softmax_last(z: torch.Tensor) -> torch.Tensor:
    """``log σ(z)`` over the last dim; masked (−inf) entries give −inf, and so does a fully
    masked row (log 0), without NaN."""
    shifted, _, s = _shifted_exp_sum(z)
    return shifted - s.log()


def logsumexp_last(z: torch.Tensor) -> torch.Tensor:
    """``lse(z) = max z + log Σ exp(z − max z)`` (keepdim); ``+inf`` for a fully masked row, so
    that ``exp(z − lse)`` is 0 there rather than NaN; NaN for a row with a NaN or +inf entry."""
    m = _safe_max(z)
    s = (z - m).exp().sum(dim=-1, keepdim=True)
    return torch.where(s == 0, torch.full_like(s, float("inf")), m + s.log())


def to_last(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x`` with dim ``d`` (normalised, ``0 <= d < x.ndim``) moved last; ``x`` itself when it
    already is (``movedim`` costs microseconds even then, which small calls notice)."""
    return x if d == x.ndim - 1 else x.movedim(d, -1)


def from_last(x: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of :func:`to_last`: the last dim of ``x`` moved back to ``d``."""
    return x if d == x.ndim - 1 else x.movedim(-1, d)


def _shifted_exp_sum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z − m, exp(z − m), S)`` with ``m`` the safe row max and ``S`` the row sum of the
    exponentials (1 for a fully masked row, so that σ = 0 and log σ = −inf there)."""
    shifted = z - _safe_max(z)
    e = shifted.exp()
    s = e.sum(dim=-1, keepdim=True)
    return shifted, e, torch.where(s == 0, torch.ones_like(s), s)


def softmax_last(z: torch.Tensor) -> torch.Tensor:
    """``σ(z) = exp(z − max z) / Σ exp(z − max z)`` over the last dim; zeros for a fully
    masked row. O(K) per row."""
    _, e, s = _shifted_exp_sum(z)
    return e / s


def softmax_and_log_last(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ(z), log σ(z))`` from one pass (the values of :func:`softmax_last` and
    :func:`log_softmax_last`)."""
    shifted, e, s = _shifted_exp_sum(z)
    return e / s, shifted - s.log()


def argmax_index(p: torch.Tensor) -> torch.Tensor:
    """Index of the largest entry of each row, shape ``(..., 1)`` (int64)."""
    return p.argmax(dim=-1, keepdim=True)


def max_complement(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``r = Σ_{j≠i*} p_j`` (keepdim), i.e. ``1 − p_{i*}`` without cancellation."""
    return p.scatter(-1, idx, 0.0).sum(dim=-1, keepdim=True)


def one_minus(p: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """``1 − p_i`` per entry, the argmax's taken as ``Σ_{j≠i*} p_j`` (no cancellation);
    ``idx``: :func:`argmax_index` of ``p`` when the caller has it already."""
    if idx is None:
        idx = argmax_index(p)
    return (1 - p).scatter(-1, idx, max_complement(p, idx))


def vjp_last(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v = p ⊙ (v − ⟨p, v⟩)`` with ``J = diag(p) − p pᵀ``; O(K) per row, J never formed.

    The argmax entry is ``p_{i*} Σ_{j≠i*} p_j (v_{i*} − v_j)`` (no cancellation). J is
    symmetric, so this is both the VJP and the JVP. ``v`` is scaled by a power of two around
    the reductions (see :func:`centred_last`), so the result is finite whenever the exact one
    is representable (``|J v| ≤ max|v|/2``).
    """
    return p * centred_last(p, v)


def centred_last(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v − ⟨p, v⟩`` with the argmax entry taken as ``Σ_{j≠i*} p_j (v_{i*} − v_j)`` (equal when
    Σp = 1, without cancellation): the factor that :func:`vjp_last` multiplies by ``p`` and the
    square-root factor's transpose by ``√p``.

    ``v`` is scaled by ``2^−e`` (:func:`pow2_exponent`) before the sums and the result by
    ``2^e`` after, so ``v_{i*} − v_j`` cannot overflow inside for |v| near the largest float."""
    e = pow2_exponent(v)
    v = scale_pow2(v, -e)
    s = (p * v).sum(dim=-1, keepdim=True)
    idx = argmax_index(p)
    t = (p * (v.gather(-1, idx) - v)).scatter(-1, idx, 0.0).sum(dim=-1, keepdim=True)
    return scale_pow2((v - s).scatter(-1, idx, t), e)


def jacobian_last(p: torch.Tensor) -> torch.Tensor:
    """Dense ``J = diag(p) − p pᵀ`` of shape ``(..., K, K)``; O(K²) per row.

    The diagonal is ``p_i (1 − p_i)`` with ``1 − p_{i*}`` taken as ``Σ_{j≠i*} p_j``.
    """
    jac = -(p.unsqueeze(-1) * p.unsqueeze(-2))
    jac.diagonal(dim1=-2, dim2=-1).copy_(p * one_minus(p))
    return jac


def log_softmax_jacobian_last(p: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``∂ log σ / ∂z = I − 1 pᵀ`` restricted to the support; O(K²) per row.

    ``support`` (boolean, p's shape) marks the entries whose logit is not masked (not −inf):
    their rows are ``e_i − p`` even where ``p_i`` underflowed to 0 (``log σ_i`` is finite and
    moves with z); rows outside it are zero (``log σ_i = −∞`` is constant). Without
    ``support``: the entries with ``p_i > 0``. The diagonal entry of the argmax, ``1 − p_{i*}``,
    is taken as ``Σ_{j≠i*} p_j``. A row of ``p`` holding NaN gives an all-NaN matrix (also for
    K = 1, where that sum is empty).
    """
    keep = (p > 0 if support is None else support).to(p.dtype)
    out = -(keep.unsqueeze(-1) * p.unsqueeze(-2))
    out.diagonal(dim1=-2, dim2=-1).copy_(one_minus(p) * keep)
    bad = torch.isnan(p).any(-1)[..., None, None]
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def hvp_last(p: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(∇² ⟨w, σ⟩) v = b ⊙ v − b ⟨p, v⟩ − p ⟨b, v⟩`` with ``b = J w``; O(K) per row.

    ``w`` and ``v`` are each scaled by a power of two first (and the result back), so nothing
    overflows inside while the result is representable."""
    ew, ev = pow2_exponent(w, normalise=True), pow2_exponent(v, normalise=True)
    w, v = ldexp(w, -ew), ldexp(v, -ev)  # exact scaling: nothing over- or underflows inside
    b = vjp_last(p, w)
    pv = (p * v).sum(dim=-1, keepdim=True)
    bv = (b * v).sum(dim=-1, keepdim=True)
    return ldexp(b * v - b * pv - p * bv, ew + ev)


def hessian_last(p: torch.Tensor) -> torch.Tensor:
    """``H[..., i, j, k] = ∂²σ_i / ∂z_j ∂z_k = J_ij (δ_ik − p_k) − p_i J_jk``; O(K³) per row.

    (Equal to ``σ_i(δ_ij − σ_j)(δ_ik − σ_k) − σ_iσ_j(δ_jk − σ_k)``, ``docs/math.md``, Derivatives.)
    """
    jac = jacobian_last(p)
    lsj = -p.unsqueeze(-2).expand(jac.shape).clone()  # [i, k] = δ_ik − p_k
    lsj.diagonal(dim1=-2, dim2=-1).copy_(one_minus(p))
    out = jac.unsqueeze(-1) * lsj.unsqueeze(-2)  # [i, j, k] = J_ij (δ_ik − p_k)
    return out.sub_(p[..., :, None, None] * jac.unsqueeze(-3))  # − p_i J_jk (one temporary)


def exp_parts(z: torch.Tensor):
    """Shifted exponentials of logits ``z`` (last dim), all keepdim where reduced.

    Returns ``(e, idx, r, s)``: ``e = exp(z − max z)`` (the argmax entry is exactly 1), ``idx``
    the argmax, ``r = Σ_{j≠i*} e_j`` and ``s = Σ e = 1 + r`` (``s`` is replaced by 1 for a
    fully masked row, where ``e`` is all zero).
    """
    m = _safe_max(z)
    e = (z - m).exp()
    idx = argmax_index(z)
    r = e.scatter(-1, idx, 0.0).sum(dim=-1, keepdim=True)
    s = e.gather(-1, idx) + r
    return e, idx, r, torch.where(s == 0, torch.ones_like(s), s)


def _div_s2(y: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y / s²`` with ``s = 1 + r``: as ``y − y · r(2 + r)/s²`` when ``r ≤ 1`` (the argmax
    dominates; this keeps ``r`` even where ``fl(1 + r) = 1``), else as ``y / s²``."""
    s2 = s * s
    return torch.where(r <= 1, y - y * (r * (2 + r) / s2), y / s2)


def vjp_logits_last(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` from logits (last dim) with ``σ`` kept unrounded; O(K) per row.

    ``(J v)_i = e_i u_i / S²`` with ``u_i = v_i S − Σ_j e_j v_j`` and, for the argmax,
    ``u_{i*} = Σ_{j≠i*} e_j (v_{i*} − v_j)`` (no cancellation). ``v`` is scaled by a power
    of two before the sums and the result back after (finite wherever the exact ``J v`` is).
    """
    e, idx, r, s = exp_parts(z)
    ev = pow2_exponent(v)
    v = scale_pow2(v, -ev)  # exact scaling: v_i S cannot overflow for |v| near the largest float
    u = v * s - (e * v).sum(dim=-1, keepdim=True)
    q = (e * (v.gather(-1, idx) - v)).scatter(-1, idx, 0.0).sum(dim=-1, keepdim=True)
    return scale_pow2(_div_s2(e * u.scatter(-1, idx, q), r, s), ev)


def jacobian_logits_last(z: torch.Tensor) -> torch.Tensor:
    """Dense ``J = diag(σ) − σσᵀ`` from logits (last dim); O(K²) per row.

    ``J_ij = −e_i e_j / S²`` and ``J_ii = e_i (S − e_i) / S²`` with ``S − e_{i*} = r``.
    """
    e, idx, r, s = exp_parts(z)
    jac = -(e.unsqueeze(-1) * e.unsqueeze(-2))
    jac.diagonal(dim1=-2, dim2=-1).copy_(e * (s - e).scatter(-1, idx, r))
    return _div_s2(jac, r.unsqueeze(-1), s.unsqueeze(-1))


# --------------------------------------------------------------------------------------------
# Cross-entropy with class-index targets (rows of logits, classes last)
#
# ``loss_n = (1 − ε) w[y_n] (lse_n − z_{n,y_n}) + (ε/K) Σ_c w[c] (lse_n − z_{n,c})`` with
# ``lse = m + ls``, ``m = max z`` and ``ls = log Σ exp(z − m)``. Every ``lse − z_c`` is formed as
# ``ls − (z_c − m)`` and σ as ``exp((z − m) − ls)``: ``z_c − m`` is exact when ``z_c`` is near
# the maximum (Sterbenz) and ``ls`` is in ``[0, log K]``, so the rounding errors scale with the
# row's spread, never with its magnitude (``m + ls`` rounded first would carry an error of
# ``eps · |m|`` into every term). K = 1 gives exactly 0. The pair ``(m, ls)`` is what a backward
# pass needs; the C and Triton kernels compute the same quantities the same way.
#
# Non-finite input: −inf is a masked class (σ = 0); a NaN or a +inf anywhere in a row makes its
# loss and gradient NaN (``m`` is NaN, or ``z − m`` is ``inf − inf``); a fully masked row has
# ``ls = −inf`` and a NaN loss, as ``torch.nn.functional.cross_entropy``. Ignored rows
# (``y_n == ignore_index``) give exactly 0 loss and gradient whatever their logits.
# --------------------------------------------------------------------------------------------


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


def ce_stats_last(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z − m, m, ls)`` per row: ``m = max z`` (0 for a fully masked row; NaN when the row
    holds a NaN) and ``ls = log Σ exp(z − m)`` (``−inf`` for a fully masked row), both ``(N,)``;
    ``lse = m + ls``. O(K) per row."""
    m = z.detach().amax(dim=-1, keepdim=True)  # no derivative: the loss is shift invariant
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    shifted = z - m
    ls = shifted.exp().sum(dim=-1).log()
    return shifted, m.squeeze(-1), ls


def ce_forward_last(
    z: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses ``(N,)`` and the pair ``(m, ls)`` of :func:`ce_stats_last` for logits
    ``(N, K)`` and int64 class indices ``(N,)``, in ``z``'s dtype; ignored rows give exactly 0.
    Each ``lse − z_c`` is ``ls − (z_c − m)`` (the accuracy argument above). O(N·K)."""
    k = z.shape[-1]
    shifted, m, ls = ce_stats_last(z)
    valid, y, w, w_y, _ = ce_terms(target, weight, ignore_index, eps, k, z.device, z.dtype)
    loss = (1.0 - eps) * w_y * (ls - shifted.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    if eps > 0:
        loss = loss + (eps / k) * (w * (ls.unsqueeze(-1) - shifted)).sum(-1)
    return torch.where(valid, loss, torch.zeros_like(loss)), m, ls


def ce_probs_from_stats(z: torch.Tensor, m: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """``σ = exp((z − m) − ls)`` from the pair saved by :func:`ce_forward_last` (``m``, ``ls``
    of shape ``(N,)``); masked (−inf) logits give 0 while ``ls`` is finite."""
    return ((z - m.unsqueeze(-1)) - ls.unsqueeze(-1)).exp()


def ce_grad_from_probs(
    p: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    eps: float,
) -> torch.Tensor:
    """``∂loss_n/∂z_n = a_n σ_n − (1 − ε) w[y_n] e_{y_n} − (ε/K) w`` from ``p = σ`` ``(N, K)``,
    exactly 0 for ignored rows (whatever σ holds there); differentiable torch ops in σ's
    dtype. O(N·K)."""
    k = p.shape[-1]
    valid, y, w, w_y, a = ce_terms(target, weight, ignore_index, eps, k, p.device, p.dtype)
    out = p * a.unsqueeze(-1)
    out = out.scatter_add(-1, y.unsqueeze(-1), (-(1.0 - eps) * w_y).unsqueeze(-1))
    if eps > 0:
        out = out - (eps / k) * w
    return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=p.dtype, device=p.device))


def ce_backward_last(
    z: torch.Tensor,
    target: torch.Tensor,
    m: torch.Tensor,
    ls: torch.Tensor,
    grad_rows: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    eps: float,
) -> torch.Tensor:
    """``grad_rows[n] · ∂loss_n/∂z_n`` ``(N, K)`` in ``z``'s dtype, σ from the saved pair
    (:func:`ce_probs_from_stats`); ignored rows exactly 0 whatever their logits and cotangent.
    A non-finite cotangent on a row whose gradient is 0 (zero class weight with ``'mean'``
    over a zero total weight) gives NaN, as PyTorch's autograd. O(N·K)."""
    p = ce_probs_from_stats(z, m, ls)
    g = ce_grad_from_probs(p, target, weight, ignore_index, eps)
    valid = (target != ignore_index).unsqueeze(-1)
    gr = torch.where(valid, grad_rows.to(z.dtype).unsqueeze(-1), torch.zeros((), dtype=z.dtype))
    return g * gr
