"""One test per ``torch.func`` transform (lineax style): each softjac Function under the
transform against the same transform of the PyTorch reference, in float64.

Functions under test (``PAIRS``): softmax over the last dim, softmax with ``dim``, mask and
temperature (the wrapper ``softjac.softmax`` will be), and ``softjac.cross_entropy`` with
weights, ignore_index and label smoothing, for class-index and probability targets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import softjac
from softjac._autograd import softmax_last_autograd

F64 = torch.float64
ATOL = 1e-12

_gen = torch.Generator().manual_seed(2024)
_MASK = torch.rand(3, 5, generator=_gen) > 0.3
_MASK[:, 1] = True
_TARGET = torch.tensor([4, -100, 0])
_WEIGHT = torch.rand(5, generator=_gen, dtype=F64) + 0.5
_PROBS = torch.softmax(torch.randn(3, 5, generator=_gen, dtype=F64), -1)


def _masked_scaled(z, mask, t, dim):
    z = z.movedim(dim, -1) / t
    return z.masked_fill(~mask.movedim(dim, -1), float("-inf"))


PAIRS = {
    "softmax": (
        softmax_last_autograd,
        lambda z: torch.softmax(z, -1),
    ),
    "softmax_dim_mask_temperature": (
        lambda z: softmax_last_autograd(_masked_scaled(z, _MASK, 0.7, 0)).movedim(-1, 0),
        lambda z: torch.softmax(_masked_scaled(z, _MASK, 0.7, 0), -1).movedim(-1, 0),
    ),
    "cross_entropy": (
        lambda z: softjac.cross_entropy(z, _TARGET, weight=_WEIGHT, label_smoothing=0.2),
        lambda z: F.cross_entropy(z, _TARGET, weight=_WEIGHT, label_smoothing=0.2),
    ),
    "cross_entropy_none": (
        lambda z: softjac.cross_entropy(z, _TARGET, weight=_WEIGHT, reduction="none"),
        lambda z: F.cross_entropy(z, _TARGET, weight=_WEIGHT, reduction="none"),
    ),
    "cross_entropy_probs": (
        lambda z: softjac.cross_entropy(z, _PROBS, weight=_WEIGHT, label_smoothing=0.1),
        lambda z: F.cross_entropy(z, _PROBS, weight=_WEIGHT, label_smoothing=0.1),
    ),
}

# vmap only maps over functions whose captured tensors do not depend on the batch; the mask
# and targets above are fixed, so every pair can be vmapped over extra leading logits.
NAMES = list(PAIRS)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(3, 5, generator=gen, dtype=F64)
    t = torch.randn(3, 5, generator=gen, dtype=F64)
    return z, t


def _cotangent(f, z, seed=1):
    out = f(z)
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_grad(name):
    ours, ref = PAIRS[name]
    z, _ = _inputs()
    c = _cotangent(ref, z)
    _close(grad(lambda z: (ours(z) * c).sum())(z), grad(lambda z: (ref(z) * c).sum())(z))


@pytest.mark.parametrize("name", NAMES)
def test_vjp(name):
    ours, ref = PAIRS[name]
    z, _ = _inputs()
    c = _cotangent(ref, z)
    out, pull = vjp(ours, z)
    out_r, pull_r = vjp(ref, z)
    _close(out, out_r)
    _close(pull(c)[0], pull_r(c)[0])


@pytest.mark.parametrize("name", NAMES)
def test_jvp(name):
    ours, ref = PAIRS[name]
    z, t = _inputs()
    out, tan = jvp(ours, (z,), (t,))
    out_r, tan_r = jvp(ref, (z,), (t,))
    _close(out, out_r)
    _close(tan, tan_r)


@pytest.mark.parametrize("name", NAMES)
def test_vmap(name):
    ours, ref = PAIRS[name]
    zb = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    _close(vmap(ours)(zb), vmap(ref)(zb))
    # batch dimension not in front
    _close(vmap(ours, in_dims=2)(zb.permute(1, 2, 0)), vmap(ref)(zb))


@pytest.mark.parametrize("name", NAMES)
def test_jacrev(name):
    ours, ref = PAIRS[name]
    z, _ = _inputs()
    _close(jacrev(ours)(z), jacrev(ref)(z))


@pytest.mark.parametrize("name", NAMES)
def test_jacfwd(name):
    ours, ref = PAIRS[name]
    z, _ = _inputs()
    _close(jacfwd(ours)(z), jacfwd(ref)(z))


@pytest.mark.parametrize("name", NAMES)
def test_hessian(name):
    ours, ref = PAIRS[name]
    z, _ = _inputs()
    c = _cotangent(ref, z)

    def scalar(f):
        return lambda z: (f(z) * c).sum()

    _close(hessian(scalar(ours))(z), hessian(scalar(ref))(z))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_jvp(name):
    ours, ref = PAIRS[name]
    gen = torch.Generator().manual_seed(7)
    zb = torch.randn(4, 3, 5, generator=gen, dtype=F64)
    tb = torch.randn(4, 3, 5, generator=gen, dtype=F64)

    def push(f):
        return vmap(lambda z, t: jvp(f, (z,), (t,))[1])

    _close(push(ours)(zb, tb), push(ref)(zb, tb))
    # tangents batched, primal shared
    z, _ = _inputs()

    def push_t(f):
        return vmap(lambda t: jvp(f, (z,), (t,))[1])

    _close(push_t(ours)(tb), push_t(ref)(tb))


@pytest.mark.parametrize("name", NAMES)
def test_jvp_vjp(name):
    ours, ref = PAIRS[name]
    z, t = _inputs()
    c = _cotangent(ref, z)

    def pulled(f):
        return lambda z: vjp(f, z)[1](c)[0]

    out, tan = jvp(pulled(ours), (z,), (t,))
    out_r, tan_r = jvp(pulled(ref), (z,), (t,))
    _close(out, out_r)
    _close(tan, tan_r)
