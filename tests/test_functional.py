"""The functional API against the float64 dense reference and ``torch.func``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import softjac
from softjac._reference import hessian_ref, jacobian_ref, softmax_ref, vjp_ref
from tests.conftest import TOL

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    """A shape of 1–4 dims, a class dim, a dtype, logits at a drawn scale, and a v."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dim = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return z, v, dim


def _last(x, dim):
    return x.double().movedim(dim, -1)


def _jacrev_batched(z_last: torch.Tensor) -> torch.Tensor:
    f = torch.func.jacrev(lambda x: torch.softmax(x, -1))
    for _ in range(z_last.ndim - 1):
        f = torch.func.vmap(f)
    return f(z_last)


@given(problems())
def test_softmax_matches_reference(prob):
    z, _, dim = prob
    out = softjac.softmax(z, dim)
    assert out.dtype == z.dtype and out.shape == z.shape
    ref = softmax_ref(_last(z, dim)).movedim(-1, dim)
    torch.testing.assert_close(out.double(), ref, atol=TOL[z.dtype], rtol=0)


@given(problems())
def test_jacobian_matches_reference_and_jacrev(prob):
    z, _, dim = prob
    jac = softjac.jacobian(z, dim)
    batch = tuple(s for i, s in enumerate(z.shape) if i != dim % z.ndim)
    k = z.shape[dim]
    assert jac.shape == (*batch, k, k) and jac.dtype == z.dtype
    zl = _last(z, dim)
    torch.testing.assert_close(jac.double(), jacobian_ref(zl), atol=TOL[z.dtype], rtol=0)
    torch.testing.assert_close(jac.double(), _jacrev_batched(zl), atol=TOL[z.dtype], rtol=0)


@given(problems())
def test_vjp_jvp_match_dense_product(prob):
    z, v, dim = prob
    ref = vjp_ref(_last(z, dim), _last(v, dim)).movedim(-1, dim)
    tol = TOL[z.dtype] * 4
    for fn in (softjac.vjp, softjac.jvp):
        out = fn(z, v, dim)
        assert out.shape == z.shape and out.dtype == z.dtype
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    p = softjac.softmax(z, dim)
    out = softjac.vjp_from_probs(p, v, dim)
    assert out.dtype == z.dtype
    torch.testing.assert_close(out.double(), ref, atol=tol * 2, rtol=0)


def test_vjp_agrees_with_autograd_backward():
    z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 9, dtype=torch.float64)
    torch.softmax(z, -1).backward(g)
    torch.testing.assert_close(softjac.vjp(z.detach(), g), z.grad, atol=1e-15, rtol=0)


def test_tutorial_example():
    z = torch.tensor([2.0, 1.0, 0.5])
    sigma = torch.softmax(z, 0)
    expected = torch.diag(sigma) - torch.outer(sigma, sigma)
    torch.testing.assert_close(softjac.jacobian(z), expected)
    g = torch.tensor([0.1, -0.3, 0.2])
    torch.testing.assert_close(softjac.vjp(z, g), expected @ g)


@pytest.mark.parametrize("k", [1, 2])
def test_tiny_k(k):
    z = torch.randn(3, k, dtype=torch.float64)
    torch.testing.assert_close(softjac.jacobian(z), jacobian_ref(z), atol=1e-15, rtol=0)
    if k == 1:
        assert torch.equal(softjac.softmax(z), torch.ones_like(z))
        assert torch.equal(softjac.jacobian(z), torch.zeros(3, 1, 1, dtype=torch.float64))


def test_empty_batch():
    z = torch.randn(0, 5)
    assert softjac.jacobian(z).shape == (0, 5, 5)
    assert softjac.vjp(z, z).shape == (0, 5)
    assert softjac.softmax(z).shape == (0, 5)


def test_non_contiguous_input():
    base = torch.randn(7, 5, 4, dtype=torch.float64)
    z = base.transpose(0, 2)[::2]  # (2, 5, 7), non-contiguous
    assert not z.is_contiguous()
    v = torch.randn_like(base).transpose(0, 2)[::2]
    torch.testing.assert_close(softjac.jacobian(z, 1), jacobian_ref(z.movedim(1, -1)))
    torch.testing.assert_close(
        softjac.vjp(z, v, 1), vjp_ref(z.movedim(1, -1), v.movedim(1, -1)).movedim(-1, 1)
    )


@pytest.mark.parametrize("t", [0.05, 0.5, 2.0, 10.0])
def test_temperature(t):
    z = torch.randn(4, 6, dtype=torch.float64)
    f = torch.func.vmap(torch.func.jacrev(lambda x: torch.softmax(x / t, -1)))
    torch.testing.assert_close(softjac.jacobian(z, temperature=t), f(z))
    torch.testing.assert_close(softjac.softmax(z, temperature=t), torch.softmax(z / t, -1))
    v = torch.randn_like(z)
    torch.testing.assert_close(softjac.vjp(z, v, temperature=t), (f(z) @ v[..., None])[..., 0])


