"""``SoftmaxRegression``: scikit-learn's multinomial ``LogisticRegression`` by exact Newton."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_consistent_length,
    check_is_fitted,
    validate_data,
)

from softjac.linear_model._solvers import (
    _REDUCE_RATIO,
    SOLVERS,
    Problem,
    choose_solver,
    newton,
    reduce_features,
    serial_if_small,
)

__all__ = ["SoftmaxRegression"]

_NAME = "SoftmaxRegression"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    np.float32: torch.float32,
    np.float64: torch.float64,
}


class SoftmaxRegression(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression fitted by Newton's method on the structured Hessian.

    Minimises scikit-learn's ``LogisticRegression`` objective (L2 penalty, current release)::

        (1/Σs) Σ_i s_i ℓ(y_i, W x_i + b) + ‖W‖² / (2 C Σs)

    with ℓ the cross-entropy of the softmax, the intercept b unpenalised, ``C=inf`` for no
    penalty, in the symmetric K-class parameterisation (``Σ_k W_k = 0`` and ``Σ_k b_k = 0``):
    ``coef_``, ``intercept_`` and ``predict_proba`` agree with ``LogisticRegression`` at the
    same optimum. For two classes, as in scikit-learn, the model is the binary one:
    ``coef_`` is ``(1, d)``, ``intercept_`` is ``(1,)`` and ``decision_function`` returns
    one score per sample.

    Each Newton step solves ``H Δ = −∇f`` exactly for the Hessian
    ``H = (1/Σs) Σ_i s_i (x̃_i x̃_iᵀ) ⊗ (diag p_i − p_i p_iᵀ) + λI`` (x̃ = (x, 1)) in one of
    three regimes, then backtracks (Armijo) on f; it stops when ``max |∇f| ≤ tol``:

    * ``"primal"``: H assembled by one GEMM over the ``n × Kd`` matrix of ``x̃_i ⊗ p_i`` and
      factored by Cholesky: O(n (Kd)² + (Kd)³) per step, O((Kd)²) memory.
    * ``"dual"``: Woodbury through the ``n(K−1)`` Gram matrix ``(X Xᵀ) ∘ [F_iᵀ F_j]``
      (F_i F_iᵀ = diag p_i − p_i p_iᵀ): O((nK)² K + (nK)³) per step, no d² term; needs a
      finite C.
    * ``"newton-cg"``: conjugate gradients on O(n d K) Hessian-vector products, preconditioned
      by a Kronecker approximation of H (the full d' × d' feature matrix for small d', its
      diagonal otherwise); O(n (d + K) + d K²) memory.

    Dense X with more than 1.5 times as many features as samples is first reduced, exactly,
    to its row space (the thin QR factorisation of Xᵀ), so the regimes work on n × n data.
    On the CPU, small problems (fewer than 2²¹ multiply-adds per product with X) are fitted
    with ``torch.set_num_threads(1)``, restored afterwards: the setting is process-wide
    for the duration of the fit.

    ``solver="auto"`` picks the cheapest regime whose working memory fits ``max_bytes``; an
    explicit regime that does not fit raises ``MemoryError`` naming one that does.

    Parameters:
        C: inverse penalty strength (> 0), ``float("inf")`` for none.
        fit_intercept: fit the (unpenalised) intercepts b.
        tol: stop when the largest gradient entry is at most ``tol``.
        max_iter: maximal number of Newton steps (``ConvergenceWarning`` when reached).
        solver: ``"auto"``, ``"primal"``, ``"dual"`` or ``"newton-cg"``.
        warm_start: start from the previous fit's coefficients.
        device: torch device for the computation (default: the tensor's own, else CPU).
        dtype: ``"float32"`` / ``"float64"`` (or the torch/NumPy dtype); default: X's
            floating dtype (float64 for integers, float32 for half precision).
        verbose: print one line per Newton step when > 0.
        max_bytes: working-memory budget of a regime, in bytes (default 4 GiB).

    Attributes:
        classes_: the sorted labels (NumPy array, any label type).
        coef_: ``(K, d)``, or ``(1, d)`` for two classes; NumPy unless fitted on a tensor.
        intercept_: ``(K,)``, or ``(1,)``; zeros without ``fit_intercept``.
        n_iter_: Newton steps taken.
        n_features_in_: d.
        solver_: the regime that ran.
        objective_: the final value of the objective.
    """

    # set by fit: a tensor when fitted on a tensor, else a NumPy array
    coef_: torch.Tensor | np.ndarray
    intercept_: torch.Tensor | np.ndarray

    def __init__(
        self,
        C: float = 1.0,
        *,
        fit_intercept: bool = True,
        tol: float = 1e-4,
        max_iter: int = 100,
        solver: str = "auto",
        warm_start: bool = False,
        device: str | torch.device | None = None,
        dtype: Any = None,
        verbose: int = 0,
        max_bytes: int = 2**32,
    ):
        self.C = C
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.solver = solver
        self.warm_start = warm_start
        self.device = device
        self.dtype = dtype
        self.verbose = verbose
        self.max_bytes = max_bytes

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    # -- parameters -------------------------------------------------------------------------
    def _check_params(self) -> None:
        fn = f"{_NAME}.fit"
        C = self.C
        if isinstance(C, bool) or not isinstance(C, numbers.Real) or not (C > 0):
            raise ValueError(f"`{fn}`: `C` must be a positive number or inf. Got {C!r}.")
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (tol >= 0):
            raise ValueError(f"`{fn}`: `tol` must be a number >= 0. Got {tol!r}.")
        mi = self.max_iter
        if isinstance(mi, bool) or not isinstance(mi, numbers.Integral) or mi < 0:
            raise ValueError(f"`{fn}`: `max_iter` must be an int >= 0. Got {mi!r}.")
        if self.solver not in SOLVERS:
            raise ValueError(
                f"`{fn}`: `solver` must be one of {', '.join(map(repr, SOLVERS))}. "
                f"Got {self.solver!r}."
            )
        mb = self.max_bytes
        if isinstance(mb, bool) or not isinstance(mb, numbers.Real) or not (mb > 0):
            raise ValueError(f"`{fn}`: `max_bytes` must be a positive number. Got {mb!r}.")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(
                f"`{fn}`: `dtype` must be None, 'float32' or 'float64'. Got {self.dtype!r}."
            )

    def _compute_dtype(self, x_dtype) -> torch.dtype:
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        if x_dtype in (torch.float32, torch.float16, torch.bfloat16, np.float32):
            return torch.float32
        return torch.float64

    # -- fit --------------------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None) -> SoftmaxRegression:
        """Fit the model: Newton's method to ``max |∇f| ≤ tol`` (see the class docstring).

        Args:
            X: ``(n, d)`` NumPy array, SciPy sparse matrix or torch tensor.
            y: ``(n,)`` labels of any type (a tensor or array-like).
            sample_weight: ``(n,)`` non-negative weights s_i (default all ones).

        Returns:
            self.
        """
        fn = f"{_NAME}.fit"
        self._check_params()
        torch_in = isinstance(X, torch.Tensor)
        if torch_in:
            Xt = _check_tensor_X(fn, X)
            if isinstance(y, torch.Tensor):
                y = y.detach().cpu().numpy()
            y = np.asarray(y)
            if y.ndim == 2 and y.shape[1] == 1:
                y = y.ravel()
            if y.ndim != 1:
                raise ValueError(f"`{fn}`: `y` must be 1-d. Got shape {y.shape}.")
            check_consistent_length(Xt, y)
            self.n_features_in_ = Xt.shape[1]
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
            n = Xt.shape[0]
            dtype = self._compute_dtype(Xt.dtype)
            device = torch.device(self.device) if self.device is not None else Xt.device
            Xc = Xt.to(device=device, dtype=dtype)
        else:
            X, y = validate_data(
                self,
                X,
                y,
                accept_sparse=["csr", "csc", "coo"],
                dtype=[np.float64, np.float32],
            )
            n = X.shape[0]
            dtype = self._compute_dtype(X.dtype.type)
            device = torch.device(self.device) if self.device is not None else torch.device("cpu")
            Xc = _to_torch(X, dtype, device)
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"`{fn}`: needs samples of at least 2 classes in the data, but the data "
                f"contains only one class: {getattr(classes[0], 'item', lambda: classes[0])()!r}."
            )
        if isinstance(sample_weight, torch.Tensor):
            sample_weight = sample_weight.detach().cpu().numpy()
        sw = _check_sample_weight(
            sample_weight, np.empty((n, 0)), dtype=np.float64, ensure_non_negative=True
        )
        sw_sum = float(sw.sum())
        if not sw_sum > 0:
            raise ValueError(f"`{fn}`: `sample_weight` must not be all zero. Got sum {sw_sum}.")
        k = len(classes)
        binary = k == 2
        lam = 0.0 if math.isinf(self.C) else 1.0 / (float(self.C) * sw_sum)
        if binary:
            # The symmetric 2-class model with W = (−w/2, w/2) has ‖W‖² = ‖w‖²/2.
            lam *= 2.0
        c = torch.as_tensor(sw / sw_sum, dtype=dtype, device=device)
        y_t = torch.as_tensor(y_enc.astype(np.int64), device=device)
        d_full = Xc.shape[1]
        # Small problems run on one thread (see serial_if_small); the reduction to the row
        # space of X caps the width at n.
        with serial_if_small(device, n * min(d_full, n) * k):
            res, basis, W_perp, solver = self._solve(Xc, y_t, c, k, lam, binary, n, fn)
        if not res.converged and res.n_iter >= self.max_iter:
            warnings.warn(
                f"`{fn}`: Newton's method did not converge in max_iter={self.max_iter} "
                f"iterations (max |gradient| = {res.grad_max:.3g} > tol = {self.tol}). "
                "Increase `max_iter`, or standardise X.",
                ConvergenceWarning,
                stacklevel=2,
            )
        W, b = res.coef, res.intercept
        if basis is not None:
            # Without a penalty the component of a warm start outside the row space of X
            # changes no logit and no gradient: it is kept, as the full problem would.
            W = W @ basis.T + (W_perp if lam == 0 and W_perp is not None else 0.0)
        if binary:
            W = (W[1] - W[0]).unsqueeze(0)
            b = (b[1] - b[0]).unsqueeze(0)
        if not self.fit_intercept:
            b = torch.zeros_like(b)
        self.classes_ = classes
        if torch_in:
            self.coef_ = W.contiguous()
            self.intercept_ = b.contiguous()
        else:
            self.coef_ = W.cpu().numpy()
            self.intercept_ = b.cpu().numpy()
        self.n_iter_ = int(res.n_iter)
        self.solver_ = solver
        self.objective_ = float(res.objective)
        return self

    def _solve(self, Xc, y_t, c, k, lam, binary, n, fn):
        """The regime choice and Newton's method (after the row-space reduction when d > n);
        returns the result, the basis and the start's part outside it, and the regime."""
        n_feat = Xc.shape[1]
        W0, b0 = self._initial(k, n_feat, Xc.dtype, Xc.device, binary)
        basis, W_perp = None, None
        if Xc.layout == torch.strided and n_feat > _REDUCE_RATIO * n:
            # More features than samples: solve on the row space of X (exact; see
            # reduce_features) and map back.
            Xc, basis = reduce_features(Xc)
            W_perp = W0 - (W0 @ basis) @ basis.T
            W0 = W0 @ basis
        prob = Problem(Xc, y_t, c, k, lam, bool(self.fit_intercept), basis=basis)
        itemsize = Xc.element_size()
        solver = choose_solver(
            self.solver,
            n,
            prob.d,
            k,
            fit_intercept=bool(self.fit_intercept),
            penalised=lam > 0,
            sparse=prob.sparse,
            itemsize=itemsize,
            max_bytes=float(self.max_bytes),
            fn=fn,
        )
        if self.verbose:
            print(f"{_NAME}: n={n}, d={prob.d}, K={k}, solver={solver!r}")
        res = newton(
            prob,
            W0,
            b0,
            solver=solver,
            tol=float(self.tol),
            max_iter=int(self.max_iter),
            verbose=int(self.verbose),
        )
        return res, basis, W_perp, solver

    def _initial(self, k, d, dtype, device, binary):
        W0 = torch.zeros(k, d, dtype=dtype, device=device)
        b0 = torch.zeros(k, dtype=dtype, device=device)
        if not (self.warm_start and hasattr(self, "coef_")):
            return W0, b0
        coef = torch.as_tensor(self.coef_).to(device=device, dtype=dtype)
        icpt = torch.as_tensor(self.intercept_).to(device=device, dtype=dtype)
        if binary and coef.shape == (1, d):
            W0 = torch.cat([-coef / 2, coef / 2])
            b0 = torch.cat([-icpt / 2, icpt / 2])
        elif coef.shape == (k, d):
            W0, b0 = coef.clone(), icpt.clone()
        return W0, b0

    # -- prediction -------------------------------------------------------------------------
    def _scores(self, X, fn: str):
        """Logits ``X coefᵀ + intercept``: a tensor for tensor X, else NumPy."""
        check_is_fitted(self)
        if isinstance(X, torch.Tensor):
            Xt = _check_tensor_X(fn, X)
            if Xt.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"`{fn}`: X has {Xt.shape[1]} features, but {_NAME} is expecting "
                    f"{self.n_features_in_} features as input."
                )
            coef = torch.as_tensor(self.coef_)
            Xt = Xt.to(dtype=coef.dtype if coef.is_floating_point() else torch.float64)
            coef = coef.to(device=Xt.device, dtype=Xt.dtype)
            icpt = torch.as_tensor(self.intercept_).to(device=Xt.device, dtype=Xt.dtype)
            return Xt @ coef.T + icpt
        X = validate_data(
            self,
            X,
            accept_sparse=["csr", "csc", "coo"],
            dtype=[np.float64, np.float32],
            reset=False,
        )
        coef = _to_numpy(self.coef_)
        icpt = _to_numpy(self.intercept_)
        Z = X @ coef.T
        return np.asarray(Z) + icpt

    def decision_function(self, X):
        """Logits ``X coef_ᵀ + intercept_``: ``(n, K)``, or ``(n,)`` for two classes. O(n d K)."""
        Z = self._scores(X, f"{_NAME}.decision_function")
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def _full_logits(self, X, fn):
        Z = self._scores(X, fn)
        if Z.shape[1] == 1:
            if isinstance(Z, torch.Tensor):
                Z = torch.cat([torch.zeros_like(Z), Z], dim=1)
            else:
                Z = np.concatenate([np.zeros_like(Z), Z], axis=1)
        return Z

    def predict_proba(self, X):
        """Class probabilities ``softmax(X coef_ᵀ + intercept_)``, ``(n, K)``."""
        Z = self._full_logits(X, f"{_NAME}.predict_proba")
        if isinstance(Z, torch.Tensor):
            return torch.softmax(Z, dim=1)
        Z = Z - Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        return E / E.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X):
        """``log_softmax(X coef_ᵀ + intercept_)``, accurate for tiny probabilities."""
        Z = self._full_logits(X, f"{_NAME}.predict_log_proba")
        if isinstance(Z, torch.Tensor):
            return torch.log_softmax(Z, dim=1)
        Z = Z - Z.max(axis=1, keepdims=True)
        return Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))

    def predict(self, X):
        """The label with the largest logit, from ``classes_``."""
        Z = self._full_logits(X, f"{_NAME}.predict")
        if isinstance(Z, torch.Tensor):
            idx = Z.argmax(dim=1)
            if self.classes_.dtype.kind in "biuf":
                return torch.as_tensor(self.classes_, device=Z.device)[idx]
            return self.classes_[idx.cpu().numpy()]
        return self.classes_[Z.argmax(axis=1)]

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy of ``predict(X)`` against y (weighted by ``sample_weight``)."""
        pred = _to_numpy(self.predict(X))
        y = _to_numpy(y)
        sample_weight = None if sample_weight is None else _to_numpy(sample_weight)
        return float(accuracy_score(y, pred, sample_weight=sample_weight))


def _to_numpy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_tensor_X(fn: str, X: torch.Tensor) -> torch.Tensor:
    if X.layout != torch.strided:
        raise TypeError(f"`{fn}`: sparse tensors are not supported; pass a SciPy sparse matrix.")
    if X.ndim != 2:
        raise ValueError(
            f"`{fn}`: `X` must be 2-d (n_samples, n_features). Got shape {tuple(X.shape)}."
        )
    if X.shape[0] == 0:
        raise ValueError(f"`{fn}`: `X` has 0 samples (shape {tuple(X.shape)}); need at least 1.")
    if X.shape[1] == 0:
        raise ValueError(f"`{fn}`: `X` has 0 features (shape {tuple(X.shape)}); need at least 1.")
    if X.is_complex():
        raise ValueError(f"`{fn}`: complex data is not supported. Got {X.dtype}.")
    X = X.detach()
    if not X.is_floating_point():
        X = X.to(torch.float64)
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"`{fn}`: `X` contains NaN or infinity.")
    return X


def _to_torch(X, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sum_duplicates()
        X.sort_indices()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            t = torch.sparse_csr_tensor(
                torch.as_tensor(X.indptr.astype(np.int64)),
                torch.as_tensor(X.indices.astype(np.int64)),
                torch.as_tensor(np.array(X.data, dtype=X.data.dtype)),
                size=X.shape,
                check_invariants=False,
            )
            return t.to(device=device, dtype=dtype)
    X = np.ascontiguousarray(X)
    if not X.flags.writeable:
        X = X.copy()
    return torch.from_numpy(X).to(device=device, dtype=dtype)
