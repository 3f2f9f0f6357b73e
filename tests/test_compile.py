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