def test_mask_and_fully_masked_rows():
    z = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor(
        [[True, False, True, True, False], [False] * 5, [True, True, True, True, True]]
    )
    p = softjac.softmax(z, mask=mask)
    assert not p.isnan().any()
    assert torch.equal(p[1], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(p[0][~mask[0]], torch.zeros(2, dtype=torch.float64))
    ref = softmax_ref(z.masked_fill(~mask, float("-inf")))
    torch.testing.assert_close(p, ref)
    jac = softjac.jacobian(z, mask=mask)
    torch.testing.assert_close(jac, jacobian_ref(z.masked_fill(~mask, float("-inf"))))
    assert torch.equal(jac[1], torch.zeros(5, 5, dtype=torch.float64))
    v = torch.randn_like(z)
    out = softjac.vjp(z, v, mask=mask)
    assert torch.equal(out[1], torch.zeros(5, dtype=torch.float64))
    # -inf logits are masked too, and give the same result as the mask.
    zi = z.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(softjac.vjp(zi, v), out)
    assert torch.isnan(torch.softmax(zi, -1)[1]).all()  # what softjac avoids


def test_mask_broadcasts():
    z = torch.randn(4, 3, 6, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False, True])
    torch.testing.assert_close(
        softjac.softmax(z, mask=mask), softmax_ref(z.masked_fill(~mask, float("-inf")))
    )
    mask_dim1 = torch.tensor([True, False, True]).view(3, 1)
    out = softjac.softmax(z, dim=1, mask=mask_dim1)
    assert torch.equal(out[:, 1], torch.zeros(4, 6, dtype=torch.float64))


def test_log_softmax_jacobian_matches_jacrev():
    z = torch.randn(3, 5, dtype=torch.float64)
    f = torch.func.vmap(torch.func.jacrev(lambda x: torch.log_softmax(x / 0.7, -1)))
    torch.testing.assert_close(softjac.log_softmax_jacobian(z, temperature=0.7), f(z))
    torch.testing.assert_close(
        softjac.log_softmax_jacobian(z, dim=0),
        torch.func.vmap(torch.func.jacrev(lambda x: torch.log_softmax(x, -1)))(z.T),
    )


def test_log_softmax_jacobian_masked_rows_are_zero():
    z = torch.tensor([1.0, float("-inf"), 0.5], dtype=torch.float64)
    out = softjac.log_softmax_jacobian(z)
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out[:, 1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("t", [1.0, 0.5])
def test_hessian_and_hvp(t):
    z = torch.randn(2, 5, dtype=torch.float64)
    f = lambda x: torch.softmax(x / t, -1)  # noqa: E731
    ref = torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(f)))(z)
    torch.testing.assert_close(softjac.hessian(z, temperature=t), ref)
    if t == 1.0:
        torch.testing.assert_close(softjac.hessian(z), hessian_ref(z))
    w, v = torch.randn_like(z), torch.randn_like(z)
    expected = torch.einsum("bi,bijk,bk->bj", w, ref, v)
    torch.testing.assert_close(softjac.hvp(z, w, v, temperature=t), expected)


def test_hvp_dim_and_shape():
    z = torch.randn(4, 3, dtype=torch.float64)
    w, v = torch.randn_like(z), torch.randn_like(z)
    out = softjac.hvp(z, w, v, dim=0)
    ref = softjac.hvp(z.T.contiguous(), w.T.contiguous(), v.T.contiguous()).T
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    z = torch.randn(8, 33).to(dtype)
    expected = torch.softmax(z.float(), -1).to(dtype)
    assert torch.equal(softjac.softmax(z), expected)
    assert softjac.jacobian(z).dtype == dtype


def test_device_preserved_meta_free():
    z = torch.randn(2, 3)
    assert softjac.vjp(z, z).device == z.device


def test_dense_functions_share_one_memory_guard():
    import re

    z = torch.randn(4, 30, dtype=torch.float64)
    calls = {
        "softjac.jacobian": lambda mb: softjac.jacobian(z, max_bytes=mb),
        "softjac.log_softmax_jacobian": lambda mb: softjac.log_softmax_jacobian(z, max_bytes=mb),
        "softjac.hessian": lambda mb: softjac.hessian(z, max_bytes=mb),
    }
    for fn, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(f"`{fn}`: the dense result of shape")):
            call(1000)
        with pytest.raises(TypeError, match=re.escape(f"`{fn}`: `max_bytes` must be an int")):
            call("x")
        with pytest.raises(TypeError, match=re.escape(f"`{fn}`: `max_bytes` must be an int")):
            call(True)
        with pytest.raises(ValueError, match=re.escape(f"`{fn}`: `max_bytes` must be > 0")):
            call(-5)
        assert call(2**30).dtype == torch.float64


def test_hessian_guard_counts_its_temporary():
    # the result (4·30³·8 bytes = 864000) fits in 1e6 bytes, but not with the temporary of
    # its size that the product needs
    z = torch.randn(4, 30, dtype=torch.float64)
    need = 4 * 30**3 * 8
    with pytest.raises(ValueError, match=r"with 1 temporary of its size"):
        softjac.hessian(z, max_bytes=need + 1000)
    assert softjac.hessian(z, max_bytes=2 * need).shape == (4, 30, 30, 30)
