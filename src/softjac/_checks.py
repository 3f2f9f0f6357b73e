"""Layer 0: input validation and the wording of every error softjac raises.

Every public function validates once, at its boundary, through these helpers, so that
messages share one form::

    `softjac.vjp`: `v` must have the shape of `logits`. Got (4, 10) and (4, 9).

Nothing here touches tensor *values* (that would force a device synchronisation on GPU);
only types, dtypes, shapes and Python scalars are checked.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "as_float_dtype",
    "check_dense_size",
    "check_dim",
    "check_max_bytes",
    "check_logits",
    "check_mask",
    "check_positive",
    "check_same_shape",
    "check_tensor",
    "check_temperature",
    "fmt_bytes",
    "refuse_derivatives",
    "fmt_shape",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fmt_shape(shape: torch.Size | tuple[int, ...]) -> str:
    """``(4, 10)`` style, with a trailing comma for 1-tuples like Python prints them."""
    return str(tuple(shape))


def check_tensor(fn: str, name: str, x: object, *, floating: bool = True) -> torch.Tensor:
    """Require a dense (strided) tensor; with ``floating`` also a float16/bfloat16/float32/float64
    dtype.

    Sparse (COO, CSR, CSC, BSR, BSC), MKL-DNN and nested tensors are refused here, before any
    kernel sees them: softmax of a sparse tensor is not the softmax of its dense values (the
    missing entries would be −inf, not 0), and none of softjac's paths can read them. So are
    tensors on the ``meta`` device, which hold no values (the fake tensors of ``torch.compile``
    report their real device and pass).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{fn}`: `{name}` must be a torch.Tensor. Got {type(x).__name__}.")
    if x.is_nested:
        raise TypeError(
            f"`{fn}`: `{name}` must be a dense (strided) tensor. Got a nested tensor; pad it "
            f"first, e.g. `{name}.to_padded_tensor(float('-inf'))` (-inf logits are masked)."
        )
    if x.layout != torch.strided:
        raise TypeError(
            f"`{fn}`: `{name}` must be a dense (strided) tensor. Got layout {x.layout}; convert "
            f"it first, e.g. `{name}.to_dense()`."
        )
    if x.device.type == "meta":
        raise ValueError(
            f"`{fn}`: `{name}` is on the meta device, which holds no values. Got a meta tensor "
            f"of shape {fmt_shape(x.shape)}."
        )
    if floating and x.is_quantized:
        raise TypeError(
            f"`{fn}`: `{name}` must have a floating dtype (float16, bfloat16, float32 or "
            f"float64). Got the quantized dtype {x.dtype}; convert it first, e.g. "
            f"`{name}.dequantize()`."
        )
    if floating and x.is_complex():
        raise TypeError(
            f"`{fn}`: `{name}` must have a real floating dtype (float16, bfloat16, float32 or "
            f"float64). Got {x.dtype}; softmax is defined for real logits."
        )
    if floating and x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"`{fn}`: `{name}` must have a floating dtype (float16, bfloat16, float32 or "
            f"float64). Got {x.dtype}; convert it first, e.g. `{name}.double()`."
        )
    return x


def check_dim(fn: str, dim: object, ndim: int, *, name: str = "dim") -> int:
    """Normalise ``dim`` into ``range(ndim)``; needs ``ndim >= 1``."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"`{fn}`: `{name}` must be an int. Got {type(dim).__name__}.")
    if ndim == 0:
        raise ValueError(
            f"`{fn}`: the input must have at least one dimension (the K classes). Got a 0-d tensor."
        )
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"`{fn}`: `{name}` must be in [{-ndim}, {ndim - 1}] for a {ndim}-d input. Got {dim}."
        )
    return dim % ndim


def check_logits(fn: str, logits: object, dim: object, *, name: str = "logits") -> int:
    """Validate a logits/probabilities tensor and its class dimension; return ``dim`` normalised.

    K (the size along ``dim``) must be at least 1; batch dimensions may be empty.
    """
    x = check_tensor(fn, name, logits)
    d = check_dim(fn, dim, x.ndim)
    if x.shape[d] == 0:
        raise ValueError(
            f"`{fn}`: `{name}` has K = 0 classes along dim {d} (shape {fmt_shape(x.shape)}); "
            "softmax needs K >= 1."
        )
    return d


def check_same_shape(fn: str, name: str, x: object, ref_name: str, ref: torch.Tensor) -> None:
    """Require ``x`` to be a floating tensor with exactly ``ref``'s shape."""
    check_tensor(fn, name, x)
    assert isinstance(x, torch.Tensor)
    if x.shape != ref.shape:
        raise ValueError(
            f"`{fn}`: `{name}` must have the shape of `{ref_name}`. "
            f"Got {fmt_shape(x.shape)} and {fmt_shape(ref.shape)}."
        )
    if x.device != ref.device:
        raise ValueError(
            f"`{fn}`: `{name}` and `{ref_name}` must be on the same device. "
            f"Got {x.device} and {ref.device}."
        )


def check_mask(fn: str, mask: object, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Require a boolean mask broadcastable to ``shape`` (True = keep); return it broadcast."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"`{fn}`: `mask` must be a boolean torch.Tensor. Got {type(mask).__name__}."
        )
    if mask.is_nested or mask.layout != torch.strided:
        raise TypeError(
            f"`{fn}`: `mask` must be a dense (strided) tensor. Got "
            f"{'a nested tensor' if mask.is_nested else f'layout {mask.layout}'}."
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"`{fn}`: `mask` must have dtype torch.bool (True = keep). Got {mask.dtype}."
        )
    try:
        out = torch.broadcast_to(mask, shape)
    except RuntimeError:
        raise ValueError(
            f"`{fn}`: `mask` of shape {fmt_shape(mask.shape)} does not broadcast to the input "
            f"shape {fmt_shape(shape)}."
        ) from None
    if out.device != device:
        out = out.to(device)
    return out


def check_positive(fn: str, name: str, value: object) -> float:
    """Require a finite real number > 0 (a Python number or a one-element tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"`{fn}`: `{name}` must be a scalar. Got a tensor of shape {fmt_shape(value.shape)}."
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{fn}`: `{name}` must be a real number. Got {type(value).__name__}.")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"`{fn}`: `{name}` must be a finite number > 0. Got {value!r}.")
    return v


