"""Tests of the ``softjac`` command line (in process through ``main``, once as a subprocess)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softjac
from softjac.cli import MAX_FILE_BYTES, MAX_JACOBIAN_ENTRIES, MAX_K, main

TUTORIAL = ["2", "1", "0.5", "-0.5"]


def ref_probs(z: list[float], temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(torch.tensor(z, dtype=torch.float64) / temperature, dim=-1)


def ref_jacobian(z: list[float], temperature: float = 1.0) -> torch.Tensor:
    p = ref_probs(z, temperature)
    return (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / temperature


def run_json(capsys, *argv: str) -> dict:
    rc = main(["explain", *argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return json.loads(out)  # the whole of stdout is one JSON document


def run_error(capsys, *argv: str) -> str:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("softjac: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# text output


def test_explain_tutorial_text(capsys):
    assert main(["explain", *TUTORIAL]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    z = [2.0, 1.0, 0.5, -0.5]
    p, J = ref_probs(z), ref_jacobian(z)
    assert "z = [2, 1, 0.5, -0.5], K = 4, float64" in out
    assert " ".join(f"{v: .6f}" for v in p.tolist()) in out
    for row in J.tolist():
        assert " ".join(f"{v: .6f}" for v in row) in out
    assert "softmax Jacobian properties: PASSED (8/8)" in out
    assert "λ_max = 0.3521" in out
    assert "torch.func.jacrev" in out and "central finite differences" in out
    assert "VJP" not in out and "cross-entropy" not in out


def test_text_with_grad_target_and_temperature(capsys):
    argv = ["explain", *TUTORIAL, "--grad", "1", "0", "0", "0", "--target", "0"]
    assert main([*argv, "--temperature", "2"]) == 0
    out, _ = capsys.readouterr()
    assert "temperature T = 2" in out
    assert "J·g = σ ⊙ (g − ⟨σ, g⟩) / T" in out
    assert "cross-entropy for target class 0" in out
    assert "λ_max ≤ 1/(2T) = 0.25" in out


def test_batch_text_shows_slices_and_worst(capsys, tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("0, 1, 2\n3, -inf, 0\n")
    assert main(["explain", "--from", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "2 slices of K = 3" in out
    assert "slice 0: z = [0, 1, 2]" in out and "slice 1: z = [3, -inf, 0]" in out
    assert "2 slices, worst shown" in out


def test_many_slices_and_large_k_are_summarised(capsys, tmp_path):
    z = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    torch.save(z, tmp_path / "z.pt")
    assert main(["explain", "--from", str(tmp_path / "z.pt")]) == 0
    out, _ = capsys.readouterr()
    assert "J is 20×20; not printed" in out
    assert "slice 7: z" in out and "slice 8: z" not in out
    assert "... 4 more slices not shown (use --json for all)" in out
    assert "PASSED (8/8) - K = 20, 12 slices" in out


# ---------------------------------------------------------------------------------------------
# negative numbers and the options in JSON


@pytest.mark.parametrize(
    ("argv", "logits"),
    [
        (["2", "1", "0.5", "-0.5"], [2.0, 1.0, 0.5, -0.5]),
        (["-1e3", "0", "-1"], [-1000.0, 0.0, -1.0]),
        (["-.5", "-inf", "3"], [-0.5, -math.inf, 3.0]),
        (["-2", "--dim", "-1", "-3"], [-2.0, -3.0]),
        (["--dim=-1", "-2", "1E-3"], [-2.0, 0.001]),
    ],
)
def test_negative_numbers(capsys, argv, logits):
    doc = run_json(capsys, *argv)
    got = [(-math.inf if v == "-inf" else v) for v in doc["input"]["logits"]]
    assert got == logits
    assert doc["input"]["dim"] == 0


def test_json_document(capsys):
    doc = run_json(capsys, *TUTORIAL)
    z = [2.0, 1.0, 0.5, -0.5]
    assert doc["softjac_version"] == softjac.__version__
    torch.testing.assert_close(torch.tensor(doc["softmax"], dtype=torch.float64), ref_probs(z))
    torch.testing.assert_close(
        torch.tensor(doc["jacobian"], dtype=torch.float64), ref_jacobian(z), rtol=0, atol=1e-15
    )
    assert doc["properties"]["passed"] is True
    assert len(doc["properties"]["properties"]) == 8
    assert {d["method"] for d in doc["autograd"]["differences"]} == {
        "torch.func.jacrev",
        "torch.autograd.functional.jacobian",
        "central finite differences",
    }
    assert "vjp" not in doc and "cross_entropy" not in doc and "plot" not in doc


def test_json_masked_logit_is_a_string(capsys):
    doc = run_json(capsys, "0", "-inf", "1")
    assert doc["input"]["logits"] == [0.0, "-inf", 1.0]
    assert doc["softmax"][1] == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype(capsys, dtype):
    doc = run_json(capsys, *TUTORIAL, "--dtype", dtype)
    assert doc["input"]["dtype"] == dtype
    assert doc["properties"]["dtype"] == dtype
    atol = 1e-7 if dtype == "float32" else 1e-15
    torch.testing.assert_close(
        torch.tensor(doc["jacobian"], dtype=torch.float64),
        ref_jacobian([2.0, 1.0, 0.5, -0.5]),
        rtol=0,
        atol=atol,
    )


def test_temperature(capsys):
    doc = run_json(capsys, *TUTORIAL, "--temperature", "0.5")
    torch.testing.assert_close(
        torch.tensor(doc["jacobian"], dtype=torch.float64),
        ref_jacobian([2.0, 1.0, 0.5, -0.5], 0.5),
        rtol=0,
        atol=1e-15,
    )
    assert doc["input"]["temperature"] == 0.5


def test_grad_is_the_vjp(capsys):
    doc = run_json(capsys, *TUTORIAL, "--grad", "1", "-2", "0.5", "3")
    z = [2.0, 1.0, 0.5, -0.5]
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    expected = ref_jacobian(z) @ g
    torch.testing.assert_close(torch.tensor(doc["vjp"]["vjp"], dtype=torch.float64), expected)
    # independent: autograd through torch.softmax
    x = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    (torch.softmax(x, -1) @ g).backward()
    torch.testing.assert_close(torch.tensor(doc["vjp"]["vjp"], dtype=torch.float64), x.grad)


def test_grad_on_a_batch(capsys, tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("0 1 2\n3 4 -1\n")
    zs = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, -1.0]], dtype=torch.float64)
    doc = run_json(capsys, "--from", str(path), "--grad", "1", "0", "0")
    g = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    expected = torch.stack([ref_jacobian(r.tolist()) @ g for r in zs])
    torch.testing.assert_close(torch.tensor(doc["vjp"]["vjp"], dtype=torch.float64), expected)
    doc = run_json(capsys, "--from", str(path), "--grad", "1", "0", "0", "0", "1", "0")
    expected = torch.stack(
        [ref_jacobian(zs[0].tolist()) @ g, ref_jacobian(zs[1].tolist()) @ g.roll(1)]
    )
    torch.testing.assert_close(torch.tensor(doc["vjp"]["vjp"], dtype=torch.float64), expected)


def test_target_is_the_cross_entropy_gradient(capsys):
    doc = run_json(capsys, *TUTORIAL, "--target", "2", "--temperature", "2")
    x = torch.tensor([2.0, 1.0, 0.5, -0.5], dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(x / 2, torch.tensor(2))
    loss.backward()
    ce = doc["cross_entropy"]
    assert ce["target"] == 2
    assert ce["loss"] == pytest.approx(loss.item(), rel=1e-14)
    torch.testing.assert_close(torch.tensor(ce["grad"], dtype=torch.float64), x.grad)


def test_target_per_slice_with_dim0(capsys, tmp_path):
    path = tmp_path / "b.txt"
    path.write_text("# a batch, classes down the columns\n1 0\n2 5\n3 1\n")
    doc = run_json(capsys, "--from", str(path), "--dim", "0", "--target", "2", "0")
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]], dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(x, torch.tensor([2, 0]), reduction="sum").backward()
    grad = torch.tensor(doc["cross_entropy"]["grad"], dtype=torch.float64)  # shape (3, 2)
    torch.testing.assert_close(grad.t(), x.grad)
    assert doc["input"]["num_slices"] == 2 and doc["input"]["num_classes"] == 3


# ---------------------------------------------------------------------------------------------
# --plot, --from


def test_plot_writes_a_png(capsys, tmp_path):
    path = tmp_path / "jacobian.png"
    assert main(["explain", *TUTORIAL, "--plot", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert f"figure written to {path}" in out
    assert path.read_bytes()[:4] == b"\x89PNG"
    path2 = tmp_path / "j.svg"
    doc = run_json(capsys, "--from", _write_csv(tmp_path), "--plot", str(path2), "--index", "1")
    assert doc["plot"] == {"path": str(path2), "slice": 1}
    assert path2.read_text().lstrip().startswith("<?xml")


def _write_csv(tmp_path) -> str:
    path = tmp_path / "batch.csv"
    path.write_text("0,1,2\n2,1,0\n")
    return str(path)


def test_from_npy_csv_txt_pt(capsys, tmp_path):
    np = pytest.importorskip("numpy")
    rows = [[0.5, -1.0, 2.0], [3.0, 0.0, -math.inf]]
    np.save(tmp_path / "z.npy", np.array(rows))
    torch.save(torch.tensor(rows), tmp_path / "z.pt")
    (tmp_path / "z.csv").write_text("0.5,-1,2\n3,0,-inf\n")
    (tmp_path / "col.txt").write_text("0.5\n-1\n2\n")
    (tmp_path / "row.txt").write_text("0.5 -1 2\n")
    (tmp_path / "i.npy").write_bytes(b"")
    np.save(tmp_path / "i.npy", np.array([1, 2, 3], dtype=np.int64))
    for name in ("z.npy", "z.pt", "z.csv"):
        doc = run_json(capsys, "--from", str(tmp_path / name))
        assert doc["input"]["shape"] == [2, 3], name
        assert doc["input"]["logits"] == [[0.5, -1.0, 2.0], [3.0, 0.0, "-inf"]], name
        assert doc["properties"]["num_slices"] == 2
    for name in ("col.txt", "row.txt"):
        doc = run_json(capsys, "--from", str(tmp_path / name))
        assert doc["input"]["logits"] == [0.5, -1.0, 2.0], name
    assert run_json(capsys, "--from", str(tmp_path / "i.npy"))["input"]["logits"] == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------------------------
# version, help, argv=None


def test_version_help_and_sys_argv(capsys, monkeypatch):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"softjac {softjac.__version__}"
    assert main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--dim", "--dtype", "--temperature", "--grad", "--target", "--json", "--plot"):
        assert opt in out
    monkeypatch.setattr(sys, "argv", ["softjac", "explain", "0", "0", "--json"])
    assert main() == 0
    assert json.loads(capsys.readouterr().out)["softmax"] == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# bad input: status 2, one line on stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "missing command"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["explain"], "no logits given"),
        (["explain", "1", "abc"], "LOGITS: 'abc' is not a number"),
        (["explain", "1", "nan"], "got NaN at position 1"),
        (["explain", "inf", "1"], "got +inf at position 0"),
        (["explain", "1", "+inf"], "got +inf at position 1"),
        (["explain", "1", "2", "--dim", "1"], "--dim 1 is out of range for 1-d logits"),
        (["explain", "1", "2", "--dim", "-2"], "--dim -2 is out of range"),
        (["explain", "1", "2", "--dim", "x"], "--dim: 'x' is not an integer"),
        (["explain", "1", "2", "--target", "2"], "--target 2 is out of range; classes are 0 .. 1"),
        (["explain", "1", "2", "--target", "-1"], "--target -1 is out of range"),
        (["explain", "1", "2", "--target", "0.5"], "--target: '0.5' is not an integer"),
        (["explain", "1", "2", "--target", "0", "1"], "--target has 2 classes; expected 1"),
        (["explain", "0", "-inf", "--target", "1"], "--target 1 is a masked class"),
        (["explain", "1", "2", "--grad", "1"], "--grad has 1 value; expected K = 2"),
        (["explain", "1", "2", "--grad", "1", "2", "3"], "--grad has 3 values; expected K = 2"),
        (["explain", "1", "2", "--grad", "1", "nan"], "--grad values must be finite"),
        (["explain", "1", "2", "--grad", "1", "b"], "--grad: 'b' is not a number"),
        (["explain", "1", "2", "--temperature", "0"], "--temperature must be a finite number > 0"),
        (["explain", "1", "2", "--temperature", "-1"], "--temperature must be a finite number"),
        (["explain", "1", "2", "--temperature", "inf"], "--temperature must be a finite number"),
        (["explain", "1", "2", "--temperature", "x"], "--temperature: 'x' is not a number"),
        (["explain", "1", "2", "--dtype", "float16"], "--dtype must be float32 or float64"),
        (["explain", "1e40", "2", "--dtype", "float32"], "does not fit in float32"),
        (["explain", "1", "2", "--bogus"], "unrecognized arguments: --bogus"),
        (["explain", "1", "2", "--index", "1", "--plot", "x.png"], "--index 1 is out of range"),
        (["explain", "--from"], "expected one argument"),
        (["explain", "--from", "/no/such/file.npy"], "--from: no such file"),
    ],
)
def test_bad_input(capsys, argv, message):
    line = run_error(capsys, *argv)
    assert message in line, line


def test_bad_files(capsys, tmp_path):
    np = pytest.importorskip("numpy")
    (tmp_path / "garbage.npy").write_bytes(b"not an npy file at all")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.save({"logits": torch.zeros(3)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(3, dtype=torch.complex64), tmp_path / "complex.pt")
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    np.save(tmp_path / "empty.npy", np.zeros((0,)))
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    (tmp_path / "word.csv").write_text("1,2\n3,x\n")
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    (tmp_path / "nan.csv").write_text("1, nan, 2\n")
    (tmp_path / "z.json").write_text("[1, 2]")
    (tmp_path / "latin1.txt").write_bytes(b"\xff\xfe1,2")
    cases = {
        "garbage.npy": "cannot read",
        "garbage.pt": "cannot read",
        "dict.pt": "holds a dict, not a tensor",
        "complex.pt": "not real numbers",
        "obj.npy": "holds object values, not real numbers",
        "cube.npy": "holds a 3-d array",
        "empty.npy": "holds no logits",
        "str.npy": "not real numbers",
        "ragged.csv": "rows of different lengths",
        "word.csv": "line 2: 'x' is not a number",
        "blank.txt": "holds no numbers",
        "nan.csv": "got NaN at position 1",
        "z.json": "unknown file type '.json'",
        "latin1.txt": "cannot read",
        ".": "is a directory",
    }
    for name, message in cases.items():
        line = run_error(capsys, "explain", "--from", str(tmp_path / name))
        assert message in line, (name, line)
    line = run_error(capsys, "explain", "1", "--from", str(tmp_path / "z.json"))
    assert "not both" in line


def test_missing_numpy_and_matplotlib(capsys, tmp_path, monkeypatch):
    (tmp_path / "z.npy").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "numpy", None)
    line = run_error(capsys, "explain", "--from", str(tmp_path / "z.npy"))
    assert "reading .npy files needs numpy" in line
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    line = run_error(capsys, "explain", "1", "2", "--plot", str(tmp_path / "x.png"))
    assert "needs matplotlib: pip install 'softjac[plot]'" in line


def test_plot_errors(capsys, tmp_path):
    line = run_error(capsys, "explain", "1", "2", "--plot", str(tmp_path / "no" / "x.png"))
    assert "--plot: cannot write" in line
    line = run_error(capsys, "explain", "1", "2", "--plot", str(tmp_path / "x.unknownformat"))
    assert "--plot: cannot write" in line


# ---------------------------------------------------------------------------------------------
# hostile --from files: refused with status 2 and one line, before anything large is read


def _npy_bytes(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy file written by hand, so that its header can lie."""
    head = header.encode("latin1")
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    size = struct.pack("<H", len(head)) if version[0] == 1 else struct.pack("<I", len(head))
    return b"\x93NUMPY" + bytes(version) + size + head + data


