"""Tests of mergopt_kernels.analysis: Laplace fit, task-vector sampling, merge landscape, plots."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from mergopt_kernels.analysis import (LaplaceFit, fit_laplace, merge_loss_landscape, plot_merge_landscape,
                                      plot_task_vector_histogram, task_vector)

N = 100_000
# Kolmogorov's distribution: P(sqrt(n) * D > 2.3) ~ 2 exp(-2 * 2.3**2) = 5e-5 for a fully specified
# CDF; fitting mu and b to the same data only makes D smaller.
KS_BOUND = 2.3 / math.sqrt(N)


def fresh_rng() -> np.random.Generator:
    return np.random.default_rng()


def test_fit_recovers_mu_and_b_within_six_standard_errors():
    rng = fresh_rng()
    mu, b = rng.normal() * 1e-3, 10 ** rng.uniform(-5, -1)
    x = rng.laplace(mu, b, size=N)
    fit = fit_laplace(torch.from_numpy(x).float(), max_samples=None)
    # Asymptotic standard errors: median 1 / (2 f(mu) sqrt(n)) = b / sqrt(n); mean |X - mu| has sd b.
    se = b / math.sqrt(N)
    assert abs(fit.mu - mu) <= 6 * se + 4e-7 * abs(mu)      # + the fp32 rounding of the input
    assert abs(fit.b - b) <= 6 * se
    assert fit.n == fit.n_total == N


def test_fit_statistics_match_scipy():
    rng = fresh_rng()
    x = rng.laplace(0.3, 2.0, size=4_001)
    fit = fit_laplace(x)
    assert fit.mu == np.median(x)
    assert fit.b == pytest.approx(np.mean(np.abs(x - np.median(x))), rel=1e-12)
    assert fit.ks_statistic == pytest.approx(stats.kstest(x, "laplace", args=(fit.mu, fit.b)).statistic, rel=1e-9)
    assert fit.avg_log_likelihood == pytest.approx(np.mean(stats.laplace.logpdf(x, fit.mu, fit.b)), rel=1e-12)
    # at the maximum-likelihood b, the average log-likelihood is -log(2b) - 1
    assert fit.avg_log_likelihood == pytest.approx(-math.log(2 * fit.b) - 1, rel=1e-12)
    assert np.allclose(fit.cdf([fit.mu - 1e9, fit.mu, fit.mu + 1e9]), [0.0, 0.5, 1.0])


def test_ks_small_for_laplace_large_for_gaussian():
    rng = fresh_rng()
    assert fit_laplace(rng.laplace(0.0, 5e-4, size=N)).ks_statistic <= KS_BOUND
    # Laplace fitted to N(0, 1): mu = 0, b = sqrt(2/pi); the population K-S distance is 0.0419.
    grid = np.linspace(-6, 6, 200_001)
    population = np.abs(stats.norm.cdf(grid) - stats.laplace.cdf(grid, 0, math.sqrt(2 / math.pi))).max()
    assert population == pytest.approx(0.0419, abs=1e-3)
    # sampling error of the ECDF (KS_BOUND) plus a shift from 6-standard-error parameter errors (< 0.01)
    assert fit_laplace(rng.normal(size=N)).ks_statistic >= population - KS_BOUND - 0.01


def test_subsampling_is_seeded_and_unbiased():
    rng = fresh_rng()
    b = 1e-3
    x = torch.from_numpy(rng.laplace(0.0, b, size=2_000_003))
    fit = fit_laplace(x, max_samples=N, seed=11)
    assert (fit.n, fit.n_total) == (N, 2_000_003)
    assert fit == fit_laplace(x, max_samples=N, seed=11)
    assert fit != fit_laplace(x, max_samples=N, seed=12)
    se = b * math.sqrt(1 / N + 1 / x.numel())
    assert abs(fit.mu) <= 6 * se and abs(fit.b - b) <= 6 * se


@pytest.mark.parametrize("values, message", [
    ([1.0], "at least 2"),
    ([1.0, float("nan"), 2.0], "NaN"),
    ([2.0, 2.0, 2.0], "all equal"),
])
def test_fit_errors(values, message):
    with pytest.raises(ValueError, match=message):
        fit_laplace(values)
    with pytest.raises(ValueError, match="max_samples"):
        fit_laplace([1.0, 2.0], max_samples=0)


def small_model(seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    base = {"a": torch.randn(37, 11, generator=gen), "b": torch.randn(5, generator=gen).to(torch.bfloat16),
            "c": torch.randn(9, 7, generator=gen).t(),          # non-contiguous
            "steps": torch.tensor(4)}
    expert = {k: (v + torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v + 1)
              for k, v in base.items()}
    return base, expert


def full_task_vector(base, expert):
    return torch.cat([(expert[k].float() - base[k].float()).reshape(-1) for k in base if base[k].is_floating_point()])


def test_task_vector_without_subsampling_is_the_flat_difference():
    base, expert = small_model()
    assert torch.equal(task_vector(base, expert, max_samples=None), full_task_vector(base, expert))
    assert torch.equal(task_vector(base, expert), full_task_vector(base, expert))   # fewer than max_samples
    # several experts: the summed task vector
    _, other = small_model()
    other = {k: (v.to(base[k].dtype) if v.is_floating_point() else v) for k, v in other.items()}
    summed = full_task_vector(base, expert) + full_task_vector(base, other)
    torch.testing.assert_close(task_vector(base, [expert, other]), summed, atol=1e-6, rtol=1e-6)


def test_task_vector_subsample_draws_uniformly_over_all_entries():
    base = {"big": torch.zeros(30001), "small": torch.zeros(17, 3), "odd": torch.zeros(101)}
    expert = {"big": torch.full((30001,), 1.0), "small": torch.full((17, 3), 2.0), "odd": torch.full((101,), 3.0)}
    m = 20_000
    sample = task_vector(base, expert, max_samples=m, seed=int(fresh_rng().integers(2**31)))
    assert sample.dtype == torch.float32 and sample.shape == (m,)
    assert torch.equal(sample, sample.sort().values)     # model order: big, small, odd
    total = 30001 + 51 + 101
    for value, size in ((1.0, 30001), (2.0, 51), (3.0, 101)):
        share = size / total
        assert abs(float((sample == value).float().mean()) - share) <= 6 * math.sqrt(share * (1 - share) / m)
    # every sampled entry is an entry of the real task vector
    base, expert = small_model()
    assert torch.isin(task_vector(base, expert, max_samples=50, seed=3), full_task_vector(base, expert)).all()


def test_task_vector_errors():
    base, expert = small_model()
    with pytest.raises(ValueError, match=r"expert\['a'\] has shape"):
        task_vector(base, dict(expert, a=torch.zeros(11, 37)))
    with pytest.raises(ValueError, match="experts is empty"):
        task_vector(base, [])


def quadratic_problem(seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    base = {"w": torch.randn(7, 3, generator=gen), "v": torch.randn(5, generator=gen), "n": torch.tensor(2)}
    e1 = {"w": base["w"] + torch.randn(7, 3, generator=gen), "v": base["v"] + torch.randn(5, generator=gen),
          "n": torch.tensor(9)}
    e2 = {"w": base["w"] + torch.randn(7, 3, generator=gen), "v": base["v"] + torch.randn(5, generator=gen),
          "n": torch.tensor(9)}
    target = {"w": torch.randn(7, 3, generator=gen), "v": torch.randn(5, generator=gen)}

    def loss(sd):
        assert torch.equal(sd["n"], torch.tensor(2))          # non-float entries come from the base
        return sum(((sd[k] - target[k]) ** 2).sum() for k in target)

    return base, e1, e2, target, loss


def test_landscape_equals_direct_evaluation():
    base, e1, e2, target, loss = quadratic_problem()
    c1, c2 = [-0.5, 0.0, 0.3, 1.0, 1.7], [0.1, 0.6, 0.9]
    grid = merge_loss_landscape(loss, base, e1, e2, c1, c2)
    assert grid.shape == (5, 3) and grid.dtype == np.float64
    for i, j in ((0, 0), (2, 1), (4, 2), (3, 0)):
        merged = {k: base[k].double() + c1[i] * (e1[k].double() - base[k].double())
                  + c2[j] * (e2[k].double() - base[k].double()) for k in target}
        direct = float(sum(((merged[k] - target[k].double()) ** 2).sum() for k in target))
        assert grid[i, j] == pytest.approx(direct, rel=1e-5)
    square = merge_loss_landscape(loss, base, e1, e2, c1)
    assert square.shape == (5, 5)
    assert square[1, 1] == pytest.approx(float(loss(base)), rel=1e-6)     # (0, 0) is the base


def test_landscape_errors():
    base, e1, e2, _, loss = quadratic_problem()
    with pytest.raises(ValueError, match="coefficients must be"):
        merge_loss_landscape(loss, base, e1, e2, [])
    with pytest.raises(ValueError, match="coefficients2 must be"):
        merge_loss_landscape(loss, base, e1, e2, [0.0], [float("nan")])
    with pytest.raises(ValueError, match=r"expert2 does not have the keys"):
        merge_loss_landscape(loss, base, e1, {"w": e2["w"]}, [0.0])


def assert_nontrivial_png(path):
    from matplotlib.image import imread

    assert path.exists() and path.stat().st_size > 10_000
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 300
    assert image[..., :3].std() > 0.05                   # not a blank canvas


def test_histogram_png(tmp_path):
    rng = fresh_rng()
    values = torch.from_numpy(rng.laplace(0.0, 5e-4, size=30_001)).float()
    fit = fit_laplace(values)
    assert_nontrivial_png(plot_task_vector_histogram(values, fit, tmp_path / "hist.png"))
    assert_nontrivial_png(plot_task_vector_histogram(values, None, tmp_path / "sub" / "log.png", log_y=True))


def test_landscape_png(tmp_path):
    base, e1, e2, _, loss = quadratic_problem()
    coefficients = np.linspace(-0.2, 1.0, 7)
    grid = merge_loss_landscape(loss, base, e1, e2, coefficients)
    assert_nontrivial_png(plot_merge_landscape(grid, coefficients, tmp_path / "landscape.png"))
    grid[0, 0] = np.nan                                 # a diverged merge is left blank
    assert_nontrivial_png(plot_merge_landscape(grid, coefficients, tmp_path / "log.png", log_color=True))
    with pytest.raises(ValueError, match="grid has shape"):
        plot_merge_landscape(grid[:, :3], coefficients, tmp_path / "bad.png")


def test_import_does_not_load_matplotlib():
    code = "import sys, mergopt_kernels.analysis, mergopt_kernels.merging; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_fit_is_a_plain_dataclass():
    fit = fit_laplace([0.0, 1.0, -1.0, 2.0])
    assert isinstance(fit, LaplaceFit) and fit.mu == 0.5 and fit.b == 1.0 and fit.n == 4
