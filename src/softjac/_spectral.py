"""Layer 5: the secular-equation eigen-solver for ``J = diag(σ) − σσᵀ``.

J is a diagonal matrix minus a rank-one matrix, so its whole spectrum follows from σ in
O(K²) work per slice instead of the O(K³) of a dense eigendecomposition
(``shared/MATH.md``, "Spectrum"):

* **Deflation (exact).** Sort σ ascending. An entry with ``σ_i = 0`` (masked or underflowed;
  subnormal σ, which carry no relative precision, count as 0) gives the eigenvalue 0 with
  eigenvector ``e_i``. A run of m equal values ``s`` (a tie,
  compared with ``==``, no tolerance) gives the eigenvalue ``s`` m − 1 times, with the Helmert
  vectors of the run as eigenvectors (``(e_i − e_j)/√2`` for a pair); the run then takes part
  in the rank-one problem once, with the weight ``c = m·s`` at the pole ``d = s``.
* **The null vector.** ``J 1_S = 0`` on the support S (``Σσ = 1``): one eigenvalue is exactly
  0, eigenvector ``1_S/√|S|``.
* **Secular equation.** The remaining eigenvalues are the roots of
  ``g(λ) = Σ_g c_g / (d_g − λ) = 0``, one in each open interval between consecutive distinct
  support values (they strictly interlace). g is increasing there, from −∞ to +∞.
* **Root finding.** Each root is found in the variable ``τ = λ − d_o`` measured from the pole
  ``d_o`` nearer to it (chosen from the sign of g at the midpoint), keeping the differences
  ``d_j − λ = (d_j − d_o) − τ`` directly, as LAPACK's ``dlaed4`` does; then each eigenvalue is
  accurate relative to itself (~K·eps), however small. The iteration is Li's "middle way"
  two-pole model: ψ (the poles left of λ, negative terms) is fitted by ``a_l/(d_l − λ) + b_l``
  at the left end of the interval and φ (the right poles) by ``a_r/(d_r − λ) + b_r`` at the
  right end (value and slope at the current point, all scaled by ``|τ|`` and normalised so
  nothing over- or underflows), giving a quadratic for the step (solved for the new offset itself, so a root 1e-70 from its pole
  keeps its digits). The first step starts at the midpoint; the sign of g there picks the
  origin. Each step is safeguarded by a bracket (bisection when it leaves it); a root is done
  when g is at its rounding level, the step is below ``sqrt(eps)/16`` (the quadratic
  convergence then leaves an error far below eps), or the bracket has shrunk to the noise
  level; ``MAX_ITER`` caps the count (typically 3–5). On CPU the whole iteration runs as one
  fused C loop per root (compiled at first use, parallel over roots with OpenMP; no compiler
  → silent fallback); elsewhere, or with ``USE_NATIVE = False``, all roots of all slices
  iterate together as vectorised PyTorch operations in cache-sized chunks, and converged
  roots leave the active set. No Python loop over K either way.
* **Eigenvectors (Gu–Eisenstat).** The weights are recomputed from the computed roots with
  Löwner's formula ``ŵ_i² = −∏_k (μ_k − d_i) / ∏_{j≠i} (d_j − d_i)`` (μ over all eigenvalues of
  the deflated problem, the 0 included), evaluated as ``d_i`` times a product of ratios that
  each lie in (0, 1) (no overflow), from the stored differences. Then
  ``v_k ∝ ŵ / (d − μ_k)`` are orthogonal to working precision even when σ values cluster.

Costs: O(K log K) for the sort, O(K) per root per iteration (O(K²) per iteration for all
roots), O(K²) for the eigenvectors; memory O(K) per slice for the eigenvalues (O(K·chunk) on
the PyTorch path), O(K²) for the eigenvectors. ``σ`` is assumed to sum to 1 (the g form of
the secular equation uses it); that is what makes every eigenvalue relatively accurate.
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch

from softjac.kernels import _loader

__all__ = ["secular_eigh", "secular_eigvalsh", "secular_spectral_norm"]

#: Cap on the iterations of the root finder (bisection needs at most ~60 in float64; the
#: rational steps typically converge in 2–5).
MAX_ITER = 80


def _rev_cummin(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(torch.cummin(torch.flip(x, [-1]), -1).values, [-1])


class _Structure:
    """Sorted σ and its deflation structure, for a (B, K) batch (all index tensors (B, K))."""

    def __init__(self, p: torch.Tensor) -> None:
        b, k = p.shape
        # Subnormal σ carry no relative precision: treat them as 0 (deflated, like masks).
        p = torch.where(p >= torch.finfo(p.dtype).tiny, p, torch.zeros_like(p))
        self.s, self.perm = torch.sort(p, dim=-1, stable=True)
        s = self.s
        ar = torch.arange(k, device=p.device)
        self.arange = ar
        self.support = s > 0
        if k > 1:
            differ = s[:, 1:] != s[:, :-1]
            true_col = torch.ones(b, 1, dtype=torch.bool, device=p.device)
            last = torch.cat([differ, true_col], dim=-1)
            first = torch.cat([true_col, differ], dim=-1)
        else:
            last = first = torch.ones(b, 1, dtype=torch.bool, device=p.device)
        self.rep = self.support & last
        zero = torch.zeros((), dtype=ar.dtype, device=p.device)
        self.start = torch.cummax(torch.where(first, ar, zero), -1).values
        self.end = _rev_cummin(torch.where(last, ar, torch.full_like(ar, k)))
        self.m = self.end - self.start + 1
        self.c = torch.where(self.rep, self.m.to(s.dtype) * s, torch.zeros_like(s))
        kk = torch.full((b, 1), k, dtype=ar.dtype, device=p.device)
        self.nxt = torch.cat([self.end[:, 1:], kk], dim=-1)  # rep of the next run
        self.has_root = self.rep & (ar < k - 1)
        self.n_support = self.support.sum(-1)


#: Rows of the (roots × K) work per chunk are limited to about this many elements, so the
#: temporaries of one chunk stay in cache (the iteration is memory-bound otherwise).
CHUNK_ELEMENTS = 1 << 17


# --------------------------------------------------------------------------- fused CPU loop
# The four sums below are the whole O(K²) cost of the solver. In PyTorch they take ~8
# elementwise passes per evaluation; the C loop in ``softjac/kernels/csrc/secular.c`` does them in
# one pass per row (about 10× faster). It is built at install time and loaded by
# ``softjac.kernels._loader`` (like ``softjac.kernels._cpu``), and skipped silently when it
# is not built or ``SOFTJAC_DISABLE_CPU_KERNEL`` is set; the PyTorch path is the reference
# and the fallback.
_native_lock = threading.Lock()
_native_state: dict[str, object] = {}
#: Set to False to force the PyTorch path (the tests compare both).
USE_NATIVE = True


def _native_lib() -> ctypes.CDLL | None:
    """The compiled fused loop, or None (no compiler, disabled, or the build failed)."""
    if "lib" in _native_state:
        return _native_state["lib"]  # type: ignore[return-value]
    with _native_lock:
        if "lib" in _native_state:
            return _native_state["lib"]  # type: ignore[return-value]
        lib = None
        try:
            lib, _native_state["why"], _ = _loader.load("softjac_secular")
            if lib is not None:
                ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                for name in ("softjac_secular_solve_f64", "softjac_secular_solve_f32"):
                    fn = getattr(lib, name)
                    fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, cint, cint]
                    fn.restype = None
        except Exception as exc:  # any failure: fall back to PyTorch
            lib, _native_state["why"] = None, str(exc)
        _native_state["lib"] = lib
        return lib


def _secular_sums(
    s: torch.Tensor,
    c: torch.Tensor,
    rb: torch.Tensor,
    s_o: torch.Tensor,
    tau: torch.Tensor,
) -> torch.Tensor:
    """``|τ|·(ψ, φ)`` and ``τ²·(ψ', φ')`` at ``λ = s_o + τ`` for each row, shape ``(n, 4)``.

    ψ sums ``c_j/(d_j − λ)`` over the poles left of λ (negative terms), φ over those right of
    it; the differences are formed as ``(d_j − d_o) − τ``. Scaled by ``|τ|`` (every
    ``|d_j − λ| ≥ |τ|``, so ``|τ|/(d_j − λ) ∈ [−1, 1]``, and the squares cannot overflow).
    O(K) per row, PyTorch on any device, in cache-sized chunks (the PyTorch path of the
    solver; on CPU the C loop of ``kernels/_secular.c`` runs the whole iteration instead).
    """
    nb, k = s.shape
    n = tau.numel()
    out = torch.empty(n, 4, dtype=s.dtype, device=s.device)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    scale = tau.abs()
    # Chunks of rows that share one slice use matrix-vector products with that slice's σ and
    # weights; with many small slices, rows gather their slice instead.
    if nb == 1:
        chunks = [(a, min(n, a + step), 0) for a in range(0, n, step)]
    elif k >= 64:
        bids, counts = torch.unique_consecutive(rb, return_counts=True)
        chunks, start = [], 0
        for bid, cnt in zip(bids.tolist(), counts.tolist(), strict=True):
            chunks += [
                (a, min(start + cnt, a + step), bid) for a in range(start, start + cnt, step)
            ]
            start += cnt
    else:
        chunks = [(a, min(n, a + step), None) for a in range(0, n, step)]
    for a, e, bid in chunks:
        if bid is not None:
            w = c[bid]
            t = s[bid].unsqueeze(0) - s_o[a:e, None]
        else:
            bb = rb[a:e]
            w = c.index_select(0, bb)
            t = s.index_select(0, bb).sub_(s_o[a:e, None])
        t.sub_(tau[a:e, None])
        inv = torch.div(scale[a:e, None], t, out=t)
        pos = torch.relu(inv)
        neg = inv.sub_(pos)
        for j in range(4):
            if j == 2:
                neg.mul_(neg)
                pos.mul_(pos)
            x = neg if j % 2 == 0 else pos
            out[a:e, j] = x @ w if bid is not None else (x * w).sum(-1)
    return out


def _solve_roots(
    st: _Structure, rb: torch.Tensor, rk: torch.Tensor, max_iter: int = MAX_ITER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roots of the secular equation in the intervals ``(s[rb, rk], s[rb, nxt[rb, rk]])``.

    Returns ``(o, tau)``: the column of the nearer pole and the offset, ``λ = s[rb, o] + tau``.
    Cost O(K) per root per iteration; converged roots leave the active set.
    """
    s, c = st.s, st.c
    k = s.shape[1]
    n = rb.numel()
    dtype = s.dtype
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    if n == 0:
        return rk.clone(), s.new_zeros(0)
    lo_i = rk
    hi_i = st.nxt[rb, rk]
    if USE_NATIVE and s.device.type == "cpu" and dtype in (torch.float32, torch.float64):
        lib = _native_lib()
        if lib is not None:  # the same iteration, one fused C loop per root
            o = torch.empty(n, dtype=torch.int64)
            tau = torch.empty(n, dtype=dtype)
            args = [x.contiguous() for x in (s, c, rb, lo_i, hi_i)]
            fn = (
                lib.softjac_secular_solve_f64
                if dtype == torch.float64
                else lib.softjac_secular_solve_f32
            )
            fn(
                *(ctypes.c_void_p(x.data_ptr()) for x in (*args, o, tau)),
                n,
                k,
                max_iter,
                torch.get_num_threads(),
            )
            return o, tau
    s_lo = s[rb, lo_i]
    s_hi = s[rb, hi_i]
    gap = s_hi - s_lo
    half = gap / 2
    # The first iteration starts at the midpoint, in differences from the lower pole for every
    # root; the sign of g there then picks the nearer pole as the origin for the rest.
    lft = torch.ones_like(rb, dtype=torch.bool)
    s_o = s_lo
    d_lo = torch.zeros_like(gap)
    d_hi = gap
    tau = half
    lo_b = torch.zeros_like(tau)
    hi_b = gap
    o = lo_i
    first = True
    out_tau = tau.clone()
    idx = torch.arange(n, device=s.device)
    b_act = rb
    # Rounding level of a sum of K terms, relative to the sum of their magnitudes.
    tol = eps * max(8.0, 2.0 * k**0.5)
    # A (quadratically convergent) step this small leaves an error far below eps: accept it.
    small_step = math.sqrt(eps) / 16
    for _ in range(max_iter):
        scale = tau.abs()
        sums = _secular_sums(s, c, b_act, s_o, tau)
        # Normalised by Σ|terms| = φ − ψ so the quadratic below neither under- nor overflows.
        nrm = (sums[:, 1] - sums[:, 0]).clamp_min(tiny)
        psi, phi, dpsi, dphi = (sums / nrm[:, None]).unbind(-1)
        g = psi + phi
        hi_b = torch.where(g > 0, tau, hi_b)
        lo_b = torch.where(g < 0, tau, lo_b)
        # In units of |τ|: psi ≈ a_l/(t_l − η) + b_l, phi ≈ a_r/(t_r − η) + b_r (value and slope
        # at η = 0), t_l, t_r the distances to the interval's ends.
        t_l = (d_lo - tau) / scale
        t_r = (d_hi - tau) / scale
        a_l = dpsi * t_l * t_l
        a_r = dphi * t_r * t_r
        cc = (psi - dpsi * t_l) + (phi - dphi * t_r)
        # Solve a_o/(t_o − η) + a_x/(t_x − η) + cc = 0 (o: the origin's pole, x: the other end)
        # for u = η − t_o, the new offset in units of |τ| (τ_new = u·|τ|), so that a root very
        # near the origin pole keeps its relative accuracy:
        # cc u² − (a_o + a_x + cc D) u + a_o D = 0 with D = t_x − t_o; u lies between 0 and D.
        a_o = torch.where(lft, a_l, a_r)
        a_x = torch.where(lft, a_r, a_l)
        t_o = torch.where(lft, t_l, t_r)
        dd = torch.where(lft, t_r, t_l) - t_o
        qa = a_o * dd
        qb = a_o + a_x + cc * dd
        disc = (qb * qb - 4 * qa * cc).clamp_min(0).sqrt()
        q = 0.5 * (qb + torch.copysign(disc, qb))
        u1 = qa / q
        u2 = q / cc
        lo_u = torch.minimum(dd, torch.zeros_like(dd))
        hi_u = torch.maximum(dd, torch.zeros_like(dd))
        ok1 = torch.isfinite(u1) & (u1 > lo_u) & (u1 < hi_u)
        u = torch.where(ok1, u1, u2)
        new = u * scale
        eta_s = u + t_o  # the step in units of |τ| (t_o = −sign τ)
        # Converged: g is at its rounding level (then |τ − τ*| ≤ tol·|τ|, as every
        # |d_j − λ| ≥ |τ|), or the step is below the resolution of τ.
        if first:
            first = False
            left = g >= 0
            o = torch.where(left, lo_i, hi_i)
            s_o = torch.where(left, s_lo, s_hi)
            d_lo = s_lo - s_o  # the interval's ends relative to the origin pole (one is 0)
            d_hi = s_hi - s_o
            lft = left
            lo_b = torch.where(left, torch.zeros_like(half), half - gap)
            hi_b = torch.where(left, half, torch.zeros_like(half))
            mid_tau = torch.where(left, half, half - gap)
            new = torch.where(left, new, new - gap)
            ok = torch.isfinite(new) & (new > lo_b) & (new < hi_b) & (new != 0)
            tau = torch.where(g == 0, mid_tau, torch.where(ok, new, 0.5 * (lo_b + hi_b)))
            out_tau = tau.clone()
            continue
        conv = (g.abs() <= tol) | (eta_s.abs() <= small_step)
        inside = torch.isfinite(new) & (new >= lo_b) & (new <= hi_b)
        new = torch.where(inside | conv, new, 0.5 * (lo_b + hi_b))
        new = torch.where((new == 0) | (g == 0), tau, new)
        # Also done when rounding noise in g makes the iterates bounce between the ends of a
        # bracket already shrunk to the noise level.
        width = hi_b - lo_b
        stall = (new == lo_b) | (new == hi_b)
        edge = torch.maximum(lo_b.abs(), hi_b.abs())
        done = conv | stall | (g == 0) | (width <= 8 * tol * edge)
        tau = new
        out_tau[idx] = tau
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < done.numel():
            idx, tau, lo_b, hi_b, lft = idx[keep], tau[keep], lo_b[keep], hi_b[keep], lft[keep]
            s_o, d_lo, d_hi, b_act = s_o[keep], d_lo[keep], d_hi[keep], b_act[keep]
    return o, out_tau


