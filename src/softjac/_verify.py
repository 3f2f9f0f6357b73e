"""Layer 5: the property report and the autograd cross-check (the tutorial's
``verify_jacobian_properties``, made an API).

:func:`check_properties` takes J from :func:`softjac.jacobian` and checks the eight facts the
tutorial states, each corrected where the tutorial is wrong (``docs/math.md``):

=====================  =================================================================
symmetry               ``J = Jᵀ``
row and column sums    ``Σ_j J_ij = 0`` and ``Σ_i J_ij = 0``
positive semidefinite  ``λ_min(J) ≥ 0``
rank                   ``rank J = (number of nonzero σ_i) − 1`` — the tutorial's "K − 1"
                       holds only when every ``σ_i > 0``
null vector            ``J·1 = 0``, through the O(K) product :func:`softjac.jvp`
diagonal               ``J_ii = σ_i (1 − σ_i)``
trace                  ``tr J = 1 − Σ σ_i²``
largest eigenvalue     ``λ_max ≤ 1/2`` — the tight bound (``z = (0, 0)`` attains it); the
                       tutorial's 1/4 bounds the *entries*, not the eigenvalues
=====================  =================================================================

With a temperature T every quantity carries the factor ``1 / T`` (the bound is ``1 / (2T)``).

Tolerances. Let ``ε`` be the machine epsilon of the dtype J is returned in (the input dtype),
K the number of classes and ``s = max (max_j z_j − z_i) / T`` the spread of the logits, over
the entries whose σ_i the dtype can hold (σ_i ≥ its smallest normal number). The defaults are ::

    rtol = 4 · ε · (K + s)            atol = 4 · K · ε · tiny      (tiny = smallest normal number)

and a property with measured residual ``r`` passes when ``r ≤ atol + rtol · s_p``, where
``s_p`` is the natural size of what was measured: ``max |J_ij|`` for symmetry, ``Σ_j |J_ij|``
for a row sum, ``λ_max`` for positive semidefiniteness, ``max σ_i / T`` for ``J·1``,
``max J_ii`` for the diagonal, ``tr J`` for the trace and the bound itself for ``λ_max``.
``K · ε`` is the classical bound on the rounding error of a K-term sum relative to the sum of
the magnitudes. ``s · ε`` is the conditioning of softmax itself: rounding ``z_i − max z`` (or
``z / T``) to the dtype moves σ_i by a relative ``ε · |z_i − max z| / T``, which no
implementation avoids and which the float64 references here (computed from the same logits)
do not share. The factor 4 leaves room for the rounding of J's own entries. ``atol`` is only a
floor for gradual underflow (entries below ``tiny`` lose relative precision).

The numerical rank counts the eigenvalues above ``τ = atol + rtol · λ_max`` (the usual
``matrix_rank`` threshold, scaled by ``ε``, K and ``‖J‖₂``). It is compared with the *exact*
count of nonzero σ_i: every unmasked entry, also one whose rounded σ_i underflowed to 0 (the
exact σ_i is positive). Because the eigenvalues interlace the sorted σ, a σ_i at or below about
``τ`` can legitimately hide one eigenvalue under the threshold; the rank property reports the
rank deficit as its residual and the number of such unresolvable σ_i (unmasked, rounded
``σ_i ≤ 2τ``) as its tolerance.

Eigenvalues are always computed with ``torch.linalg.eigvalsh`` on a float64 copy of J: an
independent dense check, not softjac's own spectral code. The reference values for the diagonal
and the trace come from a float64 softmax computed here, independently of softjac.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from softjac._checks import check_logits, check_mask, check_temperature
from softjac._functional import jacobian, jvp, softmax

__all__ = [
    "AutogradComparison",
    "JacobianDifference",
    "PropertyReport",
    "PropertyResult",
    "check_properties",
    "compare_with_autograd",
]


# --------------------------------------------------------------------------------------------
# Result types


def _fmt_num(x: float) -> str:
    if x == 0:
        return "0"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


def _json_float(x: float) -> float | str:
    """A finite float as is; ``inf``/``nan`` as the strings "inf", "-inf", "nan" (strict JSON)."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _fmt_index(index: tuple[int, ...] | None) -> str:
    if not index:
        return "-"
    return str(index[0]) if len(index) == 1 else str(tuple(index))


