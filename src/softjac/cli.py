"""Layer 6: the ``softjac`` command.

``softjac explain LOGITS...`` prints σ, the Jacobian J, the property report
(:func:`softjac.check_properties`), the autograd cross-check
(:func:`softjac.compare_with_autograd`) and, on request, the vector-Jacobian product of a
cotangent (:func:`softjac.vjp`), the cross-entropy gradient for a target class, a figure
(:func:`softjac.plotting.jacobian_figure`) or all of it as one JSON document.

Negative numbers work as plain arguments (``softjac explain 2 1 0.5 -0.5``, ``--dim -1``,
``-1e3``, ``-inf``): every argument that reads as a number is taken as a value, never as an
option. Bad input exits with status 2 and one line on stderr, ``softjac: error: ...``.
Uses only softjac's public API.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

import softjac

__all__ = ["main"]

_PROG = "softjac"
_MAX_PRINTED_SLICES = 8
_MAX_PRINTED_K = 16


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`CLIError` instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


# --------------------------------------------------------------------------------------------
# Parsing


def _looks_like_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _protect_negative_numbers(argv: Sequence[str]) -> list[str]:
    """Prefix numeric tokens that start with ``-`` (``-0.5``, ``-1e3``, ``-inf``) with a space,
    so argparse takes them as values; ``float``/``int`` ignore the space."""
    return [
        " " + a if a.startswith("-") and len(a) > 1 and _looks_like_number(a) else a for a in argv
    ]


def _explain_parser() -> _Parser:
    p = _Parser(
        prog=f"{_PROG} explain",
        description=(
            "Explain the softmax Jacobian J = diag(σ) − σσᵀ at the given logits: σ, J, its "
            "verified properties, a cross-check against PyTorch autograd, and optionally a "
            "vector-Jacobian product, the cross-entropy gradient and a figure."
        ),
        epilog=(
            "examples:\n"
            "  softjac explain 2 1 0.5 -0.5\n"
            "  softjac explain 2 1 0.5 -0.5 --grad 1 0 0 0 --target 0 --plot jacobian.png\n"
            "  softjac explain 0 -inf 1 --json\n"
            "  softjac explain --from logits.npy --dim -1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "logits",
        nargs="*",
        metavar="LOGITS",
        help="the logits z (numbers; -inf masks a class)",
    )
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="read the logits from a .npy, .csv/.txt or .pt file (1-D, or 2-D for a batch)",
    )
    p.add_argument("--dim", default="-1", metavar="D", help="class dimension (default -1)")
    p.add_argument(
        "--dtype",
        default="float64",
        metavar="{float32,float64}",
        help="dtype to compute in (default float64)",
    )
    p.add_argument(
        "--temperature", default="1", metavar="T", help="softmax(z / T), T > 0 (default 1)"
    )
    p.add_argument(
        "--grad",
        nargs="+",
        metavar="G",
        help="a cotangent ∂L/∂σ: print the VJP J·G (K values, or one per entry for a batch)",
    )
    p.add_argument(
        "--target",
        nargs="+",
        metavar="C",
        help="a class index: print the cross-entropy gradient σ − onehot(C) (one, or one per row)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--plot", metavar="PATH", help="save a figure (PNG, PDF, SVG, ...) to PATH")
    p.add_argument(
        "--index", default="0", metavar="I", help="which slice of a batch to plot (default 0)"
    )
    return p


def _main_help() -> str:
    return (
        f"usage: {_PROG} [--version] [--help] COMMAND ...\n\n"
        "The Jacobian of softmax, exact and fast.\n\n"
        "commands:\n"
        "  explain LOGITS...   σ, J, its properties and an autograd cross-check at the logits\n"
        "  info [--json]       the backend backend='auto' uses for every op here, and why\n\n"
        f"Run `{_PROG} explain --help` for the options.\n"
    )


# --------------------------------------------------------------------------------------------
# Input conversion


def _parse_float(what: str, token: str) -> float:
    try:
        return float(token.strip())
    except ValueError:
        raise CLIError(f"{what}: {token.strip()!r} is not a number") from None


def _parse_int(what: str, token: str) -> int:
    try:
        return int(token.strip())
    except ValueError:
        raise CLIError(f"{what}: {token.strip()!r} is not an integer") from None


def _read_text_table(path: Path) -> torch.Tensor:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"--from: cannot read {str(path)!r}: {_one_line(exc)}") from None
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f for f in line.replace(",", " ").split() if f]
        row = []
        for f in fields:
            try:
                row.append(float(f))
            except ValueError:
                raise CLIError(
                    f"--from: {str(path)!r} line {lineno}: {f!r} is not a number"
                ) from None
        rows.append(row)
    if not rows:
        raise CLIError(f"--from: {str(path)!r} holds no numbers")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise CLIError(
            f"--from: {str(path)!r} has rows of different lengths {sorted(widths)}; "
            "every row must hold the same number of logits"
        )
    if len(rows) == 1:
        return torch.tensor(rows[0], dtype=torch.float64)
    if widths == {1}:  # one value per line: a single vector written as a column
        return torch.tensor([r[0] for r in rows], dtype=torch.float64)
    return torch.tensor(rows, dtype=torch.float64)


def _read_npy(path: Path) -> torch.Tensor:
    try:
        import numpy as np
    except ImportError:
        raise CLIError("--from: reading .npy files needs numpy: pip install numpy") from None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CLIError(f"--from: cannot read {str(path)!r}: {_one_line(exc)}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise CLIError(f"--from: {str(path)!r} is not a single .npy array")
    if arr.dtype.kind not in "biuf":
        raise CLIError(f"--from: {str(path)!r} holds {arr.dtype} values, not real numbers")
    return torch.from_numpy(arr.astype(np.float64))


_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _read_pt(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files (pickle, zip, OSError)
        raise CLIError(f"--from: cannot read {str(path)!r}: {_one_line(exc)}") from None
    if not isinstance(obj, torch.Tensor):
        raise CLIError(
            f"--from: {str(path)!r} holds a {type(obj).__name__}, not a tensor; save one with "
            "torch.save(logits, path)"
        )
    if obj.is_complex() or not (obj.is_floating_point() or obj.dtype in _INT_DTYPES):
        raise CLIError(f"--from: {str(path)!r} holds a {obj.dtype} tensor, not real numbers")
    return obj.detach().to(torch.float64)


def _read_file(name: str) -> torch.Tensor:
    path = Path(name)
    if not path.exists():
        raise CLIError(f"--from: no such file: {name!r}")
    if path.is_dir():
        raise CLIError(f"--from: {name!r} is a directory, not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        z = _read_npy(path)
    elif suffix in (".csv", ".txt", ".tsv"):
        z = _read_text_table(path)
    elif suffix in (".pt", ".pth"):
        z = _read_pt(path)
    else:
        raise CLIError(
            f"--from: unknown file type {suffix or '(none)'!r} of {name!r}; "
            "use .npy, .csv, .txt or .pt"
        )
    if z.ndim not in (1, 2):
        raise CLIError(
            f"--from: {name!r} holds a {z.ndim}-d array of shape {tuple(z.shape)}; "
            "expected 1-d logits or a 2-d batch"
        )
    if z.numel() == 0:
        raise CLIError(f"--from: {name!r} holds no logits (shape {tuple(z.shape)})")
    return z


def _check_values(z: torch.Tensor, dtype: torch.dtype) -> None:
    """Logits must be finite or −inf (masked), also after the conversion to ``dtype``."""
    flat = z.reshape(-1)
    bad = torch.isnan(flat) | torch.isposinf(flat)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        pos = f"position {i}" if z.ndim == 1 else f"row {i // z.shape[1]}, column {i % z.shape[1]}"
        what = "NaN" if torch.isnan(flat[i]) else "+inf"
        raise CLIError(f"logits must be finite or -inf (masked); got {what} at {pos}")
    if dtype != torch.float64:
        conv = flat.to(dtype)
        over = torch.isinf(conv) & torch.isfinite(flat)
        if over.any():
            i = int(torch.nonzero(over)[0])
            raise CLIError(
                f"logit {float(flat[i])!r} does not fit in {str(dtype).replace('torch.', '')}"
            )


# --------------------------------------------------------------------------------------------
# Formatting


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _num_format(values: list[float]) -> str:
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite or (min(finite) >= 1e-4 and max(finite) < 1e4):
        return "{: .6f}"
    return "{: .4e}"


def _fmt_vector(values: list[float], fmt: str | None = None) -> str:
    fmt = fmt or _num_format(values)
    return "[" + " ".join(fmt.format(v) for v in values) + "]"


def _fmt_matrix(rows: list[list[float]], indent: str = "  ") -> str:
    fmt = _num_format([v for r in rows for v in r])
    lines = []
    for i, r in enumerate(rows):
        open_ = "[[" if i == 0 else " ["
        close = "]]" if i == len(rows) - 1 else "]"
        lines.append(indent + open_ + " ".join(fmt.format(v) for v in r) + close)
    return "\n".join(lines)


def _fmt_logit(v: float) -> str:
    return "-inf" if v == -math.inf else f"{v:g}"


def _jsonable(x: Any) -> Any:
    """Make ``x`` strict JSON: non-finite floats become the strings "-inf", "inf", "nan"."""
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# The explain command


def _cross_entropy_grad_rows(zl: torch.Tensor, target: torch.Tensor, t: float) -> torch.Tensor:
    """∂L/∂z for L = Σ_rows cross_entropy(z / T, target): (σ − onehot) / T, rows (N, K)."""
    return softjac.cross_entropy_grad(zl / t, target, dim=1, reduction="sum") / t


def _explain(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Compute everything; return (the JSON document, the text report)."""
    # --- dtype, temperature
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if args.dtype.strip() not in dtypes:
        raise CLIError(f"--dtype must be float32 or float64; got {args.dtype.strip()!r}")
    dtype = dtypes[args.dtype.strip()]
    t = _parse_float("--temperature", args.temperature)
    if not (math.isfinite(t) and t > 0):
        raise CLIError(f"--temperature must be a finite number > 0; got {args.temperature.strip()}")

    # --- logits
    if args.from_file is not None and args.logits:
        raise CLIError("give the logits either as numbers or with --from FILE, not both")
    if args.from_file is not None:
        z64 = _read_file(args.from_file)
        source = args.from_file
    else:
        if not args.logits:
            raise CLIError(
                "no logits given; pass numbers (softjac explain 2 1 0.5 -0.5) or --from FILE"
            )
        z64 = torch.tensor([_parse_float("LOGITS", a) for a in args.logits], dtype=torch.float64)
        source = "command line"
    _check_values(z64, dtype)
    z = z64.to(dtype)

    # --- dim
    dim = _parse_int("--dim", args.dim)
    if not -z.ndim <= dim < z.ndim:
        valid = "0 or -1" if z.ndim == 1 else "-2, -1, 0 or 1"
        raise CLIError(f"--dim {dim} is out of range for {z.ndim}-d logits (use {valid})")
    d = dim % z.ndim
    k = z.shape[d]
    batched = z.ndim == 2
    n_slices = z.numel() // k
    zl = z.movedim(d, -1).reshape(-1, k)  # rows = slices

    # --- computations
    probs = softjac.softmax(z, d, temperature=t)
    jac = softjac.jacobian(z, d, temperature=t)
    report = softjac.check_properties(z, d, temperature=t)
    comparison = softjac.compare_with_autograd(z, d, temperature=t)
    probs_l = probs.movedim(d, -1).reshape(-1, k)
    jac_l = jac.reshape(-1, k, k)

    doc: dict[str, Any] = {
        "softjac_version": softjac.__version__,
        "input": {
            "source": source,
            "logits": z.tolist(),
            "shape": list(z.shape),
            "dim": d,
            "num_classes": k,
            "num_slices": n_slices,
            "dtype": str(dtype).replace("torch.", ""),
            "temperature": t,
        },
        "softmax": probs.tolist(),
        "jacobian": jac.tolist(),
        "properties": report.to_dict(),
        "autograd": comparison.to_dict(),
    }

    # --- VJP
    vjp_l = None
    if args.grad is not None:
        g = [_parse_float("--grad", a) for a in args.grad]
        if not all(math.isfinite(v) for v in g):
            raise CLIError("--grad values must be finite numbers")
        if len(g) == k:
            v = torch.tensor(g, dtype=dtype)
            shape = [1] * z.ndim
            shape[d] = k
            v = v.reshape(shape).expand(z.shape).contiguous()
        elif batched and len(g) == z.numel():
            v = torch.tensor(g, dtype=dtype).reshape(z.shape)
        else:
            extra = f" or {z.numel()} (one per entry of the batch)" if batched else ""
            raise CLIError(
                f"--grad has {len(g)} value{'' if len(g) == 1 else 's'}; expected K = {k}{extra}"
            )
        out = softjac.vjp(z, v, d, temperature=t)
        vjp_l = (v.movedim(d, -1).reshape(-1, k), out.movedim(d, -1).reshape(-1, k))
        doc["vjp"] = {"grad": v.tolist(), "vjp": out.tolist()}

    # --- cross-entropy gradient
    ce_l = None
    if args.target is not None:
        c = [_parse_int("--target", a) for a in args.target]
        if len(c) == 1:
            c = c * n_slices
        elif len(c) != n_slices:
            raise CLIError(
                f"--target has {len(c)} classes; expected 1 or one per slice ({n_slices})"
            )
        for ci in c:
            if not 0 <= ci < k:
                raise CLIError(f"--target {ci} is out of range; classes are 0 .. {k - 1}")
        tgt = torch.tensor(c, dtype=torch.long)
        masked = torch.isneginf(zl.gather(1, tgt[:, None]).squeeze(1))
        if masked.any():
            r = int(torch.nonzero(masked)[0])
            raise CLIError(
                f"--target {c[r]} is a masked class (logit -inf"
                + (f" in slice {r}" if batched else "")
                + "); its cross-entropy is infinite"
            )
        grad_rows = _cross_entropy_grad_rows(zl, tgt, t)
        loss = -torch.log_softmax(zl.double() / t, dim=1).gather(1, tgt[:, None]).squeeze(1)
        ce_l = (c, grad_rows, loss)
        grad_full = grad_rows.reshape(*[s for i, s in enumerate(z.shape) if i != d], k)
        doc["cross_entropy"] = {
            "target": c if batched else c[0],
            "loss": loss.tolist() if batched else float(loss[0]),
            "grad": grad_full.movedim(-1, d).tolist(),
            "formula": "∂L/∂z = (σ − onehot(target)) / T for each row, L = −log σ_target",
        }

    # --- figure
    if args.plot is not None:
        idx = _parse_int("--index", args.index)
        if not 0 <= idx < n_slices:
            raise CLIError(f"--index {idx} is out of range; slices are 0 .. {n_slices - 1}")
        try:
            from softjac.plotting import jacobian_figure

            if batched:
                fig = jacobian_figure(zl, -1, index=idx, temperature=t)
            else:
                fig = jacobian_figure(zl[0], -1, temperature=t)
        except ImportError as exc:
            raise CLIError(_one_line(exc)) from None
        try:
            fig.savefig(args.plot)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--plot: cannot write {args.plot!r}: {_one_line(exc)}") from None
        doc["plot"] = {"path": args.plot, "slice": idx}

    # --- text
    lines: list[str] = []
    shown = min(n_slices, _MAX_PRINTED_SLICES)
    head = f"softjac {softjac.__version__} explain: "
    if batched:
        head += f"{n_slices} slices of K = {k} (logits of shape {tuple(z.shape)}, dim {d})"
    else:
        head += "z = [" + ", ".join(_fmt_logit(x) for x in zl[0].tolist()) + f"], K = {k}"
    head += f", {str(dtype).replace('torch.', '')}"
    head += "" if t == 1 else f", temperature T = {t:g}"
    lines.append(head)
    sub = "" if t == 1 else " / T"
    for r in range(shown):
        pre = ""
        if batched:
            lines.append("")
            lines.append(
                f"slice {r}: z = [" + ", ".join(_fmt_logit(x) for x in zl[r].tolist()) + "]"
            )
            pre = "  "
        p = probs_l[r].tolist()
        lines.append("")
        lines.append(f"{pre}σ = softmax(z{'' if t == 1 else ' / T'})   (sum {sum(p):.6g})")
        lines.append(pre + "  " + _fmt_vector(p))
        lines.append("")
        if k <= _MAX_PRINTED_K:
            formula = "diag(σ) − σσᵀ" if t == 1 else "(diag(σ) − σσᵀ) / T"
            lines.append(f"{pre}J = {formula}   J_ij = ∂σ_i/∂z_j")
            lines.append(_fmt_matrix(jac_l[r].tolist(), indent=pre + "  "))
        else:
            lines.append(f"{pre}J is {k}×{k}; not printed (K > {_MAX_PRINTED_K}), see --json")
        if vjp_l is not None:
            lines.append("")
            lines.append(f"{pre}VJP  J·g = σ ⊙ (g − ⟨σ, g⟩){sub}  (softjac.vjp) for")
            lines.append(f"{pre}  g   = " + _fmt_vector(vjp_l[0][r].tolist()))
            lines.append(f"{pre}  J·g = " + _fmt_vector(vjp_l[1][r].tolist()))
        if ce_l is not None:
            c, grad_rows, loss = ce_l
            lines.append("")
            lines.append(
                f"{pre}cross-entropy for target class {c[r]}: L = −log σ_{c[r]} = "
                f"{float(loss[r]) + 0.0:.6g}"
            )
            lines.append(
                f"{pre}  ∂L/∂z = (σ − onehot({c[r]})){sub} = " + _fmt_vector(grad_rows[r].tolist())
            )
    if n_slices > shown:
        lines.append("")
        lines.append(f"... {n_slices - shown} more slices not shown (use --json for all)")
    lines.append("")
    lines.append(str(report))
    lines.append("")
    lines.append(str(comparison))
    if "plot" in doc:
        lines.append("")
        lines.append(
            f"figure written to {args.plot}"
            + (f" (slice {doc['plot']['slice']})" if batched else "")
        )
    return doc, "\n".join(lines)


