"""Layer 6: figures of the softmax Jacobian (needs matplotlib: ``pip install 'softjac[plot]'``).

:func:`jacobian_figure` draws the tutorial's three panels — J as a heatmap on a diverging colour
scale symmetric about 0, the diagonal ``σ_i (1 − σ_i)``, the probabilities — and a fourth one
the tutorial lacks: the eigenvalues of J against the tight bound ``λ_max ≤ 1/2``, drawn on one
number line with the sorted σ so that their interlacing ``σ_(k−1) ≤ λ_k ≤ σ_(k)`` is visible.

matplotlib is imported only when a figure is made, and only through ``matplotlib.figure.Figure``
(no pyplot, no global state, never ``show()``); save the result with ``fig.savefig(path)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from softjac._checks import check_logits, check_mask, check_temperature, fmt_shape
from softjac._functional import jacobian, softmax

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["jacobian_figure"]

_FN = "softjac.plotting.jacobian_figure"


def _import_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
        raise ImportError(f"`{_FN}` needs matplotlib: pip install 'softjac[plot]'") from exc
    return Figure


def _select_slice(
    logits: torch.Tensor, dim: int, index: int | tuple[int, ...] | None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The 1-D slice of ``logits`` (class dim ``dim``) at batch position ``index``."""
    d = check_logits(_FN, logits, dim)
    z = logits.detach().movedim(d, -1)
    batch = tuple(z.shape[:-1])
    n = 1
    for s in batch:
        n *= s
    if index is None:
        if n != 1:
            raise ValueError(
                f"`{_FN}`: `logits` of shape {fmt_shape(logits.shape)} hold {n} vectors along "
                f"dim {d}; pass `index` to choose one (a batch index of shape {fmt_shape(batch)})."
            )
        idx: tuple[int, ...] = (0,) * len(batch)
    else:
        idx = (index,) if isinstance(index, int) else tuple(index)
        if (
            any(isinstance(i, bool) or not isinstance(i, int) for i in idx)
            or len(idx) != len(batch)
            or not all(-s <= i < s for i, s in zip(idx, batch, strict=True))
        ):
            raise ValueError(
                f"`{_FN}`: `index` must be a valid index into the batch shape {fmt_shape(batch)}"
                f" (the shape of `logits` without dim {d}). Got {index!r}."
            )
        idx = tuple(i % s for i, s in zip(idx, batch, strict=True))
    return z[idx], idx


