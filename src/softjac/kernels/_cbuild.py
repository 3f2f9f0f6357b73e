"""Build the plain-C kernel libraries: at install time (``setup.py``'s ``build_ext``) and, only
as an explicit opt-in, at first use (``SOFTJAC_BUILD_KERNELS=1``, see ``_loader``).

Standard library only: ``setup.py`` loads this file by its path, before softjac or torch can
be imported. The C files (``csrc/``) have no Python headers; each library is compiled as one
unit per source file, the units of all libraries and variants at once (``jobs`` processes),
then linked with ``-shared``. Libraries, for each instruction-set variant of the machine's
architecture (x86-64: ``baseline`` = ``-march=x86-64``, ``avx2`` = ``-march=x86-64-v3``,
``avx512`` = ``-march=x86-64-v4``; other architectures: ``baseline`` only):

- ``softjac_cpu.<variant>.so``: the VJP, softmax, cross-entropy and dense-Jacobian kernels;
- ``softjac_secular.<variant>.so``: the secular-equation loop of ``softjac._spectral``;
- ``softjac_probe.so`` (baseline flags only): ``softjac_cpu_level()``, which the loader calls
  to pick the variant this CPU runs.

No ``-march=native``: a build runs on every CPU of its architecture. OpenMP is used when the
compiler accepts ``-fopenmp`` (not Apple clang, for one); without it the kernels run on one
thread. Every compiler process runs in its own process group, killed as a whole on timeout.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "BASE_FLAGS",
    "LIBRARIES",
    "PROBE",
    "VARIANTS",
    "BuildError",
    "build_all",
    "build_library",
    "find_compiler",
    "library_file",
    "openmp_flags",
    "source_hash",
    "variants",
]

CSRC = Path(__file__).with_name("csrc")
BASE_FLAGS = ("-O3", "-fPIC", "-std=gnu11", "-fvisibility=default", "-Wno-psabi")
#: library name -> its C sources in ``csrc/``
LIBRARIES = {
    "softjac_cpu": ("vjp.c", "softmax.c", "cross_entropy.c", "dense.c"),
    "softjac_secular": ("secular.c",),
}
PROBE = "softjac_probe"
#: file in the output directory holding the ``source_hash`` the libraries were built from
STAMP = "SOURCES"
PROBE_SOURCE = "cpu.c"
#: variant -> extra compiler flags, in increasing order of capability (x86-64)
VARIANTS = {
    "baseline": ("-march=x86-64", "-mtune=generic"),
    "avx2": ("-march=x86-64-v3", "-mtune=generic"),
    "avx512": ("-march=x86-64-v4", "-mtune=generic"),
}


class BuildError(OSError):
    """A compiler failed, timed out or was not found."""


def variants(machine: str | None = None) -> list[str]:
    """The variants built for ``machine`` (default: this one): all three on x86-64, else
    ``baseline`` (compiled with the compiler's default target)."""
    machine = (machine or platform.machine()).lower()
    return list(VARIANTS) if machine in ("x86_64", "amd64") else ["baseline"]


def variant_flags(variant: str, machine: str | None = None) -> tuple[str, ...]:
    machine = (machine or platform.machine()).lower()
    return VARIANTS[variant] if machine in ("x86_64", "amd64") else ()


def library_file(name: str, variant: str | None) -> str:
    """File name of library ``name`` in ``variant`` (the probe has none)."""
    return f"{name}.so" if variant is None else f"{name}.{variant}.so"


def find_compiler() -> str | None:
    """``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def source_hash(csrc: Path = CSRC) -> str:
    """Hash of every C source and header in ``csrc`` (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(csrc.glob("*.[ch]")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _run(command: Sequence[str], timeout: float) -> None:
    """Run a compiler command in its own process group; on timeout kill the whole group
    (the driver and the cc1/as/ld it started). Raises :class:`BuildError`."""
    try:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise BuildError(f"`{command[0]}` could not be started: {exc}") from exc
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise BuildError(
            f"`{command[0]}` timed out after {timeout:g} s (its process group was killed)"
        ) from None
    if proc.returncode != 0:
        raise BuildError(f"`{command[0]}` failed (exit {proc.returncode}): {err.strip()[:800]}")


def openmp_flags(cc: str, timeout: float = 60.0) -> tuple[str, ...]:
    """``("-fopenmp",)`` when ``cc`` compiles and links an OpenMP shared library, else ()."""
    with tempfile.TemporaryDirectory(prefix="softjac-omp-") as tmp:
        src = Path(tmp) / "omp.c"
        src.write_text(
            "#include <omp.h>\nint softjac_omp_probe(void) { return omp_get_max_threads(); }\n"
        )
        try:
            _run([cc, *BASE_FLAGS, "-fopenmp", "-shared", str(src), "-o", f"{tmp}/omp.so"], timeout)
        except BuildError:
            return ()
    return ("-fopenmp",)


def build_library(
    sources: Sequence[Path],
    target: Path,
    cc: str,
    flags: Sequence[str],
    *,
    timeout: float = 300.0,
    pool: concurrent.futures.Executor | None = None,
) -> Path:
    """Compile ``sources`` (one unit each, concurrently in ``pool`` when given) and link them
    into the shared library ``target``, written under a temporary name and renamed into place
    atomically. Raises :class:`BuildError` with the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    objects = [f"{tmp}.{i}.o" for i in range(len(sources))]
    try:
        jobs = [
            [cc, *flags, "-c", str(src), "-o", obj]
            for src, obj in zip(sources, objects, strict=True)
        ]
        if pool is None:
            for job in jobs:
                _run(job, timeout)
        else:
            for fut in [pool.submit(_run, job, timeout) for job in jobs]:
                fut.result()
        _run([cc, *flags, "-shared", *objects, "-o", tmp, "-lm"], timeout)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        for path in (tmp, *objects):
            if os.path.exists(path):
                os.unlink(path)
    return target


def build_all(
    out_dir: Path,
    *,
    cc: str | None = None,
    jobs: int | None = None,
    timeout: float = 300.0,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Build the probe and every library in every variant of this machine into ``out_dir``;
    returns the files built. A variant the compiler rejects (e.g. an old compiler without
    ``-march=x86-64-v4``) is skipped with a message; a failing baseline raises
    :class:`BuildError`."""
    cc = cc or find_compiler()
    if cc is None:
        raise BuildError("no C compiler was found (set $CC, or install gcc or clang)")
    omp = openmp_flags(cc, timeout)
    log(f"softjac: building the C kernels with `{cc}` {'with' if omp else 'without'} OpenMP")
    out_dir.mkdir(parents=True, exist_ok=True)
    built: list[Path] = []
    workers = jobs or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        tasks: dict[concurrent.futures.Future[Path], tuple[str, str]] = {}

        def submit(name: str, variant: str | None, sources: Sequence[str], flags) -> None:
            target = out_dir / library_file(name, variant)
            srcs = [CSRC / s for s in sources]
            # one thread per library: its units go to the shared pool of compiler processes
            fut = lib_pool.submit(
                build_library, srcs, target, cc, flags, timeout=timeout, pool=pool
            )
            tasks[fut] = (name, variant or "baseline")

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as lib_pool:
            base = (*BASE_FLAGS, *variant_flags("baseline"))
            submit(PROBE, None, (PROBE_SOURCE,), base)
            for variant in variants():
                flags = (*BASE_FLAGS, *variant_flags(variant), *omp)
                for name, sources in LIBRARIES.items():
                    submit(name, variant, sources, flags)
            failed: dict[str, str] = {}
            for fut in concurrent.futures.as_completed(tasks):
                name, variant = tasks[fut]
                try:
                    built.append(fut.result())
                except BuildError as exc:
                    failed[variant] = f"{name}: {exc}"
    if "baseline" in failed:
        raise BuildError(f"the baseline build failed: {failed['baseline']}")
    for variant, why in failed.items():  # a partial variant must not be picked
        for name in LIBRARIES:
            (out_dir / library_file(name, variant)).unlink(missing_ok=True)
        built = [p for p in built if p.exists()]
        log(f"softjac: the {variant} variant was skipped: {why}")
    (out_dir / STAMP).write_text(source_hash() + "\n")
    log("softjac: built " + ", ".join(sorted(p.name for p in built)))
    return sorted(built)
