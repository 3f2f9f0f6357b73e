"""Shard bookkeeping and collectives for :mod:`softjac.distributed`.

Everything that talks to ``torch.distributed`` lives here:

* :func:`resolve_group` — the process group (default: the world), with a clear error when
  ``torch.distributed`` is not initialised.
* :func:`agree` — the one *agreement* collective every public function runs before its work: an
  all-gather of a few integers per rank (its shard shape, dtype, options, a checksum of the
  target, and whether its local checks failed). From it every rank learns the shard offsets
  and the global vocabulary size, and every rank raises the *same* error when anything is
  wrong anywhere — no rank enters a reduction the others skip, so bad input never hangs.
* :func:`all_reduce_max` / :func:`all_reduce_sum` — the (at most two) reductions of the math.
* DTensor unwrapping: which mesh dimension shards the classes, which shard the batch.

No autograd is defined here except :class:`AllReduceSumIdentityBackward` (a sum over the batch
groups of a replicated loss: its backward is the identity on each rank).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "AllReduceSumIdentityBackward",
    "Shards",
    "agree",
    "all_reduce_max",
    "all_reduce_sum",
    "dtensor_parts",
    "resolve_group",
]

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_MAX_DIMS = 6  # logits dims carried in the agreement vector (more: a checksum of the rest)


def resolve_group(fn: str, group):
    """The process group to use: ``group``, or the default (world) group; raises when
    ``torch.distributed`` is unavailable or not initialised (a local error, identical on every
    rank, raised before any collective)."""
    if not dist.is_available():
        raise RuntimeError(f"`{fn}`: torch.distributed is not available in this build of torch.")
    if not dist.is_initialized():
        raise RuntimeError(
            f"`{fn}`: the default process group is not initialised; call "
            "`torch.distributed.init_process_group(...)` on every rank first."
        )
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"`{fn}`: `group` must be a torch.distributed.ProcessGroup or None. "
            f"Got {type(group).__name__}."
        )
    if dist.get_rank(group) < 0:
        raise ValueError(f"`{fn}`: this rank is not a member of `group`.")
    return group


@dataclass(frozen=True)
class Shards:
    """The vocabulary partition seen by this rank: ``start`` (global index of the first local
    class), ``size`` (local classes), ``total`` (V), ``rank``/``world`` in the group."""

    start: int
    size: int
    total: int
    rank: int
    world: int


def _crc(obj) -> int:
    """A deterministic 31-bit checksum (Python's ``hash`` of strings differs between
    processes)."""
    return zlib.crc32(repr(obj).encode()) & 0x7FFFFFFF


def _target_stats(target: torch.Tensor | None, kind: int, ignore_index: int) -> torch.Tensor:
    """``[min, max, checksum]`` of a class-index target over its non-ignored entries (on the
    target's device, no synchronisation), so ranks can check range and agreement."""
    if target is None or kind != 1 or target.numel() == 0:
        return torch.zeros(3, dtype=torch.int64)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    big = torch.iinfo(torch.int64).max
    lo = torch.where(valid, t, torch.full_like(t, big)).amin()
    hi = torch.where(valid, t, torch.full_like(t, -big)).amax()
    pos = torch.arange(t.numel(), device=t.device) % 1009 + 1
    chk = ((t % 1000003) * pos).sum()
    return torch.stack([lo, hi, chk]).cpu()


def agree(
    fn: str,
    group,
    local_error: BaseException | None,
    logits_shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    vocab_start: int | None = None,
    target: torch.Tensor | None = None,
    target_kind: int = 0,
    ignore_index: int = -100,
    options: tuple = (),
    extra_groups: tuple = (),
) -> Shards:
    """The agreement collective: one all-gather of 16 integers per rank over
    ``group`` (and one more over each of ``extra_groups``, which only spreads the verdict — a
    2-D mesh needs its row group then its column group for an error anywhere to reach every
    rank).

    ``local_error`` is the exception this rank's own checks raised (or None). Every rank
    checks the gathered table the same way, so either all ranks return the same
    :class:`Shards` or all raise the same exception. ``target_kind``: 0 none, 1 class indices
    (replicated: must agree and lie in ``[0, V)`` or equal ``ignore_index``), 2 probabilities.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shape_crc = _crc(tuple(logits_shape[:-1]))
    if len(logits_shape) > _MAX_DIMS:  # carry (rows, classes); the crc still sees every dim
        logits_shape = (math.prod(logits_shape[:-1]), logits_shape[-1])
    dims = list(logits_shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - min(len(logits_shape), _MAX_DIMS))
    head = [
        0 if local_error is None else 1,
        len(logits_shape),
        *dims,
        shape_crc,
        _DTYPE_CODES.get(dtype, 0),
        target_kind,
        -1 if vocab_start is None else int(vocab_start),
        _crc(options),
    ]
    info = torch.cat(
        [torch.tensor(head, dtype=torch.int64), _target_stats(target, target_kind, ignore_index)]
    )
    table = _all_gather_rows(info, group, world)
    status = int(table[:, 0].max())  # some rank's own checks failed: its error wins
    message = None if status else _check_table(fn, table, target_kind, ignore_index)
    flag = 1 if (status or message is not None) else 0
    for g in extra_groups:  # spread "something failed" to the whole mesh
        flags = _all_gather_rows(torch.tensor([flag], dtype=torch.int64), g, dist.get_world_size(g))
        flag = int(flags.max())
    if flag:
        _raise_everywhere(fn, group, extra_groups, local_error, message)
    sizes = [int(s) for s in table[:, 2 + len(logits_shape) - 1]]
    starts_given = [int(s) for s in table[:, 2 + _MAX_DIMS + 3]]
    if starts_given[0] >= 0:
        start = starts_given[rank]
    else:
        start = sum(sizes[:rank])
    return Shards(start=start, size=sizes[rank], total=sum(sizes), rank=rank, world=world)


def _all_gather_rows(info: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gather a small int64 vector (on the CPU for gloo, on the group's device otherwise)."""
    device = _group_device(group)
    x = info.to(device)
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.view(world, x.numel()).cpu()


def _group_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_table(fn: str, table: torch.Tensor, kind: int, ignore_index: int) -> str | None:
    """The message every rank derives from the gathered table, or None when all agree."""
    world = table.shape[0]
    rows = table.tolist()
    nd = rows[0][1]

    def shape_of(r):
        n = rows[r][1]
        return tuple(rows[r][2 : 2 + min(n, _MAX_DIMS)])

    for r in range(1, world):
        if rows[r][1] != nd or rows[r][2 + _MAX_DIMS] != rows[0][2 + _MAX_DIMS]:
            return (
                f"`{fn}`: the shard shapes of `logits` must agree across the ranks of the group "
                f"in every dimension but the last (the classes). Got {shape_of(0)} on rank 0 "
                f"and {shape_of(r)} on rank {r}."
            )
    for col, name in ((3 + _MAX_DIMS, "dtype of `logits`"), (4 + _MAX_DIMS, "kind of `target`")):
        for r in range(1, world):
            if rows[r][col] != rows[0][col]:
                return f"`{fn}`: the {name} must be the same on every rank; rank {r} differs from rank 0."
    for r in range(1, world):
        if rows[r][6 + _MAX_DIMS] != rows[0][6 + _MAX_DIMS]:
            return (
                f"`{fn}`: the options (reduction, label_smoothing, ignore_index, z_loss, weight, "
                f"dim) must be the same on every rank; rank {r} differs from rank 0."
            )
    sizes = [rows[r][2 + nd - 1] for r in range(world)] if nd <= _MAX_DIMS else []
    total = sum(sizes)
    starts = [rows[r][5 + _MAX_DIMS] for r in range(world)]
    if any(s >= 0 for s in starts):
        if any(s < 0 for s in starts):
            return f"`{fn}`: `vocab_start` must be given on every rank or on none."
        spans = sorted(zip(starts, sizes, strict=True))
        pos = 0
        for s, n in spans:
            if s != pos:
                return (
                    f"`{fn}`: the shards [vocab_start, vocab_start + size) must tile [0, {total}) "
                    f"without gaps or overlaps. Got starts {starts} and sizes {sizes}."
                )
            pos += n
    if kind == 1:
        lo0, hi0, chk0 = rows[0][-3:]
        for r in range(1, world):
            if rows[r][-1] != chk0 or rows[r][-3] != lo0 or rows[r][-2] != hi0:
                return (
                    f"`{fn}`: the class-index `target` must be the same on every rank (global "
                    f"class indices); rank {r} differs from rank 0."
                )
        if hi0 >= total or (lo0 < 0 and lo0 != torch.iinfo(torch.int64).max):
            bad = hi0 if hi0 >= total else lo0
            return (
                f"`{fn}`: class-index `target` must lie in [0, {total}) or equal `ignore_index` "
                f"({ignore_index}). Got {bad}."
            )
    return None


def _raise_everywhere(fn, group, extra_groups, local_error, message):
    """All ranks raise the same exception: the first failing rank's own error if a rank's
    local checks failed (its type and message, sent with an object all-gather), else the
    table's message."""
    payload = None
    if local_error is not None:
        where = f" (on rank {dist.get_rank(group)} of the group)"
        payload = (type(local_error).__name__, str(local_error) + where)
    elif message is not None:
        payload = ("ValueError", message)
    for g in (group, *extra_groups):
        got: list = [None] * dist.get_world_size(g)
        dist.all_gather_object(got, payload, group=g)
        firsts = [(r, p) for r, p in enumerate(got) if p is not None]
        if firsts:
            payload = firsts[0][1]
    kind, text = payload if payload is not None else ("RuntimeError", f"`{fn}`: a rank failed.")
    exc = {"ValueError": ValueError, "TypeError": TypeError, "IndexError": IndexError}.get(
        kind, RuntimeError
    )
    raise exc(text)


def all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    """Element-wise maximum over the group (in place on ``x``, which the caller owns)."""
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Element-wise sum over the group (in place on ``x``, which the caller owns)."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


class AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum of a per-rank partial over ``group``; every rank gets the same total (a replicated
    loss), so the gradient of each rank's partial is the incoming gradient itself."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def dtensor_parts(fn: str, x, class_dim: int):
    """For a DTensor ``x`` whose class dimension ``class_dim`` (normalised) is sharded:
    ``(local, mesh, placements, class_mesh_dim, batch_mesh_dims)``. Supported placements: the
    class dimension ``Shard`` on exactly one mesh dimension; every other mesh dimension
    ``Replicate`` or ``Shard`` of a batch dimension. Raises ValueError otherwise (a local
    check on metadata that is the same on every rank, so every rank raises)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(x.placements)
    class_dims = []
    batch_dims = []
    for i, p in enumerate(placements):
        if type(p) is Shard and p.dim % x.ndim == class_dim:
            class_dims.append(i)
        elif type(p) is Shard:
            batch_dims.append(i)
        elif not isinstance(p, Replicate):
            raise ValueError(
                f"`{fn}`: unsupported DTensor placement {p} on mesh dimension {i}; `logits` "
                f"must be Shard({class_dim}) (the classes) on one mesh dimension and Replicate "
                f"or Shard of a batch dimension on the others. Got {placements}."
            )
    if len(class_dims) != 1:
        raise ValueError(
            f"`{fn}`: `logits` must be sharded on the class dimension ({class_dim}) over exactly "
            f"one mesh dimension. Got placements {placements}."
        )
    return x.to_local(), x.device_mesh, placements, class_dims[0], tuple(batch_dims)
