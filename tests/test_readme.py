"""The README's Python examples run as written, and its claims about values hold."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 5
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in blocks:
            exec(compile(block, str(README), "exec"), ns)
    # values the README prints in its comments
    assert ns["softjac"].vjp(ns["z"], ns["v"]).tolist()[0] in (5.551115123125775e-17,)
    assert torch.isclose(
        ns["op"].log_pdet(), torch.tensor(-628.05408985094534, dtype=torch.float64)
    )


def test_readme_quick_start_has_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(commands) == 2
    assert "softjac explain 2 1 0.5 -0.5 --plot jacobian.png" in commands[0]
    assert "[test]" in commands[1] and "pytest" in commands[1]
