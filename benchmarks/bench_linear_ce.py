"""Fused linear + cross-entropy: ``softjac.linear_cross_entropy`` against the materialised
eager loss ``F.cross_entropy(F.linear(x, W), t)`` and PyTorch's chunked
``F.linear_cross_entropy(..., options=nn.LinearCrossEntropyOptions())``.

    python benchmarks/bench_linear_ce.py [--quick] [--reps R] [--json PATH]
    python benchmarks/bench_linear_ce.py --accuracy [--json PATH]

Checks correctness first (float64 loss and gradients of every implementation against the
eager loss), then, for each shape and implementation, runs forward+backward in a fresh
subprocess (so that the peak resident set size belongs to that implementation alone):

* peak extra memory: after one warm-up pass, the peak resident set size (``VmHWM``, reset
  through ``/proc/self/clear_refs``) of one forward+backward minus the resident size just
  before it (inputs allocated, ``.grad`` None; the gradients count, they are the floor
  ``(N·D + V·D) · 4`` bytes in float32), with glibc returning large blocks at free;
* time: median, p20 and p80 seconds of ``R`` further forward+backward passes (grads reset to
  None before each).

Rows (one JSON schema): ``op, shape, dtype, impl, median_s, p20_s, p80_s, peak_extra_bytes``
plus the ratios to eager and to torch's chunked path and the machine's load average.

``--accuracy``: bfloat16 inputs at N = 128, D = 128, V ∈ {32768, 128256, 256000}; max and
p99 relative error (``|g − ref| / max(|ref|, 1e-3 · max|ref|)``) of dInput and dWeight against
float64, for softjac and for the materialised loss in float32 (raw, and rounded to bfloat16:
the best a bfloat16 result can be) and in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

IMPLS = ("eager", "torch_chunked", "softjac")
SHAPES = ((2048, 512, 32768), (4096, 1024, 32768))
QUICK_SHAPES = ((512, 128, 4096),)


def _loss_fn(impl: str):
    if impl == "eager":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if impl == "torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=opts)
    if impl == "softjac":
        import softjac

        return lambda x, w, t: softjac.linear_cross_entropy(x, w, t)
    raise ValueError(impl)


def check_correctness() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, v = 300, 24, 1000
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.3
    t = torch.randint(0, v, (n,), generator=gen)
    grads = {}
    for impl in IMPLS:
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = _loss_fn(impl)(xx, ww, t)
        loss.backward()
        grads[impl] = (loss.detach(), xx.grad, ww.grad)
    for impl in IMPLS[1:]:
        for a, b in zip(grads[impl], grads["eager"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    print("correctness: OK (float64 loss, dInput, dWeight of every impl vs eager)")


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(impl: str, n: int, d: int, v: int, reps: int) -> dict:
    """Runs in its own process: peak extra memory of the first pass, then the timings."""
    torch.manual_seed(0)
    x = torch.randn(n, d).requires_grad_()
    w = (torch.randn(v, d) * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,))
    fn = _loss_fn(impl)
    # a warm-up pass (imports, kernel compilation, BLAS and thread-pool buffers); then the
    # peak is reset and measured over one more pass. The parent sets MALLOC_MMAP_THRESHOLD_ so
    # that large blocks go back to the system when freed (no allocator cache hides a peak).
    fn(x, w, t).backward()
    x.grad = None
    w.grad = None
    before = _status_bytes("VmRSS")
    if not _reset_peak():  # fall back to the lifetime peak (includes the warm-up: same shape)
        before = 0
    fn(x, w, t).backward()
    extra = max(0, _status_bytes("VmHWM") - before)
    print(json.dumps({"peak_extra_bytes": extra}), flush=True)  # early, for slow impls
    times = []
    for _ in range(reps):
        x.grad = None
        w.grad = None
        t0 = time.perf_counter()
        fn(x, w, t).backward()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {
        "median_s": statistics.median(times),
        "p20_s": q[0],
        "p80_s": q[3],
        "peak_extra_bytes": extra,
    }


def run_shape(n: int, d: int, v: int, reps: int, timeout: float) -> list[dict]:
    rows = []
    for impl in IMPLS:
        cmd = [sys.executable, __file__, "--worker", impl, str(n), str(d), str(v), str(reps)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        try:
            out = subprocess.run(
                cmd, check=True, capture_output=True, text=True, env=env, timeout=timeout
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:  # recorded as such, not dropped
            nan = float("nan")
            res = {"median_s": nan, "p20_s": nan, "p80_s": nan, "peak_extra_bytes": -1}
            res["timed_out_after_s"] = timeout
        rows.append(
            {
                "op": "linear_cross_entropy fwd+bwd",
                "shape": [n, d, v],
                "dtype": "float32",
                "impl": impl,
                **res,
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    by = {r["impl"]: r for r in rows}
    for r in rows:
        for base in ("eager", "torch_chunked"):
            r[f"time_vs_{base}"] = r["median_s"] / by[base]["median_s"]
            mem = by[base]["peak_extra_bytes"]
            r[f"mem_vs_{base}"] = r["peak_extra_bytes"] / mem if mem > 0 else float("nan")
    return rows


def _rel_err(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    import numpy as np

    rel = (g.double() - ref).abs() / ref.abs().clamp_min(ref.abs().max() * 1e-3)
    return rel.max().item(), float(np.percentile(rel.flatten().numpy(), 99))


def accuracy_rows() -> list[dict]:
    import softjac

    rows = []
    n, d = 128, 128
    for v in (32768, 128256, 256000):
        gen = torch.Generator().manual_seed(v)
        x = torch.randn(n, d, generator=gen).bfloat16()
        w = (torch.randn(v, d, generator=gen) * d**-0.5).bfloat16()
        t = torch.randint(0, v, (n,), generator=gen)

        def grads(fn, dtype, x=x, w=w):
            xx = x.to(dtype, copy=True).requires_grad_()
            ww = w.to(dtype, copy=True).requires_grad_()
            fn(xx, ww).backward()
            return xx.grad, ww.grad

        eager = lambda a, b, t=t: F.cross_entropy(F.linear(a, b), t)  # noqa: E731
        ref = grads(eager, torch.float64)
        cases = {
            "softjac (bf16 in, fp32 inside)": grads(
                lambda a, b, t=t: softjac.linear_cross_entropy(a, b, t), torch.bfloat16
            ),
            "eager float32": grads(eager, torch.float32),
            "eager bfloat16": grads(eager, torch.bfloat16),
        }
        cases["eager float32 rounded to bf16"] = tuple(g.bfloat16() for g in cases["eager float32"])
        for impl, (gx, gw) in cases.items():
            ex, ew = _rel_err(gx, ref[0]), _rel_err(gw, ref[1])
            rows.append(
                {
                    "op": "linear_cross_entropy grad accuracy",
                    "shape": [n, d, v],
                    "dtype": "bfloat16",
                    "impl": impl,
                    "dx_max_rel": ex[0],
                    "dx_p99_rel": ex[1],
                    "dw_max_rel": ew[0],
                    "dw_p99_rel": ew[1],
                }
            )
            print(
                f"{(n, d, v)!s:>18} {impl:>32} dX max {ex[0]:.2e} p99 {ex[1]:.2e}   "
                f"dW max {ew[0]:.2e} p99 {ew[1]:.2e}"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    ap.add_argument("--reps", type=int, default=5, help="timed passes per implementation")
    ap.add_argument("--json", metavar="PATH", help="write the rows and the environment here")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per implementation")
    ap.add_argument("--accuracy", action="store_true", help="the bf16 gradient-accuracy rows")
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "N", "D", "V", "REPS"), help="internal")
    args = ap.parse_args(argv)
    if args.worker:
        impl, n, d, v, reps = args.worker
        print(json.dumps(worker(impl, int(n), int(d), int(v), int(reps))))
        return 0
    check_correctness()
    if args.accuracy:
        rows = accuracy_rows()
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"rows": rows}, fh, indent=1)
        return 0
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = []
    hdr = f"{'shape (N, D, V)':>20} {'impl':>14} {'median s':>9} {'p20':>7} {'p80':>7} "
    hdr += (
        f"{'peak MiB':>9} {'t/eager':>8} {'t/chunk':>8} {'m/eager':>8} {'m/chunk':>8} {'load':>5}"
    )
    print(hdr)
    for n, d, v in shapes:
        for r in run_shape(n, d, v, args.reps, args.timeout):
            rows.append(r)
            print(
                f"{(n, d, v)!s:>20} {r['impl']:>14} {r['median_s']:9.3f} {r['p20_s']:7.3f} "
                f"{r['p80_s']:7.3f} {r['peak_extra_bytes'] / 2**20:9.1f} "
                f"{r['time_vs_eager']:8.2f} {r['time_vs_torch_chunked']:8.2f} "
                f"{r['mem_vs_eager']:8.3f} {r['mem_vs_torch_chunked']:8.3f} "
                f"{r['load_avg_1m']:5.1f}"
            )
        floor = (n * d + v * d) * 4
        print(f"{'':>20} gradient floor (dX + dW, float32): {floor / 2**20:.1f} MiB")
    if args.json:
        env = {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
