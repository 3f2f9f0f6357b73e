"""Layer 5: cross-entropy with logits, its gradient and its curvature.

``L = reduce_n loss_n`` with ``loss_n = −Σ_c w_c y'_{n,c} log σ(z_n)_c`` and
``y' = (1 − ε) y + ε / K`` (label smoothing ε, class weights w), exactly as
``torch.nn.functional.cross_entropy``. Its gradient is ``σ − y`` (per row, scaled by weights and
the reduction), its Hessian with respect to the logits is ``c_n J_n`` per sample with
``J = diag(σ) − σσᵀ`` — the structured operator :class:`CrossEntropyHessian` keeps it in
O(N·K) memory instead of the dense ``(N, K, K)``.

Class-index targets go through the autograd Functions of :mod:`softjac._autograd` (fused
kernels, backward σ − y computed directly, twice differentiable). Probability targets (and
class weights that require a gradient) use differentiable torch ops
(``torch.log_softmax``) — same values, and twice differentiable through PyTorch itself.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from softjac import _autograd, _checks, _core
from softjac._checks import (
    as_float_dtype,
    check_logits,
    check_tensor,
    fmt_shape,
    refuse_derivatives,
)
from softjac.kernels import _torch, dispatch

__all__ = [
    "CrossEntropyHessian",
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_hessian",
    "fisher_sqrt",
]

_REDUCTIONS = ("none", "mean", "sum")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_target_kind(fn: str, target: object) -> None:
    """``TypeError`` naming ``fn`` unless ``target`` is a tensor of class indices or
    probabilities (not bool, not complex)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"`{fn}`: `target` must be a torch.Tensor. Got {type(target).__name__}.")
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"`{fn}`: `target` must hold int64 class indices or floating probabilities. "
            f"Got dtype {target.dtype}."
        )


def _check_reduction(fn: str, reduction: object) -> None:
    """``ValueError`` naming ``fn`` unless ``reduction`` is 'none', 'mean' or 'sum'."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`{fn}`: `reduction` must be one of {_REDUCTIONS}. Got {reduction!r}.")


def _check_ignore_index_type(fn: str, ignore_index: object) -> None:
    """``TypeError`` naming ``fn`` unless ``ignore_index`` is an int (not a bool)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"`{fn}`: `ignore_index` must be an int. Got {type(ignore_index).__name__}."
        )


def _check_smoothing_range(fn: str, eps: float, label_smoothing: object) -> None:
    """``ValueError`` naming ``fn`` unless ``eps`` (the value of ``label_smoothing``) is in
    [0, 1]."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"`{fn}`: `label_smoothing` must be in [0, 1]. Got {label_smoothing!r}.")


def _check_class_indices(fn: str, t: torch.Tensor, k: int, ignore_index: int) -> bool:
    """``IndexError`` naming ``fn`` unless every class index in ``t`` is in ``[0, K)`` or equal
    to ``ignore_index``; returns whether it is known that no row is ignored (then a 'mean'
    divides by the row count without another pass over the targets).

    The one check of the targets' values, made before any kernel runs: it reads them (a device
    synchronisation on GPU). Skipped where the values cannot be read: under ``torch.compile``
    tracing and for the batched targets of ``torch.func.vmap`` (there torch's own indexing
    checks apply).
    """
    if t.numel() == 0 or torch.compiler.is_compiling():
        return False
    try:
        lo, hi = torch.aminmax(t)  # one pass in the common case: every index in range
        if int(lo) >= 0 and int(hi) < k:
            return not 0 <= ignore_index < k or not bool((t == ignore_index).any())
        bad = (t != ignore_index) & ((t < 0) | (t >= k))
        found = bool(bad.any())
    except RuntimeError:  # vmap's batched tensors refuse data-dependent control flow
        return False
    if found:
        first = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"`{fn}`: `target` must hold class indices in [0, {k}) or `ignore_index` "
            f"({ignore_index}). Got {int(t[first])} at flat position {first}."
        )
    return False


class _Prepared:
    """Validated cross-entropy inputs: the logits with the classes last (a view), flattened to
    rows ``(M, K)`` on first use of :attr:`z2` (a copy when the class dim was not the last
    one), and either int64 class indices ``(M,)`` or probabilities ``(M, K)``. For contiguous
    logits whose class dim is not the last one, :meth:`inner` gives the copy-free
    ``(B, K, M)`` view instead."""

    def __init__(self, logits, z, target, probs_target, batch_shape, d, weight, ii, eps, reduction):
        self.logits = logits
        self.z = z
        self.target = target
        self.probs_target = probs_target
        self.batch_shape = batch_shape
        self.d = d
        self.weight = weight
        self.ignore_index = ii
        self.eps = eps
        self.reduction = reduction
        self.none_ignored = False  # known that no class-index target equals ignore_index
        self._z2 = None

    @property
    def z2(self) -> torch.Tensor:
        if self._z2 is None:
            self._z2 = self.z.reshape(-1, self.z.shape[-1])
        return self._z2

    def inner(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits (B, K, M), target (B, M))`` views when the class dim is not the last one
        and the logits are contiguous (class-index targets), else None."""
        x = self.logits
        if self.probs_target or self.d == x.ndim - 1 or not x.is_contiguous():
            return None
        k = x.shape[self.d]
        b = math.prod(x.shape[: self.d])
        m = math.prod(x.shape[self.d + 1 :])
        return x.view(b, k, m), self.target.view(b, m)