@dataclass(frozen=True)
class PropertyResult:
    """One checked property of the softmax Jacobian.

    Attributes:
        name: short identifier, e.g. ``"symmetry"``.
        statement: the identity checked, e.g. ``"J = Jᵀ"``.
        residual: the measured violation (worst slice for batched input); for ``rank`` the
            rank deficit, an integer.
        tolerance: the allowed violation at that slice.
        passed: ``residual <= tolerance`` in every slice.
        worst_index: batch index of the slice with the largest ``residual / tolerance``
            (``()`` for a single vector).
        detail: a short human-readable note (e.g. the measured rank), may be empty.
    """

    name: str
    statement: str
    residual: float
    tolerance: float
    passed: bool
    worst_index: tuple[int, ...] = ()
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the fields."""
        return {
            "name": self.name,
            "statement": self.statement,
            "residual": _json_float(self.residual),
            "tolerance": _json_float(self.tolerance),
            "passed": bool(self.passed),
            "worst_index": list(self.worst_index),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class PropertyReport:
    """The result of :func:`check_properties`.

    Attributes:
        properties: one :class:`PropertyResult` per property, in a fixed order.
        shape: shape of the logits; ``dim`` the (normalised) class dimension; ``num_classes`` K;
        num_slices: number of vectors checked (the product of the batch shape).
        dtype: dtype J was computed in (the input dtype), as a string.
        temperature: the temperature T.
        rtol, atol: the tolerances used (see the module docstring for the defaults).
    """

    properties: list[PropertyResult]
    shape: tuple[int, ...]
    dim: int
    num_classes: int
    num_slices: int
    dtype: str
    temperature: float
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        """True when every property holds within tolerance."""
        return all(p.passed for p in self.properties)

    def __getitem__(self, name: str) -> PropertyResult:
        for p in self.properties:
            if p.name == name:
                return p
        raise KeyError(f"`softjac.PropertyReport`: no property named {name!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-serialisable dict (non-finite numbers, possible only for NaN/+inf logits,
        appear as the strings "inf" and "nan")."""
        return {
            "passed": self.passed,
            "shape": list(self.shape),
            "dim": self.dim,
            "num_classes": self.num_classes,
            "num_slices": self.num_slices,
            "dtype": self.dtype,
            "temperature": self.temperature,
            "rtol": self.rtol,
            "atol": self.atol,
            "properties": [p.to_dict() for p in self.properties],
        }

    def __str__(self) -> str:
        n_ok = sum(p.passed for p in self.properties)
        verdict = "PASSED" if self.passed else "FAILED"
        slices = "1 vector" if self.num_slices == 1 else f"{self.num_slices} slices, worst shown"
        head = (
            f"softmax Jacobian properties: {verdict} ({n_ok}/{len(self.properties)}) - "
            f"K = {self.num_classes}, {slices}, {self.dtype}, rtol = {self.rtol:.3g}"
        )
        rows: list[tuple[str, ...]] = [
            ("property", "statement", "residual", "tolerance", "slice", "ok", "note")
        ]
        for p in self.properties:
            rows.append(
                (
                    p.name,
                    p.statement,
                    _fmt_num(p.residual),
                    _fmt_num(p.tolerance),
                    _fmt_index(p.worst_index),
                    "yes" if p.passed else "NO",
                    p.detail,
                )
            )
        if self.num_slices == 1:
            rows = [r[:4] + r[5:] for r in rows]
        return _format_table(head, rows)


