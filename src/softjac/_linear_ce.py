"""Layer 5: the fused linear + cross-entropy loss, chunked over rows so that the ``N × V``
logits never exist at once.

``loss = reduce_n ℓ_n`` with logits ``z = x Wᵀ + b`` (``x`` ``(N, D)``, ``W`` ``(V, D)``),
optionally soft-capped, ``s = c · tanh(z / c)``, and the row loss

    ``ℓ_n = Σ_c t_{n,c} (lse_n − s_{n,c}) + λ r_n lse_n²``,   ``lse_n = log Σ_c exp s_{n,c}``,

where ``t_n`` is the weighted, smoothed target of ``torch.nn.functional.cross_entropy``
(class indices: ``(1 − ε) w[y_n] e_{y_n} + (ε/V) w``, 0 for ignored rows; probabilities
``w ⊙ ((1 − ε) y_n + ε/V)``), ``λ`` the z-loss coefficient and ``r_n`` the row's weight in the
``'mean'`` divisor (``w[y_n]``, 0 for ignored rows; 1 for probability targets). Without z-loss
and softcap this is exactly ``F.cross_entropy(F.linear(x, W, b), target, ...)``.

The gradient of ``ℓ_n`` with respect to the logits is known as soon as the row's ``lse`` is:

    ``∂ℓ_n/∂z_n = ((a_n + 2 λ r_n lse_n) σ_n − t_n) ⊙ (1 − (s_n / c)²)``,   ``a_n = Σ_c t_{n,c}``,

so one sweep over row chunks computes the loss and, for a scalar reduction, the gradients
``dX = G W``, ``dW = Gᵀ X``, ``db = Σ_n G_n`` at once (``G`` one chunk of ``∂L/∂z`` at a time,
built in place in the chunk's logits buffer). The backward then only scales them by the
incoming gradient. ``reduction='none'`` (whose backward needs the per-row incoming gradients),
a second backward of the same graph, and ``create_graph=True`` recompute the sweep in the
backward; the last one with differentiable torch ops, so the loss is twice differentiable.

Memory: the saved gradients (the floor: ``dX`` + ``dW`` [+ ``db``], ``dW`` accumulated in
float32) plus one chunk buffer of ``rows × V`` float32 logits (two with softcap: the derivative
factor is kept beside them). Half-precision inputs compute in float32 (logits, lse, every
accumulator), holding a float32 copy of ``W`` for the GEMMs.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import cast

import torch
from torch import nn

from softjac._checks import as_float_dtype, check_same_shape, check_tensor, fmt_shape
from softjac._losses import (
    CrossEntropyHessian,
    _check_ignore_index_type,
    _check_reduction,
    _check_smoothing_range,
    _check_target_kind,
)
from softjac.kernels import _torch, dispatch

__all__ = [
    "LinearCrossEntropy",
    "linear_cross_entropy",
    "linear_cross_entropy_ggn_vp",
]

_FN = "softjac.linear_cross_entropy"
# Default memory budget of the chunk buffer(s), per device type.
_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
_DEFAULT_BUDGET = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


class _Opts:
    """Validated scalar options (plain Python values)."""

    def __init__(self, reduction, ignore_index, eps, z_loss, softcap, chunk, backend):
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.eps = eps
        self.z_loss = z_loss
        self.softcap = softcap  # 0.0 = off
        self.chunk = chunk
        self.backend = backend


def _real(fn: str, name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{fn}`: `{name}` must be a real number. Got {type(value).__name__}.")
    return float(value)


def _validate(
    fn, input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
    label_smoothing, z_loss, softcap, chunk_size, backend,
):  # fmt: skip
    """Check every argument; return ``(x2, target2, probs_target, batch_shape, opts)``."""
    check_tensor(fn, "input", input)
    check_tensor(fn, "linear_weight", linear_weight)
    if linear_weight.ndim != 2:
        raise ValueError(
            f"`{fn}`: `linear_weight` must have shape (V, D). Got {fmt_shape(linear_weight.shape)}."
        )
    v, d = linear_weight.shape
    if v == 0:
        raise ValueError(f"`{fn}`: `linear_weight` has V = 0 classes; cross-entropy needs V >= 1.")
    if input.ndim == 0 or input.shape[-1] != d:
        raise ValueError(
            f"`{fn}`: `input` must have shape (..., D) with D = {d} (the last dim of "
            f"`linear_weight` {fmt_shape(linear_weight.shape)}). Got {fmt_shape(input.shape)}."
        )
    tensors = {"input": input, "linear_weight": linear_weight}
    if linear_bias is not None:
        check_tensor(fn, "linear_bias", linear_bias)
        if linear_bias.shape != (v,):
            raise ValueError(
                f"`{fn}`: `linear_bias` must have shape ({v},) (one entry per class). "
                f"Got {fmt_shape(linear_bias.shape)}."
            )
        tensors["linear_bias"] = linear_bias
    if weight is not None:
        check_tensor(fn, "weight", weight)
        if weight.shape != (v,):
            raise ValueError(
                f"`{fn}`: `weight` must have shape ({v},) (one entry per class). "
                f"Got {fmt_shape(weight.shape)}."
            )
    for name, t in tensors.items():
        if t.dtype != input.dtype:
            raise TypeError(
                f"`{fn}`: `{name}` must have the dtype of `input`. Got {t.dtype} and {input.dtype}."
            )
    _check_target_kind(fn, target)
    named = {**tensors, "target": target}
    if weight is not None:
        named["weight"] = weight
    for name, t in named.items():
        if t.device != input.device:
            raise ValueError(
                f"`{fn}`: `{name}` and `input` must be on the same device. "
                f"Got {t.device} and {input.device}."
            )
    batch_shape = input.shape[:-1]
    probs_target = target.is_floating_point()
    if probs_target:
        want = (*batch_shape, v)
        if target.shape != want:
            raise ValueError(
                f"`{fn}`: probability `target` must have shape {fmt_shape(want)} (the batch "
                f"shape of `input` and V). Got {fmt_shape(target.shape)}."
            )
    elif target.shape != batch_shape:
        raise ValueError(
            f"`{fn}`: class-index `target` must have the batch shape of `input`, "
            f"{fmt_shape(batch_shape)}. Got {fmt_shape(target.shape)}."
        )
    _check_reduction(fn, reduction)
    _check_ignore_index_type(fn, ignore_index)
    eps = _real(fn, "label_smoothing", label_smoothing)
    _check_smoothing_range(fn, eps, label_smoothing)
    lam = _real(fn, "z_loss", z_loss)
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"`{fn}`: `z_loss` must be a finite number >= 0. Got {z_loss!r}.")
    cap = 0.0
    if softcap is not None:
        cap = _real(fn, "softcap", softcap)
        if not (math.isfinite(cap) and cap > 0.0):
            raise ValueError(
                f"`{fn}`: `softcap` must be a finite number > 0 (or None). Got {softcap!r}."
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`{fn}`: `chunk_size` must be an int >= 1 or None. Got {chunk_size!r}.")
    dispatch.check_backend(fn, backend)
    x2 = input.reshape(-1, d)
    t2 = target.reshape(-1, v) if probs_target else target.reshape(-1)
    if not probs_target and t2.dtype != torch.int64:
        t2 = t2.long()
    chunk = chunk_size if chunk_size is not None else _auto_chunk(x2, v, cap > 0.0)
    opts = _Opts(reduction, ignore_index, eps, lam, cap, chunk, backend)
    return x2, t2, probs_target, batch_shape, opts


def _auto_chunk(x2: torch.Tensor, v: int, softcap: bool) -> int:
    """Rows per chunk: the chunk buffer(s) (``rows × V`` in the compute dtype, two with
    softcap) within the device's budget; at least 1, at most N, a multiple of 8 when >= 8."""
    budget = _BUDGET_BYTES.get(x2.device.type, _DEFAULT_BUDGET)
    item = torch.finfo(as_float_dtype(x2.dtype)).bits // 8
    rows = max(1, budget // (v * item * (2 if softcap else 1)))
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(rows, max(x2.shape[0], 1)))


