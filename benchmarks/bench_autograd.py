"""Autograd benchmarks: softjac's softmax Function and cross-entropy against PyTorch, on CPU.

    python benchmarks/bench_autograd.py [--quick] [--json PATH]

Checks correctness first (values and gradients against ``torch.softmax`` /
``F.cross_entropy`` in float64), then times with ``torch.utils.benchmark`` (median):

* forward+backward of ``softmax_last_autograd`` vs ``torch.softmax`` and of
  ``softjac.cross_entropy`` vs ``F.cross_entropy`` (ratio = torch / softjac; > 1 is faster);
* double backward (a Hessian-vector product by two reverse passes) vs PyTorch's;
* memory of ``softjac.cross_entropy_hessian`` vs the dense ``(N, K, K)`` blocks at K = 32768
  (the dense size is computed analytically: it does not fit).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(__file__))

import _schema
import softjac
from softjac._autograd import softmax_last_autograd

_USE_MIN = False


def check_correctness() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 257, generator=gen, dtype=torch.float64)
    g = torch.randn(16, 257, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 257, (16,), generator=gen)
    for ours, ref in [
        (softmax_last_autograd, lambda z: torch.softmax(z, -1)),
        (
            lambda z: softjac.cross_entropy(z, t, label_smoothing=0.1, reduction="none"),
            lambda z: F.cross_entropy(z, t, label_smoothing=0.1, reduction="none"),
        ),
    ]:
        zo = z.clone().requires_grad_()
        zr = z.clone().requires_grad_()
        out, expect = ours(zo), ref(zr)
        cot = g[:, : out.shape[-1]] if out.ndim == 2 else g[:, 0]
        (go,) = torch.autograd.grad(out, zo, cot, create_graph=True)
        (gr,) = torch.autograd.grad(expect, zr, cot, create_graph=True)
        (ho,) = torch.autograd.grad(go, zo, g)
        (hr,) = torch.autograd.grad(gr, zr, g)
        for a, b in [(out, expect), (go, gr), (ho, hr)]:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    print("correctness: OK (values, gradients, double backward vs PyTorch in float64)")


def _time(stmt: str, env: dict, min_run_time: float) -> float:
    t = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    m = t.blocked_autorange(min_run_time=min_run_time)
    return min(m.times) if _USE_MIN else m.median


def _pair(ours: tuple[str, dict], ref: tuple[str, dict], min_run_time: float) -> tuple:
    """Per-call times (seconds) of ``ours`` and ``ref``, measured alternately in 5 rounds, so
    a change in machine load hits both. Each round is the median of ``torch.utils.benchmark``
    blocks, or their minimum with ``--min``."""
    to, tr = [], []
    for _ in range(5):
        to.append(_time(*ours, min_run_time / 5))
        tr.append(_time(*ref, min_run_time / 5))
    return to, tr


def _paired_row(op: str, shape: tuple, ours: tuple[str, dict], ref: tuple[str, dict], mrt):
    """Two schema rows (softjac, torch) from :func:`_pair` of the two statements."""
    t_ours, t_ref = _pair(ours, ref, mrt)
    return [
        _schema.row(op, shape, "float32", "softjac", t_ours, t_ref),
        _schema.row(op, shape, "float32", "torch", t_ref, t_ref),
    ]


def time_softmax(shapes, min_run_time):
    rows = []
    for n, k in shapes:
        env = dict(z=torch.randn(n, k).requires_grad_(), g=torch.randn(n, k), torch=torch,
                   sj=softmax_last_autograd)  # fmt: skip
        rows.extend(_paired_row(
            "softmax fwd+bwd", (n, k),
            ("z.grad = None; sj(z).backward(g)", env),
            ("z.grad = None; torch.softmax(z, -1).backward(g)", env),
            min_run_time,
        ))  # fmt: skip
    return rows


def time_cross_entropy(shapes, min_run_time):
    rows = []
    for n, k in shapes:
        env = dict(z=torch.randn(n, k).requires_grad_(), t=torch.randint(0, k, (n,)), F=F,
                   sj=softjac)  # fmt: skip
        rows.extend(_paired_row(
            "cross_entropy fwd+bwd", (n, k),
            ("z.grad = None; sj.cross_entropy(z, t).backward()", env),
            ("z.grad = None; F.cross_entropy(z, t).backward()", env),
            min_run_time,
        ))  # fmt: skip
    return rows


def time_double_backward(shapes, min_run_time):
    rows = []
    stmt = (
        "z.grad = None\n"
        "(gz,) = torch.autograd.grad(f(z), z, w, create_graph=True)\n"
        "(hv,) = torch.autograd.grad(gz, z, v)"
    )
    for n, k in shapes:
        z = torch.randn(n, k).requires_grad_()
        w, v = torch.randn(n, k), torch.randn(n, k)
        t = torch.randint(0, k, (n,))
        for name, fo, fr in [
            ("softmax double bwd (HVP)", softmax_last_autograd, lambda z: torch.softmax(z, -1)),
            (
                "cross_entropy double bwd (HVP)",
                lambda z, t=t: softjac.cross_entropy(z, t, reduction="none"),
                lambda z, t=t: F.cross_entropy(z, t, reduction="none"),
            ),
        ]:
            wi = w if name.startswith("softmax") else w[:, 0]
            rows.extend(_paired_row(
                name, (n, k),
                (stmt, dict(z=z, w=wi, v=v, f=fo, torch=torch)),
                (stmt, dict(z=z, w=wi, v=v, f=fr, torch=torch)),
                min_run_time,
            ))  # fmt: skip
    return rows


def hessian_memory(n: int = 64, k: int = 32768) -> dict:
    op = softjac.cross_entropy_hessian(torch.randn(n, k), torch.randint(0, k, (n,)))
    held = sum(t.numel() * t.element_size() for t in (op.probs, op.coef))
    dense = n * k * k * op.probs.element_size()
    return dict(op="cross_entropy_hessian memory", shape=(n, k), operator_bytes=held,
                dense_bytes=dense, ratio=dense / held)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--min", action="store_true", help="report the fastest block, not the median")
    args = ap.parse_args(argv)
    global _USE_MIN
    _USE_MIN = args.min
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    check_correctness()
    mrt = 0.3 if args.quick else 0.9
    # in-cache shapes, then memory-sized ones (fresh 64 MiB outputs: page faults count)
    sm_shapes = [(4096, 128), (256, 8192), (32, 32768), (16384, 1024), (64, 262144)]
    ce_shapes = [(4096, 128), (256, 8192), (64, 32768), (128, 131072)]
    db_shapes = [(256, 1024), (32, 32768)]
    if args.quick:
        sm_shapes, ce_shapes, db_shapes = sm_shapes[1:4], ce_shapes[1:3], db_shapes[:1]
    rows = (
        time_softmax(sm_shapes, mrt)
        + time_cross_entropy(ce_shapes, mrt)
        + time_double_backward(db_shapes, mrt)
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, float32, CPU, {'min' if _USE_MIN else 'median'} "
          "time; ratio = torch / softjac (> 1: softjac faster)")  # fmt: skip
    print(f"{'op':34s} {'shape':>14s} {'softjac ms':>11s} {'torch ms':>9s} {'ratio':>6s}")
    for r, b in zip(rows[::2], rows[1::2], strict=True):
        print(f"{r['op']:34s} {'x'.join(map(str, r['shape'])):>14s} {r['median'] * 1e3:11.3f} "
              f"{b['median'] * 1e3:9.3f} {r['ratio']:6.2f}")  # fmt: skip
    mem = hessian_memory()
    print(
        f"cross_entropy_hessian at (N, K) = {mem['shape']}: operator {mem['operator_bytes'] / 2**20:.1f}"
        f" MiB vs dense (N, K, K) {mem['dense_bytes'] / 2**30:.0f} GiB (analytic), "
        f"{mem['ratio']:.0f}x smaller"
    )
    if args.json:
        _schema.write(args.json, rows, memory=mem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
