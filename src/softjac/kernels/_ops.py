"""The kernels as registered PyTorch operators: ``torch.ops.softjac.*``.

Each op is a ``torch.library.custom_op`` whose implementation is a ``softjac.kernels.dispatch``
``run_*`` function (the backend decision is made there, at run time, on the real tensors), with

* a fake implementation (output shape, dtype, device and strides without computing), so that
  ``torch.compile(fullgraph=True)`` keeps the op as one node of the graph;
* registered autograd whose backward is made of these ops again (so double backward works and
  a compiled backward graph contains them too);
* a vmap rule that moves the vmapped dimension to the front: the class dim stays last, so the
  batch is just more rows for the kernels.

Forward-mode AD: ``custom_op`` has no forward-AD registration, and an op called on a dual
tensor returns a result *without* a tangent. The callers therefore never hand dual tensors
(or ``torch.func`` wrappers) to these ops: ``dispatch`` and ``softjac._autograd`` route those
through ``torch.autograd.Function``s with a ``jvp`` (or through PyTorch code) instead, and
use the ops for plain tensors and under ``torch.compile``.

Ops (class dim last, any leading shape; ``backend`` is ``"auto" | "torch" | "triton" |
"cpu"``; outputs in the dtype of the first tensor):

* ``softmax(Tensor z, str backend) -> Tensor`` — ``σ = exp(z − lse z)``;
  ``∂/∂z: g ↦ softmax_vjp(σ, g)``.
* ``softmax_vjp(Tensor probs, Tensor v, str backend) -> Tensor`` — ``J(σ) v``;
  ``∂/∂v: g ↦ J g``, ``∂/∂σ: g ↦ g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩``.
* ``softmax_vjp_logits(Tensor z, Tensor v, str backend) -> Tensor`` — ``J(σ(z)) v`` exactly
  from logits; ``∂/∂v: g ↦ J g``, ``∂/∂z: g ↦ J (g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩)``.
* ``softmax_jacobian(Tensor probs, str backend) -> Tensor`` — dense ``(…, K, K)`` from σ;
  ``∂/∂σ: G ↦ diag(G) − (G + Gᵀ) σ``.
* ``jacobian_logits(Tensor z, str backend) -> Tensor`` — dense ``(…, K, K)`` exactly from
  logits; ``∂/∂z: G ↦ J (diag(G) − (G + Gᵀ) σ)``.

Other kernel families register their ops with :func:`register` and the vmap helpers below.

Under ``torch.compile`` the Python layers call the ops through :func:`call`, which records the
``triton_op`` twin ``torch.ops.softjac.<name>_triton`` (``softjac.kernels._triton_ops``)
instead where ``dispatch`` resolves the backend to Triton for the traced tensors, so that the
compiler sees the kernel launches; everywhere else it is the op above.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch

from softjac._checks import as_float_dtype
from softjac.kernels import dispatch

__all__ = [
    "NAMESPACE",
    "call",
    "fake_like",
    "probs_partial",
    "probs_tangent",
    "jacobian_logits",
    "register",
    "registered",
    "same_layout",
    "softmax",
    "softmax_jacobian",
    "softmax_vjp",
    "softmax_vjp_logits",
    "vmap_folding_rows",
    "vmap_leading",
]

NAMESPACE = "softjac"


def register(
    name: str,
    schema: str,
    impl: Callable,
    *,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    vmap: Callable | None = None,
    mutates_args: Sequence[str] = (),
) -> torch.library.OpOverload:
    """Register ``torch.ops.softjac.<name>`` and return its overload (the fastest to call).

    ``schema`` is the argument list and result, e.g. ``"(Tensor z, str backend) -> Tensor"``;
    ``impl`` computes on real tensors, ``fake`` returns empty outputs of the right shape,
    dtype, device and strides (see :func:`same_layout`); ``backward``/``setup_context`` follow
    ``torch.library.register_autograd`` and should call registered ops so that higher-order
    derivatives and compiled backward graphs keep them; ``vmap`` follows
    ``torch.library.register_vmap`` (see :func:`vmap_leading`, :func:`vmap_folding_rows`).
    """
    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", impl, mutates_args=tuple(mutates_args), schema=schema
    )
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    if vmap is not None:
        op.register_vmap(vmap)
    overload = _REGISTERED[name] = getattr(getattr(torch.ops, NAMESPACE), name).default
    return overload


_REGISTERED: dict[str, torch.library.OpOverload] = {}


def registered(name: str) -> torch.library.OpOverload:
    """The op ``torch.ops.softjac.<name>`` registered by :func:`register`."""
    return _REGISTERED[name]


# The ops with a Triton twin (softjac.kernels._triton_ops): the public function named in
# errors and the dispatch op whose kernel decides. softmax has no Triton kernel of its own:
# its twin is PyTorch's forward with the Triton VJP as backward, so the VJP decides.
_TRITON_TWINS = {
    "softmax": ("softjac.softmax", "softmax_vjp"),
    "softmax_vjp": ("softjac.vjp_from_probs", "softmax_vjp"),
    "softmax_vjp_logits": ("softjac.vjp", "softmax_vjp_logits"),
    "softmax_jacobian": ("softjac.jacobian", "softmax_jacobian"),
    "jacobian_logits": ("softjac.jacobian", "jacobian_logits"),
    "cross_entropy_forward": ("softjac.cross_entropy", "cross_entropy_forward"),
    "cross_entropy_backward": ("softjac.cross_entropy", "cross_entropy_backward"),
}


# torch.library.triton_op and wrap_triton exist from torch 2.6; with 2.5 the Triton kernels
# stay inside the custom ops in a compiled graph.
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _traced_triton(name: str, backend: str, x: torch.Tensor) -> bool:
    """Whether ``dispatch`` resolves ``backend`` to ``"triton"`` for op ``name`` on ``x`` as a
    trace sees it. An explicit backend that cannot run is left to the op, which raises when
    it runs, as it does outside the compiler."""
    if backend not in ("auto", "triton") or name not in _TRITON_TWINS or not _HAS_TRITON_OP:
        return False
    if backend == "auto" and x.device.type != "cuda":
        # "auto" chooses Triton for CUDA tensors only; its CPU checks (loading the C
        # kernels) are not for Dynamo to trace, and CPU tensors keep their ops
        return False
    fn, op = _TRITON_TWINS[name]
    try:
        return dispatch._resolve(fn, backend, x, op, traced=True) == "triton"
    except RuntimeError:
        return False


def call(name: str, backend: str, *args: Any) -> Any:
    """``torch.ops.softjac.<name>(*args, backend)``; while ``torch.compile`` traces and
    ``dispatch`` resolves ``backend`` to ``"triton"`` for the first tensor (device, dtype and
    shape of the fake tensor), its ``triton_op`` twin ``torch.ops.softjac.<name>_triton(*args)``
    instead, whose kernel launches the compiler sees (``softjac.kernels._triton_ops``).
    Outside ``torch.compile`` this is the registered op, at the cost of one Python call."""
    if torch.compiler.is_compiling() and _traced_triton(name, backend, args[0]):
        from softjac.kernels import _triton_ops

        return getattr(_triton_ops, name)(*args)
    return _REGISTERED[name](*args, backend)


def same_layout(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` as a tensor of its own in the layout ``torch.empty_like(x)`` has (what the fake
    implementations promise). A contiguous result is returned as it is; a permuted one (the
    CPU VJP kernel returns the layout of an input whose class dim is not innermost, as a
    ``movedim`` view) is copied once, since an op's output must not be a view."""
    if out.is_contiguous() and (x.is_contiguous() or out.stride() == x.stride()):
        return out
    return torch.empty_like(x, dtype=out.dtype).copy_(out)


