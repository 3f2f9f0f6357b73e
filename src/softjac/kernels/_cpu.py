"""CPU kernels: plain-C loops built at install time and called through ctypes.

Why this design (``docs/benchmarks.md`` has the numbers): PyTorch's native softmax backward
on CPU runs far below the copy bandwidth at large K; the fused loops in ``csrc/*.c`` read σ
and v once from DRAM (the second look at a row is served from cache) and write once, with
rows handed to OpenMP threads, and they compute the argmax entry without cancellation, which
the native kernel does not. The C files have no Python headers; ``setup.py`` compiles them
at install into ``kernels/_lib/`` in three instruction-set variants (x86-64 baseline, AVX2,
AVX-512), of which ``softjac.kernels._loader`` loads the best this CPU runs (``capability``).
Without a build (and without the ``SOFTJAC_BUILD_KERNELS=1`` opt-in to compile at first use),
``backend="auto"`` falls back to torch and ``backend="cpu"`` raises with the reason.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import torch

from softjac.kernels import _loader

__all__ = [
    "CE_DTYPES",
    "available",
    "capability",
    "cross_entropy_backward",
    "cross_entropy_backward_inner",
    "cross_entropy_forward",
    "cross_entropy_forward_inner",
    "jacobian_logits",
    "softmax",
    "softmax_jacobian_dense",
    "softmax_vjp",
    "softmax_vjp_argmax",
    "softmax_vjp_from_logits",
    "softmax_vjp_logits",
    "unavailable_reason",
]

# Logits dtypes of the cross-entropy kernels (float32 math; float64 stays on torch).
CE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_ABI = 8
_SUFFIX = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_variant = ""
# every entry point by name: a ctypes function typed by _load (restype c_int, so it returns int)
_fns: dict[str, Callable[..., int]] = {}
# the softmax forward and its backward from the forward's argmax by dtype (the eager training
# step's two calls: a dtype lookup instead of building the name)
_softmax_fns: dict[torch.dtype, Callable[..., int]] = {}
_vjp_idx_fns: dict[torch.dtype, Callable[..., int]] = {}


def _load() -> ctypes.CDLL | None:
    global _lib, _error, _variant
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        lib, why, variant = _loader.load("softjac_cpu")
        if lib is None:
            _error = why
            return None
        abi = lib.softjac_cpu_abi()
        if abi != _ABI:
            _error = (
                f"the built C kernels have ABI version {abi}, this softjac needs {_ABI}; "
                "rebuild them (`pip install -e .` in the source tree)"
            )
            return None
        i64, ptr, cint, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        # z, target, weight, w_sum, loss, m, ls, n, k, stride, ignore, eps, threads
        ce_fwd = [ptr, ptr, ptr, f32, ptr, ptr, ptr, i64, i64, i64, i64, f32, cint]
        # z, target, weight, w_sum, m, ls, grad, out, n, k, strides of z and out, ignore, eps,
        # threads
        ce_bwd = [ptr, ptr, ptr, f32, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32, cint]
        signatures = {}
        for suffix in _SUFFIX.values():
            signatures[f"softjac_vjp_{suffix}"] = [ptr, ptr, ptr, i64, i64, i64, i64, i64, cint]
            signatures[f"softjac_vjp_inner_{suffix}"] = [ptr, ptr, ptr, i64, i64, i64, cint]
            signatures[f"softjac_vjp_logits_{suffix}"] = [ptr, ptr, ptr, ptr] + [i64] * 5 + [cint]
            signatures[f"softjac_jac_{suffix}"] = [ptr, ptr, i64, i64, i64, cint]
            signatures[f"softjac_vjp_exact_{suffix}"] = [ptr, ptr, ptr] + [i64] * 5 + [cint]
            signatures[f"softjac_jac_logits_{suffix}"] = [ptr, ptr, i64, i64, i64, cint]
            if suffix == "f64":  # float32 math only: float64 stays on torch
                continue
            signatures[f"softjac_softmax_{suffix}"] = [ptr, ptr, ptr, i64, i64, i64, cint]
            signatures[f"softjac_vjp_idx_{suffix}"] = [ptr, ptr, ptr, ptr] + [i64] * 5 + [cint]
            signatures[f"softjac_ce_fwd_{suffix}"] = ce_fwd
            signatures[f"softjac_ce_bwd_{suffix}"] = ce_bwd
        # the class-in-the-middle (nb, k, m) cross-entropy kernels, float32
        signatures["softjac_ce_fwd_inner_f32"] = [ptr, ptr, ptr, f32, ptr, ptr, ptr]
        signatures["softjac_ce_fwd_inner_f32"] += [i64, i64, i64, i64, f32, cint]
        signatures["softjac_ce_bwd_inner_f32"] = [ptr, ptr, ptr, f32, ptr, ptr, ptr, i64, ptr]
        signatures["softjac_ce_bwd_inner_f32"] += [i64, i64, i64, i64, f32, cint]
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = cint
            _fns[name] = fn
        for dtype in CE_DTYPES:
            _softmax_fns[dtype] = _fns[f"softjac_softmax_{_SUFFIX[dtype]}"]
            _vjp_idx_fns[dtype] = _fns[f"softjac_vjp_idx_{_SUFFIX[dtype]}"]
        _lib, _variant = lib, variant
        return _lib


def available() -> bool:
    """Whether the C kernels are built and load on this machine (loading them on first call)."""
    return _load() is not None


def capability() -> str:
    """The instruction-set variant of the loaded kernels: ``"baseline"``, ``"avx2"`` or
    ``"avx512"`` (empty string when they are unavailable)."""
    _load()
    return _variant


def unavailable_reason() -> str:
    """Why :func:`available` is False (empty string when it is True)."""
    _load()
    return _error or ""


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` viewed as ``(N, K)`` rows with unit last stride; returns the view and its row
    stride. Copies only when the batch dimensions cannot be flattened into one stride."""
    k = x.shape[-1]
    if x.is_contiguous():
        return x, k
    if x.stride(-1) != 1 and k > 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x, k
    try:
        x2 = x.view(-1, k)
    except RuntimeError:
        x2 = x.reshape(-1, k).contiguous()
    return x2, x2.stride(0) if x2.shape[0] > 1 else k


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernel is unavailable: {_error}")
    return lib


