"""Layer 5: ``SoftmaxJacobian``, the softmax Jacobian as a structured linear operator.

``J = diag(σ) − σσᵀ`` is diagonal minus rank one and singular by construction. The operator
stores σ (and log σ) only — O(K) memory per slice — and implements every operation as a
closed form on σ (O(K)) or through the secular-equation eigen-solver of
:mod:`softjac._spectral` (O(K²)); ``to_dense()`` exists for checking and small K. Formulas:
``docs/math.md`` ("Closed forms", "Spectrum").

Conventions (as in :mod:`softjac._functional`): ``dim`` is moved last, so the operator is the
batch ``(*batch, K, K)``; ``mask`` True keeps an entry, ``-inf`` logits are masked too;
float16/bfloat16 inputs compute (and are stored) in float32. With a temperature T the operator
is ``∂σ/∂z = J(σ(z/T)) / T``. The *support* S of a slice is the set of entries with σ_i
at least the smallest normal number of the dtype (masked and underflowed entries are outside
it; their rows and columns of J are zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from softjac import _core
from softjac._checks import (
    as_float_dtype,
    check_logits,
    check_mask,
    check_positive,
    check_temperature,
    check_tensor,
    fmt_shape,
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


def _support(p: torch.Tensor) -> torch.Tensor:
    return p >= torch.finfo(p.dtype).tiny


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
    (``J 1 = 0``); its rank is ``|S| − 1`` for the support S (entries with σ_i > 0, see the
    module notes), and it is all-zero for a fully masked slice.

    Args:
        logits: floating tensor; σ = softmax(logits / T) along ``dim`` (masked entries 0).
            log σ comes from log-softmax, so :meth:`log_pdet` stays finite where ``∏σ``
            underflows.
        probs: probabilities along ``dim``: non-negative and summing to 1 per slice within
            ``8·sqrt(eps)`` of the (compute) dtype (a slice of all zeros is the fully masked
            slice); otherwise ``ValueError``. Masked entries are set to 0 before the check.
        dim: the class dimension.
        mask: boolean, broadcastable to the input; True keeps an entry.
        temperature: T > 0; the operator is ``J/T`` (the Jacobian with respect to z).

    Gradients flow back to ``logits``/``probs`` through :meth:`matmul` (``@``),
    :meth:`to_dense`, :meth:`diagonal`, :meth:`trace`, :meth:`frobenius_norm`,
    :meth:`log_pdet`, :meth:`solve_damped`, :meth:`logdet_damped` and the factors' products.
    The spectral methods (:meth:`eigvalsh`, :meth:`eigh`, :meth:`spectral_norm`,
    :meth:`sqrtm`, :meth:`apply_function`) are computed on detached σ.

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
        t = check_temperature(fn, temperature)
        if logits is not None:
            z, d, _ = _prepare(fn, logits, dim, mask, t)
            self._p, self._log_p = _core.softmax_and_log_last(z)
        else:
            assert probs is not None
            d = check_logits(fn, probs, dim, name="probs")
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

    def to_dense(self) -> torch.Tensor:
        """Dense ``(diag(σ) − σσᵀ)/T``, shape ``(*batch, K, K)``; O(K²). For checks and small K."""
        return self._scaled(_core.jacobian_last(self._p))

    def diagonal(self) -> torch.Tensor:
        """``σ_i (1 − σ_i) / T`` with ``1 − σ_{i*} = Σ_{j≠i*} σ_j``; shape ``(*batch, K)``, O(K)."""
        return self._scaled(self._p * _core.one_minus(self._p))

    def trace(self) -> torch.Tensor:
        """``tr J / T = Σ σ_i(1 − σ_i) / T = (1 − Σσ²)/T`` (from the accurate diagonal); O(K)."""
        return self.diagonal().sum(-1)

    def frobenius_norm(self) -> torch.Tensor:
        """``‖J‖_F / T`` with ``‖J‖_F² = Σ σ_i²(1 − σ_i)² + Σ_i σ_i² Σ_{j≠i} σ_j²``; O(K).

        (Equal to ``Σσ² − 2Σσ³ + (Σσ²)²``, which cancels for a near one-hot σ; here every
        term is positive and ``Σ_{j≠i*} σ_j²`` is summed directly for the argmax.)
        """
        p = self._p
        p2 = p * p
        idx = _core.argmax_index(p)
        diag2 = (p * _core.one_minus(p, idx)).square().sum(-1)
        rest = (p2.sum(-1, keepdim=True) - p2).scatter(-1, idx, _core.max_complement(p2, idx))
        off = (p2 * rest).sum(-1)
        return self._scaled((diag2 + off).sqrt())

    # ------------------------------------------------------------------ spectrum
    def eigvalsh(self) -> torch.Tensor:
        """All K eigenvalues ascending, shape ``(*batch, K)``; O(K²) per slice, no autograd.

        An exact 0 for ``J 1_S = 0``, one 0 per entry outside the support, ``s`` (m − 1)
        times for m tied entries of value s, and the roots of ``Σ c_g/(d_g − λ) = 0``
        between consecutive distinct σ values, each accurate relative to itself. Divided by T.
        """
        return self._scaled(secular_eigvalsh(self._p.detach()))

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and orthonormal eigenvectors (columns), ``Q diag(λ) Qᵀ``.

        Gu–Eisenstat eigenvectors (orthogonal also for clustered σ) with exact deflation of
        ties and zeros; see :mod:`softjac._spectral`. O(K²) per slice; no autograd.

        Returns:
            ``(λ, Q)`` of shapes ``(*batch, K)`` and ``(*batch, K, K)``.
        """
        lam, q = secular_eigh(self._p.detach())
        return self._scaled(lam), q

    def spectral_norm(self) -> torch.Tensor:
        """``λ_max / T`` (≤ 1/(2T)), shape ``(*batch,)``; O(K log K) (one secular root)."""
        return self._scaled(secular_spectral_norm(self._p.detach()))

    def apply_function(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Dense ``Q f(Λ) Qᵀ`` for a spectral function ``f`` (applied elementwise to the
        eigenvalues of ``J/T``); O(K²) for ``eigh`` plus one K×K×K matrix product."""
        lam, q = self.eigh()
        return (q * f(lam).unsqueeze(-2)) @ q.mT

    def sqrtm(self) -> torch.Tensor:
        """Dense symmetric square root ``Q Λ^{1/2} Qᵀ`` (no closed form is known); see
        :meth:`apply_function`. For a factor with ``S Sᵀ = J`` in O(K) use :meth:`sqrt_factor`."""
        return self.apply_function(lambda lam: lam.clamp_min(0).sqrt())

    # ------------------------------------------------------------------ inverses, determinants
    def pinv(self) -> SoftmaxJacobianPinv:
        """The pseudo-inverse ``T·J⁺`` with ``J⁺ = P diag(1/σ) P`` on the support S,
        ``P = I − 1_S 1_Sᵀ/|S|``, as a structured operator (O(K) products); O(K) to build."""
        return SoftmaxJacobianPinv(self._p, self._t)

    def log_pdet(self) -> torch.Tensor:
        """log of the pseudo-determinant (product of the nonzero eigenvalues) of ``J/T``.

        ``pdet J = |S| ∏_{i∈S} σ_i``, so ``log pdet = log |S| + Σ_{i∈S} log σ_i − (|S|−1) log T``,
        summed from log-softmax (finite where ``∏σ`` underflows). O(K). Conventions: a slice
        with one support entry has J = 0 restricted to a 1×1 block and gives the empty
        product, ``log pdet = 0``; a fully masked slice (|S| = 0) gives ``log 0 = −inf``.
        Shape ``(*batch,)``; differentiable.
        """
        sup = _support(self._p)
        n = sup.sum(-1)
        lp = torch.where(sup, self._log_p, torch.zeros_like(self._log_p)).sum(-1)
        nf = n.to(lp.dtype)
        out = lp + nf.log()
        if self._t != 1.0:
            out = out - (nf - 1) * math.log(self._t)
        return torch.where(n > 0, out, torch.full_like(out, float("-inf")))

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
            d = pp + mu
            u = v / d
            w = pp / d
            den = mu * w.sum(-1, keepdim=True)
            den = torch.where(den > 0, den, torch.ones_like(den))
            return u + w * ((pp * u).sum(-1, keepdim=True) / den)

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
        return SoftmaxJacobianSqrtFactor(self._p, self._t)

    def cholesky_factor(self) -> SoftmaxJacobianCholeskyFactor:
        """The exact lower-triangular ``L`` with ``L Lᵀ = J/T`` (from tail sums), as an
        operator with O(K) products; see :class:`SoftmaxJacobianCholeskyFactor`."""
        return SoftmaxJacobianCholeskyFactor(self._p, self._t)

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
    """

    is_symmetric = True
    is_positive_semidefinite = True

    def __init__(self, probs: torch.Tensor, temperature: float = 1.0) -> None:
        self._p = probs
        self._t = float(temperature)

    @property
    def T(self) -> SoftmaxJacobianPinv:
        return self

    @staticmethod
    def _op(p: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
        sup = _support(p)
        n = sup.sum(-1, keepdim=True).clamp_min(1).to(p.dtype)
        zero = torch.zeros_like(v)
        y = torch.where(sup, v, zero)
        y = torch.where(sup, y - y.sum(-1, keepdim=True) / n, zero)
        u = y / torch.where(sup, p, torch.ones_like(p))
        out = torch.where(sup, u - u.sum(-1, keepdim=True) / n, zero)
        return out if t == 1.0 else out * t

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``T·P diag(1/σ) P x`` (centre on S, divide by σ, centre again); O(K·m)."""
        return _apply(
            "softjac.SoftmaxJacobianPinv.matmul", self._p, x, lambda p, v: self._op(p, v, self._t)
        )

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(
            "softjac.SoftmaxJacobianPinv.rmatmul",
            self._p,
            x,
            lambda p, v: self._op(p, v, self._t),
            left=True,
        )

    def to_dense(self) -> torch.Tensor:
        """``T·[δ_ij/σ_i − (1/σ_i + 1/σ_j)/n + Σ_k(1/σ_k)/n²]`` on S×S (n = |S|), else 0; O(K²)."""
        p = self._p
        sup = _support(p)
        n = sup.sum(-1, keepdim=True).clamp_min(1).to(p.dtype)
        a = torch.where(sup, 1 / torch.where(sup, p, torch.ones_like(p)), torch.zeros_like(p))
        tot = a.sum(-1, keepdim=True)
        dense = torch.diag_embed(a) - (a.unsqueeze(-1) + a.unsqueeze(-2)) / n.unsqueeze(-1)
        dense = dense + (tot / (n * n)).unsqueeze(-1)
        both = sup.unsqueeze(-1) & sup.unsqueeze(-2)
        dense = torch.where(both, dense, torch.zeros_like(dense))
        return dense if self._t == 1.0 else dense * self._t


class SoftmaxJacobianSqrtFactor(_Structured):
    """``S = (diag(√σ) − σ√σᵀ)/√T`` with ``S Sᵀ = J/T`` (uses ``Σσ = 1``), O(K) products.

    ``S x = √σ ⊙ x − σ ⟨√σ, x⟩`` and ``Sᵀ y = √σ ⊙ (y − ⟨σ, y⟩)``, the argmax entries formed
    without cancellation (``1 − σ_{i*} = Σ_{j≠i*} σ_j``). ``.T`` is the transposed factor.
    """

    is_symmetric = False

    def __init__(self, probs: torch.Tensor, temperature: float = 1.0, transposed: bool = False):
        self._p = probs
        self._t = float(temperature)
        self._transposed = transposed

    @property
    def T(self) -> SoftmaxJacobianSqrtFactor:
        return SoftmaxJacobianSqrtFactor(self._p, self._t, not self._transposed)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._t == 1.0 else x / math.sqrt(self._t)

    @staticmethod
    def _s(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (S v)_i = √σ_i v_i − σ_i Σ_j √σ_j v_j; argmax: √σ v (1 − σ) − σ Σ_{j≠i*} √σ_j v_j.
        rv = p.sqrt() * v
        out = rv - p * rv.sum(-1, keepdim=True)
        idx = _core.argmax_index(p)
        rest = rv.scatter(-1, idx, 0.0).sum(-1, keepdim=True)
        star = rv.gather(-1, idx) * _core.max_complement(p, idx) - p.gather(-1, idx) * rest
        return out.scatter(-1, idx, star)

    @staticmethod
    def _st(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (Sᵀ v)_i = √σ_i (v_i − ⟨σ, v⟩); argmax: √σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j).
        return p.sqrt() * _core.centred_last(p, v)

    def _fwd(self, transposed: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self._st if transposed else self._s

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``S x`` (or ``Sᵀ x`` for the transposed factor); O(K·m)."""
        fn = "softjac.SoftmaxJacobianSqrtFactor.matmul"
        return self._scaled(_apply(fn, self._p, x, self._fwd(self._transposed)))

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x S = (Sᵀ xᵀ)ᵀ``; O(K·m)."""
        fn = "softjac.SoftmaxJacobianSqrtFactor.rmatmul"
        return self._scaled(_apply(fn, self._p, x, self._fwd(not self._transposed), left=True))

    def to_dense(self) -> torch.Tensor:
        """Dense S (or Sᵀ), diagonal ``√σ_i(1 − σ_i)`` with the accurate complement; O(K²)."""
        p = self._p
        r = p.sqrt()
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
    """

    is_symmetric = False

    def __init__(self, probs: torch.Tensor, temperature: float = 1.0, transposed: bool = False):
        self._p = probs
        self._t = float(temperature)
        self._transposed = transposed
        p = probs
        tail_incl = torch.flip(torch.cumsum(torch.flip(p, [-1]), -1), [-1])  # c_{i-1}
        # c_i = Σ_{j>i} σ_j, the shifted sums (not c_{i−1} − σ_i, which would cancel)
        tail = torch.cat([tail_incl[..., 1:], torch.zeros_like(tail_incl[..., :1])], dim=-1)
        pos = (tail > 0) & (tail_incl > 0)
        one = torch.ones_like(p)
        safe_incl = torch.where(pos, tail_incl, one)
        safe_tail = torch.where(pos, tail, one)
        self._diag = torch.where(pos, (p * safe_tail / safe_incl).sqrt(), torch.zeros_like(p))
        self._beta = torch.where(pos, (p / (safe_incl * safe_tail)).sqrt(), torch.zeros_like(p))

    @property
    def T(self) -> SoftmaxJacobianCholeskyFactor:
        f = SoftmaxJacobianCholeskyFactor.__new__(SoftmaxJacobianCholeskyFactor)
        f._p, f._t, f._transposed = self._p, self._t, not self._transposed
        f._diag, f._beta = self._diag, self._beta
        return f

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._t == 1.0 else x / math.sqrt(self._t)

    @staticmethod
    def _l(p, v, diag, beta):
        # exclusive prefix sums by shifting (not cumsum − term, which cancels when β is huge)
        csum = torch.cumsum(beta * v, -1)
        excl = torch.cat([torch.zeros_like(csum[..., :1]), csum[..., :-1]], dim=-1)
        return diag * v - p * excl

    @staticmethod
    def _lt(p, v, diag, beta):
        rsum = torch.flip(torch.cumsum(torch.flip(p * v, [-1]), -1), [-1])
        rexcl = torch.cat([rsum[..., 1:], torch.zeros_like(rsum[..., :1])], dim=-1)
        return diag * v - beta * rexcl

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

    def to_dense(self) -> torch.Tensor:
        """Dense L (or Lᵀ), lower (upper) triangular; O(K²)."""
        p = self._p
        k = p.shape[-1]
        ar = torch.arange(k, device=p.device)
        below = ar[:, None] > ar[None, :]
        dense = torch.where(below, -(p.unsqueeze(-1) * self._beta.unsqueeze(-2)), 0.0)
        dense = dense + torch.diag_embed(self._diag)
        dense = dense.mT if self._transposed else dense
        return self._scaled(dense)
