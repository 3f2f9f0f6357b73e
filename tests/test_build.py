"""The C kernels' build and loader: every instruction-set variant is built and loads, the
variant follows the CPU (and the environment override), the opt-in first-use build compiles
once under a lock, kills a hanging compiler, and libraries are refused from directories others
can write to. Kernel results are checked against ``softjac._core`` in float64."""

from __future__ import annotations

import os
import platform
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from softjac import _core
from softjac.kernels import _cbuild, _cpu, _loader, _torch, dispatch

LIB_DIR = _loader.LIB_DIR  # the real one (the fixture below replaces the loader's)
BUILT = (_loader.LIB_DIR / _cbuild.library_file(_cbuild.PROBE, None)).exists()
needs_build = pytest.mark.skipif(not BUILT, reason="the C kernels are not built (pip install -e .)")
needs_cc = pytest.mark.skipif(_cbuild.find_compiler() is None, reason="no C compiler")
X86 = platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (an independent reference for the probe)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_variant() -> str:
    flags = cpu_flags()
    v3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"}
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    if not X86 or not v3 <= flags:
        return "baseline"
    return "avx512" if v4 <= flags else "avx2"


def check_library(lib, dtype: torch.dtype) -> None:
    """Call the VJP of a loaded library directly and compare with ``_core.vjp_last``."""
    import ctypes

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(37, 300, dtype=torch.float64) * 3, -1).to(dtype)
    v = torch.randn(37, 300, dtype=torch.float64).to(dtype)
    out = torch.empty_like(p)
    fn = getattr(lib, f"softjac_vjp_{'f64' if dtype == torch.float64 else 'f32'}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    fn(p.data_ptr(), v.data_ptr(), out.data_ptr(), 37, 300, 300, 300, 300, 2)
    ref = _core.vjp_last(p.double(), v.double())
    tol = 1e-14 if dtype == torch.float64 else 1e-5
    assert (out.double() - ref).abs().max().item() < tol * ref.abs().max().item()


# ---------------------------------------------------------------------------------- the build


@needs_build
def test_every_variant_is_built_and_loads():
    """Each library exists in each variant of this architecture and loads; the variants this
    CPU runs compute the VJP correctly (the others are only loaded: running them would fault)."""
    want = ["baseline", "avx2", "avx512"] if X86 else ["baseline"]
    assert _cbuild.variants() == want
    runnable = want[: want.index(expected_variant()) + 1]
    for variant in want:
        for name in _cbuild.LIBRARIES:
            path = LIB_DIR / _cbuild.library_file(name, variant)
            assert path.is_file(), path
            lib = _loader.load_variant(name, variant)
            if name == "softjac_cpu":
                assert lib.softjac_cpu_abi() == _cpu._ABI
                if variant in runnable:
                    check_library(lib, torch.float32)
                    check_library(lib, torch.float64)


@pytest.fixture
def reset_loader(monkeypatch):
    """The loader and ``_cpu`` as in a fresh process (nothing loaded yet, no overrides)."""
    monkeypatch.setattr(_loader, "_loaded", {})
    monkeypatch.setattr(_cpu, "_lib", None)
    monkeypatch.setattr(_cpu, "_error", None)
    monkeypatch.setattr(_cpu, "_variant", "")
    for env in (_loader.DISABLE_ENV, _loader.BUILD_ENV, _loader.CAPABILITY_ENV):
        monkeypatch.delenv(env, raising=False)


@needs_build
def test_loader_picks_the_best_variant_this_cpu_runs(reset_loader):
    assert _cpu.available(), _cpu.unavailable_reason()
    assert _cpu.capability() == expected_variant()
    assert _loader.load("softjac_secular").variant == expected_variant()


@needs_build
@pytest.mark.parametrize(
    ("value", "warning"),
    [("baseline", None), ("AVX2", None), ("sse9", "must be one of"), ("avx512", "not supported")],
)
def test_capability_override(reset_loader, monkeypatch, value, warning):
    order = ["baseline", "avx2", "avx512"]
    if value.lower() in order and order.index(value.lower()) <= order.index(expected_variant()):
        want = value.lower()
    else:
        want = expected_variant()
        if warning is None or value == expected_variant():
            pytest.skip(f"{value} is what this CPU runs")
    monkeypatch.setenv(_loader.CAPABILITY_ENV, value)
    if warning is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = _loader.load("softjac_cpu")
    else:
        with pytest.warns(RuntimeWarning, match=warning):
            loaded = _loader.load("softjac_cpu")
    assert loaded.variant == want
    assert Path(loaded.lib._name).name == _cbuild.library_file("softjac_cpu", want)
    check_library(loaded.lib, torch.float32)
    check_library(loaded.lib, torch.float64)


def test_disable_switch(reset_loader, monkeypatch):
    monkeypatch.setenv(_loader.DISABLE_ENV, "1")
    assert not _cpu.available() and _cpu.capability() == ""
    assert _loader.DISABLE_ENV in _cpu.unavailable_reason()
    assert _loader.load("softjac_secular").lib is None


@pytest.fixture
def fresh_loader(reset_loader, monkeypatch, tmp_path):
    """The loader with no install-time build (an empty ``_lib``), its cache in ``tmp_path``."""
    empty = tmp_path / "no_lib"
    empty.mkdir()
    monkeypatch.setattr(_loader, "LIB_DIR", empty)
    monkeypatch.setattr(_loader, "_warned", False)
    monkeypatch.setenv("SOFTJAC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_without_a_build_auto_uses_torch_and_cpu_raises(fresh_loader):
    p = torch.softmax(torch.randn(2, 5, dtype=torch.float64), -1)
    v = torch.randn(2, 5, dtype=torch.float64)
    out = dispatch.softmax_vjp(p, v)  # auto: silently torch
    assert torch.equal(out, _torch.softmax_vjp(p, v))
    assert not _cpu.available() and _cpu.capability() == ""
    assert "not built" in _cpu.unavailable_reason()
    assert _loader.BUILD_ENV in _cpu.unavailable_reason()  # the fix is named
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is unavailable: the C kernels are not"):
        dispatch.softmax_vjp(p, v, backend="cpu")
    assert not (fresh_loader / "cache").exists()  # nothing was compiled


# ------------------------------------------------------------------ the opt-in first-use build


@needs_cc
def test_opt_in_build_compiles_once_warns_once_and_works(fresh_loader, monkeypatch):
    monkeypatch.setenv(_loader.BUILD_ENV, "1")
    with pytest.warns(RuntimeWarning, match="compiling the C kernels at first use") as record:
        assert _cpu.available(), _cpu.unavailable_reason()
        assert _loader.load("softjac_secular").lib is not None
    assert len([w for w in record if "compiling" in str(w.message)]) == 1
    assert _cpu.capability() == expected_variant()
    p = torch.softmax(torch.randn(6, 50, dtype=torch.float64), -1)
    v = torch.randn(6, 50, dtype=torch.float64)
    assert (_cpu.softmax_vjp(p, v) - _core.vjp_last(p, v)).abs().max().item() < 1e-15
    (build,) = (fresh_loader / "cache").glob("build-*/")
    assert stat.S_IMODE(build.stat().st_mode) == 0o700
    libs = sorted(build.glob("*.so"))
    assert [f.name for f in libs] == sorted(
        [
            _cbuild.library_file("softjac_cpu", expected_variant()),
            _cbuild.library_file("softjac_secular", expected_variant()),
            _cbuild.library_file(_cbuild.PROBE, None),
        ]
    )
    mtimes = [f.stat().st_mtime_ns for f in libs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second process-level load: no build, no warning
        directory, why = _loader._runtime_build(("softjac_cpu", "softjac_secular"))
    assert directory == build and why == ""
    assert [f.stat().st_mtime_ns for f in libs] == mtimes


@needs_cc
def test_opt_in_build_under_a_lock_compiles_once_for_concurrent_processes(tmp_path):
    real = shutil.which(_cbuild.find_compiler() or "cc")
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc-logging"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "no_lib").mkdir()
    code = f"""
        import warnings
        from pathlib import Path
        from softjac.kernels import _loader
        _loader.LIB_DIR = Path({str(tmp_path / "no_lib")!r})
        warnings.simplefilter("ignore")
        loaded = _loader.load("softjac_secular")
        assert loaded.lib is not None, loaded.why
        print(loaded.variant)
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(_cpu.__file__).parents[2]),
        "CC": str(wrapper),
        "SOFTJAC_CACHE_DIR": str(tmp_path / "cache"),
        _loader.BUILD_ENV: "1",
    }
    env.pop(_loader.DISABLE_ENV, None)
    env.pop(_loader.CAPABILITY_ENV, None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)], env=env, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    compiles = [ln for ln in log.read_text().splitlines() if " -c " in f" {ln} "]
    assert sum("secular.c" in ln for ln in compiles) == 1
    assert sum("cpu.c" in ln for ln in compiles) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


def test_opt_in_build_timeout_kills_the_compilers_process_group(fresh_loader, monkeypatch):
    pids = fresh_loader / "pids"
    fake = fresh_loader / "cc-hangs"
    # a "compiler" that starts a child of its own (as gcc starts cc1) and hangs
    fake.write_text(f"#!/bin/sh\necho $$ >> {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv(_loader.BUILD_ENV, "1")
    monkeypatch.setenv(_loader.TIMEOUT_ENV, "1")
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="first use"):
        assert not _cpu.available()
    assert time.perf_counter() - t0 < 30
    assert "timed out after 1 s" in _cpu.unavailable_reason()
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in started)


def test_world_writable_cache_directory_is_refused(fresh_loader, monkeypatch):
    cache = fresh_loader / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setenv(_loader.BUILD_ENV, "1")
    monkeypatch.setenv("CC", "/bin/false")  # must not even be run
    assert not _cpu.available()
    assert "writable by other users" in _cpu.unavailable_reason()
    assert not list(cache.iterdir())


@needs_build
def test_world_writable_library_directory_is_refused(fresh_loader, monkeypatch):
    lib_dir = fresh_loader / "lib"
    shutil.copytree(LIB_DIR, lib_dir)
    monkeypatch.setattr(_loader, "LIB_DIR", lib_dir)
    assert _loader.load("softjac_secular").lib is not None  # as copied: fine
    monkeypatch.setattr(_loader, "_loaded", {})
    target = lib_dir / _cbuild.library_file("softjac_cpu", "baseline")
    target.chmod(0o777)  # one writable library taints the directory
    loaded = _loader.load("softjac_cpu")
    assert loaded.lib is None and "writable by other users" in loaded.why
    target.chmod(0o755)
    lib_dir.chmod(0o777)
    monkeypatch.setattr(_loader, "_loaded", {})
    loaded = _loader.load("softjac_cpu")
    assert loaded.lib is None and "writable by other users" in loaded.why


@needs_build
def test_stale_build_warns_and_the_opt_in_rebuilds_from_the_current_sources(
    fresh_loader, monkeypatch
):
    lib_dir = fresh_loader / "lib"
    shutil.copytree(LIB_DIR, lib_dir)
    monkeypatch.setattr(_loader, "LIB_DIR", lib_dir)
    monkeypatch.setattr(_loader, "_warned_stale", False)
    assert (lib_dir / _cbuild.STAMP).read_text().strip() == _cbuild.source_hash()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # current: no warning
        assert _loader.load("softjac_secular").lib is not None
    (lib_dir / _cbuild.STAMP).write_text("0" * 20 + "\n")  # as after editing csrc/
    monkeypatch.setattr(_loader, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="built from other sources"):
        loaded = _loader.load("softjac_secular")
    assert Path(loaded.lib._name).parent == lib_dir
    if _cbuild.find_compiler() is not None:
        monkeypatch.setattr(_loader, "_loaded", {})
        monkeypatch.setenv(_loader.BUILD_ENV, "1")
        with pytest.warns(RuntimeWarning, match="compiling the C kernels at first use"):
            loaded = _loader.load("softjac_secular")
        assert Path(loaded.lib._name).parent.parent == fresh_loader / "cache"


# ------------------------------------------------------------------------- install-time build


@needs_cc
def test_build_all_builds_every_variant_and_skips_a_rejected_one(tmp_path):
    """``build_all`` with a compiler that rejects ``-march=x86-64-v4`` (an old gcc): the other
    variants are built, the rejected one is absent (never half-built)."""
    if not X86:
        pytest.skip("variants exist on x86-64 only")
    real = shutil.which(_cbuild.find_compiler() or "cc")
    wrapper = tmp_path / "cc-old"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=x86-64-v4 ] && exit 1; done\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    messages: list[str] = []
    # the secular library alone keeps this fast
    old = dict(_cbuild.LIBRARIES)
    try:
        _cbuild.LIBRARIES.clear()
        _cbuild.LIBRARIES["softjac_secular"] = old["softjac_secular"]
        built = _cbuild.build_all(tmp_path / "out", cc=str(wrapper), log=messages.append)
    finally:
        _cbuild.LIBRARIES.clear()
        _cbuild.LIBRARIES.update(old)
    assert [p.name for p in built] == [
        "softjac_probe.so",
        "softjac_secular.avx2.so",
        "softjac_secular.baseline.so",
    ]
    assert any("avx512 variant was skipped" in m for m in messages)
    assert not list((tmp_path / "out").glob("*.tmp*"))


@pytest.mark.slow
def test_pip_wheel_is_platform_tagged_and_holds_the_libraries(tmp_path, request):
    import zipfile

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("builds a wheel (about a minute): run with -m slow")

    root = Path(__file__).parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("softjac-*.whl")
    assert not wheel.name.endswith("-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for variant in _cbuild.variants():
        for name in _cbuild.LIBRARIES:
            assert f"softjac/kernels/_lib/{_cbuild.library_file(name, variant)}" in names
    assert "softjac/kernels/_lib/softjac_probe.so" in names
