"""Fuzzing as a test: hostile input at every public function and backend.

Hypothesis (the deterministic "ci" profile of conftest.py) draws shapes (empty batches, K = 1,
…), every floating dtype, odd memory layouts (transposed, strided slices, expanded, the class
dimension first), temperatures, extreme magnitudes, and one of four kinds of values:

* ``finite``: normal and extreme logits (spreads up to 1e30 in float32/float64);
* ``masked``: some −inf logits, and some slices fully masked;
* ``nan``: a NaN in some slices;
* ``posinf``: a +inf logit in some slices.

Each call must end in exactly one of:

* agreement with an independent float64 reference (torch's own functions, the dense formulas of
  ``softjac._reference``, ``F.cross_entropy`` and autograd) on every slice whose logits are
  finite or −inf, with a fully masked slice giving zeros;
* the NaN contract on the other slices: a slice holding NaN or +inf gives NaN in all its outputs
  (a reduction over such a slice gives NaN), as ``torch.softmax`` does;
* a clear softjac error (a ``TypeError``/``ValueError``/``RuntimeError``/``IndexError`` whose
  message starts with "`softjac.") — accepted only for non-finite input, for K = 0, and for an
  explicit backend that cannot take the dtype.

Never a crash, a hang, a silently different answer or a lost dtype. Cases that fail today
because of work in progress elsewhere are listed in ``KNOWN_ISSUES``: they run as
``xfail(strict=True)``, so a fix turns them into a failure that asks for the entry's removal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import softjac
from softjac._reference import hessian_ref, jacobian_ref, softmax_ref

from .conftest import TOL

# (function, backend, kind) -> why it fails today. Every entry is an xfail(strict=True) case
# below; remove an entry when its fix lands.
KNOWN_TRITON_FLOAT64: dict[str, str] = {}
KNOWN_ISSUES: dict[tuple[str, str, str], str] = {}

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64: its own test below
KINDS = ["finite", "masked", "nan", "posinf"]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "classes_first"]
BACKENDS = ["torch", "cpu", "auto"]
INF = math.inf
# Shrinking a failure to a minimal example costs minutes on the known failures; the first
# failing example is reported as drawn (derandomised, so it reproduces).
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


# ---------------------------------------------------------------------------------------------
# drawing the input


@dataclass
class Case:
    z: torch.Tensor  # the logits as passed (odd layout), dtype under test
    z64: torch.Tensor  # the same values, float64, (B, K), classes last
    v: torch.Tensor  # a second argument in the same layout, values in [-1, 1]
    v64: torch.Tensor
    w: torch.Tensor
    w64: torch.Tensor
    dim: int
    classes_first: bool
    temperature: float
    bad: torch.Tensor  # (B,) slices holding NaN or +inf
    masked: torch.Tensor  # (B, K) entries that are −inf

    @property
    def zr(self) -> torch.Tensor:
        """``z64`` with the NaN/+inf slices zeroed: their reference values are never compared
        (the contract wants NaN there), and dense float64 linear algebra must not see them."""
        return torch.where(self.bad[:, None], torch.zeros_like(self.z64), self.z64)

    def to_canonical(self, out: torch.Tensor) -> torch.Tensor:
        """An output shaped like the input, brought to (B, K)."""
        return out.t() if self.classes_first else out


def _layout(base: torch.Tensor, layout: str) -> tuple[torch.Tensor, bool]:
    """``base`` (B, K) contiguous, laid out as drawn; returns (tensor, classes_first)."""
    b, k = base.shape
    if layout == "transposed":
        return base.t().contiguous().t(), False
    if layout == "sliced":
        wide = torch.zeros(b, 2 * k + 1, dtype=base.dtype)
        wide[:, 1::2] = base
        return wide[:, 1::2], False
    if layout == "expanded" and b > 0:
        return base[:1].expand(b, k), False
    if layout == "classes_first":
        return base.t().contiguous(), True
    return base.contiguous(), False


@st.composite
def cases(draw, kind: str, *, max_k: int = 12, dtypes=tuple(DTYPES), temperature: bool = True):
    dtype = draw(st.sampled_from(dtypes))
    b = draw(st.integers(0, 4))
    k = draw(st.integers(1, max_k))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "expanded" and kind != "finite":
        layout = "contiguous"  # expanded rows are all alike; the special slices need their own
    big = 1e4 if dtype == torch.float16 else 1e30
    scale = draw(st.sampled_from([1.0, 30.0, 1e3, big]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, k, generator=gen, dtype=torch.float64) * scale).to(dtype).double()
    if kind == "masked" and b > 0:
        drop = torch.rand(b, k, generator=gen) < 0.4
        z = torch.where(drop, torch.full_like(z, -INF), z)
        z[draw(st.integers(0, b - 1))] = -INF  # one slice fully masked
    bad = torch.zeros(b, dtype=torch.bool)
    if kind in ("nan", "posinf") and b > 0:
        rows = draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True))
        cols = [draw(st.integers(0, k - 1)) for _ in rows]
        for r, c in zip(rows, cols, strict=True):
            z[r, c] = math.nan if kind == "nan" else INF
            bad[r] = True
    v = torch.rand(b, k, generator=gen, dtype=torch.float64) * 2 - 1
    w = torch.rand(b, k, generator=gen, dtype=torch.float64) * 2 - 1
    zt, first = _layout(z.to(dtype), layout)
    vt, _ = _layout(v.to(dtype), layout)
    wt, _ = _layout(w.to(dtype), layout)
    if layout == "expanded" and b > 0:  # the reference sees what the function sees
        z, v, w = z[:1].expand(b, k), v[:1].expand(b, k), w[:1].expand(b, k)
        bad = bad[:1].expand(b)
    t = draw(st.sampled_from([1.0, 0.5, 3.0])) if temperature else 1.0
    return Case(
        z=zt,
        z64=z.clone(),
        v=vt,
        v64=v.to(dtype).double(),
        w=wt,
        w64=w.to(dtype).double(),
        dim=0 if first else 1,
        classes_first=first,
        temperature=t,
        bad=bad.clone(),
        masked=torch.isneginf(z),
    )


# ---------------------------------------------------------------------------------------------
# references (float64, classes last, batch first)


def ref_probs(c: Case) -> torch.Tensor:
    return softmax_ref(c.zr / c.temperature)


def ref_jacobian(c: Case) -> torch.Tensor:
    return jacobian_ref(c.zr / c.temperature) / c.temperature


def ref_log_softmax_jacobian(c: Case) -> torch.Tensor:
    p = ref_probs(c)
    k = p.shape[-1]
    out = (torch.eye(k, dtype=p.dtype) - p.unsqueeze(-2)) / c.temperature
    return torch.where(c.masked.unsqueeze(-1), torch.zeros_like(out), out)  # −inf rows: 0


def ref_hvp(c: Case) -> torch.Tensor:
    h = hessian_ref(c.zr / c.temperature) / c.temperature**2  # [b, i, j, k]
    return torch.einsum("bi,bijk,bk->bj", c.w64, h, c.v64)


# ---------------------------------------------------------------------------------------------
# the functions under test: (call, reference, output kind, order of the derivative)


def _vjp_from_probs_input(c: Case) -> torch.Tensor:
    p = ref_probs(c).to(c.z.dtype)
    if c.bad.any():  # the non-finite kinds carry their value into the probabilities
        p = torch.where(~torch.isfinite(c.z64) | torch.isnan(c.z64), c.z64.to(p.dtype), p)
    return (p.t().contiguous() if c.classes_first else p), p.double()


FUNCTIONS: dict[str, tuple[Callable, Callable, str, int]] = {
    "softmax": (
        lambda c, be: softjac.softmax(c.z, c.dim, temperature=c.temperature, backend=be),
        ref_probs,
        "like_input",
        0,
    ),
    "jacobian": (
        lambda c, be: softjac.jacobian(c.z, c.dim, temperature=c.temperature, backend=be),
        ref_jacobian,
        "dense",
        1,
    ),
    "log_softmax_jacobian": (
        lambda c, be: softjac.log_softmax_jacobian(c.z, c.dim, temperature=c.temperature),
        ref_log_softmax_jacobian,
        "dense",
        1,
    ),
    "hessian": (
        lambda c, be: softjac.hessian(c.z, c.dim, temperature=c.temperature),
        lambda c: hessian_ref(c.zr / c.temperature) / c.temperature**2,
        "dense",
        2,
    ),
    "vjp": (
        lambda c, be: softjac.vjp(c.z, c.v, c.dim, temperature=c.temperature, backend=be),
        lambda c: (ref_jacobian(c) @ c.v64.unsqueeze(-1)).squeeze(-1),
        "like_input",
        1,
    ),
    "jvp": (
        lambda c, be: softjac.jvp(c.z, c.v, c.dim, temperature=c.temperature, backend=be),
        lambda c: (ref_jacobian(c) @ c.v64.unsqueeze(-1)).squeeze(-1),
        "like_input",
        1,
    ),
    "vjp_from_probs": (
        lambda c, be: softjac.vjp_from_probs(_vjp_from_probs_input(c)[0], c.v, c.dim, backend=be),
        lambda c: (lambda p: p * (c.v64 - (p * c.v64).sum(-1, keepdim=True)))(
            _vjp_from_probs_input(c)[1]
        ),
        "like_input",
        1,
    ),
    "hvp": (
        lambda c, be: softjac.hvp(c.z, c.w, c.v, c.dim, temperature=c.temperature),
        ref_hvp,
        "like_input",
        2,
    ),
}
TORCH_ONLY = {"log_softmax_jacobian", "hessian", "hvp"}


def _accepted_error(exc: BaseException, c: Case, backend: str) -> bool:
    """A clear softjac error, where the contract allows one."""
    if not isinstance(exc, (TypeError, ValueError, RuntimeError, IndexError)):
        return False
    msg = str(exc)
    if not msg.startswith("`softjac."):
        return False
    if bool(c.bad.any()):  # non-finite input: NaN out or a clear error
        return True
    # an explicit backend that cannot take this dtype/device says so
    return backend in ("cpu", "triton") and f"backend '{backend}'" in msg


def _subset(c: Case, rows: torch.Tensor) -> Case:
    return Case(**{**c.__dict__, "bad": c.bad[rows], "masked": c.masked[rows]})


def check_against_reference(
    out: torch.Tensor, ref: torch.Tensor, c: Case, order: int, what: str, name: str
):
    """Finite/−inf slices agree with the reference, NaN/+inf slices are NaN throughout."""
    atol = 8 * TOL[c.z.dtype] * max(1.0, 1 / c.temperature) ** order
    if name == "vjp_from_probs" and c.bad.any() and not torch.isnan(c.z64).any():
        # a probability of +inf is no probability: its slice must come out NaN or ±inf
        assert not torch.isfinite(out.detach()[c.bad]).any(), f"{what}: finite output for NaN/+inf"
        out, ref, c = out[~c.bad], ref[~c.bad], _subset(c, ~c.bad)
    compare(out, ref, c.bad, atol, what)


def compare(out: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor, atol, what: str) -> None:
    """Slices (first dimension) not in ``bad`` agree with ``ref`` (infinities exactly, the rest
    within ``atol``, a number or a tensor broadcasting against ``ref``); ``bad`` slices are NaN."""
    assert out.shape == ref.shape, (what, tuple(out.shape), tuple(ref.shape))
    got = out.detach().double()
    atol = torch.as_tensor(atol, dtype=torch.float64)
    atol = atol.reshape(atol.shape + (1,) * (ref.ndim - atol.ndim)).expand(ref.shape)
    if bad.any():
        assert torch.isnan(got[bad]).all(), f"{what}: a slice with NaN/+inf is not all NaN"
    good = ~bad
    if good.any():
        g, r, a = got[good], ref[good], atol[good]
        # where the reference itself is NaN (a mean over no counted row, as F.cross_entropy)
        assert torch.equal(torch.isnan(g), torch.isnan(r)), (
            f"{what}: NaN where the reference has none"
        )
        inf = torch.isinf(r)
        assert torch.equal(g[inf], r[inf]), f"{what}: infinities differ"
        fin = torch.isfinite(r)
        err = (g[fin] - r[fin]).abs() - a[fin]
        assert not (err > 0).any(), f"{what}: error above tolerance by {err.max().item():.3g}"


def run_function(name: str, backend: str, c: Case) -> None:
    call, ref_fn, shape_kind, order = FUNCTIONS[name]
    what = f"softjac.{name}(backend={backend!r})"
    try:
        out = call(c, backend)
    except Exception as exc:
        if _accepted_error(exc, c, backend):
            return
        raise
    assert out.dtype == c.z.dtype, f"{what}: dtype {out.dtype} for input {c.z.dtype}"
    if shape_kind == "like_input":
        assert out.shape == c.z.shape, (what, out.shape, c.z.shape)
        out = c.to_canonical(out)
    check_against_reference(out, ref_fn(c), c, order, what, name)


def _params(functions, backends_of):
    out = []
    for name in functions:
        for backend in backends_of(name):
            for kind in KINDS:
                marks = []
                reason = KNOWN_ISSUES.get((name, backend, kind))
                if reason is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                out.append(
                    pytest.param(name, backend, kind, marks=marks, id=f"{name}-{backend}-{kind}")
                )
    return out


@pytest.mark.parametrize(
    ("name", "backend", "kind"),
    _params(FUNCTIONS, lambda n: ["torch"] if n in TORCH_ONLY else BACKENDS),
)
@settings(max_examples=6, phases=NO_SHRINK)
@given(data=st.data())
def test_functions(name, backend, kind, data):
    c = data.draw(cases(kind, max_k=6 if name == "hessian" else 12))
    run_function(name, backend, c)


@pytest.mark.parametrize("bad_value", [math.nan, INF])
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_jacobian_single_class_nan(bad_value, dtype):
    """K = 1 with a NaN/+inf logit: the slice is NaN (the argmax's ``Σ_{j≠i*} σ_j`` is empty)."""
    z = torch.tensor([[bad_value], [2.0]], dtype=dtype)
    out = softjac.log_softmax_jacobian(z)
    assert out.dtype == dtype and out.shape == (2, 1, 1)
    assert torch.isnan(out[0]).all()
    assert out[1].item() == 0.0  # one class: log σ = 0 whatever z


# ---------------------------------------------------------------------------------------------
# cross-entropy: F.cross_entropy's semantics, NaN/+inf rows, ignored rows, degenerate means

IGNORE = -100


@st.composite
def ce_cases(draw, kind: str, dtypes=tuple(DTYPES)):
    c = draw(cases(kind, temperature=False, dtypes=dtypes))
    b, k = c.z64.shape
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    target = torch.randint(0, k, (b,), generator=gen)
    if kind == "masked":  # never mask the target; mask no slice completely
        keep = torch.zeros(b, k, dtype=torch.bool)
        keep[torch.arange(b), target] = True
        z64 = torch.where(keep, c.z64.nan_to_num(neginf=0.0), c.z64)
        c.z64 = z64
        zt, _ = _layout(z64.to(c.z.dtype), "classes_first" if c.classes_first else "contiguous")
        c.z, c.masked = zt, torch.isneginf(z64)
    ignored = torch.rand(b, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    target = torch.where(ignored, torch.full_like(target, IGNORE), target)
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    smoothing = 0.0 if kind == "masked" else draw(st.sampled_from([0.0, 0.1]))
    return c, target, ignored, reduction, smoothing


def ce_reference(c: Case, target, ignored, reduction, smoothing):
    """F.cross_entropy and its autograd gradient in float64; rows the contract fixes apart:
    an ignored row counts 0 whatever its logits, a counted row with NaN/+inf is NaN."""
    z = torch.where(ignored[:, None], torch.zeros_like(c.z64), c.z64).requires_grad_()
    z_fin = torch.where(c.bad[:, None], torch.zeros_like(z), z)
    loss = F.cross_entropy(
        z_fin, target, ignore_index=IGNORE, reduction=reduction, label_smoothing=smoothing
    )
    (grad,) = torch.autograd.grad(loss.sum(), z)
    poisoned = c.bad & ~ignored
    if reduction == "none":
        loss = torch.where(poisoned, torch.full_like(loss, math.nan), loss)
    elif poisoned.any():
        loss = torch.full_like(loss, math.nan)
    grad = torch.where(poisoned[:, None], torch.full_like(grad, math.nan), grad)
    return loss.detach(), grad, poisoned


def run_cross_entropy(name: str, backend: str, case) -> None:
    c, target, ignored, reduction, smoothing = case
    what = f"softjac.{name}(backend={backend!r}, reduction={reduction!r})"
    fn = softjac.cross_entropy if name == "cross_entropy" else softjac.cross_entropy_grad
    try:
        out = fn(
            c.z,
            target,
            c.dim,
            ignore_index=IGNORE,
            reduction=reduction,
            label_smoothing=smoothing,
            backend=backend,
        )
    except Exception as exc:
        if _accepted_error(exc, c, backend):
            return
        raise
    assert out.dtype == c.z.dtype, f"{what}: dtype {out.dtype} for input {c.z.dtype}"
    loss, grad, poisoned = ce_reference(c, target, ignored, reduction, smoothing)
    big = (
        c.z64.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().amax(-1) if c.z64.numel() else None
    )
    if name == "cross_entropy":
        # the loss carries the rounding of logits of size |z|: ε·(1 + |z|) per row
        per_row = 8 * TOL[c.z.dtype] * (1 + big) if big is not None else torch.zeros(0)
        if reduction == "none":
            compare(out, loss, poisoned, per_row, what)
        else:
            tol = per_row.sum() if per_row.numel() else 0.0
            compare(out.reshape(1), loss.reshape(1), poisoned.any().reshape(1), tol, what)
    else:
        compare(c.to_canonical(out), grad, poisoned, 8 * TOL[c.z.dtype], what)


@pytest.mark.parametrize(
    ("name", "backend", "kind"),
    _params(["cross_entropy", "cross_entropy_grad"], lambda n: BACKENDS),
)
@settings(max_examples=8, phases=NO_SHRINK)
@given(data=st.data())
def test_cross_entropy(name, backend, kind, data):
    run_cross_entropy(name, backend, data.draw(ce_cases(kind)))


# ---------------------------------------------------------------------------------------------
# SoftmaxJacobian: every method against the dense float64 matrix


def _operator_checks(c: Case, damping: float):
    """(method name, call on the operator, reference, tolerance scale)."""
    j = ref_jacobian(c)
    k = j.shape[-1]
    eye = torch.eye(k, dtype=torch.float64)
    # log pdet = log |S| + Σ_{i∈S} log σ_i − (|S| − 1) log T over the support S = the finite
    # logits, with log σ from a float64 log-softmax of the logits: exact even where σ_i
    # underflows (the product of the σ_i is not formed)
    log_p = torch.log_softmax(c.zr / c.temperature, -1)
    support = torch.isfinite(c.zr)
    n = support.sum(-1)
    log_pdet = (
        torch.where(support, log_p, torch.zeros_like(log_p)).sum(-1)
        + n.double().log()
        - (n.double() - 1) * math.log(c.temperature)
    )
    log_pdet = torch.where(n > 0, log_pdet, torch.full_like(log_pdet, -INF))
    damped = j + damping * eye
    return [
        ("to_dense", lambda op: op.to_dense(), j, 1),
        ("diagonal", lambda op: op.diagonal(), torch.diagonal(j, dim1=-2, dim2=-1), 1),
        ("trace", lambda op: op.trace(), torch.diagonal(j, dim1=-2, dim2=-1).sum(-1), 1),
        ("frobenius_norm", lambda op: op.frobenius_norm(), torch.linalg.matrix_norm(j), 1),
        ("eigvalsh", lambda op: op.eigvalsh(), torch.linalg.eigvalsh(j), 1),
        ("spectral_norm", lambda op: op.spectral_norm(), torch.linalg.matrix_norm(j, 2), 1),
        ("log_pdet", lambda op: op.log_pdet(), log_pdet, 1),
        (
            "solve_damped",
            lambda op: op.solve_damped(c.v64.to(op.dtype), damping),
            torch.linalg.solve(damped, c.v64.unsqueeze(-1)).squeeze(-1),
            1 / damping**2,
        ),
        ("logdet_damped", lambda op: op.logdet_damped(damping), torch.logdet(damped), 1 / damping),
    ]


@pytest.mark.parametrize(
    ("name", "backend", "kind"), _params(["SoftmaxJacobian"], lambda n: ["torch"])
)
@settings(max_examples=8, phases=NO_SHRINK)
@given(data=st.data())
def test_softmax_jacobian_operator(name, backend, kind, data):
    c = data.draw(cases(kind, max_k=8))
    damping = data.draw(st.sampled_from([1e-2, 0.1, 1.0]))
    try:
        op = softjac.SoftmaxJacobian(c.z, dim=c.dim, temperature=c.temperature)
    except Exception as exc:
        if _accepted_error(exc, c, backend):
            return
        raise
    tol = 4 * TOL[c.z.dtype] * max(1.0, 1 / c.temperature)
    j64 = ref_jacobian(c)
    matmul = (j64 @ c.v64.unsqueeze(-1)).squeeze(-1)  # the operator takes (B, K), classes last
    compare(op @ c.v64.to(op.dtype), matmul, c.bad, tol * 10, "SoftmaxJacobian.matmul")
    for method, call, ref, scale in _operator_checks(c, damping):
        what = f"SoftmaxJacobian.{method}"
        try:
            out = call(op)
        except Exception as exc:
            if _accepted_error(exc, c, backend):
                continue
            raise
        if method == "log_pdet":  # a sum of K logarithms of size up to |z|/T
            scale = 1 + c.zr.nan_to_num(0.0, 0.0, 0.0).abs().amax(-1, keepdim=False) / c.temperature
            scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
        compare(out, ref, c.bad, tol * scale * 10, what)


# ---------------------------------------------------------------------------------------------
# huge K: the O(K) functions at K up to 1e5 (small batch), against float64 autograd of torch


HUGE = [
    "softmax",
    "vjp",
    "jvp",
    "vjp_from_probs",
    "hvp",
    "cross_entropy",
    "cross_entropy_grad",
    "SoftmaxJacobian",
]


@pytest.mark.parametrize("k", [100_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", HUGE)
def test_huge_k(name, backend, dtype, k):
    if name in ("hvp", "SoftmaxJacobian") and backend != "torch":
        pytest.skip("no backend argument")
    gen = torch.Generator().manual_seed(k)
    z64 = (torch.randn(2, k, generator=gen, dtype=torch.float64) * 10).to(dtype).double()
    z64[1, ::7] = -INF  # a masked pattern in the second slice
    v64 = (torch.rand(2, k, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype).double()
    w64 = (torch.rand(2, k, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype).double()
    z, v, w = z64.to(dtype), v64.to(dtype), w64.to(dtype)
    x = z64.clone().requires_grad_()
    p = torch.softmax(x, -1)
    tol = 16 * TOL[dtype]
    no_bad = torch.zeros(2, dtype=torch.bool)
    if name == "softmax":
        out, ref = softjac.softmax(z, backend=backend), p.detach()
    elif name in ("vjp", "jvp"):
        (ref,) = torch.autograd.grad(p, x, v64)
        out = getattr(softjac, name)(z, v, backend=backend)
    elif name == "vjp_from_probs":
        q = p.detach().to(dtype)
        out = softjac.vjp_from_probs(q, v, backend=backend)
        q64 = q.double()
        ref = q64 * (v64 - (q64 * v64).sum(-1, keepdim=True))
    elif name == "hvp":
        (g,) = torch.autograd.grad((w64 * p).sum(), x, create_graph=True)
        (ref,) = torch.autograd.grad(g, x, v64)
        out = softjac.hvp(z, w, v)
    elif name in ("cross_entropy", "cross_entropy_grad"):
        target = torch.tensor([3, 1])  # class 1 is not masked in slice 1 (1 % 7 != 0)
        loss = F.cross_entropy(x, target, reduction="none")
        if name == "cross_entropy":
            out = softjac.cross_entropy(z, target, reduction="none", backend=backend)
            ref, tol = loss.detach(), 16 * TOL[dtype] * 40
        else:
            out = softjac.cross_entropy_grad(z, target, reduction="sum", backend=backend)
            (ref,) = torch.autograd.grad(loss.sum(), x)
    else:
        op = softjac.SoftmaxJacobian(z)
        (jv,) = torch.autograd.grad(p, x, v64, retain_graph=True)
        diag = p.detach() * (1 - p.detach())
        checks = {
            "matmul": (op @ v, jv),
            "diagonal": (op.diagonal(), diag),
            "trace": (op.trace(), diag.sum(-1)),
        }
        # (J + λI) x = v, checked through the product with J (no dense K×K matrix here)
        solved = op.solve_damped(v, 0.5)
        assert solved.dtype == dtype
        xs = solved.double()
        (jx,) = torch.autograd.grad(p, x, xs, retain_graph=True)
        checks["solve_damped"] = ((jx + 0.5 * xs).to(dtype), v64)
        for method, (got, want) in checks.items():
            assert got.dtype == dtype, method
            compare(got, want, no_bad, tol * (4 if method == "solve_damped" else 1), method)
        return
    assert out.dtype == dtype, (name, out.dtype)
    compare(out, ref, no_bad, tol, f"softjac.{name}(backend={backend!r}), K = {k}")


# ---------------------------------------------------------------------------------------------
# the Triton backend (on CUDA, else in Triton's interpreter: tiny sizes)


@pytest.mark.parametrize(
    ("name", "backend", "kind"),
    _params(
        [
            "softmax",
            "jacobian",
            "vjp",
            "jvp",
            "vjp_from_probs",
            "cross_entropy",
            "cross_entropy_grad",
        ],
        lambda n: ["triton"],
    ),
)
@settings(max_examples=2, phases=NO_SHRINK, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_triton_backend(name, backend, kind, data, triton_device):
    if triton_device != "cpu":
        pytest.skip("the CUDA run of these cases is the gpu-marked kernel suite")
    if name.startswith("cross_entropy"):
        run_cross_entropy(name, backend, data.draw(ce_cases(kind, dtypes=TRITON_DTYPES)))
    else:
        run_function(name, backend, data.draw(cases(kind, max_k=6, dtypes=TRITON_DTYPES)))


TRITON_FLOAT64 = ["softmax", "jacobian", "vjp", "jvp", "vjp_from_probs", "cross_entropy"]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_TRITON_FLOAT64[n]))
        if n in KNOWN_TRITON_FLOAT64
        else n
        for n in TRITON_FLOAT64
    ],
)
def test_triton_backend_float64_is_float64_accurate_or_refused(name, triton_device):
    """The Triton kernels compute in float32: float64 input must not silently lose digits."""
    gen = torch.Generator().manual_seed(5)
    z64 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    v64 = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    c = Case(
        z=z64,
        z64=z64,
        v=v64,
        v64=v64,
        w=v64,
        w64=v64,
        dim=1,
        classes_first=False,
        temperature=1.0,
        bad=torch.zeros(3, dtype=torch.bool),
        masked=torch.zeros(3, 5, dtype=torch.bool),
    )
    if name == "cross_entropy":
        target = torch.tensor([0, 4, 2])
        try:
            out = softjac.cross_entropy(z64, target, reduction="none", backend="triton")
        except Exception as exc:
            assert _accepted_error(exc, c, "triton"), exc
            return
        ref = F.cross_entropy(z64, target, reduction="none")
        compare(out, ref, c.bad, 8 * TOL[torch.float64], "softjac.cross_entropy(backend='triton')")
    else:
        run_function(name, "triton", c)