def _prepare(fn, logits, target, dim, weight, ignore_index, label_smoothing, reduction):
    check_tensor(fn, "logits", logits)
    if logits.ndim == 1 and dim == 1:
        dim = 0  # 1-D logits (K,) with a 0-d target, like F.cross_entropy
    d = check_logits(fn, logits, dim)
    k = logits.shape[d]
    _check_target_kind(fn, target)
    _check_reduction(fn, reduction)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real):
        raise TypeError(
            f"`{fn}`: `label_smoothing` must be a real number. "
            f"Got {type(label_smoothing).__name__}."
        )
    eps = float(label_smoothing)
    _check_smoothing_range(fn, eps, label_smoothing)
    _check_ignore_index_type(fn, ignore_index)
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(
            f"`{fn}`: `ignore_index` must fit in int64 (class indices are int64). "
            f"Got {ignore_index}."
        )
    if weight is not None:
        check_tensor(fn, "weight", weight)
        if weight.shape != (k,):
            raise ValueError(
                f"`{fn}`: `weight` must have shape ({k},) (one entry per class). "
                f"Got {fmt_shape(weight.shape)}."
            )
        if weight.device != logits.device:
            raise ValueError(
                f"`{fn}`: `weight` and `logits` must be on the same device. "
                f"Got {weight.device} and {logits.device}."
            )
    if target.device != logits.device:
        raise ValueError(
            f"`{fn}`: `target` and `logits` must be on the same device. "
            f"Got {target.device} and {logits.device}."
        )
    z = _core.to_last(logits, d)
    batch_shape = z.shape[:-1]
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"`{fn}`: probability `target` must have the shape of `logits`. "
                f"Got {fmt_shape(target.shape)} and {fmt_shape(logits.shape)}."
            )
        if ignore_index != -100:
            raise ValueError(
                f"`{fn}`: `ignore_index` is not supported with probability targets (as in "
                f"torch.nn.functional.cross_entropy). Got {ignore_index}."
            )
        t = _core.to_last(target, d).reshape(-1, k)
        return _Prepared(logits, z, t, True, batch_shape, d, weight, ignore_index, eps, reduction)
    want = logits.shape[:d] + logits.shape[d + 1 :]
    if target.shape != want:
        raise ValueError(
            f"`{fn}`: class-index `target` must have the shape of `logits` without dim {d}, "
            f"i.e. {fmt_shape(want)}. Got {fmt_shape(target.shape)}."
        )
    t = target.reshape(-1).long()
    prep = _Prepared(logits, z, t, False, batch_shape, d, weight, ignore_index, eps, reduction)
    prep.none_ignored = _check_class_indices(fn, t, k, ignore_index)
    return prep


