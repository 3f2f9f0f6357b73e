"""The cross-entropy kernels as registered PyTorch operators (see ``softjac.kernels._ops`` for
the framework): ``torch.ops.softjac.cross_entropy_forward`` and
``torch.ops.softjac.cross_entropy_backward``.

Logits are ``(N, K)`` with the classes last, or ``(B, K, M)`` with the classes in the middle
(contiguous NCHW data, read in place by the C kernel); targets, losses, the row maxima ``m``
and log-sums ``ls`` (``lse = m + ls``) and the incoming gradients have the logits' shape
without the class dim. The math is ``softjac._core``'s ``ce_*`` (errors scale with the row's
spread; ignored rows exactly 0; NaN or +inf → NaN rows):

* ``cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index,
  float eps, str backend) -> (Tensor loss, Tensor m, Tensor ls)`` — float32 (float64 for
  float64 logits); ``∂/∂logits: g ↦ cross_entropy_backward(logits, g, …)``; ``m`` and ``ls``
  are not differentiable.
* ``cross_entropy_backward(Tensor logits, Tensor grad_rows, Tensor target, Tensor m,
  Tensor ls, Tensor? weight, int ignore_index, float eps, str backend) -> Tensor`` —
  ``g_n (a_n σ_n − b_n)`` in the logits' dtype and layout; ``∂/∂logits: Γ ↦ g_n a_n J_n Γ_n``
  (the softmax ops), ``∂/∂grad_rows: Γ ↦ ⟨Γ_n, a_n σ_n − b_n⟩``, so second derivatives of a
  compiled cross-entropy stay in the graph too.

Like the softmax ops they are used for plain tensors under ``torch.compile``;
``softjac._autograd`` keeps ``torch.autograd.Function``s (with forward-mode rules) for eager
autograd.
"""

from __future__ import annotations

import torch

from softjac import _core
from softjac._checks import as_float_dtype
from softjac.kernels import _ops, dispatch

__all__ = ["cross_entropy_backward", "cross_entropy_forward", "second_order"]


def _stats_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _rows_shape(logits: torch.Tensor) -> tuple[int, ...]:
    """The logits' shape without the class dim (dim 1 of 3-D logits, else the last)."""
    if logits.ndim == 3:
        return (logits.shape[0], logits.shape[2])
    return tuple(logits.shape[:-1])


def _ce_rows(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1) if x.ndim == 3 else x


def _ce_unrows(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-1, 1) if x.ndim == 3 else x


def _forward_impl(logits, target, weight, ignore_index, eps, backend):
    loss, (m, ls) = dispatch.cross_entropy_forward(
        logits, target, weight, ignore_index, eps, backend=backend, stats=True
    )
    return loss.contiguous(), m.contiguous(), ls.contiguous()


def _forward_fake(logits, target, weight, ignore_index, eps, backend):
    shape, dt = _rows_shape(logits), _stats_dtype(logits)
    return tuple(logits.new_empty(shape, dtype=dt) for _ in range(3))


def _forward_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, eps, backend = inputs
    ctx.opts = (ignore_index, eps, backend)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(logits, target, weight, output[1], output[2])


def _forward_backward(ctx, g_loss, _g_m, _g_ls):
    logits, target, weight, m, ls = ctx.saved_tensors
    ignore_index, eps, backend = ctx.opts
    gz = cross_entropy_backward(
        logits, g_loss.contiguous(), target, m, ls, weight, ignore_index, eps, backend
    )
    return gz, None, None, None, None, None


def _backward_impl(logits, grad_rows, target, m, ls, weight, ignore_index, eps, backend):
    out = dispatch.cross_entropy_backward(
        logits, target, (m, ls), grad_rows, weight, ignore_index, eps, backend=backend
    )
    return _ops.same_layout(logits, out)


def _backward_fake(logits, grad_rows, target, m, ls, weight, ignore_index, eps, backend):
    return torch.empty_like(logits)


def _backward_setup(ctx, inputs, output):
    logits, grad_rows, target, _m, _ls, weight, ignore_index, eps, backend = inputs
    ctx.opts = (ignore_index, eps, backend)
    ctx.save_for_backward(logits, grad_rows, target, weight)


def second_order(ctx, gG, softmax, softmax_vjp):
    """The gradients of ``⟨gG, cross_entropy_backward(logits, grad_rows, …)⟩`` with respect
    to ``logits`` and ``grad_rows`` (``ctx`` holds what :func:`_backward_setup` saves), with
    ``softmax(z)`` and ``softmax_vjp(σ, v)`` the ops that compute them (these or their Triton
    twins in ``softjac.kernels._triton_ops``)."""
    logits, grad_rows, target, weight = ctx.saved_tensors
    ignore_index, eps, _ = ctx.opts
    cd = as_float_dtype(logits.dtype)
    p = softmax(_ce_rows(logits).to(cd))
    gc = _ce_rows(gG).to(cd)
    gz = gg = None
    if ctx.needs_input_grad[0]:
        k = p.shape[-1]
        valid, *_, a = _core.ce_terms(target, weight, ignore_index, eps, k, p.device, p.dtype)
        scale = torch.where(valid, grad_rows.to(p.dtype) * a, torch.zeros_like(a))
        gz = _ce_unrows((softmax_vjp(p, gc) * scale.unsqueeze(-1)).to(logits.dtype))
    if ctx.needs_input_grad[1]:
        g1 = _core.ce_grad_from_probs(p, target, weight, ignore_index, eps)
        gg = (gc * g1).sum(-1).to(grad_rows.dtype)
    return gz, gg


def _backward_backward(ctx, gG):
    backend = ctx.opts[2]
    gz, gg = second_order(
        ctx,
        gG,
        lambda z: _ops.softmax(z, backend),
        lambda p, v: _ops.softmax_vjp(p, v, backend),
    )
    return gz, gg, None, None, None, None, None, None, None


cross_entropy_forward = _ops.register(
    "cross_entropy_forward",
    "(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float eps, str backend)"
    " -> (Tensor, Tensor, Tensor)",
    _forward_impl,
    fake=_forward_fake,
    backward=_forward_backward,
    setup_context=_forward_setup,
)
cross_entropy_backward = _ops.register(
    "cross_entropy_backward",
    "(Tensor logits, Tensor grad_rows, Tensor target, Tensor m, Tensor ls, Tensor? weight, "
    "int ignore_index, float eps, str backend) -> Tensor",
    _backward_impl,
    fake=_backward_fake,
    backward=_backward_backward,
    setup_context=_backward_setup,
)
torch.library.register_vmap(
    cross_entropy_forward,
    _ops.vmap_folding_rows(cross_entropy_forward, row_args=(0, 1), fixed_args=(2,)),
)
torch.library.register_vmap(
    cross_entropy_backward,
    _ops.vmap_folding_rows(cross_entropy_backward, row_args=(0, 1, 2, 3, 4), fixed_args=(5,)),
)