def test_npy_writer_matches_numpy(tmp_path):
    np = pytest.importorskip("numpy")
    data = np.arange(6, dtype="<f8")
    raw = _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", data.tobytes())
    (tmp_path / "z.npy").write_bytes(raw)
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), data.reshape(2, 3))


def test_from_fifo_does_not_hang(capsys, tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "z.csv"
    os.mkfifo(fifo)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(["explain", "--from", str(fifo)])))
    thread.daemon = True
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "w") as f:
            f.write("1 2\n")
        pytest.fail("softjac explain --from FIFO blocked")
    assert result == [2]
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "is a FIFO (named pipe); only regular files are read" in err


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null"])
def test_from_symlink_to_a_device(capsys, tmp_path, target):
    if not os.path.exists(target):
        pytest.skip(f"no {target}")
    link = tmp_path / "z.npy"
    link.symlink_to(target)
    line = run_error(capsys, "explain", "--from", str(link))
    assert "is a character device; only regular files are read" in line
    line = run_error(capsys, "explain", "--from", target)
    assert "is a character device" in line


def test_from_symlink_to_a_regular_file_is_followed(capsys, tmp_path):
    (tmp_path / "real.csv").write_text("0 1\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    assert run_json(capsys, "--from", str(tmp_path / "link.csv"))["input"]["logits"] == [0.0, 1.0]


def test_from_huge_file(capsys, tmp_path):
    path = tmp_path / "huge.csv"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: takes no disk space
    line = run_error(capsys, "explain", "--from", str(path))
    assert f"is too large ({MAX_FILE_BYTES + 1} bytes); the limit is {MAX_FILE_BYTES}" in line
    assert "(16 MiB)" in line


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # a shape whose data would be 8 TiB; the file holds 16 bytes
        (
            _npy_bytes(
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }", b"0" * 16
            ),
            "holds 1099511627776 values",
        ),
        # a small shape whose data is not all there
        (
            _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }", b"0" * 16),
            "announces 32 bytes of data for shape (4,) and float64, but 16 follow",
        ),
        # pickled objects
        (
            _npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", b"\x80" * 16),
            "holds object values, not real numbers",
        ),
        # structured and sub-array dtypes
        (
            _npy_bytes("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,), }"),
            "not real numbers",
        ),
        (
            _npy_bytes("{'descr': ('<f8', (3,)), 'fortran_order': False, 'shape': (1,), }"),
            "not real numbers",
        ),
        # code instead of a header dictionary
        (_npy_bytes("__import__('os').system('false')"), "not a valid .npy file"),
        # negative and non-integer dimensions
        (
            _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }"),
            "not a valid .npy file",
        ),
        (
            _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1.5,), }"),
            "not a valid .npy file",
        ),
        # a header length of 4 GiB - 1 in a 2.0 file
        (b"\x93NUMPY\x02\x00\xff\xff\xff\xff{'descr'", "not a valid .npy file"),
        # a version numpy has never written
        (_npy_bytes("{}", version=(9, 0)), "format version 9.0; versions 1.0 and 2.0 are read"),
        (
            _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", version=(3, 0)),
            "format version 3.0",
        ),
        # truncated right after the magic
        (b"\x93NUMPY\x01", "not a valid .npy file"),
        # 3-d and 0-d arrays
        (
            _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1, 1), }", b"0" * 8),
            "holds a 3-d array",
        ),
        (
            _npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", b"0" * 8),
            "holds a 0-d array",
        ),
    ],
)
def test_from_hostile_npy_header(capsys, tmp_path, raw, message):
    pytest.importorskip("numpy")
    (tmp_path / "z.npy").write_bytes(raw)
    line = run_error(capsys, "explain", "--from", str(tmp_path / "z.npy"))
    assert message in line, line


