"""Compile a plain-C source file at first use into a per-user cache and load it with ctypes.

Shared by the CPU kernels (``_cpu_kernels.c``, loaded by ``softjac.kernels._cpu``) and the
secular-equation loop (``_secular.c``, loaded by ``softjac._spectral``). The C files have no
Python headers, so they build in seconds with any C compiler (``$CC``, else
``cc``/``gcc``/``clang``) and need no build step at install time. The shared object is cached
in ``$SOFTJAC_CACHE_DIR`` or ``$XDG_CACHE_HOME/softjac`` or ``~/.cache/softjac``, named
``<prefix>_<hash>.so`` by a hash of the source, the compiler, its flags and the machine
(``-march=native``), written to a temporary name and renamed atomically, so concurrent first
uses are safe. A compiler without ``-fopenmp`` (e.g. Apple clang) gets a single-threaded build,
one that does not know ``-march=native`` a generic one. ``SOFTJAC_DISABLE_CPU_KERNEL`` (any
non-empty value) turns every compiled kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["DISABLE_ENV", "FLAGS", "build", "cache_dir", "find_compiler", "load_library"]

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
DISABLE_ENV = "SOFTJAC_DISABLE_CPU_KERNEL"


def cache_dir() -> Path:
    """Where the compiled libraries are kept."""
    env = os.environ.get("SOFTJAC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softjac"


def find_compiler() -> str | None:
    """``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def machine_tag() -> bytes:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        if lines:
            return "".join(lines).encode()
    except OSError:
        pass
    return (platform.machine() + platform.processor() + sys.platform).encode()


def build(source: Path, prefix: str, cc: str, flags: Sequence[str], parts: int = 1) -> Path:
    """Compile ``source`` into the cache (once per source/compiler/flags/machine); returns the
    path of the shared object. Raises ``OSError`` with the compiler's message on failure.

    ``parts > 1``: the source is compiled as that many units at once (``-DSOFTJAC_PART=i``,
    each instantiating its share of the kernels), then linked into one library."""
    key_parts = [source.read_bytes(), cc.encode(), " ".join(flags).encode(), machine_tag()]
    key_parts.append(str(parts).encode())
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:20]
    out_dir = cache_dir()
    target = out_dir / f"{prefix}_{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    objects = [f"{tmp}.{i}.o" for i in range(1, parts + 1)] if parts > 1 else []
    try:
        if objects:
            unit_flags = [f for f in flags if f != "-shared"]
            procs = [
                subprocess.Popen(
                    [cc, *unit_flags, "-c", f"-DSOFTJAC_PART={i}", str(source), "-o", obj],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for i, obj in enumerate(objects, start=1)
            ]
            for proc in procs:
                _, err = proc.communicate(timeout=120)
                if proc.returncode != 0:
                    raise OSError(f"`{cc}` failed (exit {proc.returncode}): {err.strip()[:500]}")
            command = [cc, *flags, *objects, "-o", tmp]
        else:
            command = [cc, *flags, str(source), "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"`{cc}` failed (exit {done.returncode}): {done.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: a concurrent builder just overwrites the same bytes
    finally:
        for path in (tmp, *objects):
            if os.path.exists(path):
                os.unlink(path)
    return target


def load_library(
    source: Path,
    prefix: str,
    *,
    compiler: Callable[[], str | None] = find_compiler,
    flags: Sequence[str] = FLAGS,
    parts: int = 1,
) -> tuple[ctypes.CDLL | None, str]:
    """Build (or find in the cache) and load ``source``: ``(library, "")``, or ``(None, why)``
    when it is disabled, there is no compiler or every build failed. Never raises for those.

    The flags are tried as given, then without ``-fopenmp``, then also without
    ``-march=native``; ``parts`` as in :func:`build`."""
    if os.environ.get(DISABLE_ENV):
        return None, f"it is disabled by the environment variable {DISABLE_ENV}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler was found (set $CC, or install gcc or clang)"
    no_omp = [f for f in flags if f != "-fopenmp"]
    errors = []
    for attempt in (list(flags), no_omp, [f for f in no_omp if f != "-march=native"]):
        try:
            return ctypes.CDLL(str(build(source, prefix, cc, attempt, parts))), ""
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
    return None, f"compiling {source.name} failed: " + " | ".join(errors)
