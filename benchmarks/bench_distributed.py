"""Vocabulary-parallel cross-entropy: time and memory per rank, CPU gloo, world size 2.

    python benchmarks/bench_distributed.py [--quick] [--json PATH]

Each (implementation, shape) runs in its own spawn of 2 processes on localhost (so its peak
memory is its own). Every rank holds ``logits[:, V_r]`` (float32, ``V_r = V/2``) and global
class-index targets, and runs forward + backward of the mean loss:

* ``softjac``: ``softjac.distributed.cross_entropy`` (agreement all-gather + 2 all-reduces
  forward, no communication backward);
* ``gather``: all-gather the logits (``torch.distributed.nn.functional.all_gather``, with
  autograd) and ``F.cross_entropy`` on the full ``(N, V)``;
* ``loss_parallel``: DTensor ``Shard(1)`` logits and ``F.cross_entropy`` inside
  ``torch.distributed.tensor.parallel.loss_parallel()`` — only without label smoothing, which
  it does not support.

Correctness first: every implementation's loss and gradient shard against float64
``F.cross_entropy`` on the gathered logits (the run stops on a mismatch). Timing: per
iteration the slowest rank's wall time (an all-reduce max of ``perf_counter`` deltas around
``barrier``-aligned iterations), median and 20th/80th percentiles. Memory: peak resident set
growth per rank during the timed iterations (``VmHWM`` after resetting it through
``/proc/self/clear_refs``), the largest over the ranks. One JSON schema: rows of ``op``,
``shape``, ``dtype``, ``impl``, ``options``, ``median_s``/``p20_s``/``p80_s``,
``peak_mem_bytes``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

IMPLS = ("softjac", "gather", "loss_parallel")
OPTIONS = ({}, {"label_smoothing": 0.1})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _step(impl, z_r, target, opts, group, mesh):
    """One forward + backward; returns (loss, gradient of this rank's shard)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    zl = z_r.detach().requires_grad_()
    if impl == "softjac":
        import softjac.distributed as sd

        loss = sd.cross_entropy(zl, target, group=group, **opts)
        loss.backward()
        return loss.detach(), zl.grad
    if impl == "gather":
        from torch.distributed.nn.functional import all_gather

        full = torch.cat(all_gather(zl, group=group), dim=-1)
        loss = F.cross_entropy(full, target, **opts)
        # all_gather's backward sums every rank's cotangent (a reduce-scatter); each rank holds
        # the same loss, so back-propagate 1/world of it to get the loss's gradient
        (loss / dist.get_world_size(group)).backward()
        return loss.detach(), zl.grad
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    world = dist.get_world_size(group)
    v = z_r.shape[-1] * world
    dt = DTensor.from_local(
        zl, mesh, [Shard(1)], shape=torch.Size((z_r.shape[0], v)), stride=(v, 1)
    )
    td = DTensor.from_local(target, mesh, [Replicate()])
    with loss_parallel():
        loss = F.cross_entropy(dt, td, **opts)
        loss.backward()
    return loss.full_tensor().detach(), zl.grad


def _worker(rank, world, port, impl, n, v, opts_list, reps, out):
    import warnings

    import torch.distributed as dist
    import torch.nn.functional as F

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations of the baselines
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=datetime.timedelta(seconds=120),
    )
    mesh = None
    if impl == "loss_parallel":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    group = dist.group.WORLD
    vr = v // world
    rows = []
    for opts in opts_list:
        # correctness first, float64 on a small case
        g = torch.Generator().manual_seed(1)
        zs = torch.randn(64, 10 * world, generator=g, dtype=torch.float64)
        ts = torch.randint(0, zs.shape[1], (64,), generator=g)
        w = zs.shape[1] // world
        loss, grad = _step(impl, zs[:, rank * w : (rank + 1) * w].clone(), ts, opts, group, mesh)
        zr = zs.clone().requires_grad_()
        ref = F.cross_entropy(zr, ts, **opts)
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            grad, zr.grad[:, rank * w : (rank + 1) * w], rtol=1e-12, atol=1e-14
        )
        # timing and memory, float32
        gen = torch.Generator().manual_seed(2)
        z = torch.randn(n, v, generator=gen)[:, rank * vr : (rank + 1) * vr].clone()
        t = torch.randint(0, v, (n,), generator=gen)
        for _ in range(2):
            _step(impl, z, t, opts, group, mesh)
        dist.barrier()
        before = _rss("VmRSS")
        _hwm_reset()
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            _step(impl, z, t, opts, group, mesh)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times.append(dt.item())
        peak = torch.tensor([_rss("VmHWM") - before], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        q = statistics.quantiles(times, n=10)
        rows.append(
            dict(
                op="cross_entropy fwd+bwd",
                shape=[n, v],
                dtype="float32",
                impl=impl,
                options=opts,
                world=world,
                median_s=statistics.median(times),
                p20_s=q[1],
                p80_s=q[7],
                peak_mem_bytes=int(peak.item()),
            )
        )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_one(impl, n, v, reps, tmp: Path, world=2) -> list[dict]:
    import torch.multiprocessing as mp

    opts_list = [o for o in OPTIONS if not (impl == "loss_parallel" and o)]
    out = tmp / f"{impl}_{n}_{v}.json"
    mp.start_processes(
        _worker,
        args=(world, _free_port(), impl, n, v, opts_list, reps, str(out)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--reps", type=int, default=None, help="timed iterations (default 15)")
    args = ap.parse_args(argv)
    shapes = [(256, 4096)] if args.quick else [(1024, 32768), (4096, 8192)]
    reps = args.reps or (5 if args.quick else 15)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, v in shapes:
        for impl in IMPLS:
            rows += run_one(impl, n, v, reps, tmp)
    print("correctness: OK (loss and gradient shards vs float64 F.cross_entropy, every impl)")
    print(
        f"{'shape':>14} {'impl':>14} {'options':>22} {'median ms':>10} {'p20-p80 ms':>15} {'peak MiB':>9}"
    )
    for r in rows:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        print(
            f"{tuple(r['shape'])!s:>14} {r['impl']:>14} {opts:>22} {r['median_s'] * 1e3:10.1f} "
            f"{r['p20_s'] * 1e3:7.1f}-{r['p80_s'] * 1e3:<7.1f} {r['peak_mem_bytes'] / 2**20:9.1f}"
        )
    if args.json:
        meta = dict(
            torch=torch.__version__,
            machine=platform.processor() or platform.machine(),
            cpus=os.cpu_count(),
            load=os.getloadavg(),
            python=sys.version.split()[0],
        )
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