def test_from_npy_fortran_order_and_byte_order(capsys, tmp_path):
    np = pytest.importorskip("numpy")
    rows = [[0.5, -1.0, 2.0], [3.0, 0.0, 1.0]]
    np.save(tmp_path / "f.npy", np.asfortranarray(np.array(rows, dtype=">f4")))
    assert run_json(capsys, "--from", str(tmp_path / "f.npy"))["input"]["logits"] == rows


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # quantized tensors are deprecated
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8)


def _sparse_csr() -> torch.Tensor:
    with warnings.catch_warnings():  # sparse CSR is in beta
        warnings.simplefilter("ignore")
        return torch.tensor([[0.0, 1.0], [2.0, 0.0]]).to_sparse_csr()


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():  # nested tensors are a prototype
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.tensor([[0.0, 1.0], [2.0, 0.0]]).to_sparse(), "layout torch.sparse_coo"),
        (_sparse_csr, "layout torch.sparse_csr"),
        (lambda: torch.zeros(3, device="meta"), "on the meta device"),
        (_quantized, "torch.qint8 tensor, not real numbers"),
        (_nested, "a nested tensor"),
        (lambda: torch.zeros(3, dtype=torch.complex128), "not real numbers"),
        # one stored value, 2**25 values described through a zero stride
        (lambda: torch.zeros(1).expand(2**25), "holds 33554432 values"),
        (lambda: torch.zeros(1).expand(2, 2, 2), "holds a 3-d array"),
        (lambda: [torch.zeros(3)], "holds a list, not a tensor"),
    ],
)
def test_from_hostile_pt(capsys, tmp_path, make, message):
    torch.save(make(), tmp_path / "z.pt")
    assert os.path.getsize(tmp_path / "z.pt") < 10_000
    line = run_error(capsys, "explain", "--from", str(tmp_path / "z.pt"))
    assert message in line, line