def _check_targets(fn: str, t2: torch.Tensor, v: int, ignore_index: int) -> None:
    """Class indices in [0, V) or equal to ``ignore_index`` (reads the values: a sync on GPU)."""
    if t2.numel() == 0:
        return
    bad = (t2 != ignore_index) & ((t2 < 0) | (t2 >= v))
    if bool(bad.any()):
        first = int(t2[bad][0])
        raise ValueError(
            f"`{fn}`: `target` holds class index {first}, outside [0, {v}) and not "
            f"`ignore_index` ({ignore_index})."
        )


# ---------------------------------------------------------------------------------------------
# per-row terms (from the targets only: no logits)
# ---------------------------------------------------------------------------------------------


def _row_weight(t2, probs_target, weight, ii, v, n, cd, device, fn=_FN) -> torch.Tensor:
    """``r_n``: the row's weight in the 'mean' divisor (``w[y_n]``, 0 if ignored; 1 for
    probability targets). Every path calls this first: it checks the class indices."""
    if probs_target:
        return torch.ones(n, dtype=cd, device=device)
    _check_targets(fn, t2, v, ii)
    _, _, _, w_y, _ = _torch.ce_terms(t2, weight, ii, 0.0, v, device, cd)
    return w_y


def _grad_scale(opts: _Opts, r: torch.Tensor, n: int) -> torch.Tensor:
    """The factor of every row in the reduced loss: 1 ('sum'), ``1 / Σ_n r_n`` ('mean'; 0 when
    the divisor is 0, so a batch of ignored rows gets zero gradients like PyTorch's)."""
    if opts.reduction == "sum":
        return torch.ones((), dtype=r.dtype, device=r.device)
    denom = r.sum()
    return torch.where(denom != 0, 1.0 / denom, torch.zeros_like(denom))


