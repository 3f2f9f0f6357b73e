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
  The kernels compute in float32: float64 input runs the PyTorch implementation in float64.
* ``"cpu"``: CPU tensors. ``softmax_vjp``, ``softmax_vjp_from_logits`` (every dtype) and the
  cross-entropy pair (float32/bfloat16/float16 logits) run the C kernels of
  ``softjac.kernels._cpu`` (compiled at first use; needs a C compiler), and so does
  ``softmax_jacobian_dense`` (the C writer); float64 cross-entropy has no C kernel and runs
  the PyTorch implementation on the CPU.
* ``"auto"``: CUDA tensors of float16/bfloat16/float32 with triton installed → ``"triton"``
  for the ops that have a Triton kernel; CPU tensors → the C kernel where there is one for
  the op and dtype and it compiled (float64 included: the VJP kernel meets the same float64
  accuracy tests as ``softjac._core``), else ``"torch"``; empty inputs, a softmax whose class
  dim is not innermost, and everything else → ``"torch"``. It also stays on ``"torch"`` where
  the kernels cannot see the data (tensors inside ``torch.func`` transforms, tensor
  subclasses, ``torch.compile`` tracing). :func:`info` lists the choice and the reason per op.
  Never imports triton unless it is installed and will be used.

Recording (every backend; "no derivative dropped"): ``run_*`` functions compute on plain
tensors and record nothing; they are what the registered ops (``softjac.kernels._ops``,
``torch.ops.softjac.*``) and the autograd Functions (``softjac._autograd``) call. The other
entry points here (``softmax``, ``softmax_vjp``, ``softmax_vjp_logits``,
``softmax_jacobian_dense``, ``jacobian_logits``) call the kernel directly when nothing needs
a graph, the registered op (with its autograd) when an input requires grad or under
``torch.compile`` (there its ``triton_op`` twin where the backend resolves to Triton, see
``softjac.kernels._ops.call``), and for forward-mode dual tensors or ``torch.func`` wrappers
the PyTorch code under ``"auto"`` (recorded natively) or raise ``RuntimeError`` under an
explicit kernel backend; ``backend="torch"`` is always the PyTorch code of ``softjac.kernels._torch``, the
same code whatever the entry point.

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
import torch.autograd.forward_ad as _fw_ad

from softjac import _core
from softjac._checks import as_float_dtype
from softjac.kernels import _cpu, _torch

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "BACKENDS",
    "OPS",
    "check_backend",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "graph_needs",
    "has_memory",
    "info",
    "jacobian_logits",
    "resolve_backend",
    "run_jacobian_logits",
    "run_softmax",
    "run_softmax_argmax",
    "run_softmax_jacobian",
    "run_softmax_vjp",
    "run_softmax_vjp_from_logits",
    "run_softmax_vjp_logits",
    "softmax",
    "softmax_jacobian_dense",
    "softmax_vjp",
    "softmax_vjp_from_logits",
    "softmax_vjp_logits",
]

BACKENDS = ("auto", "torch", "triton", "cpu")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Ops with a C kernel (for these dtypes); the others run the PyTorch code under backend="cpu".
_C_OPS = {
    "softmax": _cpu.CE_DTYPES,
    "softmax_jacobian": _ALL,
    "softmax_jacobian_dense": _ALL,
    "jacobian_logits": _ALL,
    "softmax_vjp": _ALL,
    "softmax_vjp_logits": _ALL,
    "softmax_vjp_from_logits": _ALL,
    "cross_entropy_forward": _cpu.CE_DTYPES,
    "cross_entropy_backward": _cpu.CE_DTYPES,
    "cross_entropy_forward_inner": (torch.float32,),
    "cross_entropy_backward_inner": (torch.float32,),
}
# Ops with a Triton kernel (on CUDA, ``"auto"`` picks it for float16/bfloat16/float32).
_TRITON_OPS = frozenset(
    {
        "softmax_vjp",
        "softmax_vjp_logits",
        "softmax_vjp_from_logits",
        "softmax_jacobian",
        "softmax_jacobian_dense",
        "jacobian_logits",
        "cross_entropy_forward",
        "cross_entropy_backward",
    }
)
# Public op names and what ``info()`` reports them as.
OPS = (
    "softmax",
    "softmax_vjp",
    "softmax_vjp_logits",
    "softmax_jacobian",
    "jacobian_logits",
    "cross_entropy_forward",
    "cross_entropy_backward",
)


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


