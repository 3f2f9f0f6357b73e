"""Multi-process tests of ``softjac.distributed`` (gloo on localhost, CPU).

One ``torch.multiprocessing`` spawn of 4 processes runs every case (spawning is what costs);
the group sizes 1, 2, 3 and 4 are process groups of ranks ``0..n-1`` (plus the non-contiguous
group ``{1, 3}``), and the DTensor cases use 1-D and 2-D meshes of the 4 processes. Each rank
builds the same full logits from a seed, takes its shard, runs the distributed function and
compares its shard of the result with the single-device softjac function on the full logits
(float64: a few units in the last place of the entry's scale; float32: the single-device
tolerances of ``tests/test_losses.py``). Each case records its outcome per rank; the pytest
side asserts every rank's outcome. Collectives are counted with
``torch.distributed.tensor.debug.CommDebugMode``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

WORLD = 4
JOIN_TIMEOUT_S = float(os.environ.get("SOFTJAC_DIST_TIMEOUT", "240"))
EPS64 = torch.finfo(torch.float64).eps

CASES: dict = {}


def case(group: object):
    """Register a case run on ``group``: an int n (ranks 0..n-1), a tuple of ranks, or
    ``"world"`` (all 4, the default group)."""

    def deco(fn):
        CASES[fn.__name__] = (group, fn)
        return fn

    return deco


# ----------------------------------------------------------------------------------------
# helpers used inside the workers


def sizes_for(v: int, w: int) -> list[int]:
    """Contiguous shards in rank order; the first ``v % w`` ranks get one more class."""
    return [v // w + (1 if r < v % w else 0) for r in range(w)]


def shard(x: torch.Tensor, sizes: list[int], rank: int, dim: int = -1) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank]).clone()


def full_logits(seed, shape, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


FAILS: list[str] = []


def expect(cond: bool, message) -> None:
    """A soft assertion: recorded, raised at the end of the case (so that a failing rank
    still takes part in the case's remaining collectives and the others do not stall)."""
    if not cond:
        FAILS.append(str(message))


def check_ulps(name, got, ref, scale, n_ulp=4.0, eps=EPS64):
    """``|got − ref| <= n_ulp · eps · scale`` entry-wise (``scale`` the entry's magnitude)."""
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape:
        FAILS.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    err = (got - ref).abs()
    bound = n_ulp * eps * scale.double()
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        FAILS.append(
            f"{name}: {int(bad.sum())} entries beyond {n_ulp} ulp of their scale; first at {i}: "
            f"got {got[tuple(i)].item()!r}, ref {ref[tuple(i)].item()!r}, "
            f"scale {scale[tuple(i)].item()!r}"
        )


def ce_row_scale(z, target, weight, eps, zl):
    """Per-row sum of the magnitudes of the terms of the loss, ``(...)``: the scale of the
    rounding error of the float64 reference itself (it forms ``lse − z_c`` with
    ``|lse| + |z_c|`` in play). Class indices: ``(1 − ε) w_y (|lse| + |z_y|) + (ε/V) Σ_c w_c
    (|lse| + |z_c|)``; probabilities: ``Σ_c w_c y'_c (|lse| + |z_c|)``; plus ``ζ lse²``."""
    v = z.shape[-1]
    full_lse = torch.logsumexp(z, -1)
    z = z - z.amax(-1, keepdim=True)
    lse = torch.logsumexp(z, -1)
    w = torch.ones(v, dtype=z.dtype) if weight is None else weight
    mag = lse.abs().unsqueeze(-1) + z.abs()
    if target.is_floating_point():
        s = (w * ((1 - eps) * target + eps / v) * mag).sum(-1)
        return s + zl * full_lse * full_lse
    valid = target != -100
    tg = torch.where(valid, target, 0)
    s = (1 - eps) * w[tg] * mag.gather(-1, tg.unsqueeze(-1)).squeeze(-1)
    s = s + eps / v * (w * mag).sum(-1) + zl * full_lse * full_lse
    return torch.where(valid, s, torch.zeros_like(s))


def grad_row_scale(z, target, kw, probs):
    """``s_n (a_n + max_c |t_{n,c}|)``: the size of the terms of each row's gradient
    ``s_n (a_n σ − t_n)`` (``s_n`` the reduction's scale, ``a_n`` the coefficient of σ, ``t``
    the target part)."""
    v = z.shape[-1]
    eps, zl = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
    w = kw.get("weight")
    w = torch.ones(v, dtype=z.dtype) if w is None else w
    lse = torch.logsumexp(z, -1).abs()
    if probs:
        wy = w * ((1 - eps) * target + eps / v)
        a = wy.sum(-1) + 2 * zl * lse
        t = wy.amax(-1)
    else:
        valid = target != -100
        wy = torch.where(valid, w[torch.where(valid, target, 0)], 0)
        a = ((1 - eps) * wy + eps / v * w.sum() + 2 * zl * lse) * valid
        t = ((1 - eps) * wy + eps / v * w.amax()) * valid
    red = kw.get("reduction", "mean")
    s = 1.0 / _mean_den(target, kw, probs) if red == "mean" else 1.0
    return s * (a + t)


def count_comms(fn):
    """Run ``fn`` under CommDebugMode; return ``(result, {op name: count})``."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        out = fn()
    counts = {
        str(k).split("'")[1] if "'" in str(k) else str(k): v
        for k, v in mode.get_comm_counts().items()
    }
    return out, counts


def n_allreduce(counts):
    return sum(v for k, v in counts.items() if "allreduce" in k)


def reference_ce(
    z, target, *, weight=None, label_smoothing=0.0, reduction="mean", z_loss=0.0, ignore_index=-100
):
    """Single-device ``softjac.cross_entropy`` on the gathered logits (classes last), plus the
    z-loss term ``ζ lse²`` (0 on ignored rows; divided like the loss under 'mean')."""
    import softjac

    v = z.shape[-1]
    m = z.detach().amax(-1, keepdim=True)
    z2 = (z - m).reshape(-1, v)  # shift invariance: errors relative to the spread
    probs = target.is_floating_point()
    t2 = target.reshape(-1, v) if probs else target.reshape(-1)
    rows = softjac.cross_entropy(
        z2,
        t2,
        weight=weight,
        label_smoothing=label_smoothing,
        reduction="none",
        ignore_index=ignore_index,
    )
    if z_loss:
        lse = m.reshape(-1) + torch.logsumexp(z2, -1)
        zt = z_loss * lse * lse
        if not probs:
            zt = torch.where(t2 != ignore_index, zt, torch.zeros_like(zt))
        rows = rows + zt
    if reduction == "none":
        return rows.reshape(z.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if probs:
        return rows.sum() / rows.shape[0]
    valid = t2 != ignore_index
    w = torch.ones(v, dtype=z.dtype) if weight is None else weight
    return rows.sum() / torch.where(valid, w[torch.where(valid, t2, 0)], 0).sum()


# ----------------------------------------------------------------------------------------
# cases (each gets (group, rank, world) and returns a JSON-able note or None)

CE_OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.25},
    {"reduction": "sum", "label_smoothing": 0.1},
    {"reduction": "none", "weight": True, "z_loss": 1e-3},
    {"z_loss": 1e-2, "label_smoothing": 0.05},
]


def _ce_against_reference(
    group,
    rank,
    world,
    *,
    v=11,
    batch=(3, 4),
    probs=False,
    scale=1.0,
    seed=0,
    vocab_start=None,
    sizes=None,
):
    import softjac.distributed as sd

    sizes = sizes or sizes_for(v, world)
    z = full_logits(seed, (*batch, v), scale)
    g = torch.Generator().manual_seed(seed + 1)
    weight_full = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    if probs:
        target = torch.softmax(torch.randn((*batch, v), generator=g, dtype=torch.float64), -1)
    else:
        target = torch.randint(0, v, batch, generator=g)
        target.view(-1)[::5] = -100
        # the target is the argmax in some rows: the loss there is tiny for scale 1000
        amax = z.argmax(-1)
        target.view(-1)[1::3] = amax.view(-1)[1::3]
    start = sum(sizes[:rank]) if vocab_start is None else vocab_start
    for opts in CE_OPTIONS:
        kw = dict(opts)
        if kw.pop("weight", False):
            kw["weight"] = weight_full
        zl = z.narrow(-1, start, sizes[rank]).clone().requires_grad_()
        zl_before = zl.detach().clone()
        tl = target.narrow(-1, start, sizes[rank]).clone() if probs else target
        loss, counts = count_comms(
            lambda: sd.cross_entropy(zl, tl, group=group, vocab_start=vocab_start, **kw)
        )
        expect(n_allreduce(counts) <= 2, counts)
        zr = z.clone().requires_grad_()
        ref = reference_ce(zr, target, **kw)
        # loss: within 4 ulp of the scale of its terms (reduced like the loss)
        rs = ce_row_scale(
            z, target, kw.get("weight"), kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
        )
        red = kw.get("reduction", "mean")
        scale = (
            rs
            if red == "none"
            else rs.sum() / (_mean_den(target, kw, probs) if red == "mean" else 1.0)
        )
        check_ulps(f"loss {opts}", loss.detach(), ref.detach(), scale + 1e-300)
        losses = [torch.zeros_like(loss) for _ in range(world)]
        torch.distributed.all_gather(losses, loss.detach(), group=group)
        expect(all(torch.equal(o, loss.detach()) for o in losses), ("loss differs", losses))
        # backward: no communication for class indices; probability targets: none either
        _, bcounts = count_comms(lambda: loss.sum().backward())
        expect(sum(bcounts.values()) == 0, ("backward communicates", bcounts))
        ref.sum().backward()
        gref = zr.grad.narrow(-1, start, sizes[rank])
        # gradient a_n σ − t: within 4 ulp of the row's terms (the reference's own rounding)
        gscale = grad_row_scale(z, target, kw, probs).unsqueeze(-1).expand_as(gref) + 1e-300
        check_ulps(f"grad {opts}", zl.grad, gref, gscale)
        expect(torch.equal(zl.detach(), zl_before), "the caller's logits were modified")


def _mean_den(target, kw, probs):
    if probs:
        return target.reshape(-1, target.shape[-1]).shape[0]
    t = target.reshape(-1)
    valid = t != -100
    w = kw.get("weight")
    if w is None:
        return float(valid.sum())
    return float(torch.where(valid, w[torch.where(valid, t, 0)], 0).sum())


for _n in (1, 2, 3, 4):

    def _make(n):
        def ce_index(group, rank, world):
            _ce_against_reference(group, rank, world, v=11, scale=1.0, seed=n)
            _ce_against_reference(group, rank, world, v=11, scale=1000.0, seed=10 + n)

        def ce_probs(group, rank, world):
            _ce_against_reference(group, rank, world, v=10, probs=True, scale=1.0, seed=20 + n)
            _ce_against_reference(group, rank, world, v=10, probs=True, scale=1000.0, seed=30 + n)

        ce_index.__name__ = f"ce_index_w{n}"
        ce_probs.__name__ = f"ce_probs_w{n}"
        case(n)(ce_index)
        case(n)(ce_probs)

    _make(_n)


# ----------------------------------------------------------------------------------------
# the harness: one spawn, every case, outcomes per rank


def _worker(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=20)  # a stuck collective fails the case, not the run
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", timeout=timeout
    )
    groups = {n: dist.new_group(list(range(n)), timeout=timeout) for n in (1, 2, 3, 4)}
    groups[(1, 3)] = dist.new_group([1, 3], timeout=timeout)
    groups["world"] = None
    results = {}
    for name in names:
        spec, fn = CASES[name]
        members = (
            list(range(spec))
            if isinstance(spec, int)
            else list(spec)
            if isinstance(spec, tuple)
            else list(range(world))
        )
        if rank not in members:
            continue
        g = groups[spec]
        t0 = time.perf_counter()
        if os.environ.get("SOFTJAC_DIST_VERBOSE"):
            print(f"rank {rank}: {name}", file=sys.stderr, flush=True)
        FAILS.clear()
        try:
            note = fn(g, members.index(rank), len(members))
            if FAILS:
                raise AssertionError("\n".join(FAILS))
            results[name] = {"ok": True, "note": note}
        except Exception:  # record and go on: the pytest side reports it
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["s"] = round(time.perf_counter() - t0, 3)
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(names: list[str], outdir: Path, world: int = WORLD) -> dict:
    """Spawn ``world`` processes running ``names``; return ``{name: {rank: outcome}}``. The join
    is bounded: past ``JOIN_TIMEOUT_S`` the processes are killed and the run fails."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker,
        args=(world, _free_port(), str(outdir), names),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed cases did not finish within {JOIN_TIMEOUT_S} s")
    out: dict = {}
    for r in range(world):
        for name, res in json.loads(Path(outdir, f"rank{r}.json").read_text()).items():
            out.setdefault(name, {})[r] = res
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_cases(list(CASES), tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("name", list(CASES))
def test_case(outcomes, name):
    spec = CASES[name][0]
    n = spec if isinstance(spec, int) else len(spec) if isinstance(spec, tuple) else WORLD
    got = outcomes.get(name, {})
    assert len(got) == n, f"{name}: outcomes from {sorted(got)} only"
    errors = {r: o["error"] for r, o in got.items() if not o["ok"]}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    notes = [o["note"] for o in got.values()]
    # a case that returns a note (an error message, a value) must return the same on every rank
    assert all(x == notes[0] for x in notes), notes