def _flatten(p: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    batch = p.shape[:-1]
    return p.reshape(-1, p.shape[-1]), batch


def _position_eigenvalues(st: _Structure, max_iter: int) -> tuple[torch.Tensor, tuple]:
    """Eigenvalue attached to each sorted position (before the final roll), plus the root
    data ``(rb, rk, o, tau)``."""
    s = st.s
    ev = torch.where(st.support & ~st.rep, s, torch.zeros_like(s))
    rb, rk = st.has_root.nonzero(as_tuple=True)
    o, tau = _solve_roots(st, rb, rk, max_iter)
    if rb.numel():
        ev = ev.index_put((rb, rk), s[rb, o] + tau)
    return ev, (rb, rk, o, tau)


def secular_eigvalsh(p: torch.Tensor, *, max_iter: int = MAX_ITER) -> torch.Tensor:
    """All K eigenvalues of ``diag(σ) − σσᵀ``, ascending, for σ of shape ``(..., K)``.

    σ must be non-negative and sum to 1 per slice (a fully zero slice gives all zeros).
    O(K²) per slice (O(K) per root per iteration), O(K²) memory; no autograd.
    """
    p = p.detach()
    flat, _ = _flatten(p)
    if flat.shape[0] == 0:
        return p.new_zeros(p.shape)
    st = _Structure(flat)
    ev, _ = _position_eigenvalues(st, max_iter)
    return torch.roll(ev, 1, dims=-1).reshape(p.shape)


def secular_spectral_norm(p: torch.Tensor, *, max_iter: int = MAX_ITER) -> torch.Tensor:
    """Largest eigenvalue of ``diag(σ) − σσᵀ`` per slice, shape ``(...)``; O(K log K).

    It is the top support value ``s`` when that value is tied (m ≥ 2), else the root in the
    top interval (between the two largest distinct values), else 0.
    """
    p = p.detach()
    flat, batch = _flatten(p)
    if flat.shape[0] == 0:
        return p.new_zeros(batch)
    st = _Structure(flat)
    k = flat.shape[-1]
    top = st.s[:, -1]
    tied = st.support[:, -1] & (st.m[:, -1] >= 2)
    out = torch.where(tied, top, torch.zeros_like(top))
    sel = st.has_root & (st.nxt == k - 1) & ~tied[:, None]
    rb, rk = sel.nonzero(as_tuple=True)
    o, tau = _solve_roots(st, rb, rk, max_iter)
    if rb.numel():
        out = out.index_put((rb,), st.s[rb, o] + tau)
    return out.reshape(batch)


def secular_eigh(p: torch.Tensor, *, max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of ``diag(σ) − σσᵀ``.

    Eigenvectors: ``1_S/√|S|`` for the 0 of the support S; ``e_i`` for zero entries;
    Helmert vectors within runs of tied values; Gu–Eisenstat vectors ``ŵ/(d − μ_k)`` for the
    secular roots. Returns ``(λ, Q)`` with shapes ``(..., K)`` and ``(..., K, K)``,
    ``Q diag(λ) Qᵀ = J``. O(K²) per slice and memory; no autograd.
    """
    p = p.detach()
    flat, batch = _flatten(p)
    k = p.shape[-1]
    if flat.shape[0] == 0:
        return p.new_zeros(p.shape), p.new_zeros((*p.shape, k))
    st = _Structure(flat)
    nb = flat.shape[0]
    s = st.s
    dtype = s.dtype
    ev, (rb, rk, o, tau) = _position_eigenvalues(st, max_iter)
    ar = st.arange
    tiny = torch.finfo(dtype).tiny
    # t[b, k, j] = d_j − μ_k = (d_j − d_o(k)) − τ_k for root rows k, from the stored
    # differences (other rows get d_j + 1, harmless and never used).
    s_o = torch.zeros_like(s)
    t_o = torch.full_like(s, -1.0)
    if rb.numel():
        s_o = s_o.index_put((rb, rk), s[rb, o])
        t_o = t_o.index_put((rb, rk), tau)
    tmat = (s[:, None, :] - s_o[:, :, None]).sub_(t_o[:, :, None])
    # Löwner: ŵ_i² = d_i ∏_k t[k, i] / (d_i − d_pair(k, i)), pair = k (k < i) or nxt(k);
    # every factor lies in (0, 1].
    s_nxt = s.gather(1, st.nxt.clamp_max(k - 1))
    below = (ar[:, None] < ar[None, :])[None]
    den = s[:, None, :] - torch.where(below, s[:, :, None], s_nxt[:, :, None])
    use = st.has_root[:, :, None] & st.rep[:, None, :]
    ratio = torch.div(tmat, den.masked_fill_(~use, 1.0)).masked_fill_(~use, 1.0)
    w2 = s * ratio.prod(dim=-2)
    del ratio, den
    what = torch.where(st.rep, w2.clamp_min(0).sqrt(), torch.zeros_like(s))
    omega = what.gather(1, st.end.clamp_max(k - 1)) / st.m.to(dtype).sqrt()
    omega = torch.where(st.support, omega, torch.zeros_like(omega))
    # Root rows: ŵ/(d − μ_k), normalised (scaled by the largest entry first: no overflow).
    v = torch.div(omega[:, None, :], tmat, out=tmat)
    v.div_(v.abs().amax(-1, keepdim=True).clamp_min_(tiny))
    v.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min_(tiny))
    # Every other row: zero, then e_p (zero entries), 1_S/√|S| (the null vector, last
    # position), or a Helmert vector (ties).
    v.masked_fill_(~st.has_root[:, :, None], 0.0)
    zb, zp = (~st.support).nonzero(as_tuple=True)
    v[zb, zp, zp] = 1.0
    has_sup = st.support[:, -1]
    nsup = st.n_support.clamp_min(1).to(dtype)
    null = st.support.to(dtype) / nsup.sqrt()[:, None]
    v[:, -1, :] = torch.where(has_sup[:, None], null, v[:, -1, :])
    tie = st.support & ~st.rep
    if bool(tie.any()):
        # (Σ_{start ≤ j ≤ p} e_j − r e_{p+1}) / √(r(r+1)) for a tied position p, r = p − start + 1
        r = (ar[None, :] - st.start + 1).to(dtype)[:, :, None]
        hnorm = (r * (r + 1)).sqrt()
        jj = ar[None, None, :]
        pp = ar[None, :, None]
        in_run = (jj >= st.start[:, :, None]) & (jj <= pp)
        helm = torch.where(in_run, 1 / hnorm, torch.where(jj == pp + 1, -r / hnorm, 0.0))
        v = torch.where(tie[:, :, None], helm, v)
    v = torch.roll(v, 1, dims=-2)  # row c = eigenvector c in sorted coordinates
    evals = torch.roll(ev, 1, dims=-1)
    q = torch.empty_like(v).scatter_(-2, st.perm[:, :, None].expand(nb, k, k), v.mT)
    return evals.reshape(p.shape), q.reshape(*batch, k, k)
