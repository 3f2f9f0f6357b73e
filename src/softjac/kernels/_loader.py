"""Find and load the compiled C libraries (``softjac_cpu``, ``softjac_secular``) with ctypes.

Where they come from, in order:

1. ``kernels/_lib/``, filled at install time by ``setup.py`` (``pip install .``, ``pip wheel .``,
   and, in the source tree, ``pip install -e .``): the probe plus each library in each
   instruction-set variant (see ``_cbuild``). No compiler is needed at run time.
2. Only when ``SOFTJAC_BUILD_KERNELS=1`` and there is no build: compiled at first use into
   ``$SOFTJAC_CACHE_DIR`` (else ``$XDG_CACHE_HOME/softjac``, else ``~/.cache/softjac``), in a
   directory named by a hash of the C sources and the compiler, under a file lock (concurrent
   processes compile once), with a timeout (``SOFTJAC_BUILD_TIMEOUT`` seconds, default 300)
   that kills the compiler's whole process group, and one warning per process.

The variant is the best this CPU runs, by the probe's ``softjac_cpu_level()``
(``__builtin_cpu_supports``), or ``SOFTJAC_CPU_CAPABILITY=baseline|avx2|avx512`` (never above
what the CPU runs). Libraries are loaded only from a directory owned by this user (or, for an
installation, root) that others cannot write to, else refused. ``SOFTJAC_DISABLE_CPU_KERNEL``
(any non-empty value) turns every compiled kernel off. Failures are never raised here: the
caller gets ``None`` and the reason.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import hashlib
import os
import shutil
import stat
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

from softjac.kernels import _cbuild

__all__ = [
    "BUILD_ENV",
    "CAPABILITY_ENV",
    "DISABLE_ENV",
    "LEVELS",
    "Loaded",
    "cache_dir",
    "check_directory",
    "load",
]

DISABLE_ENV = "SOFTJAC_DISABLE_CPU_KERNEL"
BUILD_ENV = "SOFTJAC_BUILD_KERNELS"
CAPABILITY_ENV = "SOFTJAC_CPU_CAPABILITY"
TIMEOUT_ENV = "SOFTJAC_BUILD_TIMEOUT"
#: the probe's level -> variant
LEVELS = ("baseline", "avx2", "avx512")
LIB_DIR = Path(__file__).with_name("_lib")


class Loaded(NamedTuple):
    lib: ctypes.CDLL | None
    why: str  # empty when loaded
    variant: str  # empty when not loaded


_lock = threading.Lock()
_loaded: dict[str, Loaded] = {}
_warned = False
_warned_stale = False


def cache_dir() -> Path:
    """Where the opt-in runtime build keeps its libraries."""
    env = os.environ.get("SOFTJAC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softjac"


def check_directory(path: Path, *, allow_root: bool) -> str:
    """Why libraries must not be loaded from ``path`` (empty string: they may): it must be a
    directory owned by this user (or root, for an installation) and not writable by others;
    so must every library file in it."""
    uid = os.geteuid()
    owners = {uid, 0} if allow_root else {uid}
    for p in (path, *path.glob("*.so")):
        try:
            st = p.stat()
        except OSError as exc:
            return f"{p} cannot be inspected ({exc.strerror})"
        if st.st_uid not in owners:
            return f"{p} is owned by another user (uid {st.st_uid})"
        if st.st_mode & stat.S_IWOTH:
            return f"{p} is writable by other users (mode {stat.filemode(st.st_mode)})"
    return ""


def _probe_level(directory: Path) -> int:
    probe = ctypes.CDLL(str(directory / _cbuild.library_file(_cbuild.PROBE, None)))
    probe.softjac_cpu_level.restype = ctypes.c_int
    return int(probe.softjac_cpu_level())


def _choose(level: int, present: list[str]) -> str:
    """The variant to load: the best one present that this CPU runs, capped by the
    environment override; an override the CPU cannot run, or an unknown value, warns."""
    best = LEVELS[min(level, len(LEVELS) - 1)]
    want = os.environ.get(CAPABILITY_ENV, "").strip().lower()
    if want:
        if want not in LEVELS:
            warnings.warn(
                f"softjac: {CAPABILITY_ENV} must be one of {', '.join(LEVELS)}. Got {want!r}; "
                f"using {best!r}.",
                RuntimeWarning,
                stacklevel=4,
            )
        elif LEVELS.index(want) > level:
            warnings.warn(
                f"softjac: {CAPABILITY_ENV}={want!r} is not supported by this CPU; using {best!r}.",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            best = want
    for variant in LEVELS[: LEVELS.index(best) + 1][::-1]:
        if variant in present:
            return variant
    return ""


def _warn_build(directory: Path) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"softjac: compiling the C kernels at first use ({BUILD_ENV}=1) into {directory}; "
            "this happens once per source version and compiler",
            RuntimeWarning,
            stacklevel=5,
        )


def _runtime_build(names: tuple[str, ...]) -> tuple[Path | None, str]:
    """The opt-in first-use build: the probe, then ``names`` in the variant this CPU runs,
    into a per-user directory keyed by the sources and the compiler. Returns the directory,
    or None and why."""
    cc = _cbuild.find_compiler()
    if cc is None:
        return None, f"{BUILD_ENV} is set but no C compiler was found (set $CC, or install gcc)"
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV) or 300)
    except ValueError:
        timeout = 300.0
    root = cache_dir()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"the cache directory {root} cannot be created ({exc.strerror})"
    why = check_directory(root, allow_root=False)
    if why:
        return None, f"refusing the cache directory: {why}"
    cc_path = shutil.which(cc) or cc  # the compiler's identity: its resolved path
    cc_tag = hashlib.sha256(os.path.realpath(cc_path).encode()).hexdigest()[:8]
    key = f"{_cbuild.source_hash()}-{Path(cc).name}-{cc_tag}"
    directory = root / f"build-{key}"
    lock_path = root / f"build-{key}.lock"
    try:
        with (
            open(lock_path, "a") as lock,
            concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool,
        ):
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent processes: one compiles, one waits
            directory.mkdir(mode=0o700, exist_ok=True)
            why = check_directory(directory, allow_root=False)
            if why:
                return None, f"refusing the cache directory: {why}"
            probe = directory / _cbuild.library_file(_cbuild.PROBE, None)
            if not probe.exists():
                _warn_build(directory)
                base = (*_cbuild.BASE_FLAGS, *_cbuild.variant_flags("baseline"))
                sources = [_cbuild.CSRC / _cbuild.PROBE_SOURCE]
                _cbuild.build_library(sources, probe, cc, base, timeout=timeout)
            variant = _choose(_probe_level(directory), _cbuild.variants())
            for name in names:
                target = directory / _cbuild.library_file(name, variant)
                if not target.exists():
                    _warn_build(directory)
                    omp = _cbuild.openmp_flags(cc, timeout)
                    flags = (*_cbuild.BASE_FLAGS, *_cbuild.variant_flags(variant), *omp)
                    sources = [_cbuild.CSRC / s for s in _cbuild.LIBRARIES[name]]
                    _cbuild.build_library(sources, target, cc, flags, timeout=timeout, pool=pool)
    except (OSError, _cbuild.BuildError) as exc:
        return None, f"compiling the C kernels at first use failed: {exc}"
    return directory, ""


def load(name: str) -> Loaded:
    """Load library ``name`` (``"softjac_cpu"`` or ``"softjac_secular"``) once per process."""
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            _loaded[name] = _load(name)
        return _loaded[name]


def _stale(directory: Path) -> bool:
    """Whether the libraries in ``directory`` were built from other C sources than those
    beside this file (a source tree edited since ``pip install -e .``)."""
    try:
        return (directory / _cbuild.STAMP).read_text().strip() != _cbuild.source_hash()
    except OSError:
        return True


def _warn_stale() -> None:
    global _warned_stale
    if not _warned_stale:
        _warned_stale = True
        warnings.warn(
            f"softjac: the C kernels in {LIB_DIR} were built from other sources than those in "
            f"{_cbuild.CSRC}; rebuild them (`pip install -e .`) or set {BUILD_ENV}=1 to compile "
            "the current sources at first use. Loading the old build.",
            RuntimeWarning,
            stacklevel=5,
        )


def _load(name: str) -> Loaded:
    if os.environ.get(DISABLE_ENV):
        return Loaded(None, f"it is disabled by the environment variable {DISABLE_ENV}", "")
    probe_file = _cbuild.library_file(_cbuild.PROBE, None)
    opt_in = os.environ.get(BUILD_ENV, "") not in ("", "0")
    built = (LIB_DIR / probe_file).exists()
    if built and _stale(LIB_DIR) and not opt_in:
        _warn_stale()
    if built and not (opt_in and _stale(LIB_DIR)):
        directory, allow_root = LIB_DIR, True
    elif opt_in:
        runtime_dir, why = _runtime_build((name,))
        if runtime_dir is None:
            return Loaded(None, why, "")
        directory, allow_root = runtime_dir, False
    else:
        return Loaded(
            None,
            "the C kernels are not built in this installation (no "
            f"{LIB_DIR / probe_file}); reinstall with a C compiler available "
            f"(`pip install .`, or `pip install -e .` in a source tree), or set {BUILD_ENV}=1 "
            "to compile them at first use",
            "",
        )
    why = check_directory(directory, allow_root=allow_root)
    if why:
        return Loaded(None, f"refusing to load the C kernels: {why}", "")
    try:
        level = _probe_level(directory)
        present = [v for v in LEVELS if (directory / _cbuild.library_file(name, v)).exists()]
        variant = _choose(level, present)
        if not variant:
            return Loaded(None, f"no variant of {name} is built in {directory}", "")
        lib = ctypes.CDLL(str(directory / _cbuild.library_file(name, variant)))
    except OSError as exc:
        return Loaded(None, f"loading the C kernels from {directory} failed: {exc}", "")
    return Loaded(lib, "", variant)


def load_variant(name: str, variant: str, directory: Path = LIB_DIR) -> ctypes.CDLL:
    """Load one given variant (for tests and benchmarks; no CPU check: calling a kernel of a
    variant this CPU cannot run crashes the process)."""
    return ctypes.CDLL(str(directory / _cbuild.library_file(name, variant)))