def fake_like(index: int = 0, *, square: bool = False) -> Callable:
    """A fake implementation returning ``empty_like`` of tensor argument ``index`` (with
    ``square``: a contiguous ``(*shape, K)`` tensor, for dense Jacobians)."""

    def fake(*args):
        x = args[index]
        if square:
            return x.new_empty((*x.shape, x.shape[-1]))
        return torch.empty_like(x)

    return fake


def _front(x, bdim, size):
    if not isinstance(x, torch.Tensor):
        return x
    if bdim is None:
        return x.unsqueeze(0).expand(size, *x.shape)
    return x.movedim(bdim, 0)


def vmap_leading(op: Callable) -> Callable:
    """A vmap rule for an op whose tensors share their leading (row) dims and whose outputs
    are batched like their first input: every tensor argument gets the vmapped dim in front
    (expanded where it is not vmapped), one call of ``op`` on the physical tensors, outputs
    batched at dim 0."""

    def rule(info, in_dims, *args):
        args = tuple(_front(a, d, info.batch_size) for a, d in zip(args, in_dims, strict=True))
        out = op(*args)
        return out, (tuple(0 for _ in out) if isinstance(out, tuple) else 0)

    return rule


def vmap_folding_rows(op: Callable, row_args: Sequence[int], fixed_args: Sequence[int] = ()):
    """A vmap rule for an op on ``(N, …)`` rows (e.g. 2-D logits and ``(N,)`` targets): the
    vmapped dim of each argument in ``row_args`` is folded into its first dim (``B·N`` rows),
    one call of ``op``, and every tensor output is unfolded back to ``(B, N, …)``. Arguments in
    ``fixed_args`` (e.g. class weights) must not be vmapped (``NotImplementedError``)."""

    def rule(info, in_dims, *args):
        b = info.batch_size
        for i in fixed_args:
            if in_dims[i] is not None:
                raise NotImplementedError(
                    f"`torch.ops.{NAMESPACE}`: vmap over argument {i} of this op is not "
                    "supported; vmap over the rows instead."
                )
        args = list(args)
        for i in row_args:
            x = _front(args[i], in_dims[i], b)
            if isinstance(x, torch.Tensor):
                args[i] = x.reshape(b * x.shape[1], *x.shape[2:])
        out = op(*args)
        if isinstance(out, tuple):
            return tuple(o.reshape(b, -1, *o.shape[1:]) for o in out), tuple(0 for _ in out)
        return out.reshape(b, -1, *out.shape[1:]), 0

    return rule