def _inner_layout(x: torch.Tensor) -> int | None:
    """For ``x`` with the class dim last: the position ``pos`` at which moving the class dim
    back makes ``x`` contiguous (``x`` is then a ``movedim`` of a contiguous tensor whose class
    dim sits in the middle, as for softmax over ``dim != -1``), else None."""
    for pos in range(x.dim() - 1):
        if x.movedim(-1, pos).is_contiguous():
            return pos
    return None


def _pair_rows(x: torch.Tensor, v: torch.Tensor):
    """Row views of ``x`` and ``v`` and of a fresh output of ``x``'s shape and dtype, for the
    kernels that read two tensors and write one: ``(out, (x2, v2, o2), (sx, sv, so), n)``,
    with the row strides of :func:`_rows` and ``n`` the number of rows (0 when K = 0).
    Contiguous inputs, the common case, take a shortcut (every call pays for this)."""
    k = x.shape[-1] if x.dim() else 1
    if x.is_contiguous() and v.is_contiguous():
        out = torch.empty_like(x)
        return out, (x, v, out), (k, k, k), x.numel() // k if k else 0
    x2, sx = _rows(x)
    v2, sv = _rows(v)
    out = torch.empty(x.shape, dtype=x.dtype)
    o2, so = _rows(out)
    n = x2.numel() // k if k else 0
    return out, (x2, v2, o2), (sx, sv, so), n


