"""``vjp_from_probs`` on probabilities rounded to bfloat16/float16 (``docs/math.md``,
"Half-precision probabilities"): (a) it is the product with the matrix
``diag(σ̂) − σ̂σ̂ᵀ + (Σσ̂ − 1) σ̂_{i*} e_{i*}e_{i*}ᵀ`` built from the rounded σ̂, rounded once to
the half dtype; (b) it is within the documented bound of ``J(σ) v`` of the unrounded σ."""

import pytest
import torch

import softjac
from softjac.kernels import _cpu

K = 33
HALF = {torch.bfloat16: (2.0**-8, 2.0**-134), torch.float16: (2.0**-11, 2.0**-25)}
BACKENDS = ["torch", "auto"] + (["cpu"] if _cpu.available() else []) + ["triton"]


def _logits() -> torch.Tensor:
    """Float64 logits: random, peaked (spread 30), tied (all equal, and a tied top pair) and
    masked rows."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(K, generator=g, dtype=torch.float64) * s for s in (1.0, 3.0, 8.0)]
    peaked = torch.rand(K, generator=g, dtype=torch.float64) * 30.0
    peaked[5] = 30.0
    rows += [peaked, torch.zeros(K, dtype=torch.float64)]
    top = torch.randn(K, generator=g, dtype=torch.float64)
    top[[3, 17]] = 4.0
    rows.append(top)
    masked = torch.randn(K, generator=g, dtype=torch.float64) * 2.0
    masked[torch.rand(K, generator=g) < 0.4] = float("-inf")
    rows.append(masked)
    return torch.stack(rows)


def _v(dtype: torch.dtype, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(12)
    v = torch.randn(n, K, generator=g, dtype=torch.float64) * 4.0
    v[1] *= 1e-3  # a row of small cotangents (subnormal float16 results)
    return v.to(dtype)


def _run(p: torch.Tensor, v: torch.Tensor, backend: str, monkeypatch) -> torch.Tensor:
    """``vjp_from_probs``; the Triton backend through the kernel tests' setup (the interpreter
    on CPU tensors where there is no CUDA device; skipped without triton)."""
    if backend != "triton":
        return softjac.vjp_from_probs(p, v, backend=backend)
    kt = pytest.importorskip("tests.test_kernels_triton")
    if kt.DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return kt.on_dev(softjac.vjp_from_probs, p, v, backend="triton")


def _out_rounding(dtype: torch.dtype, backend: str) -> float:
    """The result's rounding in half ulps: 1 (to nearest), but 2 for bfloat16 under the Triton
    interpreter, whose float32 -> bfloat16 cast truncates (a CUDA device rounds to nearest)."""
    interp = backend == "triton" and not torch.cuda.is_available()
    return 2.0 if interp and dtype == torch.bfloat16 else 1.0


def _derived_matrix(p: torch.Tensor) -> torch.Tensor:
    """``diag(p) − p pᵀ + (Σp − 1) p_{i*} e_{i*}e_{i*}ᵀ`` in float64, i* the first largest entry."""
    m = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    i = p.argmax(dim=-1)
    rows = torch.arange(p.shape[0])
    m[rows, i, i] += (p.sum(dim=-1) - 1.0) * p[rows, i]
    return m


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at |x| (x float64), subnormal spacing as the floor."""
    info = torch.finfo(dtype)
    mant = info.eps  # spacing at 1
    exp = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return 0.5 * mant * torch.exp2(exp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(HALF))
def test_half_probs_is_the_derived_matrix_product(
    dtype: torch.dtype, backend: str, monkeypatch
) -> None:
    p = torch.softmax(_logits(), dim=-1).to(dtype)
    v = _v(dtype, p.shape[0])
    out = _run(p, v, backend, monkeypatch)
    assert out.dtype == dtype
    exact = (_derived_matrix(p.double()) @ v.double().unsqueeze(-1)).squeeze(-1)
    # float32 evaluation (relative ~K·2^-24 of σ̂_i(|v_i| + Σ_j σ̂_j |v_j|)) plus one rounding
    pd, vd = p.double(), v.double()
    total = pd.sum(-1, keepdim=True).clamp_min(1.0)
    scale = pd * (total * vd.abs() + (pd * vd.abs()).sum(-1, keepdim=True))
    tol = _out_rounding(dtype, backend) * _half_ulp(exact, dtype) + 4 * K * 2.0**-24 * scale + 1e-30
    err = (out.double() - exact).abs()
    assert (err <= tol).all(), (err / tol).max()
    # the derived matrix is not J(σ̂) where Σσ̂ ≠ 1: at least one row tells them apart
    plain = (torch.diag_embed(pd) - pd.unsqueeze(-1) * pd.unsqueeze(-2)) @ vd.unsqueeze(-1)
    assert ((out.double() - plain.squeeze(-1)).abs() > tol).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(HALF))
def test_half_probs_within_the_stated_bound(dtype: torch.dtype, backend: str, monkeypatch) -> None:
    u, eta = HALF[dtype]
    sigma = torch.softmax(_logits(), dim=-1)  # float64, unrounded
    p = sigma.to(dtype)
    v = _v(dtype, p.shape[0])
    out = _run(p, v, backend, monkeypatch).double()
    vd = v.double()
    exact = sigma * (vd - (sigma * vd).sum(-1, keepdim=True))
    a = sigma * (vd.abs() + (sigma * vd.abs()).sum(-1, keepdim=True))
    n = K + 2
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    l1 = vd.abs().sum(-1, keepdim=True)
    # 2u from rounding σ, one rounding of the result (two units where it truncates)
    c = 2 + _out_rounding(dtype, backend)
    bound = (c * u + (c + 2) * u * u + 2 * gamma) * a + eta * ((K + 4) * (vd.abs() + l1) + 1)
    err = (out - exact).abs()
    assert (err <= bound).all(), (err / bound).max()
    # the bound is of the right size: half the main term is exceeded somewhere
    assert (err > 0.5 * u * a).any()
