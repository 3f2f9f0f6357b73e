"""Tests of ``softjac.plotting.jacobian_figure`` (Agg backend, no display)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import numpy as np  # noqa: E402

from softjac.plotting import jacobian_figure  # noqa: E402

TUTORIAL = [2.0, 1.0, 0.5, -0.5]


def ref(z: list[float], temperature: float = 1.0):
    """Independent numpy float64 σ, J = (diag σ − σσᵀ)/T and eigenvalues."""
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z[np.isfinite(z)].max())
    p = e / e.sum()
    J = (np.diag(p) - np.outer(p, p)) / temperature
    return p, J, np.linalg.eigvalsh(J)


def bar_heights(ax) -> np.ndarray:
    return np.array([patch.get_height() for patch in ax.patches])


def scatter_x(ax, y: float) -> np.ndarray:
    for coll in ax.collections:
        off = np.asarray(coll.get_offsets())
        if len(off) and np.all(off[:, 1] == y):
            return off[:, 0]
    raise AssertionError(f"no scatter at y = {y}")


def test_four_panels_and_their_data():
    fig = jacobian_figure(torch.tensor(TUTORIAL))
    p, J, lam = ref(TUTORIAL)
    assert len(fig.axes) == 5  # four panels and the colour bar
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert [t[:3] for t in titles] == ["(a)", "(b)", "(c)", "(d)"]

    # (a) heatmap: J, colour limits symmetric about 0
    im = fig.axes[0].images[0]
    np.testing.assert_allclose(np.asarray(im.get_array()), J, atol=1e-7)
    vmin, vmax = im.get_clim()
    assert vmin == -vmax
    assert vmax == pytest.approx(np.abs(J).max(), rel=1e-6)
    assert im.get_cmap().name == "RdBu_r"

    # (b) diagonal σ(1 − σ), (c) probabilities
    np.testing.assert_allclose(bar_heights(fig.axes[1]), p * (1 - p), atol=1e-7)
    np.testing.assert_allclose(bar_heights(fig.axes[2]), p, atol=1e-7)

    # (d) eigenvalues and sorted σ, the bound at 1/2
    ax = fig.axes[3]
    eig = np.sort(scatter_x(ax, 0.0))
    sig = scatter_x(ax, 1.0)
    np.testing.assert_allclose(eig, lam, atol=1e-7)
    np.testing.assert_allclose(sig, np.sort(p), atol=1e-7)
    assert eig.max() == pytest.approx(0.3521, abs=1e-4)
    # interlacing: 0 = λ_1 ≤ σ_(1) ≤ λ_2 ≤ σ_(2) ≤ … ≤ λ_K ≤ σ_(K)
    assert np.all(eig[1:] >= sig[:-1] - 1e-7) and np.all(eig <= sig + 1e-7)
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and np.allclose(dashed[0].get_xdata(), 0.5)
    assert "0.3521" in " ".join(t.get_text() for t in ax.texts)


def test_saves_a_png(tmp_path):
    path = tmp_path / "jacobian.png"
    jacobian_figure(torch.tensor(TUTORIAL)).savefig(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_batch_index_temperature_and_mask():
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, -math.inf, 1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="pass `index`"):
        jacobian_figure(z)
    with pytest.raises(ValueError, match="`index` must be a valid index"):
        jacobian_figure(z, index=2)
    fig = jacobian_figure(z, index=1, temperature=2.0)
    _, J, lam = ref([3.0, -math.inf, 1.0, 0.0], temperature=2.0)
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), J, atol=1e-12)
    np.testing.assert_allclose(np.sort(scatter_x(fig.axes[3], 0.0)), lam, atol=1e-12)
    dashed = [ln for ln in fig.axes[3].lines if ln.get_linestyle() == "--"]
    assert np.allclose(dashed[0].get_xdata(), 0.25)  # 1/(2T)
    assert "masked" in [t.get_text() for t in fig.axes[2].texts]
    assert "slice 1" in fig._suptitle.get_text()

    # class dim first, a boolean mask: same picture as -inf
    mask = torch.tensor([[True], [False], [True], [True]])
    a = jacobian_figure(z.t(), dim=0, index=0, mask=mask)
    b = jacobian_figure(torch.tensor([0.0, -math.inf, 2.0, 3.0], dtype=torch.float64))
    np.testing.assert_array_equal(
        np.asarray(a.axes[0].images[0].get_array()), np.asarray(b.axes[0].images[0].get_array())
    )


def test_large_k_without_annotations():
    z = torch.randn(40, generator=torch.Generator().manual_seed(0))
    fig = jacobian_figure(z, labels=[f"c{i}" for i in range(40)])
    assert len(fig.axes[0].texts) == 0  # no per-cell numbers for K > 8
    assert len(fig.axes[0].get_xticks()) <= 14


def test_errors_and_missing_matplotlib(monkeypatch):
    with pytest.raises(ValueError, match="`labels` must have K = 4"):
        jacobian_figure(torch.tensor(TUTORIAL), labels=["a"])
    with pytest.raises(TypeError, match=r"softjac\.plotting\.jacobian_figure"):
        jacobian_figure([1.0, 2.0])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'softjac\[plot\]'"):
        jacobian_figure(torch.tensor(TUTORIAL))


def test_no_pyplot_state():
    before = sys.modules.get("matplotlib.pyplot")
    n = len(before.get_fignums()) if before is not None else 0
    jacobian_figure(torch.tensor(TUTORIAL))
    after = sys.modules.get("matplotlib.pyplot")
    if after is not None:
        assert len(after.get_fignums()) == n
