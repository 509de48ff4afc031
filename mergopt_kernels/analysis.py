"""Task-vector analysis for your own checkpoints: the paper's Laplace fit (Table 10, Fig. 1) and
the joint loss of two experts over merge coefficients (Fig. 2).

* ``task_vector(base, expert)`` draws a sample of ``expert - base`` (fp32) tensor by tensor,
  never building a flat copy of the model; ``fit_laplace(sample)`` fits Laplace(mu, b) by maximum
  likelihood and reports the K–S distance and the average log-likelihood as in Table 10;
  ``plot_task_vector_histogram`` draws the histogram with the fitted density (Fig. 1).
* ``merge_loss_landscape(loss_fn, base, e1, e2, coefficients)`` evaluates
  ``loss_fn(base + a1 * tau1 + a2 * tau2)`` on a grid; ``plot_merge_landscape`` draws it (Fig. 2).

Subsamples are i.i.d. draws (with replacement) of entries, uniformly over all float entries of the
model, from ``numpy.random.default_rng(seed)``: the fit, the K–S distance and the log-likelihood
are then those of an i.i.d. sample of the empirical distribution. matplotlib is imported only by
the plotting functions, which draw on an Agg canvas without touching pyplot's global state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .merging import StateDict, _check_state_dicts, _expert_list, _float_keys, _linear_merge

__all__ = ["LaplaceFit", "fit_laplace", "task_vector", "plot_task_vector_histogram",
           "merge_loss_landscape", "plot_merge_landscape"]

DEFAULT_MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class LaplaceFit:
    """Maximum-likelihood Laplace(mu, b) fit of a sample and its goodness of fit.

    Attributes:
        mu: location (the sample median).
        b: scale (mean absolute deviation from the median).
        ks_statistic: one-sample Kolmogorov–Smirnov distance sup |F_n - F| against the fitted CDF.
        avg_log_likelihood: mean log density of the sample under the fit (= -log(2b) - 1).
        n: number of values the fit used (after subsampling).
        n_total: number of values offered.
    """

    mu: float
    b: float
    ks_statistic: float
    avg_log_likelihood: float
    n: int
    n_total: int

    def pdf(self, x) -> np.ndarray:
        """Fitted density at ``x`` (array-like), float64."""
        x = np.asarray(x, dtype=np.float64)
        return np.exp(-np.abs(x - self.mu) / self.b) / (2.0 * self.b)

    def cdf(self, x) -> np.ndarray:
        """Fitted CDF at ``x`` (array-like), float64."""
        z = (np.asarray(x, dtype=np.float64) - self.mu) / self.b
        return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(z, 0.0)))


def _check_max_samples(max_samples) -> int | None:
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    return int(max_samples)


def _sample_float64(values, max_samples: int | None, seed: int) -> tuple[np.ndarray, int]:
    """Flatten ``values`` and draw at most ``max_samples`` of them as float64: (sample, total count)."""
    if isinstance(values, torch.Tensor):
        flat = values.detach().reshape(-1)
        n_total = flat.numel()
        if max_samples is not None and n_total > max_samples:
            idx = np.random.default_rng(seed).integers(0, n_total, size=max_samples)
            flat = flat[torch.from_numpy(idx).to(flat.device)]
        return flat.to(device="cpu", dtype=torch.float64).numpy(), n_total
    flat = np.asarray(values).reshape(-1)
    n_total = flat.size
    if max_samples is not None and n_total > max_samples:
        flat = flat[np.random.default_rng(seed).integers(0, n_total, size=max_samples)]
    return flat.astype(np.float64), n_total


def fit_laplace(values, max_samples: int | None = DEFAULT_MAX_SAMPLES, seed: int = 0) -> LaplaceFit:
    """Fit Laplace(mu, b) by maximum likelihood: ``mu`` = median, ``b`` = mean |x - mu|.

    Args:
        values: a tensor (any shape, any float dtype, any device), numpy array or sequence of
            real numbers; flattened.
        max_samples: fit at most this many values, drawn i.i.d. uniformly (seeded) when there
            are more; ``None`` uses every value.
        seed: seed of the subsample.
    Returns:
        A ``LaplaceFit`` with mu, b, the K–S distance, the average log-likelihood and counts.
    Raises:
        ValueError: fewer than 2 values, non-finite values in the sample, or all values equal
        (b would be 0).
    """
    max_samples = _check_max_samples(max_samples)
    x, n_total = _sample_float64(values, max_samples, seed)
    if x.size < 2:
        raise ValueError(f"values must hold at least 2 numbers, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError("values contain NaN or infinite entries")
    mu = float(np.median(x))
    b = float(np.mean(np.abs(x - mu)))
    if not b > 0.0:
        raise ValueError("values are all equal: the Laplace scale b would be 0")
    x.sort()
    n = x.size
    fit = LaplaceFit(mu, b, 0.0, 0.0, n, n_total)
    cdf = fit.cdf(x)
    ks = max(float(np.max(np.arange(1, n + 1) / n - cdf)), float(np.max(cdf - np.arange(n) / n)))
    avg_ll = float(np.mean(-np.log(2.0 * b) - np.abs(x - mu) / b))
    return LaplaceFit(mu, b, ks, avg_ll, n, n_total)


def task_vector(base: StateDict, expert: StateDict | Sequence[StateDict],
                max_samples: int | None = DEFAULT_MAX_SAMPLES, seed: int = 0) -> torch.Tensor:
    """A sample of the task vector ``expert - base`` over all float entries, as 1-D fp32 on the CPU.

    Args:
        base: the pre-trained state dict.
        expert: a fine-tuned state dict with the base's keys, shapes and dtypes, or a sequence of
            them, in which case the summed task vector ``sum_i (expert_i - base)`` is sampled
            (the paper's Fig. 1 fits the summed vector).
        max_samples: when the model has more float entries than this, draw this many positions
            i.i.d. uniformly over all of them (seeded), in model order; ``None`` returns every entry.
        seed: seed of the positions.
    Returns:
        fp32 tensor ``[min(n, max_samples)]``, entries computed as fp32 differences. Only the sampled
        positions are read from each tensor, so memory stays near the sample size.
    """
    max_samples = _check_max_samples(max_samples)
    experts = [expert] if isinstance(expert, Mapping) else _expert_list(expert)
    names = ["expert"] if isinstance(expert, Mapping) else [f"expert[{i}]" for i in range(len(experts))]
    _check_state_dicts(base, "base", experts, names)
    keys = _float_keys(base)
    sizes = [base[key].numel() for key in keys]
    n_total = sum(sizes)
    positions = None
    if max_samples is not None and n_total > max_samples:
        positions = torch.from_numpy(np.sort(np.random.default_rng(seed).integers(0, n_total, size=max_samples)))
    parts, start = [], 0
    for key, size in zip(keys, sizes):
        if positions is None:
            local = None
        else:
            lo, hi = torch.searchsorted(positions, torch.tensor([start, start + size])).tolist()
            local = positions[lo:hi] - start
        start += size
        if local is not None and local.numel() == 0:
            continue

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            flat = tensor.detach().reshape(-1)
            flat = flat if local is None else flat[local.to(flat.device)]
            return flat.to(device="cpu", dtype=torch.float32)

        ref = pick(base[key])
        parts.append(sum(pick(e[key]) - ref for e in experts))
    return torch.cat(parts) if parts else torch.zeros(0)


def _output_path(path) -> Path:
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_task_vector_histogram(values, fit: LaplaceFit | None = None, path="task_vector_histogram.png",
                               bins: int = 201, span: float = 10.0, title: str | None = None,
                               log_y: bool = False, max_samples: int | None = DEFAULT_MAX_SAMPLES,
                               seed: int = 0) -> Path:
    """Histogram of task-vector values with the fitted Laplace density, written as a PNG (paper Fig. 1).

    Args:
        values: the values (tensor, array or sequence), e.g. from ``task_vector``.
        fit: the fit to draw; ``None`` fits ``values`` with ``fit_laplace``.
        path: output file (parent folders are created).
        bins: number of histogram bins over ``mu ± span * b``.
        span: half-width of the plotted range in units of b; the share of values outside it is
            shown in the legend. Densities are normalised by all values, in range or not.
        title: figure title.
        log_y: logarithmic density axis (shows the tails).
        max_samples, seed: subsample of ``values`` drawn (i.i.d., seeded) for the histogram.
    Returns:
        The path written.
    """
    if fit is None:
        fit = fit_laplace(values, max_samples=max_samples, seed=seed)
    x, _ = _sample_float64(values, _check_max_samples(max_samples), seed)
    lo, hi = fit.mu - span * fit.b, fit.mu + span * fit.b
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    density = counts / (x.size * np.diff(edges))
    outside = 1.0 - counts.sum() / x.size
    grid = np.linspace(lo, hi, 1001)

    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.stairs(density, edges, fill=True, color="tab:blue", alpha=0.45, label=f"task vector ({x.size:,} values)")
    ax.plot(grid, fit.pdf(grid), color="tab:red", lw=1.8,
            label=f"Laplace(μ={fit.mu:.3g}, b={fit.b:.3g})")
    ax.plot([], [], " ", label=f"K–S {fit.ks_statistic:.3f}, avg log-lik {fit.avg_log_likelihood:.2f}")
    if outside > 0:
        ax.plot([], [], " ", label=f"{100 * outside:.2f}% outside μ ± {span:g}b")
    ax.set_xlim(lo, hi)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("task-vector entry (expert − base)")
    ax.set_ylabel("density")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_title(title or "Task-vector distribution and Laplace fit")
    path = _output_path(path)
    fig.savefig(path)
    return path


def _coefficients(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers")
    return array


def merge_loss_landscape(loss_fn: Callable[[dict[str, torch.Tensor]], float], base: StateDict,
                         expert1: StateDict, expert2: StateDict, coefficients,
                         coefficients2=None) -> np.ndarray:
    """Joint loss of ``base + a1 * (expert1 - base) + a2 * (expert2 - base)`` over a grid (paper Fig. 2).

    Args:
        loss_fn: maps a merged state dict (base's keys and dtypes) to a scalar loss (float or 0-d
            tensor), e.g. loads it into a model and sums the losses on both tasks' data.
        base, expert1, expert2: state dicts of one architecture (same keys, shapes, dtypes).
        coefficients: 1-D values of a1 (and of a2 unless ``coefficients2`` is given).
        coefficients2: 1-D values of a2.
    Returns:
        float64 array ``[len(coefficients), len(coefficients2)]``: ``grid[i, j]`` is the loss at
        ``a1 = coefficients[i]``, ``a2 = coefficients2[j]``. One merged model exists at a time.
    """
    _check_state_dicts(base, "base", [expert1, expert2], ["expert1", "expert2"])
    first = _coefficients("coefficients", coefficients)
    second = first if coefficients2 is None else _coefficients("coefficients2", coefficients2)
    grid = np.empty((first.size, second.size))
    for i, a1 in enumerate(first):
        for j, a2 in enumerate(second):
            grid[i, j] = float(loss_fn(_linear_merge(base, [expert1, expert2], [float(a1), float(a2)])))
    return grid


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def plot_merge_landscape(grid, coefficients, path="merge_landscape.png", coefficients2=None,
                         title: str | None = None, log_color: bool = False,
                         color_range: tuple[float, float] | None = None) -> Path:
    """Heatmap of a ``merge_loss_landscape`` grid, darker = lower loss, minimum marked (paper Fig. 2).

    Args:
        grid: ``[len(coefficients), len(coefficients2)]`` losses, ``grid[i, j]`` at
            ``(a1, a2) = (coefficients[i], coefficients2[j])``; non-finite cells are left blank.
        coefficients, coefficients2: the axes (``coefficients2`` defaults to ``coefficients``).
        path: output file (parent folders are created).
        title: figure title.
        log_color: logarithmic colour scale (for losses spanning decades; needs positive losses).
        color_range: (lowest, highest) loss of the colour scale, e.g. shared by the landscapes
            of two optimizers so that one colour means one loss in both; default the grid's own
            finite range.
    Returns:
        The path written.
    """
    from matplotlib.colors import LogNorm, Normalize

    first = _coefficients("coefficients", coefficients)
    second = first if coefficients2 is None else _coefficients("coefficients2", coefficients2)
    grid = np.asarray(grid, dtype=np.float64)
    if grid.shape != (first.size, second.size):
        raise ValueError(f"grid has shape {grid.shape}, expected {(first.size, second.size)} "
                         "(len(coefficients), len(coefficients2))")
    values = np.ma.masked_invalid(grid.T)          # rows: a2, columns: a1
    if values.count() == 0:
        raise ValueError("grid has no finite value to plot")

    lowest, highest = (float(values.min()), float(values.max())) if color_range is None else color_range
    if not (np.isfinite(lowest) and np.isfinite(highest) and lowest <= highest):
        raise ValueError(f"color_range must be two finite numbers (lowest, highest), got {color_range}")

    fig = _new_figure(5.6, 4.6)
    ax = fig.add_subplot()
    norm = LogNorm(lowest, highest) if log_color else Normalize(lowest, highest)
    mesh = ax.pcolormesh(_cell_edges(first), _cell_edges(second), values, cmap="viridis", norm=norm,
                         shading="flat")
    if first.size > 1 and second.size > 1 and values.count() > 3 and highest > lowest:
        levels = (np.geomspace if log_color else np.linspace)(lowest, highest, 10)[1:-1]
        ax.contour(first, second, values, levels=levels, colors="white", linewidths=0.6, alpha=0.7)
    j, i = np.unravel_index(np.ma.argmin(values), values.shape)
    ax.plot(first[i], second[j], marker="*", color="red", markersize=12,
            label=f"min {values[j, i]:.4g} at ({first[i]:.3g}, {second[j]:.3g})")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.colorbar(mesh, ax=ax, label="joint loss")
    ax.set_xlabel("α₁ (coefficient of expert 1)")
    ax.set_ylabel("α₂ (coefficient of expert 2)")
    ax.set_title(title or "Joint loss over merge coefficients")
    path = _output_path(path)
    fig.savefig(path)
    return path
