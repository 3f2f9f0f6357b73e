"""Triton kernels and their launchers (imported only when ``backend="triton"`` is used).

All kernels read their inputs in the storage dtype, compute in float32 and store in the dtype
of the output. Rows are addressed through a row stride (the last dim must have stride 1), so
row-sliced and transposed-batch inputs need no copy.

Softmax VJP, ``J v = σ ⊙ (v − ⟨σ, v⟩)`` with the argmax entry as
``σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j)``:

* Rows with ``K ≤ split_threshold`` (default 8192): one program per row holds the whole row in
  registers (``BLOCK = next_pow2(K)``, at least 16), reduces ``s = ⟨σ, v⟩``, the max, the first
  argmax and ``t = Σ_j σ_j (v_{i*} − v_j)`` on chip and writes once: 3·K element transfers.
* Longer rows are split into chunks of ``CHUNK = split_chunk`` columns: phase 1 (one program per
  chunk) writes per-chunk partials ``(Σ σv, max σ, first argmax)`` to a small float32 workspace;
  phase 2 combines the partials of its row, re-reads its chunk, writes ``σ(v − s)`` and the
  chunk's part of ``t``; phase 3 (one program per row) fixes the argmax entry. Traffic 5·K
  element transfers (the chunk is read twice). A one-read long-row path needs a grid-wide
  barrier between the phases (all chunks of a row resident at once, e.g. thread-block clusters),
  which the Triton interpreter cannot run and which has not been tested on a GPU; see
  ``docs/benchmarks.md``.

The exact VJP from logits (``softmax_vjp_logits``, what ``softjac.vjp`` runs on CUDA) never
rounds σ on its own: the formula of ``softjac._core.vjp_logits_last``, with the same one-row and
split-row structure (two reads of the data at most).

``from_logits`` variants of the VJP from σ recompute ``σ = exp(z − lse)`` on the fly (fully masked rows: ``z`` all
−inf and ``lse`` anything give σ = 0).

Launches: every launcher takes ``launch``, applied to each kernel before ``[grid](...)``:
:func:`direct` (the kernel itself) for eager calls, ``torch.library.wrap_triton`` in the bodies
of the registered Triton ops (``softjac.kernels._triton_ops``), where a trace records each
launch. Grids are tuples, the configuration is ``tl.constexpr`` keywords and ``num_warps``
(no autotuning, no heuristics); outputs and workspaces are fresh tensors passed as they are.
The ``tl.constexpr`` values come from ``int(K)``: a trace with a symbolic class dim
specializes on it (each K its own kernels, as in eager mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from softjac.kernels._torch import split_lse

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "cross_entropy_backward",
    "cross_entropy_forward",
    "direct",
    "softmax_jacobian_dense",
    "softmax_vjp",
    "softmax_vjp_logits",
    "vjp_block_size",
]

MIN_BLOCK = 16
SPLIT_THRESHOLD = 8192
SPLIT_CHUNK = 4096
CE_BLOCK = 4096


def direct(kernel):
    """The launch of eager calls: the kernel itself (``kernel[grid](...)`` runs it at once).
    The registered Triton ops (``softjac.kernels._triton_ops``) pass
    ``torch.library.wrap_triton`` instead, so that tracing records each launch."""
    return kernel


def vjp_block_size(k: int) -> int:
    """The ``BLOCK`` the one-row VJP kernel uses for ``K`` columns: ``next_pow2(K)``, ≥ 16."""
    return max(MIN_BLOCK, triton.next_power_of_2(max(int(k), 1)))


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


@triton.jit
def _load_probs(p_row, lse_ptr, row, cols, mask, FROM_LOGITS: tl.constexpr):
    if FROM_LOGITS:
        z = tl.load(p_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        lse = tl.load(lse_ptr + row).to(tl.float32)
        p = tl.where(z == float("-inf"), 0.0, tl.exp(z - lse))
    else:
        p = tl.load(p_row + cols, mask=mask, other=0.0).to(tl.float32)
    return p


@triton.jit
def _vjp_row_kernel(
    p_ptr, v_ptr, o_ptr, lse_ptr, K, sp, sv, so,
    BLOCK: tl.constexpr, FROM_LOGITS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    p = _load_probs(p_ptr + row * sp, lse_ptr, row, cols, mask, FROM_LOGITS)
    v = tl.load(v_ptr + row * sv + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sum(p * v, axis=0)
    m = tl.max(p, axis=0)
    istar = tl.min(tl.where(p == m, cols, BLOCK), axis=0)
    v_star = tl.sum(tl.where(cols == istar, v, 0.0), axis=0)
    t = tl.sum(p * (v_star - v), axis=0)  # the i* term is p* · 0
    out = tl.where(cols == istar, m * t, p * (v - s))
    tl.store(o_ptr + row * so + cols, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vjp_split_partials_kernel(
    p_ptr, v_ptr, lse_ptr, ws_s, ws_m, ws_i, K, sp, sv, n_chunks,
    CHUNK: tl.constexpr, FROM_LOGITS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    mask = cols < K
    p = _load_probs(p_ptr + row * sp, lse_ptr, row, cols, mask, FROM_LOGITS)
    v = tl.load(v_ptr + row * sv + cols, mask=mask, other=0.0).to(tl.float32)
    m = tl.max(p, axis=0)
    slot = row * n_chunks + c
    tl.store(ws_s + slot, tl.sum(p * v, axis=0))
    tl.store(ws_m + slot, m)
    tl.store(ws_i + slot, tl.min(tl.where(p == m, cols, K), axis=0))


@triton.jit
def _combine_partials(ws_s, ws_m, ws_i, row, n_chunks, K, NC_BLOCK: tl.constexpr):
    cc = tl.arange(0, NC_BLOCK)
    cmask = cc < n_chunks
    base = row * n_chunks
    s = tl.sum(tl.load(ws_s + base + cc, mask=cmask, other=0.0), axis=0)
    ms = tl.load(ws_m + base + cc, mask=cmask, other=-1.0)
    m = tl.max(ms, axis=0)
    idx = tl.load(ws_i + base + cc, mask=cmask, other=K)
    istar = tl.min(tl.where(ms == m, idx, K), axis=0)
    return s, m, istar


@triton.jit
def _vjp_split_write_kernel(
    p_ptr, v_ptr, o_ptr, lse_ptr, ws_s, ws_m, ws_i, ws_t, K, sp, sv, so, n_chunks,
    CHUNK: tl.constexpr, NC_BLOCK: tl.constexpr, FROM_LOGITS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    s, _, istar = _combine_partials(ws_s, ws_m, ws_i, row, n_chunks, K, NC_BLOCK)
    v_star = tl.load(v_ptr + row * sv + istar).to(tl.float32)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    mask = cols < K
    p = _load_probs(p_ptr + row * sp, lse_ptr, row, cols, mask, FROM_LOGITS)
    v = tl.load(v_ptr + row * sv + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * so + cols, (p * (v - s)).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(ws_t + row * n_chunks + c, tl.sum(p * (v_star - v), axis=0))


@triton.jit
def _vjp_split_fix_kernel(o_ptr, ws_s, ws_m, ws_i, ws_t, K, so, n_chunks, NC_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _, m, istar = _combine_partials(ws_s, ws_m, ws_i, row, n_chunks, K, NC_BLOCK)
    cc = tl.arange(0, NC_BLOCK)
    t = tl.sum(tl.load(ws_t + row * n_chunks + cc, mask=cc < n_chunks, other=0.0), axis=0)
    tl.store(o_ptr + row * so + istar, (m * t).to(o_ptr.dtype.element_ty))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` view with unit column stride (a copy only when no such view exists)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _row_stride(x2: torch.Tensor) -> int:
    return x2.stride(0) if x2.shape[0] > 1 else x2.shape[1]


def _pair_rows(x: torch.Tensor, v: torch.Tensor):
    """``(x2, v2), (sx, sv)``: row views of the two inputs and their row strides. (The outputs
    are allocated contiguous, row stride ``K``, and handed to the kernels as they are: a
    traced launch must write into the tensor it returns, not into a view of it.)"""
    x2, v2 = _as_rows(x), _as_rows(v)
    return (x2, v2), (_row_stride(x2), _row_stride(v2))


def softmax_vjp(
    probs: torch.Tensor,
    v: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
    split_threshold: int = SPLIT_THRESHOLD,
    split_chunk: int = SPLIT_CHUNK,
    launch: Callable = direct,
) -> torch.Tensor:
    """``J v`` over the last dim; with ``lse`` given, ``probs`` holds logits and
    ``σ = exp(z − lse)``. Output in the dtype of ``probs``. O(K) per row."""
    shape = probs.shape
    k = shape[-1]
    out = torch.empty(shape, dtype=probs.dtype, device=probs.device)
    if out.numel() == 0:
        return out
    (p2, v2), (sp, sv) = _pair_rows(probs, v)
    o2, so = out, k
    n = p2.shape[0]
    from_logits = lse is not None
    lse1 = lse.reshape(-1).float().contiguous() if lse is not None else p2  # dummy if unused
    if k <= split_threshold:
        block = vjp_block_size(k)
        launch(_vjp_row_kernel)[(n,)](
            p2, v2, o2, lse1, k, sp, sv, so,
            BLOCK=block, FROM_LOGITS=from_logits, num_warps=_num_warps(block),
        )  # fmt: skip
        return out
    chunk = triton.next_power_of_2(split_chunk)
    n_chunks = triton.cdiv(k, chunk)
    nc_block = max(2, triton.next_power_of_2(int(n_chunks)))
    dev = probs.device
    ws_s = torch.empty((n, n_chunks), dtype=torch.float32, device=dev)
    ws_m = torch.empty_like(ws_s)
    ws_t = torch.empty_like(ws_s)
    ws_i = torch.empty((n, n_chunks), dtype=torch.int32, device=dev)
    warps = _num_warps(chunk)
    launch(_vjp_split_partials_kernel)[(n, n_chunks)](
        p2, v2, lse1, ws_s, ws_m, ws_i, k, sp, sv, n_chunks,
        CHUNK=chunk, FROM_LOGITS=from_logits, num_warps=warps,
    )  # fmt: skip
    launch(_vjp_split_write_kernel)[(n, n_chunks)](
        p2, v2, o2, lse1, ws_s, ws_m, ws_i, ws_t, k, sp, sv, so, n_chunks,
        CHUNK=chunk, NC_BLOCK=nc_block, FROM_LOGITS=from_logits, num_warps=warps,
    )  # fmt: skip
    launch(_vjp_split_fix_kernel)[(n,)](
        o2, ws_s, ws_m, ws_i, ws_t, k, so, n_chunks, NC_BLOCK=nc_block, num_warps=1
    )
    return out


# ---------------------------------------------------------------------------------------------
# Exact VJP from logits: σ never rounded on its own (the formula of softjac._core.vjp_logits_last).
#   e = exp(z − max z) (e_{i*} = 1), r = Σ_{j≠i*} e_j, S = 1 + r, w = Σ_j e_j v_j,
#   (J v)_i = e_i (v_i S − w) / S²,  (J v)_{i*} = Σ_{j≠i*} e_j (v_{i*} − v_j) / S²,
#   y / S² taken as y − y · r (2 + r) / S² when r ≤ 1 (keeps what fl(1 + r) drops).
# A NaN in a row of z or v, or a +inf logit, makes the row NaN; a fully masked row gives zeros.


@triton.jit
def _div_s2(y, r):
    s = 1.0 + r
    s2 = s * s
    return tl.where(r <= 1.0, y - y * (r * (2.0 + r) / s2), y / s2)


@triton.jit
def _exact_row_kernel(z_ptr, v_ptr, o_ptr, K, sz, sv, so, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    z = tl.load(z_ptr + row * sz + cols, mask=mask, other=float("-inf")).to(tl.float32)
    v = tl.load(v_ptr + row * sv + cols, mask=mask, other=0.0).to(tl.float32)
    bad = tl.max(tl.where((z != z) | (z == float("inf")), 1, 0), axis=0)
    m = tl.max(z, axis=0)
    live = m > float("-inf")
    m_safe = tl.where(live, m, 0.0)
    e = tl.where(z == float("-inf"), 0.0, tl.exp(z - m_safe))
    istar = tl.min(tl.where((z == m) & mask, cols, BLOCK), axis=0)
    at = cols == istar
    r = tl.sum(tl.where(at, 0.0, e), axis=0)
    w = tl.sum(e * v, axis=0)
    v_star = tl.sum(tl.where(at, v, 0.0), axis=0)
    q = tl.sum(tl.where(at, 0.0, e * (v_star - v)), axis=0)
    y = tl.where(at, q, e * (v * (1.0 + r) - w))
    out = tl.where(live, _div_s2(y, r), 0.0)
    out = tl.where(bad > 0, float("nan"), out)
    tl.store(o_ptr + row * so + cols, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _exact_partials_kernel(
    z_ptr, v_ptr, ws_m, ws_i, ws_r, ws_w, ws_b, K, sz, sv, n_chunks, CHUNK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    mask = cols < K
    z = tl.load(z_ptr + row * sz + cols, mask=mask, other=float("-inf")).to(tl.float32)
    v = tl.load(v_ptr + row * sv + cols, mask=mask, other=0.0).to(tl.float32)
    m = tl.max(z, axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    e = tl.where(z == float("-inf"), 0.0, tl.exp(z - m_safe))
    ic = tl.min(tl.where((z == m) & mask, cols, K), axis=0)
    slot = row * n_chunks + c
    tl.store(ws_m + slot, m)
    tl.store(ws_i + slot, ic)
    tl.store(ws_r + slot, tl.sum(tl.where(cols == ic, 0.0, e), axis=0))
    tl.store(ws_w + slot, tl.sum(e * v, axis=0))
    bad = (z != z) | (z == float("inf")) | (v != v)
    tl.store(ws_b + slot, tl.max(tl.where(bad, 1, 0), axis=0))


@triton.jit
def _exact_combine(ws_m, ws_i, ws_r, ws_w, ws_b, row, n_chunks, K, NC_BLOCK: tl.constexpr):
    """(max, argmax, r, w, bad) of a row from its chunks' partials."""
    cc = tl.arange(0, NC_BLOCK)
    cmask = cc < n_chunks
    base = row * n_chunks
    ms = tl.load(ws_m + base + cc, mask=cmask, other=float("-inf"))
    m = tl.max(ms, axis=0)
    idx = tl.load(ws_i + base + cc, mask=cmask, other=K)
    istar = tl.min(tl.where((ms == m) & cmask, idx, K), axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    scale = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - m_safe))
    rc = tl.load(ws_r + base + cc, mask=cmask, other=0.0)
    # each chunk's own argmax element counts in r unless it is the row's argmax
    r = tl.sum(scale * (rc + tl.where(idx == istar, 0.0, 1.0)), axis=0)
    w = tl.sum(scale * tl.load(ws_w + base + cc, mask=cmask, other=0.0), axis=0)
    bad = tl.max(tl.load(ws_b + base + cc, mask=cmask, other=0), axis=0)
    return m, istar, r, w, bad