# ---------------------------------------------------------------------------------------------
# the chunked sweep (no autograd)
# ---------------------------------------------------------------------------------------------


def _sweep(
    x2: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    t2: torch.Tensor,
    probs_target: bool,
    cw: torch.Tensor | None,
    opts: _Opts,
    grad_rows: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
):
    """One pass over row chunks. Returns ``(loss_rows, lse, dx, dw, db)``: the row losses and
    log-sum-exps (compute dtype, ``(N,)``) and, when ``grad_rows`` (``(N,)``) is given, the
    gradients of ``Σ_n grad_rows[n] ℓ_n`` w.r.t. ``x2``, ``w`` and ``b`` (None where ``needs``
    says no). Cost O(N·V·D) time; one chunk of logits (two with softcap) in memory."""
    n, d = x2.shape
    v = w.shape[0]
    cd = as_float_dtype(x2.dtype)
    dev = x2.device
    ii, eps, lam, cap = opts.ignore_index, opts.eps, opts.z_loss, opts.softcap
    wc = w if w.dtype == cd else w.to(cd)
    bc = None if b is None else b.to(cd)
    cwc = None if cw is None else cw.to(cd)
    loss_rows = torch.empty(n, dtype=cd, device=dev)
    lse_all = torch.empty(n, dtype=cd, device=dev)
    grad = grad_rows is not None
    dx = torch.empty(n, d, dtype=x2.dtype, device=dev) if grad and needs[0] else None
    dw = torch.zeros(v, d, dtype=cd, device=dev) if grad and needs[1] else None
    db = torch.zeros(v, dtype=cd, device=dev) if grad and needs[2] and b is not None else None
    rows = max(1, min(opts.chunk, n))
    buf = torch.empty(rows, v, dtype=cd, device=dev)
    fac = torch.empty(rows, v, dtype=cd, device=dev) if cap > 0.0 else None
    # The C / Triton CE kernels handle class indices without z-loss (softcap is applied around
    # them); everything else runs torch ops in place on the chunk buffer.
    use_kernel = not probs_target and lam == 0.0 and cd != torch.float64
    chosen = "torch"
    if use_kernel:
        chosen = dispatch.resolve_backend(_FN, opts.backend, buf, "cross_entropy_forward")
    elif opts.backend != "auto":
        dispatch.resolve_backend(_FN, opts.backend, buf, "cross_entropy_forward")
    sum_w = None if cwc is None else cwc.sum()
    for s in range(0, n, rows):
        e = min(n, s + rows)
        m = e - s
        xc = x2[s:e] if x2.dtype == cd else x2[s:e].to(cd)
        z = buf[:m]
        if bc is not None:
            torch.addmm(bc, xc, wc.T, out=z)
        else:
            torch.mm(xc, wc.T, out=z)
        f = None
        if fac is not None:
            f = fac[:m]
            torch.div(z, cap, out=f).tanh_()
            torch.mul(f, cap, out=z)  # s = c tanh(z / c)
            f.square_().neg_().add_(1.0)  # ds/dz = 1 − tanh²
        tc = t2[s:e]
        gr = None if grad_rows is None else grad_rows[s:e].to(cd)
        if use_kernel:
            lr, lse = dispatch.cross_entropy_forward(z, tc, cwc, ii, eps, backend=chosen)
            loss_rows[s:e] = lr
            lse_all[s:e] = lse
            if gr is not None:
                dispatch.cross_entropy_backward(
                    z, tc, lse, gr, cwc, ii, eps, inplace=True, backend=chosen
                )
        else:
            lse = _torch_chunk(z, tc, probs_target, cwc, sum_w, ii, eps, lam, gr, loss_rows[s:e])
            lse_all[s:e] = lse
        if gr is None:
            continue
        if f is not None:
            z.mul_(f)
        if dx is not None:
            if dx.dtype == cd:
                torch.mm(z, wc, out=dx[s:e])
            else:
                dx[s:e].copy_(z @ wc)
        if dw is not None:
            dw.addmm_(z.T, xc)
        if db is not None:
            db.add_(z.sum(0))
    if dw is not None and dw.dtype != w.dtype:
        dw = dw.to(w.dtype)
    if db is not None and b is not None and db.dtype != b.dtype:
        db = db.to(b.dtype)
    return loss_rows, lse_all, dx, dw, db


