"""The demo's report: the Table-1-style summary (mean ± std over seeds), the results JSON and
the figures (task-vector histogram with its Laplace fit; two-expert merge landscapes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import analysis

BASELINE = "adamw"
LABELS = {"adamw": "AdamW", "mergopt": "MergOPT", "control": "control (b=0)"}


def _mean_std(table: np.ndarray) -> tuple[list[float], list[float]]:
    """Column means and sample standard deviations (0 with a single seed) of ``[seeds, cols]``."""
    std = table.std(0, ddof=1) if table.shape[0] > 1 else np.zeros(table.shape[1])
    return table.mean(0).tolist(), std.tolist()


def summarise(accuracy: dict[str, list[list[float]]]) -> list[dict]:
    """Per row of ``run_demo``'s ``accuracy``: mean and std over seeds of each task's accuracy and
    of their average (in %), and for non-AdamW rows the relative gain of the row's average over
    the AdamW row of the same method, ``100 (avg - avg_adamw) / avg_adamw``, seed by seed."""
    averages = {row: 100 * np.asarray(per_seed).mean(1) for row, per_seed in accuracy.items()}
    summary = []
    for row, per_seed in accuracy.items():
        acc = 100 * np.asarray(per_seed, dtype=np.float64)
        mean, std = _mean_std(np.concatenate([acc, acc.mean(1, keepdims=True)], 1))
        entry = {"row": row, "mean": mean, "std": std, "gain_mean": None, "gain_std": None}
        method, _, kind = row.partition("/")
        if kind and kind != BASELINE:
            baseline = averages[f"{method}/{BASELINE}"]
            gain = 100 * (averages[row] - baseline) / baseline
            (entry["gain_mean"],), (entry["gain_std"],) = _mean_std(gain[:, None])
        summary.append(entry)
    return summary


def format_table(summary: list[dict], tasks: list[str], seeds: int) -> str:
    """The summary as a text table: accuracy (%) mean ± std over ``seeds`` seeds per task, the
    average, and the relative gain over AdamW."""
    header = ["method", "optimizer", *tasks, "average", "gain vs AdamW"]
    lines = []
    for entry in summary:
        method, _, kind = entry["row"].partition("/")
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(entry["mean"], entry["std"])]
        gain = "" if entry["gain_mean"] is None else f"{entry['gain_mean']:+.2f}% ± {entry['gain_std']:.2f}"
        lines.append([method, LABELS.get(kind, ""), *cells, gain])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
    rule = "-" * len(render(header))
    return "\n".join([f"Test accuracy (%), mean ± std over {seeds} seed(s)", rule, render(header), rule,
                      *map(render, lines), rule])


def low_loss_share(grid, tolerance: float = 0.1) -> float:
    """Width of the low-loss basin of a merge landscape: the share of its cells whose joint loss
    is within ``tolerance`` (relative) of the grid's minimum."""
    grid = np.asarray(grid)
    return float((grid <= (1.0 + tolerance) * grid.min()).mean())


def write_outputs(results: dict, out_dir) -> dict[str, Path]:
    """Write ``results.json`` (results plus the summary), ``task_vector_histogram.png`` and
    ``merge_landscape_{adamw,mergopt}.png`` into ``out_dir``; returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = results["artifacts"]
    noise = results["noise"]
    paths = {"histogram": analysis.plot_task_vector_histogram(
        artifacts["task_vector"], artifacts["fit"], out / "task_vector_histogram.png",
        title=f"Task vectors of the pilot AdamW experts (b used: {noise['scale']:.3g})")}
    landscape = results["landscape"]
    for kind, grid in artifacts["grids"].items():
        paths[f"landscape_{kind}"] = analysis.plot_merge_landscape(
            grid, artifacts["coefficients"], out / f"merge_landscape_{kind}.png",
            title=f"Joint loss on {' + '.join(landscape['tasks'])}, {LABELS[kind]} experts")
    data = {key: value for key, value in results.items() if key != "artifacts"}
    data["summary"] = summarise(results["accuracy"])
    data["landscape"]["low_loss_share"] = {kind: low_loss_share(grid) for kind, grid in artifacts["grids"].items()}
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(data, indent=1))
    return paths