def _run(argv: list[str]) -> int:
    argv = _protect_negative_numbers(argv)
    if not argv:
        raise CLIError(f"missing command; try `{_PROG} explain 2 1 0.5 -0.5` or `{_PROG} --help`")
    first = argv[0]
    if first in ("-h", "--help", "help"):
        print(_main_help(), end="")
        return 0
    if first in ("-V", "--version"):
        print(f"{_PROG} {softjac.__version__}")
        return 0
    if first == "info":
        return _info(argv[1:])
    if first != "explain":
        raise CLIError(f"unknown command {first.strip()!r}; the commands are `explain` and `info`")
    parser = _explain_parser()
    args = parser.parse_intermixed_args(argv[1:])
    doc, text = _explain(args)
    if args.json:
        print(json.dumps(_jsonable(doc), indent=2, ensure_ascii=True, allow_nan=False))
    else:
        _print(text)
    return 0


def _info(argv: list[str]) -> int:
    """``softjac info [--json]``: :func:`softjac.kernels.info` as a table or as JSON."""
    parser = _Parser(
        prog=f"{_PROG} info",
        description="The backend backend='auto' uses for every op on this machine, and why.",
    )
    parser.add_argument("--json", action="store_true", help="print the dict as JSON")
    args = parser.parse_args(argv)
    from softjac.kernels import info  # builds the C kernels on first use

    table = info()
    if args.json:
        print(json.dumps(table, indent=2, ensure_ascii=True))
        return 0
    lines = [f"torch {torch.__version__}; backend='auto' picks, per op and input:"]
    for op, cases in table.items():
        lines.append(f"  {op}")
        for case, choice in cases.items():
            lines.append(f"    {case:<14} {choice['backend']:<7} {choice['reason']}")
    _print("\n".join(lines))
    return 0


def _print(text: str) -> None:
    """Print, replacing characters (σ, ᵀ, …) that a non-UTF-8 terminal cannot show."""
    try:
        print(text)
    except UnicodeEncodeError:
        enc = getattr(sys.stdout, "encoding", None) or "ascii"
        print(text.encode(enc, errors="replace").decode(enc))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``softjac`` command line; return the exit status.

    Args:
        argv: the arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 for bad input (one line ``softjac: error: ...`` on stderr), 1 for an
        unexpected internal error (also one line).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except CLIError as exc:
        print(f"{_PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse's --help
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # e.g. `softjac explain ... | head`
        return 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError) as exc:  # a softjac function refused the input
        print(f"{_PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback on the command line
        print(
            f"{_PROG}: error: internal error ({type(exc).__name__}: {_one_line(exc)}); "
            "please report it",
            file=sys.stderr,
        )
        return 1
