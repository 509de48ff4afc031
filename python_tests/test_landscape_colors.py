"""The merge-landscape plot's colour scale: one range shared by two landscapes, or the grid's own."""

import numpy as np
import pytest
from matplotlib.axes import Axes

from mergopt_kernels.analysis import plot_merge_landscape
from mergopt_kernels.demo.report import shared_color_range


@pytest.fixture
def norms(monkeypatch):
    seen = []  # one entry per figure: its colorbar draws with the same norm object
    original = Axes.pcolormesh

    def record(self, *args, **kwargs):
        if not any(norm is kwargs["norm"] for norm in seen):
            seen.append(kwargs["norm"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "pcolormesh", record)
    return seen


def test_landscapes_share_one_colour_range(tmp_path, norms):
    rng = np.random.default_rng()
    adamw, mergopt = 1.0 + rng.random((4, 4)), 2.0 + rng.random((4, 4))
    mergopt[0, 0] = np.nan
    lowest, highest = shared_color_range([adamw, mergopt])
    assert (lowest, highest) == (adamw.min(), np.nanmax(mergopt))
    coefficients = np.linspace(0, 2, 4)
    for name, grid in (("a", adamw), ("m", mergopt)):
        plot_merge_landscape(grid, coefficients, tmp_path / f"{name}.png", color_range=(lowest, highest))
    plot_merge_landscape(mergopt, coefficients, tmp_path / "own.png")
    plot_merge_landscape(adamw, coefficients, tmp_path / "log.png", log_color=True, color_range=(lowest, highest))
    assert [(n.vmin, n.vmax) for n in norms] == [(lowest, highest), (lowest, highest),
                                                 (np.nanmin(mergopt), np.nanmax(mergopt)), (lowest, highest)]


@pytest.mark.parametrize("color_range", [(2.0, 1.0), (float("nan"), 1.0), (0.0, float("inf"))])
def test_bad_colour_range(tmp_path, color_range):
    with pytest.raises(ValueError, match="color_range"):
        plot_merge_landscape(np.ones((2, 2)), [0.0, 1.0], tmp_path / "bad.png", color_range=color_range)