def _torch_chunk(z, tc, probs_target, cw, sum_w, ii, eps, lam, gr, loss_out):
    """Row losses of one chunk into ``loss_out`` and, when ``gr`` is given, ``gr_n ∂ℓ_n/∂s_n``
    written over ``z`` (the soft-capped logits, ``(m, V)``). Returns lse ``(m,)``."""
    m, v = z.shape
    cd = z.dtype
    if probs_target:
        y = tc.to(cd)
        ty = y if cw is None else y * cw  # w ⊙ y
        a = (1.0 - eps) * ty.sum(-1)
        dot = (1.0 - eps) * torch.bmm(z.unsqueeze(1), ty.unsqueeze(2)).reshape(m)
        if eps > 0:
            a = a + (eps / v) * (v if cw is None else sum_w)
            dot = dot + (eps / v) * (z.sum(-1) if cw is None else z @ cw)
        r = torch.ones(m, dtype=cd, device=z.device)
    else:
        valid, y, wv, w_y, a = _torch.ce_terms(tc, cw, ii, eps, v, z.device, cd)
        dot = (1.0 - eps) * w_y * z.gather(1, y.unsqueeze(1)).squeeze(1)
        if eps > 0:
            dot = dot + (eps / v) * (z.sum(-1) if cw is None else z @ wv) * valid
        r = w_y
    mx = z.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    z.sub_(mx).exp_()
    se = z.sum(-1, keepdim=True)
    lse = (mx + se.log()).squeeze(1)
    rows = a * lse - dot
    if lam > 0:
        rows = rows + lam * r * lse * lse
    loss_out.copy_(rows)
    if gr is None:
        return lse
    z.div_(se)  # σ
    coef = a if lam == 0 else a + 2.0 * lam * r * lse
    z.mul_((gr * coef).unsqueeze(1))
    if probs_target:
        z.addcmul_(ty, gr.unsqueeze(1), value=-(1.0 - eps))
        if eps > 0:
            wrow = torch.ones(v, dtype=cd, device=z.device) if cw is None else cw
            z.addr_(gr, wrow, alpha=-eps / v)
    else:
        z.scatter_add_(1, y.unsqueeze(1), (-(1.0 - eps) * w_y * gr).unsqueeze(1))
        if eps > 0:
            z.addr_(gr * valid, wv, alpha=-eps / v)
    return lse


def _sweep_differentiable(x2, w, b, t2, probs_target, cw, opts, grad_rows):
    """The gradients of ``Σ_n grad_rows[n] ℓ_n`` w.r.t. ``(x2, w, b)`` built from
    differentiable torch ops chunk by chunk (for ``create_graph=True``): the result is itself
    differentiable in ``x2``, ``w``, ``b`` and ``grad_rows``. Memory: autograd keeps each
    chunk's intermediates, O(N·V) in all."""
    n, d = x2.shape
    v = w.shape[0]
    cd = as_float_dtype(x2.dtype)
    ii, eps, lam, cap = opts.ignore_index, opts.eps, opts.z_loss, opts.softcap
    wc, bc = w.to(cd), None if b is None else b.to(cd)
    cwc = None if cw is None else cw.to(cd)
    rows = max(1, min(opts.chunk, n))
    dxs, dw, db = [], None, None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        xc = x2[s:e].to(cd)
        z = xc @ wc.T if bc is None else torch.addmm(bc, xc, wc.T)
        if cap > 0:
            th = torch.tanh(z / cap)
            z = cap * th
        lse = torch.logsumexp(z, -1)
        p = torch.exp(z - lse.unsqueeze(1))
        tc = t2[s:e]
        if probs_target:
            y = tc.to(cd)
            y = (1.0 - eps) * y + eps / v
            t = y if cwc is None else y * cwc
            a = t.sum(-1)
            r = torch.ones_like(a)
        else:
            valid, yy, wv, w_y, a = _torch.ce_terms(tc, cwc, ii, eps, v, z.device, cd)
            t = torch.zeros_like(p).scatter(1, yy.unsqueeze(1), ((1.0 - eps) * w_y).unsqueeze(1))
            if eps > 0:
                t = t + (eps / v) * wv * valid.unsqueeze(1)
            r = w_y
        coef = a + 2.0 * lam * r * lse if lam > 0 else a
        g = (coef.unsqueeze(1) * p - t) * grad_rows[s:e].to(cd).unsqueeze(1)
        if cap > 0:
            g = g * (1.0 - th * th)
        dxs.append(g @ wc)
        gw = g.T @ xc
        dw = gw if dw is None else dw + gw
        if b is not None:
            gb = g.sum(0)
            db = gb if db is None else db + gb
    dx = torch.cat(dxs) if dxs else x2.new_zeros(0, d, dtype=cd)
    if dw is None:
        dw = torch.zeros(v, d, dtype=cd, device=x2.device)
    if b is not None and db is None:
        db = torch.zeros(v, dtype=cd, device=x2.device)
    return (
        dx.to(x2.dtype),
        dw.to(w.dtype),
        None if db is None else db.to(b.dtype),
    )


