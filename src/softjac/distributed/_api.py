"""Public functions of :mod:`softjac.distributed`: validation, the agreement collective, the
DTensor wrapping, and the reductions; the math is in :mod:`softjac.distributed._ops`."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.distributed as dist

from softjac import _core
from softjac._checks import as_float_dtype, check_dim, check_tensor, fmt_shape
from softjac.distributed import _comm, _linear, _ops

__all__ = ["cross_entropy", "linear_cross_entropy", "log_softmax", "softmax", "vjp"]

_REDUCTIONS = ("none", "mean", "sum")
_LOCAL_ERRORS = (TypeError, ValueError, IndexError)


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


def _local(x: Any) -> Any:
    """A DTensor's local shard, anything else as it is."""
    return x.to_local() if _is_dtensor(x) else x


class _Setup:
    """The resolved call: local shard, group, DTensor metadata (or None), local error."""

    def __init__(self, fn, logits, dim, group, vocab_start):
        self.fn = fn
        self.dt = None
        self.extra_groups: tuple = ()
        self.batch_groups: tuple = ()
        self.error: BaseException | None = None
        self.local = logits
        self.d = -1
        if _is_dtensor(logits):
            d = check_dim(fn, dim, logits.ndim)
            local, mesh, placements, cdim, bdims = _comm.dtensor_parts(fn, logits, d)
            if vocab_start is not None:
                raise ValueError(
                    f"`{fn}`: `vocab_start` is taken from the DTensor's placement; pass None. "
                    f"Got {vocab_start!r}."
                )
            if group is not None:
                raise ValueError(f"`{fn}`: `group` is taken from the DTensor's mesh; pass None.")
            self.dt = (mesh, placements, cdim, bdims, logits)
            self.local = local
            self.group = mesh.get_group(cdim)
            self.extra_groups = tuple(mesh.get_group(i) for i in range(mesh.ndim) if i != cdim)
            self.batch_groups = tuple(mesh.get_group(i) for i in bdims)
        else:
            self.group = _comm.resolve_group(fn, group)
        try:
            check_tensor(fn, "logits", self.local)
            self.d = check_dim(fn, dim, self.local.ndim)
            if self.local.shape[self.d] == 0:
                raise ValueError(
                    f"`{fn}`: every shard needs at least one class; `logits` has shape "
                    f"{fmt_shape(self.local.shape)} on this rank."
                )
            if vocab_start is not None and (
                isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
            ):
                raise ValueError(f"`{fn}`: `vocab_start` must be an int >= 0. Got {vocab_start!r}.")
        except _LOCAL_ERRORS as exc:
            self.error = exc

    def agree(self, vocab_start, **checks):
        """``_comm.agree`` for this call: every rank's local error, shard shape, dtype and
        ``checks`` compared with one collective before any work (so all raise together)."""
        return _comm.agree(
            self.fn,
            self.group,
            self.error,
            self.shape_last(),
            self.dtype(),
            vocab_start=vocab_start,
            extra_groups=self.extra_groups,
            **checks,
        )

    def shape_last(self) -> tuple[int, ...]:
        if self.error is not None and not isinstance(self.local, torch.Tensor):
            return (0,)
        shape = tuple(self.local.shape)
        if self.local.ndim == 0:
            return (0,)
        return shape[: self.d] + shape[self.d + 1 :] + (shape[self.d],)

    def dtype(self) -> torch.dtype:
        return self.local.dtype if isinstance(self.local, torch.Tensor) else torch.float32

    def wrap(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (a local shard laid out like the logits) back as a DTensor if needed."""
        if self.dt is None:
            return out
        from torch.distributed.tensor import DTensor

        mesh, placements, _, _, x = self.dt
        return DTensor.from_local(out, mesh, placements, shape=x.shape, stride=x.stride())


def softmax(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """Softmax over a class dimension sharded across the ranks of ``group``.

    Each rank passes its contiguous shard ``logits[..., V_r, ...]`` of the classes (shards in
    rank order, possibly uneven, or placed by ``vocab_start``) and gets its shard of
    ``σ = exp(z − lse(z))`` over the *global* class dimension. Communication: one all-gather of
    a few integers (the checks every rank agrees on) and two all-reduces of ``M`` and ``2M``
    values (``M`` the number of rows); the backward ``σ ⊙ (g − ⟨σ, g⟩)`` one all-reduce of
    ``4M`` values, with the global argmax entry ``σ_{i*} Σ_{j≠i*} σ_j (g_{i*} − g_j)`` as in
    ``softjac.softmax``. Cost O(M·V_r) per rank.

    Args:
        logits: this rank's floating shard, or a DTensor sharded on ``dim`` (then the result is
            a DTensor with the same placements and ``group`` must be None).
        dim: the (sharded) class dimension.
        group: the process group across which the classes are sharded (default: the world).
        vocab_start: global index of this rank's first class (default: from the shard sizes
            in rank order).

    Returns:
        This rank's shard of σ, in the dtype and on the device of ``logits``.
    """
    fn = "softjac.distributed.softmax"
    return _elementwise(fn, logits, dim, group, vocab_start, _ops.SoftmaxShard)


def log_softmax(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """Log-softmax over a sharded class dimension: ``z − m − log1p(r)`` with ``m`` the global
    maximum and ``r = Σ_{j≠i*} exp(z_j − m)`` (so ``log σ_{i*}`` keeps its accuracy when
    ``σ_{i*} ≈ 1``). Same arguments, communication and cost as :func:`softmax`; the backward
    ``g − σ Σ g`` takes one all-reduce of ``M`` values."""
    fn = "softjac.distributed.log_softmax"
    return _elementwise(fn, logits, dim, group, vocab_start, _ops.LogSoftmaxShard)


def _elementwise(fn, logits, dim, group, vocab_start, function):
    st = _Setup(fn, logits, dim, group, vocab_start)
    st.agree(vocab_start, options=(fn, st.d))
    x = st.local
    z = _core.to_last(x.to(as_float_dtype(x.dtype)), st.d)
    out = function.apply(z.reshape(-1, z.shape[-1]), st.group).reshape(z.shape)
    return st.wrap(_core.from_last(out.to(x.dtype), st.d))


def vjp(
    logits: torch.Tensor,
    v: torch.Tensor,
    dim: int = -1,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """``J v = σ ⊙ (v − ⟨σ, v⟩)`` with ``J = diag(σ) − σσᵀ`` over a sharded class dimension.

    ``v`` is sharded like ``logits``. As in single-device ``softjac.vjp``, σ is never rounded
    on its own (``(J v)_i = e_i u_i / S²``, ``e = exp(z − m)``) and the entry of the global
    argmax is ``σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j)``, which its owner forms from the
    all-reduced partial sums ``Σ_{j≠i*} e_j`` and ``Σ_{j≠i*} e_j v_j`` — no cancellation when
    ``σ_{i*} ≈ 1``. Communication: the agreement all-gather and two all-reduces (max of ``M``
    values; sum of ``4M``). Cost O(M·V_r) per rank. Not differentiable (a value, like a
    gradient); returns this rank's shard in the dtype of ``logits`` (a DTensor for DTensor
    inputs).
    """
    fn = "softjac.distributed.vjp"
    st = _Setup(fn, logits, dim, group, vocab_start)
    vl = _local(v)
    if st.error is None:
        try:
            check_tensor(fn, "v", vl)
            if vl.shape != st.local.shape:
                raise ValueError(
                    f"`{fn}`: `v` must have the shape of `logits`. Got {fmt_shape(vl.shape)} "
                    f"and {fmt_shape(st.local.shape)}."
                )
            if vl.device != st.local.device:
                raise ValueError(
                    f"`{fn}`: `v` and `logits` must be on the same device. "
                    f"Got {vl.device} and {st.local.device}."
                )
        except _LOCAL_ERRORS as exc:
            st.error = exc
    st.agree(vocab_start, options=(fn, st.d))
    x = st.local
    cd = as_float_dtype(x.dtype)
    with torch.no_grad():
        z = _core.to_last(x.detach().to(cd), st.d)
        vv = _core.to_last(vl.detach().to(cd), st.d)
        shape = z.shape
        out = _ops.logits_vjp(z.reshape(-1, shape[-1]), vv.reshape(-1, shape[-1]), st.group)
    return st.wrap(_core.from_last(out.reshape(shape).to(x.dtype), st.d))


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits whose last (class) dimension is sharded across ``group``.

    The same loss, on every rank, as single-device ``softjac.cross_entropy`` (and
    ``F.cross_entropy``) on the gathered logits ``(..., V)``:
    ``loss_n = (1 − ε) w[y_n] (lse_n − z_{n,y_n}) + (ε/V) Σ_c w_c (lse_n − z_{n,c})`` for class
    indices (0 when ``y_n == ignore_index``; ``V`` the *global* vocabulary, so label smoothing
    is exact at any world size) and ``Σ_c w_c y'_{n,c} (lse_n − z_{n,c})`` with
    ``y' = (1 − ε) y + ε/V`` for probability targets; plus the z-loss ``ζ r_n lse_n²``
    (``ζ = z_loss``; ``r_n = w[y_n]``, 0 on ignored rows, 1 for probability targets — the row's
    weight in the mean, as in ``softjac.linear_cross_entropy``). ``'mean'`` divides by
    ``Σ_n r_n``: ``Σ_n w[y_n]`` over the non-ignored rows (class indices) or the number of rows
    (probabilities).

    Communication: one all-gather of a few integers per rank (shapes, options, the target's
    range and a checksum: every rank raises the same error on bad input, never hangs), then
    two all-reduces — the row maxima (``M`` values) and one fused sum of ``4M`` values (the sum
    of exponentials split so that ``log Σ e`` is ``log1p`` of the sum without the maximum, the
    target's shifted logit or ⟨w y', m − z⟩, and the smoothing or ⟨w, y'⟩ sum). The backward
    needs **no communication**: ``∂loss_n/∂z = s_n (a_n σ − (target part))`` with ``a_n`` and
    ``lse_n`` saved by the forward. The caller's logits are never modified. Cost O(M·V_r) per
    rank; the saved state is the logits shard (no copy) and O(M) values.

    Args:
        logits: this rank's floating shard ``(..., V_r)`` or a DTensor sharded ``Shard(-1)`` on
            one mesh dimension (others ``Replicate`` or ``Shard`` of a batch dimension; then
            ``'mean'``/``'sum'`` also reduce over those mesh dimensions, and the result is a
            DTensor).
        target: global class indices ``(...)``, the same on every rank, or probabilities
            sharded like the logits ``(..., V_r)`` (differentiable). For DTensor logits, a
            DTensor laid out like them, or this rank's local tensor.
        group: process group of the vocabulary shards (default: the world).
        vocab_start: global index of this rank's first class (default: shard sizes in rank
            order).
        weight: the full class-weight vector ``(V,)``, replicated (treated as a constant).
        ignore_index, label_smoothing, reduction: as ``F.cross_entropy``.
        z_loss: ζ >= 0, the weight of ``lse²`` (the z-loss of PaLM).

    Returns:
        The loss in the logits' dtype: a scalar, or ``(...)`` for ``'none'`` — identical on
        every rank.
    """
    fn = "softjac.distributed.cross_entropy"
    st = _Setup(fn, logits, -1, group, vocab_start)
    tl = _local(target)
    wl = weight.full_tensor() if _is_dtensor(weight) else weight  # type: ignore[union-attr]
    kind = 0
    eps = 0.0
    zl = 0.0
    if st.error is None:
        try:
            kind, eps, zl = _check_ce(
                fn, st.local, tl, wl, ignore_index, label_smoothing, reduction, z_loss
            )
        except _LOCAL_ERRORS as exc:
            st.error = exc
    w_len = tuple(wl.shape) if isinstance(wl, torch.Tensor) else None
    shards = st.agree(
        vocab_start,
        target=tl if kind == 1 else None,
        target_kind=kind,
        ignore_index=ignore_index if isinstance(ignore_index, int) else 0,
        options=(fn, reduction, eps, ignore_index, zl, w_len),
    )
    if wl is not None and tuple(wl.shape) != (shards.total,):
        raise ValueError(
            f"`{fn}`: `weight` must have shape ({shards.total},) (one entry per class of the "
            f"global vocabulary). Got {fmt_shape(wl.shape)}."
        )
    x = st.local
    cd = as_float_dtype(x.dtype)
    z = x.to(cd)
    vl = z.shape[-1]
    z2 = z.reshape(-1, vl)
    w = None if wl is None else wl.detach()
    if kind == 1:
        t = tl.reshape(-1).long()
        rows = _ops.CrossEntropyShard.apply(
            z2, None, t, w, st.group, shards.start, shards.total, eps, ignore_index, zl
        )
        denom = _index_denominator(t, w, ignore_index, cd) if reduction == "mean" else None
    else:
        y2 = tl.reshape(-1, vl)
        rows = _ops.CrossEntropyShard.apply(
            z2, y2, None, w, st.group, shards.start, shards.total, eps, ignore_index, zl
        )
        denom = torch.tensor(float(z2.shape[0]), dtype=cd, device=z.device)
    return _reduce(st, rows, denom, reduction, x.shape[:-1], x.dtype)


