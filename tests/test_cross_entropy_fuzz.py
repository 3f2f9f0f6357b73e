"""Fuzzing ``softjac.cross_entropy`` (hypothesis, the deterministic CI profile of conftest.py):
random logits with NaN, ±inf and large offsets, odd strides and layouts, every dtype, every
backend ("triton" under the Triton interpreter at tiny sizes), random options. Every draw
must give one of: agreement with ``torch.nn.functional.cross_entropy`` in float64 on the same
(rounded) inputs, including its NaN and infinity pattern (the one stated difference: an
ignored row's gradient is exactly 0), or a softjac ``IndexError`` for an out-of-range target.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import softjac
from tests.test_cross_entropy_contract import BACKENDS, triton_interpreted

F64 = torch.float64
DTYPES = [torch.float32, F64, torch.bfloat16, torch.float16]
SPECIALS = [float("nan"), float("inf"), float("-inf")]


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from([d for d in DTYPES if not (backend == "triton" and d == F64)]))
    tiny = backend == "triton"
    n = draw(st.integers(0, 3 if tiny else 6))
    k = draw(st.integers(1, 6 if tiny else 9))
    layout = draw(st.sampled_from(["rows", "nchw", "strided", "classes-first"]))
    spatial = draw(st.integers(1, 2 if tiny else 3))
    offset = draw(
        st.sampled_from([0.0, 30.0, -500.0, 1e3] + ([1e4] if dtype != torch.float16 else []))
    )
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    n_special = draw(st.integers(0, 3))
    probs = draw(st.booleans()) and draw(st.booleans())  # a quarter of the draws
    use_weight = draw(st.booleans())
    eps = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    ignore = draw(st.sampled_from([-100, 0, -1]))
    out_of_range = not probs and draw(st.integers(0, 9)) == 0
    return dict(
        backend=backend, dtype=dtype, n=n, k=k, layout=layout, spatial=spatial,
        offset=offset, scale=scale, seed=seed, n_special=n_special, probs=probs,
        use_weight=use_weight, eps=eps, reduction=reduction, ignore=ignore,
        out_of_range=out_of_range,
    )  # fmt: skip


def _build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    n, k, s = c["n"], c["k"], c["spatial"]
    layout = c["layout"]
    shape = {"rows": (n, k), "nchw": (n, k, s, s), "strided": (n, k), "classes-first": (k, n)}[
        layout
    ]
    d = 0 if layout == "classes-first" else 1
    base = c["offset"] + c["scale"] * torch.randn(shape, generator=gen, dtype=F64)
    flat = base.view(-1)
    for _ in range(c["n_special"] if flat.numel() else 0):
        i = int(torch.randint(0, flat.numel(), (1,), generator=gen))
        flat[i] = SPECIALS[int(torch.randint(0, 3, (1,), generator=gen))]
    z = base.to(c["dtype"])
    if layout == "strided":  # every other column of a wider tensor: odd strides
        wide = torch.zeros(n, 2 * k, dtype=c["dtype"])
        wide[:, ::2] = z
        z = wide[:, ::2]
    tshape = shape[:d] + shape[d + 1 :]
    if c["probs"]:
        t = torch.softmax(torch.randn(shape, generator=gen, dtype=F64), d).to(c["dtype"])
    else:
        t = torch.randint(0, k, tshape, generator=gen)
        if t.numel():
            t.view(-1)[0] = c["ignore"]
            if c["out_of_range"]:
                t.view(-1)[-1] = k + 3 if c["seed"] % 2 else -7
    w = None
    if c["use_weight"]:
        w = (torch.rand(k, generator=gen, dtype=F64) + 0.25).to(c["dtype"])
    return z, t, w, d


def _ref(z, t, w, d, c):
    """F.cross_entropy in float64 on the rounded inputs (classes moved to dim 1)."""
    zr = z.double().detach().requires_grad_()
    zf = zr.movedim(d, 1) if zr.ndim > 1 and d != 1 else zr
    tf = t.double().movedim(d, 1) if c["probs"] and d != 1 else (t.double() if c["probs"] else t)
    kw = dict(weight=None if w is None else w.double(), label_smoothing=c["eps"])
    if not c["probs"]:
        kw["ignore_index"] = c["ignore"]
    loss = F.cross_entropy(zf, tf, reduction=c["reduction"], **kw)
    if loss.numel() and loss.requires_grad:
        (g,) = torch.autograd.grad(loss.sum(), zr)
    else:
        g = torch.zeros_like(zr)
    return loss.detach(), g


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    """Same NaN pattern, same infinities, the finite entries within tolerance."""
    a, b = a.double(), b.double()
    if a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    a = a.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    b = b.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    if not torch.equal(a.isinf(), b.isinf()) or not torch.equal(a[a.isinf()], b[b.isinf()]):
        return False
    fin = ~b.isinf()
    return bool(((a[fin] - b[fin]).abs() <= atol + rtol * b[fin].abs()).all())


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@given(cases())
def test_cross_entropy_fuzz(c):
    if c["backend"] == "triton":
        assume(triton_interpreted())  # else triton was imported without the interpreter
    z, t, w, d = _build(c)
    kw = dict(weight=w, label_smoothing=c["eps"], reduction=c["reduction"], backend=c["backend"])
    if not c["probs"]:
        kw["ignore_index"] = c["ignore"]
    if c["out_of_range"] and t.numel():
        with pytest.raises(IndexError, match=r"`softjac\.cross_entropy`: `target` must hold"):
            softjac.cross_entropy(z, t, d, **kw)
        return
    zs = z.detach().clone().requires_grad_()
    loss = softjac.cross_entropy(zs, t, d, **kw)
    assert loss.dtype == z.dtype
    ref, gref = _ref(z, t, w, d, c)
    if loss.numel() and loss.requires_grad:
        (g,) = torch.autograd.grad(loss.sum(), zs)
    else:
        g = torch.zeros_like(zs)
    if not c["probs"]:  # the stated difference: ignored rows have a zero gradient
        ignored = (t == c["ignore"]).unsqueeze(d).expand(z.shape)
        gref = torch.where(ignored, torch.zeros((), dtype=F64), gref)

    # tolerances: the output rounding of the dtype, plus the float32 (float64) arithmetic on
    # the row's values, whose size is bounded by the offset and the spread
    out_eps = torch.finfo(z.dtype).eps
    work_eps = torch.finfo(F64 if z.dtype == F64 else torch.float32).eps
    k = z.shape[d]
    wmax = 1.0 if w is None else float(w.double().abs().max())
    n_rows = max(1, t.numel() if not c["probs"] else t.numel() // k)
    size = (abs(c["offset"]) + 8 * c["scale"] + math.log(k + 1)) * wmax
    scale = n_rows if c["reduction"] == "sum" else 1
    atol = 8 * k * work_eps * size * scale + 4 * out_eps * wmax
    assert _close(loss, ref, atol, 4 * out_eps), (c, loss, ref)
    g_atol = 8 * k * work_eps * size * wmax + 4 * out_eps * wmax
    assert _close(g, gref, g_atol, 4 * out_eps), (c, g, gref)
