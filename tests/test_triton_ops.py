"""The Triton kernels as ``torch.library.triton_op``s (``torch.ops.softjac.<name>_triton``).

Values and gradients of every op against float64 references (``softjac._reference``,
autograd through ``F.cross_entropy``), the fake implementations against the real outputs
(``torch.library.opcheck``), vmap, and ``torch.compile(fullgraph=True)`` of the public API with
``backend="triton"``: the captured graph holds the Triton ops and equals eager mode.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tiny sizes): there the
graph Dynamo captures holds the Triton ops, and compiling through AOTAutograd (``aot_eager``)
gives eager mode's values (the interpreted bodies are recorded as the custom ops). The
``triton_kernel_wrapper_functional`` nodes are checked by tracing the compiled (not
interpreted) kernels on fake tensors in a separate process (``tests/_sm90.py``, which also
compiles every kernel configuration the ops can launch for sm_90) and, on a GPU, with
Inductor (the ``gpu`` test).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import softjac
from softjac._reference import jacobian_ref, softmax_ref, vjp_ref
from tests.conftest import capture_graphs, import_triton_kernels, softjac_targets

DEVICE, (_triton, _) = import_triton_kernels("_triton", "_triton_ops")  # (_triton_ops: the ops)

OPS = torch.ops.softjac
TRITON_OPS = (
    "softmax_triton",
    "softmax_vjp_triton",
    "softmax_vjp_logits_triton",
    "softmax_jacobian_triton",
    "jacobian_logits_triton",
    "cross_entropy_forward_triton",
    "cross_entropy_backward_triton",
)
# absolute tolerances on entries of size <= 1 (σ, J, J v for |v| <= 4)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def dev(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _inputs(n, k, dtype, seed=0):
    """Logits (one row partly masked), σ of the rounded logits rounded to ``dtype``, and v."""
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    z[min(1, n - 1), : k // 4] = float("-inf")
    p = softmax_ref(z).to(dtype)
    v = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    return z, p, v


def _dense(p):
    """``diag(σ) − σσᵀ`` of given probabilities, float64 (differentiable)."""
    p = p.double()
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _close(out, ref, dtype, scale=1.0):
    assert out.dtype == dtype
    out = out.cpu().double()
    tol = TOL[dtype] * scale
    assert torch.allclose(out, ref, atol=tol, rtol=tol), (out - ref).abs().max().item()


# --------------------------------------------------------------------------------------------
# eager values


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_softmax_family_values(dtype):
    z, p, v = _inputs(3, 37, dtype)
    _close(OPS.softmax_triton(dev(z)), softmax_ref(z), dtype)
    _close(
        OPS.softmax_vjp_triton(dev(p), dev(v)), (_dense(p) @ v.double()[..., None])[..., 0], dtype
    )
    _close(OPS.softmax_vjp_logits_triton(dev(z), dev(v)), vjp_ref(z, v), dtype)
    _close(OPS.softmax_jacobian_triton(dev(p)), _dense(p), dtype)
    _close(OPS.jacobian_logits_triton(dev(z)), jacobian_ref(z), dtype)


def test_split_rows_and_layouts():
    """Rows longer than the one-program limit (the split kernels), a batch-transposed input
    and an empty one: the results are contiguous, as the fake implementations say."""
    k = _triton.SPLIT_THRESHOLD + 9
    z, p, v = _inputs(1, k, torch.float32, seed=1)

    def jv(p64, v64):  # σ ⊙ (v − ⟨σ, v⟩) in float64, without the K×K matrix
        return p64 * (v64 - (p64 * v64).sum(-1, keepdim=True))

    _close(OPS.softmax_vjp_triton(dev(p), dev(v)), jv(p.double(), v.double()), torch.float32)
    _close(
        OPS.softmax_vjp_logits_triton(dev(z), dev(v)), jv(softmax_ref(z), v.double()), torch.float32
    )
    z, p, v = _inputs(6, 20, torch.float32, seed=2)
    zt, vt = z.reshape(2, 3, 20).transpose(0, 1), v.reshape(2, 3, 20).transpose(0, 1)
    out = OPS.softmax_vjp_logits_triton(dev(zt), dev(vt))
    assert out.is_contiguous() and out.shape == (3, 2, 20)
    _close(out, vjp_ref(zt, vt), torch.float32)
    empty = OPS.softmax_vjp_triton(dev(torch.empty(0, 5)), dev(torch.empty(0, 5)))
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("case", range(3))
def test_cross_entropy_values_and_gradients(case):
    """Loss rows, ``lse = m + ls`` and the gradient against ``F.cross_entropy`` in float64,
    for 2-D logits and for ``(B, K, M)`` logits with the classes in the middle."""
    weight, eps, ignore = [(False, 0.0, -100), (True, 0.1, 2), (False, 0.2, 2)][case]
    g = torch.Generator().manual_seed(case)
    k = 11
    w = torch.rand(k, generator=g) + 0.5 if weight else None
    for shape, tshape in (((5, k), (5,)), ((2, k, 3), (2, 3))):
        z = 4 * torch.randn(shape, generator=g)
        t = torch.randint(0, k, tshape, generator=g)
        t.view(-1)[2] = ignore
        gr = torch.rand(tshape, generator=g)
        loss, m, ls = OPS.cross_entropy_forward_triton(dev(z), dev(t), dev(w), ignore, eps)
        zz = z.double().requires_grad_()
        ref = F.cross_entropy(
            zz, t, weight=None if w is None else w.double(), ignore_index=ignore,
            label_smoothing=eps, reduction="none",
        )  # fmt: skip
        (ref_grad,) = torch.autograd.grad((ref * gr.double()).sum(), zz)
        assert loss.shape == m.shape == ls.shape == tshape
        assert torch.allclose(loss.cpu().double(), ref.detach(), atol=1e-5, rtol=1e-5)
        lse = torch.logsumexp(z.double(), 1)
        assert torch.allclose((m + ls).cpu().double(), lse, atol=1e-5, rtol=1e-6)
        grad = OPS.cross_entropy_backward_triton(
            dev(z), dev(gr), dev(t), m, ls, dev(w), ignore, eps
        )
        assert grad.shape == z.shape and grad.is_contiguous()
        assert torch.allclose(grad.cpu().double(), ref_grad, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# gradients through the registered autograd


def _grads(fn, inputs, weights, *, create_graph=False):
    out = fn(*inputs)
    return torch.autograd.grad((out.double() * weights).sum(), inputs, create_graph=create_graph)


def test_softmax_family_gradients():
    """``∂⟨w, op(x)⟩/∂x`` of every softmax-family op against autograd of the float64
    reference formulas; the VJP from σ is chained through softmax (``z ↦ J(σ(z)) v``), where
    the derivative of the argmax formula equals that of ``diag(σ) − σσᵀ``."""
    z, p, v = _inputs(3, 9, torch.float32, seed=3)
    z[1] = z[1].clamp(min=-20.0)  # no masked entries: every partial is finite
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 9, generator=g, dtype=torch.float64)
    w2 = torch.randn(3, 9, 9, generator=g, dtype=torch.float64)
    zd, pd, vd = (dev(x).detach().clone().requires_grad_() for x in (z, p, v))
    z64, p64, v64 = (x.double().requires_grad_() for x in (z, p, v))
    cases = [
        (OPS.softmax_triton, (zd,), softmax_ref, (z64,), w),
        (
            lambda a, b: OPS.softmax_vjp_triton(OPS.softmax_triton(a), b),
            (zd, vd),
            vjp_ref,
            (z64, v64),
            w,
        ),
        (OPS.softmax_vjp_logits_triton, (zd, vd), vjp_ref, (z64, v64), w),
        (OPS.softmax_jacobian_triton, (pd,), _dense, (p64,), w2),
        (OPS.jacobian_logits_triton, (zd,), jacobian_ref, (z64,), w2),
    ]
    for op, args, ref, ref_args, weights in cases:
        got = _grads(op, args, dev(weights))
        want = _grads(ref, ref_args, weights)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a.cpu().double(), b, atol=3e-5, rtol=1e-4), op


def test_second_derivatives():
    """Double backward: the Hessian-vector products of ``⟨w, σ⟩`` (softmax → VJP ops) and of
    a cross-entropy (forward → backward → VJP ops) against float64 autograd."""
    g = torch.Generator().manual_seed(5)
    z = 2 * torch.randn(4, 7, generator=g)
    w, u = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    t = torch.tensor([0, 3, 6, 1])
    weight = torch.rand(7, generator=g) + 0.5

    def hvp(f, x):
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(f(x), x, create_graph=True)
        (h,) = torch.autograd.grad((gx * u.to(x)).sum(), x)
        return h.cpu().double()

    got = hvp(lambda x: (OPS.softmax_triton(x) * dev(w)).sum(), dev(z))
    want = hvp(lambda x: (softmax_ref(x) * w.double()).sum(), z.double())
    assert torch.allclose(got, want, atol=3e-5, rtol=1e-4)

    def ce(x):
        return OPS.cross_entropy_forward_triton(x, dev(t), dev(weight), -100, 0.1)[0].sum()

    def ce_ref(x):
        loss = F.cross_entropy(x, t, weight=weight.double(), label_smoothing=0.1, reduction="none")
        return loss.sum()

    assert torch.allclose(hvp(ce, dev(z)), hvp(ce_ref, z.double()), atol=3e-5, rtol=1e-4)


def test_vmap():
    _, p, v = _inputs(6, 12, torch.float32, seed=6)
    p3, v3 = dev(p.reshape(2, 3, 12)), dev(v.reshape(2, 3, 12))
    out = torch.vmap(OPS.softmax_vjp_triton, in_dims=(1, 1))(p3, v3)
    assert torch.equal(out.cpu(), OPS.softmax_vjp_triton(p3, v3).transpose(0, 1).cpu())


@pytest.mark.parametrize("name", TRITON_OPS)
def test_opcheck(name):
    """``torch.library.opcheck``: the schema, the autograd registration, and what
    ``torch.compile`` is told about each op's outputs (its fake implementation) against what
    the op returns — shape, dtype, device and strides. On CUDA also AOTAutograd with dynamic
    shapes (the decomposed kernel launches)."""
    z, p, v = _inputs(2, 6, torch.bfloat16, seed=8)
    t = torch.tensor([1, 4])
    m, ls = torch.zeros(2), torch.ones(2)
    w = torch.rand(6) + 0.5
    args = {
        "softmax_triton": (z,),
        "softmax_vjp_triton": (p, v),
        "softmax_vjp_logits_triton": (z, v),
        "softmax_jacobian_triton": (p,),
        "jacobian_logits_triton": (z,),
        "cross_entropy_forward_triton": (z, t, w, -100, 0.1),
        "cross_entropy_backward_triton": (z, torch.ones(2), t, m, ls, None, 1, 0.0),
    }[name]
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if DEVICE == "cuda":
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(OPS, name).default, tuple(map(dev, args)), test_utils=utils)


def test_vmap_cross_entropy():
    """vmap over a batch of row blocks equals one call per block (the rows are folded)."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(3, 4, 9, generator=g)
    t = torch.randint(0, 9, (3, 4), generator=g)
    loss, m, ls = torch.vmap(OPS.cross_entropy_forward_triton, in_dims=(0, 0, None, None, None))(
        dev(z), dev(t), None, -100, 0.0
    )
    for b in range(3):
        want = OPS.cross_entropy_forward_triton(dev(z[b]), dev(t[b]), None, -100, 0.0)
        for got, ref in zip((loss[b], m[b], ls[b]), want, strict=True):
            assert torch.equal(got.cpu(), ref.cpu())


