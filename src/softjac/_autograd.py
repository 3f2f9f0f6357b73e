"""Layer 4: ``torch.autograd.Function``s for softmax and cross-entropy.

Every Function here is in the ``torch.func``-ready form (``forward`` without ctx,
``setup_context``, ``backward``, ``jvp`` and an explicit ``vmap`` rule), so it works under
``torch.autograd``, forward-mode AD (dual tensors included) and ``torch.func`` (grad, vjp, jvp,
vmap, jacrev, jacfwd, hessian). All of them work on tensors whose class dimension is the
*last* one; ``dim``, masks and temperature are handled by the callers with ordinary
(differentiable) torch ops.

Three ways to the same kernels (``softjac.kernels.dispatch`` decides which kernel, always):

* nothing to record (no input requires grad with grad mode on, no dual tensor, plain tensors):
  the ``dispatch.run_*`` call directly, with no autograd bookkeeping;
* ``torch.compile`` tracing: the registered ops ``torch.ops.softjac.*``
  (``softjac.kernels._ops``: fake implementations, registered autograd), which stay nodes of
  the graph — Dynamo cannot trace a Function that defines ``jvp``; where ``dispatch`` resolves
  the backend to Triton, their ``triton_op`` twins, whose launches the compiler sees
  (``softjac.kernels._ops.call``);
* otherwise: the Functions below, whose ``forward`` calls the same ``run_*`` function.

The entry points are :func:`softmax_last`, :func:`vjp_probs`, :func:`vjp_logits` and
:func:`jacobian_logits`. The Functions and what they compute (``σ = softmax(z)``,
``J = diag(σ) − σσᵀ``):

* :class:`SoftmaxLast` ``z ↦ σ``. Saves σ (and in eager C calls each row's argmax).
  Backward and JVP are the same product
  ``J u = σ ⊙ (u − ⟨σ, u⟩)`` (J is symmetric), evaluated by :class:`SoftmaxVJP`.
* :class:`SoftmaxVJP` ``(σ, v) ↦ J(σ) v``, its own Function so that the backward of softmax
  is differentiable in closed form: with ``u = σ ⊙ v − σ ⟨σ, v⟩``,

  - ``∂⟨g, u⟩/∂v = J g`` (again a :class:`SoftmaxVJP`, so every order works),
  - ``∂⟨g, u⟩/∂σ = g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩``.

  Autograd chains the σ-part through σ's own graph node (``J``), which gives the second
  derivative ``∂²σ_i/∂z_j∂z_k`` (``docs/math.md``, Derivatives) without ever forming it. A plain
  backward (grad mode off, i.e. no ``create_graph``) calls the kernel directly instead.
* :class:`VJPLogits` ``(z, v) ↦ J(σ(z)) v`` exactly from logits (σ never rounded on its own):
  ``∂/∂v = J g``, ``∂/∂z = J (g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩)``.
* :class:`JacobianLogits` ``z ↦ J`` (dense, exactly from logits):
  ``∂⟨G, J⟩/∂z = J (diag(G) − (G + Gᵀ) σ)``; tangent ``diag(dσ) − dσ σᵀ − σ dσᵀ``.
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
entry point once on the physical tensors.

Call overhead: ``Function.apply`` of the ``setup_context`` form binds its arguments in Python
on every call (each ``forward`` here carries a precomputed ``__signature__`` to make that
cheaper); eager calls on plain tensors go through a ctx-form twin of each Function instead
(:func:`_eager_twin`, same ``backward`` and ``jvp``), several times cheaper per call.
"""

from __future__ import annotations

import inspect

import torch

from softjac import _core
from softjac._checks import as_float_dtype
from softjac.kernels import _ce_ops, _ops, dispatch

