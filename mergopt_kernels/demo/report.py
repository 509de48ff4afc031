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
    the AdamW row of the same method, ``100 (avg - avg_adamw) / avg_adamw``, seed by seed, and the
    number of seeds on which it is positive (``gain_positive``)."""
    averages = {row: 100 * np.asarray(per_seed).mean(1) for row, per_seed in accuracy.items()}
    summary = []
    for row, per_seed in accuracy.items():
        acc = 100 * np.asarray(per_seed, dtype=np.float64)
        mean, std = _mean_std(np.concatenate([acc, acc.mean(1, keepdims=True)], 1))
        entry = {"row": row, "mean": mean, "std": std, "gain_mean": None, "gain_std": None, "gain_positive": None}
        method, _, kind = row.partition("/")
        if kind and kind != BASELINE:
            baseline = averages[f"{method}/{BASELINE}"]
            gain = 100 * (averages[row] - baseline) / baseline
            (entry["gain_mean"],), (entry["gain_std"],) = _mean_std(gain[:, None])
            entry["gain_positive"] = int((gain > 0).sum())
        summary.append(entry)
    return summary


def _aligned(rows: list[list]) -> list[str]:
    """The rows as lines of left-aligned columns two spaces apart."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_table(summary: list[dict], tasks: list[str], seeds: int, metric: str = "Test accuracy") -> str:
    """The summary as a text table: ``metric`` (%) mean ± std over ``seeds`` seeds per task, the
    average, and the relative gain over AdamW."""
    header = ["method", "optimizer", *tasks, "average", "gain vs AdamW"]
    lines = []
    for entry in summary:
        method, _, kind = entry["row"].partition("/")
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(entry["mean"], entry["std"])]
        gain = "" if entry["gain_mean"] is None else (f"{entry['gain_mean']:+.2f}% ± {entry['gain_std']:.2f} "
                                                      f"(> 0 on {entry['gain_positive']}/{seeds})")
        lines.append([method, LABELS.get(kind, ""), *cells, gain])
    header_line, *rows = _aligned([header, *lines])
    rule = "-" * len(header_line)
    return "\n".join([f"{metric} (%), mean ± std over {seeds} seed(s)", rule, header_line, rule, *rows, rule])


def low_loss_share(grid, tolerance: float = 0.1) -> float:
    """Width of the low-loss basin of a merge landscape: the share of its cells whose joint loss
    is within ``tolerance`` (relative) of the grid's minimum."""
    grid = np.asarray(grid)
    return float((grid <= (1.0 + tolerance) * grid.min()).mean())


def format_sweep(results: dict) -> str:
    """The noise-scale sweep (paper Table 11) as a text table: per b, the seed-0 average score (%)
    of the individual MergOPT experts and of each merge, with its gain relative to AdamW's
    seed-0 row; the fitted b of the main run comes first."""
    accuracy = results["accuracy"]
    merges = [name for name in results["sweep"][0]["scores"] if name != "individual"] if results["sweep"] else []
    main = {"label": "fitted (main run)", "b": results["noise"]["scale"],
            "scores": {name: accuracy[f"{name}/mergopt"][0] for name in ["individual", *merges]}}
    header = ["b", "", *(f"{name} (gain)" for name in ["individual", *merges])]
    lines = []
    for entry in [main, *results["sweep"]]:
        cells = []
        for name in ["individual", *merges]:
            average = 100 * float(np.mean(entry["scores"][name]))
            baseline = 100 * float(np.mean(accuracy[f"{name}/{BASELINE}"][0]))
            cells.append(f"{average:.2f} ({100 * (average - baseline) / baseline:+.1f}%)")
        lines.append([f"{entry['b']:.3g}", entry["label"], *cells])
    return "\n".join(["MergOPT noise-scale sweep (seed 0): average score (%) and gain vs AdamW",
                      *_aligned([header, *lines])])


def shared_color_range(grids) -> tuple[float, float]:
    """(lowest, highest) finite loss over all ``grids``: one colour scale for all of them."""
    finite = np.concatenate([np.asarray(grid, dtype=np.float64).ravel() for grid in grids])
    finite = finite[np.isfinite(finite)]
    return float(finite.min()), float(finite.max())


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
    color_range = shared_color_range(artifacts["grids"].values())
    for kind, grid in artifacts["grids"].items():
        paths[f"landscape_{kind}"] = analysis.plot_merge_landscape(
            grid, artifacts["coefficients"], out / f"merge_landscape_{kind}.png",
            title=f"Joint loss on {' + '.join(landscape['tasks'])}, {LABELS[kind]} experts",
            color_range=color_range)
    data = {key: value for key, value in results.items() if key != "artifacts"}
    data["summary"] = summarise(results["accuracy"])
    data["landscape"]["low_loss_share"] = {kind: low_loss_share(grid) for kind, grid in artifacts["grids"].items()}
    data["landscape"]["color_range"] = list(color_range)
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(data, indent=1))
    return paths
