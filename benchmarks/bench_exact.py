"""The exact from-logits VJP kernel against the lse-based one and PyTorch, CPU float32.

    python benchmarks/bench_exact.py [--rounds 15] [--json out.json]

Per shape (N, K): first each result is checked against ``softjac._core.vjp_logits_last`` in
float64 (normwise, ``‖out − ref‖∞ ≤ 1e-5 ‖ref‖∞``; PyTorch's, from a rounded σ, is not checked), then the three are timed in interleaved
rounds (one call of each per round, fresh outputs, the order rotated), and the medians and
the 20th/80th percentiles are reported with the ratio ``PyTorch / impl``:

* ``exact``   — ``_cpu.softmax_vjp_logits(z, v)``: two passes, the max found online;
* ``lse``     — ``_cpu.softmax_vjp_from_logits(z, lse, v)`` with ``lse`` given (not timed);
* ``torch``   — ``torch.softmax(z)`` then ``torch._softmax_backward_data`` (what autograd
  through ``F.softmax`` runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

sys.path.insert(0, os.path.dirname(__file__))

import _schema
from softjac import _core
from softjac.kernels import _cpu

SHAPES = [(16384, 1024), (128, 131072), (4096, 128)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert _cpu.available(), _cpu.unavailable_reason()
    rows = []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels {_cpu.capability()}"
    )
    for n, k in SHAPES:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(n, k, generator=g) * 4
        v = torch.randn(n, k, generator=g)
        lse = torch.logsumexp(z, -1, keepdim=True)
        impls = {
            "exact": lambda z=z, v=v: _cpu.softmax_vjp_logits(z, v),
            "lse": lambda z=z, v=v, lse=lse: _cpu.softmax_vjp_from_logits(z, lse, v),
            "torch": lambda z=z, v=v: torch._softmax_backward_data(
                v, torch.softmax(z, -1), -1, torch.float32
            ),
        }
        ref = _core.vjp_logits_last(z.double(), v.double())
        for name, fn in impls.items():
            err = (fn().double() - ref).abs().max().item() / ref.abs().max().item()
            if err > 1e-5 and name != "torch":  # PyTorch's own rounding of σ is not checked
                sys.exit(f"{name} at {(n, k)}: normwise error {err:.3g}")
        times: dict[str, list[float]] = {name: [] for name in impls}
        names = list(impls)
        for _ in range(2):  # warm-up
            for name in names:
                impls[name]()
        for r in range(args.rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                t0 = time.perf_counter()
                impls[name]()
                times[name].append(time.perf_counter() - t0)
        for name in names:
            row = _schema.row("vjp_logits", (n, k), "float32", name, times[name], times["torch"])
            rows.append(row)
            print(
                f"{n:>6}x{k:<7} {name:6} median {row['median'] * 1e3:8.3f} ms "
                f"(p20 {row['p20'] * 1e3:.3f}, p80 {row['p80'] * 1e3:.3f})  "
                f"{row['ratio']:.2f}x torch"
            )
    if args.json:
        _schema.write(args.json, rows)


if __name__ == "__main__":
    main()
