"""Multi-process tests of ``softjac.distributed`` (gloo on localhost, CPU).

One ``torch.multiprocessing`` spawn of 4 processes runs every case (spawning is what costs);
the group sizes 1, 2, 3 and 4 are process groups of ranks ``0..n-1`` (plus the non-contiguous
group ``{1, 3}``), and the DTensor cases use 1-D and 2-D meshes of the 4 processes. Each rank
builds the same full logits from a seed, takes its shard, runs the distributed function and
compares its shard of the result with the single-device softjac function on the full logits
(float64: a few units in the last place of the entry's scale; float32: the single-device
tolerances of ``tests/test_losses.py``). Each case records its outcome per rank; the pytest
side asserts every rank's outcome. Collectives are counted with
``torch.distributed.tensor.debug.CommDebugMode``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

WORLD = 4
JOIN_TIMEOUT_S = float(os.environ.get("SOFTJAC_DIST_TIMEOUT", "240"))
EPS64 = torch.finfo(torch.float64).eps

CASES: dict = {}


def case(group: object):
    """Register a case run on ``group``: an int n (ranks 0..n-1), a tuple of ranks, or
    ``"world"`` (all 4, the default group)."""

    def deco(fn):
        CASES[fn.__name__] = (group, fn)
        return fn

    return deco


# ----------------------------------------------------------------------------------------
# helpers used inside the workers


def sizes_for(v: int, w: int) -> list[int]:
    """Contiguous shards in rank order; the first ``v % w`` ranks get one more class."""
    return [v // w + (1 if r < v % w else 0) for r in range(w)]


def full_logits(seed, shape, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


FAILS: list[str] = []


def expect(cond: bool, message) -> None:
    """A soft assertion: recorded, raised at the end of the case (so that a failing rank
    still takes part in the case's remaining collectives and the others do not stall)."""
    if not cond:
        FAILS.append(str(message))


def check_ulps(name, got, ref, scale, n_ulp=4.0, eps=EPS64):
    """``|got − ref| <= n_ulp · eps · scale`` entry-wise (``scale`` the entry's magnitude)."""
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape:
        FAILS.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    err = (got - ref).abs()
    bound = n_ulp * eps * scale.double()
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        FAILS.append(
            f"{name}: {int(bad.sum())} entries beyond {n_ulp} ulp of their scale; first at {i}: "
            f"got {got[tuple(i)].item()!r}, ref {ref[tuple(i)].item()!r}, "
            f"scale {scale[tuple(i)].item()!r}"
        )


def ce_row_scale(z, target, weight, eps, zl):
    """Per-row sum of the magnitudes of the terms of the loss, ``(...)``: the scale of the
    rounding error of the float64 reference itself (it forms ``lse − z_c`` with
    ``|lse| + |z_c|`` in play). Class indices: ``(1 − ε) w_y (|lse| + |z_y|) + (ε/V) Σ_c w_c
    (|lse| + |z_c|)``; probabilities: ``Σ_c w_c y'_c (|lse| + |z_c|)``; plus ``ζ lse²``."""
    v = z.shape[-1]
    full_lse = torch.logsumexp(z, -1)
    z = z - z.amax(-1, keepdim=True)
    lse = torch.logsumexp(z, -1)
    w = torch.ones(v, dtype=z.dtype) if weight is None else weight
    mag = lse.abs().unsqueeze(-1) + z.abs()
    if target.is_floating_point():
        s = (w * ((1 - eps) * target + eps / v) * mag).sum(-1)
        return s + zl * full_lse * full_lse
    valid = target != -100
    tg = torch.where(valid, target, 0)
    s = (1 - eps) * w[tg] * mag.gather(-1, tg.unsqueeze(-1)).squeeze(-1)
    s = s + eps / v * (w * mag).sum(-1) + zl * w[tg] * full_lse * full_lse
    return torch.where(valid, s, torch.zeros_like(s))


def grad_row_scale(z, target, kw, probs):
    """``s_n (a_n + max_c |t_{n,c}|)``: the size of the terms of each row's gradient
    ``s_n (a_n σ − t_n)`` (``s_n`` the reduction's scale, ``a_n`` the coefficient of σ, ``t``
    the target part)."""
    v = z.shape[-1]
    eps, zl = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
    w = kw.get("weight")
    w = torch.ones(v, dtype=z.dtype) if w is None else w
    lse = torch.logsumexp(z, -1).abs()
    if probs:
        wy = w * ((1 - eps) * target + eps / v)
        a = wy.sum(-1) + 2 * zl * lse
        t = wy.amax(-1)
    else:
        valid = target != -100
        wy = torch.where(valid, w[torch.where(valid, target, 0)], 0)
        a = ((1 - eps) * wy + eps / v * w.sum() + 2 * zl * wy * lse) * valid
        t = ((1 - eps) * wy + eps / v * w.amax()) * valid
    red = kw.get("reduction", "mean")
    s = 1.0 / _mean_den(target, kw, probs) if red == "mean" else 1.0
    return s * (a + t)


@contextlib.contextmanager
def comms():
    """``with comms() as counts:`` fills ``counts`` with ``{collective: number}`` issued in the
    block (``torch.distributed.tensor.debug.CommDebugMode``)."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts: dict = {}
    with CommDebugMode() as mode:
        yield counts
    for k, v in mode.get_comm_counts().items():
        counts[str(getattr(k, "_qualified_op_name", k))] = v


def n_allreduce(counts):
    return sum(v for k, v in counts.items() if "allreduce" in k)


def n_allgather(counts):
    return sum(v for k, v in counts.items() if "allgather" in k)


def reference_ce(
    z, target, *, weight=None, label_smoothing=0.0, reduction="mean", z_loss=0.0, ignore_index=-100
):
    """Single-device ``softjac.cross_entropy`` on the gathered logits (classes last), plus the
    z-loss term ``ζ w[y_n] lse²`` (0 on ignored rows; divided like the loss under 'mean')."""
    import softjac

    v = z.shape[-1]
    m = z.detach().amax(-1, keepdim=True)
    z2 = (z - m).reshape(-1, v)  # shift invariance: errors relative to the spread
    probs = target.is_floating_point()
    t2 = target.reshape(-1, v) if probs else target.reshape(-1)
    rows = softjac.cross_entropy(
        z2,
        t2,
        weight=weight,
        label_smoothing=label_smoothing,
        reduction="none",
        ignore_index=ignore_index,
    )
    if z_loss:
        lse = m.reshape(-1) + torch.logsumexp(z2, -1)
        zt = z_loss * lse * lse
        if not probs:  # weighted like the row: w[y_n] ζ lse², 0 on ignored rows
            valid = t2 != ignore_index
            w = torch.ones(v, dtype=z.dtype) if weight is None else weight
            zt = torch.where(valid, zt * w[torch.where(valid, t2, 0)], torch.zeros_like(zt))
        rows = rows + zt
    if reduction == "none":
        return rows.reshape(z.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if probs:
        return rows.sum() / rows.shape[0]
    valid = t2 != ignore_index
    w = torch.ones(v, dtype=z.dtype) if weight is None else weight
    return rows.sum() / torch.where(valid, w[torch.where(valid, t2, 0)], 0).sum()


# ----------------------------------------------------------------------------------------
# cases (each gets (group, rank, world) and returns a JSON-able note or None)

CE_OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.25},
    {"reduction": "sum", "label_smoothing": 0.1},
    {"reduction": "none", "weight": True, "z_loss": 1e-3},
    {"z_loss": 1e-2, "label_smoothing": 0.05},
    {"z_loss": 1e-2, "weight": True, "label_smoothing": 0.1},
]


def _ce_against_reference(
    group, rank, world, *, v=11, batch=(3, 4), probs=False, scale=1.0, seed=0, layout=None
):
    import softjac.distributed as sd

    layout = layout or _rank_order(sizes_for(v, world))
    start, n_loc = layout[rank]
    vocab_start = None if layout == _rank_order([sz for _, sz in layout]) else start
    z = full_logits(seed, (*batch, v), scale)
    g = torch.Generator().manual_seed(seed + 1)
    weight_full = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    if probs:
        target = torch.softmax(torch.randn((*batch, v), generator=g, dtype=torch.float64), -1)
    else:
        target = torch.randint(0, v, batch, generator=g)
        target.view(-1)[::5] = -100
        # the target is the argmax in some rows: the loss there is tiny for scale 1000
        amax = z.argmax(-1)
        target.view(-1)[1::3] = amax.view(-1)[1::3]
    for opts in CE_OPTIONS:
        kw = dict(opts)
        if kw.pop("weight", False):
            kw["weight"] = weight_full
        zl = z.narrow(-1, start, n_loc).clone().requires_grad_()
        zl_before = zl.detach().clone()
        tl = target.narrow(-1, start, n_loc).clone() if probs else target
        with comms() as counts:
            loss = sd.cross_entropy(zl, tl, group=group, vocab_start=vocab_start, **kw)
        expect(n_allreduce(counts) == 2 and n_allgather(counts) == 1, counts)
        zr = z.clone().requires_grad_()
        ref = reference_ce(zr, target, **kw)
        # loss: within 4 ulp of the scale of its terms (reduced like the loss)
        rs = ce_row_scale(
            z, target, kw.get("weight"), kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
        )
        red = kw.get("reduction", "mean")
        scale = (
            rs
            if red == "none"
            else rs.sum() / (_mean_den(target, kw, probs) if red == "mean" else 1.0)
        )
        check_ulps(f"loss {opts}", loss.detach(), ref.detach(), scale + 1e-300)
        losses = [torch.zeros_like(loss) for _ in range(world)]
        torch.distributed.all_gather(losses, loss.detach(), group=group)
        expect(all(torch.equal(o, loss.detach()) for o in losses), ("loss differs", losses))
        # backward: no communication for class indices; probability targets: none either
        with comms() as bcounts:
            loss.sum().backward()
        expect(sum(bcounts.values()) == 0, ("backward communicates", bcounts))
        ref.sum().backward()
        gref = zr.grad.narrow(-1, start, n_loc)
        # gradient a_n σ − t: within 4 ulp of the row's terms (the reference's own rounding)
        gscale = grad_row_scale(z, target, kw, probs).unsqueeze(-1).expand_as(gref) + 1e-300
        check_ulps(f"grad {opts}", zl.grad, gref, gscale)
        expect(torch.equal(zl.detach(), zl_before), "the caller's logits were modified")


def _mean_den(target, kw, probs):
    if probs:
        return target.reshape(-1, target.shape[-1]).shape[0]
    t = target.reshape(-1)
    valid = t != -100
    w = kw.get("weight")
    if w is None:
        return float(valid.sum())
    return float(torch.where(valid, w[torch.where(valid, t, 0)], 0).sum())


for _n in (1, 2, 3, 4):

    def _make(n):
        def ce_index(group, rank, world):
            _ce_against_reference(group, rank, world, v=11, scale=1.0, seed=n)
            _ce_against_reference(group, rank, world, v=11, scale=1000.0, seed=10 + n)

        def ce_probs(group, rank, world):
            _ce_against_reference(group, rank, world, v=10, probs=True, scale=1.0, seed=20 + n)
            _ce_against_reference(group, rank, world, v=10, probs=True, scale=1000.0, seed=30 + n)

        def family(group, rank, world):
            _softmax_family(group, rank, world, v=11, scale=1.0, seed=90 + n)
            _softmax_family(group, rank, world, v=11, scale=1000.0, seed=95 + n)

        def linear(group, rank, world):
            _linear_ce(group, rank, world, seed=100 + n)
            if n == 2:
                _linear_ce(group, rank, world, seed=110, dtype=torch.float32)

        linear.__name__ = f"linear_ce_w{n}"
        case(n)(linear)
        family.__name__ = f"softmax_vjp_w{n}"
        case(n)(family)
        ce_index.__name__ = f"ce_index_w{n}"
        ce_probs.__name__ = f"ce_probs_w{n}"
        case(n)(ce_index)
        case(n)(ce_probs)

    _make(_n)


def _softmax_family(group, rank, world, *, v, scale, seed, layout=None):
    """softmax / log_softmax (values and backward) and vjp on a 3-D input with the classes at
    dim 1, against the single-device functions on the full tensor."""
    import softjac
    import softjac.distributed as sd

    layout = layout or _rank_order(sizes_for(v, world))
    start, n = layout[rank]
    vs = None if layout == _rank_order([sz for _, sz in layout]) else start
    z = full_logits(seed, (2, v, 3), scale)
    g = torch.Generator().manual_seed(seed + 7)
    cot = torch.randn((2, v, 3), generator=g, dtype=torch.float64)
    zl = z.narrow(1, start, n).clone().requires_grad_()
    gl = cot.narrow(1, start, n)
    # softmax: entries within 4 ulp of themselves
    with comms() as c_f:
        p = sd.softmax(zl, dim=1, group=group, vocab_start=vs)
    expect(n_allreduce(c_f) == 2 and n_allgather(c_f) == 1, ("softmax forward", c_f))
    zr = z.clone().requires_grad_()
    pr = softjac.softmax(zr, dim=1)
    check_ulps(
        "softmax", p.detach(), pr.detach().narrow(1, start, n), pr.detach().narrow(1, start, n)
    )
    with comms() as c_b:
        p.backward(gl)
    expect(n_allreduce(c_b) == 1 and len(c_b) == 1, ("softmax backward", c_b))
    pr.backward(cot)
    sig = pr.detach()
    check_ulps(
        "softmax grad",
        zl.grad,
        zr.grad.narrow(1, start, n),
        _vjp_scale(sig, cot).narrow(1, start, n),
    )
    # log_softmax: the reference on the shifted logits; scale |z − m| + log S
    zl.grad = None
    lp = sd.log_softmax(zl, dim=1, group=group, vocab_start=vs)
    zs = z - z.amax(1, keepdim=True)
    zr = zs.clone().requires_grad_()
    lr = torch.log_softmax(zr, dim=1)
    # the reference's log(fl(S)), S >= 1, is off by up to eps in absolute terms: the "+ 1"
    lscale = zs.abs() + torch.logsumexp(zs, 1, keepdim=True).abs() + 1
    check_ulps(
        "log_softmax", lp.detach(), lr.detach().narrow(1, start, n), lscale.narrow(1, start, n)
    )
    with comms() as c_b:
        lp.backward(gl)
    expect(n_allreduce(c_b) == 1 and len(c_b) == 1, ("log_softmax backward", c_b))
    lr.backward(cot)
    lgs = cot.abs() + sig * cot.abs().sum(1, keepdim=True)
    check_ulps("log_softmax grad", zl.grad, zr.grad.narrow(1, start, n), lgs.narrow(1, start, n))
    # vjp from logits: the argmax entry to 4 ulp of its own (small) scale
    with comms() as c_v:
        out = sd.vjp(zl.detach(), gl, dim=1, group=group, vocab_start=vs)
    expect(n_allreduce(c_v) == 2 and n_allgather(c_v) == 1, ("vjp", c_v))
    ref = softjac.vjp(z, cot, dim=1, backend="torch")
    check_ulps("vjp", out, ref.narrow(1, start, n), _vjp_scale(sig, cot).narrow(1, start, n))


def _rank_order(sizes):
    return [(sum(sizes[:r]), sizes[r]) for r in range(len(sizes))]


def _vjp_scale(sig, v, dim=1):
    """``σ_i (|v_i| + Σ_j σ_j |v_j|)``, and for the argmax ``σ_{i*} Σ_{j≠i*} σ_j (|v_{i*}| +
    |v_j|)`` (the size of the terms single-device ``softjac.vjp`` sums there)."""
    av = v.abs()
    gen = sig * (av + (sig * av).sum(dim, keepdim=True))
    k = sig.argmax(dim, keepdim=True)
    avk = av.gather(dim, k)
    others = sig.scatter(dim, k, 0.0)
    arg = sig.gather(dim, k) * (others * (avk + av)).sum(dim, keepdim=True)
    return gen.scatter(dim, k, arg) + 1e-300


def golden(group, rank, world):
    """z = [37.42994775023705, 0] split over 2 ranks: J v for v = [1, 0] is ±σ₁σ₂, the
    correctly rounded 5.551115123125775e-17 (single-device softjac.vjp's value); the CE
    gradient for target 0 is [−σ₂, σ₂] and log σ₁ = −log1p(e^{−37.43…}), from mpmath."""
    import mpmath as mp

    import softjac
    import softjac.distributed as sd

    z = torch.tensor([[37.42994775023705, 0.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = sd.vjp(z[:, rank : rank + 1], v[:, rank : rank + 1], group=group)
    single = softjac.vjp(z, v)[:, rank : rank + 1]
    expect(single.abs().item() == 5.551115123125775e-17, single)
    expect(torch.equal(out, single), (out, single))
    with mp.workdps(50):
        s2 = 1 / (1 + mp.exp(mp.mpf(37.42994775023705)))
        logs1 = -mp.log1p(mp.exp(-mp.mpf(37.42994775023705)))
    zl = z[:, rank : rank + 1].clone().requires_grad_()
    sd.cross_entropy(zl, torch.tensor([0]), group=group).backward()
    want = [-float(s2), float(s2)][rank]
    expect(abs(zl.grad.item() - want) <= 2 * abs(want) * EPS64, (zl.grad.item(), want))
    lp = sd.log_softmax(z[:, rank : rank + 1], group=group)
    if rank == 0:
        expect(abs(lp.item() - float(logs1)) <= 2 * abs(float(logs1)) * EPS64, (lp, logs1))


case(2)(golden)


def layouts(group, rank, world):
    """Explicit ``vocab_start``: shards [8, 10), [3, 8), [0, 3) of V = 10 on ranks 0, 1, 2
    (not in rank order, uneven)."""
    layout = [(8, 2), (3, 5), (0, 3)]
    _softmax_family(group, rank, world, v=10, scale=1.0, seed=41, layout=layout)
    _ce_against_reference(group, rank, world, v=10, seed=42, layout=layout)


case(3)(layouts)


def noncontiguous_group(group, rank, world):
    """A group of global ranks {1, 3}: ranks within the group, not the world, order the shards."""
    _ce_against_reference(group, rank, world, v=9, seed=51)
    _softmax_family(group, rank, world, v=9, scale=1.0, seed=52)


case((1, 3))(noncontiguous_group)


def low_precision(group, rank, world):
    """float32 and bfloat16: within the single-device tolerances against float64 (loss relative
    1e-6 / 2e-2, gradient absolute 1e-6 / 4e-3)."""
    import softjac.distributed as sd

    v = 11
    sizes = sizes_for(v, world)
    start, n_loc = sum(sizes[:rank]), sizes[rank]
    z64 = full_logits(61, (16, v))
    g = torch.Generator().manual_seed(62)
    t = torch.randint(0, v, (16,), generator=g)
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    for dt, ltol, gtol in ((torch.float32, 1e-6, 1e-6), (torch.bfloat16, 2e-2, 4e-3)):
        zq = z64.to(dt)
        zl = zq[:, start : start + n_loc].clone().requires_grad_()
        loss = sd.cross_entropy(zl, t, group=group, weight=w.to(dt), label_smoothing=0.1)
        expect(loss.dtype == dt, loss.dtype)
        loss.backward()
        zr = zq.double().requires_grad_()
        ref = reference_ce(zr, t, weight=w.to(dt).double(), label_smoothing=0.1)
        ref.backward()
        expect(abs(loss.double().item() - ref.item()) <= ltol * abs(ref.item()), (dt, loss, ref))
        gerr = (zl.grad.double() - zr.grad[:, start : start + n_loc]).abs().max().item()
        expect(gerr <= gtol, (dt, "grad", gerr))
        p = sd.softmax(zq[:, start : start + n_loc], group=group)
        perr = (p.double() - torch.softmax(zq.double(), -1)[:, start : start + n_loc]).abs().max()
        expect(
            p.dtype == dt and perr.item() <= {torch.float32: 2e-6, torch.bfloat16: 2e-2}[dt],
            (dt, perr),
        )


case(3)(low_precision)


def _error_of(fn):
    try:
        fn()
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def bad_input(group, rank, world):
    """Inconsistent input on some ranks: every rank raises the same error (the harness checks
    the returned messages agree), nobody hangs, and the group still works afterwards."""
    import softjac.distributed as sd

    v = 10
    sizes = sizes_for(v, world)
    n = sizes[rank]
    z = full_logits(71, (4, v))[:, sum(sizes[:rank]) : sum(sizes[:rank]) + n]
    t = torch.tensor([0, 3, 9, 5])
    msgs = {}
    rows = 4 if rank != 1 else 5
    msgs["batch"] = _error_of(lambda: sd.softmax(torch.zeros(rows, n), group=group))
    t_bad = t if rank != 2 else t[:3]
    msgs["target_shape"] = _error_of(lambda: sd.cross_entropy(z, t_bad, group=group))
    t_diff = t if rank != 3 else torch.tensor([1, 3, 9, 5])
    msgs["target_differs"] = _error_of(lambda: sd.cross_entropy(z, t_diff, group=group))
    msgs["target_range"] = _error_of(
        lambda: sd.cross_entropy(z, torch.tensor([0, 3, 10, 5]), group=group)
    )
    zd = z if rank != 0 else z.float()
    msgs["dtype"] = _error_of(lambda: sd.softmax(zd, group=group))
    eps = 0.1 if rank != 1 else 0.2
    msgs["options"] = _error_of(lambda: sd.cross_entropy(z, t, group=group, label_smoothing=eps))
    msgs["weight"] = _error_of(
        lambda: sd.cross_entropy(z, t, group=group, weight=torch.ones(v + 1, dtype=z.dtype))
    )
    msgs["vocab_start"] = _error_of(lambda: sd.softmax(z, group=group, vocab_start=0))
    msgs["reduction"] = _error_of(
        lambda: sd.cross_entropy(z, t, group=group, reduction="avg" if rank == 3 else "mean")
    )
    v_bad = torch.zeros_like(z) if rank != 0 else torch.zeros(4, n + 1, dtype=z.dtype)
    msgs["vjp_v"] = _error_of(lambda: sd.vjp(z, v_bad, group=group))
    for key, needle in (
        ("batch", "shard shapes"),
        ("target_shape", "class-index `target` must have the shape"),
        ("target_differs", "same on every rank"),
        ("target_range", "[0, 10)"),
        ("dtype", "dtype"),
        ("options", "options"),
        ("weight", "(10,)"),
        ("vocab_start", "tile"),
        ("reduction", "`reduction`"),
        ("vjp_v", "`v` must have the shape"),
    ):
        expect(msgs[key] is not None and needle in msgs[key], (key, msgs[key]))
        expect(msgs[key] is None or msgs[key].count("`softjac.distributed.") == 1, (key, msgs[key]))
    # every row ignored: 'mean' is 0/0 = NaN on every rank, the gradient exactly 0 (as PyTorch)
    zg = z.clone().requires_grad_()
    nan_loss = sd.cross_entropy(zg, torch.full((4,), -100), group=group)
    nan_loss.backward()
    expect(bool(nan_loss.isnan()) and bool((zg.grad == 0).all()), (nan_loss, zg.grad))
    # the group still works
    loss = sd.cross_entropy(z, t, group=group)
    ref = reference_ce(full_logits(71, (4, v)), t)
    expect(abs(loss.item() - ref.item()) <= 1e-14, (loss, ref))
    return msgs


case("world")(bad_input)


def dtensor_meshes(group, rank, world):
    """DTensor logits sharded on the classes: 1-D mesh of 4; 2-D mesh (2, 2) with the batch
    replicated or sharded, the classes on either mesh dimension; results come back as
    DTensors and equal the single-device values; 'mean' reduces over every mesh dimension."""
    from torch.distributed.tensor import (
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
        init_device_mesh,
    )

    import softjac
    import softjac.distributed as sd

    mesh2 = init_device_mesh("cpu", (2, 2))
    mesh1 = init_device_mesh("cpu", (4,))
    v = 11
    z = full_logits(81, (6, 5, v))
    g = torch.Generator().manual_seed(82)
    t = torch.randint(0, v, (6, 5), generator=g)
    t[0, :2] = -100
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    setups = [
        (mesh1, [Shard(2)], [Replicate()]),
        (mesh2, [Replicate(), Shard(2)], [Replicate(), Replicate()]),
        (mesh2, [Shard(0), Shard(2)], [Shard(0), Replicate()]),
        (mesh2, [Shard(2), Shard(1)], [Replicate(), Shard(1)]),
    ]
    for mesh, pl, tpl in setups:
        for kw in (
            {"label_smoothing": 0.1, "weight": w},
            {"reduction": "sum", "z_loss": 1e-3},
            {"reduction": "none"},
        ):
            zd = distribute_tensor(z, mesh, pl).detach().requires_grad_()
            td = distribute_tensor(t, mesh, tpl)
            with comms() as counts:
                loss = sd.cross_entropy(zd, td, **kw)
            n_batch_dims = sum(isinstance(p, Shard) and p.dim != 2 for p in pl)
            want = 2 + (n_batch_dims if kw.get("reduction", "mean") != "none" else 0)
            expect(n_allreduce(counts) == want, (pl, kw, counts))
            expect(isinstance(loss, DTensor), type(loss))
            zr = z.clone().requires_grad_()
            ref = reference_ce(zr, t, **kw)
            full = loss.full_tensor()
            rs = ce_row_scale(
                z, t, kw.get("weight"), kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
            )
            red = kw.get("reduction", "mean")
            sc = (
                rs
                if red == "none"
                else rs.sum() / (_mean_den(t, kw, False) if red == "mean" else 1)
            )
            check_ulps(f"dtensor loss {pl} {kw}", full.detach(), ref.detach(), sc + 1e-300)
            full.sum().backward() if red == "none" else loss.backward()
            ref.sum().backward()
            gs = grad_row_scale(z, t, kw, False).unsqueeze(-1).expand_as(z) + 1e-300
            check_ulps(f"dtensor grad {pl} {kw}", zd.grad.full_tensor(), zr.grad, gs)
        pd = sd.softmax(distribute_tensor(z, mesh, pl))
        expect(isinstance(pd, DTensor) and tuple(pd.placements) == tuple(pl), pd.placements)
        pf = torch.softmax(z, -1)
        check_ulps(f"dtensor softmax {pl}", pd.full_tensor(), pf, pf)
        cot = torch.randn(z.shape, generator=g, dtype=torch.float64)
        vd = sd.vjp(distribute_tensor(z, mesh, pl), distribute_tensor(cot, mesh, pl))
        check_ulps(
            f"dtensor vjp {pl}",
            vd.full_tensor(),
            softjac.vjp(z, cot, backend="torch"),
            _vjp_scale(pf, cot, -1),
        )
    msgs = {}
    for pl in (
        [Replicate(), Replicate()],
        [Shard(0), Replicate()],
        [Shard(2), Shard(2)],
        [Partial(), Shard(2)],
    ):
        bad = (
            DTensor.from_local(z, mesh2, pl, run_check=False)
            if isinstance(pl[0], Partial)
            else distribute_tensor(z, mesh2, pl)
        )
        msgs[str(pl)] = _error_of(lambda bad=bad: sd.cross_entropy(bad, t))
        expect(msgs[str(pl)] is not None and "placement" in msgs[str(pl)], (pl, msgs[str(pl)]))
    # a target of the wrong local shape on one rank only: all ranks of the mesh raise
    zd = distribute_tensor(z, mesh2, [Shard(0), Shard(2)])
    tloc = t[:3] if rank < 2 else t[3:]
    tbad = tloc if rank != 3 else tloc[:, :4]
    msgs["local target"] = _error_of(lambda: sd.cross_entropy(zd, tbad))
    expect(msgs["local target"] is not None, msgs)
    return msgs


case("world")(dtensor_meshes)


def _linear_ce(group, rank, world, *, v=11, d=5, batch=(3, 3), seed=0, dtype=torch.float64):
    """The sharded fused loss against ``reference_ce(F.linear(x, W, b), ...)`` on the full
    classifier: loss, input gradient (full, on every rank) and this rank's weight/bias block."""
    import torch.nn.functional as F

    import softjac.distributed as sd

    sizes = sizes_for(v, world)
    start, n_loc = sum(sizes[:rank]), sizes[rank]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((*batch, d), generator=g, dtype=torch.float64)
    w_full = torch.randn(v, d, generator=g, dtype=torch.float64)
    b_full = torch.randn(v, generator=g, dtype=torch.float64)
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    t = torch.randint(0, v, batch, generator=g)
    t.view(-1)[::4] = -100
    yp = torch.softmax(torch.randn((*batch, v), generator=g, dtype=torch.float64), -1)
    for probs, opts in [(False, o) for o in CE_OPTIONS] + [
        (True, CE_OPTIONS[3]),
        (True, CE_OPTIONS[5]),
    ]:
        kw = dict(opts)
        if kw.pop("weight", False):
            kw["weight"] = cw
        xl = x.to(dtype).clone().requires_grad_()
        wl = w_full[start : start + n_loc].to(dtype).clone().requires_grad_()
        bl = b_full[start : start + n_loc].to(dtype).clone().requires_grad_()
        tl = yp[..., start : start + n_loc].to(dtype) if probs else t
        with comms() as counts:
            loss = sd.linear_cross_entropy(
                xl, wl, tl, group=group, linear_bias=bl, chunk_size=4, **kw
            )
        expect(n_allreduce(counts) == 2 and n_allgather(counts) == 1, ("linear forward", counts))
        with comms() as bcounts:
            loss.sum().backward()
        expect(n_allreduce(bcounts) == 1 and len(bcounts) == 1, ("linear backward", bcounts))
        xr, wr, br = (a.clone().requires_grad_() for a in (x, w_full, b_full))
        ref = reference_ce(F.linear(xr, wr, br), yp if probs else t, **kw)
        ref.sum().backward()
        tol = 1e-12 if dtype == torch.float64 else 2e-5

        pairs = {
            "loss": (loss.detach(), ref.detach()),
            "dx": (xl.grad, xr.grad),
            "dW": (wl.grad, wr.grad[start : start + n_loc]),
            "db": (bl.grad, br.grad[start : start + n_loc]),
        }
        for name, (a, b) in pairs.items():
            err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            expect(err <= tol * (1 + b.abs().max().item()), (name, opts, probs, err))


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vocab_parallel_ce.py"


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vocab_parallel_ce", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def example(group, rank, world):
    """The README's example (``examples/vocab_parallel_ce.py``; it checks itself against
    single-device PyTorch) on 3 ranks, V = 1001 not divisible by 3."""
    return round(_load_example().run(group), 4)


case(3)(example)


def fused_matches_single_device_fused(group, rank, world):
    """The same loss as single-device ``softjac.linear_cross_entropy`` on the full classifier
    (z-loss weighted by the row weight, 'mean' over Σ w[y_n]) — checked only where that
    function exists in this tree."""
    import softjac
    import softjac.distributed as sd

    if not hasattr(softjac, "linear_cross_entropy"):
        return "single-device fused loss absent"
    v, d = 13, 4
    sizes = sizes_for(v, world)
    start, n_loc = sum(sizes[:rank]), sizes[rank]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (9,), generator=g)
    t[::4] = -100
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    for kw in ({"z_loss": 1e-2, "weight": cw, "label_smoothing": 0.1}, {"reduction": "none"}):
        mine = sd.linear_cross_entropy(x, w[start : start + n_loc], t, group=group, **kw)
        ref = softjac.linear_cross_entropy(x, w, t, **kw)
        err = (mine - ref).abs().max().item()
        expect(err <= 1e-13 * (1 + ref.abs().max().item()), (kw, err))
    return "compared"


case(2)(fused_matches_single_device_fused)


# ----------------------------------------------------------------------------------------
# the harness: one spawn, every case, outcomes per rank


def _worker(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=20)  # a stuck collective fails the case, not the run
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", timeout=timeout
    )
    groups = {n: dist.new_group(list(range(n)), timeout=timeout) for n in (1, 2, 3, 4)}
    groups[(1, 3)] = dist.new_group([1, 3], timeout=timeout)
    groups["world"] = None
    results = {}
    for name in names:
        spec, fn = CASES[name]
        members = (
            list(range(spec))
            if isinstance(spec, int)
            else list(spec)
            if isinstance(spec, tuple)
            else list(range(world))
        )
        if rank not in members:
            continue
        g = groups[spec]
        t0 = time.perf_counter()
        if os.environ.get("SOFTJAC_DIST_VERBOSE"):
            print(f"rank {rank}: {name}", file=sys.stderr, flush=True)
        FAILS.clear()
        try:
            note = fn(g, members.index(rank), len(members))
            if FAILS:
                raise AssertionError("\n".join(FAILS))
            results[name] = {"ok": True, "note": note}
        except Exception:  # record and go on: the pytest side reports it
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["s"] = round(time.perf_counter() - t0, 3)
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(names: list[str], outdir: Path, world: int = WORLD) -> dict:
    """Spawn ``world`` processes running ``names``; return ``{name: {rank: outcome}}``. The join
    is bounded: past ``JOIN_TIMEOUT_S`` the processes are killed and the run fails."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(world, _free_port(), str(outdir), names),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed cases did not finish within {JOIN_TIMEOUT_S} s")
    out: dict = {}
    for r in range(world):
        for name, res in json.loads(Path(outdir, f"rank{r}.json").read_text()).items():
            out.setdefault(name, {})[r] = res
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_cases(list(CASES), tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("name", list(CASES))
def test_case(outcomes, name):
    spec = CASES[name][0]
    n = spec if isinstance(spec, int) else len(spec) if isinstance(spec, tuple) else WORLD
    got = outcomes.get(name, {})
    assert len(got) == n, f"{name}: outcomes from {sorted(got)} only"
    errors = {r: o["error"] for r, o in got.items() if not o["ok"]}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    notes = [o["note"] for o in got.values()]
    # a case that returns a note (an error message, a value) must return the same on every rank
    assert all(x == notes[0] for x in notes), notes


# ----------------------------------------------------------------------------------------
# single-process checks (no process group)


def test_uninitialised_group_is_a_clear_error():
    import torch.distributed as dist

    import softjac.distributed as sd

    assert not dist.is_initialized()
    z = torch.randn(2, 3)
    for call in (
        lambda: sd.softmax(z),
        lambda: sd.log_softmax(z),
        lambda: sd.vjp(z, z),
        lambda: sd.cross_entropy(z, torch.tensor([0, 1])),
    ):
        with pytest.raises(
            RuntimeError,
            match=r"`softjac\.distributed\.\w+`: the default process group is not initialised",
        ):
            call()


def test_import_softjac_does_not_import_distributed():
    code = "import sys, softjac; print('softjac.distributed' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_example_runs_under_torchrun():
    """``torchrun --nproc-per-node 2 examples/vocab_parallel_ce.py`` as the README shows it."""
    import subprocess

    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), str(EXAMPLE),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gradients match" in out.stdout