def _reduce_rows(opts: _Opts, loss_rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if opts.reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if opts.reduction == "sum":
        return total
    denom_is_zero = scale == 0  # 'mean' over no (weighted) rows: 0/0 = NaN, like PyTorch
    return torch.where(denom_is_zero, total / torch.zeros_like(total), total * scale)


# ---------------------------------------------------------------------------------------------
# autograd (eager)
# ---------------------------------------------------------------------------------------------


class _LinearCE(torch.autograd.Function):
    """``(x2, W, b) ↦ (loss, lse)``; see the module doc for forward/backward."""

    @staticmethod
    def forward(ctx, x2, w, b, t2, cw, probs_target, opts, precompute):
        n = x2.shape[0]
        cd = as_float_dtype(x2.dtype)
        r = _row_weight(t2, probs_target, cw, opts.ignore_index, w.shape[0], n, cd, x2.device)
        scale = _grad_scale(opts, r, n)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        grad_rows = scale.expand(n) if precompute and opts.reduction != "none" else None
        loss_rows, lse, dx, dw, db = _sweep(x2, w, b, t2, probs_target, cw, opts, grad_rows, needs)
        ctx.save_for_backward(x2, w, b, t2, cw, scale)
        ctx.probs_target = probs_target
        ctx.opts = opts
        ctx.grads = (dx, dw, db) if grad_rows is not None else None
        ctx.mark_non_differentiable(lse)
        loss = _reduce_rows(opts, loss_rows, scale)
        return loss.to(x2.dtype), lse

    @staticmethod
    def backward(ctx, g_loss, _g_lse):
        x2, w, b, t2, cw, scale = ctx.saved_tensors
        opts = ctx.opts
        need = ctx.needs_input_grad[:3]
        n = x2.shape[0]
        if opts.reduction == "none":
            grad_rows = g_loss
        else:
            grad_rows = (g_loss.to(scale.dtype) * scale).expand(n)
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            dx, dw, db = _sweep_differentiable(x2, w, b, t2, ctx.probs_target, cw, opts, grad_rows)
        elif ctx.grads is not None:
            dx, dw, db = ctx.grads
            ctx.grads = None  # handed over (a second backward recomputes)
            g = g_loss.detach()
            for t in (dx, dw, db):
                if t is not None:
                    t.mul_(g.to(t.dtype))
        else:
            _, _, dx, dw, db = _sweep(
                x2, w, b, t2, ctx.probs_target, cw, opts, grad_rows.detach(), tuple(need)
            )
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if need[2] else None,
            None, None, None, None, None,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# custom ops (torch.compile)
# ---------------------------------------------------------------------------------------------


def _opts_from(reduction, ignore_index, label_smoothing, z_loss, softcap, chunk, backend):
    return _Opts(reduction, ignore_index, label_smoothing, z_loss, softcap, chunk, backend)


@torch.library.custom_op("softjac::linear_cross_entropy", mutates_args=())
def _op_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    backend: str,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, dx, dw, db)`` for 2-D ``input``: the reduced loss (or the rows for
    'none'), the row log-sum-exps and, for 'mean'/'sum' and the flags set, the gradients of
    the loss (empty tensors otherwise)."""
    opts = _opts_from(
        reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend
    )
    probs_target = target.is_floating_point()
    n = input.shape[0]
    cd = as_float_dtype(input.dtype)
    r = _row_weight(
        target, probs_target, weight, ignore_index, linear_weight.shape[0], n, cd, input.device
    )
    scale = _grad_scale(opts, r, n)
    needs = (grad_input, grad_weight, grad_bias and linear_bias is not None)
    grad_rows = scale.expand(n) if any(needs) and reduction != "none" else None
    loss_rows, lse, dx, dw, db = _sweep(
        input, linear_weight, linear_bias, target, probs_target, weight, opts, grad_rows, needs
    )
    loss = _reduce_rows(opts, loss_rows, scale).to(input.dtype)
    return (
        loss,
        lse,
        input.new_empty(0) if dx is None else dx,
        linear_weight.new_empty(0) if dw is None else dw,
        input.new_empty(0) if db is None else db,
    )


@_op_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, reduction, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, backend, grad_input, grad_weight,
      grad_bias):  # fmt: skip
    n, d = input.shape
    v = linear_weight.shape[0]
    cd = as_float_dtype(input.dtype)
    pre = reduction != "none"
    loss = input.new_empty(() if pre else (n,))
    lse = input.new_empty((n,), dtype=cd)
    dx = input.new_empty((n, d) if pre and grad_input else (0,))
    dw = linear_weight.new_empty((v, d) if pre and grad_weight else (0,))
    has_b = pre and grad_bias and linear_bias is not None
    db = input.new_empty((v,) if has_b else (0,))
    return loss, lse, dx, dw, db


@torch.library.custom_op("softjac::linear_cross_entropy_backward", mutates_args=())
def _op_backward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    grad_loss: torch.Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients ``(dx, dw, db)`` of the loss times ``grad_loss`` by a recomputing sweep
    (``db`` empty without a bias)."""
    opts = _opts_from(
        reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend
    )
    probs_target = target.is_floating_point()
    n = input.shape[0]
    cd = as_float_dtype(input.dtype)
    if reduction == "none":
        grad_rows = grad_loss.to(cd)
    else:
        r = _row_weight(
            target, probs_target, weight, ignore_index, linear_weight.shape[0], n, cd,
            input.device,
        )  # fmt: skip
        grad_rows = (grad_loss.to(cd) * _grad_scale(opts, r, n)).expand(n)
    needs = (True, True, linear_bias is not None)
    _, _, dx, dw, db = _sweep(
        input, linear_weight, linear_bias, target, probs_target, weight, opts, grad_rows, needs
    )
    return dx, dw, input.new_empty(0) if db is None else db


