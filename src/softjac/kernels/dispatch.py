"""Pick the implementation of a hot primitive: ``backend="auto" | "torch" | "triton" | "cpu"``.

Every function here takes tensors whose class dimension is the last one (any strides), accepts
float16/bfloat16/float32/float64 and returns the dtype of its first tensor argument, computing
in at least float32. ``"auto"`` chooses the fastest correct path for the device, dtype and
shape and falls back silently; an explicit backend that cannot run raises ``RuntimeError``
with the reason.

Backends:

* ``"torch"``: ``softjac.kernels._torch`` (``softjac._core`` in at least float32); any device.
* ``"triton"``: ``softjac.kernels._triton``; CUDA tensors, or CPU tensors when the environment
  has ``TRITON_INTERPRET=1`` (the Triton interpreter; slow, for tests). Needs ``triton``.
* ``"cpu"``: CPU tensors. ``softmax_vjp``, ``softmax_vjp_from_logits`` (every dtype) and the
  cross-entropy pair (float32/bfloat16/float16 logits) run the C kernels of
  ``softjac.kernels._cpu`` (compiled at first use; needs a C compiler), and so does
  ``softmax_jacobian_dense`` (the C writer); float64 cross-entropy has no C kernel and runs
  the PyTorch implementation on the CPU.
* ``"auto"``: CUDA tensors of float16/bfloat16/float32 with triton installed → ``"triton"``;
  CPU tensors → the C kernel where there is one for the op and dtype and it compiled (float64
  included: the VJP kernel meets the same float64 accuracy tests as ``softjac._core``), else
  ``"torch"``; everything else → ``"torch"``. It also stays on ``"torch"`` where the kernels
  cannot or must not see the data: inputs that require grad while grad mode is on (autograd
  must record the ops), tensors inside ``torch.func`` transforms (no storage), tensor
  subclasses and ``torch.compile`` tracing. Never imports triton unless it is installed and
  will be used.

Layouts: rows addressed through a row stride need no copy in any backend (row slices,
batch-transposed inputs). A class dim that is not the innermost one (``vjp_from_probs(...,
dim=1)`` or ``softmax(..., dim=1)``'s backward on a contiguous tensor, which reach here as
``movedim`` views) is read in place by the CPU VJP kernel (``softmax_vjp``: tiles of columns,
SIMD across them; the result comes back in the same layout); the other kernels copy such
inputs into rows first.

Contract (every backend meets it):

* ``softmax(z)`` → ``σ`` over the last dim in ``z``'s dtype (at least float32 inside); fully
  masked rows give zeros, rows with NaN or +inf give NaN. C kernel on CPU for
  float32/bfloat16/float16; PyTorch's softmax otherwise (no Triton kernel: on CUDA,
  ``"triton"`` runs the PyTorch path).
* ``softmax_vjp(probs, v)`` → ``J v`` with ``J = diag(σ) − σσᵀ`` (argmax entry accurate).
* ``softmax_vjp_from_logits(logits, lse, v)`` → the same with ``σ = exp(logits − lse)``
  recomputed on the fly (``lse`` of shape ``(..., 1)``, float32 or wider).
* ``softmax_jacobian_dense(probs)`` → ``(..., K, K)``.
* ``cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing,
  stats=False)`` on 2-D logits ``(N, K)`` and int64 class indices ``(N,)`` (each in ``[0, K)`` or
  ``ignore_index``: validated by the caller) → ``(loss_rows, lse)``, or ``(loss_rows, (m, ls))``
  with ``stats=True``: float32 (float64 for float64 logits, which always run the PyTorch
  implementation) of shape ``(N,)``, unreduced, ignored rows giving loss exactly 0. With ``w``
  the class weights (ones if None), ``ε`` the smoothing, ``m = max z`` and
  ``ls = log Σ exp(z − m)`` (``lse = m + ls``):
  ``loss_n = (1 − ε) w[y_n] (ls_n − (z_{n,y_n} − m_n)) + (ε / K) Σ_c w[c] (ls_n − (z_{n,c} − m_n))``
  — the formula of ``softjac._core.ce_forward_last``, accurate to the row's spread. NaN or
  +inf in a row → NaN loss (and NaN ``m`` or ``ls``); −inf = masked class.
* ``cross_entropy_backward(logits, target, lse, grad_rows, weight, ignore_index,
  label_smoothing, inplace=False)`` → ``∂(Σ_n grad_rows[n] · loss_n) / ∂logits`` in the logits
  dtype: ``g_n [σ_n ((1 − ε) w[y_n] + (ε/K) Σ_c w[c]) − (1 − ε) w[y_n] e_{y_n} − (ε/K) w]`` with
  ``σ = exp((z − m) − ls)`` from the pair ``lse = (m, ls)`` (or ``exp(z − lse)`` when ``lse`` is
  one tensor), exactly 0 rows where ``y_n == ignore_index``. ``inplace=True`` writes into
  ``logits``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import TYPE_CHECKING

import torch

from softjac.kernels import _cpu, _torch

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "BACKENDS",
    "check_backend",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "resolve_backend",
    "softmax",
    "softmax_jacobian_dense",
    "softmax_vjp",
    "softmax_vjp_from_logits",
]

BACKENDS = ("auto", "torch", "triton", "cpu")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Ops with a C kernel (for these dtypes); the others run the PyTorch code under backend="cpu".
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_C_OPS = {
    "softmax": _cpu.CE_DTYPES,
    "softmax_jacobian_dense": _ALL,
    "softmax_vjp": _ALL,
    "softmax_vjp_from_logits": _ALL,
    "cross_entropy_forward": _cpu.CE_DTYPES,
    "cross_entropy_backward": _cpu.CE_DTYPES,
    "cross_entropy_forward_inner": (torch.float32,),
    "cross_entropy_backward_inner": (torch.float32,),
}


# Set when a Triton kernel failed to compile or launch under "auto": the rest of the process
# then uses the PyTorch path (the kernels are tested under the interpreter in CI, but a GPU
# toolchain can still reject them, and "auto" must not turn that into a user-facing error).
_triton_failure: str | None = None


def _triton_or_fallback(backend: str, fn: str, run, fallback):
    """``run()`` (a Triton launch); under ``"auto"``, on failure warn once, remember it and
    return ``fallback()`` instead. An explicit ``backend="triton"`` lets the error through."""
    global _triton_failure
    if backend != "auto":
        return run()
    try:
        return run()
    except Exception as exc:  # compilation/launch errors of any kind
        _triton_failure = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"`{fn}`: the Triton kernel failed ({_triton_failure}); backend='auto' uses the "
            "PyTorch implementation for the rest of this process.",
            RuntimeWarning,
            stacklevel=3,
        )
        return fallback()


def _has_c_kernel(op: str, x: torch.Tensor) -> bool:
    return x.dtype in _C_OPS.get(op, ())


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_module() -> ModuleType:
    from softjac.kernels import _triton  # imports triton: only ever reached when it is used

    return _triton


def _opaque(x: torch.Tensor) -> str:
    """Why the kernels cannot take ``x`` (they need its memory), or ``""`` when they can."""
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        return f"a tensor subclass ({type(x).__name__})"
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or not torch._C._has_storage(x):
        return "a tensor without storage (inside vmap or another torch.func transform)"
    return ""


def check_backend(fn: str, backend: object) -> None:
    """``ValueError`` naming ``fn`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"`{fn}`: `backend` must be one of {BACKENDS}. Got {backend!r}.")


def resolve_backend(fn: str, backend: str, x: torch.Tensor, op: str, *others: torch.Tensor) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"cpu"``) for ``op`` on ``x``.

    ``fn`` is the public name used in error messages; ``others`` are further tensor inputs.
    ``"auto"`` never raises and keeps to ``"torch"`` where autograd must see the computation
    (inputs that require grad with grad mode on), inside ``torch.func`` transforms and
    ``torch.compile``; an explicit backend that cannot run raises ``RuntimeError``.
    """
    check_backend(fn, backend)
    dev = x.device.type
    if backend in ("triton", "cpu"):
        for t in (x, *others):
            why = _opaque(t)
            if why:
                raise RuntimeError(
                    f"`{fn}`: backend {backend!r} needs plain tensors with memory. Got {why}; "
                    "use backend='auto' or 'torch' there."
                )
    if backend == "auto":
        tensors = (x, *others)
        if any(_opaque(t) for t in tensors):
            return "torch"
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return "torch"
        if (
            dev == "cuda"
            and x.dtype in _TRITON_DTYPES
            and _triton_failure is None
            and _triton_installed()
        ):
            return "triton"
        if dev == "cpu" and _has_c_kernel(op, x) and _cpu.available():
            return "cpu"
        return "torch"
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError(
                f"`{fn}`: backend 'triton' needs the `triton` package, which is not installed "
                "(pip install 'softjac[triton]')."
            )
        if dev != "cuda" and not (dev == "cpu" and _interpreting()):
            raise RuntimeError(
                f"`{fn}`: backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1. "
                f"Got device {x.device}."
            )
        return "triton"
    if backend == "cpu":
        if dev != "cpu":
            raise RuntimeError(f"`{fn}`: backend 'cpu' needs CPU tensors. Got device {x.device}.")
        if _has_c_kernel(op, x) and not _cpu.available():
            raise RuntimeError(
                f"`{fn}`: backend 'cpu' is unavailable: {_cpu.unavailable_reason()}."
            )
        return "cpu"
    return "torch"


def softmax(z: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``σ = exp(z − lse(z))`` over the last dim (the forward of ``softjac.softmax``); O(K) per
    row. Returns ``z``'s dtype."""
    chosen = resolve_backend("softjac.softmax", backend, z, "softmax")
    if chosen == "cpu" and z.numel() and _has_c_kernel("softmax", z):
        return _cpu.softmax(z)
    return _torch.softmax(z)


def softmax_vjp(probs: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``J v = σ ⊙ (v − ⟨σ, v⟩)`` over the last dim, ``σ = probs``; the argmax entry is
    ``σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j)``. O(K) per row; reads σ and v once, writes once.
    Returns the dtype of ``probs`` (computed in at least float32)."""
    chosen = resolve_backend("softjac.vjp_from_probs", backend, probs, "softmax_vjp", v)
    if chosen == "torch" or probs.numel() == 0:
        return _torch.softmax_vjp(probs, v)
    if v.dtype != probs.dtype:
        v = v.to(probs.dtype)
    if chosen == "cpu":
        return _cpu.softmax_vjp(probs, v)
    return _triton_or_fallback(
        backend,
        "softjac.vjp_from_probs",
        lambda: _triton_module().softmax_vjp(probs, v),
        lambda: _torch.softmax_vjp(probs, v),
    )


def softmax_vjp_from_logits(
    logits: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``J v`` with ``σ = exp(logits − lse)`` (``lse`` of shape ``(..., 1)``); masked −inf
    logits give σ = 0. The Triton and C kernels recompute σ on the fly (traffic 3·K elements per
    row + one lse). Returns the dtype of ``logits``."""
    chosen = resolve_backend("softjac.vjp", backend, logits, "softmax_vjp_from_logits", lse, v)
    if chosen == "torch" or logits.numel() == 0:
        return _torch.softmax_vjp_from_logits(logits, lse, v)
    if chosen == "cpu":
        return _cpu.softmax_vjp_from_logits(logits, lse, v.to(logits.dtype))
    return _triton_or_fallback(
        backend,
        "softjac.vjp",
        lambda: _triton_module().softmax_vjp(logits, v.to(logits.dtype), lse=lse),
        lambda: _torch.softmax_vjp_from_logits(logits, lse, v),
    )


def softmax_jacobian_dense(probs: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Dense ``diag(σ) − σσᵀ`` of shape ``(..., K, K)``; O(K²) per row, the argmax diagonal
    entry as ``σ_{i*} Σ_{j≠i*} σ_j``. Returns the dtype of ``probs``."""
    chosen = resolve_backend("softjac.jacobian", backend, probs, "softmax_jacobian_dense")
    if chosen == "triton" and probs.numel():
        return _triton_or_fallback(
            backend,
            "softjac.jacobian",
            lambda: _triton_module().softmax_jacobian_dense(probs),
            lambda: _torch.softmax_jacobian_dense(probs),
        )
    if chosen == "cpu" and probs.numel():
        return _cpu.softmax_jacobian_dense(probs)
    return _torch.softmax_jacobian_dense(probs)


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    backend: str = "auto",
    stats: bool = False,
):
    """``(loss_rows, lse)`` (float32, ``(N,)``; float64 for float64 logits) for ``(N, K)``
    logits, see the module doc; with ``stats=True`` ``(loss_rows, (m, ls))``, the row maximum and
    the log of the shifted sum (``lse = m + ls``), which :func:`cross_entropy_backward` takes
    for σ accurate to the row's spread. The Triton kernel reads each row once (online
    log-sum-exp; twice with label smoothing), the C kernel twice (the second from cache)."""
    if logits.ndim == 3:
        return _cross_entropy_forward_inner(
            logits, target, weight, ignore_index, label_smoothing, backend, stats
        )
    args = (logits, target, weight, ignore_index, label_smoothing)
    if logits.dtype == torch.float64:  # no kernel does float64 math: PyTorch, in float64
        return _torch.cross_entropy_forward(*args, stats=stats)
    chosen = resolve_backend("softjac.cross_entropy", backend, logits, "cross_entropy_forward")
    if chosen == "triton":
        return _triton_or_fallback(
            backend,
            "softjac.cross_entropy",
            lambda: _triton_module().cross_entropy_forward(*args, stats=stats),
            lambda: _torch.cross_entropy_forward(*args, stats=stats),
        )
    if chosen == "cpu" and _has_c_kernel("cross_entropy_forward", logits):
        return _cpu.cross_entropy_forward(*args, stats=stats)
    return _torch.cross_entropy_forward(*args, stats=stats)


def cross_entropy_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse,
    grad_rows: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    inplace: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``∂(Σ_n grad_rows[n] · loss_n)/∂logits`` in the logits dtype, see the module doc; ``lse``
    is the pair ``(m, ls)`` of ``cross_entropy_forward(..., stats=True)`` (σ accurate to the
    row's spread) or one log-sum-exp tensor (σ = exp(z − lse), accurate to ``eps · |lse|``).
    Ignored rows get exactly 0. The kernels read each logit once and write once (into
    ``logits`` when ``inplace``)."""
    if logits.ndim == 3:
        if inplace:
            raise ValueError(
                "`softjac.cross_entropy`: `inplace=True` needs 2-D logits (N, K). "
                f"Got {tuple(logits.shape)}."
            )
        return _cross_entropy_backward_inner(
            logits, target, lse, grad_rows, weight, ignore_index, label_smoothing, backend
        )
    args = (logits, target, lse, grad_rows, weight, ignore_index, label_smoothing)
    if logits.dtype == torch.float64:  # no kernel does float64 math: PyTorch, in float64
        return _torch.cross_entropy_backward(*args, inplace=inplace)
    chosen = resolve_backend(
        "softjac.cross_entropy", backend, logits, "cross_entropy_backward", grad_rows
    )
    kernel = chosen == "triton" or (
        chosen == "cpu" and _has_c_kernel("cross_entropy_backward", logits)
    )
    if inplace and kernel and logits.shape[1] > 1 and logits.stride(1) != 1:
        # checked here, once for both kernels (and before a Triton launch, whose failures
        # "auto" would otherwise take for a broken toolchain)
        raise ValueError(
            "`softjac.cross_entropy`: `inplace=True` needs logits with unit stride along the "
            f"class dim. Got strides {tuple(logits.stride())}."
        )
    if chosen == "triton":
        return _triton_or_fallback(
            backend,
            "softjac.cross_entropy",
            lambda: _triton_module().cross_entropy_backward(*args, inplace=inplace),
            lambda: _torch.cross_entropy_backward(*args, inplace=inplace),
        )
    if kernel:
        return _cpu.cross_entropy_backward(*args, inplace=inplace)
    return _torch.cross_entropy_backward(*args, inplace=inplace)


def _inner_kernel(op: str, backend: str, logits: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the C kernel for the ``(B, K, M)`` layout takes these logits: float32, contiguous,
    on the CPU, chosen by ``backend``."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu":
        return False
    chosen = resolve_backend("softjac.cross_entropy", backend, logits, op, *others)
    return chosen == "cpu" and logits.is_contiguous() and _cpu.available()


def _cross_entropy_forward_inner(logits, target, weight, ignore_index, eps, backend, stats):
    """:func:`cross_entropy_forward` for logits ``(B, K, M)`` with the classes in the middle and
    targets ``(B, M)``; results ``(B, M)``. The C kernel reads that layout in place; the other
    backends get the logits copied into rows."""
    b, k, m = logits.shape
    if _inner_kernel("cross_entropy_forward_inner", backend, logits):
        loss, pair = _cpu.cross_entropy_forward_inner(logits, target, weight, ignore_index, eps)
    else:
        rows = logits.movedim(1, -1).reshape(-1, k)
        loss, pair = cross_entropy_forward(
            rows, target.reshape(-1), weight, ignore_index, eps, backend=backend, stats=True
        )
        loss, pair = loss.reshape(b, m), tuple(x.reshape(b, m) for x in pair)
    return (loss, pair) if stats else (loss, pair[0] + pair[1])


def _cross_entropy_backward_inner(
    logits, target, lse, grad_rows, weight, ignore_index, eps, backend
):
    """:func:`cross_entropy_backward` for the layout of :func:`_cross_entropy_forward_inner`;
    the gradient comes back as ``(B, K, M)``."""
    b, k, m = logits.shape
    if _inner_kernel("cross_entropy_backward_inner", backend, logits, grad_rows):
        pair = _torch.split_lse(lse, torch.empty(0, dtype=torch.float32))
        return _cpu.cross_entropy_backward_inner(
            logits, target, pair, grad_rows, weight, ignore_index, eps
        )
    rows = logits.movedim(1, -1).reshape(-1, k)
    lse_rows = (
        tuple(x.reshape(-1) for x in lse) if isinstance(lse, (tuple, list)) else lse.reshape(-1)
    )
    out = cross_entropy_backward(
        rows, target.reshape(-1), lse_rows, grad_rows.reshape(-1), weight, ignore_index, eps,
        backend=backend,
    )  # fmt: skip
    return out.reshape(b, m, k).movedim(-1, 1)