def check_temperature(fn: str, temperature: object, dtype: torch.dtype | None = None) -> float:
    """Temperature T > 0 (softmax(z / T)).

    With ``dtype`` (the compute dtype) T must also be at least that dtype's smallest normal
    number: below it ``1/T`` overflows and ``(z − max z)/T`` would turn finite logits into
    ±inf or NaN, so such a T is refused rather than silently giving σ summing to 0.
    """
    if type(temperature) is float and temperature == 1.0:  # the default: nothing to check
        return temperature
    t = check_positive(fn, "temperature", temperature)
    if dtype is not None:
        tiny = torch.finfo(dtype).tiny
        if t < tiny:
            raise ValueError(
                f"`{fn}`: `temperature` must be at least the smallest normal {dtype} number "
                f"({tiny:.3g}) for {dtype} logits (1/T would overflow). Got {t!r}; pass float64 "
                "logits or rescale the logits instead."
            )
    return t


def as_float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softjac computes in: float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


#: Default limit on the memory of a dense result (and its temporaries): 4 GiB.
DEFAULT_MAX_BYTES = 4 * 2**30


def fmt_bytes(n: float) -> str:
    """``123 bytes``, ``1.50 KiB`` … ``4.00 GiB`` style."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def check_max_bytes(fn: str, max_bytes: object) -> int:
    """Require ``max_bytes`` to be an int > 0 (``TypeError`` / ``ValueError`` otherwise)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(
            f"`{fn}`: `max_bytes` must be an int (a number of bytes). Got "
            f"{type(max_bytes).__name__}."
        )
    if max_bytes <= 0:
        raise ValueError(f"`{fn}`: `max_bytes` must be > 0. Got {max_bytes}.")
    return max_bytes


def check_dense_size(
    fn: str,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    max_bytes: object,
    *,
    temporaries: int = 0,
    hint: str = "",
) -> None:
    """Refuse (``ValueError``) a dense result of ``shape`` and ``dtype`` when it, plus
    ``temporaries`` further arrays of the same size alive at the peak, would need more than
    ``max_bytes`` (validated by :func:`check_max_bytes`). One message for every dense method::

        `softjac.hessian`: the dense result of shape (64, 512, 512, 512) needs 64.00 GiB
        (with 1 temporary of its size), above `max_bytes` = 4.00 GiB. ...
    """
    limit = check_max_bytes(fn, max_bytes)
    n = 1
    for s in shape:
        n *= int(s)
    need = n * torch.empty((), dtype=dtype).element_size() * (1 + temporaries)
    if need > limit:
        plural = "temporary" if temporaries == 1 else "temporaries"
        extra = f" (with {temporaries} {plural} of its size)" if temporaries else ""
        raise ValueError(
            f"`{fn}`: the dense result of shape {fmt_shape(tuple(shape))} needs "
            f"{fmt_bytes(need)}{extra}, above `max_bytes` = {fmt_bytes(limit)}. "
            + (hint + " " if hint else "")
            + "Pass a larger `max_bytes` if the memory is there."
        )


def refuse_derivatives(fn: str, name: str, x: torch.Tensor, fix: str) -> None:
    """Raise ``ValueError`` when ``x`` carries a derivative that ``fn`` would drop: it requires
    grad while grad mode is on, or it is a forward-mode dual tensor. For the functions whose
    result is deliberately not differentiable (gradients, factors, spectra): they never return
    a tensor that silently lost its graph. ``fix`` says what to do instead (a sentence)."""
    import torch.autograd.forward_ad as fwad

    dual = fwad.unpack_dual(x).tangent is not None
    if (x.requires_grad and torch.is_grad_enabled()) or dual:
        kind = "a forward-mode tangent" if dual else "requires grad"
        raise ValueError(
            f"`{fn}`: `{name}` {kind}, but this result is not differentiable and would drop "
            f"it. {fix}"
        )
