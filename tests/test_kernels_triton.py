"""Triton kernels: on a CUDA device when there is one, else on CPU tensors by the Triton
interpreter (``TRITON_INTERPRET=1``).

The interpreter is chosen when ``softjac.kernels._triton`` is imported, so without CUDA this
module sets the variable and imports it at collection time (skipped without triton, or when
the kernels were already compiled for a GPU in this process); the variable stays set only
while these tests run. Sizes are small: the interpreter runs every program in numpy. Inputs
are built on the CPU, moved to the device by :func:`on_dev`, and results compared on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softjac import _core
from softjac.kernels import dispatch
from tests.conftest import import_triton_kernels
from tests.test_kernels import CE_CASES, _ce_reference, make_inputs
from tests.test_kernels import vjp_error_ratio as _ratio

DEVICE, (_triton,) = import_triton_kernels("_triton")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def vjp_error_ratio(out, p, v):
    return _ratio(out, p, v, ftz=True)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def on_dev(fn, *args, **kwargs):
    """``fn`` on the test device; tensor results come back to the CPU."""

    def move(a):
        return a.to(DEVICE) if isinstance(a, torch.Tensor) else a

    out = fn(*map(move, args), **{k: move(a) for k, a in kwargs.items()})
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


def _blocks():
    """Every BLOCK the one-row launcher can choose (K up to the split threshold)."""
    out, k = [], 1
    while k <= _triton.SPLIT_THRESHOLD:
        out.append(_triton.vjp_block_size(k))
        k = out[-1] + 1
    return sorted(set(out))


def test_block_sizes_cover_the_range():
    blocks = _blocks()
    assert blocks[0] == _triton.MIN_BLOCK and blocks[-1] == _triton.SPLIT_THRESHOLD


@pytest.mark.parametrize("block", _blocks())
def test_vjp_row_kernel_at_block_edges(block):
    for k in (block - 1, block, block + 1):
        if k < 1:
            continue
        p, v = make_inputs(2, k, torch.float32, spread=3.0, seed=k)
        out = on_dev(dispatch.softmax_vjp, p, v, backend="triton")
        assert vjp_error_ratio(out, p, v) <= 1.0, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (1, 2, 3, 7, 64, 100))
def test_vjp_dtypes(dtype, k):
    for spread in (0.5, 40.0):
        p, v = make_inputs(3, k, dtype, spread=spread)
        out = on_dev(dispatch.softmax_vjp, p, v, backend="triton")
        assert out.dtype == dtype
        assert vjp_error_ratio(out, p, v) <= 1.0


@pytest.mark.parametrize("k", (17, 32, 33, 100))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_vjp_split_path(k, dtype):
    p, v = make_inputs(3, k, dtype, spread=5.0, seed=k)
    p[1] = 0  # a masked row through the split path
    out = on_dev(_triton.softmax_vjp, p, v, split_threshold=16, split_chunk=16)
    assert vjp_error_ratio(out, p, v) <= 1.0
    assert torch.equal(out[1], torch.zeros(k, dtype=dtype))


def test_vjp_golden_and_extreme_logits():
    z = torch.tensor([[37.42994775023705, 0.0]], dtype=torch.float64)
    p = torch.softmax(z, -1).float()
    v = torch.tensor([[1.0, 0.0]])
    out = on_dev(dispatch.softmax_vjp, p, v, backend="triton")
    assert out[0, 0].item() == -out[0, 1].item() > 0
    assert out[0, 0].item() == pytest.approx(5.551115e-17, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 50, generator=g, dtype=torch.float64) * torch.tensor([[10.0], [1e2], [1e3]])
    z[:, 7] = z.max(-1).values + 20
    p = _core.softmax_last(z).float()
    v = torch.randn(3, 50, generator=g)
    for out in (
        on_dev(dispatch.softmax_vjp, p, v, backend="triton"),
        on_dev(_triton.softmax_vjp, p, v, split_threshold=16, split_chunk=16),
    ):
        assert vjp_error_ratio(out, p, v) <= 1.0


def test_vjp_noncontiguous_inputs():
    p, v = make_inputs(6, 40, torch.float32)
    pw = torch.zeros(6, 57)
    pw[:, 3:43] = p
    out = on_dev(dispatch.softmax_vjp, pw[:, 3:43], v, backend="triton")
    assert vjp_error_ratio(out, p, v) <= 1.0
    p3, v3 = p.reshape(2, 3, 40).transpose(0, 1), v.reshape(2, 3, 40).transpose(0, 1)
    out3 = on_dev(dispatch.softmax_vjp, p3, v3, backend="triton")
    assert vjp_error_ratio(out3.reshape(-1, 40), p3.reshape(-1, 40), v3.reshape(-1, 40)) <= 1
    pt = p.t().contiguous().t()
    assert vjp_error_ratio(on_dev(dispatch.softmax_vjp, pt, v, backend="triton"), p, v) <= 1.0


@pytest.mark.parametrize("split", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_vjp_from_logits(split, dtype):
    g = torch.Generator().manual_seed(2)
    z = (3 * torch.randn(4, 40, generator=g)).to(dtype)
    z[1] = float("-inf")
    z[2, :9] = float("-inf")
    lse = torch.logsumexp(z.double(), -1, keepdim=True).nan_to_num(neginf=0.0).float()
    v = torch.randn(4, 40, generator=g).to(dtype)
    kw = dict(split_threshold=16, split_chunk=16) if split else {}
    out = on_dev(_triton.softmax_vjp, z, v, lse=lse, **kw)
    if not split:
        assert torch.equal(
            out, on_dev(dispatch.softmax_vjp_from_logits, z, lse, v, backend="triton")
        )
    p = _core.softmax_last(z.double())
    ref = _core.vjp_last(p, v.double())
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)
    assert torch.equal(out[1], torch.zeros(40, dtype=dtype))


@pytest.mark.parametrize("k", (1, 5, 33, 300))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_jacobian_dense(k, dtype):
    p, _ = make_inputs(2, k, dtype, spread=30.0, seed=k)
    out = on_dev(dispatch.softmax_jacobian_dense, p, backend="triton")
    ref = _core.jacobian_last(p.double())
    assert out.shape == (2, k, k) and out.dtype == dtype
    tol = 1e-7 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)
    # the argmax diagonal entry keeps its relative accuracy
    i = p.double().argmax(-1)
    d, dref = out.double()[0, i[0], i[0]], ref[0, i[0], i[0]]
    assert abs(d - dref) <= 1e-5 * abs(dref) + 1e-30 or dtype == torch.bfloat16


@pytest.mark.parametrize("case", CE_CASES, ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cross_entropy(case, dtype, monkeypatch):
    monkeypatch.setattr(_triton, "CE_BLOCK", 16)  # several chunks per row
    n, k = 5, 37
    g = torch.Generator().manual_seed(4)
    z = (4 * torch.randn(n, k, generator=g)).to(dtype)
    target = torch.randint(0, k, (n,), generator=g)
    target[2] = case["ignore"]
    weight = torch.rand(k, generator=g) + 0.5 if case["weight"] else None
    grad_rows = torch.rand(n, generator=g)
    ref_loss, ref_grad = _ce_reference(
        z, target, weight, case["ignore"], case["smoothing"], grad_rows
    )
    loss, lse = on_dev(
        dispatch.cross_entropy_forward,
        z, target, weight, case["ignore"], case["smoothing"], backend="triton",
    )  # fmt: skip
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(lse.double(), torch.logsumexp(z.double(), -1), rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for inplace in (False, True):
        zc = z.clone().to(DEVICE)
        dev = [None if a is None else a.to(DEVICE) for a in (target, lse, grad_rows, weight)]
        grad = dispatch.cross_entropy_backward(
            zc, dev[0], dev[1], dev[2], dev[3], case["ignore"], case["smoothing"],
            inplace=inplace, backend="triton",
        )  # fmt: skip
        assert grad.dtype == dtype
        assert (grad.data_ptr() == zc.data_ptr()) == inplace
        assert torch.equal(zc.cpu(), z) != inplace
        grad = grad.cpu()
        assert torch.allclose(grad.double(), ref_grad, rtol=tol, atol=tol)


def test_cross_entropy_mean_matches_f_cross_entropy():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 19, generator=g)
    target = torch.randint(0, 19, (4,), generator=g)
    loss, _ = on_dev(dispatch.cross_entropy_forward, z, target, None, -100, 0.0, backend="triton")
    assert torch.allclose(loss.mean(), F.cross_entropy(z, target), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (100, 8192, 40000))
def test_gpu_vjp(dtype, k):
    p, v = make_inputs(8, k, dtype, seed=k)
    out = dispatch.softmax_vjp(p.cuda(), v.cuda())  # auto picks triton on CUDA
    assert vjp_error_ratio(out.cpu(), p, v) <= 1.0
    long = _triton.softmax_vjp(p.cuda(), v.cuda(), split_threshold=1024)
    assert vjp_error_ratio(long.cpu(), p, v) <= 1.0