@triton.jit
def _exact_write_kernel(
    z_ptr, v_ptr, o_ptr, ws_m, ws_i, ws_r, ws_w, ws_b, ws_q, K, sz, sv, so, n_chunks,
    CHUNK: tl.constexpr, NC_BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    m, istar, r, w, bad = _exact_combine(ws_m, ws_i, ws_r, ws_w, ws_b, row, n_chunks, K, NC_BLOCK)
    live = m > float("-inf")
    m_safe = tl.where(live, m, 0.0)
    v_star = tl.load(v_ptr + row * sv + tl.minimum(istar, K - 1)).to(tl.float32)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    mask = cols < K
    z = tl.load(z_ptr + row * sz + cols, mask=mask, other=float("-inf")).to(tl.float32)
    v = tl.load(v_ptr + row * sv + cols, mask=mask, other=0.0).to(tl.float32)
    e = tl.where(z == float("-inf"), 0.0, tl.exp(z - m_safe))
    at = cols == istar
    out = tl.where(live, _div_s2(e * (v * (1.0 + r) - w), r), 0.0)
    out = tl.where(bad > 0, float("nan"), out)
    tl.store(o_ptr + row * so + cols, out.to(o_ptr.dtype.element_ty), mask=mask & (cols != istar))
    tl.store(ws_q + row * n_chunks + c, tl.sum(tl.where(at, 0.0, e * (v_star - v)), axis=0))


@triton.jit
def _exact_fix_kernel(
    o_ptr, ws_m, ws_i, ws_r, ws_w, ws_b, ws_q, K, so, n_chunks, NC_BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    m, istar, r, _, bad = _exact_combine(ws_m, ws_i, ws_r, ws_w, ws_b, row, n_chunks, K, NC_BLOCK)
    cc = tl.arange(0, NC_BLOCK)
    q = tl.sum(tl.load(ws_q + row * n_chunks + cc, mask=cc < n_chunks, other=0.0), axis=0)
    out = tl.where(m > float("-inf"), _div_s2(q, r), 0.0)
    out = tl.where(bad > 0, float("nan"), out)
    tl.store(o_ptr + row * so + tl.minimum(istar, K - 1), out.to(o_ptr.dtype.element_ty))


def softmax_vjp_logits(
    z: torch.Tensor,
    v: torch.Tensor,
    *,
    split_threshold: int = SPLIT_THRESHOLD,
    split_chunk: int = SPLIT_CHUNK,
    launch: Callable = direct,
) -> torch.Tensor:
    """``J(σ(z)) v`` over the last dim exactly from logits (σ never rounded on its own; the
    formula of ``softjac._core.vjp_logits_last``), float32 math, output in ``z``'s dtype.
    Rows up to ``split_threshold`` columns: one program per row, one read of ``z`` and ``v``,
    one write. Longer rows: per-chunk partials (max, argmax, ``Σ_{j≠i_c} e_j``, ``Σ e_j v_j``),
    then a second read that writes every entry but the argmax's and its chunk's part of
    ``Σ_{j≠i*} e_j (v_{i*} − v_j)``, then one value per row: two passes over the data."""
    shape = z.shape
    k = shape[-1]
    out = torch.empty(shape, dtype=z.dtype, device=z.device)
    if out.numel() == 0:
        return out
    (z2, v2), (sz, sv) = _pair_rows(z, v)
    o2, so = out, k
    n = z2.shape[0]
    if k <= split_threshold:
        block = vjp_block_size(k)
        launch(_exact_row_kernel)[(n,)](
            z2, v2, o2, k, sz, sv, so, BLOCK=block, num_warps=_num_warps(block)
        )
        return out
    chunk = triton.next_power_of_2(split_chunk)
    n_chunks = triton.cdiv(k, chunk)
    nc_block = max(2, triton.next_power_of_2(int(n_chunks)))
    dev = z.device
    ws_m = torch.empty((n, n_chunks), dtype=torch.float32, device=dev)
    ws_r, ws_w, ws_q = torch.empty_like(ws_m), torch.empty_like(ws_m), torch.empty_like(ws_m)
    ws_i = torch.empty((n, n_chunks), dtype=torch.int32, device=dev)
    ws_b = torch.empty_like(ws_i)
    warps = _num_warps(chunk)
    launch(_exact_partials_kernel)[(n, n_chunks)](
        z2, v2, ws_m, ws_i, ws_r, ws_w, ws_b, k, sz, sv, n_chunks, CHUNK=chunk, num_warps=warps
    )
    launch(_exact_write_kernel)[(n, n_chunks)](
        z2, v2, o2, ws_m, ws_i, ws_r, ws_w, ws_b, ws_q, k, sz, sv, so, n_chunks,
        CHUNK=chunk, NC_BLOCK=nc_block, num_warps=warps,
    )  # fmt: skip
    launch(_exact_fix_kernel)[(n,)](
        o2, ws_m, ws_i, ws_r, ws_w, ws_b, ws_q, k, so, n_chunks, NC_BLOCK=nc_block, num_warps=1
    )
    return out


# ---------------------------------------------------------------------------------------------
# Dense Jacobian: J = diag(σ) − σσᵀ, written tile by tile (the output is K× the input).


@triton.jit
def _jacobian_kernel(p_ptr, d_ptr, o_ptr, K, sp, sd, BI: tl.constexpr, BJ: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    ii = ti * BI + tl.arange(0, BI)
    jj = tj * BJ + tl.arange(0, BJ)
    mi = ii < K
    mj = jj < K
    pi = tl.load(p_ptr + row * sp + ii, mask=mi, other=0.0).to(tl.float32)
    pj = tl.load(p_ptr + row * sp + jj, mask=mj, other=0.0).to(tl.float32)
    di = tl.load(d_ptr + row * sd + ii, mask=mi, other=0.0)
    tile = -(pi[:, None] * pj[None, :])
    tile = tl.where(ii[:, None] == jj[None, :], di[:, None], tile)
    base = o_ptr + row * K * K
    offs = ii[:, None].to(tl.int64) * K + jj[None, :]
    tl.store(base + offs, tile.to(o_ptr.dtype.element_ty), mask=mi[:, None] & mj[None, :])


def softmax_jacobian_dense(probs: torch.Tensor, *, launch: Callable = direct) -> torch.Tensor:
    """Dense ``(..., K, K)`` Jacobian; diagonal ``σ_i (1 − σ_i)`` with ``1 − σ_{i*}`` taken as
    ``Σ_{j≠i*} σ_j`` (that O(N·K) diagonal is formed by torch, the O(N·K²) write here)."""
    shape = probs.shape
    k = shape[-1]
    out = torch.empty((*shape, k), dtype=probs.dtype, device=probs.device)
    if out.numel() == 0:
        return out
    p2 = _as_rows(probs)
    p32 = p2.float()
    idx = p32.argmax(dim=-1, keepdim=True)
    rest = p32.scatter(-1, idx, 0.0).sum(dim=-1, keepdim=True)
    diag = (p32 * (1 - p32)).scatter(-1, idx, p32.gather(-1, idx) * rest).contiguous()
    n = p2.shape[0]
    bi, bj = 32, min(256, max(16, triton.next_power_of_2(int(k))))
    grid = (n, triton.cdiv(k, bi), triton.cdiv(k, bj))
    launch(_jacobian_kernel)[grid](p2, diag, out, k, _row_stride(p2), k, BI=bi, BJ=bj, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# Cross-entropy with class-index targets. The math is ``softjac._core``'s (``ce_forward_last``):
# per row ``m = max z``, ``ls = log Σ exp(z − m)``, every ``lse − z_c`` as ``ls − (z_c − m)``
# and σ as ``exp((z − m) − ls)``, so errors scale with the row's spread, not its magnitude.
# The forward stores ``m`` and ``ls`` separately; the backward reads both. NaN propagates
# through the max (``propagate_nan``), a +inf logit gives ``inf − inf`` = NaN, −inf is masked.


@triton.jit
def _ce_forward_kernel(
    z_ptr, t_ptr, w_ptr, loss_ptr, m_ptr, ls_ptr, K, sz, ignore_index, eps,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * sz
    m_run = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_run = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < K
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_run, z, propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.exp(z - m_safe)
        m_run = m_new
    m = tl.max(m_run, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    ls = tl.log(tl.sum(s_run * tl.exp(m_run - m), axis=0))
    tl.store(m_ptr + row, m)
    tl.store(ls_ptr + row, ls)
    tgt = tl.load(t_ptr + row)
    valid = tgt != ignore_index
    safe_t = tl.where(valid, tgt, 0)
    z_t = tl.load(z_row + safe_t).to(tl.float32)
    if HAS_W:
        w_t = tl.load(w_ptr + safe_t).to(tl.float32)
    else:
        w_t = 1.0
    loss = (1.0 - eps) * w_t * (ls - (z_t - m))
    if SMOOTH:  # a second pass, now that m is known: Σ_c w_c (ls − (z_c − m))
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < K
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = tl.where(mask, 1.0, 0.0)
            acc += tl.where(mask, w * (ls - (z - m)), 0.0)
        loss += (eps / K) * tl.sum(acc, axis=0)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))


def _weight_args(weight: torch.Tensor | None, k: int, dev: torch.device):
    """Class weights as float32 and their sum as a 1-element tensor (no host sync)."""
    if weight is None:
        return torch.ones(1, device=dev), torch.full((1,), float(k), device=dev)
    w = weight.float().contiguous()
    return w, w.sum().reshape(1)


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    stats: bool = False,
    launch: Callable = direct,
):
    """``(loss_rows, lse)`` in float32 for ``(N, K)`` logits, or ``(loss_rows, (m, ls))`` with
    ``stats=True``: one pass over each row (online log-sum-exp), a second one for label
    smoothing; the contract is in ``softjac.kernels.dispatch``."""
    n, k = logits.shape
    dev = logits.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    m = torch.empty(n, dtype=torch.float32, device=dev)
    ls = torch.empty(n, dtype=torch.float32, device=dev)
    if n:
        z = _as_rows(logits)
        w, _ = _weight_args(weight, k, dev)
        block = min(CE_BLOCK, vjp_block_size(k))
        launch(_ce_forward_kernel)[(n,)](
            z, target.contiguous(), w, loss, m, ls, k, _row_stride(z), ignore_index,
            float(label_smoothing),
            HAS_W=weight is not None, SMOOTH=label_smoothing > 0, BLOCK=block,
            num_warps=_num_warps(block),
        )  # fmt: skip
    return (loss, (m, ls)) if stats else (loss, m + ls)


@triton.jit
def _ce_backward_kernel(
    z_ptr, t_ptr, w_ptr, wsum_ptr, m_ptr, ls_ptr, g_ptr, o_ptr, K, sz, so, ignore_index, eps,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    tgt = tl.load(t_ptr + row)
    valid = tgt != ignore_index
    safe_t = tl.where(valid, tgt, 0)
    if HAS_W:
        w_t = tl.load(w_ptr + safe_t).to(tl.float32)
    else:
        w_t = 1.0
    g = tl.load(g_ptr + row).to(tl.float32)
    m = tl.load(m_ptr + row).to(tl.float32)
    ls = tl.load(ls_ptr + row).to(tl.float32)
    z = tl.load(z_ptr + row * sz + cols, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp((z - m) - ls)
    coef = (1.0 - eps) * w_t
    if SMOOTH:
        coef += (eps / K) * tl.load(wsum_ptr)
    grad = p * coef - tl.where(cols == safe_t, (1.0 - eps) * w_t, 0.0)
    if SMOOTH:
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = 1.0
        grad -= (eps / K) * w
    grad = tl.where(valid, g * grad, 0.0)  # ignored rows: exactly 0 whatever z and g hold
    tl.store(o_ptr + row * so + cols, grad.to(o_ptr.dtype.element_ty), mask=mask)


def cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse,
    grad_rows: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    inplace: bool = False,
    launch: Callable = direct,
) -> torch.Tensor:
    """``∂(Σ_n g_n loss_n)/∂z`` for ``(N, K)`` logits in one read and one write per element
    (into ``logits`` itself when ``inplace``; then ``logits`` must have unit column stride);
    ``lse`` is the pair ``(m, ls)`` of the forward's ``stats=True`` or one tensor."""
    n, k = logits.shape
    if inplace:  # unit stride along K: checked by dispatch
        out, z = logits, logits
    else:
        z = _as_rows(logits)
        out = torch.empty((n, k), dtype=logits.dtype, device=logits.device)
    if n == 0 or k == 0:
        return out
    m, ls = split_lse(lse, torch.empty(0, dtype=torch.float32))
    w, w_sum = _weight_args(weight, k, logits.device)
    block = min(CE_BLOCK, vjp_block_size(k))
    grid = (n, triton.cdiv(k, block))
    launch(_ce_backward_kernel)[grid](
        z, target.contiguous(), w, w_sum, m.contiguous(), ls.contiguous(),
        grad_rows.float().reshape(-1).expand(n).contiguous(), out, k, _row_stride(z),
        _row_stride(out), ignore_index, float(label_smoothing),
        HAS_W=weight is not None, SMOOTH=label_smoothing > 0, BLOCK=block,
        num_warps=_num_warps(block),
    )  # fmt: skip
    return out