def _smoothed(prep: _Prepared, cd: torch.dtype):
    """Probability targets: ``w ⊙ y'`` rows ``(M, K)`` in the compute dtype."""
    k = prep.z2.shape[-1]
    y = prep.target.to(cd)
    if prep.eps > 0:
        y = (1.0 - prep.eps) * y + prep.eps / k
    if prep.weight is not None:
        y = y * prep.weight.to(cd)
    return y


def _class_denominator(prep: _Prepared, cd: torch.dtype) -> torch.Tensor:
    """``Σ_n w[y_n]`` over non-ignored rows (the 'mean' divisor of F.cross_entropy); the targets
    were validated by :func:`_prepare`, so ignored rows never count."""
    if prep.weight is None and prep.none_ignored:
        return torch.tensor(float(prep.target.numel()), dtype=cd, device=prep.target.device)
    valid = prep.target != prep.ignore_index
    if prep.weight is None:
        return valid.sum().to(cd)
    y = torch.where(valid, prep.target, torch.zeros_like(prep.target))
    w_y = prep.weight.to(cd)[y]
    return torch.where(valid, w_y, torch.zeros_like(w_y)).sum()


def _reduce(prep: _Prepared, rows: torch.Tensor, denominator) -> torch.Tensor:
    if prep.reduction == "none":
        return rows.reshape(prep.batch_shape)
    total = rows.sum()
    return total / denominator if prep.reduction == "mean" else total


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    dim: int = 1,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy between logits and targets, ``torch.nn.functional.cross_entropy``'s twin.

    ``loss_n = (1 − ε) w[y_n] (lse_n − z_{n,y_n}) + (ε/K) Σ_c w[c] (lse_n − z_{n,c})`` for class
    indices (0 where ``y_n == ignore_index``), ``−Σ_c w_c y'_{n,c} log σ_{n,c}`` with
    ``y' = (1 − ε) y + ε/K`` for probabilities. ``'mean'`` divides by ``Σ_n w[y_n]`` over the
    non-ignored samples (NaN when that is 0, like PyTorch) for class indices and by the
    number of samples for probabilities.

    Accuracy: every ``lse − z_c`` is formed as ``ls − (z_c − m)`` with ``m = max z`` and
    ``ls = log Σ exp(z − m)``, and σ as ``exp((z − m) − ls)``, in every backend, so loss and
    gradient errors scale with the spread of a row, not with the size of its logits (a common
    offset of 1e4 in float32 costs nothing); K = 1 gives exactly 0.

    Non-finite input (every backend alike): a NaN or a +inf logit makes its row's loss and
    gradient NaN; −inf marks a masked class (a fully masked row gives NaN, as in PyTorch);
    an ignored row contributes exactly 0 to the loss and to the gradient whatever its logits
    (PyTorch's gradient is NaN on an ignored row that holds a NaN).

    Class-index targets run through an autograd Function: fused forward (float32 math for
    half inputs), backward ``σ − y`` computed directly and never in place on the logits,
    forward-mode AD, double backward (Hessian ``c_n J_n`` per sample), ``torch.func`` and
    ``torch.compile``. Probability targets use ``torch.log_softmax`` (also twice differentiable).

    Args:
        logits: floating tensor ``(K,)``, ``(N, K)`` or ``(N, K, d1, ...)`` with the classes at
            ``dim`` (default 1; 1-D logits use dim 0).
        target: class indices (integer dtype) of the logits' shape without ``dim`` (0-d for
            1-D logits), or floating class probabilities of the logits' shape.
        dim: the class dimension.
        weight: class weights ``(K,)``, or None. A weight that requires grad gets its gradient
            (through the torch-ops path).
        ignore_index: class-index value whose samples contribute neither loss nor gradient
            (an int64; only the default -100 with probability targets, as in PyTorch).
        label_smoothing: ε in [0, 1].
        reduction: ``'none' | 'mean' | 'sum'``.
        backend: kernel choice, ``'auto' | 'torch' | 'triton' | 'cpu'``.

    Returns:
        The loss in the logits' dtype: a scalar, or the target's batch shape for ``'none'``.
        Cost O(N·K) time, O(N) extra memory (the row maximum and log-sum per row) besides the
        saved logits. Class-index targets are checked once before any kernel runs, which reads
        them (a device synchronisation on GPU; not under ``torch.compile`` tracing).

    Raises:
        TypeError: non-tensor or non-floating logits, boolean/complex target.
        IndexError: a class index outside ``[0, K)`` that is not ``ignore_index``.
        ValueError: shapes that do not match, label smoothing outside [0, 1], unknown
            reduction, weight of the wrong shape, ``ignore_index`` beyond int64 or given with
            probability targets.
    """
    fn = "softjac.cross_entropy"
    prep = _prepare(fn, logits, target, dim, weight, ignore_index, label_smoothing, reduction)
    cd = as_float_dtype(logits.dtype)
    if prep.probs_target:
        logp = torch.log_softmax(prep.z2.to(cd), dim=-1)
        rows = -(_smoothed(prep, cd) * logp).sum(-1)
        return _reduce(prep, rows, rows.shape[0]).to(logits.dtype)
    if weight is not None and weight.requires_grad:
        rows = _class_rows_torch(prep, cd)
    else:
        inner = prep.inner()
        zr, tr = inner if inner is not None else (prep.z2, prep.target)
        rows = _autograd.cross_entropy_rows(zr, tr, weight, ignore_index, prep.eps, backend)
    denom = _class_denominator(prep, rows.dtype) if reduction == "mean" else None
    return _reduce(prep, rows, denom).to(logits.dtype)


def _class_rows_torch(prep: _Prepared, cd: torch.dtype) -> torch.Tensor:
    """Class-index per-row losses with differentiable torch ops (used when ``weight``
    requires grad, which the fused Function treats as a constant): the same accurate formula,
    ``softjac._core.ce_forward_last``."""
    return _core.ce_forward_last(
        prep.z2.to(cd), prep.target, prep.weight, prep.ignore_index, prep.eps
    )[0]


def cross_entropy_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    dim: int = 1,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """``∂L/∂logits`` of :func:`cross_entropy`, computed directly as ``σ − y`` (no autograd).

    Per row: class indices ``s_n ((1 − ε) w[y_n] + (ε/K) Σ_c w[c]) σ_n − s_n ((1 − ε) w[y_n]
    e_{y_n} + (ε/K) w)``; probabilities ``s_n (⟨w, y'_n⟩ σ_n − w ⊙ y'_n)``. The scale ``s_n`` is
    1 for ``'sum'``, ``1 / Σ_m w[y_m]`` (class indices) or ``1 / N`` (probabilities) for
    ``'mean'``; for ``'none'`` the result is the gradient of the sum, i.e. every sample's own
    gradient ``∂loss_n/∂z_n`` in its slice. Ignored samples get exactly 0 (all ignored with
    ``'mean'``: all zeros, as PyTorch's autograd gives; valid samples whose weights sum to 0
    with ``'mean'``: NaN, as PyTorch's autograd gives). σ comes from the same ``(m, ls)`` pair
    as in :func:`cross_entropy`, so the error scales with the row's spread.

    Same arguments, semantics and errors as :func:`cross_entropy`. Returns a tensor of the
    logits' shape and dtype (float32 math for half inputs). Cost O(N·K); not differentiable —
    differentiate :func:`cross_entropy` twice for second derivatives. Logits or weights that
    carry a derivative (requires grad with grad mode on, or a forward-mode dual) raise
    ``ValueError`` rather than have it dropped silently.
    """
    fn = "softjac.cross_entropy_grad"
    prep = _prepare(fn, logits, target, dim, weight, ignore_index, label_smoothing, reduction)
    fix = "Pass detached tensors; for second derivatives differentiate `softjac.cross_entropy`."
    refuse_derivatives(fn, "logits", logits, fix)
    if weight is not None:
        refuse_derivatives(fn, "weight", weight, fix)
    cd = as_float_dtype(logits.dtype)
    with torch.no_grad():
        z = prep.z2.to(cd)
        rows = z.shape[0]
        if prep.probs_target:
            _, mx, ls = _core.ce_stats_last(z)
            p = _core.ce_probs_from_stats(z, mx, ls)  # NaN rows where log_softmax has NaN
            wy = _smoothed(prep, cd)
            g = p * wy.sum(-1, keepdim=True) - wy
            if reduction == "mean":
                g = g / rows
        else:
            w = None if weight is None else weight.detach()
            args = (prep.target, w, ignore_index, prep.eps)
            _, stats = dispatch.cross_entropy_forward(prep.z2, *args, backend=backend, stats=True)
            valid = prep.target != ignore_index
            scale = torch.ones(rows, dtype=cd, device=z.device)
            if reduction == "mean":
                scale = scale / _class_denominator(prep, cd)
            scale = torch.where(valid, scale, torch.zeros_like(scale))
            g = dispatch.cross_entropy_backward(
                prep.z2, prep.target, stats, scale, w, ignore_index, prep.eps, backend=backend
            )
        g = g.to(logits.dtype).reshape(*prep.batch_shape, z.shape[-1])
    return _core.from_last(g, prep.d)


class CrossEntropyHessian:
    """The Hessian of a cross-entropy loss with respect to the logits, block diagonal:
    ``H = blockdiag_n(c_n J_n)`` with ``J_n = diag(σ_n) − σ_n σ_nᵀ``, shape ``(N, K, K)``.

    Holds only ``probs`` σ ``(N, K)`` and ``coef`` c ``(N,)``: O(N·K) memory where the dense
    blocks (BackPACK-style) take O(N·K²). Symmetric; positive semidefinite when every
    ``c_n >= 0`` (always, for non-negative class weights). Products, diagonal and trace are
    closed forms on σ scaled by c; the spectrum comes from the batched
    ``softjac.SoftmaxJacobian`` of the blocks (:attr:`jacobian`), scaled by c.

    Attributes:
        probs: σ, ``(N, K)``, in the compute dtype (float32 for half logits).
        coef: c, ``(N,)``, the per-sample reduction weights.
    """

    is_symmetric = True

    def __init__(self, probs: torch.Tensor, coef: torch.Tensor):
        self.probs = probs
        self.coef = coef
        self._jacobian = None

    @property
    def shape(self) -> torch.Size:
        n, k = self.probs.shape
        return torch.Size((n, k, k))

    @property
    def dtype(self) -> torch.dtype:
        return self.probs.dtype

    @property
    def device(self) -> torch.device:
        return self.probs.device

    @property
    def is_positive_semidefinite(self) -> bool:
        """True when every ``c_n >= 0`` (reads the coefficients: a device sync on GPU)."""
        return bool((self.coef >= 0).all())

    @property
    def T(self) -> CrossEntropyHessian:
        """The transpose: the operator itself (it is symmetric)."""
        return self

    def __repr__(self) -> str:
        n, k = self.probs.shape
        return f"CrossEntropyHessian(N={n}, K={k}, dtype={self.dtype}, device={self.device})"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``H x``: ``c_n (σ_n ⊙ (x_n − ⟨σ_n, x_n⟩))`` per sample, for ``x`` of shape ``(N, K)``
        or ``(N, K, m)``. O(N·K·m); the argmax entry is computed without cancellation.
        """
        fn = "softjac.CrossEntropyHessian.matmul"
        check_tensor(fn, "x", x)
        n, k = self.probs.shape
        if x.ndim not in (2, 3) or tuple(x.shape[:2]) != (n, k):
            raise ValueError(
                f"`{fn}`: `x` must have shape ({n}, {k}) or ({n}, {k}, m). "
                f"Got {fmt_shape(x.shape)}."
            )
        xc = x.to(self.dtype)
        if x.ndim == 2:
            return dispatch.softmax_vjp(self.probs, xc) * self.coef.unsqueeze(-1)
        xt = xc.transpose(1, 2)  # (N, m, K)
        p = self.probs.unsqueeze(1).expand(xt.shape)
        out = dispatch.softmax_vjp(p, xt) * self.coef[:, None, None]
        return out.transpose(1, 2)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``x H`` for ``x`` of shape ``(N, K)`` or ``(N, m, K)`` (= ``(H xᵀ)ᵀ``, H symmetric)."""
        if isinstance(x, torch.Tensor) and x.ndim == 3:
            return self.matmul(x.transpose(1, 2)).transpose(1, 2)
        return self.matmul(x)

    def to_dense(self, *, max_bytes: int = _checks.DEFAULT_MAX_BYTES) -> torch.Tensor:
        """The blocks ``c_n J_n``, shape ``(N, K, K)``; O(N·K²) memory. Refuses
        (``ValueError``) when they and one temporary of their size exceed ``max_bytes`` (an
        int > 0, default 4 GiB)."""
        n, k = self.probs.shape
        _checks.check_dense_size(
            "softjac.CrossEntropyHessian.to_dense",
            (n, k, k),
            self.probs.dtype,
            max_bytes,
            temporaries=1,
            hint="Use its O(K) products (`@`) instead.",
        )
        return _core.jacobian_last(self.probs) * self.coef[:, None, None]

    def diagonal(self) -> torch.Tensor:
        """``c_n σ_{n,i} (1 − σ_{n,i})``, shape ``(N, K)``, with ``1 − σ`` of the argmax taken
        as the sum of the other entries (accurate); O(N·K)."""
        p = self.probs
        return p * _core.one_minus(p) * self.coef.unsqueeze(-1)

    def trace(self) -> torch.Tensor:
        """``c_n (1 − Σ_i σ_{n,i}²)`` per sample, shape ``(N,)``; O(N·K)."""
        return self.diagonal().sum(-1)

    @property
    def jacobian(self):
        """The per-sample softmax Jacobians ``J_n`` as a ``softjac.SoftmaxJacobian`` of batch
        ``(N,)`` (built on first use from σ)."""
        if self._jacobian is None:
            from softjac._operator import SoftmaxJacobian

            self._jacobian = SoftmaxJacobian(probs=self.probs)
        return self._jacobian

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues of every block, ascending, ``(N, K)``: ``c_n λ(J_n)``.

        ``λ(J_n)`` from :meth:`softjac.SoftmaxJacobian.eigvalsh` (secular equation, exact 0s,
        each eigenvalue accurate relative to itself); O(N·K²), no autograd. Blocks with
        ``c_n < 0`` (negative class weights) are re-sorted.
        """
        lam = self.jacobian.eigvalsh() * self.coef.unsqueeze(-1)
        return torch.where((self.coef < 0).unsqueeze(-1), lam.flip(-1), lam)

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``c_n λ(J_n)`` and orthonormal eigenvectors of every block (those of
        ``J_n``), from :meth:`softjac.SoftmaxJacobian.eigh`; O(N·K²) (plus the K×K output).
        Needs ``c_n >= 0`` for the ascending order."""
        lam, q = self.jacobian.eigh()
        return lam * self.coef.unsqueeze(-1), q


def _logits_rows(fn: str, logits: object) -> torch.Tensor:
    """Validate logits ``(K,)`` or ``(N, K)`` (classes last); return ``(N, K)`` in the compute
    dtype."""
    check_tensor(fn, "logits", logits)
    assert isinstance(logits, torch.Tensor)
    if logits.ndim not in (1, 2):
        raise ValueError(
            f"`{fn}`: `logits` must have shape (K,) or (N, K) with the classes last. "
            f"Got {fmt_shape(logits.shape)}."
        )
    check_logits(fn, logits, -1)
    return logits.reshape(-1, logits.shape[-1]).to(as_float_dtype(logits.dtype))


def cross_entropy_hessian(
    logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> CrossEntropyHessian:
    """Hessian of :func:`cross_entropy` with respect to the logits, as a structured operator.

    ``∂²L/∂z_n∂z_m = δ_nm c_n J_n``, ``J_n = diag(σ_n) − σ_nσ_nᵀ``, with the per-sample reduction
    weight ``c_n``: ``w[y_n]`` for ``'sum'``/``'none'`` (0 if ignored) and
    ``w[y_n] / Σ_m w[y_m]`` for ``'mean'``; for probability targets ``⟨w, y_n⟩`` (and ``/ N``
    for ``'mean'``); without a target ``1`` (or ``1 / N``) — the Hessian does not depend on
    the labels, only its scale does. This is the generalised Gauss–Newton / Fisher block of a
    softmax classifier.

    Args:
        logits: ``(N, K)`` or ``(K,)``, classes on the last dim.
        target: None, class indices ``(N,)`` (integer dtype), or probabilities ``(N, K)``.
        weight: class weights ``(K,)`` (needs a target).
        ignore_index: class-index value whose samples get ``c_n = 0``.
        reduction: ``'none' | 'mean' | 'sum'`` (``'none'``: the blocks of each ``loss_n``).

    Returns:
        :class:`CrossEntropyHessian` holding σ and c: O(N·K) memory and time.
    """
    fn = "softjac.cross_entropy_hessian"
    z = _logits_rows(fn, logits)
    refuse_derivatives(fn, "logits", logits, "Pass `logits.detach()`.")
    n, k = z.shape
    _check_reduction(fn, reduction)
    p = _core.softmax_last(z.detach())
    if target is None:
        if weight is not None:
            raise ValueError(f"`{fn}`: `weight` needs a `target` (c_n = weight[target_n]).")
        coef = torch.ones(n, dtype=p.dtype, device=p.device)
        if reduction == "mean":
            coef = coef / n
        return CrossEntropyHessian(p, coef)
    prep = _prepare(fn, logits, target, -1, weight, ignore_index, 0.0, reduction)
    if prep.probs_target:
        coef = _smoothed(prep, p.dtype).sum(-1)
        if reduction == "mean":
            coef = coef / n
    else:
        _, _, _, w_y, _ = _torch.ce_terms(
            prep.target, weight, ignore_index, 0.0, k, p.device, p.dtype
        )
        coef = w_y / w_y.sum() if reduction == "mean" else w_y
    return CrossEntropyHessian(p, coef.detach())


def fisher_sqrt(
    logits: torch.Tensor,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    max_bytes: int = _checks.DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Square-root factor S of the softmax Fisher / GGN block ``J = diag(σ) − σσᵀ``: S Sᵀ = J.

    Exact (``num_samples=None``): ``S_n = diag(√σ_n) − σ_n √σ_nᵀ``, shape ``(N, K, K)``
    (``S Sᵀ = diag(σ) − 2σσᵀ + σσᵀ Σσ = J`` since Σσ = 1); O(N·K²).

    Monte Carlo (``num_samples=M``): labels ``ŷ_m ~ Categorical(σ_n)`` and columns
    ``(σ_n − e_{ŷ_m}) / √M``, shape ``(N, K, M)``; ``E[S Sᵀ] = J`` (unbiased); O(N·K·M).
    A fully masked row (σ = 0) gives S = 0.

    Args:
        logits: ``(N, K)`` or ``(K,)`` (then ``N = 1``), classes on the last dim.
        num_samples: None for the exact factor, else M >= 1 sampled labels per sample.
        generator: ``torch.Generator`` for the sampling (reproducible factors).
        max_bytes: limit (an int > 0, default 4 GiB) on the exact factor and its temporary;
            above it ``ValueError``.

    Returns:
        Tensor in the compute dtype (float32 for half logits), not differentiable: logits
        that carry a derivative raise ``ValueError``.
    """
    fn = "softjac.fisher_sqrt"
    z = _logits_rows(fn, logits)
    refuse_derivatives(fn, "logits", logits, "Pass `logits.detach()`.")
    p = _core.softmax_last(z)
    n, k = p.shape
    if num_samples is None:
        _checks.check_dense_size(
            fn,
            (n, k, k),
            p.dtype,
            max_bytes,
            temporaries=1,
            hint="Use `num_samples=M` for the Monte Carlo factor (O(N·K·M)).",
        )
        r = p.sqrt()
        return torch.diag_embed(r) - p.unsqueeze(-1) * r.unsqueeze(-2)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`{fn}`: `num_samples` must be an int >= 1 or None. Got {num_samples!r}.")
    alive = p.sum(-1, keepdim=True) > 0
    draw_from = torch.where(alive, p, torch.full_like(p, 1.0 / k))
    labels = torch.multinomial(draw_from, num_samples, replacement=True, generator=generator)
    onehot = torch.zeros(n, num_samples, k, dtype=p.dtype, device=p.device)
    onehot.scatter_(-1, labels.unsqueeze(-1), 1.0)
    s = (p.unsqueeze(1) - onehot) * alive.unsqueeze(1) / math.sqrt(num_samples)
    return s.transpose(1, 2)
