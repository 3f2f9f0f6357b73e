"""The one JSON schema of every benchmark script's output.

A file is ``{"environment": {...}, "rows": [row, ...]}`` (scripts may add top-level keys of
their own, e.g. ``copy_gbps``); each row is

    {"op": str, "shape": [int, ...] or str, "dtype": str, "impl": str,
     "median": seconds, "p20": seconds, "p80": seconds, "ratio": float or null}

with ``median``/``p20``/``p80`` the 50th/20th/80th percentiles of the per-call times of that
implementation and ``ratio`` the baseline's median over this row's (above 1: faster than the
baseline; the baseline's own row has 1.0; null where there is no baseline).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Sequence

import torch

FIELDS = ("op", "shape", "dtype", "impl", "median", "p20", "p80", "ratio")


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (linear interpolation between order statistics)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def row(
    op: str,
    shape: Sequence[int] | str,
    dtype: str | torch.dtype,
    impl: str,
    samples: Sequence[float],
    baseline: Sequence[float] | None = None,
) -> dict:
    """One row from per-call times in seconds (and the baseline's, for ``ratio``)."""
    med = quantile(samples, 0.5)
    ratio = None if baseline is None else quantile(baseline, 0.5) / med
    return {
        "op": op,
        "shape": shape if isinstance(shape, str) else [int(x) for x in shape],
        "dtype": str(dtype).removeprefix("torch."),
        "impl": impl,
        "median": med,
        "p20": quantile(samples, 0.2),
        "p80": quantile(samples, 0.8),
        "ratio": ratio,
    }


def environment() -> dict:
    """Date, versions, threads, CPU (and GPU) model, and the loaded C kernel variant."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next(ln.split(":", 1)[1].strip() for ln in fh if "model name" in ln)
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    try:
        from softjac.kernels import _cpu

        env["cpu_kernels"] = _cpu.capability() or _cpu.unavailable_reason()
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write(path: str, rows: list[dict], **extra: object) -> None:
    """Write ``rows`` (checked against the schema) with the environment to ``path``."""
    for r in rows:
        if tuple(r) != FIELDS:
            raise ValueError(f"benchmark row with fields {tuple(r)}, expected {FIELDS}")
    with open(path, "w") as fh:
        json.dump({"environment": environment(), **extra, "rows": rows}, fh, indent=1)