def jacobian_figure(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    index: int | tuple[int, ...] | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    labels: list[str] | None = None,
    annotate: bool | None = None,
    cmap: str = "RdBu_r",
    title: str | None = None,
    figsize: tuple[float, float] = (11.0, 8.5),
    dpi: float = 110,
) -> Figure:
    """A four-panel figure of the softmax Jacobian ``J = (diag(σ) − σσᵀ) / T`` at one vector.

    Panels: (a) J as a heatmap, diverging colour map with ``vmin = −vmax`` so that 0 is the
    neutral colour; (b) the diagonal ``σ_i (1 − σ_i) / T`` as bars with the largest possible
    entry 1/(4T) marked; (c) the probabilities σ as bars; (d) the eigenvalues of J (dense
    float64 ``eigvalsh``, independent of softjac's spectral code) and the sorted ``σ / T`` on one
    axis, with the tight bound ``1/(2T)`` dashed and the tutorial's wrong bound ``1/(4T)``
    dotted — every eigenvalue lies between two consecutive σ's (interlacing).

    Args:
        logits: floating tensor; ``dim`` holds the K classes. ``-inf`` entries are masked.
        dim: the class dimension.
        index: which vector to draw when ``logits`` holds several (a batch index: an int for
            one batch dimension or a tuple); may be omitted when there is exactly one.
        mask: optional boolean mask broadcastable to ``logits`` (True = keep).
        temperature: T > 0.
        labels: optional class names (K strings) for the axes.
        annotate: write the value in each heatmap cell; default when K ≤ 8.
        cmap: a diverging matplotlib colour map name.
        title: figure title; by default the logits and the temperature.
        figsize, dpi: passed to ``matplotlib.figure.Figure``.

    Returns:
        A ``matplotlib.figure.Figure`` (not attached to pyplot; nothing is shown). Its four axes
        are ``fig.axes[:4]`` in the order above; the colour bar is ``fig.axes[4]``.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    Figure = _import_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if mask is not None:
        dim = check_logits(_FN, logits, dim)
        mask = check_mask(_FN, mask, logits.shape, logits.device)
        logits = logits.masked_fill(~mask, float("-inf"))
    z, idx = _select_slice(logits, dim, index)
    k = z.shape[-1]
    sigma = softmax(z, -1, temperature=temperature).double().cpu()
    J = jacobian(z, -1, temperature=temperature).double().cpu()
    t = check_temperature(_FN, temperature)
    lam = torch.linalg.eigvalsh(J)
    masked = torch.isneginf(z.double().cpu())
    if labels is not None and len(labels) != k:
        raise ValueError(f"`{_FN}`: `labels` must have K = {k} entries. Got {len(labels)}.")
    half = "1/2" if t == 1 else "1/(2T)"
    quarter_txt = "1/4" if t == 1 else "1/(4T)"
    names = list(labels) if labels is not None else [str(i) for i in range(k)]
    if annotate is None:
        annotate = k <= 8

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    gs = fig.add_gridspec(2, 2)
    ax_j = fig.add_subplot(gs[0, 0])
    ax_d = fig.add_subplot(gs[0, 1])
    ax_p = fig.add_subplot(gs[1, 0])
    ax_e = fig.add_subplot(gs[1, 1])
    ticks = list(range(k))
    tick_step = max(1, -(-k // 12))
    small_ticks = ticks[::tick_step]

    # (a) heatmap, symmetric colour scale
    vmax = float(J.abs().max())
    if vmax == 0:
        vmax = 1.0 / (4 * t)
    im = ax_j.imshow(J.numpy(), cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax_j, shrink=0.9)
    cb.set_label("∂σ_i / ∂z_j")
    ax_j.set_title("(a) Jacobian  J = diag(σ) − σσᵀ" + ("" if t == 1 else "  (÷T)"))
    ax_j.set_xlabel("input logit j")
    ax_j.set_ylabel("output probability i")
    ax_j.set_xticks(small_ticks, [names[i] for i in small_ticks])
    ax_j.set_yticks(small_ticks, [names[i] for i in small_ticks])
    if annotate:
        for i in range(k):
            for j in range(k):
                v = float(J[i, j])
                ax_j.text(
                    j,
                    i,
                    f"{v:.3f}" if abs(v) >= 5e-4 or v == 0 else f"{v:.0e}",
                    ha="center",
                    va="center",
                    fontsize=8 if k <= 6 else 7,
                    color="white" if abs(v) > 0.6 * vmax else "black",
                )

    # (b) diagonal
    diag = J.diagonal()
    colors = ["#bbbbbb" if masked[i] else "#3b75af" for i in range(k)]
    ax_d.bar(ticks, diag.numpy(), color=colors, edgecolor="black", linewidth=0.4)
    quarter = 1.0 / (4 * t)
    ax_d.axhline(quarter, color="#888888", linestyle=":", linewidth=1)
    ax_d.text(
        k - 0.5,
        quarter,
        f"largest possible entry {quarter_txt}",
        ha="right",
        va="bottom",
        fontsize=8,
        color="#555555",
    )
    ax_d.set_ylim(0, quarter * 1.15)
    ax_d.set_title("(b) diagonal  J_ii = σ_i(1 − σ_i)" + ("" if t == 1 else " / T"))
    ax_d.set_xlabel("class i")
    ax_d.set_ylabel("J_ii")
    ax_d.set_xticks(small_ticks, [names[i] for i in small_ticks])

    # (c) probabilities
    colors = ["#bbbbbb" if masked[i] else "#e07b39" for i in range(k)]
    ax_p.bar(ticks, sigma.numpy(), color=colors, edgecolor="black", linewidth=0.4)
    for i in range(k):
        if masked[i]:
            ax_p.text(i, 0.02, "masked", rotation=90, ha="center", va="bottom", fontsize=8)
        elif k <= 12:
            ax_p.text(
                i,
                float(sigma[i]) + 0.015,
                f"{float(sigma[i]):.3f}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax_p.set_ylim(0, min(1.1, max(0.1, float(sigma.max()) * 1.2)))
    ax_p.set_title("(c) probabilities  σ = softmax(z" + ("" if t == 1 else "/T") + ")")
    ax_p.set_xlabel("class i")
    ax_p.set_ylabel("σ_i")
    ax_p.set_xticks(small_ticks, [names[i] for i in small_ticks])

    # (d) eigenvalues against the bound, interlacing with sorted σ/T: the bands between
    # consecutive sorted σ's (starting at 0) each hold exactly one eigenvalue.
    s_sorted = torch.sort(sigma / t).values
    bound = 0.5 / t
    edges = [0.0, *s_sorted.tolist()]
    for b in range(k):
        ax_e.axvspan(
            edges[b], edges[b + 1], color="#f3d9c6" if b % 2 else "#dde7f1", alpha=0.8, lw=0
        )
    ax_e.scatter(
        s_sorted.numpy(),
        [1.0] * k,
        marker="o",
        s=46,
        color="#e07b39",
        edgecolor="black",
        linewidth=0.5,
        zorder=3,
    )
    ax_e.scatter(
        lam.numpy(),
        [0.0] * k,
        marker="D",
        s=40,
        color="#3b75af",
        edgecolor="black",
        linewidth=0.5,
        zorder=3,
    )
    ax_e.axvline(bound, color="#c0392b", linestyle="--", linewidth=1.5)
    ax_e.axvline(bound / 2, color="#888888", linestyle=":", linewidth=1.2)
    ax_e.set_yticks([0, 1], ["eigenvalues λ", "sorted σ" + ("" if t == 1 else "/T")])
    ax_e.set_ylim(-0.6, 1.6)
    xmax = max(bound, float(s_sorted.max()) if k else 0.0) * 1.08
    ax_e.set_xlim(-0.03 * xmax, xmax)
    lam_max = float(lam.max()) if k else 0.0
    ax_e.annotate(
        f"λ_max = {lam_max:.4g}",
        (lam_max, 0.0),
        xytext=(0, -16),
        textcoords="offset points",
        ha="center",
        va="top",
        fontsize=8,
    )
    ax_e.set_title("(d) eigenvalues of J and the tight bound " + half)
    ax_e.set_xlabel("value")
    legend = [
        Line2D([], [], color="#c0392b", linestyle="--", label=f"tight bound λ_max ≤ {half}"),
        Line2D([], [], color="#888888", linestyle=":", label=f"tutorial's {quarter_txt} (wrong)"),
        Patch(facecolor="#dde7f1", edgecolor="#f3d9c6", lw=3, label="one λ per band of sorted σ's"),
    ]
    ax_e.legend(handles=legend, loc="upper right", fontsize=8, framealpha=0.95)

    if title is None:
        zs = ", ".join("-inf" if torch.isneginf(x) else f"{float(x):.4g}" for x in z[:10])
        zs += ", …" if k > 10 else ""
        where = f"  (slice {idx[0] if len(idx) == 1 else idx})" if idx else ""
        title = f"softmax Jacobian at z = [{zs}]{where}" + ("" if t == 1 else f", T = {t:g}")
    fig.suptitle(title, fontsize=12)
    return fig