@_op_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, grad_loss, reduction, ignore_index,
      label_smoothing, z_loss, softcap, chunk_size, backend):  # fmt: skip
    v = linear_weight.shape[0]
    db = input.new_empty((v,) if linear_bias is not None else (0,))
    return torch.empty_like(input), torch.empty_like(linear_weight), db


def _op_setup_context(ctx, inputs, output):
    x, w, b, t, cw, *scalars = inputs
    _, _, dx, dw, db = output
    ctx.scalars = scalars[:7]
    ctx.has_bias = b is not None
    ctx.precomputed = scalars[0] != "none"
    ctx.save_for_backward(x, w, b, t, cw, dx, dw, db)


def _op_backward_rule(ctx, g_loss, _g_lse, _gdx, _gdw, _gdb):
    x, w, b, t, cw, dx, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad
    n_x, n_w, n_b = need[0], need[1], need[2] and ctx.has_bias
    have = (not n_x or dx.numel() == x.numel()) and (not n_w or dw.numel() == w.numel())
    have = have and (not n_b or db.numel() == w.shape[0])
    if ctx.precomputed and have:
        gx = g_loss * dx if n_x else None
        gw = g_loss * dw if n_w else None
        gb = g_loss * db if n_b else None
    else:
        gx, gw, gb = _op_backward(x, w, b, t, cw, g_loss, *ctx.scalars)
        gx, gw, gb = (gx if n_x else None), (gw if n_w else None), (gb if n_b else None)
    return (gx, gw, gb) + (None,) * 12