def has_memory(x: torch.Tensor) -> bool:
    """False for tensors without memory of their own (the wrappers of ``torch.func``
    transforms: ``vmap``, ``grad``, ``jvp`` …), whose storage cannot be accessed."""
    try:
        x.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _opaque(x: torch.Tensor) -> str:
    """Why the kernels cannot take ``x`` (they need its memory), or ``""`` when they can."""
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    return _no_memory(x)


def _no_memory(x: torch.Tensor) -> str:
    """:func:`_opaque` outside compilation: a tensor subclass or a tensor without storage."""
    if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        return f"a tensor subclass ({type(x).__name__})"
    if not has_memory(x):
        return "a tensor without storage (inside vmap or another torch.func transform)"
    return ""


def graph_needs(*tensors: torch.Tensor | None) -> str:
    """What must see a computation on ``tensors`` besides its value: ``"transform"`` (a
    ``torch.func`` wrapper or a tensor subclass), ``"forward"`` (a forward-mode dual tensor),
    ``"reverse"`` (a tensor that requires grad while grad mode is on), or ``""`` (nothing:
    a kernel may run on the memory directly). The first two take precedence."""
    grad = torch.is_grad_enabled()
    need = ""
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return "transform"
        if not has_memory(t):
            return "transform"
        if _fw_ad.unpack_dual(t).tangent is not None:
            return "forward"
        if grad and t.requires_grad:
            need = "reverse"
    return need


def check_backend(fn: str, backend: object) -> None:
    """``ValueError`` naming ``fn`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"`{fn}`: `backend` must be one of {BACKENDS}. Got {backend!r}.")


def _auto(op: str, x: torch.Tensor) -> tuple[str, str]:
    """``"auto"``'s choice for ``op`` on ``x`` and why (never raises)."""
    if x.numel() == 0:
        return "torch", "empty input"
    if x.is_cpu:  # (``is_cpu`` first: ``x.device`` builds a new object on every call)
        if x.dtype not in _C_OPS.get(op, ()):
            return "torch", f"no C kernel for {x.dtype}"
        if (
            op == "softmax"
            and not x.is_contiguous()
            and x.dim()
            and x.shape[-1] > 1
            and (x.stride(-1) != 1)
        ):
            return (
                "torch",
                "class dim not innermost (the C kernel would copy; torch reads it in place)",
            )
        if _cpu._lib is None and not _cpu.available():  # (the attribute: loaded already)
            return "torch", f"C kernels unavailable: {_cpu.unavailable_reason()}"
        return "cpu", "CPU tensor, C kernel"
    dev = x.device.type
    if dev == "cuda":
        if op not in _TRITON_OPS:
            return "torch", "no Triton kernel for this op (PyTorch's fused CUDA kernel)"
        if x.dtype not in _TRITON_DTYPES:
            return "torch", f"no Triton kernel for {x.dtype}"
        if _triton_failure is not None:
            return "torch", f"a Triton kernel failed earlier ({_triton_failure})"
        if not _triton_installed():
            return "torch", "triton is not installed"
        return "triton", "CUDA tensor, Triton kernel"
    return "torch", f"no kernel for device {dev}"