def test_too_many_classes_or_entries(capsys, tmp_path):
    (tmp_path / "wide.csv").write_text(" ".join(["0.5"] * 20000) + "\n")
    line = run_error(capsys, "explain", "--from", str(tmp_path / "wide.csv"))
    assert f"K = 20000 classes along dim 0 is more than the command handles ({MAX_K})" in line
    # one more than the limit on the command line, and down the columns of a batch
    line = run_error(capsys, "explain", *["0"] * (MAX_K + 1))
    assert f"K = {MAX_K + 1} classes" in line
    torch.save(torch.zeros(MAX_K + 1, 2), tmp_path / "tall.pt")
    line = run_error(capsys, "explain", "--from", str(tmp_path / "tall.pt"), "--dim", "0")
    assert f"K = {MAX_K + 1} classes along dim 0" in line
    # many slices of a moderate K: fine one by one, too many Jacobian entries together
    n = MAX_JACOBIAN_ENTRIES // 1024**2 + 1
    torch.save(torch.zeros(n, 1024), tmp_path / "batch.pt")
    line = run_error(capsys, "explain", "--from", str(tmp_path / "batch.pt"))
    assert f"{n} slices of K = 1024 make {n * 1024**2} Jacobian entries" in line


# ---------------------------------------------------------------------------------------------
# the one subprocess test: `python -m softjac` as a user runs it


def test_python_dash_m_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "softjac", "explain", "2", "1", "0.5", "-0.5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PASSED (8/8)" in proc.stdout
    assert "λ_max = 0.3521" in proc.stdout
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# any logits written the way Python prints them come back exactly


@settings(max_examples=25)
@given(
    st.lists(
        st.one_of(
            st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
            st.just(-math.inf),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_any_printed_logits_round_trip(values):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["explain", *[repr(v) for v in values], "--json"])
    assert rc == 0, err.getvalue()
    got = json.loads(out.getvalue())["input"]["logits"]
    assert [(-math.inf if v == "-inf" else v) for v in got] == values
