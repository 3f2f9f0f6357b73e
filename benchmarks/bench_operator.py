"""Benchmark ``softjac.SoftmaxJacobian`` against dense PyTorch linear algebra.

Checks correctness first (eigenvalues against ``torch.linalg.eigvalsh`` of the dense matrix,
products against the dense matmul), then times, with ``torch.utils.benchmark.Timer``
(``blocked_autorange``, median):

* ``op.eigvalsh()`` vs ``torch.linalg.eigvalsh(J_dense)`` at K = 2048, float64 (goal ≥ 20×);
* the same for a batch of 64 × K = 256 (goal ≥ 10×);
* ``op @ x`` with x of shape (K, m) vs ``J_dense @ x`` at K = 4096 (O(K·m) vs O(K²·m)).

Usage::

    python benchmarks/bench_operator.py [--quick] [--json PATH] [--device cpu|cuda]

``--json`` writes rows of the schema in ``benchmarks/_schema.py`` (per implementation: median,
p20, p80 seconds over the timer's blocks, ratio = dense / softjac), the run's details under
``meta``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import datetime, timezone

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(__file__))

import _schema
from softjac import SoftmaxJacobian, _spectral


def _median(stmt, globs, min_run_time):
    t = benchmark.Timer(stmt=stmt, globals=globs).blocked_autorange(min_run_time=min_run_time)
    return t.median, t


def _schema_rows(op: str, shape: str, ours: list[float], dense: list[float]) -> list[dict]:
    return [
        _schema.row(op, shape, "float64", "softjac", ours, dense),
        _schema.row(op, shape, "float64", "dense", dense, dense),
    ]


def _logits(batch, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, k, generator=g, dtype=torch.float64) * 3).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(device) -> None:
    """Correctness before timing: eigenvalues and products agree with dense float64."""
    for batch, k in [((), 300), ((8,), 64)]:
        op = SoftmaxJacobian(_logits(batch, k, device, seed=1))
        dense = op.to_dense()
        ref = torch.linalg.eigvalsh(dense)
        err = (op.eigvalsh() - ref).abs().max().item()
        if err > 1e-14:
            raise SystemExit(f"correctness check failed: eigvalsh differs by {err:.2e}")
        x = torch.randn(*batch, k, 5, dtype=torch.float64, device=device)
        perr = (op @ x - dense @ x).abs().max().item()
        if perr > 1e-14:
            raise SystemExit(f"correctness check failed: op @ x differs by {perr:.2e}")


def run(quick: bool, device: torch.device) -> list[dict]:
    mrt = 0.2 if quick else 1.0
    rows = []
    configs = [
        ("eigvalsh", (), 2048, "≥20×"),
        ("eigvalsh", (64,), 256, "≥10×"),
    ]
    for name, batch, k, goal in configs:
        op = SoftmaxJacobian(_logits(batch, k, device))
        dense = op.to_dense()
        globs = {"op": op, "dense": dense, "torch": torch}
        sync = "; torch.cuda.synchronize()" if device.type == "cuda" else ""
        ours, mo = _median("op.eigvalsh()" + sync, globs, mrt)
        ref, md = _median("torch.linalg.eigvalsh(dense)" + sync, globs, mrt)
        shape = f"{'×'.join(map(str, batch)) + ' × ' if batch else ''}K={k}"
        rows.append(
            {
                "schema": _schema_rows(name, shape, mo.times, md.times),
                "op": name,
                "shape": f"{'×'.join(map(str, batch)) + ' × ' if batch else ''}K={k}",
                "softjac_s": ours,
                "dense_s": ref,
                "speedup": ref / ours,
                "goal": goal,
            }
        )
    k, m = (4096, 16)
    op = SoftmaxJacobian(_logits((), k, device))
    dense = op.to_dense()
    x = torch.randn(k, m, dtype=torch.float64, device=device)
    globs = {"op": op, "dense": dense, "x": x}
    ours, mo = _median("op @ x", globs, mrt)
    ref, md = _median("dense @ x", globs, mrt)
    rows.append(
        {
            "schema": _schema_rows("matmul", f"K={k}, m={m}", mo.times, md.times),
            "op": "matmul",
            "shape": f"K={k}, m={m}",
            "softjac_s": ours,
            "dense_s": ref,
            "speedup": ref / ours,
            "goal": "O(K·m) vs O(K²·m)",
        }
    )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check(device)
    rows = run(args.quick, device)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        )
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "secular_loop": (
            "fused C" if device.type == "cpu" and _spectral._native_lib() is not None else "torch"
        ),
    }
    print(
        f"softjac SoftmaxJacobian benchmark — {meta['date']}, torch {meta['torch']}, "
        f"{meta['device']}, {meta['threads']} threads, secular loop: {meta['secular_loop']}"
    )
    print(f"{'op':<10}{'shape':<18}{'softjac':>12}{'dense':>12}{'speedup':>10}  goal")
    for r in rows:
        print(
            f"{r['op']:<10}{r['shape']:<18}{r['softjac_s'] * 1e3:>10.2f}ms"
            f"{r['dense_s'] * 1e3:>10.2f}ms{r['speedup']:>9.1f}×  {r['goal']}"
        )
    if args.json:
        _schema.write(args.json, [x for r in rows for x in r["schema"]], meta=meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
