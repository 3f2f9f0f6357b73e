"""Shared test configuration.

Hypothesis runs with a deterministic profile ("ci": derandomised, no example database, no
deadline) unless ``HYPOTHESIS_PROFILE`` names another ("dev" draws more examples at random).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# Without a GPU the Triton kernels run in Triton's interpreter. ``triton.jit`` picks compiled or
# interpreted when a function is decorated, so triton's own library functions (``tl.sum`` …) are
# fixed when triton is first imported, and torch may import it early (``torch.func`` does). So
# import triton and softjac's kernels here, under ``TRITON_INTERPRET=1``: the Triton tests then
# pass in any order. The variable itself is restored; tests that run the kernels set it.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    _had_interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        import softjac.kernels._triton  # noqa: F401
    finally:
        if _had_interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _had_interpret


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, so a failure reproduces."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if "slow" not in (config.getoption("-m") or ""):
        # slow tests run only when asked for: `pytest -m slow`
        skip_slow = pytest.mark.skip(reason="slow: run with `-m slow`")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Per-dtype tolerances for comparisons against a float64 reference (absolute, on quantities
# of size <= 1 such as σ and J entries; relative tolerances where a test says so).
TOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,
}


def triton_kernels_interpreted() -> bool | None:
    """Whether softjac's Triton kernels run under Triton's interpreter in this process (None:
    not imported yet). ``triton.jit`` decides at import time, from ``TRITON_INTERPRET``."""
    module = sys.modules.get("softjac.kernels._triton")
    if module is None:
        return None
    return any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values())


def import_triton_kernels(*names: str) -> tuple[str, list[ModuleType]]:
    """For a module of Triton tests, at collection: skip it without triton; import
    ``softjac.kernels.<name>`` for each name, under ``TRITON_INTERPRET=1`` when there is no GPU
    (the variable restored after), and skip when the kernels were imported without the
    interpreter. Returns the device to run on ("cuda", or "cpu" for the interpreter) and the
    modules."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    had = os.environ.get("TRITON_INTERPRET")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        modules = [importlib.import_module(f"softjac.kernels.{name}") for name in names]
    finally:
        if had is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = had
    if device == "cpu" and not triton_kernels_interpreted():
        pytest.skip(
            "softjac's Triton kernels were imported without the interpreter",
            allow_module_level=True,
        )
    return device, modules


def capture_graphs(graphs: list) -> Callable:
    """A ``torch.compile`` backend that appends each captured FX graph module to ``graphs`` and
    runs it as captured."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def softjac_targets(graphs: list) -> set[str]:
    """The ``softjac.*`` operators called in the captured graphs."""
    return {
        str(node.target)
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("softjac.")
    }


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """Make ``backend="triton"`` runnable and return the device to put tensors on: "cuda" with a
    GPU, else "cpu" with ``TRITON_INTERPRET=1`` (the kernels run in Triton's interpreter; keep
    sizes tiny). Skips when triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton_kernels_interpreted() is False:
        pytest.skip("softjac's Triton kernels were imported without the interpreter")
    return "cpu"
