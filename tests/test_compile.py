"""``torch.compile(fullgraph=True)`` of a function using the softmax Function and
``softjac.cross_entropy``: no graph breaks, forward and backward equal to eager.

One small compile (CPU Inductor needs the C++ compiler; about 30 s on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softjac
from softjac._autograd import softmax_last_autograd
from tests.conftest import capture_graphs, softjac_targets


def _model(x, w, target):
    logits = x @ w
    attn = softmax_last_autograd(logits / 0.5)  # what softjac.softmax(logits, T=0.5) calls
    mixed = attn @ w.T
    return softjac.cross_entropy(mixed @ w, target, label_smoothing=0.1, ignore_index=2)


def _reference(x, w, target):
    logits = x @ w
    attn = torch.softmax(logits / 0.5, -1)
    mixed = attn @ w.T
    return F.cross_entropy(mixed @ w, target, label_smoothing=0.1, ignore_index=2)


def test_compile_fullgraph_forward_and_backward():
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen)
    w = torch.randn(4, 5, generator=gen)
    target = torch.tensor([0, 1, 2, 3, 4, 2])

    compiled = torch.compile(_model, fullgraph=True)  # raises on any graph break
    wc = w.clone().requires_grad_()
    out = compiled(x, wc, target)
    out.backward()

    we = w.clone().requires_grad_()
    eager = _model(x, we, target)
    eager.backward()
    wr = w.clone().requires_grad_()
    ref = _reference(x, wr, target)
    ref.backward()

    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(wc.grad, we.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wc.grad, wr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_compiled_graph_keeps_the_softjac_ops(backend):
    """softmax, vjp, jvp, vjp_from_probs and jacobian under ``torch.compile(fullgraph=True)``:
    the captured graph calls ``torch.ops.softjac.*`` (the kernels stay in the graph) and the
    values and gradients equal eager mode."""
    if backend == "cpu" and not softjac.kernels._cpu.available():
        pytest.skip("C kernels unavailable")
    torch._dynamo.reset()

    def f(z, v):
        p = softjac.softmax(z, dim=0, temperature=0.5, backend=backend)
        a = softjac.vjp(z, v, backend=backend)
        b = softjac.jvp(z, v, backend=backend)
        c = softjac.vjp_from_probs(p, v, dim=0, backend=backend)
        j = softjac.jacobian(z, backend=backend)
        return (p * v).sum() + a.square().sum() + b.sum() + c.square().sum() + j.square().sum()

    graphs = []
    compiled = torch.compile(f, backend=capture_graphs(graphs), fullgraph=True)
    z = torch.randn(4, 6, dtype=torch.float64)
    v = torch.randn(4, 6, dtype=torch.float64)
    zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = compiled(zc, v)
    (gc,) = torch.autograd.grad(out, zc)
    eager = f(ze, v)
    (ge,) = torch.autograd.grad(eager, ze)
    torch.testing.assert_close(out, eager, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gc, ge, atol=1e-12, rtol=1e-12)
    assert {
        "softjac.softmax.default",
        "softjac.softmax_vjp.default",
        "softjac.softmax_vjp_logits.default",
        "softjac.jacobian_logits.default",
    } <= softjac_targets(graphs)
