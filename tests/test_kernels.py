"""Kernels layer: the C kernel, the torch fallbacks and the dispatcher.

Every result is checked against an independent reference: ``softjac._core`` in float64 on the
float64-cast inputs for the VJP and Jacobian, autograd through ``F.cross_entropy`` for the
cross-entropy primitives. (The Triton kernels are in ``test_kernels_triton.py``.)
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import softjac
from softjac import _core
from softjac.kernels import _cpu, dispatch

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
KS = (1, 2, 3, 7, 64, 1000, 4097)
# Compute precision of each input dtype (half types compute in float32).
COMPUTE_EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float32).eps,
}

needs_cpu_kernel = pytest.mark.skipif(
    not _cpu.available(), reason=f"C kernel unavailable: {_cpu.unavailable_reason()}"
)


def vjp_error_ratio(
    out: torch.Tensor, p: torch.Tensor, v: torch.Tensor, *, ftz: bool = False
) -> float:
    """Worst ``|out − ref| / bound`` over all entries, with ``ref = _core.vjp_last`` in float64
    and the bound each entry's own error scale (≤ 1 passes):

    * rounding of the output to its dtype: ``eps_out · |ref_i|``;
    * computing: ``c · eps · p_i (|v_i| + Σ_j p_j |v_j|)`` for ``i ≠ i*`` and
      ``c · eps · p_{i*} Σ_{j≠i*} p_j |v_{i*} − v_j|`` for the argmax (no cancellation allowed),
      with ``c = 64`` (blocked sums) and ``eps`` the compute precision;
    * subnormal results: twice the subnormal spacing of the output and compute dtypes, or
      with ``ftz`` (GPU kernels and the Triton interpreter may flush float32 subnormals to
      zero or mishandle them) twice the smallest normal float32.
    """
    p64, v64 = p.double(), v.double()
    ref = _core.vjp_last(p64, v64)
    eps = COMPUTE_EPS[p.dtype]
    eps_out = torch.finfo(out.dtype).eps if out.dtype != torch.float64 else 0.0
    pv = (p64 * v64.abs()).sum(-1, keepdim=True)
    scale = p64 * (v64.abs() + pv)
    idx = p64.argmax(-1, keepdim=True)
    vstar = v64.gather(-1, idx)
    arg_scale = p64.gather(-1, idx) * (p64 * (vstar - v64).abs()).sum(-1, keepdim=True)
    scale = scale.scatter(-1, idx, arg_scale)
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    floor = 2 * sum(torch.finfo(d).tiny * torch.finfo(d).eps for d in (out.dtype, compute))
    if ftz:
        floor += 2 * torch.finfo(torch.float32).tiny
    bound = 64 * eps * scale + eps_out * ref.abs() + floor
    return float(((out.double() - ref).abs() / bound).max()) if ref.numel() else 0.0


def make_inputs(n, k, dtype, *, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = spread * torch.randn(n, k, generator=g, dtype=torch.float64)
    p = torch.softmax(z, -1).to(dtype)
    v = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    return p, v


# ---------------------------------------------------------------------------------------------
# the C kernel


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_cpu_vjp_matches_reference(dtype, k):
    for spread in (0.5, 3.0, 40.0):
        p, v = make_inputs(5, k, dtype, spread=spread)
        out = dispatch.softmax_vjp(p, v, backend="cpu")
        assert out.dtype == dtype and out.shape == p.shape
        assert vjp_error_ratio(out, p, v) <= 1.0


@needs_cpu_kernel
def test_cpu_vjp_long_rows_and_many_rows():
    p, v = make_inputs(3, 70_001, torch.float32)
    assert vjp_error_ratio(dispatch.softmax_vjp(p, v, backend="cpu"), p, v) <= 1.0
    p, v = make_inputs(3000, 5, torch.float64)
    assert vjp_error_ratio(dispatch.softmax_vjp(p, v, backend="cpu"), p, v) <= 1.0


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_cpu_vjp_strided_inputs(dtype):
    p, v = make_inputs(6, 40, dtype)
    # rows with a stride larger than K (a column slice): no copy needed
    pw = torch.zeros(6, 57, dtype=dtype)
    pw[:, 3:43] = p
    vw = torch.zeros(6, 50, dtype=dtype)
    vw[:, :40] = v
    out = dispatch.softmax_vjp(pw[:, 3:43], vw[:, :40], backend="cpu")
    assert vjp_error_ratio(out, p, v) <= 1.0
    # batch dims that do not flatten into one stride, and a non-unit last stride
    p3, v3 = p.reshape(2, 3, 40).transpose(0, 1), v.reshape(2, 3, 40).transpose(0, 1)
    out3 = dispatch.softmax_vjp(p3, v3, backend="cpu")
    assert vjp_error_ratio(out3.reshape(-1, 40), p3.reshape(-1, 40), v3.reshape(-1, 40)) <= 1
    pt, vt = p.t().contiguous().t(), v.t().contiguous().t()
    assert pt.stride(-1) != 1
    assert vjp_error_ratio(dispatch.softmax_vjp(pt, vt, backend="cpu"), p, v) <= 1.0
    # 1-D and 3-D inputs
    assert vjp_error_ratio(dispatch.softmax_vjp(p[0], v[0], backend="cpu"), p[:1], v[:1]) <= 1


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_vjp_masked_rows(dtype):
    z = torch.randn(4, 9, dtype=torch.float64)
    z[1, :] = float("-inf")  # fully masked row: σ = 0
    z[2, ::2] = float("-inf")  # partly masked
    p = _core.softmax_last(z).to(dtype)
    v = torch.randn(4, 9, dtype=torch.float64).to(dtype)
    out = dispatch.softmax_vjp(p, v, backend="cpu")
    assert torch.equal(out[1], torch.zeros(9, dtype=dtype))
    assert torch.equal(out[2, ::2], torch.zeros(5, dtype=dtype))
    assert not out.isnan().any()
    assert vjp_error_ratio(out, p, v) <= 1.0


@needs_cpu_kernel
def test_cpu_vjp_golden_example_antisymmetric():
    z = torch.tensor([37.42994775023705, 0.0], dtype=torch.float64)
    p = torch.softmax(z, -1)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = dispatch.softmax_vjp(p, v, backend="cpu")
    # σ₂ = 5.551115123125776e-17 here (torch.softmax); the exact answer σ₁σ₂ is within 1 ulp of
    # the published 5.551115123125775e-17 and equals the float64 reference bit for bit
    assert out[0].item() == pytest.approx(5.551115123125775e-17, rel=3e-16)
    assert torch.equal(out, _core.vjp_last(p, v))
    assert out[1].item() == -out[0].item()
    # the naive product cancels to 0 here; softjac must not
    assert (p * (v - (p * v).sum())).abs()[0].item() == 0.0


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_cpu_vjp_extreme_logits(dtype):
    g = torch.Generator().manual_seed(3)
    rows = []
    for spread in (1e1, 1e2, 1e3):
        z = torch.randn(64, generator=g, dtype=torch.float64) * spread
        z[5] = z.max() + 25.0  # a dominant argmax: σ_{i*} ≈ 1
        rows.append(z)
    z = torch.stack(rows)
    z = torch.cat([z, torch.tensor([[0.0, 0.0] + [-1e308] * 62], dtype=torch.float64)])
    p = _core.softmax_last(z).to(dtype)
    v = torch.randn(z.shape, generator=g, dtype=torch.float64).to(dtype)
    out = dispatch.softmax_vjp(p, v, backend="cpu")
    assert vjp_error_ratio(out, p, v) <= 1.0
    # argmax entries are accurate relative to their own (tiny) size
    ref = _core.vjp_last(p.double(), v.double())
    idx = p.double().argmax(-1, keepdim=True)
    rel = (out.double().gather(-1, idx) - ref.gather(-1, idx)).abs() / ref.gather(-1, idx).abs()
    assert float(rel.max()) < 1e3 * torch.finfo(dtype).eps


@needs_cpu_kernel
def test_cpu_vjp_empty_and_mixed_dtype():
    out = dispatch.softmax_vjp(torch.empty(0, 5), torch.empty(0, 5), backend="cpu")
    assert out.shape == (0, 5)
    p, v = make_inputs(3, 8, torch.float32)
    out = dispatch.softmax_vjp(p, v.double(), backend="cpu")  # v is cast to σ's dtype
    assert out.dtype == torch.float32
    assert vjp_error_ratio(out, p, v) <= 1.0


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_cpu_vjp_from_logits(dtype):
    z = (3 * torch.randn(4, 33, dtype=torch.float64)).to(dtype)
    z[1] = float("-inf")
    z[2, :5] = float("-inf")
    lse = torch.logsumexp(z.double(), -1, keepdim=True).nan_to_num(neginf=0.0)
    v = torch.randn(4, 33, dtype=torch.float64).to(dtype)
    out = dispatch.softmax_vjp_from_logits(z, lse.float(), v, backend="cpu")
    p = _core.softmax_last(z.double())
    ref = _core.vjp_last(p, v.double())
    assert out.dtype == dtype
    tol = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)
    assert torch.equal(out[1], torch.zeros(33, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# the torch fallbacks (the contract every backend meets)


@pytest.mark.parametrize("backend", ("torch", "cpu", "auto"))
def test_jacobian_dense_matches_reference(backend):
    p, _ = make_inputs(4, 6, torch.float64, spread=20.0)
    ref = _core.jacobian_last(p)
    out = dispatch.softmax_jacobian_dense(p, backend=backend)
    assert torch.allclose(out, ref, rtol=1e-14, atol=1e-300)
    p32 = p.float()
    out32 = dispatch.softmax_jacobian_dense(p32, backend=backend)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), _core.jacobian_last(p32.double()), atol=1e-7)


def _softmax_ref(z: torch.Tensor) -> torch.Tensor:
    """σ in float64 from the (exactly representable) low-precision logits."""
    return _core.softmax_last(z.double())


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("k", (1, 2, 15, 16, 17, 100, 511, 512, 513, 1500))
def test_cpu_softmax_forward_entrywise(dtype, k):
    """The C forward: every σ_j within a few roundings of its own size, scaled by (1 + Δ)
    with Δ = max z − z_j (the error of rounding z_j − max z, inherent to any method), plus
    the output dtype's rounding and one subnormal spacing; masked rows are zeros."""
    g = torch.Generator().manual_seed(k)
    z = (6.0 * torch.randn(5, k, generator=g, dtype=torch.float64)).to(dtype)
    z[1, : max(1, k // 2)] = 0.0  # ties
    z[2, 0] = 30.0
    z[3, :] = float("-inf")  # masked row
    if k > 2:
        z[4, ::3] = float("-inf")  # partly masked
    out = dispatch.softmax(z, backend="cpu")
    assert out.dtype == dtype and out.shape == z.shape
    ref = _softmax_ref(z)
    delta = (z.double().amax(-1, keepdim=True) - z.double()).nan_to_num(posinf=0.0)
    eps32 = torch.finfo(torch.float32).eps
    eps_out = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    bound = 8 * eps32 * (1 + delta) * ref + eps_out * ref + 2 * tiny
    assert bool(((out.double() - ref).abs() <= bound).all())
    assert torch.equal(out[3], torch.zeros(k, dtype=dtype))


@needs_cpu_kernel
def test_cpu_softmax_forward_subnormal_and_special_rows():
    """σ down to the smallest float32 subnormal is kept (not flushed), to within one subnormal
    spacing of the float64 value; NaN and +inf in a row give NaN throughout it, as
    torch.softmax; −inf entries give exact zeros."""
    z = torch.tensor(
        [
            [0.0, -90.0, -100.0, -103.0, -103.9, -104.5, -200.0] + [-1.0] * 9,
            [0.0, float("nan")] + [1.0] * 14,
            [float("inf"), 0.0] + [1.0] * 14,
            [2.0, float("-inf")] + [-80.0 - j for j in range(14)],
        ],
        dtype=torch.float32,
    )
    out = dispatch.softmax(z, backend="cpu")
    ref = _softmax_ref(z)
    spacing = torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps
    for row in (0, 3):
        rel = 8 * torch.finfo(torch.float32).eps * (1 + 110) * ref[row]
        assert bool(((out[row].double() - ref[row]).abs() <= rel + spacing).all())
    assert out[0, 1] > 0 and out[0, 2] > 0  # 1.9e-40 and 8.4e-45: subnormal, not flushed
    assert out[3, 1] == 0.0
    expect_nan = torch.softmax(z, -1).isnan()
    assert torch.equal(out.isnan(), expect_nan) and bool(expect_nan[1:3].all())


@needs_cpu_kernel
def test_cpu_softmax_forward_strided_rows_and_autograd_path():
    """Rows addressed through a row stride need no copy; ``softjac.softmax`` and its backward
    run the C forward on CPU float32 and agree with torch."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 40, generator=g)
    view = base[::2, 3:35]
    out = dispatch.softmax(view, backend="cpu")
    assert bool(((out.double() - _softmax_ref(view)).abs() <= 1e-6 * _softmax_ref(view)).all())
    z = torch.randn(6, 50, generator=g, requires_grad=True)
    w = torch.randn(6, 50, generator=g)
    (gz,) = torch.autograd.grad((softjac.softmax(z) * w).sum(), z)
    zr = z.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad((torch.softmax(zr, -1) * w.double()).sum(), zr)
    assert torch.allclose(gz.double(), gr, atol=2e-7)


def jacobian_error_ratio(out: torch.Tensor, p: torch.Tensor) -> float:
    """Worst ``|out − ref| / bound`` (≤ 1 passes), ``ref = _core.jacobian_last`` in float64 and
    each entry's own scale as bound: ``64 · eps · |p_a p_b|`` off the diagonal and
    ``c · eps · p_a (1 − p_a)`` on it (the argmax's ``1 − p_{i*}`` without cancellation), plus
    the output rounding and a subnormal floor."""
    p64 = p.double()
    ref = _core.jacobian_last(p64)
    eps = COMPUTE_EPS[p.dtype]
    eps_out = torch.finfo(out.dtype).eps if out.dtype != torch.float64 else 0.0
    scale = (p64.unsqueeze(-1) * p64.unsqueeze(-2)).abs()
    scale.diagonal(dim1=-2, dim2=-1).copy_(ref.diagonal(dim1=-2, dim2=-1).abs())
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    floor = 2 * sum(torch.finfo(d).tiny * torch.finfo(d).eps for d in (out.dtype, compute))
    bound = 64 * eps * scale + eps_out * ref.abs() + floor  # 64: blocked sums, as the VJP
    return float(((out.double() - ref).abs() / bound).max()) if ref.numel() else 0.0


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (1, 2, 7, 64, 300, 1100))
def test_cpu_jacobian_dense_entrywise(dtype, k):
    """The C writer: every entry within a few roundings of its own size (argmax diagonal
    included), ties, a masked row (zeros) and a near-one-hot row (its argmax diagonal is
    about 1e-26, computed without cancellation)."""
    g = torch.Generator().manual_seed(k)
    z = 4.0 * torch.randn(5, k, generator=g, dtype=torch.float64)
    z[1, : max(1, k // 2)] = 0.0  # ties
    z[3, :] = float("-inf")  # masked row
    z[4, k // 3] = 60.0
    p = _core.softmax_last(z).to(dtype)
    out = dispatch.softmax_jacobian_dense(p, backend="cpu")
    assert out.shape == (5, k, k) and out.dtype == dtype
    assert torch.equal(out[3], torch.zeros(k, k, dtype=dtype))
    assert jacobian_error_ratio(out, p) <= 1.0
    assert torch.equal(out, out.transpose(-1, -2))  # −p_a p_b is symmetric bit for bit


@needs_cpu_kernel
@pytest.mark.parametrize("k", (4096, 4097))
def test_cpu_jacobian_dense_streamed_float32_rows(k):
    """Output rows of ≥ 4096 float32 entries go out with non-temporal stores when 32-byte
    aligned (every row for K = 4096, every eighth for K = 4097: the others take the plain
    loop). The first 64 output rows of each block are checked against float64, including
    the argmax's diagonal entry (placed in them)."""
    g = torch.Generator().manual_seed(k)
    z = 3.0 * torch.randn(2, k, generator=g, dtype=torch.float64)
    z[1, 10] = 50.0
    p = _core.softmax_last(z).float()
    out = dispatch.softmax_jacobian_dense(p, backend="cpu")[:, :64]
    p64 = p.double()
    ref = -(p64[:, :64, None] * p64[:, None, :])
    diag = (p64 * _core.one_minus(p64))[:, :64]
    ref.diagonal(dim1=-2, dim2=-1).copy_(diag)
    scale = (p64[:, :64, None] * p64[:, None, :]).abs()
    scale.diagonal(dim1=-2, dim2=-1).copy_(diag.abs())
    bound = 64 * COMPUTE_EPS[torch.float32] * scale + 2 * torch.finfo(torch.float32).tiny
    assert bool(((out.double() - ref).abs() <= bound).all())


@needs_cpu_kernel
def test_cpu_jacobian_dense_strided_batch_input():
    p, _ = make_inputs(12, 33, torch.float32)
    view = p.view(3, 4, 33).transpose(0, 1)[:, ::2]  # rows through a non-unit batch stride
    out = dispatch.softmax_jacobian_dense(view, backend="cpu")
    assert out.shape == (4, 2, 33, 33)
    assert jacobian_error_ratio(out, view) <= 1.0


CE_CASES = [
    dict(weight=False, smoothing=0.0, ignore=-100),
    dict(weight=True, smoothing=0.0, ignore=-100),
    dict(weight=False, smoothing=0.2, ignore=2),
    dict(weight=True, smoothing=0.1, ignore=2),
]


def _ce_reference(z, target, weight, ignore, smoothing, grad_rows):
    """Unreduced loss and ∂(Σ g_n loss_n)/∂z by autograd through ``F.cross_entropy``."""
    zz = z.detach().double().requires_grad_(True)
    loss = F.cross_entropy(
        zz,
        target,
        weight=None if weight is None else weight.double(),
        ignore_index=ignore,
        label_smoothing=smoothing,
        reduction="none",
    )
    (loss * grad_rows.double()).sum().backward()
    return loss.detach(), zz.grad


@pytest.mark.parametrize("case", CE_CASES, ids=str)
@pytest.mark.parametrize("backend", ("torch", "cpu", "auto"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("k", (11, 1100))
def test_cross_entropy_matches_autograd(case, backend, dtype, k):
    n = 6
    g = torch.Generator().manual_seed(1)
    z = (4 * torch.randn(n, k, generator=g)).to(dtype)
    z[3, 5] = float("-inf")  # a masked class
    target = torch.randint(0, k, (n,), generator=g)
    target[1] = case["ignore"]
    target[3] = 4
    weight = torch.rand(k, generator=g) + 0.5 if case["weight"] else None
    grad_rows = torch.rand(n, generator=g)
    ref_loss, ref_grad = _ce_reference(
        z, target, weight, case["ignore"], case["smoothing"], grad_rows
    )
    loss, lse = dispatch.cross_entropy_forward(
        z, target, weight, case["ignore"], case["smoothing"], backend=backend
    )
    assert loss.dtype == torch.float32 and lse.shape == (n,)
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(lse.double(), torch.logsumexp(z.double(), -1), rtol=1e-6)
    assert loss[1] == 0
    grad = dispatch.cross_entropy_backward(
        z, target, lse, grad_rows, weight, case["ignore"], case["smoothing"], backend=backend
    )
    assert grad.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(grad.double(), ref_grad, rtol=tol, atol=tol)
    assert torch.equal(grad[1], torch.zeros(k, dtype=dtype))
    # in place: the gradient lands in the logits buffer
    zc = z.clone()
    out = dispatch.cross_entropy_backward(
        zc, target, lse, grad_rows, weight, case["ignore"], case["smoothing"], inplace=True,
        backend=backend,
    )  # fmt: skip
    assert out.data_ptr() == zc.data_ptr()
    assert torch.allclose(zc.double(), ref_grad, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# dispatch rules and errors


def test_auto_picks_the_c_kernel_on_plain_cpu_tensors():
    p, v = make_inputs(2, 5, torch.float32)
    expected = "cpu" if _cpu.available() else "torch"
    assert dispatch.resolve_backend("f", "auto", p, "softmax_vjp", v) == expected
    assert dispatch.resolve_backend("f", "auto", p, "softmax_jacobian_dense") == expected
    # float64 cross-entropy has no C kernel: auto keeps it on torch
    p64 = p.double()
    assert dispatch.resolve_backend("f", "auto", p64, "cross_entropy_forward") == "torch"
    assert dispatch.resolve_backend("f", "auto", p.requires_grad_(), "softmax_vjp") == "torch"
    with torch.no_grad():
        assert dispatch.resolve_backend("f", "auto", p, "softmax_vjp") == expected


def test_auto_keeps_to_torch_inside_vmap():
    p, v = make_inputs(3, 5, torch.float64)
    out = torch.func.vmap(lambda a, b: dispatch.softmax_vjp(a, b))(p, v)
    assert torch.allclose(out, _core.vjp_last(p, v), atol=1e-15)
    with pytest.raises(RuntimeError, match=r"`softjac.vjp_from_probs`: backend 'cpu' needs plain"):
        torch.func.vmap(lambda a, b: dispatch.softmax_vjp(a, b, backend="cpu"))(p, v)


def test_unknown_backend_is_a_value_error():
    p, v = make_inputs(2, 5, torch.float32)
    with pytest.raises(ValueError, match=r"`softjac.vjp_from_probs`: `backend` must be one of"):
        dispatch.softmax_vjp(p, v, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p, v = make_inputs(2, 5, torch.float32)
    if dispatch._triton_installed():
        msg = r"`softjac.vjp_from_probs`: backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1"
    else:
        msg = r"backend 'triton' needs the `triton` package"
    with pytest.raises(RuntimeError, match=msg):
        dispatch.softmax_vjp(p, v, backend="triton")
    with pytest.raises(RuntimeError, match=r"`softjac.jacobian`: backend 'triton'"):
        dispatch.softmax_jacobian_dense(p, backend="triton")


def test_import_softjac_does_not_import_triton():
    code = "import sys, softjac, softjac.kernels.dispatch; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((3, 5, 7), 1),
        ((2, 1000, 33), 1),
        ((6, 70, 129), 1),
        ((2, 3, 4), 0),
        ((2, 300, 2, 3), 1),
        ((2, 9, 600), 1),  # more columns than one tile holds (256)
        ((1, 8000, 150), 1),  # tiles narrowed by the 8 MiB budget: 64 or 128 columns
    ],
    ids=str,
)
def test_cpu_vjp_class_dim_in_the_middle(dtype, shape, dim):
    """Softmax over ``dim != -1`` of a contiguous tensor: the inner-layout kernel reads σ and v
    in place (tiles of columns, SIMD across them) and returns J v in the same layout; columns
    with ties, with the maximum at the last class, and fully masked ones included, and shapes
    that take one tile, several, and a narrow last one."""
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[dim])
    z = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    zl = z.movedim(dim, -1)  # a view: edits land in z
    zl[(0,) * (zl.dim() - 1)] = 0.0  # every class ties
    zl[(1,) * (zl.dim() - 1) if zl.shape[0] > 1 else (0,) * (zl.dim() - 1)][-1] = 40.0
    zl[..., -1, :] = float("-inf")  # the last column of each batch entry is masked
    p = _core.softmax_last(zl).to(dtype)
    p = p.movedim(-1, dim).contiguous().movedim(dim, -1)  # σ laid out like z
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).movedim(dim, -1)
    out = dispatch.softmax_vjp(p, v, backend="cpu")
    assert out.shape == p.shape and out.dtype == dtype
    assert out.movedim(-1, dim).is_contiguous()  # computed in place: no transposed copy
    assert torch.equal(out[..., -1, :], torch.zeros_like(out[..., -1, :]))
    assert vjp_error_ratio(out, p, v) <= 1.0
    # v in another layout (class dim last, contiguous) is copied into σ's
    v2 = v.contiguous()
    assert vjp_error_ratio(dispatch.softmax_vjp(p, v2, backend="cpu"), p, v2) <= 1.0


@needs_cpu_kernel
@pytest.mark.parametrize("k", (1 << 17, (1 << 17) + 8, (1 << 17) + 13))
def test_cpu_vjp_float32_streamed_long_rows(k):
    """Rows of ≥ 2**17 float32 entries write with non-temporal stores when the output row is
    32-byte aligned (k a multiple of 8) and with plain stores otherwise (k + 13 misaligns
    every row but the first); the argmax entry, written after the streamed ones, is put in
    the scalar tail (the last entry) and in the last vector of a row."""
    g = torch.Generator().manual_seed(k)
    z = 2.0 * torch.randn(4, k, generator=g, dtype=torch.float64)
    z[1, k - 1] = 30.0
    z[2, k - 9] = 30.0
    p = _core.softmax_last(z).to(torch.float32)
    v = torch.randn(4, k, generator=g, dtype=torch.float64).to(torch.float32)
    out = dispatch.softmax_vjp(p, v, backend="cpu")
    assert vjp_error_ratio(out, p, v) <= 1.0
    for row in (1, 2):
        i = int(p[row].double().argmax())
        ref = p[row, i].double() * (p[row].double() * (v[row, i].double() - v[row].double())).sum()
        assert abs(out[row, i].item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-30


@needs_cpu_kernel
@pytest.mark.parametrize(
    "k", (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 511, 512, 513, 1500)
)
def test_cpu_vjp_float32_ties_and_block_edges(k):
    """The float32 path (vector lanes, argmax tracked per lane): ties of the maximum in
    several lanes and blocks, the maximum in the scalar tail, and zero rows."""
    g = torch.Generator().manual_seed(k)
    z = torch.randn(6, k, generator=g, dtype=torch.float64)
    z[0, :] = 0.0  # every entry ties
    z[1, [k // 3, k // 2, k - 1]] = 9.0  # ties far apart (lanes, blocks, the tail)
    z[2, k - 1] = 12.0  # the maximum is the last entry
    z[3, 0] = 12.0  # the maximum is the first entry
    z[4, :] = float("-inf")  # masked row
    p = _core.softmax_last(z).to(torch.float32)
    v = torch.randn(6, k, generator=g, dtype=torch.float64).to(torch.float32)
    out = dispatch.softmax_vjp(p, v, backend="cpu")
    assert torch.equal(out[4], torch.zeros(k))
    assert vjp_error_ratio(out, p, v) <= 1.0
    # the argmax entry is the one computed without cancellation: m * sum_{j != i*} p_j (v* - v_j)
    i = int(p[1].double().argmax())
    ref = p[1, i].double() * (p[1].double() * (v[1, i].double() - v[1].double())).sum()
    assert abs(out[1, i].item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-30


def test_auto_falls_back_to_torch_when_a_triton_kernel_fails(monkeypatch):
    """Under "auto", a Triton compile/launch failure warns once, runs the PyTorch path and
    keeps later "auto" calls off Triton; an explicit backend lets the error through."""
    from softjac.kernels import dispatch

    monkeypatch.setattr(dispatch, "_triton_failure", None)

    def broken():
        raise RuntimeError("ptxas rejected the kernel")

    with pytest.warns(RuntimeWarning, match="ptxas rejected the kernel"):
        out = dispatch._triton_or_fallback("auto", "softjac.vjp", broken, lambda: 42)
    assert out == 42
    assert "ptxas" in dispatch._triton_failure
    with pytest.raises(RuntimeError, match="ptxas"):
        dispatch._triton_or_fallback("triton", "softjac.vjp", broken, lambda: 42)


@pytest.mark.parametrize("k", (1, 7, 8, 15, 16, 17, 31, 32, 33, 47, 513, 1030))
@pytest.mark.parametrize("case", CE_CASES, ids=str)
def test_cross_entropy_c_kernel_row_lengths(case, k):
    """The float32 C rows (vector lanes, two accumulators, scalar tails) at K on both sides of
    the vector widths, on rows with a stride and with an ignored row."""
    if not _cpu.available():
        pytest.skip("no C compiler")
    n = 5
    g = torch.Generator().manual_seed(k)
    zbig = 6 * torch.randn(n, k + 3, generator=g)
    z = zbig[:, :k]  # row stride k + 3
    target = torch.randint(0, k, (n,), generator=g)
    target[2] = case["ignore"]
    weight = torch.rand(k, generator=g) + 0.5 if case["weight"] else None
    grad_rows = torch.rand(n, generator=g)
    grad_rows[2] = float("inf")  # an ignored row's cotangent is never used
    ref_loss, ref_grad = _ce_reference(
        z, target, weight, case["ignore"], case["smoothing"], grad_rows.nan_to_num(posinf=0.0)
    )
    loss, lse = _cpu.cross_entropy_forward(z, target, weight, case["ignore"], case["smoothing"])
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(lse.double(), torch.logsumexp(z.double(), -1), rtol=1e-6)
    grad = _cpu.cross_entropy_backward(
        z, target, lse, grad_rows, weight, case["ignore"], case["smoothing"]
    )
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(grad[2], torch.zeros(k))


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("ignored", (False, True))
def test_cross_entropy_end_to_end_matches_torch(reduction, ignored):
    """softjac.cross_entropy forward and plain backward (the C path, the unit-weight 'mean'
    count) against F.cross_entropy."""
    g = torch.Generator().manual_seed(3)
    n, k = 40, 37
    z = (3 * torch.randn(n, k, generator=g)).requires_grad_(True)
    target = torch.randint(0, k, (n,), generator=g)
    if ignored:
        target[::7] = -100
    out = softjac.cross_entropy(z, target, reduction=reduction)
    ref = F.cross_entropy(z, target, reduction=reduction)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    cot = torch.rand(out.shape, generator=g)
    (gz,) = torch.autograd.grad(out, z, cot)
    (gr,) = torch.autograd.grad(ref, z, cot)
    assert torch.allclose(gz, gr, rtol=1e-5, atol=1e-7)


@needs_cpu_kernel
def test_inplace_cross_entropy_backward_needs_unit_class_stride():
    """The kernels write the gradient over the logits row by row: a class dim with another
    stride is refused by dispatch (one check for every kernel backend), naming the strides."""
    z = torch.randn(6, 5).t()  # (5, 6) with class stride 5
    target = torch.zeros(5, dtype=torch.int64)
    lse = torch.logsumexp(z, -1)
    with pytest.raises(ValueError, match=r"inplace=True.*unit stride.*\(1, 5\)"):
        dispatch.cross_entropy_backward(
            z, target, lse, torch.ones(5), None, -100, 0.0, inplace=True, backend="cpu"
        )


def test_cross_entropy_mean_out_of_range_target_still_raises():
    z = torch.randn(3, 4)
    with pytest.raises(IndexError):
        softjac.cross_entropy(z, torch.tensor([0, 4, 1]))


# ------------------------------------------------------------- exact from-logits C kernels


def exact_vjp_scale(z64: torch.Tensor, v64: torch.Tensor) -> torch.Tensor:
    """Per-entry size of the terms of ``(J v)_i`` from logits, in float64: ``e_i (|v_i| S +
    Σ e_j |v_j|) / S²`` and, for the argmax, ``Σ_{j≠i*} e_j |v_{i*} − v_j| / S²``."""
    e, idx, _, s = _core.exp_parts(z64)
    ea = (e * v64.abs()).sum(-1, keepdim=True)
    scale = e * (v64.abs() * s + ea) / s**2
    star = (e * (v64.gather(-1, idx) - v64).abs()).sum(-1, keepdim=True) / s**2
    return scale.scatter(-1, idx, star)


def gaps(z: torch.Tensor) -> torch.Tensor:
    """``|z_j − max z|`` in float64 (0 where masked), capped where ``exp`` underflows: the
    relative error of ``exp(z_j − m)`` from rounding ``z_j − m`` in the working precision is
    ``eps · gap`` (the inherent conditioning of every method)."""
    z64 = z.double()
    cap = 750.0 if z.dtype == torch.float64 else 104.0
    g = (z64 - _core._safe_max(z64)).abs()
    return torch.where(torch.isfinite(g), g, torch.zeros_like(g)).clamp(max=cap)


def assert_exact_vjp_close(out: torch.Tensor, z: torch.Tensor, v: torch.Tensor, c: float = 32):
    """``out`` against ``_core.vjp_logits_last`` in float64 on the same (rounded) inputs:
    ``|out − ref| ≤ c · eps · (1 + Δ) · scale + eps_out · |ref| + tiny`` entrywise, with Δ
    the row's largest gap (``gaps``)."""
    z64, v64 = z.double(), v.double()
    ref = _core.vjp_logits_last(z64, v64)
    eps = COMPUTE_EPS[z.dtype]
    fo = torch.finfo(out.dtype)
    eps_out = fo.eps if out.dtype != torch.float64 else 0.0
    tiny = 4 * fo.tiny * fo.eps
    delta = gaps(z).amax(-1, keepdim=True)
    bound = c * eps * (1 + delta) * exact_vjp_scale(z64, v64) + eps_out * ref.abs() + tiny
    err = (out.double() - ref).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"worst ratio {(err / bound).max().item():.3g}"


def exact_rows(k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with random, extreme (spreads up to 1e3), tied and masked rows, and matching v."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(9, k, generator=g, dtype=torch.float64)
    z[1] *= 30
    z[2] *= 1e3  # extreme: most σ underflow
    z[3] = 0.0  # all tied
    z[4] = torch.randint(0, 3, (k,), generator=g).double()  # ties at the max
    z[5, ::3] = -math.inf  # masked entries
    z[6] = torch.linspace(-50, 50, k, dtype=torch.float64)  # max at the end (moves every block)
    z[7] = torch.linspace(50, -50, k, dtype=torch.float64)
    z[8] = z[8] * 5 + 20
    v = torch.randn(9, k, generator=g, dtype=torch.float64)
    v[3] *= 1e4
    return z.to(dtype), v.to(dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (1, 2, 3, 7, 16, 100, 512, 513, 1000, 4097))
def test_cpu_vjp_logits_exact_matches_core(dtype, k):
    z, v = exact_rows(k, dtype, seed=k)
    out = _cpu.softmax_vjp_logits(z, v)
    assert out.dtype == dtype and out.shape == z.shape
    assert_exact_vjp_close(out, z, v)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_vjp_logits_exact_layouts(dtype):
    """Batch dims, strided rows (a slice) and a transposed v give the row results."""
    z, v = exact_rows(300, dtype, seed=1)
    z3 = z.reshape(3, 3, 300)
    out = _cpu.softmax_vjp_logits(z3, v.reshape(3, 3, 300))
    assert out.shape == (3, 3, 300)
    assert torch.equal(out.reshape(9, 300), _cpu.softmax_vjp_logits(z, v))
    zs, vs = z[:, :200], v.t().contiguous().t()[:, :200]
    assert_exact_vjp_close(_cpu.softmax_vjp_logits(zs, vs), zs, vs)


@needs_cpu_kernel
def test_cpu_vjp_logits_exact_mpmath_goldens():
    """The golden cases of ``test_accuracy`` (mpmath at 50 digits), through the kernel."""
    from tests import _mp
    from tests.test_accuracy import CASES, EPS, _delta

    for z in CASES:
        for t in (1.0, 0.1):
            zt = _core.masked_scaled_logits(torch.tensor(z, dtype=torch.float64), None, t)
            g = torch.Generator().manual_seed(len(z))
            for v in (torch.randn(len(z), generator=g, dtype=torch.float64), torch.eye(len(z))[0]):
                exact, scale = _mp.jvp(z, v.tolist(), t)
                # d σ(z/T)/dz = J(z/T) / T
                got = [x / t for x in _cpu.softmax_vjp_logits(zt, v.double()).tolist()]
                for i, (gi, x, s) in enumerate(zip(got, exact, scale, strict=True)):
                    bound = 8 * EPS * (1 + _delta(z, t)) * float(s) + 1e-300
                    assert abs(gi - float(x)) <= bound, (z, t, i, gi, float(x))


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_jacobian_logits_matches_core(dtype):
    for k in (1, 2, 5, 64, 300):
        z, _ = exact_rows(k, dtype, seed=k)
        out = _cpu.jacobian_logits(z)
        assert out.dtype == dtype and out.shape == (9, k, k)
        ref = _core.jacobian_logits_last(z.double())
        fo = torch.finfo(dtype)
        eps_out = fo.eps if dtype != torch.float64 else 0.0
        # every entry is a product/quotient without cancellation: relative to itself, with
        # the conditioning of the two exponentials (gaps)
        g = gaps(z)
        cond = 1 + g.unsqueeze(-1) + g.unsqueeze(-2)
        bound = (16 * COMPUTE_EPS[dtype] * cond + eps_out) * ref.abs() + 4 * fo.tiny * fo.eps
        assert ((out.double() - ref).abs() <= bound).all(), k


def nan_contract_cases(k: int, dtype: torch.dtype):
    """Rows: 0 clean, 1 a NaN logit, 2 a +inf logit, 3 a NaN logit among -inf, 4 fully
    masked, 5 masked entries."""
    z = torch.randn(6, k, dtype=torch.float64)
    z[1, k // 2] = math.nan
    z[2, k // 3] = math.inf
    z[3] = -math.inf
    z[3, k - 1] = math.nan
    z[4] = -math.inf
    z[5, ::2] = -math.inf
    return z.to(dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (5, 40, 600))
def test_cpu_kernels_nan_contract(dtype, k):
    """NaN anywhere in a row (or a +inf logit) → the row all NaN; −inf masked; fully masked
    rows zeros: softmax forward, the VJPs (from σ, from logits with and without lse) and the
    dense writers."""
    z = nan_contract_cases(k, dtype)
    v = torch.randn(6, k, dtype=torch.float64).to(dtype)
    zero_nan = torch.nan_to_num(z.double(), nan=0.0, posinf=0.0)  # rows 1-3 made finite

    def check(out, rows_nan=(1, 2, 3), masked=4, ref_rows=None):
        flat = out.reshape(6, -1)
        for i in rows_nan:
            assert torch.isnan(flat[i]).all(), i
        assert torch.equal(flat[masked], torch.zeros_like(flat[masked]))
        assert torch.isfinite(flat[[0, 5]]).all()
        if ref_rows is not None:
            assert torch.allclose(
                flat[[0, 5]].double(), ref_rows.reshape(2, -1), rtol=0.02, atol=1e-3
            )

    if dtype != torch.float64:
        check(_cpu.softmax(z), ref_rows=torch.softmax(zero_nan[[0, 5]], -1))
    check(
        _cpu.softmax_vjp_logits(z, v),
        ref_rows=_core.vjp_logits_last(zero_nan[[0, 5]], v.double()[[0, 5]]),
    )
    lse = torch.logsumexp(z.double(), -1, keepdim=True)
    check(_cpu.softmax_vjp_from_logits(z, lse, v))
    check(_cpu.jacobian_logits(z), ref_rows=_core.jacobian_logits_last(zero_nan[[0, 5]]))
    # from probabilities: a NaN in σ (or v) makes the row NaN
    p = torch.softmax(zero_nan, -1).to(dtype)
    p[1, 1] = math.nan
    p[2, 0] = math.nan  # at the first entry (the argmax search starts there)
    p[3, k - 1] = math.nan
    p[4] = 0.0
    check(_cpu.softmax_jacobian_dense(p))
    vv = v.clone()
    check(_cpu.softmax_vjp(p, vv))
    # a NaN in v alone
    vn = v.clone()
    vn[0, k - 1] = math.nan
    out = _cpu.softmax_vjp_logits(torch.randn(6, k, dtype=torch.float64).to(dtype), vn)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_vjp_logits_exact_near_overflow(dtype):
    """|v| near the overflow threshold: the exact result is representable and returned
    finite (v scaled by a power of two inside the kernel)."""
    big = torch.finfo(dtype).max * 0.95
    torch.manual_seed(3)
    for k in (2, 4, 37, 600):
        z = torch.randn(3, k, dtype=torch.float64)
        z[2] = 0.0  # tied: S = K
        v = torch.zeros(3, k, dtype=torch.float64)
        v[:, 0], v[:, 1] = big, -big
        v[:, 2:] = torch.rand(3, k - 2, dtype=torch.float64) * big - big / 2
        z, v = z.to(dtype), v.to(dtype)
        out = _cpu.softmax_vjp_logits(z, v)
        sh = 2.0**-16  # J is linear in v: the reference on v scaled by an exact power of two
        ref = _core.vjp_logits_last(z.double(), v.double() * sh) / sh
        assert torch.isfinite(ref).all() and torch.isfinite(out).all(), k
        scale = exact_vjp_scale(z.double(), v.double() * sh) / sh
        err = (out.double() - ref).abs()
        assert (err <= 32 * COMPUTE_EPS[dtype] * scale + 1e-300).all(), k


# ---------------------------------------------------------------------------------------------
# the softmax forward's row argmax and the VJP that takes it


def _first_argmax_or_minus_one(z: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest logit, −1 for rows that are fully masked or hold
    a NaN or +inf (independent of the kernels: torch on float64)."""
    z64 = z.double().reshape(-1, z.shape[-1])
    bad = z64.isnan().any(-1) | (z64 == math.inf).any(-1) | (z64 == -math.inf).all(-1)
    first = (z64 == z64.amax(-1, keepdim=True)).to(torch.int64).argmax(-1)
    return torch.where(bad, -1, first)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("k", (1, 3, 8, 64, 128, 511, 513, 1000, 4097))
def test_cpu_softmax_argmax_and_vjp_argmax(dtype, k):
    """``softmax(z, argmax=True)`` returns the first argmax of every row (−1 for masked and NaN
    rows) next to the same σ as without it; ``softmax_vjp_argmax`` with it is J(σ)v within the
    entrywise bound of :func:`vjp_error_ratio` (argmax entry included) and agrees with the
    kernel that finds i* itself to a few roundings."""
    g = torch.Generator().manual_seed(k)
    z = (4.0 * torch.randn(8, k, generator=g, dtype=torch.float64)).to(dtype)
    z[1] = 0.5  # all tied: i* = 0
    z[2, k // 2 :] = 7.0  # a tie later in the row: the first one counts
    z[3] = -math.inf  # fully masked
    z[4, k - 1] = math.nan
    z[5, 0] = math.inf
    z[6, :-1] = -math.inf  # only the last entry alive
    p, idx = _cpu.softmax(z, argmax=True)
    assert idx.dtype == torch.int32 and idx.shape == (8,)
    assert torch.equal(idx.long(), _first_argmax_or_minus_one(z))
    assert torch.equal(p.nan_to_num(7.0), _cpu.softmax(z).nan_to_num(7.0))
    v = torch.randn(8, k, generator=g, dtype=torch.float64).to(dtype)
    out = _cpu.softmax_vjp_argmax(p, v, idx)
    assert out.dtype == dtype and out.shape == p.shape
    assert bool(out[[4, 5]].isnan().all())
    assert torch.equal(out[3], torch.zeros(k, dtype=dtype))
    good = [0, 1, 2, 6, 7]
    assert vjp_error_ratio(out[good], p[good], v[good]) <= 1.0
    # the kernel that finds i* itself: the same formula, sums added in another order, so
    # the two agree to a few roundings of each entry's scale
    same = _cpu.softmax_vjp(p, v)[good]
    pg, vg = p[good].double(), v[good].double()
    scale = pg * (vg.abs() + (pg * vg.abs()).sum(-1, keepdim=True))
    fi = torch.finfo(dtype)
    tol = 8 * COMPUTE_EPS[dtype] * scale + fi.eps * same.double().abs() + fi.tiny * fi.eps
    assert bool(((out[good].double() - same.double()).abs() <= tol).all())
    # strided v (the incoming gradient need not be contiguous)
    vt = torch.randn(k, 8, generator=g, dtype=torch.float64).to(dtype).mT
    out_t = _cpu.softmax_vjp_argmax(p, vt, idx)
    assert vjp_error_ratio(out_t[good], p[good], vt[good]) <= 1.0


@needs_cpu_kernel
def test_cpu_softmax_exp_fast_path_boundary():
    """The forward's exponential takes a shorter path where every lane is at least −87.33
    (normal results) and the full one elsewhere: σ = exp(−t)/(1 + exp(−t)) on a fine grid of t
    across both switch points (normal/subnormal near 87.34, the smallest subnormal near
    103.97), within 2 ulps or one subnormal spacing of float64, in rows whose other lanes are
    all on the fast side (so the vector holding −t decides alone)."""
    t = torch.linspace(86.5, 104.5, 4001, dtype=torch.float64)
    z = torch.zeros(t.numel(), 16, dtype=torch.float64)
    z[:, 1] = -t
    z[:, 2:] = -1.0
    z32 = z.float()
    out = _cpu.softmax(z32).double()
    ref = torch.softmax(z32.double(), -1)
    spacing = torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps
    err = (out - ref).abs()
    assert bool((err <= 2 * torch.finfo(torch.float32).eps * ref + spacing).all())
    assert bool((out[:, 1] > 0).sum() > 0) and out[-1, 1] == 0.0


@needs_cpu_kernel
@pytest.mark.parametrize("n", (64, 2100))
def test_cpu_row_kernels_on_both_sides_of_the_static_split(n):
    """float32 row data below 8 MiB is split statically between threads, above it by the
    guided schedule (``SJ_FOR_ROWS_f32``): the softmax forward, its backward from the
    forward's argmax and the exact VJP from logits agree with float64 references on both
    sides (64 × 1000 and 2100 × 1000 float32, the latter 8.4 MB), with 2 threads."""
    g = torch.Generator().manual_seed(11)
    z = 4.0 * torch.randn(n, 1000, generator=g)
    v = torch.randn(n, 1000, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p, idx = _cpu.softmax(z, argmax=True)
        out = _cpu.softmax_vjp_argmax(p, v, idx)
        exact = _cpu.softmax_vjp_logits(z, v)
    finally:
        torch.set_num_threads(threads)
    p64 = torch.softmax(z.double(), -1)
    # σ_j to a few ulps plus the rounding of each z_k − max z in float32 (|z_k − m| · 2⁻²⁴
    # relative, entering σ_j through exp(z_j − m) and the sum; torch.softmax in float32 has
    # the same)
    shift = (z.double() - z.double().amax(-1, keepdim=True)).abs()
    tol = 4 * 2**-23 + (shift + shift.amax(-1, keepdim=True)) * 2**-24
    assert bool(((p.double() - p64).abs() <= tol * p64).all())
    assert torch.equal(idx.long(), z.argmax(-1))
    assert vjp_error_ratio(out, p, v) <= 1.0
    ref = _core.vjp_logits_last(z.double(), v.double())
    scale = p64 * (v.double().abs() + (p64 * v.double().abs()).sum(-1, keepdim=True))
    tol = 4 * 2**-23 + shift.amax(-1, keepdim=True) * 2**-24
    assert bool(((exact.double() - ref).abs() <= tol * scale).all())


@needs_cpu_kernel
def test_cpu_softmax_exp_within_an_ulp():
    """The kernels' exponential itself, read off the forward: in a row ``[0, x]`` with
    ``x <= -17.5`` the sum rounds to 1, so σ₁ is the kernel's ``exp(x)`` unrounded by the
    division; on 200 001 arguments across the normal range and into the subnormal one it is
    within one ulp of float64's exp (or one subnormal spacing)."""
    x = torch.linspace(-103.5, -17.5, 200_001, dtype=torch.float64).float()
    z = torch.zeros(x.numel(), 2)
    z[:, 1] = x
    got = _cpu.softmax(z)[:, 1].double()
    want = torch.exp(x.double())
    ulp = torch.maximum(
        torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(want)),
        torch.full_like(want, 2.0**-149),
    )
    assert bool(((got - want).abs() <= ulp).all())
    assert bool((_cpu.softmax(z)[:, 0] == 1.0).all())


@needs_cpu_kernel
def test_softmax_backward_uses_the_forward_argmax():
    """The eager C path end to end: ``softjac.softmax`` forward + backward against torch's
    autograd in float64, for rows with ties, masks and a fully masked row (zero gradient)."""
    g = torch.Generator().manual_seed(5)
    z = (3.0 * torch.randn(6, 300, generator=g)).float()
    z[1] = 2.0
    z[2, ::2] = -math.inf
    z[3] = -math.inf
    w = torch.randn(6, 300, generator=g)
    zr = z.clone().requires_grad_()
    (softjac.softmax(zr) * w).sum().backward()
    z64 = z.double().clone()
    z64[3] = 0.0  # torch would give NaN for the fully masked row; its gradient must be 0
    z64r = z64.requires_grad_()
    p64 = torch.softmax(z64r, -1)
    (p64 * w.double()).sum().backward()
    ref = z64r.grad.clone()
    ref[3] = 0.0
    pd, wa = p64.detach(), w.double().abs()
    scale = pd * (wa + (pd * wa).sum(-1, keepdim=True))
    assert bool(((zr.grad.double() - ref).abs() <= 64 * 2**-23 * scale + 1e-37).all())
    assert torch.equal(zr.grad[3], torch.zeros(300))


def test_traced_resolution_is_the_eager_decision(monkeypatch):
    """``dispatch._resolve(..., traced=True)`` (what a ``torch.compile`` trace asks to choose a
    Triton op) gives, while compiling, the decision ``auto`` makes for the same device, dtype
    and shape outside the compiler, not the "keep to torch" of an untraced call."""
    x = torch.randn(4, 6)
    eager = {op: dispatch._resolve("f", "auto", x, op) for op in ("softmax", "softmax_vjp")}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for op, chosen in eager.items():
        assert dispatch._resolve("f", "auto", x, op, traced=True) == chosen
        assert dispatch._resolve("f", "auto", x, op) == "torch"


@needs_cpu_kernel
@pytest.mark.parametrize("k", (2, 9, 128, 1000))
def test_cpu_nan_among_masked_entries(k):
    """A NaN whose row is otherwise fully masked (−inf) is a NaN row, not a masked one (zeros):
    in the softmax forward (argmax −1), the exact VJP from logits and the softmax backward."""
    z = torch.full((3, k), -math.inf)
    z[0, k // 2] = math.nan
    z[1, k - 1] = math.nan
    z[2] = torch.randn(k)
    p, idx = _cpu.softmax(z, argmax=True)
    assert bool(p[:2].isnan().all()) and bool(p[2].isfinite().all())
    assert idx.tolist()[:2] == [-1, -1]
    u = _cpu.softmax_vjp_logits(z, torch.randn(3, k))
    assert bool(u[:2].isnan().all()) and bool(u[2].isfinite().all())
    zr = z.clone().requires_grad_()
    softjac.softmax(zr).backward(torch.randn(3, k))
    assert bool(zr.grad[:2].isnan().all()) and bool(zr.grad[2].isfinite().all())


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_cpu_half_rows_scratch_and_element_wise_paths(dtype):
    """Half rows run the float32 vector row on a widened scratch copy; rows too long for the
    scratch (the VJP's three buffers above 2^20 floats) take the element-wise loop. Both give
    J(σ)v within the entrywise bound, and the cross-entropy gradient matches F.cross_entropy's
    in float64 at a length that uses the scratch."""
    for k in (4097, 350_000):
        p, v = make_inputs(2, k, dtype, spread=2.0, seed=k)
        assert vjp_error_ratio(_cpu.softmax_vjp(p, v), p, v) <= 1.0
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(3, 70_000, generator=g)).to(dtype)
    y = torch.tensor([5, 69_999, 0])
    loss, stats = _cpu.cross_entropy_forward(z, y, None, -100, 0.0, stats=True)
    grad = _cpu.cross_entropy_backward(z, y, stats, torch.ones(3), None, -100, 0.0)
    zd = z.double().requires_grad_()
    ref = F.cross_entropy(zd, y, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), zd)
    assert torch.allclose(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    fi = torch.finfo(dtype)  # rounding to the half type, subnormal spacing included
    assert torch.allclose(grad.double(), ref_grad, rtol=2 * fi.eps, atol=fi.tiny * fi.eps)