def resolve_backend(fn: str, backend: str, x: torch.Tensor, op: str, *others: torch.Tensor) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"cpu"``) for a raw kernel call of
    ``op`` on ``x`` that nothing records: like :func:`_resolve`, and ``"auto"`` also keeps to
    ``"torch"`` where autograd must see the computation (inputs that require grad with grad
    mode on, dual tensors). ``fn`` is the public name used in error messages; ``others`` are
    further tensor inputs."""
    if backend == "auto" and graph_needs(x, *others):
        return "torch"
    return _resolve(fn, backend, x, op, *others)


def _resolve(
    fn: str, backend: str, x: torch.Tensor, op: str, *others: torch.Tensor, traced: bool = False
) -> str:
    """The one place where softjac picks an implementation for ``op`` on ``x``.

    ``"auto"`` never raises: it looks at the device, dtype and shape (see :func:`info`) and
    keeps to ``"torch"`` where a kernel cannot see the memory (``torch.func`` wrappers,
    tensor subclasses, ``torch.compile`` tracing); an explicit backend that cannot run raises
    ``RuntimeError``. Recording for autograd is not decided here: the callers run it inside
    the registered ops or ``softjac._autograd``'s Functions (see :func:`graph_needs`).

    ``traced=True``: the same decision for the tensors a ``torch.compile`` trace sees (fake
    tensors: device, dtype and shape known, no memory), without the memory checks; used by
    ``softjac.kernels._ops.call`` to record a Triton op in the graph.
    """
    check_backend(fn, backend)
    if backend == "torch":
        return "torch"
    tensors = () if traced else (x, *others)
    if backend == "auto":
        if not traced and torch.compiler.is_compiling():
            return "torch"
        for t in tensors:  # (a loop, not any(generator): this runs on every call)
            if _no_memory(t):
                return "torch"
        return _auto(op, x)[0]
    for t in tensors:
        why = _opaque(t)
        if why:
            raise RuntimeError(
                f"`{fn}`: backend {backend!r} needs plain tensors with memory. Got {why}; "
                "use backend='auto' or 'torch' there."
            )
    dev = x.device.type
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
        if x.dtype == torch.float64:
            # the Triton kernels compute in float32: float64 input runs the PyTorch
            # implementation in float64 (as float64 cross-entropy does under "cpu") rather
            # than come back float32-accurate
            return "torch"
        return "triton"
    if dev != "cpu":
        raise RuntimeError(f"`{fn}`: backend 'cpu' needs CPU tensors. Got device {x.device}.")
    if _has_c_kernel(op, x) and not _cpu.available():
        raise RuntimeError(f"`{fn}`: backend 'cpu' is unavailable: {_cpu.unavailable_reason()}.")
    return "cpu"


def info() -> dict[str, dict[str, dict[str, str]]]:
    """For every op, the backend ``"auto"`` picks on this machine and why.

    Returns ``{op: {case: {"backend": ..., "reason": ...}}}`` with cases ``"cpu float32"``,
    ``"cpu float64"`` and, when CUDA is available, ``"cuda float32"`` (inputs of 64×512).
    Building the C kernels (first use) happens here if it has not yet.
    """
    cases = [("cpu", torch.float32), ("cpu", torch.float64)]
    if torch.cuda.is_available():
        cases.append(("cuda", torch.float32))
    out: dict[str, dict[str, dict[str, str]]] = {}
    for op in OPS:
        out[op] = {}
        for dev, dtype in cases:
            x = torch.empty((64, 512), dtype=dtype, device=dev)
            chosen, why = _auto(op, x)
            if op.startswith("cross_entropy") and dtype == torch.float64:
                chosen, why = "torch", "float64 cross-entropy runs PyTorch in float64"
            out[op][f"{dev} {str(dtype).removeprefix('torch.')}"] = {
                "backend": chosen,
                "reason": why,
            }
    return out


# --------------------------------------------------------------------------------------------
# Kernel calls on plain tensors (no autograd): what the registered ops and the autograd
# Functions run. ``backend`` may be "auto"; the choice is made here, on the real tensors.
# --------------------------------------------------------------------------------------------


def run_softmax(z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``σ = exp(z − lse(z))`` over the last dim in ``z``'s dtype; fully masked rows give
    zeros. O(K) per row, one read and one write with the C kernel."""
    return _run_softmax_as(_resolve("softjac.softmax", backend, z, "softmax"), z, argmax=False)[0]


