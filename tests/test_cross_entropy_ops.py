"""The cross-entropy kernels as registered ops (``torch.ops.softjac.cross_entropy_forward`` /
``cross_entropy_backward``): ``torch.library.opcheck``, ``torch.compile(fullgraph=True)`` graphs
that hold them, and every derivative of ``softjac.cross_entropy`` (reverse, forward, batched,
second order) by ``gradcheck`` / ``gradgradcheck`` in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import softjac
from softjac.kernels import _ce_ops, _cpu

F64 = torch.float64


def _op_samples():
    gen = torch.Generator().manual_seed(0)
    z2 = torch.randn(5, 4, generator=gen)
    t2 = torch.tensor([0, 3, -100, 1, 2])
    z3 = torch.randn(2, 4, 3, generator=gen)
    t3 = torch.tensor([[0, 1, 2], [3, -100, 1]])
    w = torch.rand(4, generator=gen) + 0.5
    yield z2, t2, None, 0.0
    yield z3, t3, w, 0.2
    yield z2.double(), t2, w.double(), 0.2


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_opcheck_forward_and_backward(backend):
    for z, t, w, eps in _op_samples():
        z = z.clone().requires_grad_()
        torch.library.opcheck(_ce_ops.cross_entropy_forward, (z, t, w, -100, eps, backend))
        loss, m, ls = _ce_ops.cross_entropy_forward(z.detach(), t, w, -100, eps, backend)
        g = torch.rand(loss.shape, dtype=loss.dtype)
        torch.library.opcheck(
            _ce_ops.cross_entropy_backward, (z, g, t, m, ls, w, -100, eps, backend)
        )


def test_the_ops_agree_with_torch():
    for z, t, w, eps in _op_samples():
        z = z.clone().requires_grad_()
        loss, _, _ = _ce_ops.cross_entropy_forward(z, t, w, -100, eps, "auto")
        (g,) = torch.autograd.grad(loss.sum(), z)
        ref = F.cross_entropy(z.double(), t, weight=None if w is None else w.double(),
                              label_smoothing=eps, reduction="none")  # fmt: skip
        (gref,) = torch.autograd.grad(ref.sum(), z)
        tol = 1e-12 if z.dtype == F64 else 2e-6
        torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(g.double(), gref.double(), atol=tol, rtol=tol)


def _capture(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _ops_in(graphs):
    return {
        str(node.target)
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("softjac.")
    }


@pytest.mark.parametrize("layout", ["rows", "nchw"])
def test_compiled_graph_holds_the_cross_entropy_op(layout):
    """``torch.compile(fullgraph=True)`` of ``softjac.cross_entropy``: the captured graph calls
    ``torch.ops.softjac.cross_entropy_forward`` (the kernel stays in the graph, no break),
    values and gradients equal eager mode and F.cross_entropy."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    if layout == "rows":
        z = torch.randn(6, 5, generator=gen)
        t = torch.tensor([0, 1, 2, 3, 4, -100])
    else:
        z = torch.randn(2, 5, 3, 4, generator=gen)
        t = torch.randint(0, 5, (2, 3, 4), generator=gen)
    w = torch.rand(5, generator=gen) + 0.5

    def loss_fn(x):
        return softjac.cross_entropy(x, t, weight=w, label_smoothing=0.1)

    graphs: list = []
    compiled = torch.compile(loss_fn, fullgraph=True, backend=_capture(graphs))
    zc = z.clone().requires_grad_()
    out = compiled(zc)
    out.backward()
    assert "softjac.cross_entropy_forward.default" in _ops_in(graphs)

    ze = z.clone().requires_grad_()
    eager = loss_fn(ze)
    eager.backward()
    zr = z.clone().requires_grad_()
    ref = F.cross_entropy(zr, t, weight=w, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(zc.grad, ze.grad, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(zc.grad, zr.grad, atol=1e-7, rtol=1e-6)


def test_the_ops_are_twice_differentiable():
    """Double backward through the ops' registered autograd (the backward op's own rule),
    as a compiled graph's backward uses it; both layouts, float64."""
    for z, t, w, eps in _op_samples():
        if z.dtype != F64:
            z = z.double()
            w = None if w is None else w.double()
        z = z.clone().requires_grad_()

        def fn(x, t=t, w=w, eps=eps):
            return _ce_ops.cross_entropy_forward(x, t, w, -100, eps, "auto")[0]

        assert gradcheck(fn, (z,))
        assert gradgradcheck(fn, (z,))


# ------------------------------------------------------------------------------------------
# every derivative, float64
# ------------------------------------------------------------------------------------------

GRAD_CASES = {
    "index": dict(),
    "index+weight+smoothing+ignored": dict(weight=True, label_smoothing=0.2, ignored=True),
    "index none": dict(reduction="none", weight=True),
    "probs": dict(probs=True),
    "probs+weight+smoothing": dict(probs=True, weight=True, label_smoothing=0.3),
    "index dim=1 (4-D)": dict(nchw=True, weight=True, label_smoothing=0.1),
}


# probability targets run PyTorch ops whatever the backend: "auto" only
GRAD_PARAMS = [
    (b, c)
    for c in sorted(GRAD_CASES)
    for b in ("auto", "torch", "cpu")
    if b == "auto" or not GRAD_CASES[c].get("probs")
]


@pytest.mark.parametrize(("backend", "case"), GRAD_PARAMS)
def test_gradcheck_forward_ad_batched_and_gradgradcheck(backend, case):
    if backend == "cpu" and not _cpu.available():
        pytest.skip("C kernels unavailable")
    opt = GRAD_CASES[case]
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 2, 2) if opt.get("nchw") else (4, 5)
    z = torch.randn(shape, generator=gen, dtype=F64).requires_grad_()
    k = shape[1]
    if opt.get("probs"):
        t = torch.softmax(torch.randn(shape, generator=gen, dtype=F64), 1)
    else:
        t = torch.randint(0, k, shape[:1] + shape[2:], generator=gen)
        if opt.get("ignored"):
            t.view(-1)[0] = -100
    w = torch.rand(k, generator=gen, dtype=F64) + 0.5 if opt.get("weight") else None
    kw = dict(weight=w, label_smoothing=opt.get("label_smoothing", 0.0))
    kw["reduction"] = opt.get("reduction", "mean")

    def fn(x):
        return softjac.cross_entropy(x, t, backend=backend, **kw)

    assert gradcheck(fn, (z,), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(fn, (z,), check_fwd_over_rev=True, check_batched_grad=True)
