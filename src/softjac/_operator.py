"""Layer 5: ``SoftmaxJacobian``, the softmax Jacobian as a structured linear operator.

``J = diag(σ) − σσᵀ`` is diagonal minus rank one and singular by construction. The operator
stores σ (and log σ) only — O(K) memory per slice — and implements every operation as a
closed form on σ (O(K)) or through the secular-equation eigen-solver of
:mod:`softjac._spectral` (O(K²)); ``to_dense()`` exists for checking and small K. Formulas:
``docs/math.md`` ("Closed forms", "Spectrum").

Conventions (as in :mod:`softjac._functional`): ``dim`` is moved last, so the operator is the
batch ``(*batch, K, K)``; ``mask`` True keeps an entry, ``-inf`` logits are masked too;
float16/bfloat16 inputs compute (and are stored) in float32. With a temperature T the operator
is ``∂σ/∂z = J(σ(z/T)) / T``.

The *support* S of a slice comes from the logits, not from the rounded σ: an entry is outside
it only when it is masked (``mask`` False or logit −inf); for an operator built from ``probs``,
when its probability is 0. An entry whose σ_i underflows to 0 stays in S: log σ_i (kept from
log-softmax) is finite, so :meth:`SoftmaxJacobian.log_pdet`, the pseudo-inverse and the
factors stay exact where their values are representable, and quantities whose true value
underflows (an eigenvalue below the smallest float, an entry σ_iσ_j) round to 0 honestly.

Non-finite input: a slice with a NaN or +inf logit gives NaN in every output of that slice
(σ, spectrum, norms, log_pdet, products, factors), as ``torch.softmax`` gives NaN; −inf is a
masked entry. Dense results (``to_dense``, ``eigh``, ``sqrtm``, ``apply_function``) take
``max_bytes`` (an int > 0, default 4 GiB) and refuse larger results with ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from softjac import _core
from softjac._checks import (
    DEFAULT_MAX_BYTES,
    as_float_dtype,
    check_dense_size,
    check_logits,
    check_mask,
    check_positive,
    check_temperature,
    check_tensor,
    fmt_shape,
    refuse_derivatives,
)
from softjac._functional import _prepare
from softjac._spectral import secular_eigh, secular_eigvalsh, secular_spectral_norm

__all__ = [
    "SoftmaxJacobian",
    "SoftmaxJacobianCholeskyFactor",
    "SoftmaxJacobianPinv",
    "SoftmaxJacobianSqrtFactor",
]

_NAME = "softjac.SoftmaxJacobian"


_DENSE_HINT = "Use the operator's O(K) products (`@`) instead of the dense matrix."


def _support(log_p: torch.Tensor) -> torch.Tensor:
    """The support from log σ: finite (not −inf; NaN slices are handled separately)."""
    return log_p > float("-inf")


def _nan_rows(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``x`` with the slices flagged in ``bad`` (shape ``x.shape[:bad.ndim]``) set to NaN."""
    if not bool(bad.any()):
        return x
    return x.masked_fill(bad.reshape(*bad.shape, *([1] * (x.ndim - bad.ndim))), math.nan)


def _scaled_norm(x: torch.Tensor) -> torch.Tensor:
    """2-norm over the last dim (keepdim) with the row scaled by a power of two first, so that
    squares of entries near the under- or overflow threshold cannot spoil it."""
    e = _core.pow2_exponent(x, normalise=True).detach()
    return _core.ldexp(torch.linalg.vector_norm(_core.ldexp(x, -e), dim=-1, keepdim=True), e)


def _inv_scale(p: torch.Tensor, log_p: torch.Tensor, sup: torch.Tensor):
    """``(â, E)`` with ``1/σ_i = â_i · 2^E`` on the support (0 off it): ``2^E`` is about the
    largest ``1/σ_i``, so ``â ≤ ~2`` never overflows even where ``1/σ_i`` does, and
    ``â_i = 1/(σ_i 2^−E)`` is one rounding from normal σ (``exp(−log σ_i − E ln 2)`` for σ_i
    below the normal range, from log-softmax)."""
    tiny = torch.finfo(p.dtype).tiny
    big = torch.where(sup, -log_p, torch.full_like(log_p, float("-inf")))
    top = big.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.floor(top / math.log(2.0)).detach()
    normal = sup & (p >= tiny)
    direct = 1 / torch.where(normal, _core.ldexp(p, e), torch.ones_like(p))
    via_log = torch.exp(torch.where(sup & ~normal, -log_p - e * math.log(2.0), -math.inf))
    a = torch.where(normal, direct, via_log)
    return a, e


