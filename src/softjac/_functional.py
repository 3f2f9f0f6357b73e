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
    as_float_dtype,
    check_logits,
    check_mask,
    check_same_shape,
    check_temperature,
    fmt_shape,
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

#: Default limit on the size of a dense output of :func:`jacobian` (4 GiB).
DEFAULT_MAX_BYTES = 4 * 2**30


def _prepare(
    fn: str,
    logits: torch.Tensor,
    dim: int,
    mask: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, int, float]:
    """Validate; return ``z / T`` (masked entries −inf) with ``dim`` moved last, in the compute
    dtype, plus the normalised dim and the temperature."""
    d = check_logits(fn, logits, dim)
    t = check_temperature(fn, temperature)
    m = None if mask is None else check_mask(fn, mask, logits.shape, logits.device)
    z = _core.to_last(logits.to(as_float_dtype(logits.dtype)), d)
    if m is not None:
        m = _core.to_last(m, d)
    return _core.masked_scaled_logits(z, m, t), d, t


def _probs_last(fn, logits, dim, mask, temperature):
    z, d, t = _prepare(fn, logits, dim, mask, temperature)
    return _core.softmax_last(z), d, t


def _check_dense_size(fn: str, batch: torch.Size, k: int, dtype: torch.dtype, max_bytes: int):
    n = 1
    for s in batch:
        n *= s
    need = n * k * k * torch.empty((), dtype=dtype).element_size()
    if need > max_bytes:
        raise ValueError(
            f"`{fn}`: the dense output of shape {fmt_shape((*batch, k, k))} would take "
            f"{need / 2**30:.2f} GiB, above `max_bytes` = {max_bytes / 2**30:.2f} GiB. Use "
            "`softjac.vjp` / `softjac.jvp` for products (O(K)) or `softjac.SoftmaxJacobian` for "
            "the structured operator, or pass a larger `max_bytes`."
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
    return _core.from_last(_autograd.softmax_last(z, backend).to(logits.dtype), d)


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

    Rows of masked entries are zero (``log σ_i = −∞`` does not move). O(K²) per slice.
    """
    fn = "softjac.log_softmax_jacobian"
    p, _, t = _probs_last(fn, logits, dim, mask, temperature)
    _check_dense_size(fn, p.shape[:-1], p.shape[-1], logits.dtype, max_bytes)
    out = _core.log_softmax_jacobian_last(p)
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
    return _core.from_last(out.to(logits.dtype), d)


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
    ``(K, K, K)`` second-derivative tensor is never formed.
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
    ``(j, k)``. O(K³) per slice; use :func:`hvp` for products.
    """
    fn = "softjac.hessian"
    p, _, t = _probs_last(fn, logits, dim, mask, temperature)
    k = p.shape[-1]
    _check_dense_size(fn, (*p.shape[:-1], k), k, logits.dtype, max_bytes)
    out = _core.hessian_last(p)
    if t != 1.0:
        out = out / (t * t)
    return out.to(logits.dtype)