@dataclass(frozen=True)
class JacobianDifference:
    """Difference between softjac's Jacobian and one independent way of computing it.

    Attributes:
        method: ``"torch.func.jacrev"``, ``"torch.autograd.functional.jacobian"`` or
            ``"central finite differences"``.
        max_abs: ``max |J_softjac − J_method|`` over all entries and slices.
        max_rel: the largest per-slice ``max |ΔJ| / max |J_softjac|`` (normwise relative).
        worst_index: batch index of the slice with the largest relative difference.
    """

    method: str
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the fields."""
        return {
            "method": self.method,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "worst_index": list(self.worst_index),
        }


@dataclass(frozen=True)
class AutogradComparison:
    """The result of :func:`compare_with_autograd` (all computations in float64).

    Attributes:
        differences: one :class:`JacobianDifference` per method.
        num_slices: slices compared; ``num_skipped`` fully masked slices were left out
            (``torch.softmax`` is NaN there, softjac gives zeros).
        fd_step: the step h of the central differences.
    """

    differences: list[JacobianDifference]
    num_slices: int
    num_skipped: int
    fd_step: float

    def __getitem__(self, method: str) -> JacobianDifference:
        for d in self.differences:
            if d.method == method or d.method.endswith(method):
                return d
        raise KeyError(f"`softjac.AutogradComparison`: no method {method!r}.")

    @property
    def max_abs(self) -> float:
        """The largest absolute difference over all methods."""
        return max((d.max_abs for d in self.differences), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {
            "dtype": "float64",
            "num_slices": self.num_slices,
            "num_skipped": self.num_skipped,
            "fd_step": self.fd_step,
            "differences": [d.to_dict() for d in self.differences],
        }

    def __str__(self) -> str:
        plural = "" if self.num_slices == 1 else "s"
        head = f"softjac.jacobian against autograd, float64 ({self.num_slices} slice{plural}"
        head += f", {self.num_skipped} fully masked skipped)" if self.num_skipped else ")"
        rows: list[tuple[str, ...]] = [("method", "max |diff|", "max rel", "worst slice")]
        for d in self.differences:
            method = d.method
            if method == "central finite differences":
                method += f" (h = {self.fd_step:.2g})"
            rows.append((method, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}", _fmt_index(d.worst_index)))
        if self.num_slices <= 1:
            rows = [r[:3] for r in rows]
        return _format_table(head, rows)


# --------------------------------------------------------------------------------------------
# Helpers


def _format_table(head: str, rows: Sequence[Sequence[str]]) -> str:
    """``head``, then ``rows`` as left-aligned columns (indented two spaces), a dash rule
    under the first row (the column titles)."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [head]
    for i, r in enumerate(rows):
        lines.append("  " + "  ".join(s.ljust(w) for s, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _reference_probs64(z: torch.Tensor) -> torch.Tensor:
    """Independent float64 softmax over the last dim of ``z`` (already float64, masked −inf);
    a fully masked row gives zeros."""
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = (z - m).exp()
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)  # NaN stays NaN


def _complement64(p: torch.Tensor) -> torch.Tensor:
    """``1 − σ_i`` accurately: ``Σ_{j≠i} σ_j`` for the argmax, ``1 − σ_i`` elsewhere
    (σ_i ≤ 1/2 there, so the subtraction is exact to rounding)."""
    i_star = p.argmax(dim=-1, keepdim=True)
    # the sum of the others directly, never 1 minus the largest
    rest = p.scatter(-1, i_star, torch.zeros_like(i_star, dtype=p.dtype)).sum(-1, keepdim=True)
    return (1.0 - p).scatter(-1, i_star, rest)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def _worst(
    name: str,
    statement: str,
    residual: torch.Tensor,
    tolerance: torch.Tensor,
    batch: tuple[int, ...],
    detail_fn=None,
) -> PropertyResult:
    """Reduce per-slice residuals/tolerances (1-D, length = number of slices) to the worst."""
    if residual.numel() == 0:
        return PropertyResult(name, statement, 0.0, 0.0, True, (), "empty batch")
    residual = torch.nan_to_num(residual, nan=math.inf)
    ok = residual <= tolerance
    ratio = torch.where(
        tolerance > 0,
        residual / tolerance.clamp_min(torch.finfo(tolerance.dtype).tiny),
        torch.where(residual > 0, torch.full_like(residual, math.inf), torch.zeros_like(residual)),
    )
    k = int(torch.argmax(ratio))
    detail = detail_fn(k) if detail_fn is not None else ""
    return PropertyResult(
        name=name,
        statement=statement,
        residual=float(residual[k]),
        tolerance=float(tolerance[k]),
        passed=bool(ok.all()),
        worst_index=_unravel(k, batch) if batch else (),
        detail=detail,
    )


# --------------------------------------------------------------------------------------------
# check_properties


def check_properties(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    rtol: float | None = None,
    atol: float | None = None,
) -> PropertyReport:
    """Check the structural properties of the softmax Jacobian at ``logits``.

    J comes from :func:`softjac.jacobian` (in the input dtype); the eight properties listed in
    the module docstring are measured on it, in float64, slice by slice. Eigenvalues come from
    ``torch.linalg.eigvalsh`` on a float64 copy. For batched input each property reports its
    worst slice (largest residual / tolerance) and that slice's batch index.

    Args:
        logits: floating tensor of any shape; ``dim`` holds the K classes. ``-inf`` entries are
            masked (σ_i = 0).
        dim: the class dimension.
        mask: optional boolean mask broadcastable to ``logits`` (True = keep).
        temperature: T > 0; J is that of ``softmax(z / T)`` with respect to ``z``.
        rtol: relative tolerance; default ``4 · ε · (K + s)`` for the dtype's epsilon ε and the
            spread s of the logits (see the module docstring).
        atol: absolute floor; default ``4 · K · ε · tiny`` (tiny = smallest normal number).

    Returns:
        A :class:`PropertyReport`; ``report.passed`` is True when all properties hold and
        ``str(report)`` is a table.

    Example:
        >>> import torch, softjac
        >>> report = softjac.check_properties(torch.tensor([0.0, 0.0]))
        >>> report.passed, report["largest eigenvalue"].statement
        (True, 'λ_max ≤ 1/2')
    """
    fn = "softjac.check_properties"
    d = check_logits(fn, logits, dim)
    t = check_temperature(fn, temperature)
    for name, val in (("rtol", rtol), ("atol", atol)):
        if val is not None and (
            isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0
        ):
            raise ValueError(f"`{fn}`: `{name}` must be a number >= 0 or None. Got {val!r}.")
    m = None if mask is None else check_mask(fn, mask, logits.shape, logits.device)

    k = logits.shape[d]
    finfo = torch.finfo(logits.dtype)

    jac = jacobian(logits, d, mask=mask, temperature=t)
    batch = tuple(jac.shape[:-2])
    J = jac.detach().to(device="cpu", dtype=torch.float64).reshape(-1, k, k)
    n = J.shape[0]

    z = logits.detach().to(device="cpu", dtype=torch.float64).movedim(d, -1).reshape(-1, k)
    if m is not None:
        z = z.masked_fill(~m.detach().cpu().movedim(d, -1).reshape(-1, k), float("-inf"))
    p = _reference_probs64(z / t)  # independent float64 σ

    # the conditioning of σ: an entry z_i − max z known to a relative ε moves σ_i by a relative
    # ε·|z_i − max z|/T, in softjac or anywhere else; count the entries that the dtype can hold
    spread = 0.0
    if rtol is None and z.numel():
        gap = (z.amax(dim=-1, keepdim=True) - z) / t
        held = (p >= finfo.tiny) & torch.isfinite(gap)
        spread = float(torch.where(held, gap, torch.zeros_like(gap)).max())
    rtol_ = 4.0 * finfo.eps * (k + spread) if rtol is None else float(rtol)
    atol_ = 4.0 * k * finfo.eps * finfo.tiny if atol is None else float(atol)

    ones = torch.ones_like(logits)
    j1 = jvp(logits, ones, d, mask=mask, temperature=t).detach()
    j1 = j1.to(device="cpu", dtype=torch.float64).movedim(d, -1).reshape(-1, k)

    def tol(scale: torch.Tensor) -> torch.Tensor:
        return atol_ + rtol_ * scale

    absJ = J.abs()
    results: list[PropertyResult] = []

    # 1. symmetry
    sym = (J - J.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    results.append(_worst("symmetry", "J = Jᵀ", sym, tol(absJ.amax(dim=(-1, -2))), batch))

    # 2. zero row and column sums (float64 sums of J's entries)
    row = J.sum(dim=-1).abs()
    col = J.sum(dim=-2).abs()
    row_ratio_scale = absJ.sum(dim=-1)
    col_ratio_scale = absJ.sum(dim=-2)
    # per slice: the sum with the largest residual relative to its own tolerance
    r_all = torch.cat([row, col], dim=-1)
    t_all = tol(torch.cat([row_ratio_scale, col_ratio_scale], dim=-1))
    ratio = r_all / t_all.clamp_min(torch.finfo(torch.float64).tiny)
    # the sum with the largest residual/tolerance; where every residual is 0, the largest sum
    idx = torch.where(
        ratio.amax(dim=-1, keepdim=True) > 0,
        ratio.argmax(dim=-1, keepdim=True),
        t_all.argmax(dim=-1, keepdim=True),
    )
    results.append(
        _worst(
            "row/column sums",
            "Σ_j J_ij = Σ_i J_ij = 0",
            r_all.gather(-1, idx).squeeze(-1),
            t_all.gather(-1, idx).squeeze(-1),
            batch,
        )
    )

    # eigenvalues, independent dense float64
    # (a J with NaN/inf entries — from +inf or NaN logits — gets NaN eigenvalues and fails)
    finite = torch.isfinite(J).all(dim=-1).all(dim=-1)
    lam = torch.linalg.eigvalsh(torch.where(finite[:, None, None], J, 0.0))
    lam = torch.where(finite[:, None], lam, math.nan)
    lam_min = lam[:, 0] if n > 0 else lam.new_zeros(0)
    lam_max = lam[:, -1] if n > 0 else lam.new_zeros(0)

    # 3. positive semidefinite
    results.append(
        _worst(
            "positive semidefinite",
            "λ_min ≥ 0",
            (-lam_min).clamp_min(0.0),
            tol(lam_max.abs()),
            batch,
            detail_fn=lambda i: f"λ_min = {float(lam_min[i]):.3g}",
        )
    )

    # 4. rank = #{σ_i > 0} − 1 with the exact σ: every unmasked entry counts, also where the
    # rounded σ_i underflows to 0 (those tiny eigenvalues cannot be resolved: "unresolved")
    probs = softmax(logits, d, mask=mask, temperature=t).detach()
    probs = probs.to(device="cpu", dtype=torch.float64).movedim(d, -1).reshape(-1, k)
    support = z > float("-inf")
    nnz = support.sum(dim=-1)
    expected = (nnz - 1).clamp_min(0)
    tau = tol(lam_max.abs())
    num_rank = (lam.abs() > tau.unsqueeze(-1)).sum(dim=-1)  # singular values of symmetric J
    unresolved = (support & (probs <= 2 * tau.unsqueeze(-1) * t)).sum(dim=-1)
    deficit = (expected - num_rank).abs().to(torch.float64)
    results.append(
        _worst(
            "rank",
            "rank J = #{σ_i > 0} − 1",
            deficit,
            unresolved.to(torch.float64),
            batch,
            detail_fn=lambda i: (
                f"rank {int(num_rank[i])}, expected {int(expected[i])}"
                + (f" ({int(k - nnz[i])} σ_i = 0)" if int(nnz[i]) < k else "")
                + (
                    f"; {int(unresolved[i])} σ_i below {float(2 * tau[i]):.2g}"
                    if int(unresolved[i])
                    else ""
                )
            ),
        )
    )

    # 5. J·1 = 0 through the O(K) product
    results.append(
        _worst(
            "null vector",
            "J·1 = 0 (softjac.jvp)",
            j1.abs().amax(dim=-1) if k else j1.new_zeros(n),
            tol(probs.amax(dim=-1) / t),
            batch,
        )
    )

    # 6. diagonal = σ(1 − σ)
    diag_ref = p * _complement64(p) / t
    diag_err = (J.diagonal(dim1=-2, dim2=-1) - diag_ref).abs()
    results.append(
        _worst(
            "diagonal",
            "J_ii = σ_i(1 − σ_i)" + ("" if t == 1.0 else " / T"),
            diag_err.amax(dim=-1),
            tol(diag_ref.amax(dim=-1)),
            batch,
        )
    )

    # 7. trace = 1 − Σσ² (reference as Σ σ_i(1 − σ_i), accurate when σ is nearly one-hot)
    tr_ref = diag_ref.sum(dim=-1)
    tr = J.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    results.append(
        _worst(
            "trace",
            "tr J = 1 − Σ σ_i²" if t == 1.0 else "tr J = (1 − Σ σ_i²) / T",
            (tr - tr_ref).abs(),
            tol(tr_ref.abs()),
            batch,
        )
    )

    # 8. λ_max ≤ 1/2 (1/(2T) with a temperature)
    bound = 0.5 / t
    bound_txt = "1/2" if t == 1.0 else f"1/(2T) = {bound:.4g}"
    results.append(
        _worst(
            "largest eigenvalue",
            f"λ_max ≤ {bound_txt}",
            (lam_max - bound).clamp_min(0.0),
            tol(torch.full_like(lam_max, bound)),
            batch,
            detail_fn=lambda i: f"λ_max = {float(lam_max[i]):.4g}",
        )
    )

    return PropertyReport(
        properties=results,
        shape=tuple(logits.shape),
        dim=d,
        num_classes=k,
        num_slices=n,
        dtype=str(logits.dtype).replace("torch.", ""),
        temperature=t,
        rtol=rtol_,
        atol=atol_,
    )


# --------------------------------------------------------------------------------------------
# compare_with_autograd


def compare_with_autograd(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> AutogradComparison:
    """Compare :func:`softjac.jacobian` with three independent Jacobians, all in float64.

    * ``torch.func.jacrev`` of ``torch.softmax`` (batched slices via ``torch.func.vmap``);
    * ``torch.autograd.functional.jacobian`` of ``torch.softmax(z).sum(0)`` over the flattened
      batch — each σ_b depends only on z_b, so that ``(K, B, K)`` Jacobian holds every slice's
      J without the ``(B, K, B, K)`` blow-up;
    * central finite differences ``(σ(z + h e_j) − σ(z − h e_j)) / 2h`` with
      ``h = ε^{1/3} · T`` (truncation and rounding error both about ``ε^{2/3} ≈ 4e-11``).

    Args:
        logits: floating tensor; ``dim`` holds the K classes; ``-inf`` entries are masked.
        dim: the class dimension.
        mask: optional boolean mask (True = keep), applied as ``-inf`` logits for PyTorch too.
        temperature: T > 0.

    Returns:
        An :class:`AutogradComparison` with the largest absolute and normwise relative
        difference per method. Fully masked slices are skipped (``torch.softmax`` is NaN there).
        Expect ~1e-16 for the two autograd methods and ~1e-10 for finite differences.
    """
    fn = "softjac.compare_with_autograd"
    d = check_logits(fn, logits, dim)
    t = check_temperature(fn, temperature)
    m = None if mask is None else check_mask(fn, mask, logits.shape, logits.device)
    k = logits.shape[d]

    z64 = logits.detach().to(dtype=torch.float64)
    ours = jacobian(z64, d, mask=m, temperature=t).reshape(-1, k, k)
    batch = tuple(s for i, s in enumerate(logits.shape) if i != d)

    z = z64.movedim(d, -1)
    if m is not None:
        z = z.masked_fill(~m.movedim(d, -1), float("-inf"))
    z = z.reshape(-1, k)
    keep = torch.isfinite(z).any(dim=-1)
    rows = torch.nonzero(keep).flatten()
    n_skipped = int((~keep).sum())
    z = z[rows]
    ours = ours[rows]

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x / t, dim=-1)

    refs: dict[str, torch.Tensor] = {}
    if z.shape[0] > 0:
        refs["torch.func.jacrev"] = torch.func.vmap(torch.func.jacrev(f))(z)
        full = torch.autograd.functional.jacobian(lambda x: f(x).sum(dim=0), z)  # (K, B, K)
        refs["torch.autograd.functional.jacobian"] = full.permute(1, 0, 2)
    else:
        empty = z.new_zeros((0, k, k))
        refs["torch.func.jacrev"] = empty
        refs["torch.autograd.functional.jacobian"] = empty

    h = torch.finfo(torch.float64).eps ** (1.0 / 3.0) * t
    fd = torch.empty_like(ours)
    for j in range(k):
        step = torch.zeros_like(z)
        step[:, j] = h
        # −inf ± h stays −inf: the column of a masked logit is exactly zero
        fd[:, :, j] = (f(z + step) - f(z - step)) / (2 * h)
    refs["central finite differences"] = fd

    diffs = []
    scale = ours.abs().amax(dim=(-1, -2)) if ours.numel() else ours.new_zeros(0)
    for name, ref in refs.items():
        if ours.shape[0] == 0:
            diffs.append(JacobianDifference(name, 0.0, 0.0, ()))
            continue
        err = (ours - ref).abs().amax(dim=(-1, -2))
        rel = torch.where(scale > 0, err / scale.clamp_min(1e-300), err)
        i = int(torch.argmax(rel))
        worst = _unravel(int(rows[i]), batch) if batch else ()
        diffs.append(JacobianDifference(name, float(err.max()), float(rel.max()), worst))
    return AutogradComparison(
        differences=diffs,
        num_slices=int(rows.numel()),
        num_skipped=n_skipped,
        fd_step=h,
    )
