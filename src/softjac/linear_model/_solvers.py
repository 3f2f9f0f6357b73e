"""Newton's method for multinomial logistic regression on the structured Hessian.

The problem (scikit-learn's ``LogisticRegression`` objective, symmetric parameterisation)::

    f(W, b) = Σ_i c_i ℓ(y_i, W x_i + b) + (λ/2) ‖W‖²,   c_i = s_i / Σs,   λ = 1 / (C Σs),

with ℓ the cross-entropy of the logits z_i = W x_i + b (``W`` is ``(K, d)``, ``b`` is ``(K,)``).
Its gradient is ``Rᵀ X + λW`` and ``Rᵀ 1`` with ``R_i = c_i (p_i − e_{y_i})``, and its Hessian
in the feature-major order θ = vec((W, b)ᵀ) is

    H = Σ_i c_i (x̃_i x̃_iᵀ) ⊗ J_i + λ I_W,        J_i = diag(p_i) − p_i p_iᵀ,   x̃_i = (x_i, 1).

``J_i 1 = 0``, so H is singular along ``e_b ⊗ 1`` (the intercepts, always unpenalised) and, when
λ = 0, along every ``e_j ⊗ 1``. The gradient is orthogonal to those directions and the
iterates are kept centred over the classes (Σ_k b_k = 0, and Σ_k W_k = 0, which the
penalty enforces anyway) — the symmetric parameterisation. Each regime solves the Newton
system on that subspace by adding ``μ · 11ᵀ/K`` on the singular blocks: 1 is an exact
eigenvector of those blocks with eigenvalue 0, so the added term changes nothing on the
centred subspace and makes the system positive definite.

Three regimes solve ``H Δ = −g`` exactly (up to the CG tolerance):

* ``primal``: H assembled as ``blockdiag_k(X̃ᵀ diag(c p_k) X̃) − BᵀB`` with B the ``n × Kd'``
  matrix of rows ``√c_i x̃_i ⊗ p_i`` (one GEMM, chunked over rows), then Cholesky.
  O(n (Kd')² + (Kd')³) time, O((Kd')²) memory.
* ``dual``: Woodbury through the ``n(K−1)`` Gram matrix ``(X Xᵀ) ∘ [F_iᵀ F_j]`` with F_i the
  ``K × (K−1)`` factor F_i F_iᵀ = c_i J_i; the intercepts by a K × K Schur complement.
  O((n(K−1))² K + (n(K−1))³) time, independent of d after the one ``X Xᵀ``; needs λ > 0.
* ``newton-cg``: preconditioned CG on Hessian-vector products ``X̃ᵀ [c_i J_i (W̃ x̃_i)]``,
  O(n d K) each, with X̃ᵀ stored once as ``(d', n)`` and the ``(K, n)`` work in arrays kept
  for the fit. The preconditioner is a Kronecker approximation ``A ⊗ J̃ + λI`` of H: the
  full ``d' × d'`` matrix A when d' ≤ 8K (``_FullKroneckerPreconditioner``), else its
  diagonal (``_KroneckerPreconditioner``, one K × K block per feature). CG stops at
  ``‖r‖ ≤ 0.3 ‖g‖`` or at ``max |r| ≤ tol / 4``.

Dense X with d > 1.5 n is first reduced, exactly, to its row space (``reduce_features``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from sklearn.exceptions import ConvergenceWarning

__all__ = [
    "SOLVERS",
    "NewtonResult",
    "Problem",
    "choose_solver",
    "newton",
    "reduce_features",
    "reduced_factor",
    "serial_if_small",
]

SOLVERS = ("auto", "primal", "dual", "newton-cg")

# Rows per chunk when B = [√c_i x̃_i ⊗ p_i] is formed for the primal Hessian.
_CHUNK_BYTES = 64 * 2**20
# X̃ = [X, 1] is stored (a copy of X) up to this size; above, X and the intercept column
# are multiplied separately.
_AUGMENT_BYTES = 2**30
# Dense X with more than this many times as many features as samples is reduced to its
# row space first (reduce_features).
_REDUCE_RATIO = 1.5
# CPU fits whose products with X have fewer multiply-adds than this (n · min(d, n) · K) run
# on one thread: their tensors are too small for parallel regions to pay, and on a busy host
# every parallel region waits for a descheduled thread (two threads made such fits 10–100×
# slower on this project's shared 2-core machine).
_SERIAL_WORK = 2**21
# Rᵀ X̃ over more than 2·_XTR_CHUNK samples is accumulated over blocks of that many.
_XTR_CHUNK = 8192
# Newton–CG: the forcing term η (CG stops at ‖r‖ ≤ η‖g‖) and the largest d' for the full
# Kronecker preconditioner.
_FORCING = 0.3
_FULL_KRON_MAX_D = 512
# The full Kronecker preconditioner's d' × d' matrix is estimated from at most this many
# samples.
_KRON_ROWS = 4096
# The cost model of the regimes (see solver_cost): Hessian-vector products per Newton–CG
# step, counting the objective and gradient of the step as one more (4–10 were measured
# with the forcing term below; Newton–CG also takes about one more step than the exact
# regimes), their cost per flop relative to a large GEMM, and the fixed cost of one CG
# iteration (a dozen small tensor operations) in flop-equivalents.
_CG_PRODUCTS = 5
_HVP_WEIGHT = 3.0
_CG_OVERHEAD = 2e6
# A Cholesky factorisation's flops cost about this many GEMM flops (less parallel, and
# followed by triangular solves).
_CHOLESKY_WEIGHT = 3.0


def reduced_factor(probs: torch.Tensor) -> torch.Tensor:
    """``F`` of shape ``(n, K, K − 1)`` with ``F_i F_iᵀ = J_i = diag(p_i) − p_i p_iᵀ``.

    With p' the first K − 1 probabilities and q = p_K, ``J = P J' Pᵀ`` where
    ``P = [I; −1ᵀ]`` and ``J' = diag(p') − p'p'ᵀ``; ``J' = L Lᵀ`` with
    ``L = diag(√p') − p' √p'ᵀ / (1 + √q)`` (expand: the cross terms sum to −p'p'ᵀ because
    Σp' = 1 − q). Hence the first K − 1 rows of F are L and its last row is
    ``−1ᵀL = −√q √p'ᵀ``. No cancellation: every entry is a product of non-negative terms
    except the off-diagonal ones, which are single products. O(n K²).
    """
    n, k = probs.shape
    sp = probs[:, : k - 1].sqrt()
    sq = probs[:, k - 1 :].sqrt()
    out = probs.new_empty(n, k, k - 1)
    top = out[:, : k - 1, :]
    top.copy_(-(probs[:, : k - 1] / (1.0 + sq)).unsqueeze(-1) * sp.unsqueeze(-2))
    top.diagonal(dim1=-2, dim2=-1).add_(sp)
    out[:, k - 1, :] = -sq * sp
    return out


@dataclass
class NewtonResult:
    coef: torch.Tensor  # (K, d)
    intercept: torch.Tensor  # (K,)
    n_iter: int
    converged: bool
    objective: float
    grad_max: float
    solver: str


class Problem:
    """The data and the objective: X ``(n, d)`` dense or sparse CSR, labels ``(n,)`` int64 in
    ``[0, K)``, weights ``c`` summing to 1, penalty λ (0 for none)."""

    def __init__(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        c: torch.Tensor,
        n_classes: int,
        lam: float,
        fit_intercept: bool,
        basis: torch.Tensor | None = None,
    ):
        self.X = X
        # With ``basis`` Q (D × d, orthonormal columns), X holds the reduced data X_full Q and
        # the coefficients W stand for W Qᵀ (see reduce_features); gradients are reported
        # in the full coordinates.
        self.basis = basis
        self.sparse = X.layout != torch.strided
        self.y = y
        self.c = c
        self.k = n_classes
        self.lam = float(lam)
        self.fit_intercept = fit_intercept
        self.n, self.d = X.shape
        self.dtype = X.dtype
        self.device = X.device
        self._XXt: torch.Tensor | None = None
        self._Xt: torch.Tensor | None = None
        self._s: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        # X̃ᵀ = [X, 1]ᵀ stored once, (d', n) contiguous (dense X, when the copy is
        # affordable): X̃ Θᵀ and Rᵀ X̃ are then single products for the coefficients and the
        # intercepts together, both in the (K, n) layout, the faster one for these skinny
        # products.
        self.XaT: torch.Tensor | None = None
        if not self.sparse and self.n * (self.d + 1) * _itemsize(self.dtype) <= _AUGMENT_BYTES:
            XaT = X.new_empty(self.d + int(fit_intercept), self.n)
            XaT[: self.d].copy_(X.T)
            if fit_intercept:
                XaT[self.d].fill_(1.0)
            self.XaT = XaT

    # -- products with X -------------------------------------------------------------------
    def xw(self, W: torch.Tensor) -> torch.Tensor:
        """``X Wᵀ``, ``(n, K)``."""
        if self.sparse:
            return self.X @ W.T.contiguous()
        return self.X @ W.T

    def xtr(self, R: torch.Tensor) -> torch.Tensor:
        """``Rᵀ X``, ``(K, d)``."""
        if self.sparse:
            return (self._sparse_t() @ R).T
        return R.T @ self.X

    def _sparse_t(self) -> torch.Tensor:
        if self._Xt is None:
            self._Xt = self.X.t().to_sparse_csr()
        return self._Xt

    def x2t_mm(self, A: torch.Tensor) -> torch.Tensor:
        """``(X ∘ X)ᵀ A``, ``(d, m)``."""
        if self.sparse:
            Xt = self._sparse_t()
            X2t = torch.sparse_csr_tensor(
                Xt.crow_indices(),
                Xt.col_indices(),
                Xt.values() ** 2,
                Xt.shape,
                check_invariants=False,
            )
            return X2t @ A
        return (self.X * self.X).T @ A

    def sq_col_weights(self) -> torch.Tensor:
        """``Σ_i c_i x_ij²`` per feature, ``(d,)`` (computed once)."""
        if self._s is None:
            if self.sparse:
                self._s = self.x2t_mm(self.c.unsqueeze(1)).squeeze(1)
            else:
                item = _itemsize(self.dtype)
                chunk = max(1, min(self.n, _CHUNK_BYTES // max(1, self.d * item)))
                s = torch.zeros(self.d, dtype=self.dtype, device=self.device)
                for lo in range(0, self.n, chunk):
                    Xc = self.X[lo : lo + chunk]
                    s.addmv_((Xc * Xc).T, self.c[lo : lo + chunk])
                self._s = s
        return self._s

    def dense_x(self) -> torch.Tensor:
        return self.X.to_dense() if self.sparse else self.X

    def gram(self) -> torch.Tensor:
        """``X Xᵀ`` (n, n), computed once."""
        if self._XXt is None:
            Xd = self.dense_x()
            self._XXt = Xd @ Xd.T
        return self._XXt

    def buffer(self, name: str) -> torch.Tensor:
        """A ``(K, n)`` work array kept for the whole fit: fresh arrays of that size cost
        more in page faults than the elementwise operations on them when n is large."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty(
                self.k, self.n, dtype=self.dtype, device=self.device
            )
        return buf

    def xw_t(self, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``V X̃ᵀ`` for V = (V_w, v_b) of shape ``(K, d')``: ``(X V_wᵀ + v_b)ᵀ``, ``(K, n)``
        (into ``out`` when given)."""
        if self.XaT is not None:
            return torch.mm(V, self.XaT, out=out) if out is not None else V @ self.XaT
        U = self.xw(V[:, : self.d])
        if self.fit_intercept:
            U += V[:, self.d]
        return out.copy_(U.T) if out is not None else U.T.contiguous()

    def xtr_t(self, RT: torch.Tensor) -> torch.Tensor:
        """``Rᵀ X̃`` = ``(Rᵀ X, Rᵀ 1)`` for ``Rᵀ`` of shape ``(K, n)``; ``(K, d')``."""
        if self.XaT is not None:
            if self.n <= 2 * _XTR_CHUNK:
                return RT @ self.XaT.T
            # Over long rows one product accumulated per column block runs about twice as
            # fast (the blocks stay in cache).
            G = RT.new_zeros(self.k, self.XaT.shape[0])
            for lo in range(0, self.n, _XTR_CHUNK):
                G.addmm_(RT[:, lo : lo + _XTR_CHUNK], self.XaT[:, lo : lo + _XTR_CHUNK].T)
            return G
        R = RT.T
        if not self.fit_intercept:
            return self.xtr(R)
        return torch.cat([self.xtr(R), R.sum(0).unsqueeze(1)], dim=1)

    def aug_t_rows(self, stride: int) -> torch.Tensor:
        """``X̃ᵀ`` of every ``stride``-th sample, ``(d', ⌈n / stride⌉)``."""
        if self.XaT is not None:
            return self.XaT[:, ::stride]
        Xs = self.dense_x()[::stride]
        if self.fit_intercept:
            Xs = torch.cat([Xs, Xs.new_ones(Xs.shape[0], 1)], dim=1)
        return Xs.T

    # -- objective ------------------------------------------------------------------------
    def logits(self, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = self.xw(W)
        if self.fit_intercept:
            z = z + b
        return z

    def value(self, W: torch.Tensor, Z: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Objective at logits Z (for coefficients W) and the probabilities."""
        lse = torch.logsumexp(Z, dim=1)
        zy = Z.gather(1, self.y.unsqueeze(1)).squeeze(1)
        f = torch.dot(self.c, lse - zy)
        if self.lam > 0:
            f = f + 0.5 * self.lam * torch.sum(W * W)
        P = torch.exp(Z - lse.unsqueeze(1))
        return float(f), P

    def gradient(self, W: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R = P * self.c.unsqueeze(1)
        R[torch.arange(self.n, device=self.device), self.y] -= self.c
        gw = self.xtr(R)
        if self.lam > 0:
            gw = gw + self.lam * W
        gb = R.sum(0) if self.fit_intercept else torch.zeros_like(R[0])
        return gw, gb

    def value_theta(
        self, theta: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[float, torch.Tensor]:
        """Objective and probabilities ``Pᵀ`` ``(K, n)`` (in ``out`` when given) at
        Θ = (W, b) of shape ``(K, d')``: one product ``Zᵀ = Θ X̃ᵀ``, then, with
        m_i = max_k z_ik, ``Σ_i c_i (log Σ_k e^{z_ik − m_i} − (z_{i,y_i} − m_i)) +
        (λ/2)‖W‖²`` and ``p_i = e^{z_i − m_i} / Σ_k e^{z_ik − m_i}``, in place. O(n d K)."""
        ZT = self.xw_t(theta, out)
        ZT.sub_(ZT.amax(0))
        zy = ZT.gather(0, self.y.unsqueeze(0)).squeeze(0)
        den = ZT.exp_().sum(0)
        f = torch.dot(self.c, den.log() - zy)
        if self.lam > 0:
            W = theta[:, : self.d]
            f = f + 0.5 * self.lam * torch.sum(W * W)
        return float(f), ZT.div_(den)

    def gradient_theta(self, theta: torch.Tensor, PT: torch.Tensor) -> torch.Tensor:
        """``∇f = (Rᵀ X + λW, Rᵀ 1)`` with ``R_i = c_i (p_i − e_{y_i})``, ``(K, d')``."""
        RT = torch.mul(PT, self.c, out=self.buffer("work"))
        RT.scatter_add_(0, self.y.unsqueeze(0), -self.c.unsqueeze(0))
        G = self.xtr_t(RT)
        if self.lam > 0:
            G[:, : self.d].add_(theta[:, : self.d], alpha=self.lam)
        return G

    def hvp(self, PT: torch.Tensor, cPT: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``H v`` in O(n d K) for V = (V_w, v_b) of shape ``(K, d')``, with ``Pᵀ`` and
        ``(c P)ᵀ`` of shape ``(K, n)``: ``U = X̃ Vᵀ``, ``R_i = c_i J_i u_i =
        c_i p_i ∘ u_i − p_i ⟨c_i p_i, u_i⟩``, ``(Rᵀ X + λV_w, Rᵀ 1)``: two products with X̃
        and three in-place elementwise operations on ``(K, n)``."""
        UT = self.xw_t(V, self.buffer("work")).mul_(cPT)
        out = self.xtr_t(UT.addcmul_(PT, UT.sum(0), value=-1.0))
        if self.lam > 0:
            out[:, : self.d].add_(V[:, : self.d], alpha=self.lam)
        return out

    def grad_max(self, G: torch.Tensor) -> float:
        """``max |∇f|`` in the original coordinates: ``(G_W Qᵀ, g_b)`` with a basis."""
        if self.basis is None:
            return float(G.abs().max())
        gw = G[:, : self.d] @ self.basis.T
        out = float(gw.abs().max())
        if self.fit_intercept:
            out = max(out, float(G[:, self.d].abs().max()))
        return out

    # -- sizes ----------------------------------------------------------------------------
    @property
    def d_aug(self) -> int:
        return self.d + int(self.fit_intercept)


@contextlib.contextmanager
def serial_if_small(device: torch.device, work: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)`` when ``device`` is the CPU and ``work``
    (multiply-adds per product with X) is below ``_SERIAL_WORK``; restores the thread count
    afterwards. The setting is process-wide: torch work in other Python threads during
    the fit runs on one thread too."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or work >= _SERIAL_WORK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reduce_features(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X Q, Q)`` with ``Xᵀ = Q T`` the thin QR factorisation (Q is ``d × n``), for dense X
    with more features than samples.

    X = Tᵀ Qᵀ, so the logits X Wᵀ = Tᵀ (W Q)ᵀ depend on W only through M = W Q, and
    ‖W‖² = ‖M‖² + ‖W − M Qᵀ‖²: the optimum has W = M Qᵀ with M the optimum of the same
    problem on the ``n × n`` data Tᵀ = X Q, and every gradient, Hessian product and Newton
    step of the reduced problem is that of the full one restricted to the row space of X.
    O(n² d) once; every later product costs n instead of d per sample.
    """
    Q, T = torch.linalg.qr(X.T)
    return T.T.contiguous(), Q


def _centre(W: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over classes (dim 0)."""
    return W - W.mean(0, keepdim=True)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.3g} GiB" if b >= 2**30 else f"{b / 2**20:.3g} MiB"


def solver_cost(solver: str, n: int, d: int, k: int, fit_intercept: bool, itemsize: int):
    """Estimated (work per Newton step, bytes of working memory) of a regime.

    Work is in flop-equivalents of a large GEMM: Hessian-vector products (skinny products,
    bandwidth-bound) count ``_HVP_WEIGHT`` times their flops plus a fixed overhead per CG
    iteration, a Newton–CG step is assumed to take ``_CG_PRODUCTS`` products, and Cholesky
    flops count ``_CHOLESKY_WEIGHT`` times. The constants were set from timings of the three
    regimes on the benchmark cases (docs/softmax_regression.md).
    """
    da = d + int(fit_intercept)
    p = da * k
    r = k - 1
    if solver == "primal":
        chunk = max(1, min(n, _CHUNK_BYTES // max(1, p * itemsize)))
        work = 2.0 * n * p * p + 2.0 * n * da * p + _CHOLESKY_WEIGHT * p**3 / 3.0
        mem = 2.0 * p * p * itemsize + 3.0 * chunk * p * itemsize
        return work, mem
    if solver == "dual":
        m = n * r
        work = 4.0 * m * m * k + _CHOLESKY_WEIGHT * m**3 / 3.0 + 2.0 * n * n * d / 10.0
        mem = 3.0 * m * m * itemsize + 2.0 * n * n * itemsize
        return work, mem
    if solver == "newton-cg":
        hvp = _HVP_WEIGHT * 4.0 * n * da * k + _CG_OVERHEAD
        work = (_CG_PRODUCTS + 2) * hvp + 2.0 * n * k * k
        if _full_kronecker_pays(n, da, k, False):
            work += 2.0 * min(n, _KRON_ROWS) * da * da + _CHOLESKY_WEIGHT * da**3
        chunk = max(1, min(n, _CHUNK_BYTES // max(1, d * itemsize)))
        copy = n * da if n * da * itemsize <= _AUGMENT_BYTES else chunk * d
        mem = (8.0 * n * k + copy + 10.0 * p + 2.0 * da * da) * itemsize
        return work, mem
    raise ValueError(solver)


def choose_solver(
    solver: str,
    n: int,
    d: int,
    k: int,
    *,
    fit_intercept: bool,
    penalised: bool,
    sparse: bool,
    itemsize: int,
    max_bytes: float,
    fn: str,
) -> str:
    """The regime to run: ``solver`` itself if it fits ``max_bytes``, else the cheapest that fits."""
    candidates = ["primal", "newton-cg"] + (["dual"] if penalised else [])
    costs = {s: solver_cost(s, n, d, k, fit_intercept, itemsize) for s in candidates}
    if solver == "auto":
        fits = [s for s in candidates if costs[s][1] <= max_bytes]
        if sparse:
            # Sparse X: the dense regimes would densify X (n d) and lose the sparsity.
            dense_bytes = n * d * itemsize
            if dense_bytes > max_bytes / 4:
                fits = [s for s in fits if s == "newton-cg"]
        if not fits:
            return "newton-cg"
        return min(fits, key=lambda s: costs[s][0])
    if solver == "dual" and not penalised:
        raise ValueError(
            f"`{fn}`: solver='dual' needs a penalty (finite `C`): its Woodbury identity "
            "inverts λI + Gram. Got C=inf; use solver='primal' or 'newton-cg'."
        )
    need = costs[solver][1]
    if need > max_bytes:
        fits = [s for s in candidates if costs[s][1] <= max_bytes]
        alt = min(fits, key=lambda s: costs[s][0]) if fits else "newton-cg"
        raise MemoryError(
            f"`{fn}`: solver={solver!r} needs about {_fmt_bytes(need)} for n={n}, d={d}, "
            f"K={k}, over `max_bytes`={_fmt_bytes(max_bytes)}. solver={alt!r} fits "
            f"(about {_fmt_bytes(costs[alt][1])}); or raise `max_bytes`."
        )
    return solver


# -- the Newton systems -------------------------------------------------------------------


def _null_shift(diag_mean: float) -> float:
    return diag_mean if diag_mean > 0 and math.isfinite(diag_mean) else 1.0


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Cholesky factor; a growing diagonal shift when rounding made H indefinite."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L
    scale = float(H.diagonal().abs().mean()) or 1.0
    shift = 1e3 * torch.finfo(H.dtype).eps * scale
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(H + shift * eye)
        if int(info) == 0:
            return L
        shift *= 10.0
    raise torch.linalg.LinAlgError("the Newton system is not positive definite")


def step_primal(
    prob: Problem, P: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble H (Kd' × Kd', feature-major) with one GEMM per row chunk and solve by Cholesky."""
    k, d, da = prob.k, prob.d, prob.d_aug
    p = da * k
    item = _itemsize(prob.dtype)
    H = torch.zeros(p, p, dtype=prob.dtype, device=prob.device)
    Dg = torch.zeros(da, da * k, dtype=prob.dtype, device=prob.device)
    chunk = max(1, min(prob.n, _CHUNK_BYTES // max(1, p * item)))
    sc = prob.c.sqrt()
    for lo in range(0, prob.n, chunk):
        hi = min(prob.n, lo + chunk)
        Xc = prob.X[lo:hi] if not prob.sparse else prob.dense_x()[lo:hi]
        if prob.fit_intercept:
            Xc = torch.cat([Xc, Xc.new_ones(hi - lo, 1)], dim=1)
        Pc = P[lo:hi]
        # Σ_i c_i p_ik x̃_ij x̃_il for every k at once: X̃ᵀ [c_i p_ik x̃_il]_(i, (l, k)).
        Dg.addmm_(Xc.T, (Xc.unsqueeze(2) * (Pc * prob.c[lo:hi, None]).unsqueeze(1)).reshape(-1, p))
        B = (Xc.unsqueeze(2) * (Pc * sc[lo:hi, None]).unsqueeze(1)).reshape(-1, p)
        H.addmm_(B.T, B, alpha=-1.0)
        del B
    H4 = H.view(da, k, da, k)
    H4.diagonal(dim1=1, dim2=3).add_(Dg.view(da, da, k))
    if prob.lam > 0:
        H.diagonal()[: d * k].add_(prob.lam)
    mu = _null_shift(float(H.diagonal().mean()))
    if prob.fit_intercept:
        H4[d, :, d, :] += mu / k
    if prob.lam == 0:
        idx = torch.arange(d, device=prob.device)
        H4[idx, :, idx, :] += mu / k
    g = torch.cat([gw, gb.unsqueeze(1)], dim=1) if prob.fit_intercept else gw
    rhs = -g.T.reshape(p, 1)
    L = _cholesky(H)
    step = torch.cholesky_solve(rhs, L).reshape(da, k).T
    if prob.fit_intercept:
        return step[:, :d].contiguous(), step[:, d].contiguous()
    return step.contiguous(), torch.zeros_like(gb)


def step_dual(
    prob: Problem, P: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Woodbury: ``(λI + A_wᵀA_w)⁻¹ = (I − A_wᵀ M⁻¹ A_w)/λ`` with ``M = λI + A_w A_wᵀ``.

    A_w has rows ``(F_i[:, r] ⊗ x_i)`` (F_i F_iᵀ = c_i J_i), so ``A_w A_wᵀ`` is the Gram
    ``(X Xᵀ)_ij (F_iᵀ F_j)_rq`` of size n(K−1). The intercept rows ``A_b = [F_iᵀ]`` enter
    through the Schur complement ``λ A_bᵀ M⁻¹ A_b`` (K × K).
    """
    n, k = prob.n, prob.k
    r = k - 1
    lam = prob.lam
    F = reduced_factor(P) * prob.c.sqrt().view(n, 1, 1)  # (n, K, r)
    Ft = F.transpose(1, 2).reshape(n * r, k)  # rows (i, r): F_i[:, r]ᵀ — this is A_b
    G = (Ft @ Ft.T).view(n, r, n, r)
    G.mul_(prob.gram().view(n, 1, n, 1))
    M = G.view(n * r, n * r)
    M.diagonal().add_(lam)
    L = _cholesky(M)

    def a_w(vw: torch.Tensor) -> torch.Tensor:  # (K, d) -> (n r, 1)
        u = prob.xw(vw)  # (n, K): W x_i
        return torch.einsum("ikr,ik->ir", F, u).reshape(n * r, 1)

    def a_wt(v: torch.Tensor) -> torch.Tensor:  # (n r, 1) -> (K, d)
        q = torch.einsum("ikr,ir->ik", F, v.view(n, r))
        return prob.xtr(q)

    u = torch.cholesky_solve(a_w(gw), L)
    if prob.fit_intercept:
        Q = torch.cholesky_solve(Ft, L)  # M⁻¹ A_b, (n r, K)
        Sb = lam * (Ft.T @ Q)
        Sb = 0.5 * (Sb + Sb.T)
        mu = _null_shift(float(Sb.diagonal().mean()))
        Sb = Sb + mu / k
        rhs = (-gb + (Ft.T @ u).squeeze(1)).unsqueeze(1)
        db = torch.linalg.solve(Sb, rhs)
        dw = -gw / lam + a_wt(u / lam - Q @ db)
        return dw, db.squeeze(1)
    dw = -(gw - a_wt(u)) / lam
    return dw, torch.zeros_like(gb)


def _mean_jacobian(prob: Problem, P: torch.Tensor, cPT: torch.Tensor | None) -> torch.Tensor:
    """``J̄ = Σ_i c_i J_i = diag(Σ_i c_i p_i) − Σ_i c_i p_i p_iᵀ`` (K × K, symmetrised), from
    ``(c P)ᵀ`` when the caller has it."""
    if cPT is None:
        cPT = P.T * prob.c
    Jbar = torch.diag(cPT.sum(1)) - cPT @ P
    return 0.5 * (Jbar + Jbar.T)


class _KroneckerPreconditioner:
    """Block-diagonal preconditioner: blocks ``s_j J̄ + λ_j I`` with ``s_j = Σ_i c_i x_ij²``
    and ``J̄ = Σ_i c_i J_i``: the exact block of feature j when p_i does not vary with x_ij².
    One K × K eigendecomposition per Newton step, O(n K²); ``s`` once per fit, O(n d);
    O(d K²) per apply (two GEMMs)."""

    def __init__(self, prob: Problem, P: torch.Tensor, cPT: torch.Tensor | None = None):
        k, d = prob.k, prob.d
        s = prob.sq_col_weights()  # (d,)
        Jbar = _mean_jacobian(prob, P, cPT)
        nu = float(Jbar.diagonal().mean())
        Jbar = Jbar + (nu if nu > 0 else 1.0) / k
        mu, V = torch.linalg.eigh(Jbar)
        if prob.fit_intercept:
            s = torch.cat([s, s.new_ones(1)])
        lam = torch.full_like(s, prob.lam)
        if prob.fit_intercept:
            lam[d] = 0.0
        den = mu.unsqueeze(1) * s.unsqueeze(0) + lam.unsqueeze(0)  # (K, d')
        tiny = torch.finfo(P.dtype).eps * float(den.abs().max())
        self.scale = 1.0 / den.clamp_min(tiny)
        self.V = V

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        """``B_j⁻¹ r_j`` for every column j of R ``(K, d')``: ``V ((Vᵀ R) ∘ scale)``."""
        return self.V @ ((self.V.T @ R) * self.scale)


class _FullKroneckerPreconditioner:
    """``(A ⊗ J̃ + λI)⁻¹`` with ``A = Σ_i c_i w_i x̃_i x̃_iᵀ`` (``d' × d'``), ``w_i = tr J_i =
    1 − ‖p_i‖²`` and ``J̃ = J̄ / tr J̄``: the Hessian itself when every J_i is a multiple of
    one matrix, so it captures the correlations between features that the block-diagonal
    one ignores. Per Newton step one ``d' × d'`` product over at most ``_KRON_ROWS`` samples,
    O(min(n, _KRON_ROWS) d'²), and the eigendecompositions of A and J̃, O(d'³ + K³);
    O(K d'² + K² d') per apply (four GEMMs):
    ``V ((Vᵀ R U) ∘ scale) Uᵀ``. λ is applied to the intercept column too (a preconditioner
    only needs to be symmetric positive definite)."""

    def __init__(self, prob: Problem, P: torch.Tensor, cPT: torch.Tensor | None = None):
        k = prob.k
        Jbar = _mean_jacobian(prob, P, cPT)
        tr = float(Jbar.diagonal().sum())
        if not tr > 0:
            tr = 1.0
        Jt = Jbar / tr + 1.0 / (k * k)  # + (1/K)·11ᵀ/K: eigenvalue 1/K along 1
        mu, V = torch.linalg.eigh(Jt)
        # A from every ⌈n / _KRON_ROWS⌉-th sample (scaled to the trace of J̄): a preconditioner
        # needs only an estimate, and this keeps the set-up below a few products for large n.
        stride = -(-prob.n // _KRON_ROWS)
        XaT, Ps, cs = prob.aug_t_rows(stride), P[::stride], prob.c[::stride]
        w = cs * (1.0 - torch.linalg.vecdot(Ps, Ps)).clamp_min(0.0)
        A = (XaT * w) @ XaT.T * (tr / float(w.sum().clamp_min(1e-300)))
        s, U = torch.linalg.eigh(0.5 * (A + A.T))
        den = mu.unsqueeze(1) * s.clamp_min(0.0).unsqueeze(0) + prob.lam  # (K, d')
        tiny = torch.finfo(P.dtype).eps * float(den.abs().max())
        self.scale = 1.0 / den.clamp_min(tiny)
        self.V, self.U = V, U

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        return self.V @ (((self.V.T @ R) @ self.U) * self.scale) @ self.U.T


def _full_kronecker_pays(n: int, d_aug: int, k: int, sparse: bool) -> bool:
    """The full Kronecker preconditioner when its per-step product over the (sampled) data,
    at most n d'², costs at most about four Hessian-vector products (2 n d' K each)."""
    return not sparse and d_aug <= min(8 * k, _FULL_KRON_MAX_D)


def step_newton_cg(
    prob: Problem,
    P: torch.Tensor,
    gw: torch.Tensor,
    gb: torch.Tensor,
    *,
    forcing: float | None = None,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preconditioned CG on ``H Δ = −g``, stopped at ``‖r‖ ≤ η‖g‖`` (η = ``forcing``, default
    ``_FORCING``) or as soon as ``max |r| ≤ tol / 4``: after a full step the new gradient is
    ``−r`` up to second-order terms, so a more accurate solve than that cannot be needed
    to reach ``max |∇f| ≤ tol``; the outer loop checks the true gradient either way.

    Works on ``(K, d')`` tensors (coefficients and intercept side by side). The iterates stay
    centred over the classes in exact arithmetic (g, H and the preconditioner all map the
    centred subspace into itself); the result is projected once to remove rounding drift.
    Per iteration: one Hessian-vector product and about ten small tensor operations.
    """
    d = prob.d
    PT = P.T.contiguous()
    cPT = torch.mul(PT, prob.c, out=prob.buffer("cp"))
    if _full_kronecker_pays(prob.n, prob.d_aug, prob.k, prob.sparse):
        pre: _KroneckerPreconditioner | _FullKroneckerPreconditioner = _FullKroneckerPreconditioner(
            prob, P, cPT
        )
    else:
        pre = _KroneckerPreconditioner(prob, P, cPT)
    g = torch.cat([gw, gb.unsqueeze(1)], dim=1) if prob.fit_intercept else gw
    r = -g
    gnorm = float(torch.linalg.vector_norm(g))
    eta = _FORCING if forcing is None else forcing
    target = eta * gnorm
    target_inf = 0.25 * tol
    x = torch.zeros_like(g)
    z = pre(r)
    p = z
    rz = float(torch.vdot(r.reshape(-1), z.reshape(-1)))
    size = prob.d_aug * prob.k
    maxiter = max(20, min(500, size)) if forcing is None else 4 * size + 20
    for _ in range(maxiter):
        hp = prob.hvp(PT, cPT, p)
        curv = float(torch.vdot(p.reshape(-1), hp.reshape(-1)))
        if curv <= 0:
            break
        alpha = rz / curv
        x.add_(p, alpha=alpha)
        r.add_(hp, alpha=-alpha)
        if float(torch.linalg.vector_norm(r)) <= target:
            break
        if target_inf > 0 and float(r.abs().max()) <= target_inf:
            break
        z = pre(r)
        rz_new = float(torch.vdot(r.reshape(-1), z.reshape(-1)))
        p = z.add_(p, alpha=rz_new / rz)
        rz = rz_new
    if not bool(x.any()):
        x = pre(-g)
    if prob.lam == 0:
        x = _centre(x)
    if prob.fit_intercept:
        x[:, d] -= x[:, d].mean()
        return x[:, :d], x[:, d]
    return x, torch.zeros_like(gb)


_STEPS = {"primal": step_primal, "dual": step_dual, "newton-cg": step_newton_cg}


def newton(
    prob: Problem,
    W0: torch.Tensor,
    b0: torch.Tensor,
    *,
    solver: str,
    tol: float,
    max_iter: int,
    verbose: int = 0,
) -> NewtonResult:
    """Damped Newton: Armijo backtracking on f, stop when ``max |∇f| ≤ tol``.

    Works on Θ = (W, b) of shape ``(K, d')``: each trial point costs one product
    ``X̃ Θᵀ`` (the objective and the probabilities), an accepted one a second, ``Rᵀ X̃``
    (the gradient); a full step (t = 1) is tried first and usually accepted.
    """
    step_fn = _STEPS[solver]
    d, fi = prob.d, prob.fit_intercept
    # Centring over the classes changes no logit and never raises the penalty.
    theta = torch.cat([W0, b0.unsqueeze(1)], dim=1) if fi else W0.clone()
    theta = _centre(theta)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if fi:
            return t[:, :d], t[:, d]
        return t, torch.zeros(prob.k, dtype=prob.dtype, device=prob.device)

    # the probabilities of the current point and of the trial point, swapped on acceptance
    cur, spare = prob.buffer("p0"), prob.buffer("p1")
    f, PT = prob.value_theta(theta, cur)
    G = prob.gradient_theta(theta, PT)
    eps = torch.finfo(prob.dtype).eps
    converged = False
    it = 0
    gmax = prob.grad_max(G)
    while True:
        if not math.isfinite(gmax):
            raise FloatingPointError("the gradient is not finite; scale X or lower C")
        if gmax <= tol:
            converged = True
            break
        if it >= max_iter:
            break
        it += 1
        gw, gb = split(G)
        if solver == "newton-cg":
            dw, db = step_newton_cg(prob, PT.T, gw, gb, tol=tol)
        else:
            dw, db = step_fn(prob, PT.T, gw, gb)
        delta = torch.cat([dw, db.unsqueeze(1)], dim=1) if fi else dw
        delta = _centre(delta)
        slope = float(torch.vdot(G.reshape(-1), delta.reshape(-1)))
        if not slope < 0:
            # Rounding produced no descent direction: fall back to steepest descent.
            delta = -G
            slope = -float(torch.vdot(G.reshape(-1), G.reshape(-1)))
        t = 1.0
        gsum = float(G.abs().sum())
        accepted = False
        for _ in range(40):
            theta_n = theta.add(delta, alpha=t)
            fn_, Pn = prob.value_theta(theta_n, spare)
            if fn_ <= f + 1e-4 * t * slope:
                accepted = True
                Gn = prob.gradient_theta(theta_n, Pn)
                break
            if abs(fn_ - f) <= 16 * eps * max(1.0, abs(f)):
                # At round-off level of f: accept when the gradient still shrinks.
                Gn = prob.gradient_theta(theta_n, Pn)
                if float(Gn.abs().sum()) < gsum:
                    accepted = True
                    break
            t *= 0.5
        if not accepted:
            if verbose:
                print(f"  iteration {it}: the line search found no decrease; stopping")
            warnings.warn(
                "Line search failed to decrease the objective at iteration "
                f"{it} (max |gradient| = {gmax:.3g} > tol = {tol:.3g}); the data may be "
                "separable (lower C) or badly scaled (standardise X).",
                ConvergenceWarning,
                stacklevel=3,
            )
            W, b = split(theta)
            return NewtonResult(W.contiguous(), b.contiguous(), it, False, f, gmax, solver)
        theta, f, PT, G = theta_n, fn_, Pn, Gn
        cur, spare = spare, cur
        gmax = prob.grad_max(G)
        if verbose:
            print(f"  Newton iteration {it}: f = {f:.12g}, max|g| = {gmax:.3g}, step = {t:g}")
    W, b = split(theta)
    return NewtonResult(W.contiguous(), b.contiguous(), it, converged, f, gmax, solver)
