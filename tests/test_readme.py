"""The README's Python examples run as written, and the values their comments print hold.

Every ```python block of the README is executed statement by statement in one namespace. A
comment that *starts with a value* is a claim about the expression statement it ends:

* a bracketed value — ``[1, 2.5]``, ``[[0, 1], [2, 3]]``, ``tensor([0.5977, 0.2199])`` or a
  shape ``(8, 10, 3, 3)`` — compared entry by entry with the expression's value flattened
  (``…`` skips entries: the numbers before it are the first ones, those after it the last);
* a number followed by the end of the comment, ``,``, ``;`` or `` (`` — ``8.5e-18, naive: 0``.

Each number is compared to the precision it is printed with (half a unit in its last printed
digit, and at least two float64 ulps). Comments that start with words are prose and are not
checked.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import re
from pathlib import Path

import pytest
import torch

import softjac

README = Path(__file__).resolve().parents[1] / "README.md"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _leading_bracket(text: str) -> str | None:
    """The balanced ``[...]``/``(...)``/``tensor(...)`` at the start of ``text``, or None."""
    start = 7 if text.startswith("tensor(") else 0
    if start == 0 and not text.startswith(("[", "(")):
        return None
    depth = 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
            if depth == 0:
                return text[start : i + 1] if start == 0 else text[start:i]
    return None


def parse_claim(comment: str) -> tuple[list[str], list[str]] | None:
    """The numbers a comment claims, as (first entries, last entries); None for prose."""
    text = comment.lstrip("#").strip()
    bracket = _leading_bracket(text)
    if bracket is not None:
        if not re.fullmatch(rf"[\s\[\](),…]*(?:{_NUMBER}[\s\[\](),…]*)*", bracket):
            return None  # a formula in brackets, not a value
        head, _, tail = bracket.partition("…")
        return re.findall(_NUMBER, head), re.findall(_NUMBER, tail)
    m = re.match(rf"({_NUMBER})(?:$|[,;]|\s+\()", text)
    if m:
        return [m.group(1)], []
    return None


def _tolerance(printed: str) -> float:
    mantissa, _, exponent = printed.lower().lstrip("+-").partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    step = 10.0 ** (int(exponent or 0) - decimals)
    value = abs(float(printed))
    return max(0.5 * step * 1.001, 2 * math.ulp(value))


def _flatten(value: object) -> list[float]:
    if isinstance(value, torch.Tensor):
        return [float(x) for x in value.detach().double().reshape(-1).tolist()]
    if isinstance(value, torch.Size):
        return [float(x) for x in value]
    if isinstance(value, (int, float)):
        return [float(value)]
    raise TypeError(f"cannot compare a {type(value).__name__}")


def check_claim(value: object, claim: tuple[list[str], list[str]], where: str) -> None:
    head, tail = claim
    got = _flatten(value)
    if tail:  # "…" between the first and the last entries
        assert len(got) >= len(head) + len(tail), (where, got)
        first = list(zip(head, got[: len(head)], strict=True))
        expected = first + list(zip(tail, got[len(got) - len(tail) :], strict=True))
    else:
        assert len(got) == len(head), (where, head, got)
        expected = list(zip(head, got, strict=True))
    for printed, actual in expected:
        assert abs(actual - float(printed)) <= _tolerance(printed), (where, printed, actual)


def run_block(block: str, ns: dict) -> int:
    """Execute ``block`` statement by statement; check the claims; return how many."""
    lines = block.splitlines()
    tree = ast.parse(block)
    checked = 0
    for node in tree.body:
        code = ast.get_source_segment(block, node)
        assert code is not None
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), str(README), "eval"), ns)
            line = lines[node.end_lineno - 1]
            # the comment belongs to the last statement on its line
            later = [n for n in tree.body if n.lineno == node.end_lineno and n is not node]
            if "#" in line and not any(n.col_offset > node.col_offset for n in later):
                comment = line[line.index("#", node.end_col_offset) :]
                claim = parse_claim(comment)
                if claim is not None:
                    check_claim(value, claim, f"README: {line.strip()}")
                    checked += 1
        else:
            exec(compile(ast.Module([node], type_ignores=[]), str(README), "exec"), ns)
    return checked


def test_readme_python_blocks_run_and_print_what_they_say():
    blocks = _python_blocks()
    assert len(blocks) >= 5
    ns: dict = {}
    checked = 0
    with contextlib.redirect_stdout(io.StringIO()):
        for block in blocks:
            checked += run_block(block, ns)
    # softmax, vjp, hvp, the accurate entries, the masked softmax, the spectrum, log-pdet, shapes
    assert checked >= 10, checked
    # claims that do not rest on softjac's own output: the VJP is the correctly rounded ±σ₁σ₂
    # (mpmath), and the HVP is a column of autograd's Hessian of ⟨g, σ⟩
    assert ns["softjac"].vjp(ns["z"], ns["v"]).tolist() == [
        5.551115123125775e-17,
        -5.551115123125775e-17,
    ]
    mp = pytest.importorskip("mpmath")
    with mp.workdps(50):
        e = mp.exp(mp.mpf(-37.42994775023705))
        assert float(e / (1 + e) ** 2) == 5.551115123125775e-17


def test_readme_hvp_example_is_a_hessian_column():
    z = torch.tensor([2.0, 1.0, 0.5, -0.5])
    g = torch.tensor([0.1, -0.3, 0.2, 0.0])
    hess = torch.func.hessian(lambda x: (g * torch.softmax(x, -1)).sum())(z)
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(softjac.hvp(z, w=g, v=e0), hess[:, 0])
    text = README.read_text(encoding="utf-8")
    claimed = re.search(r"softjac\.hvp\(z, w=g, v=e0\)\s+# tensor\(\[(.*?)\]\)", text)
    assert claimed is not None
    torch.testing.assert_close(
        torch.tensor([float(x) for x in claimed.group(1).split(",")]),
        hess[:, 0],
        rtol=0,
        atol=5e-5,
    )


@pytest.mark.parametrize(
    ("comment", "claim"),
    [
        ("# tensor([0.5977, 0.2199])", (["0.5977", "0.2199"], [])),
        ("# [0, 7.8e-79, …, 1.8e-13]  every one", (["0", "7.8e-79"], ["1.8e-13"])),
        ("# [[0, 0], [0.27, 0]]; the gradient", (["0", "0", "0.27", "0"], [])),
        ("# (8, 10, 3, 3)", (["8", "10", "3", "3"], [])),
        ("# 8.5e-18, naive: 0", (["8.5e-18"], [])),
        ("# -628.05 (exact)", (["-628.05"], [])),
        ("# 8 properties, residuals", None),
        ("# diag(σ) − σσᵀ, (4, 4)", None),
        ("# (4, 4, 4): ∂²σ_i/∂z_j∂z_k", (["4", "4", "4"], [])),
        ("# σ ⊙ (g − ⟨g, σ⟩)", None),
        ("# dense: [1, 2]", None),
    ],
)
def test_claim_parser(comment, claim):
    assert parse_claim(comment) == claim


def test_claim_checker_fails_on_a_wrong_value():
    check_claim(torch.tensor([0.59769, 0.2]), (["0.5977", "0.2"], []), "ok")
    with pytest.raises(AssertionError):
        check_claim(torch.tensor([0.59779, 0.2]), (["0.5977", "0.2"], []), "off in digit 4")
    with pytest.raises(AssertionError):
        check_claim(torch.tensor([1.0, 2.0, 3.0]), (["1", "2"], []), "too many entries")
    check_claim(torch.tensor([1.0, 2.0, 3.0]), (["1"], ["3"]), "… skips")


def test_readme_quick_start_has_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(commands) == 2
    assert "softjac explain 2 1 0.5 -0.5 --plot jacobian.png" in commands[0]
    assert "[test]" in commands[1] and "pytest" in commands[1]


def test_readme_documents_every_environment_variable():
    src = Path(__file__).resolve().parents[1] / "src" / "softjac"
    names = set()
    for path in src.rglob("*.py"):
        # environment variables are whole string literals ("-DSOFTJAC_PART" is a C macro)
        names |= set(re.findall(r"[\"'](SOFTJAC_[A-Z_]+)[\"']", path.read_text(encoding="utf-8")))
    assert names, "no SOFTJAC_* variable found"
    text = README.read_text(encoding="utf-8")
    for name in sorted(names):
        assert f"`{name}`" in text, name


ROOT = README.parent
_SHIPPED = ["src", "tests", "docs", "benchmarks"]


def _shipped_text_files() -> list[Path]:
    files = [README]
    for top in _SHIPPED:
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".c", ".h", ".sh", ".txt", ".toml"):
                files.append(path)
    return files


def test_no_reference_to_files_outside_the_repository_or_to_how_it_was_made():
    # spelt in pieces so that this file does not contain the text it seeks
    outside = "shar" + "ed/"
    making = r"(?i:this " + r"session|previous " + r"session|the " + r"lead\b)"
    pattern = re.compile(  # case-sensitive where it must be: docs/math.md is ours
        outside + r"|ANCHORS\.md|\bMATH\.md|" + making + "|"
        r"(?<!pytorch )(?<!PyTorch )(?<!numpy )(?<!triton )\b(?i:issue) \d"
    )
    offenders = []
    for path in _shipped_text_files():
        if path == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_math_md_sections_that_the_code_points_to_exist():
    headings = set(re.findall(r"^#+ (.+)$", (ROOT / "docs" / "math.md").read_text("utf-8"), re.M))
    pointers = 0
    for path in _shipped_text_files():
        text = path.read_text(encoding="utf-8")
        # ``docs/math.md``, "Spectrum"  /  ``docs/math.md`` ("Closed forms", "Spectrum")
        for m in re.finditer(r"docs/math\.md``?,? \(?((?:\"[^\"]+\"(?:, )?)+)", text):
            for name in re.findall(r"\"([^\"]+)\"", m.group(1)):
                assert name in headings, (path, name)
                pointers += 1
        # ``docs/math.md``, Derivatives
        for m in re.finditer(r"docs/math\.md``, ([A-Z][a-z]+)", text):
            assert m.group(1) in headings, (path, m.group(1))
            pointers += 1
    assert pointers >= 5


def test_license_matches_pyproject():
    # the SPDX expression (PEP 639), the form setuptools >= 77 requires (no tomllib on 3.10)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.findall(r"^license\s*=\s*(.+?)\s*$", pyproject, flags=re.M) == ['"MIT"']
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 softjac developers" in text


def test_docstring_examples_run_as_doctests():
    """The ``>>>`` examples of every module's docstrings (softjac.kernels._triton is left out:
    importing it here would compile its kernels outside Triton's interpreter)."""
    import doctest
    import importlib
    import pkgutil

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    names = ["softjac"] + [
        m.name
        for m in pkgutil.walk_packages(softjac.__path__, prefix="softjac.")
        if m.name != "softjac.kernels._triton" and m.name != "softjac.__main__"
    ]
    attempted = 0
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a tool module whose optional dependency is missing
            continue
        for test in finder.find(module, name):
            report: list[str] = []
            result = runner.run(test, out=report.append)
            assert result.failed == 0, "".join(report)
            attempted += result.attempted
    assert attempted >= 5, attempted