def _reduce(st, rows, denom, reduction, batch_shape, dtype):
    """``'none'``: the rows in the batch shape; ``'sum'``/``'mean'``: reduced (also over the
    mesh dimensions that shard the batch of a DTensor, one all-reduce of 2 values each)."""
    if reduction == "none":
        return _wrap_rows(st, rows.reshape(batch_shape).to(dtype))
    total = rows.sum()
    if st.batch_groups:
        parts = torch.stack([total, denom if denom is not None else torch.zeros_like(total)])
        for g in st.batch_groups:
            parts = _comm.AllReduceSumIdentityBackward.apply(parts, g)
        total, denom = parts[0], parts[1]
    loss = total / denom if reduction == "mean" else total
    return _wrap_scalar(st, loss.to(dtype))


def _check_ce(
    fn, x, target, weight, ignore_index, label_smoothing, reduction, z_loss, what="logits"
):
    """Local checks of :func:`cross_entropy` (``x``: the logits shard, or anything with the
    logits shard's ``shape`` and ``device``); returns ``(target kind, ε, ζ)``."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"`{fn}`: `target` must be a torch.Tensor. Got {type(target).__name__}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`{fn}`: `reduction` must be one of {_REDUCTIONS}. Got {reduction!r}.")
    for name, val in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(val, bool) or not isinstance(val, Real):
            raise TypeError(f"`{fn}`: `{name}` must be a real number. Got {type(val).__name__}.")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"`{fn}`: `label_smoothing` must be in [0, 1]. Got {label_smoothing!r}.")
    zl = float(z_loss)
    if not (math.isfinite(zl) and zl >= 0):
        raise ValueError(f"`{fn}`: `z_loss` must be a finite number >= 0. Got {z_loss!r}.")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"`{fn}`: `ignore_index` must be an int. Got {type(ignore_index).__name__}."
        )
    if weight is not None:
        check_tensor(fn, "weight", weight)
        if weight.ndim != 1:
            raise ValueError(
                f"`{fn}`: `weight` must be the full (V,) class-weight vector. "
                f"Got shape {fmt_shape(weight.shape)}."
            )
        if weight.device != x.device:
            raise ValueError(
                f"`{fn}`: `weight` and `{what}` must be on the same device. "
                f"Got {weight.device} and {x.device}."
            )
    if target.device != x.device:
        raise ValueError(
            f"`{fn}`: `target` and `{what}` must be on the same device. "
            f"Got {target.device} and {x.device}."
        )
    if target.is_floating_point():
        if target.shape != x.shape:
            raise ValueError(
                f"`{fn}`: probability `target` must have the shape of this rank's logits "
                f"shard. Got {fmt_shape(target.shape)} and {fmt_shape(x.shape)}."
            )
        return 2, eps, zl
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"`{fn}`: `target` must hold integer class indices or floating probabilities. "
            f"Got dtype {target.dtype}."
        )
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"`{fn}`: class-index `target` must have the shape of the logits without the last "
            f"(class) dimension, i.e. {fmt_shape(x.shape[:-1])}. Got {fmt_shape(target.shape)}."
        )
    return 1, eps, zl


def _index_denominator(t, w, ignore_index, cd) -> torch.Tensor:
    """``Σ_n w[y_n]`` over the non-ignored rows (local: targets and weights are replicated)."""
    valid = t != ignore_index
    if w is None:
        return valid.sum().to(cd)
    tg = torch.where(valid, t, torch.zeros_like(t))
    return torch.where(valid, w.to(cd)[tg], torch.zeros((), dtype=cd, device=t.device)).sum()


def _wrap_rows(st: _Setup, rows: torch.Tensor) -> torch.Tensor:
    if st.dt is None:
        return rows
    from torch.distributed.tensor import DTensor, Replicate

    mesh, placements, cdim, _, x = st.dt
    pl = [Replicate() if i == cdim else p for i, p in enumerate(placements)]
    shape = x.shape[:-1]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(rows, mesh, pl, shape=shape, stride=stride)


def _wrap_scalar(st: _Setup, loss: torch.Tensor) -> torch.Tensor:
    if st.dt is None:
        return loss
    from torch.distributed.tensor import DTensor, Replicate

    mesh = st.dt[0]
    return DTensor.from_local(
        loss, mesh, [Replicate()] * mesh.ndim, shape=torch.Size(()), stride=()
    )


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Fused ``cross_entropy(input W_rᵀ + b_r)`` with the classifier's rows sharded across
    ``group``: the vocabulary-parallel language-model head, without the ``N × V_r`` logits.

    Each rank holds the same ``input`` ``(..., D)`` and its row block ``linear_weight``
    ``(V_r, D)`` (and ``linear_bias`` ``(V_r,)``) of the full ``(V, D)`` classifier; the loss
    is that of :func:`cross_entropy` on the logits ``input Wᵀ + b`` (the same loss on every
    rank, every option of it). Autograd: every rank gets the **full** gradient of ``input``
    (the shards' parts ``G W_r`` summed by one all-reduce of ``N·D`` values in the backward)
    and the gradient of its own ``linear_weight``/``linear_bias`` block.

    Method: chunks of ``chunk_size`` rows (default: as many as fit 64 MiB of logits on CPU,
    512 MiB on GPU); forward two sweeps of GEMMs (the row maxima, then the partial sums) with
    the agreement all-gather and two all-reduces in all, backward one sweep (recompute the
    chunk's logits, ``G = ∂L/∂z`` from saved per-row state, ``dW_r = Gᵀ x``, ``dX = G W_r``).
    Peak extra memory: one chunk of logits and its gradient, plus ``dX`` and ``dW_r``; the
    saved state is O(N). Half-precision inputs compute in float32. Cost per rank: five GEMMs
    of ``N·V_r·D`` multiply-adds (two forward, three backward).

    Args:
        input: ``(..., D)`` floating, replicated on the ranks of ``group`` (not checked).
        linear_weight: ``(V_r, D)``, this rank's contiguous block of classifier rows.
        target: global class indices ``(...)`` (the same on every rank) or probabilities
            ``(..., V_r)`` sharded like the classes.
        linear_bias: ``(V_r,)`` or None.
        chunk_size: rows per chunk (int >= 1) or None.
        group, vocab_start, weight, ignore_index, label_smoothing, reduction, z_loss: as
            :func:`cross_entropy`.

    Returns:
        The loss in ``input``'s dtype, identical on every rank.
    """
    fn = "softjac.distributed.linear_cross_entropy"
    for name, val in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if _is_dtensor(val):
            raise TypeError(f"`{fn}`: `{name}` must be a plain tensor (DTensor is not supported).")
    group = _comm.resolve_group(fn, group)
    err = None
    kind, eps, zl = 0, 0.0, 0.0
    shape: tuple[int, ...] = (0,)
    dtype = torch.float32
    try:
        check_tensor(fn, "input", input)
        check_tensor(fn, "linear_weight", linear_weight)
        dtype = input.dtype
        if input.ndim == 0 or linear_weight.ndim != 2 or linear_weight.shape[1] != input.shape[-1]:
            raise ValueError(
                f"`{fn}`: `input` must be (..., D) and `linear_weight` (V_r, D) with the same D. "
                f"Got {fmt_shape(input.shape)} and {fmt_shape(linear_weight.shape)}."
            )
        if linear_weight.shape[0] == 0:
            raise ValueError(
                f"`{fn}`: every shard needs at least one class; `linear_weight` has 0 rows."
            )
        shape = (*input.shape[:-1], linear_weight.shape[0])
        for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
            if t is None:
                continue
            check_tensor(fn, name, t)
            if t.dtype != input.dtype or t.device != input.device:
                raise TypeError(
                    f"`{fn}`: `{name}` must have the dtype and device of `input`. "
                    f"Got {t.dtype} on {t.device} and {input.dtype} on {input.device}."
                )
        if linear_bias is not None and linear_bias.shape != (linear_weight.shape[0],):
            raise ValueError(
                f"`{fn}`: `linear_bias` must have shape ({linear_weight.shape[0]},). "
                f"Got {fmt_shape(linear_bias.shape)}."
            )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"`{fn}`: `chunk_size` must be an int >= 1 or None. Got {chunk_size!r}."
            )
        shard_like = torch.empty(shape, device="meta")
        kind, eps, zl = _check_ce(
            fn, _ShapeOn(shard_like.shape, input.device), target, weight, ignore_index,
            label_smoothing, reduction, z_loss, what="input",
        )  # fmt: skip
    except _LOCAL_ERRORS as exc:
        err = exc
    shards = _comm.agree(
        fn,
        group,
        err,
        shape,
        dtype,
        vocab_start=vocab_start,
        target=target if kind == 1 else None,
        target_kind=kind,
        ignore_index=ignore_index if isinstance(ignore_index, int) else 0,
        options=(
            fn,
            reduction,
            eps,
            ignore_index,
            zl,
            None if weight is None else tuple(weight.shape),
        ),
    )
    if weight is not None and tuple(weight.shape) != (shards.total,):
        raise ValueError(
            f"`{fn}`: `weight` must have shape ({shards.total},) (one entry per class of the "
            f"global vocabulary). Got {fmt_shape(weight.shape)}."
        )
    cd = as_float_dtype(dtype)
    d = input.shape[-1]
    x2 = input.reshape(-1, d)
    chunk = _linear.chunk_rows(linear_weight.shape[0], cd, input.device, chunk_size)
    w = None if weight is None else weight.detach()
    t = target.reshape(-1).long() if kind == 1 else None
    y2 = target.reshape(-1, linear_weight.shape[0]) if kind == 2 else None
    rows = _linear.LinearCrossEntropyShard.apply(
        x2, linear_weight, linear_bias, y2, t, w, group, shards.start, shards.total, eps,
        ignore_index, zl, chunk,
    )  # fmt: skip
    if reduction == "mean":
        denom = (
            _index_denominator(t, w, ignore_index, cd)
            if kind == 1
            else torch.tensor(float(x2.shape[0]), dtype=cd, device=input.device)
        )
    else:
        denom = None
    st = _Plain(group)
    return _reduce(st, rows, denom, reduction, input.shape[:-1], dtype)


class _ShapeOn:
    """Shape and device of a tensor that is never built (the logits shard of the fused loss)."""

    def __init__(self, shape, device):
        self.shape = shape
        self.device = device


class _Plain:
    """The part of :class:`_Setup` that :func:`_reduce` reads, for plain tensors."""

    def __init__(self, group):
        self.group = group
        self.dt = None
        self.batch_groups = ()