def softmax_vjp(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v = σ ⊙ (v − ⟨σ, v⟩)`` over the last dim by the C kernel; O(K) per row, one read
    of σ and v from memory and one write; the argmax entry is
    ``σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j)``. ``probs`` and ``v``: CPU tensors of one dtype
    (float16/bfloat16/float32/float64) and shape; the result has that dtype.

    When ``probs`` is a ``movedim`` of a contiguous tensor (softmax over ``dim != -1``), the
    inner-layout kernel reads it in place (and ``v`` too when laid out alike; otherwise only
    ``v`` is copied into that layout) and the result comes back in the same layout."""
    if _lib is None:
        _lib_or_raise()
    k = probs.shape[-1] if probs.dim() else 1
    threads = torch.get_num_threads()
    suffix = _SUFFIX[probs.dtype]
    pos = None
    if 1 < k < 2**31 and not probs.is_contiguous() and probs.stride(-1) != 1:
        pos = _inner_layout(probs)
    if pos is not None:
        pm = probs.movedim(-1, pos)
        vm = v.movedim(-1, pos).contiguous()
        out = torch.empty(pm.shape, dtype=probs.dtype)
        m = pm[(0,) * (pos + 1)].numel()
        nb = pm.numel() // (k * m) if m else 0
        if nb and m:
            _fns[f"softjac_vjp_inner_{suffix}"](
                pm.data_ptr(), vm.data_ptr(), out.data_ptr(), nb, k, m, threads
            )
        return out.movedim(pos, -1)
    out, (p2, v2, o2), (sp, sv, so), n = _pair_rows(probs, v)
    if n and k:
        _fns[f"softjac_vjp_{suffix}"](
            p2.data_ptr(), v2.data_ptr(), o2.data_ptr(), n, k, sp, sv, so, threads
        )
    return out


def softmax(z: torch.Tensor, *, argmax: bool = False):
    """``σ = exp(z − max z) / Σ exp(z − max z)`` over the last dim by the C kernel, float32 math
    for float32/bfloat16/float16 ``z`` (``CE_DTYPES``), rounded once into ``z``'s dtype:
    one read of ``z`` from memory, one write; exact to about an ulp down to the smallest
    subnormal. Fully masked rows give zeros, rows with NaN or +inf give NaN (as
    ``torch.softmax``).

    With ``argmax=True`` returns ``(σ, idx)``: ``idx`` (int32, shape ``z.shape[:-1]``) is each
    row's first largest logit (so its first largest σ), −1 for a fully masked or NaN row —
    what :func:`softmax_vjp_argmax` needs: one entry per row, in row order (a flat ``(N,)``
    tensor). ``idx`` is None when K ≥ 2³¹."""
    if _lib is None:
        _lib_or_raise()
    k = z.shape[-1] if z.dim() else 1
    # (empty_like of a contiguous tensor, and integer sizes, cost a fraction of empty(shape))
    if z.is_contiguous():
        z2, sz, out = z, k, torch.empty_like(z)
    else:
        (z2, sz), out = _rows(z), torch.empty(z.shape, dtype=z.dtype)
    n = z2.numel() // k if k else 0
    idx = None
    if argmax and k < 2**31:
        idx = torch.empty(n, dtype=torch.int32)
    if n and k:
        _softmax_fns[z.dtype](
            z2.data_ptr(), out.data_ptr(), 0 if idx is None else idx.data_ptr(), n, k, sz,
            torch.get_num_threads(),
        )  # fmt: skip
    return (out, idx) if argmax else out


def softmax_vjp_argmax(probs: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`softmax_vjp` for σ from :func:`softmax` with ``argmax=True`` (float32, bfloat16
    or float16) and its ``idx``: the same formula, with i* read instead of searched, so one
    reduction pass (``s = Σ σ v`` and ``t = Σ σ (v_{i*} − v)`` together) and one output pass
    (the same values for rows above 64 entries; shorter rows add in another order). ``v``
    must have σ's dtype and shape."""
    if _lib is None:
        _lib_or_raise()
    out, (p2, v2, o2), (sp, sv, so), n = _pair_rows(probs, v)
    if n:
        _vjp_idx_fns[probs.dtype](
            p2.data_ptr(), v2.data_ptr(), idx.data_ptr(), o2.data_ptr(), n, probs.shape[-1],
            sp, sv, so, torch.get_num_threads(),
        )  # fmt: skip
    return out