_op_forward.register_autograd(_op_backward_rule, setup_context=_op_setup_context)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a linear layer's logits without materialising them:
    ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` computed
    chunk by chunk over rows (the signature of ``torch.nn.functional.linear_cross_entropy``
    plus z-loss, softcapping and the chunk/backend controls).

    Row loss (``s = softcap · tanh(z / softcap)`` when ``softcap`` is set, else ``s = z``,
    ``z = x Wᵀ + b``): ``ℓ_n = Σ_c t_{n,c} (lse_n − s_{n,c}) + z_loss · r_n · lse_n²`` with
    ``t_n`` the target of ``F.cross_entropy`` (class weights, label smoothing) and ``r_n`` the
    row's weight in the 'mean' divisor: ``w[y_n]`` for class indices (1 without class weights,
    0 for ignored rows, so ignored rows get no z-loss either) and 1 for probability targets.
    ``'mean'`` divides ``Σ_n ℓ_n`` by ``Σ_n r_n`` (``F.cross_entropy``'s divisor), so the
    z-loss term is averaged exactly like the cross-entropy.

    The forward pass computes the loss and, when a scalar reduction's gradient will be needed,
    the gradients too (``∂ℓ_n/∂z_n`` is ``σ − t`` up to the z-loss and softcap factors, known
    once the row's lse is); the backward scales them. ``reduction='none'``, a repeated
    backward and ``create_graph=True`` recompute the sweep (the last with differentiable ops:
    the loss is twice differentiable). Inside ``torch.compile`` the computation is the custom
    op ``torch.ops.softjac.linear_cross_entropy`` (registered fake and autograd; first order).

    Args:
        input: ``(..., D)`` floating tensor (any leading batch shape).
        linear_weight: ``(V, D)``, the dtype and device of ``input``.
        target: class indices of ``input``'s batch shape (integer dtype), or probabilities of
            shape ``(..., V)`` (floating).
        linear_bias: ``(V,)`` or None.
        weight: class weights ``(V,)`` or None (a constant: no gradient flows to it).
        reduction: ``'none' | 'mean' | 'sum'``.
        ignore_index: class index whose rows contribute neither loss nor gradient.
        label_smoothing: ε in [0, 1].
        z_loss: λ >= 0, the coefficient of ``lse²``.
        softcap: None or a finite c > 0.
        return_lse: also return the row log-sum-exps of ``s`` (batch shape, float32 for half
            inputs; not differentiable).
        chunk_size: rows per chunk; None picks it from a memory budget (64 MiB of logits on
            CPU, 512 MiB on CUDA).
        backend: the cross-entropy kernel per chunk, ``'auto' | 'torch' | 'triton' | 'cpu'``
            (the GEMMs are PyTorch's).

    Returns:
        The loss in ``input``'s dtype (scalar, or the batch shape for ``'none'``), and the lse
        with ``return_lse``.

    Cost: O(N·V·D) time (three GEMMs forward+backward for 'mean'/'sum', four for 'none'); extra
    memory the gradients (``dW`` accumulated in float32) plus one chunk of ``rows × V`` logits
    in the compute dtype (two with softcap; a float32 copy of ``W`` for half inputs).

    Raises:
        TypeError: non-tensors, non-floating or mixed dtypes, boolean/complex target.
        ValueError: shapes that do not match, mixed devices, class indices outside [0, V),
            label smoothing outside [0, 1], negative z_loss, non-finite or non-positive
            softcap, bad chunk_size, reduction or backend.
    """
    x2, t2, probs_target, batch_shape, opts = _validate(
        _FN, input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
        label_smoothing, z_loss, softcap, chunk_size, backend,
    )  # fmt: skip
    cw = None if weight is None else weight.detach()
    if torch.compiler.is_compiling():
        grads = torch.is_grad_enabled()
        loss, lse, *_ = _op_forward(
            x2, linear_weight, linear_bias, t2, cw, opts.reduction, opts.ignore_index,
            opts.eps, opts.z_loss, opts.softcap, opts.chunk, opts.backend,
            grads and input.requires_grad, grads and linear_weight.requires_grad,
            grads and linear_bias is not None and linear_bias.requires_grad,
        )  # fmt: skip
    else:
        tensors = (input, linear_weight) + (() if linear_bias is None else (linear_bias,))
        precompute = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        loss, lse = _LinearCE.apply(
            x2, linear_weight, linear_bias, t2, cw, probs_target, opts, precompute
        )
    if opts.reduction == "none":
        loss = loss.reshape(batch_shape)
    if return_lse:
        return loss, lse.reshape(batch_shape)
    return loss


def linear_cross_entropy_ggn_vp(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    v_input: torch.Tensor,
    v_weight: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gauss–Newton-vector product ``Gv = Jᵀ H J v`` of :func:`linear_cross_entropy` with
    respect to ``(input, linear_weight[, linear_bias])``, chunk by chunk, never holding the
    ``N × V`` logits.

    ``J`` is the Jacobian of the (soft-capped) logits ``s(x, W, b)``, so ``J v`` per row is
    ``u_n = (v_x,n Wᵀ + x_n v_Wᵀ + v_b) ⊙ (1 − (s_n/c)²)``; ``H`` is the Hessian of the loss
    with respect to ``s``, block diagonal: ``H_n = k_n ((a_n + 2λ r_n lse_n) J_n
    + 2λ r_n σ_nσ_nᵀ)`` with ``J_n = diag(σ_n) − σ_nσ_nᵀ`` (the cross-entropy Hessian,
    :class:`softjac.CrossEntropyHessian` with ``c_n = k_n a_n`` when ``z_loss = 0``) and ``k_n``
    the reduction factor (1, or ``1/Σ r`` for 'mean'; 'none' gives the product for
    ``Σ_n ℓ_n``). Then ``Jᵀ`` maps ``w_n = (H_n u_n) ⊙ (1 − (s_n/c)²)`` back:
    ``(w W, wᵀ x, Σ_n w_n)``.

    Same options and errors as :func:`linear_cross_entropy`; ``v_input``, ``v_weight`` and
    ``v_bias`` have the shapes of ``input``, ``linear_weight`` and ``linear_bias``
    (``v_bias`` None = 0). Returns ``(Gv_input, Gv_weight)``, plus ``Gv_bias`` when
    ``linear_bias`` is given, in the inputs' dtype (float32 math for half inputs). Cost
    O(N·V·D) time (four GEMMs), memory one chunk of logits plus the results. Not
    differentiable.
    """
    fn = "softjac.linear_cross_entropy_ggn_vp"
    x2, t2, probs_target, _, opts = _validate(
        fn, input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
        label_smoothing, z_loss, softcap, chunk_size, "auto",
    )  # fmt: skip
    pairs = [("v_input", v_input, "input", input), ("v_weight", v_weight, "linear_weight",
             linear_weight)]  # fmt: skip
    if v_bias is not None:
        if linear_bias is None:
            raise ValueError(f"`{fn}`: `v_bias` needs a `linear_bias`.")
        pairs.append(("v_bias", v_bias, "linear_bias", linear_bias))
    for name, t, ref_name, ref in pairs:
        check_same_shape(fn, name, t, ref_name, ref)
    with torch.no_grad():
        return _ggn_sweep(
            x2, linear_weight, linear_bias, t2, probs_target, weight, opts,
            v_input.reshape(x2.shape), v_weight, v_bias, input.shape,
        )  # fmt: skip


def _ggn_sweep(x2, w, b, t2, probs_target, cw, opts, vx, vw, vb, vx_shape):
    n, d = x2.shape
    v = w.shape[0]
    cd = as_float_dtype(x2.dtype)
    dev = x2.device
    ii, eps, lam, cap = opts.ignore_index, opts.eps, opts.z_loss, opts.softcap
    wc, vwc = w.to(cd), vw.to(cd)
    bc = None if b is None else b.to(cd)
    cwc = None if cw is None else cw.detach().to(cd)
    fn = "softjac.linear_cross_entropy_ggn_vp"
    r_all = _row_weight(t2, probs_target, cwc, ii, v, n, cd, dev, fn)
    k = _grad_scale(opts, r_all, n) if opts.reduction == "mean" else torch.ones((), dtype=cd)
    out_x = torch.empty(n, d, dtype=cd, device=dev)
    out_w = torch.zeros(v, d, dtype=cd, device=dev)
    out_b = torch.zeros(v, dtype=cd, device=dev) if b is not None else None
    rows = max(1, min(opts.chunk, n))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        xc, vxc = x2[s:e].to(cd), vx[s:e].to(cd)
        z = xc @ wc.T if bc is None else torch.addmm(bc, xc, wc.T)
        u = vxc @ wc.T
        u.addmm_(xc, vwc.T)
        if vb is not None:
            u.add_(vb.to(cd))
        fac = None
        if cap > 0:
            th = torch.tanh(z / cap)
            z = th * cap
            fac = 1.0 - th * th
            u.mul_(fac)
        lse = torch.logsumexp(z, -1)
        p = torch.exp(z.sub_(lse.unsqueeze(1)))
        tc = t2[s:e]
        if probs_target:
            y = tc.to(cd)
            y = (1.0 - eps) * y + eps / v
            a = (y if cwc is None else y * cwc).sum(-1)
            r = torch.ones_like(a)
        else:
            _, _, _, r, a = _torch.ce_terms(tc, cwc, ii, eps, v, dev, cd)
        coef = (a + 2.0 * lam * r * lse) * k if lam > 0 else a * k
        hu = CrossEntropyHessian(p, coef).matmul(u)
        if lam > 0:
            pu = (p * u).sum(-1)
            hu.add_(p * (2.0 * lam * k * r * pu).unsqueeze(1))
        if fac is not None:
            hu.mul_(fac)
        torch.mm(hu, wc, out=out_x[s:e])
        out_w.addmm_(hu.T, xc)
        if out_b is not None:
            out_b.add_(hu.sum(0))
    res = [out_x.to(x2.dtype).reshape(vx_shape), out_w.to(w.dtype)]
    if out_b is not None:
        res.append(out_b.to(b.dtype))
    return tuple(res)


class LinearCrossEntropy(nn.Module):
    """A classifier layer and its cross-entropy in one module: holds ``weight`` ``(V, D)``
    (and ``bias`` ``(V,)``) like ``nn.Linear(in_features, num_classes)`` and returns
    :func:`linear_cross_entropy` of ``forward(input, target)``, never materialising the logits.

    To tie the classifier to an embedding, assign the parameter: ``module.weight =
    embedding.weight``. Class weights (``class_weight``) are a buffer. The other keyword
    arguments are fixed at construction and passed through unchanged; :meth:`logits` gives the
    (soft-capped) logits for inference.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        bias: bool = False,
        *,
        class_weight: torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        lin = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = lin.weight
        self.bias = lin.bias
        self.register_buffer("class_weight", class_weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``input`` ``(..., D)`` against ``target``; see
        :func:`linear_cross_entropy`."""
        out = linear_cross_entropy(
            input, self.weight, target, linear_bias=self.bias,
            weight=cast("torch.Tensor | None", self.class_weight), reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
            backend=self.backend,
        )  # fmt: skip
        return cast(torch.Tensor, out)  # return_lse is off

    def logits(self, input: torch.Tensor) -> torch.Tensor:
        """The full logits ``(..., V)`` (soft-capped when ``softcap`` is set): O(N·V) memory."""
        z = nn.functional.linear(input, self.weight, self.bias)
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"bias={self.bias is not None}, reduction={self.reduction!r}"
        )
