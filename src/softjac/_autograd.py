"""Layer 4: ``torch.autograd.Function``s for softmax and cross-entropy.

Every Function here is in the ``torch.func``-ready form (``forward`` without ctx,
``setup_context``, ``backward``, ``jvp`` and an explicit ``vmap`` rule), so it works under
``torch.autograd``, forward-mode AD, ``torch.func`` (grad, vjp, jvp, vmap, jacrev, jacfwd,
hessian) and ``torch.compile``. All of them work on tensors whose class dimension is the
*last* one; ``dim``, masks and temperature are handled by the callers with ordinary
(differentiable) torch ops.

The Functions and what they compute (``σ = softmax(z)``, ``J = diag(σ) − σσᵀ``):

* :class:`SoftmaxLast` ``z ↦ σ``. Saves only σ. Backward and JVP are the same product
  ``J u = σ ⊙ (u − ⟨σ, u⟩)`` (J is symmetric), evaluated by :class:`SoftmaxVJP`.
* :class:`SoftmaxVJP` ``(σ, v) ↦ J(σ) v`` through ``dispatch.softmax_vjp`` (the accurate O(K)
  kernel). It is its own Function so that the backward of softmax is differentiable in closed
  form: with ``u = σ ⊙ v − σ ⟨σ, v⟩``,

  - ``∂⟨g, u⟩/∂v = J g`` (again a :class:`SoftmaxVJP`, so every order works),
  - ``∂⟨g, u⟩/∂σ = g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩``.

  Autograd chains the σ-part through σ's own graph node (``J``), which gives the second
  derivative ``∂²σ_i/∂z_j∂z_k`` of ``shared/MATH.md`` without ever forming it. A plain
  backward (grad mode off, i.e. no ``create_graph``) calls the kernel directly instead.
* :class:`CrossEntropyRows` ``(z, y) ↦ (loss_n, m_n, ls_n)`` per row through
  ``dispatch.cross_entropy_forward(..., stats=True)`` (float32 math, float64 for float64
  logits; unreduced, the reduction is done by the caller with torch ops; ``lse = m + ls`` is
  kept as the pair so that σ = ``exp((z − m) − ls)`` is accurate to the row's spread).
  Backward is ``g_n (a_n σ_n − b_n)`` (σ − y with weights and label smoothing) through
  ``dispatch.cross_entropy_backward`` — never in place on the logits, exactly 0 on ignored
  rows.
* :class:`CrossEntropyBackward` ``(z, g) ↦ g_n (a_n σ_n − b_n)``, its own Function so that
  cross-entropy is twice differentiable: ``∂/∂z = g_n a_n J_n`` (a :class:`SoftmaxVJP`) and
  ``∂/∂g_n = a_n σ_n − b_n``.

Here ``a_n = (1 − ε) w[y_n] + (ε/K) Σ_c w[c]`` and ``b_n = (1 − ε) w[y_n] e_{y_n} + (ε/K) w``
for non-ignored rows (both 0 for ignored rows), ``w`` the class weights and ``ε`` the label
smoothing; so the Hessian of ``loss_n`` with respect to ``z_n`` is ``a_n J_n``.

vmap: each Function has an explicit rule instead of ``generate_vmap_rule=True``, because the
kernels behind ``dispatch`` (Triton, C) cannot run on batched tensors. The rules move the
vmapped dimension to the front (softmax: the class dimension stays last, so a leading batch
dimension is just more rows) or flatten it into the rows (cross-entropy) and call the same
Function once on the physical tensors.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fw_ad

from softjac import _core
from softjac._checks import as_float_dtype
from softjac.kernels import dispatch

__all__ = [
    "CrossEntropyBackward",
    "CrossEntropyRows",
    "SoftmaxLast",
    "SoftmaxVJP",
    "cross_entropy_rows",
    "softmax_last_autograd",
]


def _batched(x: torch.Tensor | None, bdim: int | None, size: int) -> torch.Tensor | None:
    """Physical tensor with the vmapped dimension first (expanded if ``x`` is not batched)."""
    if x is None:
        return None
    if bdim is None:
        return x.unsqueeze(0).expand(size, *x.shape)
    return x.movedim(bdim, 0)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(as_float_dtype(x.dtype))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``⟨a, b⟩`` over the last dim, keepdim."""
    return (a * b).sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