def _dense_jacobian(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """The ``(..., K, K)`` result of the dense C writer ``kernel`` (``softjac_jac`` from σ,
    ``softjac_jac_logits`` from logits) run over the rows of ``x``; the dtype of ``x``."""
    k = x.shape[-1]
    x2, sx = _rows(x)
    out = torch.empty((*x.shape, k), dtype=x.dtype)
    n = x2.numel() // k if k else 0
    if n and k:
        fn = _fns[f"{kernel}_{_SUFFIX[x.dtype]}"]
        if fn(x2.data_ptr(), out.data_ptr(), n, k, sx, torch.get_num_threads()):
            raise MemoryError("softjac.jacobian: the CPU kernel could not allocate its workspace")
    return out


def softmax_jacobian_dense(probs: torch.Tensor) -> torch.Tensor:
    """Dense ``J = diag(σ) − σσᵀ`` of shape ``(..., K, K)`` by the C writer: O(K²) per row,
    written once (non-temporal stores for long float32 rows), the argmax diagonal entry as
    ``σ_{i*} Σ_{j≠i*} σ_j``; the dtype of ``probs``."""
    _lib_or_raise()
    return _dense_jacobian(probs, "softjac_jac")


def softmax_vjp_from_logits(z: torch.Tensor, lse: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` with ``σ = exp(z − lse)`` recomputed in the kernel (a vectorised exp, float32
    accurate; σ below 1.2e-38 counts as 0); ``lse`` holds one value per row (shape
    ``(..., 1)``). Same passes and accuracy as :func:`softmax_vjp`."""
    _lib_or_raise()
    k = z.shape[-1] if z.dim() else 1
    out, (z2, v2, o2), (sz, sv, so), n = _pair_rows(z, v)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    lse1 = lse.to(acc).reshape(-1).contiguous()
    # masked rows (lse = -inf) give zeros with any finite lse; +inf or NaN stays, so that
    # exp(z - lse) is NaN somewhere and the whole row NaN
    lse1 = torch.where(lse1 == float("-inf"), torch.zeros((), dtype=acc), lse1)
    if n and k:
        fn = _fns[f"softjac_vjp_logits_{_SUFFIX[z.dtype]}"]
        fn(z2.data_ptr(), lse1.data_ptr(), v2.data_ptr(), o2.data_ptr(), n, k, sz, sv, so,
           torch.get_num_threads())  # fmt: skip
    return out


def softmax_vjp_logits(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` over the last dim straight from logits ``z``, with σ never rounded: the
    formula of ``softjac._core.vjp_logits_last`` (``e = exp(z − max z)``, ``r = Σ_{j≠i*} e_j``,
    ``S = 1 + r``, ``(J v)_i = e_i (v_i S − Σ_j e_j v_j) / S²``, the argmax entry
    ``Σ_{j≠i*} e_j (v_{i*} − v_j) / S²``) by the C kernel in two passes over each row (one
    read of ``z`` and ``v`` from memory, the max found online), O(K) per row. Float math for
    float32/bfloat16/float16, double for float64; the dtype of ``z``, which ``v`` must share.
    A NaN in a row (of ``z`` or ``v``) or a +inf logit makes that row NaN; −inf is masked and
    a fully masked row gives zeros; ``v`` near the overflow threshold is scaled internally, so
    the result is finite wherever the exact one is representable."""
    if _lib is None:
        _lib_or_raise()
    k = z.shape[-1] if z.dim() else 1
    out, (z2, v2, o2), (sz, sv, so), n = _pair_rows(z, v)
    if n and k:
        fn = _fns[f"softjac_vjp_exact_{_SUFFIX[z.dtype]}"]
        fn(z2.data_ptr(), v2.data_ptr(), o2.data_ptr(), n, k, sz, sv, so, torch.get_num_threads())
    return out


def jacobian_logits(z: torch.Tensor) -> torch.Tensor:
    """Dense ``J = diag(σ) − σσᵀ`` of shape ``(..., K, K)`` straight from logits ``z``, with σ
    never rounded: the formula of ``softjac._core.jacobian_logits_last`` (``J_ij = −e_i e_j /
    S²``, ``J_ii = e_i (S − e_i) / S²``, the argmax's ``S − e_{i*}`` as ``r``), by the C
    writer: K exponentials per row, then O(K²) written once; the dtype of ``z``. Rows with a
    NaN or a +inf give NaN blocks, fully masked rows zeros."""
    _lib_or_raise()
    return _dense_jacobian(z, "softjac_jac_logits")


def _weight_args(weight: torch.Tensor | None) -> tuple[torch.Tensor | None, int, float]:
    if weight is None:
        return None, 0, 0.0
    w = weight.to(torch.float32).contiguous()
    return w, w.data_ptr(), float(w.sum())


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    stats: bool = False,
):
    """``(loss_rows, lse)`` in float32 for ``(N, K)`` logits of a dtype in ``CE_DTYPES``, or
    ``(loss_rows, (m, ls))`` with ``stats=True`` (row max and log of the shifted sum; the pair
    the backward needs for σ accurate to the row's spread): per row a max pass (from memory)
    and an exp-sum pass (from cache); the formula is in ``softjac.kernels.dispatch``. Targets
    must be in ``[0, K)`` or ``ignore_index`` (checked by the caller)."""
    _lib_or_raise()
    n, k = logits.shape
    z2, sz = _rows(logits)
    tgt = target.to(torch.int64).contiguous()
    loss = torch.empty(n, dtype=torch.float32)
    m = torch.empty(n, dtype=torch.float32)
    ls = torch.empty(n, dtype=torch.float32)
    w, wp, w_sum = _weight_args(weight)
    if n and k:
        fn = _fns[f"softjac_ce_fwd_{_SUFFIX[logits.dtype]}"]
        fn(z2.data_ptr(), tgt.data_ptr(), wp, w_sum if w is not None else float(k),
           loss.data_ptr(), m.data_ptr(), ls.data_ptr(), n, k, sz, ignore_index,
           float(label_smoothing), torch.get_num_threads())  # fmt: skip
    return (loss, (m, ls)) if stats else (loss, m + ls)


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
) -> torch.Tensor:
    """``∂(Σ_n g_n loss_n)/∂z`` for ``(N, K)`` logits, one read and one write per element
    (into ``logits`` itself when ``inplace``, which needs unit stride along K); ``lse`` is the
    pair ``(m, ls)`` of the forward's ``stats=True`` or one log-sum-exp tensor. Ignored rows
    get exactly 0."""
    from softjac.kernels._torch import split_lse

    _lib_or_raise()
    n, k = logits.shape
    if inplace:  # unit stride along K: checked by dispatch
        z2, sz = logits, (logits.stride(0) if n > 1 else k)
        out, so = logits, sz
    else:
        z2, sz = _rows(logits)
        out = torch.empty((n, k), dtype=logits.dtype)
        so = k
    tgt = target.to(torch.int64).contiguous()
    m, ls = split_lse(lse, torch.empty(0, dtype=torch.float32))
    m, ls = m.contiguous(), ls.contiguous()
    g = grad_rows.to(torch.float32).reshape(-1).expand(n).contiguous()
    w, wp, w_sum = _weight_args(weight)
    if n and k:
        fn = _fns[f"softjac_ce_bwd_{_SUFFIX[logits.dtype]}"]
        fn(z2.data_ptr(), tgt.data_ptr(), wp, w_sum if w is not None else float(k),
           m.data_ptr(), ls.data_ptr(), g.data_ptr(), out.data_ptr(), n, k, sz, so,
           ignore_index, float(label_smoothing), torch.get_num_threads())  # fmt: skip
    return out


def cross_entropy_forward_inner(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
):
    """``(loss, (m, ls))``, each ``(B, M)`` float32, for contiguous float32 logits ``(B, K, M)``
    with the classes in the middle (cross-entropy over dim 1 of NCHW data) and targets
    ``(B, M)``: the row kernel's formulas read in place, tiles of columns with SIMD across them
    (no copy into rows). Targets must be in ``[0, K)`` or ``ignore_index``."""
    _lib_or_raise()
    b, k, m = logits.shape
    z = logits.contiguous()
    tgt = target.to(torch.int64).reshape(b, m).contiguous()
    loss = torch.empty(b, m, dtype=torch.float32)
    mx = torch.empty(b, m, dtype=torch.float32)
    ls = torch.empty(b, m, dtype=torch.float32)
    w, wp, w_sum = _weight_args(weight)
    if b and k and m:
        _fns["softjac_ce_fwd_inner_f32"](
            z.data_ptr(), tgt.data_ptr(), wp, w_sum if w is not None else float(k),
            loss.data_ptr(), mx.data_ptr(), ls.data_ptr(), b, k, m, ignore_index,
            float(label_smoothing), torch.get_num_threads(),
        )  # fmt: skip
    return loss, (mx, ls)


def cross_entropy_backward_inner(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    grad_rows: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """``∂(Σ g loss)/∂z`` ``(B, K, M)`` float32 for the layout of
    :func:`cross_entropy_forward_inner`, from its pair ``(m, ls)`` and ``grad_rows`` ``(B, M)``
    (or one value for all); one read of the logits and one write, in place of the layout.
    Ignored rows get exactly 0."""
    _lib_or_raise()
    b, k, m = logits.shape
    z = logits.contiguous()
    tgt = target.to(torch.int64).reshape(b, m).contiguous()
    mx, ls = (x.to(torch.float32).reshape(b, m).contiguous() for x in stats)
    g = grad_rows.to(torch.float32)
    if g.numel() == 1 or all(st == 0 for st in g.stride()):  # one value for all rows
        g, sg = g.reshape(-1)[:1].contiguous(), 0
    else:
        g, sg = g.reshape(-1).contiguous(), 1
    out = torch.empty(b, k, m, dtype=torch.float32)
    w, wp, w_sum = _weight_args(weight)
    if b and k and m:
        _fns["softjac_ce_bwd_inner_f32"](
            z.data_ptr(), tgt.data_ptr(), wp, w_sum if w is not None else float(k),
            mx.data_ptr(), ls.data_ptr(), g.data_ptr(), sg, out.data_ptr(), b, k, m, ignore_index,
            float(label_smoothing), torch.get_num_threads(),
        )  # fmt: skip
    return out