def run_softmax_argmax(
    z: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`run_softmax` and, where the C kernel ran, each row's first argmax (int32, −1
    for rows without one) for :func:`run_softmax_vjp`'s ``argmax`` (else None).

    For the forward of an eager autograd Function: ``z`` has memory and nothing is being
    compiled (the caller checked both), so ``"auto"`` asks :func:`_auto` directly."""
    if backend == "auto" and (type(z) is torch.Tensor or isinstance(z, torch.nn.Parameter)):
        if _auto("softmax", z)[0] == "cpu":  # (auto chose it: a C kernel exists, z has entries)
            return _cpu.softmax(z, argmax=True)
        return _torch.softmax(z), None
    return _run_softmax_as(_resolve("softjac.softmax", backend, z, "softmax"), z, argmax=True)


def _run_softmax_as(chosen: str, z: torch.Tensor, *, argmax: bool):
    if chosen == "cpu" and z.numel() and _has_c_kernel("softmax", z):
        return _cpu.softmax(z, argmax=True) if argmax else (_cpu.softmax(z), None)
    return _torch.softmax(z), None


def run_softmax_vjp(
    probs: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """``J v = σ ⊙ (v − ⟨σ, v⟩)`` with ``σ = probs``, the argmax entry without cancellation;
    O(K) per row. Returns the dtype of ``probs``. ``argmax``: the rows' argmax from
    :func:`run_softmax_argmax` for this σ (the C kernel then skips finding it)."""
    if argmax is not None and type(v) is torch.Tensor and v.is_cpu:
        # σ came from the C forward, so the product is the C kernel's for it too (the choice
        # depends only on σ's device and dtype and on v being a plain tensor)
        return _cpu.softmax_vjp_argmax(
            probs, v if v.dtype == probs.dtype else v.to(probs.dtype), argmax
        )
    chosen = _resolve("softjac.vjp_from_probs", backend, probs, "softmax_vjp", v)
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


def _exact_vjp_torch(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    up = as_float_dtype(z.dtype)
    return _core.vjp_logits_last(z.to(up), v.to(up)).to(z.dtype)


def run_softmax_vjp_logits(z: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``J(σ(z)) v`` from logits with σ never rounded on its own (``_core.vjp_logits_last``:
    the argmax entry as ``σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j)``, ``1/S²`` keeping what
    ``fl(1 + r)`` drops); O(K) per row. Returns the dtype of ``z``."""
    fn = "softjac.vjp"
    chosen = _resolve(fn, backend, z, "softmax_vjp_logits", v)
    if chosen == "torch" or z.numel() == 0:
        return _exact_vjp_torch(z, v)
    v = v.to(z.dtype)
    if chosen == "cpu":
        return _cpu.softmax_vjp_logits(z, v)
    return _triton_or_fallback(
        backend,
        fn,
        lambda: _triton_module().softmax_vjp_logits(z, v),
        lambda: _exact_vjp_torch(z, v),
    )


def _exact_jacobian_torch(z: torch.Tensor) -> torch.Tensor:
    return _core.jacobian_logits_last(_up(z)).to(z.dtype)