def _apply(
    fn: str,
    p: torch.Tensor,
    x: object,
    op: Callable[..., torch.Tensor],
    *,
    left: bool = False,
    extra: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """Apply a last-dim operation ``op(p, v)`` (p broadcast to v) to ``x``.

    ``x`` of shape ``(K,)`` or ``(*batch, K)`` (one more dimension than the batch) is a batch
    of vectors; otherwise ``(…, K, m)`` (``(…, m, K)`` when ``left``, for ``x @ op``) is a batch
    of matrices whose columns (rows) are transformed. Batch dimensions broadcast. ``extra``
    are further per-slice tensors of p's shape, broadcast like p and passed to ``op`` after it.
    """
    x = check_tensor(fn, "x", x)
    k = p.shape[-1]
    nb = p.ndim - 1
    dt = torch.promote_types(p.dtype, as_float_dtype(x.dtype))
    p = p.to(dt)
    extra = tuple(e.to(dt) if e.is_floating_point() else e for e in extra)
    x = x.to(dt)
    if x.device != p.device:
        raise ValueError(
            f"`{fn}`: `x` must be on the operator's device {p.device}. Got {x.device}."
        )
    vector = x.ndim >= 1 and x.shape[-1] == k and (x.ndim == 1 or x.ndim == nb + 1)
    if not vector:
        ok = x.ndim >= 2 and (x.shape[-1] if left else x.shape[-2]) == k
        if not ok:
            want = "(*batch, K) or (*batch, m, K)" if left else "(*batch, K) or (*batch, K, m)"
            raise ValueError(
                f"`{fn}`: `x` must have shape {want} with K = {k} and batch "
                f"{fmt_shape(p.shape[:-1])}. Got {fmt_shape(x.shape)}."
            )
        v = x if left else x.mT
        p = p.unsqueeze(-2)
        extra = tuple(e.unsqueeze(-2) for e in extra)
    else:
        v = x
    try:
        shape = torch.broadcast_shapes(p.shape, v.shape)
    except RuntimeError:
        raise ValueError(
            f"`{fn}`: the batch of `x` {fmt_shape(x.shape)} does not broadcast with the "
            f"operator's batch {fmt_shape(p.shape[:-1] if vector else p.shape[:-2])}."
        ) from None
    out = op(p.expand(shape), v.expand(shape), *(e.expand(shape) for e in extra))
    return out if (vector or left) else out.mT


class _Structured:
    """Shared plumbing of the structured operators: shape, dtype, device, ``@``."""

    _p: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """``(*batch, K, K)``."""
        k = self._p.shape[-1]
        return torch.Size((*self._p.shape[:-1], k, k))

    @property
    def batch_shape(self) -> torch.Size:
        return self._p.shape[:-1]

    @property
    def num_classes(self) -> int:
        return self._p.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the operator computes in (float32 for half inputs)."""
        return self._p.dtype

    @property
    def device(self) -> torch.device:
        return self._p.device

    @property
    def T(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def mT(self):
        """The transpose, as :attr:`T` (the batch dimensions stay in front)."""
        return self.T

    def transpose(self):
        """The transpose, as :attr:`T`."""
        return self.T

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rmatmul(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={fmt_shape(self.shape)}, dtype={self.dtype}, "
            f"device={self.device})"
        )


class SoftmaxJacobian(_Structured):
    """The softmax Jacobian ``∂σ/∂z = (diag(σ) − σσᵀ) / T`` as a structured linear operator.

    Exactly one of ``logits`` or ``probs`` is given; the class dimension ``dim`` is moved last,
    so the operator is the batch ``(*batch, K, K)``. Only σ (and log σ) are stored: O(K)
    memory per slice. The operator is symmetric positive semidefinite and singular
    (``J 1 = 0``); its rank is ``|S| − 1`` for the support S (the entries that are not masked, see the
    module notes), and it is all-zero for a fully masked slice. A slice with a NaN or +inf
    logit gives NaN in every output.

    Args:
        logits: floating tensor; σ = softmax(logits / T) along ``dim`` (masked entries 0).
            log σ comes from log-softmax, so :meth:`log_pdet` stays finite where ``∏σ``
            underflows.
        probs: probabilities along ``dim``: non-negative and summing to 1 per slice within
            ``8·sqrt(eps)`` of the (compute) dtype (a slice of all zeros is the fully masked
            slice); otherwise ``ValueError``. Masked entries are set to 0 before the check.
        dim: the class dimension.
        mask: boolean, broadcastable to the input; True keeps an entry.
        temperature: T > 0, at least the smallest normal number of the compute dtype; the
            operator is ``J/T`` (the Jacobian with respect to z).

    Gradients flow back to ``logits``/``probs`` through :meth:`matmul` (``@``),
    :meth:`to_dense`, :meth:`diagonal`, :meth:`trace`, :meth:`frobenius_norm`,
    :meth:`log_pdet`, :meth:`solve_damped`, :meth:`logdet_damped` and the factors' products.
    The spectral methods (:meth:`eigvalsh`, :meth:`eigh`, :meth:`spectral_norm`,
    :meth:`sqrtm`, :meth:`apply_function`) have no autograd: they raise ``ValueError`` when σ
    carries a derivative (logits that require grad with grad mode on, or dual tensors) instead
    of dropping it; build the operator from detached logits for them.

    Example:
        >>> import torch, softjac
        >>> z = torch.tensor([2.0, 1.0, 0.5, -0.5], dtype=torch.float64)
        >>> op = softjac.SoftmaxJacobian(z)
        >>> round(op.spectral_norm().item(), 4)
        0.3521
        >>> (op @ torch.ones(4, dtype=torch.float64)).abs().max().item()
        0.0
        >>> op.eigvalsh().shape, op.pinv().shape
        (torch.Size([4]), torch.Size([4, 4]))
    """

    is_symmetric = True
    is_positive_semidefinite = True

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        dim: int = -1,
        *,
        mask: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> None:
        fn = _NAME
        if (logits is None) == (probs is None):
            got = "both" if logits is not None else "neither"
            raise ValueError(f"`{fn}`: pass exactly one of `logits` and `probs`. Got {got}.")
        if logits is not None:
            z, d, t = _prepare(fn, logits, dim, mask, temperature)
            # a NaN or +inf logit makes the whole slice NaN (see _core._safe_max)
            self._p, self._log_p = _core.softmax_and_log_last(z)
        else:
            assert probs is not None
            d = check_logits(fn, probs, dim, name="probs")
            t = check_temperature(fn, temperature, as_float_dtype(probs.dtype))
            m = None if mask is None else check_mask(fn, mask, probs.shape, probs.device)
            p = probs.to(as_float_dtype(probs.dtype)).movedim(d, -1)
            if m is not None:
                p = p.masked_fill(~m.movedim(d, -1), 0.0)
            self._check_probs(fn, p)
            self._p = p
            self._log_p = (
                torch.where(p > 0, p, torch.ones_like(p)).log().masked_fill(p <= 0, float("-inf"))
            )
        self._t = t
        self._dim = d
        self._bad = torch.isnan(self._p.detach()).any(-1)  # slices with NaN: NaN out

    @staticmethod
    def _check_probs(fn: str, p: torch.Tensor) -> None:
        if bool((p < 0).any()) or bool(torch.isnan(p).any()):
            bad = p[(p < 0) | torch.isnan(p)][0].item()
            raise ValueError(f"`{fn}`: `probs` must be non-negative. Got an entry {bad!r}.")
        tol = 8 * math.sqrt(torch.finfo(p.dtype).eps)
        total = p.sum(-1)
        ok = ((total - 1).abs() <= tol) | (total == 0)
        if not bool(ok.all()):
            bad = total[~ok].flatten()[0].item()
            raise ValueError(
                f"`{fn}`: `probs` must sum to 1 along `dim` (within {tol:.1e}). Got a slice "
                f"summing to {bad!r}."
            )

    # ------------------------------------------------------------------ basic data
    @property
    def probs(self) -> torch.Tensor:
        """σ with the class dimension last, shape ``(*batch, K)``."""
        return self._p

    @property
    def log_probs(self) -> torch.Tensor:
        """log σ with the class dimension last (−inf outside the support)."""
        return self._log_p

    @property
    def temperature(self) -> float:
        return self._t

    @property
    def T(self) -> SoftmaxJacobian:
        """The transpose: J is symmetric, so the operator itself."""
        return self

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._t == 1.0 else x / self._t

    # ------------------------------------------------------------------ products
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``J x / T`` with ``J x = σ ⊙ (x − ⟨σ, x⟩)`` per column; O(K·m).

        The argmax entry is ``σ_{i*} Σ_{j≠i*} σ_j (x_{i*} − x_j)`` (no cancellation).

        Args:
            x: ``(K,)`` or ``(*batch, K)`` (vectors), or ``(*batch, K, m)`` (matrices); a
                tensor with one more dimension than the batch is read as vectors.
        """
        out = _apply(f"{_NAME}.matmul", self._p, x, _core.vjp_last)
        return self._scaled(out)

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ J / T`` for rows ``x`` of shape ``(*batch, K)`` or ``(*batch, m, K)``; O(K·m)."""
        out = _apply(f"{_NAME}.rmatmul", self._p, x, _core.vjp_last, left=True)
        return self._scaled(out)

    def to_dense(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        """Dense ``(diag(σ) − σσᵀ)/T``, shape ``(*batch, K, K)``; O(K²). For checks and small K;
        refuses (``ValueError``) a result above ``max_bytes`` (default 4 GiB)."""
        check_dense_size(
            f"{_NAME}.to_dense", self.shape, self.dtype, max_bytes, temporaries=1, hint=_DENSE_HINT
        )
        return self._scaled(_core.jacobian_last(self._p))

    def diagonal(self) -> torch.Tensor:
        """``σ_i (1 − σ_i) / T`` with ``1 − σ_{i*} = Σ_{j≠i*} σ_j``; shape ``(*batch, K)``, O(K)."""
        return self._scaled(self._p * _core.one_minus(self._p))

    def trace(self) -> torch.Tensor:
        """``tr J / T = Σ σ_i(1 − σ_i) / T = (1 − Σσ²)/T`` (from the accurate diagonal); O(K)."""
        return self.diagonal().sum(-1)

    def frobenius_norm(self) -> torch.Tensor:
        """``‖J‖_F / T`` as the norm of the row norms ``ρ_i = σ_i · hypot(1 − σ_i, ‖σ_{−i}‖)``;
        O(K).

        (``‖J‖_F² = Σσ² − 2Σσ³ + (Σσ²)²`` cancels for a near one-hot σ; here every term is
        positive, ``1 − σ_{i*}`` and ``‖σ_{−i*}‖`` of the argmax are formed from the other
        entries, and every norm is taken of a row scaled by a power of two, so the result
        neither under- nor overflows while it is representable: ``[0, −500]`` gives
        ``1.42e-217``, not 0.)
        """
        p = self._p
        idx = _core.argmax_index(p)
        rest = p.scatter(-1, idx, 0.0)
        rest_norm = _scaled_norm(rest)  # ‖σ_{−i*}‖
        all2 = _scaled_norm(p).square()
        # ‖σ_{−i}‖ for i ≠ i*: Σσ² − σ_i² ≥ σ_{i*}² ≥ 1/K², no cancellation
        others = (all2 - p * p).clamp_min(0).sqrt().scatter(-1, idx, rest_norm)
        rows = p * torch.hypot(_core.one_minus(p, idx), others)
        return self._scaled(_scaled_norm(rows).squeeze(-1))

    # ------------------------------------------------------------------ spectrum
    def eigvalsh(self) -> torch.Tensor:
        """All K eigenvalues ascending, shape ``(*batch, K)``; O(K²) per slice, no autograd.

        An exact 0 for ``J 1_S = 0``, one 0 per entry outside the support, ``s`` (m − 1)
        times for m tied entries of value s, and the roots of ``Σ c_g/(d_g − λ) = 0``
        between consecutive distinct σ values, each accurate relative to itself. Divided by T.
        """
        return self._scaled(secular_eigvalsh(self._spectral_probs(f"{_NAME}.eigvalsh")))

    def eigh(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and orthonormal eigenvectors (columns), ``Q diag(λ) Qᵀ``.

        Gu–Eisenstat eigenvectors (orthogonal also for clustered σ and for eigenvalues spread
        over the whole exponent range) with exact deflation of ties and zeros; see
        :mod:`softjac._spectral`. O(K²) per slice; no autograd. Refuses (``ValueError``) when
        Q and the solver's K×K temporaries (four) would exceed ``max_bytes`` (default 4 GiB).

        Returns:
            ``(λ, Q)`` of shapes ``(*batch, K)`` and ``(*batch, K, K)``.
        """
        self._check_dense(f"{_NAME}.eigh", max_bytes, 4)
        lam, q = secular_eigh(self._spectral_probs(f"{_NAME}.eigh"))
        return self._scaled(lam), q

    def _spectral_probs(self, fn: str) -> torch.Tensor:
        """σ for the spectral methods, which have no autograd: refuses (``ValueError``) σ that
        carries a derivative (built from logits that require grad, or dual tensors) rather
        than return a result that silently dropped it."""
        fix = "Build the operator from detached logits (or probs) for the spectrum."
        refuse_derivatives(fn, "σ", self._p, fix)
        return self._p.detach()

    def _check_dense(self, fn: str, max_bytes: object, temporaries: int) -> None:
        check_dense_size(
            fn, self.shape, self.dtype, max_bytes, temporaries=temporaries, hint=_DENSE_HINT
        )

    def spectral_norm(self) -> torch.Tensor:
        """``λ_max / T`` (≤ 1/(2T)), shape ``(*batch,)``; O(K log K) (one secular root)."""
        return self._scaled(secular_spectral_norm(self._spectral_probs(f"{_NAME}.spectral_norm")))

    def apply_function(
        self, f: Callable[[torch.Tensor], torch.Tensor], *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> torch.Tensor:
        """Dense ``Q f(Λ) Qᵀ`` for a spectral function ``f`` (applied elementwise to the
        eigenvalues of ``J/T``); O(K²) for ``eigh`` plus one K×K×K matrix product. Refuses
        (``ValueError``) when the result and its temporaries (five K×K arrays at the peak)
        would exceed ``max_bytes`` (default 4 GiB)."""
        self._check_dense(f"{_NAME}.apply_function", max_bytes, 5)
        self._spectral_probs(f"{_NAME}.apply_function")
        lam, q = self.eigh(max_bytes=max_bytes)
        return (q * f(lam).unsqueeze(-2)) @ q.mT

    def sqrtm(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        """Dense symmetric square root ``Q Λ^{1/2} Qᵀ`` (no closed form is known); see
        :meth:`apply_function` (and its ``max_bytes``). For a factor with ``S Sᵀ = J`` in O(K)
        use :meth:`sqrt_factor`."""
        self._check_dense(f"{_NAME}.sqrtm", max_bytes, 5)
        self._spectral_probs(f"{_NAME}.sqrtm")
        return self.apply_function(lambda lam: lam.clamp_min(0).sqrt(), max_bytes=max_bytes)

    # ------------------------------------------------------------------ inverses, determinants
    def pinv(self) -> SoftmaxJacobianPinv:
        """The pseudo-inverse ``T·J⁺`` with ``J⁺ = P diag(1/σ) P`` on the support S,
        ``P = I − 1_S 1_Sᵀ/|S|``, as a structured operator (O(K) products); O(K) to build.
        S comes from the logits (see the module notes): where σ_i underflowed, ``1/σ_i`` is
        taken from log-softmax and the result overflows to ±inf honestly."""
        return SoftmaxJacobianPinv(self._p, self._t, log_probs=self._log_p)

    def log_pdet(self) -> torch.Tensor:
        """log of the pseudo-determinant (product of the nonzero eigenvalues) of ``J/T``.

        ``pdet J = |S| ∏_{i∈S} σ_i``, so ``log pdet = log |S| + Σ_{i∈S} log σ_i − (|S|−1) log T``,
        summed from log-softmax (finite where ``∏σ`` underflows; S from the logits, so
        ``[1000, 0, 0, 0]`` gives ``log 4 − 3000``). O(K). Conventions: a slice
        with one support entry has J = 0 restricted to a 1×1 block and gives the empty
        product, ``log pdet = 0``; a fully masked slice (|S| = 0) gives ``log 0 = −inf``; a
        NaN slice gives NaN. Shape ``(*batch,)``; differentiable.
        """
        sup = _support(self._log_p)
        n = sup.sum(-1)
        lp = torch.where(sup, self._log_p, torch.zeros_like(self._log_p)).sum(-1)
        nf = n.to(lp.dtype)
        out = lp + nf.log()
        if self._t != 1.0:
            out = out - (nf - 1) * math.log(self._t)
        out = torch.where(n > 0, out, torch.full_like(out, float("-inf")))
        return _nan_rows(out, self._bad)

    def _damping_mu(self, fn: str, damping: object) -> float:
        """``μ = λT`` for the validated damping λ: ``J/T + λI = (J + μI)/T``."""
        return check_positive(fn, "damping", damping) * self._t

    def solve_damped(self, b: torch.Tensor, damping: float) -> torch.Tensor:
        """``(J/T + λI)⁻¹ b`` in O(K·m) by Sherman–Morrison, λ = ``damping`` > 0.

        With ``μ = λT``: ``T·(u + w ⟨σ, u⟩ / δ)``, ``u = b/(σ + μ)``, ``w = σ/(σ + μ)``, and
        the stable denominator ``δ = 1 − Σ σ²/(σ + μ) = μ Σ σ_i/(σ_i + μ)`` (``Σσ = 1``).

        Args:
            b: ``(*batch, K)`` or ``(*batch, K, m)`` (as for :meth:`matmul`).
            damping: λ, a finite number > 0.
        """
        fn = f"{_NAME}.solve_damped"
        mu, p = self._damping_mu(fn, damping), self._p

        def op(pp: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ev = _core.pow2_exponent(
                v, normalise=True
            )  # b scaled by a power of two: u cannot overflow inside
            d = pp + mu
            u = _core.ldexp(v, -ev) / d
            w = pp / d
            den = mu * w.sum(-1, keepdim=True)
            den = torch.where(den > 0, den, torch.ones_like(den))
            return _core.ldexp(u + w * ((pp * u).sum(-1, keepdim=True) / den), ev)

        out = _apply(fn, p, b, op)
        return out if self._t == 1.0 else out * self._t

    def logdet_damped(self, damping: float) -> torch.Tensor:
        """``log det(J/T + λI)``, λ = ``damping`` > 0, in O(K); shape ``(*batch,)``.

        ``Σ_i log(σ_i + μ) + log(μ Σ_i σ_i/(σ_i + μ)) − K log T`` with ``μ = λT`` (matrix
        determinant lemma with the stable denominator); a fully masked slice gives
        ``K log λ``. Differentiable.
        """
        fn = f"{_NAME}.logdet_damped"
        mu, p = self._damping_mu(fn, damping), self._p
        k = p.shape[-1]
        d = p + mu
        s = (p / d).sum(-1)
        has = s > 0
        lemma = torch.where(has, torch.where(has, s, torch.ones_like(s)).log() + math.log(mu), 0.0)
        out = d.log().sum(-1) + lemma
        if self._t != 1.0:
            out = out - k * math.log(self._t)
        return out

    # ------------------------------------------------------------------ factors
    def sqrt_factor(self) -> SoftmaxJacobianSqrtFactor:
        """``S = (diag(√σ) − σ√σᵀ)/√T`` with ``S Sᵀ = J/T``, as an operator (O(K) products)."""
        return SoftmaxJacobianSqrtFactor(self._p, self._t, log_probs=self._log_p)

    def cholesky_factor(self) -> SoftmaxJacobianCholeskyFactor:
        """The exact lower-triangular ``L`` with ``L Lᵀ = J/T`` (from tail sums), as an
        operator with O(K) products; see :class:`SoftmaxJacobianCholeskyFactor`."""
        return SoftmaxJacobianCholeskyFactor(self._p, self._t, log_probs=self._log_p)

    # ------------------------------------------------------------------ interop
    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` for one slice (empty batch), with O(K)
        ``matvec``/``rmatvec``/``matmat`` on NumPy arrays. Needs scipy (``pip install scipy``)."""
        fn = f"{_NAME}.to_scipy"
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError:
            raise ImportError(
                f"`{fn}` needs scipy, which is not installed. Install it with "
                "`pip install scipy` (or `pip install softjac[scipy]`)."
            ) from None
        if self._p.ndim != 1:
            raise ValueError(
                f"`{fn}`: a scipy LinearOperator holds one slice; this operator has batch "
                f"shape {fmt_shape(self.batch_shape)}. Index a slice first, e.g. "
                "`SoftmaxJacobian(probs=op.probs[0])`."
            )
        import numpy as np

        p = self._p.detach()
        np_dtype = np.float64 if p.dtype == torch.float64 else np.float32

        def mv(x):
            xt = torch.as_tensor(np.asarray(x), dtype=p.dtype, device=p.device)
            if xt.ndim == 2 and xt.shape[1] == 1:
                return self.matmul(xt[:, 0]).cpu().numpy()[:, None]
            return self.matmul(xt).cpu().numpy()

        def mm(x):
            xt = torch.as_tensor(np.asarray(x), dtype=p.dtype, device=p.device)
            return self.matmul(xt).cpu().numpy()

        k = self.num_classes
        return LinearOperator((k, k), matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np_dtype)


class SoftmaxJacobianPinv(_Structured):
    """The pseudo-inverse ``T·J⁺`` of a :class:`SoftmaxJacobian` ``J/T``.

    ``J⁺ = P diag(1/σ) P`` on the support S (zero rows and columns outside it), with
    ``P = I − 1_S 1_Sᵀ/|S|``; products cost O(K). Also ``(J + 1_S1_Sᵀ/|S|)⁻¹ = J⁺ +
    1_S1_Sᵀ/|S|`` on the support. Symmetric; ``T`` is itself. A fully masked slice gives 0.

    ``1/σ`` is applied as ``â · 2^E`` (``2^E`` about the largest ``1/σ_i``, ``â ≤ 2``), so
    nothing overflows inside; the result overflows to ±inf only where its exact value does
    (an entry σ_i below ``1/max float``). ``log_probs`` (log σ, −inf off the support; from
    log-softmax for an operator built from logits) supplies the support and ``1/σ_i`` where
    σ_i underflowed; without it, the support is ``σ > 0``.
    """

    is_symmetric = True
    is_positive_semidefinite = True

    def __init__(
        self,
        probs: torch.Tensor,
        temperature: float = 1.0,
        *,
        log_probs: torch.Tensor | None = None,
    ) -> None:
        self._p = probs
        self._t = float(temperature)
        if log_probs is None:
            log_probs = torch.where(probs > 0, probs, torch.ones_like(probs)).log()
            log_probs = log_probs.masked_fill(~(probs > 0), float("-inf"))
            log_probs = torch.where(torch.isnan(probs), probs, log_probs)
        self._log_p = log_probs
        self._bad = torch.isnan(probs.detach()).any(-1)

    @property
    def T(self) -> SoftmaxJacobianPinv:
        return self

    def _parts(self, p: torch.Tensor, lp: torch.Tensor):
        sup = _support(lp)
        n = sup.sum(-1, keepdim=True).clamp_min(1).to(p.dtype)
        a, e = _inv_scale(p, lp, sup)
        return sup, n, a, e

    def _op(self, p: torch.Tensor, v: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        sup, n, a, e = self._parts(p, lp)
        zero = torch.zeros_like(v)
        ev = _core.pow2_exponent(v, normalise=True)
        y = torch.where(sup, _core.ldexp(v, -ev), zero)
        y = torch.where(sup, y - y.sum(-1, keepdim=True) / n, zero)
        u = y * a
        out = torch.where(sup, u - u.sum(-1, keepdim=True) / n, zero)
        out = _core.ldexp(out, e + ev)
        bad = torch.isnan(p).any(-1, keepdim=True)
        out = out.masked_fill(bad, math.nan) if bool(bad.any()) else out
        return out if self._t == 1.0 else out * self._t

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``T·P diag(1/σ) P x`` (centre on S, divide by σ, centre again); O(K·m)."""
        return _apply(
            "softjac.SoftmaxJacobianPinv.matmul", self._p, x, self._op, extra=(self._log_p,)
        )

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(
            "softjac.SoftmaxJacobianPinv.rmatmul",
            self._p,
            x,
            self._op,
            left=True,
            extra=(self._log_p,),
        )

    def to_dense(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        """``T·[δ_ij/σ_i − (1/σ_i + 1/σ_j)/n + Σ_k(1/σ_k)/n²]`` on S×S (n = |S|), else 0; O(K²).

        Formed from ``â = 2^−E/σ`` and scaled by ``2^E`` at the end (±inf only where the exact
        entry overflows). Refuses (``ValueError``) a result above ``max_bytes``."""
        check_dense_size(
            "softjac.SoftmaxJacobianPinv.to_dense",
            self.shape,
            self.dtype,
            max_bytes,
            temporaries=2,
            hint=_DENSE_HINT,
        )
        p = self._p
        sup, n, a, e = self._parts(p, self._log_p)
        tot = a.sum(-1, keepdim=True)
        dense = torch.diag_embed(a) - (a.unsqueeze(-1) + a.unsqueeze(-2)) / n.unsqueeze(-1)
        dense = dense + (tot / (n * n)).unsqueeze(-1)
        both = sup.unsqueeze(-1) & sup.unsqueeze(-2)
        dense = torch.where(both, dense, torch.zeros_like(dense))
        dense = _nan_rows(_core.ldexp(dense, e.unsqueeze(-1)), self._bad)
        return dense if self._t == 1.0 else dense * self._t


def _sqrt_probs(p: torch.Tensor, log_p: torch.Tensor | None) -> torch.Tensor:
    """``√σ``, from log σ where σ is below the normal range (``√σ`` stays representable for
    σ down to the square of the smallest float)."""
    r = p.sqrt()
    if log_p is None:
        return r
    small = p < torch.finfo(p.dtype).tiny
    return torch.where(small, torch.exp(0.5 * log_p), r)


class SoftmaxJacobianSqrtFactor(_Structured):
    """``S = (diag(√σ) − σ√σᵀ)/√T`` with ``S Sᵀ = J/T`` (uses ``Σσ = 1``), O(K) products.

    ``S x = √σ ⊙ x − σ ⟨√σ, x⟩`` and ``Sᵀ y = √σ ⊙ (y − ⟨σ, y⟩)``, the argmax entries formed
    without cancellation (``1 − σ_{i*} = Σ_{j≠i*} σ_j``). ``.T`` is the transposed factor.
    ``√σ_i`` comes from ``log_probs`` where σ_i underflowed (the diagonal ``√σ_i`` stays exact
    down to σ_i ≈ 1e-600 in float64).
    """

    is_symmetric = False

    def __init__(
        self,
        probs: torch.Tensor,
        temperature: float = 1.0,
        transposed: bool = False,
        *,
        log_probs: torch.Tensor | None = None,
    ):
        self._p = probs
        self._t = float(temperature)
        self._transposed = transposed
        self._log_p = log_probs
        self._r = _sqrt_probs(probs, log_probs)

    @property
    def T(self) -> SoftmaxJacobianSqrtFactor:
        return SoftmaxJacobianSqrtFactor(
            self._p, self._t, not self._transposed, log_probs=self._log_p
        )

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._t == 1.0 else x / math.sqrt(self._t)

    @staticmethod
    def _s(p: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # (S v)_i = √σ_i v_i − σ_i Σ_j √σ_j v_j; argmax: √σ v (1 − σ) − σ Σ_{j≠i*} √σ_j v_j.
        ev = _core.pow2_exponent(v, normalise=True)
        rv = r * _core.ldexp(v, -ev)
        out = rv - p * rv.sum(-1, keepdim=True)
        idx = _core.argmax_index(p)
        rest = rv.scatter(-1, idx, 0.0).sum(-1, keepdim=True)
        star = rv.gather(-1, idx) * _core.max_complement(p, idx) - p.gather(-1, idx) * rest
        return _core.ldexp(out.scatter(-1, idx, star), ev)

    @staticmethod
    def _st(p: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # (Sᵀ v)_i = √σ_i (v_i − ⟨σ, v⟩); argmax: √σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j).
        return r * _core.centred_last(p, v)

    def _fwd(self, transposed: bool) -> Callable[..., torch.Tensor]:
        return self._st if transposed else self._s

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``S x`` (or ``Sᵀ x`` for the transposed factor); O(K·m)."""
        fn = "softjac.SoftmaxJacobianSqrtFactor.matmul"
        op = self._fwd(self._transposed)
        return self._scaled(_apply(fn, self._p, x, op, extra=(self._r,)))

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x S = (Sᵀ xᵀ)ᵀ``; O(K·m)."""
        fn = "softjac.SoftmaxJacobianSqrtFactor.rmatmul"
        op = self._fwd(not self._transposed)
        return self._scaled(_apply(fn, self._p, x, op, left=True, extra=(self._r,)))

    def to_dense(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        """Dense S (or Sᵀ), diagonal ``√σ_i(1 − σ_i)`` with the accurate complement; O(K²).
        Refuses (``ValueError``) a result above ``max_bytes`` (default 4 GiB)."""
        check_dense_size(
            "softjac.SoftmaxJacobianSqrtFactor.to_dense",
            self.shape,
            self.dtype,
            max_bytes,
            temporaries=1,
            hint=_DENSE_HINT,
        )
        p, r = self._p, self._r
        dense = -(p.unsqueeze(-1) * r.unsqueeze(-2))
        dense = dense.diagonal_scatter(r * _core.one_minus(p), dim1=-2, dim2=-1)
        dense = dense.mT if self._transposed else dense
        return self._scaled(dense)


class SoftmaxJacobianCholeskyFactor(_Structured):
    """The exact lower-triangular factor ``L`` with ``L Lᵀ = J/T`` (Tanabe–Sagae).

    With tail sums ``c_i = Σ_{j>i} σ_j`` (so ``c_{i−1} = σ_i + c_i``), the Schur complements of
    J are ``diag(σ_{i:}) − σσᵀ/c_{i−1}``, which gives

    ``L_ii = √(σ_i c_i / c_{i−1})``, ``L_ji = −σ_j β_i`` for j > i, ``β_i = √(σ_i/(c_{i−1} c_i))``

    (0 where ``c_i = 0``). The last diagonal entry is 0 (J is singular). Products
    ``L x = diag(L) x − σ ⊙ (exclusive cumsum of β ⊙ x)`` and
    ``Lᵀ y = diag(L) y − β ⊙ (reverse exclusive cumsum of σ ⊙ y)`` cost O(K). The order is
    the natural order of the classes. ``.T`` is ``Lᵀ``.

    Scaled form: ``L_ii = √(σ_i/c_{i−1}) · √c_i`` and ``β_i = √(σ_i/c_{i−1}) / √c_i`` (the
    ratio lies in (0, 1]; ``1/√c_i`` stays below ``1/√(smallest float)``), so nothing
    overflows. Where σ or a tail sum is below the normal range, the entries of
    :meth:`to_dense` (and the diagonal and β used by the products) come from log σ and
    log-sum-exp tail sums instead, so a representable entry is not lost to underflow:
    ``[-5, 0, -300, -650, -690]`` gives finite, exact factors. Products may still round a
    term ``σ_j β_i x_i`` whose σ_j underflowed to 0.
    """

    is_symmetric = False

    def __init__(
        self,
        probs: torch.Tensor,
        temperature: float = 1.0,
        transposed: bool = False,
        *,
        log_probs: torch.Tensor | None = None,
    ):
        self._p = probs
        self._t = float(temperature)
        self._transposed = transposed
        p = probs
        tiny = torch.finfo(p.dtype).tiny
        if log_probs is None:
            log_probs = torch.where(p > 0, p, torch.ones_like(p)).log()
            log_probs = torch.where(p > 0, log_probs, torch.full_like(p, float("-inf")))
        self._log_p = log_probs
        tail_incl = torch.flip(torch.cumsum(torch.flip(p, [-1]), -1), [-1])  # c_{i-1}
        # c_i = Σ_{j>i} σ_j, the shifted sums (not c_{i−1} − σ_i, which would cancel)
        tail = torch.cat([tail_incl[..., 1:], torch.zeros_like(tail_incl[..., :1])], dim=-1)
        pos = (tail > 0) & (tail_incl > 0)
        one = torch.ones_like(p)
        safe_incl = torch.where(pos, tail_incl, one)
        safe_tail = torch.where(pos, tail, one)
        frac = (p / safe_incl).sqrt()  # √(σ_i / c_{i−1}) ∈ (0, 1]
        root = safe_tail.sqrt()
        diag = torch.where(pos, frac * root, torch.zeros_like(p))
        beta = torch.where(pos, frac / root, torch.zeros_like(p))
        # log form where σ_i or c_i is below the normal range
        lt_incl = torch.flip(torch.logcumsumexp(torch.flip(log_probs, [-1]), -1), [-1])
        lt = torch.cat([lt_incl[..., 1:], torch.full_like(lt_incl[..., :1], float("-inf"))], dim=-1)
        self._normal = (p >= tiny) & (tail >= tiny)
        has_tail = lt > float("-inf")
        safe_lt = torch.where(has_tail, lt, torch.zeros_like(lt))
        lhalf = 0.5 * (log_probs - lt_incl)
        self._ldiag = torch.where(has_tail, lhalf + 0.5 * safe_lt, float("-inf"))
        self._lbeta = torch.where(has_tail, lhalf - 0.5 * safe_lt, float("-inf"))
        big = torch.finfo(p.dtype).max
        self._diag = torch.where(self._normal, diag, self._ldiag.exp())
        self._beta = torch.where(self._normal, beta, self._lbeta.exp().clamp_max(big))
        self._bad = torch.isnan(p.detach()).any(-1)
        if bool(self._bad.any()):
            self._diag = _nan_rows(self._diag, self._bad)
            self._beta = _nan_rows(self._beta, self._bad)

    @property
    def T(self) -> SoftmaxJacobianCholeskyFactor:
        f = SoftmaxJacobianCholeskyFactor.__new__(SoftmaxJacobianCholeskyFactor)
        f.__dict__.update(self.__dict__)
        f._transposed = not self._transposed
        return f

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._t == 1.0 else x / math.sqrt(self._t)

    @staticmethod
    def _l(p, v, diag, beta):
        # exclusive prefix sums by shifting (not cumsum − term, which cancels when β is huge)
        ev = _core.pow2_exponent(v, normalise=True)
        v = _core.ldexp(v, -ev)
        csum = torch.cumsum(beta * v, -1)
        excl = torch.cat([torch.zeros_like(csum[..., :1]), csum[..., :-1]], dim=-1)
        return _core.ldexp(diag * v - p * excl, ev)

    @staticmethod
    def _lt(p, v, diag, beta):
        ev = _core.pow2_exponent(v, normalise=True)
        v = _core.ldexp(v, -ev)
        rsum = torch.flip(torch.cumsum(torch.flip(p * v, [-1]), -1), [-1])
        rexcl = torch.cat([rsum[..., 1:], torch.zeros_like(rsum[..., :1])], dim=-1)
        return _core.ldexp(diag * v - beta * rexcl, ev)

    def _run(self, fn: str, x: torch.Tensor, transposed: bool, left: bool) -> torch.Tensor:
        op = self._lt if transposed else self._l
        out = _apply(fn, self._p, x, op, left=left, extra=(self._diag, self._beta))
        return self._scaled(out)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``L x`` (``Lᵀ x`` for the transposed factor); O(K·m)."""
        return self._run(
            "softjac.SoftmaxJacobianCholeskyFactor.matmul", x, self._transposed, left=False
        )

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x L = (Lᵀ xᵀ)ᵀ``; O(K·m)."""
        return self._run(
            "softjac.SoftmaxJacobianCholeskyFactor.rmatmul", x, not self._transposed, left=True
        )

    def to_dense(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        """Dense L (or Lᵀ), lower (upper) triangular; O(K²). Entries ``−σ_j β_i`` whose
        factors are below the normal range are formed as ``−exp(log σ_j + log β_i)``.
        Refuses (``ValueError``) a result above ``max_bytes`` (default 4 GiB)."""
        check_dense_size(
            "softjac.SoftmaxJacobianCholeskyFactor.to_dense",
            self.shape,
            self.dtype,
            max_bytes,
            temporaries=3,
            hint=_DENSE_HINT,
        )
        p = self._p
        k = p.shape[-1]
        tiny = torch.finfo(p.dtype).tiny
        ar = torch.arange(k, device=p.device)
        below = ar[:, None] > ar[None, :]
        direct = -(p.unsqueeze(-1) * self._beta.unsqueeze(-2))
        ok = (p >= tiny).unsqueeze(-1) & self._normal.unsqueeze(-2)
        via_log = -torch.exp(self._log_p.unsqueeze(-1) + self._lbeta.unsqueeze(-2))
        dense = torch.where(below, torch.where(ok, direct, via_log), 0.0)
        dense = _nan_rows(dense + torch.diag_embed(self._diag), self._bad)
        dense = dense.mT if self._transposed else dense
        return self._scaled(dense)