# --------------------------------------------------------------------------------------------
# torch.compile


def _model(z, v, target, backend):
    p = softjac.softmax(z, temperature=0.5, backend=backend)
    a = softjac.vjp(z, v, backend=backend)
    c = softjac.vjp_from_probs(p, v, backend=backend)
    j = softjac.jacobian(z, backend=backend)
    loss = softjac.cross_entropy(z, target, label_smoothing=0.1, backend=backend)
    return (p * v).sum() + a.square().sum() + c.square().sum() + j.square().sum() + loss


def _reference_model(z, v, target):
    p = softmax_ref(z / 0.5)
    a = vjp_ref(z, v)
    c = (_dense(p) @ v.double()[..., None])[..., 0]
    j = jacobian_ref(z)
    loss = F.cross_entropy(z, target, label_smoothing=0.1)
    return (p * v).sum() + a.square().sum() + c.square().sum() + j.square().sum() + loss


def test_compile_records_the_triton_ops():
    """``backend="triton"`` under ``torch.compile(fullgraph=True)``: the captured graph calls
    the Triton ops (no opaque op of these families), and the value and the gradient equal
    eager mode and the float64 reference."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    z, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    target = torch.tensor([0, 5, 2])
    graphs = []
    compiled = torch.compile(_model, backend=capture_graphs(graphs), fullgraph=True)
    zc, ze = dev(z).clone().requires_grad_(), dev(z).clone().requires_grad_()
    out = compiled(zc, dev(v), dev(target), "triton")
    (gc,) = torch.autograd.grad(out, zc)
    eager = _model(ze, dev(v), dev(target), "triton")
    (ge,) = torch.autograd.grad(eager, ze)
    z64 = z.double().requires_grad_()
    ref = _reference_model(z64, v.double(), target)
    (gr,) = torch.autograd.grad(ref, z64)

    targets = softjac_targets(graphs)
    assert {
        "softjac.softmax_triton.default",
        "softjac.softmax_vjp_triton.default",
        "softjac.softmax_vjp_logits_triton.default",
        "softjac.jacobian_logits_triton.default",
        "softjac.cross_entropy_forward_triton.default",
    } <= targets
    assert all(t.endswith("_triton.default") for t in targets), targets
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gc, ge, atol=1e-6, rtol=1e-6)
    assert abs(out.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    assert torch.allclose(gc.cpu().double(), gr, atol=1e-4, rtol=1e-4)


def test_compile_through_aot_autograd_equals_eager():
    """The same model compiled with ``aot_eager`` (AOTAutograd, forward and backward graphs):
    value and gradient equal eager mode (on CPU the interpreted kernels run inside the custom
    ops that the Triton ops' bodies record there; on CUDA they are launches in the graph)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    z, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    target = torch.tensor([1, 0, 4])
    compiled = torch.compile(_model, backend="aot_eager", fullgraph=True)
    zc, ze = dev(z).clone().requires_grad_(), dev(z).clone().requires_grad_()
    out = compiled(zc, dev(v), dev(target), "triton")
    (gc,) = torch.autograd.grad(out, zc)
    eager = _model(ze, dev(v), dev(target), "triton")
    (ge,) = torch.autograd.grad(eager, ze)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gc, ge, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_compile_on_cpu_never_records_triton_ops(backend):
    """CPU tensors under the other backends keep their ops (the interpreter being on changes
    nothing for them)."""
    if backend == "cpu" and not softjac.kernels._cpu.available():
        pytest.skip("C kernels unavailable")
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(_model, backend=capture_graphs(graphs), fullgraph=True)
    z = torch.randn(3, 6, requires_grad=True)
    compiled(z, torch.randn(3, 6), torch.tensor([0, 5, 2]), backend)
    assert not any("_triton" in t for t in softjac_targets(graphs))


@pytest.mark.gpu
def test_inductor_sees_the_kernels():
    """On CUDA (``"auto"`` picks Triton): after AOTAutograd the forward and backward graphs
    hold ``triton_kernel_wrapper_functional`` nodes, not opaque softjac ops; Inductor's result
    and gradient equal eager mode and its generated code contains softjac's kernels."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(10)
    z = torch.randn(64, 300, generator=g).cuda()
    v = torch.randn(64, 300, generator=g).cuda()
    target = torch.randint(0, 300, (64,), generator=g).cuda()
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(
        _model, backend=aot_autograd(fw_compiler=grab, bw_compiler=grab), fullgraph=True
    )
    zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = fn(zc, v, target, "auto")
    out.backward()
    assert len(graphs) == 2  # forward and backward
    assert all("triton_kernel_wrapper_functional" in str(gm.graph) for gm in graphs)
    assert not softjac_targets(graphs)  # every softjac op decomposed into its launches
    eager = _model(ze, v, target, "auto")
    eager.backward()
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(zc.grad, ze.grad, atol=1e-5, rtol=1e-5)

    torch._dynamo.reset()
    zi = z.clone().requires_grad_()
    inductor = torch.compile(_model, fullgraph=True)
    out_i, codes = run_and_get_code(lambda: inductor(zi, v, target, "auto"))
    torch.testing.assert_close(out_i, eager, atol=1e-4, rtol=1e-5)
    code = "\n".join(codes)
    assert "_exact_row_kernel" in code and "_jacobian_kernel" in code


# --------------------------------------------------------------------------------------------
# every kernel configuration the ops can launch compiles for sm_90 (no GPU needed)


@functools.cache
def _sm90(*flags):
    """``tests/_sm90.py`` in a fresh process without the interpreter (Triton's own library
    functions are fixed as interpreted in this one); returns its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.join(root, "src"), root, env.get("PYTHONPATH")) if p
    )
    run = subprocess.run(
        [sys.executable, "-m", "tests._sm90", *flags],
        env=env, cwd=root, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.strip().splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_sm90():
    """Each kernel the ops launch (every ``@triton.jit`` kernel of the module), at the
    largest one-row block, for float32, compiled to PTX for sm_90 by Triton's compiler."""
    (report,) = [r for r in _sm90() if "kernels" in r]
    assert report["kernels"] == report["module_kernels"]
    assert len(report["kernels"]) == 11 and report["configurations"] >= 11


def test_aot_graphs_hold_the_kernel_launches():
    """``torch.compile`` of each public function with ``backend="triton"`` traced through
    AOTAutograd as on a GPU (fake tensors, nothing run; see ``tests/_sm90.py``): the joint
    forward-and-backward graph holds one ``triton_kernel_wrapper_functional`` per kernel
    launch (the forward's, and the backward's VJP) and no opaque softjac op."""
    launches = {r["model"]: r["launches"] for r in _sm90() if "model" in r and not r["softjac_ops"]}
    # softmax: PyTorch forward + Triton VJP backward; vjp / jacobian: their kernel + the
    # exact VJP of the backward; vjp_from_probs: the VJP (∂/∂σ is PyTorch code); CE: fwd + bwd
    assert launches == {
        "softmax": 1, "vjp": 2, "vjp_from_probs": 1, "jacobian": 2, "cross_entropy": 2,
    }  # fmt: skip


@pytest.mark.slow
def test_every_configuration_compiles_for_sm90():
    """Every block size, dtype, cross-entropy flag and a range of chunk counts."""
    (report,) = _sm90("--all")
    assert report["kernels"] == report["module_kernels"]
    assert report["configurations"] > 100
