"""The Triton kernels as ``torch.library.triton_op``s: ``torch.ops.softjac.<name>_triton``.

Why: a ``custom_op`` is opaque to the compiler. The ops of ``softjac.kernels._ops`` decide
their backend at run time, inside the op, so on CUDA their Triton kernels run where Inductor
cannot see them. A ``triton_op`` body is traced instead: each launch, made through
``torch.library.wrap_triton``, becomes a ``triton_kernel_wrapper_functional`` node that Inductor
schedules with the rest of the graph (and the torch code around it, such as the softmax
forward, is fused like any other).

Design (one backend decision, made once):

* ``softjac.kernels._ops.call(name, backend, *args)`` is what the Python layers call while
  ``torch.compile`` traces. It asks ``dispatch._resolve(..., traced=True)`` (the same decision
  as at run time, taken on the fake tensors of the trace: device, dtype and shape are static)
  and records ``torch.ops.softjac.<name>_triton(*args)`` when the answer is ``"triton"``,
  else the ``custom_op`` ``torch.ops.softjac.<name>(*args, backend)`` as before. Eager calls
  never come here: they launch the same kernels directly (``dispatch.run_*``), without an op
  in between. CPU tensors under ``"auto"``, ``"cpu"`` or ``"torch"`` never reach these ops.
  ``"auto"``'s fallback after a failed Triton launch (``dispatch._triton_or_fallback``) is an
  eager one: in a compiled graph a kernel the toolchain rejects is a compile error.
* The bodies are the launchers of ``softjac.kernels._triton`` with ``launch=wrap_triton``:
  one launcher per kernel family for eager and traced calls. Grids are tuples, configuration
  values are ``tl.constexpr`` keyword arguments (plus ``num_warps``), no autotuning.
* Each op has a fake implementation (contiguous outputs, what the launchers allocate), a
  registered autograd whose backward is made of these ops again (every order stays in the
  graph), and the vmap rules of ``softjac.kernels._ops``.

Ops (outputs in the dtype of the first tensor; float16/bfloat16/float32 only, since float64
resolves to ``"torch"``):

* ``softmax_triton(Tensor z) -> Tensor`` — σ in PyTorch ops (there is no Triton softmax
  kernel; in the graph Inductor fuses it); ``∂/∂z: g ↦ softmax_vjp_triton(σ, g)``.
* ``softmax_vjp_triton(Tensor probs, Tensor v) -> Tensor`` — ``J(σ) v`` (one-row or split-row
  kernels); ``∂/∂v: g ↦ J g``, ``∂/∂σ``: ``softjac.kernels._ops.probs_partial``.
* ``softmax_vjp_logits_triton(Tensor z, Tensor v) -> Tensor`` — ``J(σ(z)) v`` exactly from
  logits; ``∂/∂v: g ↦ J g``, ``∂/∂z: g ↦ J (g ⊙ (v − ⟨σ, v⟩) − v ⟨g, σ⟩)``.
* ``softmax_jacobian_triton(Tensor probs) -> Tensor`` and ``jacobian_logits_triton(Tensor z)
  -> Tensor`` — dense ``(…, K, K)``; ``∂/∂σ: G ↦ diag(G) − (G + Gᵀ) σ`` (chained through
  ``J`` for logits).
* ``cross_entropy_forward_triton(Tensor logits, Tensor target, Tensor? weight,
  int ignore_index, float eps) -> (Tensor, Tensor, Tensor)`` and
  ``cross_entropy_backward_triton(Tensor logits, Tensor grad_rows, Tensor target, Tensor m,
  Tensor ls, Tensor? weight, int ignore_index, float eps) -> Tensor`` — the contract of
  ``softjac.kernels._ce_ops`` (2-D logits, or ``(B, K, M)`` copied into rows).

Under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``) ``wrap_triton`` hands the
interpreted kernel back unwrapped, and AOTAutograd's decomposition of a body would launch it
on fake tensors ("Attempted to access the data pointer on an invalid python storage"). There
the bodies record the ``custom_op`` with backend ``"triton"`` instead (:func:`_interpretable`):
every compile backend works, Dynamo's graph holds the Triton ops, AOTAutograd's the custom
ops, and the interpreter runs the kernels when the graph runs. ``triton_kernel_wrapper_functional``
nodes come from compiled kernels only (on CUDA).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.library import wrap_triton

from softjac import _core
from softjac._checks import as_float_dtype
from softjac.kernels import _ce_ops, _ops, _torch, _triton

__all__ = [
    "cross_entropy_backward",
    "cross_entropy_forward",
    "jacobian_logits",
    "softmax",
    "softmax_jacobian",
    "softmax_vjp",
    "softmax_vjp_logits",
]


def _has_data(x: torch.Tensor) -> bool:
    """False for the fake and functional tensors of a trace (no data pointer)."""
    try:
        x.data_ptr()
    except RuntimeError:
        return False
    return True


def _interpretable(name: str, fn):
    """``fn``, except where it would hand tensors without data to interpreted kernels
    (AOTAutograd decomposing the op for CPU tensors under ``TRITON_INTERPRET=1``): there the
    ``custom_op`` ``torch.ops.softjac.<name>(..., "triton")``, recorded as one node, which runs
    the same kernels in the interpreter when the compiled graph runs. On CUDA, never."""

    @functools.wraps(fn)
    def body(*args):
        if _INTERPRETED and not _has_data(args[0]):
            out = _ops.registered(name)(*args, "triton")
            return out.contiguous() if isinstance(out, torch.Tensor) else out
        return fn(*args)

    return body


_INTERPRETED = type(_triton._vjp_row_kernel).__name__ == "InterpretedFunction"


def _register(name: str, fn, fake, backward, setup_context, vmap_rule=None):
    """``torch.ops.softjac.<name>_triton`` (``fn``'s annotations give the schema): a
    ``triton_op`` with ``fake``, autograd and a vmap rule (default: :func:`_ops.vmap_leading`).

    ``fake`` replaces the fake implementation ``triton_op`` derives from ``fn``: that one
    launches the kernels on fake tensors, which the Triton interpreter cannot do."""
    # (given the function, triton_op returns the op definition, typed as a plain callable)
    op: Any = torch.library.triton_op(
        f"{_ops.NAMESPACE}::{name}_triton", _interpretable(name, fn), mutates_args=()
    )
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    overload = getattr(getattr(torch.ops, _ops.NAMESPACE), f"{name}_triton").default
    torch.library.register_vmap(overload, (vmap_rule or _ops.vmap_leading)(overload))
    return overload


def _fake(x: torch.Tensor, *_) -> torch.Tensor:
    """A contiguous result like ``x`` (what the launchers allocate)."""
    return x.new_empty(x.shape)


def _fake_square(x: torch.Tensor) -> torch.Tensor:
    """A contiguous ``(*x.shape, K)`` result (dense Jacobians)."""
    return x.new_empty((*x.shape, x.shape[-1]))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


# --------------------------------------------------------------------------------------------
# the softmax family
# --------------------------------------------------------------------------------------------


def _softmax_fn(z: torch.Tensor) -> torch.Tensor:
    return _torch.softmax(z)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _softmax_backward(ctx, g):
    (p,) = ctx.saved_tensors
    return softmax_vjp(p, g.to(p.dtype))


def _vjp_fn(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _triton.softmax_vjp(probs, v, launch=wrap_triton)


def _vjp_backward(ctx, g):
    p, v = ctx.saved_tensors
    gp = gv = None
    if ctx.needs_input_grad[1]:
        gv = softmax_vjp(p, g.to(p.dtype)).to(v.dtype)
    if ctx.needs_input_grad[0]:
        gp = _ops.probs_partial(g, p, v).to(p.dtype)
    return gp, gv


def _vjp_logits_fn(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _triton.softmax_vjp_logits(z, v, launch=wrap_triton)


def _vjp_logits_backward(ctx, g):
    z, v = ctx.saved_tensors
    gz = gv = None
    g = g.to(z.dtype)
    if ctx.needs_input_grad[1]:
        gv = softmax_vjp_logits(z, g).to(v.dtype)
    if ctx.needs_input_grad[0]:
        gz = softmax_vjp_logits(z, _ops._probs_part(g, softmax(z), v).to(z.dtype))
    return gz, gv


def _jacobian_fn(probs: torch.Tensor) -> torch.Tensor:
    return _triton.softmax_jacobian_dense(probs, launch=wrap_triton)


def _jacobian_backward(ctx, gj):
    (p,) = ctx.saved_tensors
    return _ops._dense_part(gj, p).to(p.dtype)


def _jacobian_logits_fn(z: torch.Tensor) -> torch.Tensor:
    # σ by PyTorch in at least float32, rounded once, then the Triton writer (what
    # dispatch.run_jacobian_logits does for backend "triton")
    p = _core.softmax_last(z.to(as_float_dtype(z.dtype))).to(z.dtype)
    return _triton.softmax_jacobian_dense(p, launch=wrap_triton)


def _jacobian_logits_backward(ctx, gj):
    (z,) = ctx.saved_tensors
    return softmax_vjp_logits(z, _ops._dense_part(gj, softmax(z)).to(z.dtype))


softmax = _register("softmax", _softmax_fn, _fake, _softmax_backward, _softmax_setup)
softmax_vjp = _register("softmax_vjp", _vjp_fn, _fake, _vjp_backward, _save_inputs)
softmax_vjp_logits = _register(
    "softmax_vjp_logits", _vjp_logits_fn, _fake, _vjp_logits_backward, _save_inputs
)
softmax_jacobian = _register(
    "softmax_jacobian", _jacobian_fn, _fake_square, _jacobian_backward, _save_inputs
)
jacobian_logits = _register(
    "jacobian_logits", _jacobian_logits_fn, _fake_square, _jacobian_logits_backward, _save_inputs
)


# --------------------------------------------------------------------------------------------
# cross-entropy (the layouts of softjac.kernels._ce_ops)
# --------------------------------------------------------------------------------------------


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` rows of 2-D logits or of ``(B, K, M)`` logits (classes moved last)."""
    return _ce_ops._ce_rows(logits).reshape(-1, logits.shape[1])


def _ce_forward_fn(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, (m, ls) = _triton.cross_entropy_forward(
        _rows(logits), target.reshape(-1), weight, ignore_index, eps, stats=True,
        launch=wrap_triton,
    )  # fmt: skip
    if logits.ndim == 2:
        return loss, m, ls
    shape = _ce_ops._rows_shape(logits)
    return loss.reshape(shape), m.reshape(shape), ls.reshape(shape)


def _ce_forward_fake(logits, target, weight, ignore_index, eps):
    shape = _ce_ops._rows_shape(logits)
    return tuple(logits.new_empty(shape, dtype=torch.float32) for _ in range(3))


def _ce_forward_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, eps = inputs
    ctx.opts = (ignore_index, eps)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(logits, target, weight, output[1], output[2])


def _ce_forward_backward(ctx, g_loss, _g_m, _g_ls):
    logits, target, weight, m, ls = ctx.saved_tensors
    gz = cross_entropy_backward(logits, g_loss.contiguous(), target, m, ls, weight, *ctx.opts)
    return gz, None, None, None, None


def _ce_backward_fn(
    logits: torch.Tensor,
    grad_rows: torch.Tensor,
    target: torch.Tensor,
    m: torch.Tensor,
    ls: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    eps: float,
) -> torch.Tensor:
    out = _triton.cross_entropy_backward(
        _rows(logits), target.reshape(-1), (m.reshape(-1), ls.reshape(-1)),
        grad_rows.reshape(-1), weight, ignore_index, eps, launch=wrap_triton,
    )  # fmt: skip
    if logits.ndim == 3:
        b, k, cols = logits.shape
        return out.reshape(b, cols, k).movedim(-1, 1).contiguous()
    return out


def _ce_backward_setup(ctx, inputs, output):
    logits, grad_rows, target, _m, _ls, weight, ignore_index, eps = inputs
    ctx.opts = (ignore_index, eps, None)
    ctx.save_for_backward(logits, grad_rows, target, weight)


def _ce_backward_backward(ctx, gG):
    gz, gg = _ce_ops.second_order(ctx, gG, softmax, softmax_vjp)
    return gz, gg, None, None, None, None, None, None


cross_entropy_forward = _register(
    "cross_entropy_forward",
    _ce_forward_fn,
    _ce_forward_fake,
    _ce_forward_backward,
    _ce_forward_setup,
    lambda op: _ops.vmap_folding_rows(op, row_args=(0, 1), fixed_args=(2,)),
)
cross_entropy_backward = _register(
    "cross_entropy_backward",
    _ce_backward_fn,
    _fake,
    _ce_backward_backward,
    _ce_backward_setup,
    lambda op: _ops.vmap_folding_rows(op, row_args=(0, 1, 2, 3, 4), fixed_args=(5,)),
)
