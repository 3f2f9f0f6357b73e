"""Compile plain-C sources at first use into a per-user cache and load them with ctypes.

Shared by the CPU kernels (``csrc/{vjp,softmax,cross_entropy,dense}.c``, loaded by
``softjac.kernels._cpu``) and the secular-equation loop (``csrc/secular.c``, loaded by
``softjac._spectral``). The C files have no
Python headers, so they build in seconds with any C compiler (``$CC``, else
``cc``/``gcc``/``clang``) and need no build step at install time. The shared object is cached
in ``$SOFTJAC_CACHE_DIR`` or ``$XDG_CACHE_HOME/softjac`` or ``~/.cache/softjac``, named
``<prefix>_<hash>.so`` by a hash of the sources and the headers beside them, the compiler, its flags and the machine
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


def _key(sources: Sequence[Path], cc: str, flags: Sequence[str]) -> str:
    """Hash of the sources, every header in their directories, the compiler, flags, machine."""
    files = sorted({*sources, *(h for src in sources for h in src.parent.glob("*.h"))})
    key_parts = [f.name.encode() + b"\0" + f.read_bytes() for f in files]
    key_parts += [cc.encode(), " ".join(flags).encode(), machine_tag()]
    return hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:20]


def build(sources: Sequence[Path], prefix: str, cc: str, flags: Sequence[str]) -> Path:
    """Compile ``sources`` into one shared object in the cache (once per sources/headers/
    compiler/flags/machine); returns its path. Raises ``OSError`` with the compiler's message
    on failure. Several sources are compiled as separate units at once, then linked."""
    out_dir = cache_dir()
    target = out_dir / f"{prefix}_{_key(sources, cc, flags)}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    objects = [f"{tmp}.{i}.o" for i in range(1, len(sources) + 1)] if len(sources) > 1 else []
    try:
        if objects:
            unit_flags = [f for f in flags if f != "-shared"]
            procs = [
                subprocess.Popen(
                    [cc, *unit_flags, "-c", str(src), "-o", obj],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for src, obj in zip(sources, objects, strict=True)
            ]
            for proc in procs:
                _, err = proc.communicate(timeout=120)
                if proc.returncode != 0:
                    raise OSError(f"`{cc}` failed (exit {proc.returncode}): {err.strip()[:500]}")
            command = [cc, *flags, *objects, "-o", tmp]
        else:
            command = [cc, *flags, str(sources[0]), "-o", tmp]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"`{cc}` failed (exit {proc.returncode}): {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: a concurrent builder just overwrites the same bytes
    finally:
        for path in (tmp, *objects):
            if os.path.exists(path):
                os.unlink(path)
    return target


def load_library(
    sources: Path | Sequence[Path],
    prefix: str,
    *,
    compiler: Callable[[], str | None] = find_compiler,
    flags: Sequence[str] = FLAGS,
) -> tuple[ctypes.CDLL | None, str]:
    """Build (or find in the cache) and load ``sources`` (one file or several, linked into
    one library): ``(library, "")``, or ``(None, why)`` when it is disabled, there is no
    compiler or every build failed. Never raises for those.

    The flags are tried as given, then without ``-fopenmp``, then also without
    ``-march=native``."""
    sources = [sources] if isinstance(sources, Path) else list(sources)
    if os.environ.get(DISABLE_ENV):
        return None, f"it is disabled by the environment variable {DISABLE_ENV}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler was found (set $CC, or install gcc or clang)"
    no_omp = [f for f in flags if f != "-fopenmp"]
    errors = []
    for attempt in (list(flags), no_omp, [f for f in no_omp if f != "-march=native"]):
        try:
            return ctypes.CDLL(str(build(sources, prefix, cc, attempt))), ""
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
    names = ", ".join(src.name for src in sources)
    return None, f"compiling {names} failed: " + " | ".join(errors)