def run_jacobian_logits(z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dense ``diag(σ) − σσᵀ`` of shape ``(..., K, K)`` from logits, σ never rounded on its
    own (``_core.jacobian_logits_last``); O(K²) per row. Returns the dtype of ``z``."""
    fn = "softjac.jacobian"
    chosen = _resolve(fn, backend, z, "jacobian_logits")
    if chosen == "torch" or z.numel() == 0:
        return _exact_jacobian_torch(z)
    if chosen == "cpu":
        return _cpu.jacobian_logits(z)
    p = _core.softmax_last(_up(z)).to(z.dtype)
    return _triton_or_fallback(
        backend,
        fn,
        lambda: _triton_module().softmax_jacobian_dense(p),
        lambda: _exact_jacobian_torch(z),
    )


def run_softmax_jacobian(probs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dense ``diag(σ) − σσᵀ`` of shape ``(..., K, K)`` from ``σ = probs``; O(K²) per row, the
    argmax diagonal entry as ``σ_{i*} Σ_{j≠i*} σ_j``. Returns the dtype of ``probs``."""
    fn = "softjac.jacobian"
    chosen = _resolve(fn, backend, probs, "softmax_jacobian")
    if chosen == "triton" and probs.numel():
        return _triton_or_fallback(
            backend,
            fn,
            lambda: _triton_module().softmax_jacobian_dense(probs),
            lambda: _torch.softmax_jacobian_dense(probs),
        )
    if chosen == "cpu" and probs.numel():
        return _cpu.softmax_jacobian_dense(probs)
    return _torch.softmax_jacobian_dense(probs)


def run_softmax_vjp_from_logits(
    logits: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """``J v`` with ``σ = exp(logits − lse)`` (``lse`` of shape ``(..., 1)``) recomputed in the
    kernel (σ rounded once; the exact from-logits product is :func:`run_softmax_vjp_logits`).
    Returns the dtype of ``logits``."""
    chosen = _resolve("softjac.vjp", backend, logits, "softmax_vjp_from_logits", lse, v)
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


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(as_float_dtype(x.dtype))


# --------------------------------------------------------------------------------------------
# The entry points the rest of softjac calls: a kernel on plain tensors, the registered op
# when reverse-mode autograd or torch.compile must record it, never a silently dropped
# derivative.
# --------------------------------------------------------------------------------------------


def _route(fn: str, backend: str, tensors, run, op, torch_path):
    """``run()`` when nothing must record the call; the registered ``op()`` (reverse-mode
    autograd, vmap, torch.compile) when it must; for forward mode and ``torch.func``
    transforms, the PyTorch code under ``"auto"`` (recorded natively) and a
    ``RuntimeError`` under an explicit kernel backend."""
    check_backend(fn, backend)
    if backend == "torch":
        return torch_path()
    if torch.compiler.is_compiling():
        return op()
    need = graph_needs(*tensors)
    if not need:
        return run()
    if need == "reverse":
        return op()
    if backend == "auto":
        return torch_path()
    if need == "forward":
        raise RuntimeError(
            f"`{fn}`: backend {backend!r} cannot record forward-mode AD at the kernel level. "
            "Use the public function (softjac.softmax, softjac.vjp, …), which records it, or "
            "backend='auto'."
        )
    raise RuntimeError(
        f"`{fn}`: backend {backend!r} needs plain tensors with memory. Got a torch.func "
        "wrapper or a tensor subclass; use the public function (softjac.softmax, "
        "softjac.vjp, …), which records it, or backend='auto'."
    )


def softmax(z: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``σ = exp(z − lse(z))`` over the last dim (the forward of ``softjac.softmax``); O(K) per
    row. Returns ``z``'s dtype; differentiable (registered op) when ``z`` requires grad."""
    return _route(
        "softjac.softmax",
        backend,
        (z,),
        lambda: run_softmax(z, backend),
        lambda: _ops.call("softmax", backend, z),
        lambda: _torch.softmax(z),
    )


def softmax_vjp(probs: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``J v = σ ⊙ (v − ⟨σ, v⟩)`` over the last dim, ``σ = probs``; the argmax entry is
    ``σ_{i*} Σ_{j≠i*} σ_j (v_{i*} − v_j)``. O(K) per row; reads σ and v once, writes once.
    Returns the dtype of ``probs`` (computed in at least float32)."""
    return _route(
        "softjac.vjp_from_probs",
        backend,
        (probs, v),
        lambda: run_softmax_vjp(probs, v, backend),
        lambda: _ops.call("softmax_vjp", backend, probs, v.to(probs.dtype)),
        lambda: _torch.softmax_vjp(probs, v),
    )


def softmax_vjp_logits(z: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``J(σ(z)) v`` from logits, exact (see :func:`run_softmax_vjp_logits`); O(K) per row.
    Returns the dtype of ``z``."""
    return _route(
        "softjac.vjp",
        backend,
        (z, v),
        lambda: run_softmax_vjp_logits(z, v, backend),
        lambda: _ops.call("softmax_vjp_logits", backend, z, v.to(z.dtype)),
        lambda: _exact_vjp_torch(z, v),
    )


def softmax_vjp_from_logits(
    logits: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``J v`` with ``σ = exp(logits − lse)`` (``lse`` of shape ``(..., 1)``); masked −inf
    logits give σ = 0. The Triton and C kernels recompute σ on the fly (traffic 3·K elements per
    row + one lse). Returns the dtype of ``logits``. Not differentiable through a kernel (use
    :func:`softmax_vjp_logits`): where a graph must be recorded, ``"auto"`` runs PyTorch and an
    explicit kernel backend raises."""
    fn = "softjac.vjp"

    def no_op():
        raise RuntimeError(
            f"`{fn}`: backend {backend!r} cannot record autograd through the lse-based kernel; "
            "use `dispatch.softmax_vjp_logits` or backend='auto'."
        )

    return _route(
        fn,
        backend,
        (logits, lse, v),
        lambda: run_softmax_vjp_from_logits(logits, lse, v, backend),
        no_op if backend != "auto" else lambda: _torch.softmax_vjp_from_logits(logits, lse, v),
        lambda: _torch.softmax_vjp_from_logits(logits, lse, v),
    )


def softmax_jacobian_dense(probs: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Dense ``diag(σ) − σσᵀ`` of shape ``(..., K, K)``; O(K²) per row, the argmax diagonal
    entry as ``σ_{i*} Σ_{j≠i*} σ_j``. Returns the dtype of ``probs``."""
    return _route(
        "softjac.jacobian",
        backend,
        (probs,),
        lambda: run_softmax_jacobian(probs, backend),
        lambda: _ops.call("softmax_jacobian", backend, probs),
        lambda: _torch.softmax_jacobian_dense(probs),
    )


def jacobian_logits(z: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Dense ``diag(σ) − σσᵀ`` from logits, exact (see :func:`run_jacobian_logits`); O(K²)
    per row. Returns the dtype of ``z``."""
    return _route(
        "softjac.jacobian",
        backend,
        (z,),
        lambda: run_jacobian_logits(z, backend),
        lambda: _ops.call("jacobian_logits", backend, z),
        lambda: _exact_jacobian_torch(z),
    )


def _no_graph(fn: str, backend: str, *tensors: torch.Tensor | None) -> str:
    """For the cross-entropy kernels (whose autograd lives in ``softjac._autograd``): the
    backend to use when a graph must be recorded (``"torch"`` under ``"auto"``), or raise."""
    if backend == "torch" or torch.compiler.is_compiling():
        return backend
    if graph_needs(*tensors):
        if backend == "auto":
            return "torch"
        raise RuntimeError(
            f"`{fn}`: backend {backend!r} cannot record autograd at the kernel level; use "
            "`softjac.cross_entropy`, which records it."
        )
    return backend


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
    for σ accurate to the row's spread. Logits ``(B, K, M)`` with the classes in the middle
    and targets ``(B, M)`` give ``(B, M)`` results (the C kernel reads that layout in place).
    The Triton kernel reads each row once (online log-sum-exp; twice with label smoothing),
    the C kernel twice (the second from cache)."""
    backend = _no_graph("softjac.cross_entropy", backend, logits, weight)
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
    Ignored rows get exactly 0. Logits ``(B, K, M)`` (classes in the middle) with ``(B, M)``
    targets, stats and ``grad_rows`` give the gradient in that layout. The kernels read each
    logit once and write once (into ``logits`` when ``inplace``)."""
    pair = tuple(lse) if isinstance(lse, (tuple, list)) else (lse,)
    backend = _no_graph("softjac.cross_entropy", backend, logits, *pair, grad_rows, weight)
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


from softjac.kernels import _ops  # noqa: E402  (registers torch.ops.softjac.*; imports this module)