class SoftmaxVJP(torch.autograd.Function):
    """``u = J(σ) v = σ ⊙ (v − ⟨σ, v⟩)`` over the last dim; O(K) per row, J never formed.

    Inputs ``σ`` (probabilities) and ``v`` of the same shape; output in σ's dtype (half types
    computed in float32 by the kernel). Differentiable in both inputs to any order (see the
    module docstring for the formulas).
    """

    @staticmethod
    def forward(p: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        return dispatch.softmax_vjp(p, v.to(p.dtype), backend=backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, v, backend = inputs
        ctx.backend = backend
        ctx.save_for_backward(p, v)
        ctx.save_for_forward(p, v)

    @staticmethod
    def backward(ctx, gu):
        p, v = ctx.saved_tensors
        gp = gv = None
        if ctx.needs_input_grad[1]:
            gv = _apply_vjp(p, gu, ctx.backend).to(v.dtype)
        if ctx.needs_input_grad[0]:
            pc, vc, gc = _up(p), _up(v), _up(gu)
            gp = (gc * (vc - _dot(pc, vc)) - vc * _dot(gc, pc)).to(p.dtype)
        return gp, gv, None

    @staticmethod
    def jvp(ctx, dp, dv, _):
        p, v = ctx.saved_tensors
        out = None
        if dv is not None:
            out = _apply_vjp(p, dv, ctx.backend)
        if dp is not None:
            pc, vc, dpc = _up(p), _up(v), _up(dp)
            extra = (dpc * (vc - _dot(pc, vc)) - pc * _dot(dpc, vc)).to(p.dtype)
            out = extra if out is None else out + extra
        if out is None:
            out = torch.zeros_like(p)
        return out

    @staticmethod
    def vmap(info, in_dims, p, v, backend):
        pd, vd, _ = in_dims
        size = info.batch_size
        return _apply_vjp(_batched(p, pd, size), _batched(v, vd, size), backend), 0


class SoftmaxLast(torch.autograd.Function):
    """``σ(z) = exp(z − lse(z))`` over the last dim; masked (−inf) entries give 0 and a fully
    masked row gives zeros (and a zero gradient), never NaN. O(K) per row.

    Saves only σ (in the output dtype). Backward and JVP: ``J u`` by :class:`SoftmaxVJP`.
    """

    @staticmethod
    def forward(z: torch.Tensor, backend: str) -> torch.Tensor:
        # the C kernel on CPU (float32/half), PyTorch's fused softmax with the fully masked
        # rows set to 0 elsewhere (``dispatch.softmax``)
        return dispatch.softmax(z, backend=backend)

    @classmethod
    def apply(cls, z: torch.Tensor, backend: str) -> torch.Tensor:  # type: ignore[override]
        # Nothing can differentiate through this call (no grad needed, no forward-mode dual
        # level open, no torch.func transform, no torch.compile tracing, a plain tensor and no
        # torch function mode): run forward directly. Function.apply costs ~50 µs per call on
        # CPU (argument binding through inspect.signature, the C++ node) for nothing there.
        if (
            type(z) is torch.Tensor
            and not (z.requires_grad and torch.is_grad_enabled())
            and _fw_ad._current_level < 0
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._is_torch_function_mode_enabled()
            and not _compiling()
        ):
            return cls.forward(z, backend)
        return _apply_positional(cls, (z, backend), 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            # plain backward (no create_graph): nothing will differentiate this product, so
            # call the kernel directly and skip the Function's bookkeeping
            return dispatch.softmax_vjp(p, g.to(p.dtype), backend=ctx.backend), None
        return _apply_vjp(p, g, ctx.backend), None

    @staticmethod
    def jvp(ctx, dz, _):
        (p,) = ctx.saved_tensors
        return _apply_vjp(p, dz, ctx.backend)

    @staticmethod
    def vmap(info, in_dims, z, backend):
        return _apply_softmax(_batched(z, in_dims[0], info.batch_size), backend), 0


def softmax_last_autograd(z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``σ = softmax(z)`` over the last dim of already masked/scaled logits.

    ``σ_i = exp(z_i − lse(z))``, computed in at least float32 and returned in ``z``'s dtype.
    Backward is the O(K) product ``σ ⊙ (g − ⟨g, σ⟩)`` through ``dispatch.softmax_vjp``;
    forward mode, double backward and every ``torch.func`` transform work (see
    :class:`SoftmaxLast`). A fully masked row (all −inf) gives zeros and a zero gradient.

    Args:
        z: floating tensor, classes on the last dim (−inf = masked).
        backend: kernel choice for the products, ``"auto" | "torch" | "triton" | "cpu"``.

    Returns:
        σ with the shape and dtype of ``z``. Cost O(K) per row, forward and backward; the
        only tensor kept for backward is σ.
    """
    dispatch.check_backend("softjac.softmax", backend)
    return _apply_softmax(z, backend)


# --------------------------------------------------------------------------------------------
# cross-entropy (class-index targets, 2-D logits)
# --------------------------------------------------------------------------------------------


def _apply_positional(cls, args, nargs):
    """``Function.apply`` without its per-call ``inspect.signature`` binding (~20-40 µs on CPU)
    when every argument is given positionally (as all callers here do) and no torch.func
    transform is active; otherwise (or under torch.compile) the plain path. The dead-wrapper
    unwrapping of ``Function.apply`` is kept (the arguments are flat)."""
    if len(args) != nargs or torch._C._are_functorch_transforms_active() or _compiling():
        return torch.autograd.Function.apply.__func__(cls, *args)
    unwrap = torch._C._functorch.unwrap_if_dead
    args = tuple(unwrap(a) if isinstance(a, torch.Tensor) else a for a in args)
    return super(torch.autograd.Function, cls).apply(*args)


def _ce_rows(x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy logits with the classes last: ``(N, K)`` as is, the ``(B, K, M)`` layout
    (classes in the middle) as a ``(B, M, K)`` view."""
    return x.movedim(1, -1) if x.ndim == 3 else x


def _ce_unrows(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_ce_rows`."""
    return x.movedim(-1, 1) if x.ndim == 3 else x


def _merge2(x: torch.Tensor | None, bdim: int | None, size: int) -> torch.Tensor | None:
    """The vmapped dimension moved first and merged with the next one (more rows)."""
    x = _batched(x, bdim, size)
    return None if x is None else x.reshape(-1, *x.shape[2:])


class CrossEntropyBackward(torch.autograd.Function):
    """``G(z, g)_n = g_n (a_n σ(z_n) − b_n)``: the cross-entropy gradient, as a Function.

    Inputs: logits ``(N, K)``, ``grad_rows (N,)``, and the non-differentiable target ``(N,)``,
    the forward's pair ``m (N,)``, ``ls (N,)`` (``lse = m + ls``; float32, float64 for float64
    logits), weight, ignore_index, label smoothing, backend. Forward is one
    ``dispatch.cross_entropy_backward`` call with σ = ``exp((z − m) − ls)`` (float32 math,
    float64 for float64 logits; output in the logits dtype, not in place; ignored rows exactly
    0). Derivatives: ``∂⟨Γ, G⟩/∂z_n = g_n a_n J_n Γ_n`` and ``∂⟨Γ, G⟩/∂g_n = ⟨Γ_n, a_n σ_n −
    b_n⟩``, both O(N·K); σ is recomputed through :class:`SoftmaxLast` so that these are
    differentiable again.
    """

    @staticmethod
    def forward(logits, grad_rows, target, m, ls, weight, ignore_index, eps, backend):
        return dispatch.cross_entropy_backward(
            logits, target, (m, ls), grad_rows, weight, ignore_index, eps, inplace=False,
            backend=backend,
        )  # fmt: skip

    @classmethod
    def apply(cls, *args):  # type: ignore[override]
        return _apply_positional(cls, args, 9)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, grad_rows, target, _m, _ls, weight, ignore_index, eps, backend = inputs
        ctx.opts = (ignore_index, eps, backend)
        ctx.save_for_backward(logits, grad_rows, target, weight)
        ctx.save_for_forward(logits, grad_rows, target, weight)

    @staticmethod
    def _scale(p, grad_rows, target, weight, ignore_index, eps):
        """``g_n a_n`` per row (keepdim), exactly 0 on ignored rows."""
        k = p.shape[-1]
        valid, *_, a = _core.ce_terms(target, weight, ignore_index, eps, k, p.device, p.dtype)
        scale = torch.where(valid, grad_rows.to(p.dtype) * a, torch.zeros_like(a))
        return scale.unsqueeze(-1)

    @staticmethod
    def backward(ctx, gG):
        logits, grad_rows, target, weight = ctx.saved_tensors
        ignore_index, eps, backend = ctx.opts
        p = _apply_softmax(_up(_ce_rows(logits)), backend)
        gc = _up(_ce_rows(gG))
        gz = gg = None
        if ctx.needs_input_grad[0]:
            scale = CrossEntropyBackward._scale(p, grad_rows, target, weight, ignore_index, eps)
            gz = _ce_unrows((_apply_vjp(p, gc, backend) * scale).to(logits.dtype))
        if ctx.needs_input_grad[1]:
            g1 = _core.ce_grad_from_probs(p, target, weight, ignore_index, eps)
            gg = (gc * g1).sum(-1).to(grad_rows.dtype)
        return gz, gg, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dz, dg, *_):
        logits, grad_rows, target, weight = ctx.saved_tensors
        ignore_index, eps, backend = ctx.opts
        p = _apply_softmax(_up(_ce_rows(logits)), backend)
        out = torch.zeros_like(p)
        if dz is not None:
            scale = CrossEntropyBackward._scale(p, grad_rows, target, weight, ignore_index, eps)
            out = out + _apply_vjp(p, _up(_ce_rows(dz)), backend) * scale
        if dg is not None:
            g1 = _core.ce_grad_from_probs(p, target, weight, ignore_index, eps)
            out = out + g1 * dg.to(p.dtype).unsqueeze(-1)
        return _ce_unrows(out.to(logits.dtype))

    @staticmethod
    def vmap(info, in_dims, logits, grad_rows, target, m, ls, weight, ignore_index, eps, backend):
        if in_dims[5] is not None:
            raise NotImplementedError(
                "`softjac.cross_entropy`: vmap over `weight` is not supported; vmap over the "
                "logits, target and cotangents instead."
            )
        b = info.batch_size
        z = _batched(logits, in_dims[0], b)
        out = _apply_ce_backward(
            z.reshape(-1, *z.shape[2:]),
            _merge2(grad_rows, in_dims[1], b),
            _merge2(target, in_dims[2], b),
            _merge2(m, in_dims[3], b),
            _merge2(ls, in_dims[4], b),
            weight,
            ignore_index,
            eps,
            backend,
        )
        return out.reshape(z.shape), 0


class CrossEntropyRows(torch.autograd.Function):
    """Per-row cross-entropy ``loss_n = (1 − ε) w[y_n] (lse_n − z_{n,y_n}) +
    (ε/K) Σ_c w[c] (lse_n − z_{n,c})`` (exactly 0 for ignored rows), float32 (float64 for
    float64 logits), with every ``lse − z_c`` formed as ``ls − (z_c − m)`` (accurate to the
    row's spread, ``softjac._core.ce_forward_last``).

    Inputs: logits ``(N, K)`` (any float dtype), int64 target ``(N,)`` (validated by the
    caller), weight ``(K,)`` or None (treated as a constant: no gradient), ignore_index, label
    smoothing ε, backend. Outputs ``(loss (N,), m (N,), ls (N,))``; ``m`` and ``ls`` are
    non-differentiable. Backward is :class:`CrossEntropyBackward` (σ − y directly, O(N·K));
    saves the logits, target, m and ls.
    """

    @staticmethod
    def forward(logits, target, weight, ignore_index, eps, backend):
        loss, (m, ls) = dispatch.cross_entropy_forward(
            logits, target, weight, ignore_index, eps, backend=backend, stats=True
        )
        return loss, m, ls

    @classmethod
    def apply(cls, *args):  # type: ignore[override]
        return _apply_positional(cls, args, 6)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, eps, backend = inputs
        ctx.opts = (ignore_index, eps, backend)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(logits, target, weight, output[1], output[2])
        ctx.save_for_forward(logits, target, weight, output[1], output[2])

    @staticmethod
    def backward(ctx, g_loss, _g_m, _g_ls):
        logits, target, weight, m, ls = ctx.saved_tensors
        ignore_index, eps, backend = ctx.opts
        # Ignored rows get exactly 0 in every backend whatever their logits and cotangent (a
        # 'mean' over no valid row gives an infinite cotangent; 0 · inf must not become NaN).
        args = (logits, g_loss, target, m, ls, weight, ignore_index, eps, backend)
        if not torch.is_grad_enabled():  # plain backward: the kernel call, no bookkeeping
            return CrossEntropyBackward.forward(*args), None, None, None, None, None
        return _apply_ce_backward(*args), None, None, None, None, None

    @staticmethod
    def jvp(ctx, dz, *_):
        logits, target, weight, m, ls = ctx.saved_tensors
        ignore_index, eps, backend = ctx.opts
        ones = torch.ones_like(m)
        g1 = _apply_ce_backward(logits, ones, target, m, ls, weight, ignore_index, eps, backend)
        dloss = (_up(g1) * _up(dz)).sum(1 if logits.ndim == 3 else -1).to(m.dtype)
        return dloss, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, ignore_index, eps, backend):
        if in_dims[2] is not None:
            raise NotImplementedError(
                "`softjac.cross_entropy`: vmap over `weight` is not supported; vmap over the "
                "logits and target instead."
            )
        b = info.batch_size
        z = _batched(logits, in_dims[0], b)
        t = _merge2(target, in_dims[1], b)
        out = _apply_ce_rows(z.reshape(-1, *z.shape[2:]), t, weight, ignore_index, eps, backend)
        shape = (b, z.shape[1], *z.shape[3:])  # the rows: logits' shape without the classes
        return tuple(x.reshape(shape) for x in out), (0, 0, 0)


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Unreduced, differentiable cross-entropy of 2-D logits ``(N, K)`` and int64 targets
    ``(N,)`` — or of logits ``(B, K, M)`` with the classes in the middle and targets ``(B, M)``
    (read in place by the C kernel) —: ``loss_n`` in float32 (float64 for float64 logits; 0 for
    ignored rows), see :class:`CrossEntropyRows`.

    Gradient ``g_n (a_n σ_n − b_n)`` computed directly in O(N·K); twice differentiable with
    Hessian ``a_n J_n`` per row. Inputs are not validated here (the public
    ``softjac.cross_entropy`` does that, targets included).
    """
    dispatch.check_backend("softjac.cross_entropy", backend)
    return _apply_ce_rows(
        logits, target, weight, int(ignore_index), float(label_smoothing), backend
    )[0]


# --------------------------------------------------------------------------------------------
# torch.compile: Dynamo cannot trace an autograd.Function that defines ``jvp`` (it graph-breaks
# with "Unsupported custom jvp"). Under compilation the same Functions are used without their
# ``jvp`` (forward-mode AD is not traced by torch.compile anyway); everything else is shared.
# --------------------------------------------------------------------------------------------

_NO_JVP = staticmethod(torch.autograd.Function.jvp)


class _SoftmaxVJPCompiled(SoftmaxVJP):
    jvp = _NO_JVP


class _SoftmaxLastCompiled(SoftmaxLast):
    jvp = _NO_JVP
    apply = torch.autograd.Function.__dict__["apply"]  # the plain one, for dynamo


class _CrossEntropyBackwardCompiled(CrossEntropyBackward):
    jvp = _NO_JVP
    apply = torch.autograd.Function.__dict__["apply"]  # the plain one, for dynamo


class _CrossEntropyRowsCompiled(CrossEntropyRows):
    jvp = _NO_JVP
    apply = torch.autograd.Function.__dict__["apply"]


def _traceable(backend: str) -> str:
    # Under compilation "auto" means the torch implementation: Inductor fuses it, and a kernel
    # called through ctypes or a Triton launcher would break the graph.
    return "torch" if backend == "auto" else backend


def _apply_vjp(p, v, backend):
    if _compiling():
        return _SoftmaxVJPCompiled.apply(p, v, _traceable(backend))
    return _apply_positional(SoftmaxVJP, (p, v, backend), 3)


def _apply_softmax(z, backend):
    if _compiling():
        return _SoftmaxLastCompiled.apply(z, _traceable(backend))
    return SoftmaxLast.apply(z, backend)


def _apply_ce_backward(*args):
    if _compiling():
        return _CrossEntropyBackwardCompiled.apply(*args[:-1], _traceable(args[-1]))
    return CrossEntropyBackward.apply(*args)


def _apply_ce_rows(*args):
    if _compiling():
        return _CrossEntropyRowsCompiled.apply(*args[:-1], _traceable(args[-1]))
    return CrossEntropyRows.apply(*args)
