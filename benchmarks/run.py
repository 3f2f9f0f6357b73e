"""softjac benchmark suite: one entry point, correctness first, then timings.

    python benchmarks/run.py --quick                 # CPU, under a minute
    python benchmarks/run.py --device cpu            # CPU, with torch.compile baselines
    python benchmarks/run.py --device cuda --json gpu.json

For every op and shape it first checks softjac's result against the float64 reference
(``softjac._core`` on the float64-cast inputs, or ``F.cross_entropy`` autograd) and stops with
exit code 1 if it is wrong; then it times softjac, PyTorch eager and (where it compiles)
``torch.compile`` of the textbook formula, and prints time, GB/s (bytes each op must move at
least: reads + writes), the fraction of the copy bandwidth measured in the same run
(``dst.copy_(src)``, bytes read + written) and the ratios. CPU times are medians from
``torch.utils.benchmark.Timer``; GPU times medians from ``triton.testing.do_bench``.

Ops:
* ``vjp_probs``  — J v from σ (softmax backward). Eager: ``torch._softmax_backward_data``
  (what ``F.softmax``'s backward runs). Compiled: ``σ ⊙ (v − ⟨v, σ⟩)``.
* ``vjp_logits`` — J v from logits and the saved log-sum-exp. Eager: softmax then the native
  backward. Compiled: ``exp(z − lse)`` then the formula.
* ``vjp_dim1``   — the same from σ of shape (B, K, M) with the classes in dim 1 (softmax over
  channels); softjac gets the ``movedim(1, -1)`` views, as ``softjac.vjp_from_probs(...,
  dim=1)`` passes them. Eager: ``torch._softmax_backward_data(..., dim=1)``.
* ``jacobian``   — dense (N, K, K). Eager: the tutorial's ``diag_embed(σ) − σσᵀ``.
* ``ce_fwd_bwd`` — cross-entropy loss rows and their gradient. Eager: ``F.cross_entropy``
  forward + backward (reduction ``sum``).
* ``api``        — the public API end to end (CPU float32): ``api_vjp`` (``softjac.vjp(z, v)``
  vs ``torch.softmax`` + native backward), ``api_softmax`` (``softjac.softmax`` forward +
  backward vs ``torch.softmax``'s) and ``api_ce_dim1`` (``softjac.cross_entropy(..., dim=1)``
  forward + backward on (16, 21, 128, 128) vs ``F.cross_entropy``'s).

Rows follow ``benchmarks/_schema.py`` (``--json``): median, p20 and p80 seconds per call and
the ratio eager / impl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import _schema
import softjac
from softjac import _core
from softjac.kernels import dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Normwise tolerance of the correctness check: ‖out − ref‖∞ ≤ tol · ‖ref‖∞.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}

VJP_SHAPES = [(65536, 128), (16384, 1024), (4096, 8192), (512, 32768), (128, 131072), (64, 262144)]
VJP_SHAPES_GPU = [
    (262144, 128), (65536, 1024), (8192, 8192), (2048, 32768), (512, 131072), (256, 262144),
]  # fmt: skip
DIM1_SHAPES = [(64, 1000, 256), (32, 32768, 16)]
DIM1_SHAPES_GPU = [(256, 1000, 256), (128, 32768, 16)]
LOGITS_SHAPES = [(16384, 1024), (4096, 8192), (128, 131072)]
LOGITS_SHAPES_GPU = [(65536, 1024), (8192, 8192), (512, 131072)]
JAC_SHAPES = [(256, 256), (32, 1024)]
JAC_SHAPES_GPU = [(1024, 1024), (64, 4096)]
CE_SHAPES = [(512, 32768), (128, 131072), (64, 262144)]
CE_SHAPES_GPU = [(4096, 32768), (1024, 131072), (512, 262144)]


class Bench:
    def __init__(self, device: str, quick: bool, compile_: bool, backend: str):
        self.device = device
        self.quick = quick
        self.compile = compile_
        self.backend = backend
        self.rows: list[dict] = []  # _schema rows
        self.copy_gbps = float("nan")

    # -- timing ----------------------------------------------------------------------------
    def time_many(self, fns: list[Callable[[], object]]) -> list[list[float]]:
        """Milliseconds per call of each function, one sample per round. On CPU the functions
        are timed in interleaved rounds (``torch.utils.benchmark.Timer``, each round ≥ 20 ms of
        calls), so a burst of load from other processes hits all of them alike; on GPU, one
        ``do_bench`` median each."""
        if self.device == "cuda":
            import triton.testing

            return [[float(triton.testing.do_bench(fn, return_mode="median"))] for fn in fns]
        from torch.utils.benchmark import Timer

        timers, numbers = [], []
        for fn in fns:
            fn()  # warm-up: first-use compilation, page faults of the inputs
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
            # Timer defaults to one thread; time with the threads the process uses
            timers.append(Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()))
            numbers.append(max(1, int(0.02 / max(once, 1e-7))))
        # quick runs take 6 rounds, except for calls under a millisecond, whose 20 ms rounds
        # are cheap and too few to outvote a burst of load from other processes
        rounds = 6 if self.quick and max(numbers) < 20 else 15
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(rounds):
            for i, (timer, number) in enumerate(zip(timers, numbers, strict=True)):
                samples[i].append(timer.timeit(number).median * 1e3)
        return samples

    def time_ms(self, fn: Callable[[], object]) -> float:
        return _median(self.time_many([fn])[0])

    def measure_copy(self) -> None:
        n = (64 if self.device == "cpu" else 512) * 2**20 // 4
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        self.copy_gbps = 2 * src.numel() * 4 / ms / 1e6
        print(f"copy bandwidth (dst.copy_(src), read + write): {self.copy_gbps:.1f} GB/s\n")

    def compiled(self, fn: Callable) -> Callable | None:
        if not self.compile:
            return None
        try:
            import torch._dynamo

            # one compiled graph per shape: allow more than the default 8 recompilations
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            return torch.compile(fn, dynamic=False)
        except Exception as exc:
            print(f"  (torch.compile unavailable: {exc})")
            return None

    # -- one op at one shape ---------------------------------------------------------------
    def run(
        self,
        op: str,
        shape: tuple,
        dtype: torch.dtype,
        nbytes: int,
        ours: Callable[[], object],
        eager: Callable[[], object] | None,
        compiled: Callable[[], object] | None,
    ) -> None:
        name = str(dtype).removeprefix("torch.")
        fns = [ours] + ([eager] if eager is not None else [])
        if compiled is not None:
            try:
                t0 = time.perf_counter()
                compiled()
                print(f"  (torch.compile of {op} {shape}: {time.perf_counter() - t0:.1f} s)")
                fns.append(compiled)
            except Exception as exc:
                print(f"  (torch.compile failed for {op} {shape}: {type(exc).__name__})")
                compiled = None
        samples = [[ms / 1e3 for ms in xs] for xs in self.time_many(fns)]  # seconds
        base = samples[1] if eager is not None else None
        rows = [_schema.row(op, shape, name, "softjac", samples[0], base)]
        if eager is not None:
            rows.append(_schema.row(op, shape, name, "eager", samples[1], base))
        if compiled is not None:
            rows.append(_schema.row(op, shape, name, "compile", samples[-1], base))
        for r in rows:
            self.rows.append(r)
            note = f"backend={self._resolved(op, dtype)}" if r["impl"] == "softjac" else ""
            self.print_row(r, nbytes, note)

    def _resolved(self, op: str, dtype: torch.dtype) -> str:
        key = {
            "vjp_probs": "softmax_vjp",
            "vjp_dim1": "softmax_vjp",
            "vjp_logits": "softmax_vjp_from_logits",
            "jacobian": "softmax_jacobian_dense",
            "ce_fwd_bwd": "cross_entropy_forward",
        }.get(op)
        if key is None:
            return "public API"
        x = torch.empty(1, 1, dtype=dtype, device=self.device)
        return dispatch.resolve_backend("benchmark", self.backend, x, key)

    @staticmethod
    def header() -> None:
        print(
            f"{'op':<14} {'shape':>16} {'dtype':<9} {'impl':<8} {'median ms':>10} "
            f"{'p20-p80 ms':>17} {'GB/s':>8} {'vs eager':>9}  note"
        )

    def print_row(self, r: dict, nbytes: int, note: str = "") -> None:
        shape = "x".join(map(str, r["shape"]))
        gbps = nbytes / r["median"] / 1e9
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        spread = f"{r['p20'] * 1e3:.3f}-{r['p80'] * 1e3:.3f}"
        print(
            f"{r['op']:<14} {shape:>16} {r['dtype']:<9} {r['impl']:<8} {r['median'] * 1e3:10.3f} "
            f"{spread:>17} {gbps:8.1f} {ratio:>9}  {note}"
        )


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    if not err <= TOL[dtype] * scale + 1e-30:
        print(f"FAILED correctness: {name}: max error {err:.3e} vs scale {scale:.3e}")
        sys.exit(1)


def _gen(shape, dtype, device, spread=3.0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (spread * torch.randn(shape, generator=g)).to(device)
    v = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return z, v


def bench_vjp(b: Bench, shapes, dtype):
    formula = b.compiled(lambda p, v: p * (v - (p * v).sum(-1, keepdim=True)))
    for n, k in shapes:
        z, v = _gen((n, k), dtype, b.device)
        p = torch.softmax(z, -1).to(dtype)
        rows = slice(0, min(n, 64))
        out = dispatch.softmax_vjp(p, v, backend=b.backend)
        check("vjp_probs", out[rows], _core.vjp_last(p[rows].double(), v[rows].double()), dtype)
        del out
        b.run(
            "vjp_probs", (n, k), dtype, 3 * n * k * p.element_size(),
            lambda p=p, v=v: dispatch.softmax_vjp(p, v, backend=b.backend),
            lambda p=p, v=v: torch._softmax_backward_data(v, p, -1, p.dtype),
            None if formula is None else (lambda p=p, v=v: formula(p, v)),
        )  # fmt: skip


def bench_vjp_dim1(b: Bench, shapes, dtype):
    formula = b.compiled(lambda p, v: p * (v - (p * v).sum(1, keepdim=True)))
    for shape in shapes:
        z, v = _gen(shape, dtype, b.device)
        p = torch.softmax(z, 1).to(dtype)
        pl, vl = p.movedim(1, -1), v.movedim(1, -1)
        out = dispatch.softmax_vjp(pl, vl, backend=b.backend)
        check("vjp_dim1", out[:2], _core.vjp_last(pl[:2].double(), vl[:2].double()), dtype)
        del out
        b.run(
            "vjp_dim1", shape, dtype, 3 * p.numel() * p.element_size(),
            lambda pl=pl, vl=vl: dispatch.softmax_vjp(pl, vl, backend=b.backend),
            lambda p=p, v=v: torch._softmax_backward_data(v, p, 1, p.dtype),
            None if formula is None else (lambda p=p, v=v: formula(p, v)),
        )  # fmt: skip


def bench_vjp_logits(b: Bench, shapes, dtype):
    def from_logits(z, lse, v):
        p = torch.exp(z.float() - lse)
        return (p * (v.float() - (p * v.float()).sum(-1, keepdim=True))).to(z.dtype)

    formula = b.compiled(from_logits)
    for n, k in shapes:
        z32, v = _gen((n, k), dtype, b.device)
        z = z32.to(dtype)
        lse = torch.logsumexp(z.float(), -1, keepdim=True)
        rows = slice(0, min(n, 64))
        out = dispatch.softmax_vjp_from_logits(z, lse, v, backend=b.backend)
        ref = _core.vjp_last(torch.softmax(z[rows].double(), -1), v[rows].double())
        check("vjp_logits", out[rows], ref, dtype)
        del out
        b.run(
            "vjp_logits", (n, k), dtype, 3 * n * k * z.element_size() + 4 * n,
            lambda z=z, lse=lse, v=v: dispatch.softmax_vjp_from_logits(
                z, lse, v, backend=b.backend
            ),
            lambda z=z, v=v: torch._softmax_backward_data(
                v, torch.softmax(z, -1), -1, z.dtype
            ),
            None if formula is None else (lambda z=z, lse=lse, v=v: formula(z, lse, v)),
        )  # fmt: skip


def bench_jacobian(b: Bench, shapes, dtype):
    def tutorial(p):
        return torch.diag_embed(p) - p.unsqueeze(2) @ p.unsqueeze(1)

    formula = b.compiled(tutorial)
    for n, k in shapes:
        z, _ = _gen((n, k), dtype, b.device)
        p = torch.softmax(z, -1).to(dtype)
        out = dispatch.softmax_jacobian_dense(p[:4], backend=b.backend)
        check("jacobian", out, _core.jacobian_last(p[:4].double()), dtype)
        b.run(
            "jacobian", (n, k), dtype, (n * k + n * k * k) * p.element_size(),
            lambda p=p: dispatch.softmax_jacobian_dense(p, backend=b.backend),
            lambda p=p: tutorial(p),
            None if formula is None else (lambda p=p: formula(p)),
        )  # fmt: skip


def bench_ce(b: Bench, shapes, dtype):
    def eager_fwd_bwd(z, t):
        zz = z.detach().requires_grad_(True)
        loss = F.cross_entropy(zz, t, reduction="sum")
        loss.backward()
        return zz.grad

    compiled = b.compiled(eager_fwd_bwd)
    for n, k in shapes:
        z32, _ = _gen((n, k), dtype, b.device)
        z = z32.to(dtype)
        g = torch.Generator(device="cpu").manual_seed(1)
        t = torch.randint(0, k, (n,), generator=g).to(b.device)
        ones = torch.ones(n, device=b.device)

        def ours(z=z, t=t, ones=ones):
            _, lse = dispatch.cross_entropy_forward(z, t, None, -100, 0.0, backend=b.backend)
            return dispatch.cross_entropy_backward(
                z, t, lse, ones, None, -100, 0.0, backend=b.backend
            )

        rows = slice(0, min(n, 64))
        zr = z[rows].double().requires_grad_(True)
        F.cross_entropy(zr, t[rows], reduction="sum").backward()
        check("ce_fwd_bwd", ours()[rows], zr.grad, dtype)
        if b.device == "cuda":  # goal: peak extra memory at most one gradient-sized buffer
            grad_bytes = z.numel() * z.element_size()
            extra = {
                "softjac": peak_extra_bytes(ours) / grad_bytes,
                "eager": peak_extra_bytes(lambda z=z, t=t: eager_fwd_bwd(z, t)) / grad_bytes,
            }
            print(f"  (ce_fwd_bwd {n}x{k} peak extra memory, in gradient sizes: "
                  f"softjac {extra['softjac']:.2f}, eager {extra['eager']:.2f})")  # fmt: skip
        b.run(
            "ce_fwd_bwd", (n, k), dtype, 3 * n * k * z.element_size(),
            ours,
            lambda z=z, t=t: eager_fwd_bwd(z, t),
            None if compiled is None else (lambda z=z, t=t: compiled(z, t)),
        )  # fmt: skip


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """CUDA memory allocated at the peak of ``fn()`` beyond what was allocated before it
    (its result included, as a caller would hold it)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def bench_api(b: Bench, quick: bool) -> None:
    """The public API end to end, float32 CPU, beside the kernels: ``softjac.vjp(z, v)``
    against ``torch.softmax`` + the native backward, ``softjac.softmax`` forward + backward
    against ``torch.softmax``'s, and ``softjac.cross_entropy(..., dim=1)`` (mean) forward +
    backward on a segmentation-shaped batch against ``F.cross_entropy``'s."""
    for n, k in [(16384, 1024), (128, 131072), (4096, 128)]:
        z, v = _gen((n, k), torch.float32, b.device)
        ref = _core.vjp_logits_last(z[:64].double(), v[:64].double())
        check("api_vjp", softjac.vjp(z[:64], v[:64]), ref, torch.float32)
        b.run(
            "api_vjp", (n, k), torch.float32, 3 * n * k * 4,
            lambda z=z, v=v: softjac.vjp(z, v),
            lambda z=z, v=v: torch._softmax_backward_data(v, torch.softmax(z, -1), -1, z.dtype),
            None,
        )  # fmt: skip
    for n, k in [(16384, 1024), (64, 262144), (4096, 128), (256, 1000)]:
        z, v = _gen((n, k), torch.float32, b.device)

        def fwd_bwd(fn, z=z, v=v):
            zz = z.detach().requires_grad_(True)
            fn(zz).backward(v)
            return zz.grad

        ref = _core.vjp_last(torch.softmax(z[:64].double(), -1), v[:64].double())
        check("api_softmax", fwd_bwd(softjac.softmax, z[:64], v[:64]), ref, torch.float32)
        b.run(
            "api_softmax", (n, k), torch.float32, 5 * n * k * 4,
            lambda: fwd_bwd(softjac.softmax),
            lambda: fwd_bwd(lambda x: torch.softmax(x, -1)),
            None,
        )  # fmt: skip
    shape = (16, 21, 128, 128)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(shape, generator=g) * 3
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)

    def ce(fn, z=z, t=t):
        zz = z.detach().requires_grad_(True)
        fn(zz, t).backward()
        return zz.grad

    zr = z.double().requires_grad_(True)
    F.cross_entropy(zr, t).backward()
    check(
        "api_ce_dim1", ce(lambda x, y: softjac.cross_entropy(x, y, dim=1)), zr.grad, torch.float32
    )
    b.run(
        "api_ce_dim1", shape, torch.float32, 3 * z.numel() * 4,
        lambda: ce(lambda x, y: softjac.cross_entropy(x, y, dim=1)),
        lambda: ce(F.cross_entropy),
        None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU, under a minute, no compile")
    ap.add_argument("--json", metavar="PATH", help="write all rows and the environment here")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--backend", default="auto", choices=dispatch.BACKENDS)
    ap.add_argument("--ops", default="vjp_probs,vjp_dim1,vjp_logits,jacobian,ce_fwd_bwd,api")
    args = ap.parse_args(argv)
    if args.quick:
        args.device = "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here")
        return 2
    gpu = args.device == "cuda"
    dtypes = [DTYPES[d] for d in (args.dtype or (sorted(DTYPES) if gpu else ["float32"]))]
    b = Bench(args.device, args.quick, not (args.no_compile or args.quick), args.backend)
    env = _schema.environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    if not b.compile:
        print("torch.compile baseline skipped (--quick or --no-compile)")
    b.measure_copy()
    b.header()
    ops = args.ops.split(",")
    for dtype in dtypes:
        if "vjp_probs" in ops:
            bench_vjp(b, VJP_SHAPES_GPU if gpu else VJP_SHAPES, dtype)
        if "vjp_dim1" in ops:
            bench_vjp_dim1(b, DIM1_SHAPES_GPU if gpu else DIM1_SHAPES, dtype)
        if "vjp_logits" in ops:
            shapes = LOGITS_SHAPES_GPU if gpu else LOGITS_SHAPES
            bench_vjp_logits(b, shapes[1:] if args.quick else shapes, dtype)
        if "jacobian" in ops:
            shapes = JAC_SHAPES_GPU if gpu else JAC_SHAPES
            bench_jacobian(b, shapes[:1] if args.quick else shapes, dtype)
        if "ce_fwd_bwd" in ops:
            bench_ce(b, CE_SHAPES_GPU if gpu else CE_SHAPES[:2] if args.quick else CE_SHAPES, dtype)
    if "api" in ops and not gpu:
        bench_api(b, args.quick)
    if args.json:
        _schema.write(args.json, b.rows, copy_gbps=b.copy_gbps)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