# --------------------------------------------------------------------------------------------
# the softmax family
# --------------------------------------------------------------------------------------------


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(as_float_dtype(x.dtype))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1, keepdim=True)


def probs_partial(g: torch.Tensor, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``∂⟨g, u⟩/∂σ`` for the product ``u = J(σ) v`` the kernels compute, in at least float32.

    The kernels evaluate the argmax entry as ``u_{i*} = σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j)``,
    which equals ``σ_{i*} (v_{i*} − ⟨σ, v⟩)`` on the simplex and is
    ``σ_{i*} (S v_{i*} − ⟨σ, v⟩)`` with ``S = Σ σ`` for any σ. Its exact derivative is
    ``g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩ + g_{i*} v_{i*} (σ_{i*} 1 + (S − 1) e_{i*})``; the last term
    is a constant vector on the simplex (it vanishes through softmax, ``J 1 = 0``) and makes
    finite differences in σ off the simplex agree too."""
    gc, pc, vc = _up(g), _up(p), _up(v)
    idx = pc.argmax(dim=-1, keepdim=True)
    gv = gc.gather(-1, idx) * vc.gather(-1, idx)
    out = gc * (vc - _dot(pc, vc)) - vc * _dot(gc, pc) + gv * pc.gather(-1, idx)
    return out.scatter_add(-1, idx, gv * (pc.sum(dim=-1, keepdim=True) - 1))


def probs_tangent(dp: torch.Tensor, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The tangent of ``u = J(σ) v`` (as the kernels compute it, see :func:`probs_partial`) for
    a tangent ``dσ`` of σ, in at least float32: ``dσ ⊙ (v − ⟨σ, v⟩) − σ ⟨dσ, v⟩`` plus, at the
    argmax, ``v_{i*} ((S − 1) dσ_{i*} + σ_{i*} Σ dσ)``."""
    dc, pc, vc = _up(dp), _up(p), _up(v)
    idx = pc.argmax(dim=-1, keepdim=True)
    vi = vc.gather(-1, idx)
    extra = vi * (
        (pc.sum(-1, keepdim=True) - 1) * dc.gather(-1, idx)
        + pc.gather(-1, idx) * dc.sum(-1, keepdim=True)
    )
    out = dc * (vc - _dot(pc, vc)) - pc * _dot(dc, vc)
    return out.scatter_add(-1, idx, extra)


