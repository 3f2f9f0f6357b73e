"""Layer 5: the functional API — softmax, its dense Jacobians, and O(K) products with J.

Conventions shared by every function here:

* ``dim`` is the class dimension (any position, negative allowed); the *batch* is the input
  shape without ``dim``. Dense outputs have shape ``(*batch, K, K)``; vector outputs keep the
  input's shape.
* ``mask`` is a boolean tensor broadcastable to ``logits`` (True = keep); ``-inf`` logits count
  as masked; masked entries get σ = 0, zero rows and columns of J, and a fully masked slice
  gives all zeros, never NaN.
* ``temperature`` T: ``σ = softmax(z / T)``, so every derivative with respect to ``z`` carries
  a factor ``1 / T`` per order.
* float16/bfloat16 compute in float32 and return the input dtype; device is preserved.
"""

from __future__ import annotations

import torch

from softjac import _autograd, _core
from softjac._checks import (
    DEFAULT_MAX_BYTES,
    as_float_dtype,
    check_dense_size,
    check_logits,
    check_mask,
    check_same_shape,
    check_temperature,
)
from softjac.kernels import dispatch

__all__ = [
    "hessian",
    "hvp",
    "jacobian",
    "jvp",
    "log_softmax_jacobian",
    "softmax",
    "vjp",
    "vjp_from_probs",
]


def _prepare(
    fn: str,
    logits: torch.Tensor,
    dim: int,
    mask: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, int, float]:
    """Validate; return ``z / T`` (masked entries −inf) with ``dim`` moved last, in the compute
    dtype, plus the normalised dim and the temperature.

    T below the smallest normal number of the compute dtype is refused (``ValueError``):
    ``1/T`` would overflow there and σ would not sum to 1."""
    d = check_logits(fn, logits, dim)
    up = as_float_dtype(logits.dtype)
    t = check_temperature(fn, temperature, up)
    if mask is None and t == 1.0 and up == logits.dtype and d == logits.ndim - 1:
        return logits, d, t  # the common call: nothing to convert, move, mask or scale
    m = None if mask is None else check_mask(fn, mask, logits.shape, logits.device)
    z = _core.to_last(logits if up == logits.dtype else logits.to(up), d)
    if m is not None:
        m = _core.to_last(m, d)
    return _core.masked_scaled_logits(z, m, t), d, t


def _probs_last(fn, logits, dim, mask, temperature):
    z, d, t = _prepare(fn, logits, dim, mask, temperature)
    return _core.softmax_last(z), d, t


_DENSE_HINT = (
    "Use `softjac.vjp` / `softjac.jvp` / `softjac.hvp` for products (O(K)) or "
    "`softjac.SoftmaxJacobian` for the structured operator."
)


def _check_dense_size(
    fn: str,
    batch: torch.Size | tuple[int, ...],
    k: int,
    dtype: torch.dtype,
    max_bytes: object,
    *,
    temporaries: int = 0,
) -> None:
    """The memory guard of the dense functions: ``(*batch, K, K)`` of ``dtype``, see
    :func:`softjac._checks.check_dense_size`."""
    check_dense_size(
        fn, (*batch, k, k), dtype, max_bytes, temporaries=temporaries, hint=_DENSE_HINT
    )


