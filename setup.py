"""Build hook: compile the plain-C kernel libraries (``src/softjac/kernels/csrc``) at install.

The project metadata lives in ``pyproject.toml``; this file only adds a ``build_ext`` that
builds the ctypes-loaded shared libraries (no Python extension modules) with
``softjac/kernels/_cbuild.py``: into the wheel's ``softjac/kernels/_lib/`` for ``pip install .``
and ``pip wheel .``, into the source tree's ``src/softjac/kernels/_lib/`` (git-ignored) for
``pip install -e .``. The wheel is platform-tagged (``py3-none-<platform>``: the libraries do
not depend on the Python version). Without a working C compiler the install still succeeds,
with a message, and softjac runs on its PyTorch paths.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(
    "_softjac_cbuild", HERE / "src" / "softjac" / "kernels" / "_cbuild.py"
)
assert _spec is not None and _spec.loader is not None
cbuild = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cbuild
_spec.loader.exec_module(cbuild)


class BuildKernels(build_ext):
    """Compile the C libraries (all instruction-set variants, units in parallel)."""

    def run(self) -> None:
        if self.inplace or getattr(self, "editable_mode", False):
            out = HERE / "src" / "softjac" / "kernels" / "_lib"
        else:
            out = Path(self.build_lib) / "softjac" / "kernels" / "_lib"
        self._outputs: list[str] = []
        try:
            built = cbuild.build_all(out, jobs=self.parallel or None, log=self.announce_build)
        except cbuild.BuildError as exc:
            if os.environ.get("SOFTJAC_REQUIRE_KERNELS"):
                raise
            self.announce_build(
                f"softjac: the C kernels were NOT built ({exc}); softjac will run on PyTorch"
            )
            return
        self._outputs = [str(p) for p in built]

    def announce_build(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def get_outputs(self) -> list[str]:
        return list(getattr(self, "_outputs", []))


class PlatformWheel(bdist_wheel):
    """Tag the wheel ``py3-none-<platform>``: it holds shared libraries, no extension."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


class BinaryDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return True


setup(
    distclass=BinaryDistribution, cmdclass={"build_ext": BuildKernels, "bdist_wheel": PlatformWheel}
)
