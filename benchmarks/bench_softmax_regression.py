"""Benchmark ``softjac.linear_model.SoftmaxRegression`` against scikit-learn's solvers.

Every case fits the same objective (scikit-learn's multinomial ``LogisticRegression``, L2,
C = 1) to the same tolerance with each scikit-learn solver (``lbfgs``, ``newton-cg``, and
``newton-cholesky`` where it is affordable) and with softjac (``auto`` and each regime).
Correctness first: every softjac row's max |∇f|, recomputed in NumPy, must be at most
``tol`` (what the solver promises), and a tight reference optimum (softjac's exact Newton at
tol 1e-10; the test suite checks it against scikit-learn's) gives each row's
``max |coef − ref|`` and ``f − f*``, which no row may beat by more than rounding; otherwise
the run stops. Timings are median,
20th and 80th percentiles of ``--rounds`` fits (one for rows over ``--slow`` seconds).

Cases: n=100, d=1000, K=10 (tol 1e-5); n=20000, d=50, K=10; the digits data (1797 × 64,
K=10, raw pixels); and a table n = 1e3 … 1e6, d = 10 … 1000, K=10 (rows whose X would
exceed ``--max-elements`` entries are skipped and listed).

Usage::

    python benchmarks/bench_softmax_regression.py [--quick] [--json PATH] [--rounds R]
        [--newton-cholesky-timeout S] [--newton-cholesky-max-params P] [--threads T]
        [--cases NAME ...] [--solvers auto primal ...] [--no-time-to-target]
        [--interleaved R]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import platform
import sys
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import threadpoolctl
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from softjac.linear_model import SoftmaxRegression

SK_SOLVERS = ("lbfgs", "newton-cg", "newton-cholesky")
SJ_SOLVERS = ("auto", "primal", "dual", "newton-cg")


def _data(n: int, d: int, k: int, seed: int = 0):
    X, y = make_classification(
        n_samples=n,
        n_features=d,
        n_informative=min(d, 20),
        n_redundant=0,
        n_classes=k,
        n_clusters_per_class=1,
        random_state=seed,
    )
    return X, y


def _objective(X, y, coef, intercept, C) -> float:
    Z = X @ coef.T + intercept
    if Z.shape[1] == 1:
        Z = np.concatenate([np.zeros_like(Z), Z], axis=1)
    Z = Z - Z.max(1, keepdims=True)
    lse = np.log(np.exp(Z).sum(1))
    loss = np.mean(lse - Z[np.arange(len(y)), y])
    return float(loss + np.sum(coef**2) / (2 * C * len(y)))


def _grad_max(X, y, coef, intercept, C) -> float:
    """max |∇f| of the objective at (coef, intercept), multinomial K ≥ 3, unit weights."""
    n = len(y)
    Z = X @ coef.T + intercept
    Z = Z - Z.max(1, keepdims=True)
    P = np.exp(Z)
    P /= P.sum(1, keepdims=True)
    P[np.arange(n), y] -= 1.0
    gw = P.T @ X / n + coef / (C * n)
    gb = P.sum(0) / n
    return float(max(np.abs(gw).max(), np.abs(gb).max()))


def _fit_sklearn(solver, X, y, tol, C, max_iter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = LogisticRegression(C=C, tol=tol, solver=solver, max_iter=max_iter).fit(X, y)
    return m.coef_, m.intercept_, int(np.max(m.n_iter_))


def _fit_softjac(solver, X, y, tol, C, max_iter, verbose=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = SoftmaxRegression(C=C, tol=tol, solver=solver, max_iter=max_iter, verbose=verbose)
        m.fit(X, y)
    return m.coef_, m.intercept_, m.n_iter_, m.solver_


def _steps_to_target(X, y, tol, C, f_ref, target):
    """``(j, tol')``: the fewest Newton steps j after which softjac's ``auto`` fit at
    tolerance tol' has f − f* ≤ target, trying tol' = tol, tol / 10, tol / 100, tol / 1000
    (its fit at tol may stop short of the target); None when none gets there."""
    for t in (tol, tol / 10, tol / 100, tol / 1000):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _fit_softjac("auto", X, y, t, C, 200, verbose=1)
        for line in buf.getvalue().splitlines():
            if line.strip().startswith("Newton iteration"):
                j = int(line.split()[2].rstrip(":"))
                f = float(line.split("f = ")[1].split(",")[0])
                if f - f_ref <= target * 1.5:
                    # the printed f is the solver's; the NumPy objective decides
                    coef, icpt, _, _ = _fit_softjac("auto", X, y, t, C, j)
                    if _objective(X, y, coef, icpt, C) - f_ref <= target:
                        return j, t
    return None, None


_CPU: list[float] = []  # process CPU seconds of the fits of the last _time call


def _time(fn, rounds, slow):
    """Wall-clock seconds of ``rounds`` calls (and their CPU seconds in ``_CPU``)."""
    times, out = [], None
    _CPU.clear()
    for _ in range(rounds):
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        _CPU.append(time.process_time() - c0)
        if times[-1] > slow:
            break
    return np.array(times), out


def _nc_worker(q, X, y, tol, C, max_iter, threads):
    torch.set_num_threads(threads)
    threadpoolctl.threadpool_limits(threads)
    t0 = time.perf_counter()
    coef, icpt, n_iter = _fit_sklearn("newton-cholesky", X, y, tol, C, max_iter)
    q.put((time.perf_counter() - t0, coef, icpt, n_iter))


def _newton_cholesky_once(X, y, tol, C, max_iter, timeout, threads):
    """One newton-cholesky fit in a child process, killed after ``timeout`` seconds."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_nc_worker, args=(q, X, y, tol, C, max_iter, threads))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return None
    return q.get() if not q.empty() else None


def _reference(X, y, C):
    """Tight optimum: exact Newton (primal when the Hessian is small, else dual/CG)."""
    coef, icpt, _, _ = _fit_softjac("auto", X, y, 1e-10, C, 200)
    return coef, icpt


def run_case(
    name,
    X,
    y,
    *,
    tol,
    C,
    rounds,
    slow,
    nc_timeout,
    nc_max_params,
    threads,
    sk_solvers,
    sj_solvers,
    time_to_target=True,
):
    n, d = X.shape
    k = len(np.unique(y))
    ref_coef, ref_icpt = _reference(X, y, C)
    f_ref = _objective(X, y, ref_coef, ref_icpt, C)
    rows = []

    def row(lib, solver, times, coef, icpt, n_iter, note="", cpu=None):
        f = _objective(X, y, coef, icpt, C)
        cpu = list(_CPU) if cpu is None else cpu
        r = {
            "case": name,
            "n": n,
            "d": d,
            "K": k,
            "tol": tol,
            "library": lib,
            "solver": solver,
            "median_s": float(np.median(times)),
            "p20_s": float(np.percentile(times, 20)),
            "p80_s": float(np.percentile(times, 80)),
            "rounds": len(times),
            "cpu_median_s": float(np.median(cpu)) if cpu else None,
            "objective": f,
            "objective_excess": f - f_ref,
            "max_abs_coef_diff": float(np.abs(coef - ref_coef).max()),
            "n_iter": int(n_iter),
            "note": note,
        }
        rows.append(r)
        print(
            f"{name:>16} {lib:>8} {solver:>16} {r['median_s']:9.4f}s "
            f"(cpu {r['cpu_median_s'] or float('nan'):.4f}s) "
            f"[{r['p20_s']:.4f}, {r['p80_s']:.4f}] x{len(times)}  f-f*={f - f_ref:+.1e} "
            f"|Δcoef|={r['max_abs_coef_diff']:.1e} it={n_iter} {note}",
            flush=True,
        )
        return r

    for s in sj_solvers:
        if s == "dual" and n * (k - 1) > 6000:
            continue
        if s == "primal" and 2.0 * n * ((d + 1) * k) ** 2 > 2e10:
            continue  # over 20 GFLOP per step: minutes on a small machine
        times, (coef, icpt, it, used) = _time(
            lambda s=s: _fit_softjac(s, X, y, tol, C, 200), rounds, slow
        )
        r = row("softjac", s if s != "auto" else f"auto ({used})", times, coef, icpt, it)
        # What the solver promises: max |∇f| ≤ tol, recomputed here in NumPy.
        gmax = _grad_max(X, y, coef, icpt, C)
        r["grad_max"] = gmax
        if not gmax <= tol * (1 + 1e-6) or r["objective_excess"] < -1e-10 * abs(f_ref):
            raise SystemExit(f"correctness check failed: {r}")
    for s in sk_solvers:
        if s == "newton-cholesky":
            if nc_timeout <= 0 or ((d + 1) * k > nc_max_params and nc_max_params > 0):
                print(f"{name:>16}  sklearn  newton-cholesky  skipped (--newton-cholesky-*)")
                continue
            res = _newton_cholesky_once(X, y, tol, C, 1000, nc_timeout, threads)
            if res is None:
                rows.append(
                    {
                        "case": name,
                        "n": n,
                        "d": d,
                        "K": k,
                        "tol": tol,
                        "library": "sklearn",
                        "solver": s,
                        "median_s": None,
                        "note": f"did not finish within {nc_timeout} s (killed)",
                    }
                )
                print(f"{name:>16}  sklearn  newton-cholesky  > {nc_timeout} s (killed)")
                continue
            t, coef, icpt, it = res
            r = row("sklearn", s, np.array([t]), coef, icpt, it, "one run", cpu=[])
        else:
            times, (coef, icpt, it) = _time(
                lambda s=s: _fit_sklearn(s, X, y, tol, C, 10000), rounds, slow
            )
            r = row("sklearn", s, times, coef, icpt, it)
        if r["objective_excess"] < -1e-10 * abs(f_ref):
            raise SystemExit(f"the reference optimum is not optimal: {r}")
    # time to equal objective: scikit-learn's fastest solver's f − f* as the target
    sk_rows = [r for r in rows if r["library"] == "sklearn" and r.get("median_s") is not None]
    auto = [r for r in rows if r["library"] == "softjac" and r["solver"].startswith("auto")]
    if sk_rows and auto and time_to_target:
        fastest = min(sk_rows, key=lambda r: r["median_s"])
        target = max(fastest["objective_excess"], 0.0)
        j, t = _steps_to_target(X, y, tol, C, f_ref, target)
        a = auto[0]
        a["target"] = target
        a["target_solver"] = fastest["solver"]
        a["steps_to_target"] = j
        a["tol_to_target"] = t
        if j is None:
            a["time_to_target_s"] = None
        elif t == tol and j >= a["n_iter"]:
            a["time_to_target_s"] = a["median_s"]
            a["cpu_to_target_s"] = a["cpu_median_s"]
        else:
            times, _ = _time(lambda: _fit_softjac("auto", X, y, t, C, j), rounds, slow)
            a["time_to_target_s"] = float(np.median(times))
            a["cpu_to_target_s"] = float(np.median(_CPU))
        print(
            f"{name:>16} softjac auto reaches f-f* <= {target:.1e} ({fastest['solver']}'s, "
            f"{fastest['median_s']:.4f} s) after {j} steps at tol {t} in "
            f"{a['time_to_target_s']} s",
            flush=True,
        )
    return rows


def interleaved(name, X, y, *, tol, C, rounds):
    """Rounds that alternate softjac ``auto``, scikit-learn ``lbfgs`` and ``newton-cg`` on one
    case, so that all three see the same background load; the per-round ratios
    (scikit-learn's time over softjac's) are the robust comparison on a shared machine."""
    fits = {
        "softjac auto": lambda: _fit_softjac("auto", X, y, tol, C, 200),
        "sklearn lbfgs": lambda: _fit_sklearn("lbfgs", X, y, tol, C, 10000),
        "sklearn newton-cg": lambda: _fit_sklearn("newton-cg", X, y, tol, C, 10000),
    }
    for fn in fits.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fits}
    cpu: dict[str, list[float]] = {k: [] for k in fits}
    for _ in range(rounds):
        for key, fn in fits.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    sj = np.array(wall["softjac auto"])
    out = {"case": name, "rounds": rounds, "tol": tol}
    for key in fits:
        out[f"{key} median_s"] = float(np.median(wall[key]))
        out[f"{key} cpu_median_s"] = float(np.median(cpu[key]))
    for key in ("sklearn lbfgs", "sklearn newton-cg"):
        ratio = np.array(wall[key]) / sj
        out[f"{key} / softjac median ratio"] = float(np.median(ratio))
        out[f"{key} / softjac p20 ratio"] = float(np.percentile(ratio, 20))
        out[f"{key} / softjac p80 ratio"] = float(np.percentile(ratio, 80))
    fastest = np.minimum(np.array(wall["sklearn lbfgs"]), np.array(wall["sklearn newton-cg"]))
    out["fastest sklearn / softjac median ratio"] = float(np.median(fastest / sj))
    out["fastest sklearn / softjac p20 ratio"] = float(np.percentile(fastest / sj, 20))
    print(
        f"{name:>16} interleaved x{rounds}: softjac {np.median(sj):.4f} s, lbfgs "
        f"{out['sklearn lbfgs median_s']:.4f} s, newton-cg "
        f"{out['sklearn newton-cg median_s']:.4f} s; faster sklearn / softjac per round: "
        f"median {out['fastest sklearn / softjac median ratio']:.2f}, "
        f"p20 {out['fastest sklearn / softjac p20 ratio']:.2f}",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the three named cases only")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slow", type=float, default=20.0, help="one round for rows slower than this")
    ap.add_argument("--newton-cholesky-timeout", type=float, default=900.0)
    ap.add_argument(
        "--newton-cholesky-max-params",
        type=int,
        default=0,
        help="skip newton-cholesky where (d+1)·K exceeds this (0: never skip)",
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--max-elements", type=float, default=5e7, help="largest n·d in the table")
    ap.add_argument("--cases", nargs="*", help="only these case names")
    ap.add_argument(
        "--solvers", nargs="*", default=list(SJ_SOLVERS), help="softjac regimes to time"
    )
    ap.add_argument(
        "--no-time-to-target", action="store_true", help="skip the time-to-equal-objective"
    )
    ap.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="R",
        help="only R interleaved rounds of softjac auto / lbfgs / newton-cg per case",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpoolctl.threadpool_limits(args.threads)
    common = dict(
        rounds=args.rounds,
        slow=args.slow,
        nc_timeout=args.newton_cholesky_timeout,
        nc_max_params=args.newton_cholesky_max_params,
        threads=args.threads,
        sj_solvers=args.solvers,
        time_to_target=not args.no_time_to_target,
    )
    cases = [
        ("n100_d1000", *_data(100, 1000, 10), 1e-5, SK_SOLVERS),
        ("n20000_d50", *_data(20000, 50, 10), 1e-4, SK_SOLVERS),
        ("digits", *load_digits(return_X_y=True), 1e-4, SK_SOLVERS),
    ]
    skipped = []
    if not args.quick:
        for n in (10**3, 10**4, 10**5, 10**6):
            for d in (10, 100, 1000):
                name = f"table_n{n:.0e}_d{d}".replace("+0", "")
                if n * d > args.max_elements:
                    skipped.append(name)
                    continue
                cases.append((name, *_data(n, d, 10, seed=1), 1e-4, ("lbfgs", "newton-cg")))
    rows = []
    for name, X, y, tol, sk in cases:
        if args.cases and name not in args.cases:
            continue
        if args.interleaved:
            rows.append(interleaved(name, X, y, tol=tol, C=1.0, rounds=args.interleaved))
            _write(args.json, rows, args.threads, skipped)
            continue
        rows += run_case(name, X, y, tol=tol, C=1.0, sk_solvers=sk, **common)
        _write(args.json, rows, args.threads, skipped)
    if skipped:
        print("skipped (n·d over --max-elements):", ", ".join(skipped))
    _write(args.json, rows, args.threads, skipped)
    return 0


def _write(path, rows, threads, skipped):
    if path:
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": threads,
            "skipped": skipped,
        }
        with open(path, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