__all__ = [
    "CrossEntropyBackward",
    "CrossEntropyRows",
    "JacobianLogits",
    "SoftmaxLast",
    "SoftmaxVJP",
    "VJPLogits",
    "cross_entropy_rows",
    "jacobian_logits",
    "softmax_last",
    "softmax_last_autograd",
    "vjp_logits",
    "vjp_probs",
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


def _fixed_signature(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Store ``inspect.signature(cls.forward)`` on the function (``__signature__``), which
    ``Function.apply``'s per-call argument binding then reads instead of re-inspecting."""
    fwd = cls.__dict__["forward"].__func__
    fwd.__signature__ = inspect.signature(fwd)
    return cls


def _memory(*tensors: torch.Tensor) -> bool:
    """Whether a Function's ``forward`` got tensors with memory. It does except under the
    batched tensors of ``torch.autograd.gradcheck(..., check_batched_grad=True)`` (the older
    vmap, which calls ``forward`` on them); there the registered op runs instead, which that
    vmap evaluates slice by slice, so the chosen kernel still computes every value."""
    for t in tensors:  # (a loop, not all(generator): this runs on every call)
        if not dispatch.has_memory(t):
            return False
    return True


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether no autograd mode, transform or compiler must see a computation on
    ``tensors`` (then the kernel runs directly, without a Function)."""
    return not _compiling() and not dispatch.graph_needs(*tensors)


def _eager_twin(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function in the ctx-style form (``forward(ctx, ...)`` runs ``cls.forward``
    then ``cls.setup_context``, or is ``cls.eager_forward`` where the class defines one; same
    ``backward`` and ``jvp``).

    ``Function.apply`` of the ``setup_context`` form binds its arguments to ``forward``'s
    signature in Python on every call and costs several times more than the ctx form; the
    ctx form supports reverse mode, double backward and forward mode (dual tensors) alike but
    not ``torch.func`` transforms, under which ``apply`` raises before running anything.
    :func:`_apply` uses the twin and falls back to ``cls`` there."""

    def forward(ctx, *args):
        out = cls.forward(*args)
        cls.setup_context(ctx, args, out)
        return out

    eager = cls.__dict__.get("eager_forward")
    body = {
        "forward": staticmethod(forward) if eager is None else eager,
        "backward": cls.__dict__["backward"],
        "jvp": cls.__dict__["jvp"],
        "__doc__": f"ctx-form twin of :class:`{cls.__name__}` (eager calls, no transform).",
    }
    return type(f"_Eager{cls.__name__}", (torch.autograd.Function,), body)


_TWINS: dict[type, type[torch.autograd.Function]] = {}


def _apply(cls: type[torch.autograd.Function], *args):
    """``cls.apply(*args)`` through its ctx-form twin when every tensor argument is a plain
    tensor with memory (no ``torch.func`` wrapper); the twin's ``apply`` refuses, before running
    anything, when a ``torch.func`` transform is active, and then ``cls`` itself runs."""
    for a in args:  # (a loop, not all(generator): this runs on every call)
        if isinstance(a, torch.Tensor) and not dispatch.has_memory(a):
            return cls.apply(*args)
    twin = _TWINS.get(cls)
    if twin is None:
        twin = _TWINS[cls] = _eager_twin(cls)
    try:
        return twin.apply(*args)
    except RuntimeError as exc:
        if "setup_context" not in str(exc):
            raise
    return cls.apply(*args)


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


@_fixed_signature
class SoftmaxVJP(torch.autograd.Function):
    """``u = J(σ) v = σ ⊙ (v − ⟨σ, v⟩)`` over the last dim; O(K) per row, J never formed.

    Inputs ``σ`` (probabilities) and ``v`` of the same shape; output in σ's dtype (half types
    computed in float32 by the kernel). Differentiable in both inputs to any order (see the
    module docstring for the formulas).
    """

    @staticmethod
    def forward(p: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        if _memory(p, v):
            # a tensor of its own (never a view) in p's layout: Function outputs must not be
            # views of intermediates under forward-mode batching
            return _ops.same_layout(p, dispatch.run_softmax_vjp(p, v.to(p.dtype), backend))
        return _ops.softmax_vjp(p, v.to(p.dtype), backend)

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
            gv = vjp_probs(p, gu, ctx.backend).to(v.dtype)
        if ctx.needs_input_grad[0]:
            gp = _ops.probs_partial(gu, p, v).to(p.dtype)
        return gp, gv, None

    @staticmethod
    def jvp(ctx, dp, dv, _):
        p, v = ctx.saved_tensors
        out = None
        if dv is not None:
            out = vjp_probs(p, dv, ctx.backend)
        if dp is not None:
            extra = _ops.probs_tangent(dp, p, v).to(p.dtype)
            out = extra if out is None else out + extra
        if out is None:
            out = torch.zeros_like(p)
        return out

    @staticmethod
    def vmap(info, in_dims, p, v, backend):
        pd, vd, _ = in_dims
        size = info.batch_size
        return vjp_probs(_batched(p, pd, size), _batched(v, vd, size), backend), 0


@_fixed_signature
class SoftmaxLast(torch.autograd.Function):
    """``σ(z) = exp(z − lse(z))`` over the last dim; masked (−inf) entries give 0 and a fully
    masked row gives zeros (and a zero gradient), never NaN. O(K) per row.

    Saves σ (in the output dtype). Backward and JVP: ``J u`` by :class:`SoftmaxVJP`. Eager
    calls (:meth:`eager_forward`) also keep each row's argmax when the C kernel ran (int32 per
    row), which a plain backward hands to the C VJP kernel: one reduction pass instead of
    two there.
    """

    @staticmethod
    def forward(z: torch.Tensor, backend: str) -> torch.Tensor:
        if _memory(z):
            return dispatch.run_softmax(z, backend)
        return _ops.softmax(z, backend)

    @staticmethod
    def eager_forward(ctx, z: torch.Tensor, backend: str) -> torch.Tensor:
        """The ctx-form forward of the eager twin (:func:`_eager_twin`): ``forward`` plus
        ``setup_context``, keeping the rows' argmax (or None) as ``ctx.argmax``."""
        out, argmax = dispatch.run_softmax_argmax(z, backend)
        SoftmaxLast.setup_context(ctx, (z, backend), out)
        ctx.argmax = argmax
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[1]
        ctx.argmax = None
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the product is recorded
            return vjp_probs(p, g, ctx.backend), None
        # plain backward: nothing records this product; σ of the eager C forward (ctx.argmax
        # set) has memory, only g needs a look
        kernel_ok = _memory(g) if ctx.argmax is not None else _memory(p, g)
        if kernel_ok:
            return dispatch.run_softmax_vjp(p, g, ctx.backend, ctx.argmax), None
        return vjp_probs(p, g, ctx.backend), None

    @staticmethod
    def jvp(ctx, dz, _):
        (p,) = ctx.saved_tensors
        return vjp_probs(p, dz, ctx.backend)

    @staticmethod
    def vmap(info, in_dims, z, backend):
        return softmax_last(_batched(z, in_dims[0], info.batch_size), backend), 0


@_fixed_signature
class VJPLogits(torch.autograd.Function):
    """``u = J(σ(z)) v`` over the last dim exactly from logits (σ never rounded on its own);
    O(K) per row. Output in ``z``'s dtype; differentiable in ``z`` and ``v`` to any order."""

    @staticmethod
    def forward(z: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        if _memory(z, v):
            return dispatch.run_softmax_vjp_logits(z, v, backend)
        return _ops.softmax_vjp_logits(z, v, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, v, backend = inputs
        ctx.backend = backend
        ctx.save_for_backward(z, v)
        ctx.save_for_forward(z, v)

    @staticmethod
    def backward(ctx, g):
        z, v = ctx.saved_tensors
        gz = gv = None
        if ctx.needs_input_grad[1]:
            gv = vjp_logits(z, g, ctx.backend).to(v.dtype)
        if ctx.needs_input_grad[0]:
            p, vc, gc = _up(softmax_last(z, ctx.backend)), _up(v), _up(g)
            a = gc * (vc - _dot(p, vc)) - vc * _dot(gc, p)
            gz = vjp_logits(z, a, ctx.backend)
        return gz, gv, None

    @staticmethod
    def jvp(ctx, dz, dv, _):
        z, v = ctx.saved_tensors
        out = None
        if dv is not None:
            out = vjp_logits(z, dv, ctx.backend)
        if dz is not None:
            p, vc = _up(softmax_last(z, ctx.backend)), _up(v)
            dp = _up(vjp_logits(z, dz, ctx.backend))
            extra = (dp * (vc - _dot(p, vc)) - p * _dot(dp, vc)).to(z.dtype)
            out = extra if out is None else out + extra
        if out is None:
            out = torch.zeros_like(z)
        return out

    @staticmethod
    def vmap(info, in_dims, z, v, backend):
        zd, vd, _ = in_dims
        size = info.batch_size
        return vjp_logits(_batched(z, zd, size), _batched(v, vd, size), backend), 0


@_fixed_signature
class JacobianLogits(torch.autograd.Function):
    """Dense ``J = diag(σ) − σσᵀ`` of shape ``(..., K, K)`` exactly from logits; O(K²) per
    row. Output in ``z``'s dtype; differentiable to any order."""

    @staticmethod
    def forward(z: torch.Tensor, backend: str) -> torch.Tensor:
        if _memory(z):
            return dispatch.run_jacobian_logits(z, backend)
        return _ops.jacobian_logits(z, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[1]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, gj):
        (z,) = ctx.saved_tensors
        p, g = _up(softmax_last(z, ctx.backend)), _up(gj)
        a = g.diagonal(dim1=-2, dim2=-1) - ((g + g.mT) @ p.unsqueeze(-1)).squeeze(-1)
        return vjp_logits(z, a, ctx.backend), None

    @staticmethod
    def jvp(ctx, dz, _):
        (z,) = ctx.saved_tensors
        p = _up(softmax_last(z, ctx.backend))
        dp = _up(vjp_logits(z, dz, ctx.backend))
        outer = dp.unsqueeze(-1) * p.unsqueeze(-2)
        return (torch.diag_embed(dp) - outer - outer.mT).to(z.dtype)

    @staticmethod
    def vmap(info, in_dims, z, backend):
        return jacobian_logits(_batched(z, in_dims[0], info.batch_size), backend), 0


def softmax_last(z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``σ = softmax(z)`` over the last dim (``backend`` already checked): the
    kernel directly, the registered op under ``torch.compile``, else :class:`SoftmaxLast`."""
    if _compiling():
        return _ops.call("softmax", backend, z)
    # a training call (z requires grad) records without asking graph_needs what else might
    # (the Function covers a dual z too): graph_needs' dual-tensor check costs more than the
    # rest of this function
    if not (z.requires_grad and torch.is_grad_enabled()) and not dispatch.graph_needs(z):
        return dispatch.run_softmax(z, backend)
    return _apply(SoftmaxLast, z, backend)


def vjp_probs(p: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``J(σ) v`` with ``σ = p`` (last dim), in ``p``'s dtype."""
    if _compiling():
        return _ops.call("softmax_vjp", backend, p, v.to(p.dtype))
    if _plain(p, v):
        return dispatch.run_softmax_vjp(p, v, backend)
    return _apply(SoftmaxVJP, p, v, backend)


def vjp_logits(z: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable exact ``J(σ(z)) v`` from logits (last dim), in ``z``'s dtype."""
    if v.dtype != z.dtype:
        v = v.to(z.dtype)
    if _compiling():
        return _ops.call("softmax_vjp_logits", backend, z, v)
    if _plain(z, v):
        return dispatch.run_softmax_vjp_logits(z, v, backend)
    return _apply(VJPLogits, z, v, backend)


def jacobian_logits(z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable exact dense ``diag(σ) − σσᵀ`` from logits (last dim), in ``z``'s dtype."""
    if _compiling():
        return _ops.call("jacobian_logits", backend, z)
    if _plain(z):
        return dispatch.run_jacobian_logits(z, backend)
    return _apply(JacobianLogits, z, backend)


def softmax_last_autograd(z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``σ = softmax(z)`` over the last dim of already masked/scaled logits.

    ``σ_i = exp(z_i − lse(z))``, computed in at least float32 and returned in ``z``'s dtype.
    Backward is the O(K) product ``σ ⊙ (g − ⟨g, σ⟩)`` (the kernel ``dispatch`` picks for
    ``backend``); forward mode, double backward, every ``torch.func`` transform and
    ``torch.compile`` work (see :class:`SoftmaxLast`). A fully masked row (all −inf) gives
    zeros and a zero gradient.

    Args:
        z: floating tensor, classes on the last dim (−inf = masked).
        backend: kernel choice, ``"auto" | "torch" | "triton" | "cpu"``.

    Returns:
        σ with the shape and dtype of ``z``. Cost O(K) per row, forward and backward; kept
        for backward: σ, and where the C kernel ran each row's argmax (int32).
    """
    dispatch.check_backend("softjac.softmax", backend)
    return softmax_last(z, backend)


# Names the cross-entropy Functions use.
_apply_softmax = softmax_last
_apply_vjp = vjp_probs


# --------------------------------------------------------------------------------------------
# cross-entropy (class-index targets, 2-D logits)
# --------------------------------------------------------------------------------------------


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


@_fixed_signature
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
        if not _memory(logits, grad_rows, target, m, ls):  # gradcheck's batched tensors
            args = (logits, grad_rows, target, m, ls, weight, ignore_index, eps, backend)
            return _ce_ops.cross_entropy_backward(*args)
        return dispatch.cross_entropy_backward(
            logits, target, (m, ls), grad_rows, weight, ignore_index, eps, inplace=False,
            backend=backend,
        )  # fmt: skip

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


@_fixed_signature
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
        if not _memory(logits, target):  # gradcheck's batched tensors: the op, slice by slice
            return _ce_ops.cross_entropy_forward(logits, target, weight, ignore_index, eps, backend)
        loss, (m, ls) = dispatch.cross_entropy_forward(
            logits, target, weight, ignore_index, eps, backend=backend, stats=True
        )
        return loss, m, ls

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, eps, backend = inputs
        ctx.opts = (ignore_index, eps, backend)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # no zero tensors for the unused m, ls cotangents
        ctx.save_for_backward(logits, target, weight, output[1], output[2])
        ctx.save_for_forward(logits, target, weight, output[1], output[2])

    @staticmethod
    def backward(ctx, g_loss, _g_m, _g_ls):
        logits, target, weight, m, ls = ctx.saved_tensors
        ignore_index, eps, backend = ctx.opts
        if g_loss is None:
            return None, None, None, None, None, None
        # Ignored rows get exactly 0 in every backend whatever their logits and cotangent (a
        # 'mean' over no valid row gives an infinite cotangent; 0 · inf must not become NaN).
        args = (logits, g_loss, target, m, ls, weight, ignore_index, eps, backend)
        if _plain(logits, g_loss, weight):  # plain backward: the kernel call, no bookkeeping
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
# torch.compile: the registered ops ``torch.ops.softjac.cross_entropy_forward/backward``
# (``softjac.kernels._ce_ops``: fake implementations, registered autograd), so the compiled
# graph holds the kernels (Dynamo cannot trace an autograd.Function that defines ``jvp``, and
# forward-mode AD is not traced by torch.compile anyway). Eager autograd uses the Functions.
# --------------------------------------------------------------------------------------------


def _apply_ce_backward(*args):
    if _compiling():
        return _ops.call("cross_entropy_backward", args[-1], *args[:-1])
    return _apply(CrossEntropyBackward, *args)


def _apply_ce_rows(*args):
    if _compiling():
        return _ops.call("cross_entropy_forward", args[-1], *args[:-1])
    return _apply(CrossEntropyRows, *args)