def softmax(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Numerically stable ``σ(z / T)_i = exp(z_i / T − lse(z / T))`` along ``dim``.

    Differentiable to any order through :class:`softjac._autograd.SoftmaxLast`: it saves only
    σ, its backward is the O(K) product ``σ ⊙ (g − ⟨g, σ⟩)`` (the kernel chosen by
    ``backend``), forward mode gives the same product with the tangent, and every
    ``torch.func`` transform and ``torch.compile(fullgraph=True)`` work.

    Args:
        logits: floating tensor of any shape; ``dim`` holds the K classes.
        dim: the class dimension.
        mask: boolean, broadcastable to ``logits``; True keeps an entry. ``-inf`` logits are
            masked too. A fully masked slice gives zeros and a zero gradient (``torch.softmax``
            gives NaN, pytorch issue 41508).
        temperature: T > 0.
        backend: ``"auto" | "torch" | "triton" | "cpu"`` (``softjac.kernels.info()`` says
            what ``"auto"`` picks); forward and backward run that backend's kernels, and every
            backend records for autograd.

    Returns:
        σ with the shape, dtype and device of ``logits``. Cost O(K) per slice.
    """
    fn = "softjac.softmax"
    dispatch.check_backend(fn, backend)
    z, d, _ = _prepare(fn, logits, dim, mask, temperature)
    p = _autograd.softmax_last(z, backend)
    if z is logits:  # the common call: σ already has the dtype and layout of the logits
        return p
    return _core.from_last(p if p.dtype == logits.dtype else p.to(logits.dtype), d)


def jacobian(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Dense Jacobian ``∂σ/∂z = (diag(σ) − σσᵀ) / T`` for every slice along ``dim``.

    Entries are accurate relative to their own size: the diagonal is ``σ_i (1 − σ_i)`` with
    ``1 − σ_{i*}`` of the argmax taken as ``Σ_{j≠i*} σ_j``.

    Returns:
        Tensor of shape ``(*batch, K, K)`` where ``batch`` is ``logits.shape`` without ``dim``;
        dtype and device of ``logits``. Cost O(K²) per slice; refuses (``ValueError``) when the
        output would exceed ``max_bytes`` (default 4 GiB).
    """
    fn = "softjac.jacobian"
    dispatch.check_backend(fn, backend)
    z, _, t = _prepare(fn, logits, dim, mask, temperature)
    _check_dense_size(fn, z.shape[:-1], z.shape[-1], logits.dtype, max_bytes)
    jac = _autograd.jacobian_logits(z, backend)
    if t != 1.0:
        jac = jac / t
    return jac.to(logits.dtype)


def log_softmax_jacobian(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Dense Jacobian of log-softmax, ``∂ log σ / ∂z = (I − 1σᵀ) / T``, shape ``(*batch, K, K)``.

    The support comes from the logits, not from the rounded σ: a row is zero only for a masked
    entry (``mask`` False or logit −inf; ``log σ_i = −∞`` does not move). An entry whose σ_i
    underflows to 0 keeps its row ``e_i − σ`` (``[0, −120]`` gives ``[[0, 0], [−1, 1]]``).
    Every entry is ``δ_ij − σ_j`` (``1 − σ_{i*}`` of the argmax as ``Σ_{j≠i*} σ_j``), so
    accurate relative to itself. A slice with a NaN or +inf logit gives NaN. O(K²) per slice;
    refuses (``ValueError``) an output above ``max_bytes`` (an int > 0, default 4 GiB).
    """
    fn = "softjac.log_softmax_jacobian"
    z, _, t = _prepare(fn, logits, dim, mask, temperature)
    _check_dense_size(fn, z.shape[:-1], z.shape[-1], z.dtype, max_bytes)
    out = _core.log_softmax_jacobian_last(_core.softmax_last(z), z != float("-inf"))
    if t != 1.0:
        out = out / t
    return out.to(logits.dtype)


def vjp(
    logits: torch.Tensor,
    v: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Vector-Jacobian product ``vᵀ J = J v = σ ⊙ (v − ⟨σ, v⟩) / T`` along ``dim``.

    O(K) per slice; J is never formed. The argmax entry is computed as
    ``σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j) / T`` so it keeps its relative accuracy
    (``z = [37.42994775023705, 0]``, ``v = [1, 0]`` gives ``±5.551115123125775e-17`` in float64).

    Args:
        logits: floating tensor; ``v``: same shape (the cotangent ``∂L/∂σ``).

    Returns:
        Tensor with the shape, dtype and device of ``logits``.
    """
    return _jacobian_product("softjac.vjp", logits, v, dim, mask, temperature, backend)


def _jacobian_product(fn, logits, v, dim, mask, temperature, backend):
    """``J v / T`` along ``dim`` for :func:`vjp` and :func:`jvp` (``fn`` names the caller)."""
    dispatch.check_backend(fn, backend)
    z, d, t = _prepare(fn, logits, dim, mask, temperature)
    check_same_shape(fn, "v", v, "logits", logits)
    out = _autograd.vjp_logits(z, _core.to_last(v, d), backend)
    if t != 1.0:
        out = out / t
    return _core.from_last(out if out.dtype == logits.dtype else out.to(logits.dtype), d)


def jvp(
    logits: torch.Tensor,
    v: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Jacobian-vector product ``J v`` (the tangent of σ for a tangent ``v`` of the logits).

    J is symmetric, so this equals :func:`vjp`; O(K) per slice, same accuracy and conventions.
    """
    return _jacobian_product("softjac.jvp", logits, v, dim, mask, temperature, backend)


def vjp_from_probs(
    probs: torch.Tensor, v: torch.Tensor, dim: int = -1, *, backend: str = "auto"
) -> torch.Tensor:
    """``J v = σ ⊙ (v − ⟨σ, v⟩)`` from probabilities σ kept from a forward pass.

    The tutorial's ``softmax_vjp(grad_output, sigma)``, batched along ``dim``, with the argmax
    entry computed without cancellation. O(K) per slice. ``probs`` is not checked to sum to 1
    (that would need a device synchronisation); pass what ``softmax`` returned.

    Notes
    -----
    Half precision (``docs/math.md``, "Half-precision probabilities"): for σ̂ in bfloat16 or
    float16 the product is done in float32 on σ̂ as given (``v`` in σ̂'s dtype) and rounded
    once to that dtype. Where ``Σσ̂ = 1 + δ ≠ 1`` the result is the product with
    ``M = diag(σ̂) − σ̂σ̂ᵀ + δ σ̂_{i*} e_{i*} e_{i*}ᵀ`` (i* the first largest σ̂_j): J(σ̂) with
    its argmax diagonal entry taken as ``σ̂_{i*} Σ_{j≠i*} σ̂_j``. For σ̂ = σ rounded to the
    half dtype (unit roundoff u = 2^-8 bfloat16, 2^-11 float16) every entry is within
    ``(3u + 5u² + 2γ_{K+2}) σ_i (|v_i| + Σ_j σ_j |v_j|)`` of the exact ``J(σ) v``
    (``γ_n = n·2^-24 / (1 − n·2^-24)``); entries below the normal range (float16 below
    2^-14) add at most ``η((K + 4)(|v_i| + ‖v‖₁) + 1)``, ``η = 2^-25`` (float16) or
    ``2^-134`` (bfloat16). :func:`vjp` from the logits avoids the error of rounding σ.
    """
    fn = "softjac.vjp_from_probs"
    dispatch.check_backend(fn, backend)
    d = check_logits(fn, probs, dim, name="probs")
    check_same_shape(fn, "v", v, "probs", probs)
    out = _autograd.vjp_probs(_core.to_last(probs, d), _core.to_last(v, d), backend)
    return _core.from_last(out, d)


def hvp(
    logits: torch.Tensor,
    w: torch.Tensor,
    v: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Hessian-vector product of the scalar ``⟨w, σ(z)⟩``: ``(∂²⟨w, σ⟩/∂z²) v`` along ``dim``.

    With ``b = J w``: ``b ⊙ v − b ⟨σ, v⟩ − σ ⟨b, v⟩`` (divided by T²). O(K) per slice; the
    ``(K, K, K)`` second-derivative tensor is never formed. ``w`` and ``v`` are scaled by
    powers of two inside, so the result is finite wherever the exact one is representable.
    """
    fn = "softjac.hvp"
    check_logits(fn, logits, dim)
    check_same_shape(fn, "w", w, "logits", logits)
    check_same_shape(fn, "v", v, "logits", logits)
    p, d, t = _probs_last(fn, logits, dim, mask, temperature)
    cd = p.dtype
    out = _core.hvp_last(p, _core.to_last(w, d).to(cd), _core.to_last(v, d).to(cd))
    if t != 1.0:
        out = out / (t * t)
    return _core.from_last(out.to(logits.dtype), d)


def hessian(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Second derivatives ``H[..., i, j, k] = ∂²σ_i / ∂z_j ∂z_k``, shape ``(*batch, K, K, K)``.

    ``H_ijk = σ_i(δ_ij − σ_j)(δ_ik − σ_k) − σ_iσ_j(δ_jk − σ_k)`` (divided by T²); symmetric in
    ``(j, k)``. O(K³) per slice; use :func:`hvp` for products. Refuses (``ValueError``) when
    the result and the one temporary of its size (two for half inputs, cast at the end)
    would exceed ``max_bytes`` (an int > 0, default 4 GiB).
    """
    fn = "softjac.hessian"
    p, _, t = _probs_last(fn, logits, dim, mask, temperature)
    k = p.shape[-1]
    extra = 1 if p.dtype == logits.dtype else 2
    _check_dense_size(fn, (*p.shape[:-1], k), k, p.dtype, max_bytes, temporaries=extra)
    out = _core.hessian_last(p)
    if t != 1.0:
        out = out / (t * t)
    return out.to(logits.dtype)
