"""The public API timed as a user calls it, against PyTorch, on CPU float32.

    python benchmarks/bench_public.py [--rounds 7] [--min-time 0.3] [--json PATH] [--quick]

Checks correctness first on the very inputs it times (whole outputs against float64
references: ``torch.softmax`` and its autograd), then times, in interleaved rounds (each
implementation once per round, ``torch.utils.benchmark`` median of blocks of at least
``--min-time`` seconds), so that bursts of load from other processes hit both alike:

* ``vjp``: ``softjac.vjp(z, v)`` against ``torch.softmax`` + native backward
  (``torch.autograd.grad(torch.softmax(z), z, v)``), the PyTorch way to get ``J v``;
* ``softmax_fwd_bwd``: ``softjac.softmax(z)`` forward and backward against ``torch.softmax``
  forward and backward (``torch.autograd.grad(p, z, g)``).

Prints per case the median time of each (ms), p20/p80 over rounds, and the median over rounds
of the ratio torch/softjac (> 1: softjac is faster); ``--json`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
from torch.utils import benchmark

import softjac
from softjac.kernels import info

VJP_SHAPES = [(16384, 1024), (128, 131072), (4096, 128)]
SOFTMAX_SHAPES = [(4096, 128), (256, 1000), (16384, 1024), (64, 262144)]


def _softjac_vjp(z, v):
    return softjac.vjp(z, v)


def _torch_vjp(zr, v):
    return torch.autograd.grad(torch.softmax(zr, -1), zr, v)[0]


def _softjac_softmax(zr, g):
    return torch.autograd.grad(softjac.softmax(zr), zr, g)[0]


def _torch_softmax(zr, g):
    return torch.autograd.grad(torch.softmax(zr, -1), zr, g)[0]


def _reference(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` in float64 by PyTorch's softmax and its autograd (in row blocks)."""
    out = torch.empty(z.shape, dtype=torch.float64)
    for i in range(0, z.shape[0], 1024):
        zd = z[i : i + 1024].double().requires_grad_()
        out[i : i + 1024] = torch.autograd.grad(
            torch.softmax(zd, -1), zd, v[i : i + 1024].double()
        )[0]
    return out


def _check(name: str, got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Whole-output check: max error at most ``rel`` times the largest reference entry."""
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    if not err <= rel * max(scale, 1e-30) + 1e-12:
        raise SystemExit(f"{name}: max error {err:.3g} against the float64 reference")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _time(fn, args, min_time: float) -> float:
    timer = benchmark.Timer(
        stmt="fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads()
    )
    return timer.blocked_autorange(min_run_time=min_time).median


def run_case(op, shape, ours, ref, args_ours, args_ref, rounds, min_time):
    t_ours, t_ref, ratios = [], [], []
    for _ in range(rounds):
        a = _time(ours, args_ours, min_time)
        b = _time(ref, args_ref, min_time)
        t_ours.append(a)
        t_ref.append(b)
        ratios.append(b / a)
    row = {
        "op": op,
        "shape": list(shape),
        "softjac_ms": {
            "median": statistics.median(t_ours) * 1e3,
            "p20": _pct(t_ours, 0.2) * 1e3,
            "p80": _pct(t_ours, 0.8) * 1e3,
        },
        "torch_ms": {
            "median": statistics.median(t_ref) * 1e3,
            "p20": _pct(t_ref, 0.2) * 1e3,
            "p80": _pct(t_ref, 0.8) * 1e3,
        },
        "speedup": {
            "median": statistics.median(ratios),
            "p20": _pct(ratios, 0.2),
            "p80": _pct(ratios, 0.8),
        },
    }
    print(
        f"{op:<16} {'x'.join(map(str, shape)):>12}  softjac {row['softjac_ms']['median']:8.2f} ms"
        f"  torch {row['torch_ms']['median']:8.2f} ms  torch/softjac {row['speedup']['median']:5.2f}"
        f" (p20 {row['speedup']['p20']:.2f}, p80 {row['speedup']['p80']:.2f})",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.15 s")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.min_time = 3, 0.15
    choice = info()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}; "
        f"auto: vjp → {choice['softmax_vjp_logits']['cpu float32']['backend']}, softmax → "
        f"{choice['softmax']['cpu float32']['backend']}, backward → "
        f"{choice['softmax_vjp']['cpu float32']['backend']}"
    )
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in VJP_SHAPES:
        z = torch.randn(shape, generator=gen) * 4
        v = torch.randn(shape, generator=gen)
        want = _reference(z, v)
        _check(f"vjp {shape}", _softjac_vjp(z, v), want)
        zr = z.clone().requires_grad_()
        _check(f"torch vjp {shape}", _torch_vjp(zr, v), want, rel=1e-3)  # the baseline
        rows.append(
            run_case(
                "vjp", shape, _softjac_vjp, _torch_vjp, (z, v), (zr, v), args.rounds, args.min_time
            )
        )
    for shape in SOFTMAX_SHAPES:
        z = torch.randn(shape, generator=gen) * 4
        g = torch.randn(shape, generator=gen)
        want = _reference(z, g)
        zr = z.clone().requires_grad_()
        _check(f"softmax backward {shape}", _softjac_softmax(zr, g), want)
        p = softjac.softmax(z)
        _check(f"softmax {shape}", p, torch.softmax(z.double(), -1))
        rows.append(
            run_case(
                "softmax_fwd_bwd",
                shape,
                _softjac_softmax,
                _torch_softmax,
                (zr, g),
                (zr, g),
                args.rounds,
                args.min_time,
            )
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