def _probs_part(g: torch.Tensor, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``∂⟨g, J(σ) v⟩/∂σ = g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩`` (σ on the simplex, where the argmax
    correction of :func:`probs_partial` vanishes after the chain through softmax)."""
    gc, pc, vc = _up(g), _up(p), _up(v)
    return gc * (vc - _dot(pc, vc)) - vc * _dot(gc, pc)


def _dense_part(gj: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``∂⟨G, diag(σ) − σσᵀ⟩/∂σ = diag(G) − (G + Gᵀ) σ`` in at least float32."""
    g, pc = _up(gj), _up(p)
    return g.diagonal(dim1=-2, dim2=-1) - ((g + g.mT) @ pc.unsqueeze(-1)).squeeze(-1)


def _softmax_impl(z: torch.Tensor, backend: str) -> torch.Tensor:
    return same_layout(z, dispatch.run_softmax(z, backend))


def _softmax_setup(ctx, inputs, output):
    ctx.backend = inputs[1]
    ctx.save_for_backward(output)


def _softmax_backward(ctx, g):
    (p,) = ctx.saved_tensors
    return softmax_vjp(p, g.to(p.dtype), ctx.backend), None


def _vjp_impl(p: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return same_layout(p, dispatch.run_softmax_vjp(p, v, backend))


def _vjp_setup(ctx, inputs, output):
    p, v, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(p, v)


def _vjp_backward(ctx, g):
    p, v = ctx.saved_tensors
    gp = gv = None
    if ctx.needs_input_grad[1]:
        gv = softmax_vjp(p, g.to(p.dtype), ctx.backend).to(v.dtype)
    if ctx.needs_input_grad[0]:
        gp = probs_partial(g, p, v).to(p.dtype)
    return gp, gv, None


def _vjp_logits_impl(z: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return same_layout(z, dispatch.run_softmax_vjp_logits(z, v, backend))


def _vjp_logits_backward(ctx, g):
    z, v = ctx.saved_tensors
    gz = gv = None
    g = g.to(z.dtype)
    if ctx.needs_input_grad[1]:
        gv = softmax_vjp_logits(z, g, ctx.backend).to(v.dtype)
    if ctx.needs_input_grad[0]:
        p = softmax(z, ctx.backend)
        gz = softmax_vjp_logits(z, _probs_part(g, p, v).to(z.dtype), ctx.backend)
    return gz, gv, None


def _jacobian_impl(p: torch.Tensor, backend: str) -> torch.Tensor:
    return dispatch.run_softmax_jacobian(p, backend).contiguous()


def _jacobian_setup(ctx, inputs, output):
    ctx.backend = inputs[1]
    ctx.save_for_backward(inputs[0])


def _jacobian_backward(ctx, gj):
    (p,) = ctx.saved_tensors
    return _dense_part(gj, p).to(p.dtype), None


def _jacobian_logits_impl(z: torch.Tensor, backend: str) -> torch.Tensor:
    return dispatch.run_jacobian_logits(z, backend).contiguous()


def _jacobian_logits_backward(ctx, gj):
    (z,) = ctx.saved_tensors
    p = softmax(z, ctx.backend)
    return softmax_vjp_logits(z, _dense_part(gj, p).to(z.dtype), ctx.backend), None


softmax = register(
    "softmax",
    "(Tensor z, str backend) -> Tensor",
    _softmax_impl,
    fake=fake_like(0),
    backward=_softmax_backward,
    setup_context=_softmax_setup,
)
softmax_vjp = register(
    "softmax_vjp",
    "(Tensor probs, Tensor v, str backend) -> Tensor",
    _vjp_impl,
    fake=fake_like(0),
    backward=_vjp_backward,
    setup_context=_vjp_setup,
)
softmax_vjp_logits = register(
    "softmax_vjp_logits",
    "(Tensor z, Tensor v, str backend) -> Tensor",
    _vjp_logits_impl,
    fake=fake_like(0),
    backward=_vjp_logits_backward,
    setup_context=_vjp_setup,
)
softmax_jacobian = register(
    "softmax_jacobian",
    "(Tensor probs, str backend) -> Tensor",
    _jacobian_impl,
    fake=fake_like(0, square=True),
    backward=_jacobian_backward,
    setup_context=_jacobian_setup,
)
jacobian_logits = register(
    "jacobian_logits",
    "(Tensor z, str backend) -> Tensor",
    _jacobian_logits_impl,
    fake=fake_like(0, square=True),
    backward=_jacobian_logits_backward,
    setup_context=_jacobian_setup,
)
for _op in (softmax, softmax_vjp, softmax_vjp_logits, softmax_jacobian, jacobian_logits):
    torch.library.register_vmap(_op, vmap_leading(_op))
del _op
