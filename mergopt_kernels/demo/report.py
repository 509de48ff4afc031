"""The demo's report: the Table-1-style summary (mean ± std over seeds, and each row's seed-paired
gain over AdamW with its 95 % interval), the verdict of MergOPT against each control, task
arithmetic's lambda sweep (best score and area under the curve), the results JSON and the
figures (task-vector histogram with its Laplace fit; two-expert merge landscapes; lambda curves)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from .. import analysis

BASELINE = "adamw"
LABELS = {"adamw": "AdamW", "mergopt": "MergOPT", "control": "control (b=0)",
          "adamw_matched": "AdamW, matched norm", "mergopt_gaussian": "MergOPT, Gaussian",
          "mergopt_fixed_s": "MergOPT, fixed s", "adamw_constant": "AdamW, constant lr"}
CONFIDENCE = 0.95


def _mean_std(table: np.ndarray) -> tuple[list[float], list[float]]:
    """Column means and sample standard deviations (0 with a single seed) of ``[seeds, cols]``."""
    std = table.std(0, ddof=1) if table.shape[0] > 1 else np.zeros(table.shape[1])
    return table.mean(0).tolist(), std.tolist()


def paired_interval(values) -> dict:
    """Mean of seed-paired differences ``values`` with the half-width of its two-sided 95 %
    Student-t interval (``None`` for one value) and the number of positive values.

    Returns:
        ``{"mean", "half", "positive", "n"}``.
    """
    from scipy import stats  # scikit-learn's dependency, hence the [demo] extra's

    values = np.asarray(values, dtype=np.float64)
    n = values.size
    half = None
    if n > 1:
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))
    return {"mean": float(values.mean()), "half": half, "positive": int((values > 0).sum()), "n": int(n)}


def relative_gain(row, reference) -> np.ndarray:
    """Per seed, ``100 (row - reference) / reference`` of two ``[seeds]`` arrays of averages."""
    row, reference = np.asarray(row, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return 100 * (row - reference) / reference


def verdict(interval: dict) -> str:
    """``"beats"`` when the interval lies above 0, ``"loses"`` below, else ``"ties"``;
    ``"n/a"`` without an interval (one seed)."""
    if interval["half"] is None:
        return "n/a"
    if interval["mean"] - interval["half"] > 0:
        return "beats"
    return "loses" if interval["mean"] + interval["half"] < 0 else "ties"


def _averages(accuracy: dict[str, list[list[float]]]) -> dict[str, np.ndarray]:
    return {row: 100 * np.asarray(per_seed, dtype=np.float64).mean(1) for row, per_seed in accuracy.items()}


def summarise(accuracy: dict[str, list[list[float]]]) -> list[dict]:
    """Per row of ``run_demo``'s ``accuracy``: mean and std over seeds of each task's accuracy and
    of their average (in %), and for non-AdamW rows the relative gain of the row's average over
    the AdamW row of the same method, ``100 (avg - avg_adamw) / avg_adamw``, seed by seed: its
    mean, std, 95 % interval half-width (``gain_half``, ``None`` for one seed) and the number of
    seeds on which it is positive (``gain_positive``)."""
    averages = _averages(accuracy)
    summary = []
    for row, per_seed in accuracy.items():
        acc = 100 * np.asarray(per_seed, dtype=np.float64)
        mean, std = _mean_std(np.concatenate([acc, acc.mean(1, keepdims=True)], 1))
        entry = {"row": row, "mean": mean, "std": std, "gain_mean": None, "gain_std": None, "gain_half": None,
                 "gain_positive": None}
        method, _, kind = row.partition("/")
        if kind and kind != BASELINE:
            gain = relative_gain(averages[row], averages[f"{method}/{BASELINE}"])
            (entry["gain_mean"],), (entry["gain_std"],) = _mean_std(gain[:, None])
            interval = paired_interval(gain)
            entry["gain_half"], entry["gain_positive"] = interval["half"], interval["positive"]
        summary.append(entry)
    return summary


def verdicts(accuracy: dict[str, list[list[float]]]) -> list[dict]:
    """MergOPT against every other row, per method (``individual`` and each merge): the
    seed-paired relative gain of MergOPT's average over the other row's (``paired_interval``
    keys) and its ``verdict``; one entry per (other row, method), rows in table order."""
    averages = _averages(accuracy)
    methods = list(dict.fromkeys(row.partition("/")[0] for row in accuracy if "/" in row))
    others = list(dict.fromkeys(row.partition("/")[2] for row in accuracy if "/" in row))
    result = []
    for other in others:
        if other == "mergopt":
            continue
        for method in methods:
            interval = paired_interval(relative_gain(averages[f"{method}/mergopt"], averages[f"{method}/{other}"]))
            result.append({"control": other, "method": method, **interval, "verdict": verdict(interval)})
    return result


def _lambda_stats(lambda_sweep: dict) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """(lambdas, per optimizer the ``[seeds, lambdas]`` curves of the average score in %, per
    optimizer ``{"best", "area"}`` per seed)."""
    lambdas = np.asarray(lambda_sweep["lambdas"], dtype=np.float64)
    curves = {kind: 100 * np.asarray(scores, dtype=np.float64).mean(2) for kind, scores in lambda_sweep["scores"].items()}
    span = lambdas[-1] - lambdas[0]
    width = np.diff(lambdas)
    stats = {kind: {"best": curve.max(1),
                    "area": (width * (curve[:, 1:] + curve[:, :-1]) / 2).sum(1) / span if span > 0 else curve[:, 0]}
             for kind, curve in curves.items()}
    return lambdas, curves, stats


def lambda_summary(lambda_sweep: dict) -> list[dict]:
    """Task arithmetic's lambda sweep per optimizer: per seed the curve of the average score (%)
    over ``lambdas``, its best value and its area (trapezoids, divided by the lambda range: the
    curve's mean height, in %); the mean of each over seeds (``best``, ``area``), the lambda of
    the best point of the seed-mean curve (``best_lambda``), and for non-AdamW rows the
    seed-paired relative gains over AdamW (``best_gain``, ``area_gain``: ``paired_interval``)."""
    lambdas, curves, stats = _lambda_stats(lambda_sweep)
    result = []
    for kind, curve in curves.items():
        entry = {"optimizer": kind, "curve": curve.mean(0).tolist(),
                 "best_lambda": float(lambdas[int(curve.mean(0).argmax())]),
                 "best": float(stats[kind]["best"].mean()), "area": float(stats[kind]["area"].mean()),
                 "best_gain": None, "area_gain": None}
        if kind != BASELINE:
            for name in ("best", "area"):
                entry[f"{name}_gain"] = paired_interval(relative_gain(stats[kind][name], stats[BASELINE][name]))
        result.append(entry)
    return result


def lambda_verdicts(lambda_sweep: dict) -> list[dict]:
    """``verdicts`` of MergOPT's best-lambda score (method ``"lambda best"``) and of its area under
    the lambda curve (``"lambda area"``) against every other row."""
    _, _, stats = _lambda_stats(lambda_sweep)
    return verdicts({f"lambda {name}/{kind}": (by_name[name][:, None] / 100).tolist()
                     for name in ("best", "area") for kind, by_name in stats.items()})


def _aligned(rows: list[list]) -> list[str]:
    """The rows as lines of left-aligned columns two spaces apart."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_interval(interval: dict | None, unit: str = "%") -> str:
    """``+0.65% [+0.30, +1.00] (> 0 on 9/10)``; without a half-width only the mean and the count."""
    if interval is None:
        return ""
    text = f"{interval['mean']:+.2f}{unit}"
    if interval["half"] is not None:
        text += f" [{interval['mean'] - interval['half']:+.2f}, {interval['mean'] + interval['half']:+.2f}]"
    return f"{text} (> 0 on {interval['positive']}/{interval['n']})"


def format_table(summary: list[dict], tasks: list[str], seeds: int, metric: str = "Test accuracy") -> str:
    """The summary as a text table: ``metric`` (%) mean ± std over ``seeds`` seeds per task, the
    average, and the relative gain over AdamW with its 95 % interval."""
    header = ["method", "optimizer", *tasks, "average", "gain vs AdamW [95% interval]"]
    lines = []
    for entry in summary:
        method, _, kind = entry["row"].partition("/")
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(entry["mean"], entry["std"])]
        gain = None if entry["gain_mean"] is None else {"mean": entry["gain_mean"], "half": entry["gain_half"],
                                                        "positive": entry["gain_positive"], "n": seeds}
        lines.append([method, LABELS.get(kind, ""), *cells, format_interval(gain)])
    header_line, *rows = _aligned([header, *lines])
    rule = "-" * len(header_line)
    return "\n".join([f"{metric} (%), mean ± std over {seeds} seed(s)", rule, header_line, rule, *rows, rule])


def format_verdicts(entries: list[dict]) -> str:
    """The verdicts as a text table: one line per control, one column per method, each cell the
    verdict and MergOPT's mean relative gain (%) with its 95 % interval."""
    methods = list(dict.fromkeys(entry["method"] for entry in entries))
    lines = {}
    for entry in entries:
        interval = "" if entry["half"] is None else (f" [{entry['mean'] - entry['half']:+.2f}, "
                                                     f"{entry['mean'] + entry['half']:+.2f}]")
        lines.setdefault(entry["control"], [f"vs {LABELS.get(entry['control'], entry['control'])}"]).append(
            f"{entry['verdict']} {entry['mean']:+.2f}%{interval}")
    return "\n".join(["MergOPT against each row: verdict, seed-paired relative gain (%) [95% interval]",
                      *_aligned([["", *methods], *lines.values()])])


def format_lambda_sweep(entries: list[dict], lambdas) -> str:
    """The lambda sweep as a text table: per optimizer the best-lambda average score, the area
    under the lambda curve (its mean height), both in %, and their gains over AdamW."""
    header = ["optimizer", "best (lambda)", "gain vs AdamW", "area", "gain vs AdamW"]
    lines = [[LABELS.get(e["optimizer"], e["optimizer"]), f"{e['best']:.2f} ({e['best_lambda']:g})",
              format_interval(e["best_gain"]), f"{e['area']:.2f}", format_interval(e["area_gain"])] for e in entries]
    return "\n".join([f"Task arithmetic, lambda {lambdas[0]:g} to {lambdas[-1]:g}: best average score and area "
                      f"under the lambda curve (%, mean over seeds), gains seed-paired [95% interval]",
                      *_aligned([header, *lines])])


def format_matched_norm(matched: list[dict], tasks: list[str], lr: float) -> str:
    """The matched-norm lr per task and how close its task-vector norm came to MergOPT's."""
    cells = [f"{task} {entry['lr']:.3g} ({entry['ratio']:.3f}, {len(entry['tried']) - 1} runs)"
             for task, entry in zip(tasks, matched)]
    return (f"AdamW, matched norm: lr per task (norm / MergOPT's norm, search runs), seed 0, AdamW's lr {lr:g}: "
            + ", ".join(cells))


def low_loss_share(grid, tolerance: float = 0.1) -> float:
    """Width of the low-loss basin of a merge landscape: the share of its cells whose joint loss
    is within ``tolerance`` (relative) of the grid's minimum."""
    grid = np.asarray(grid)
    return float((grid <= (1.0 + tolerance) * grid.min()).mean())


def format_sweep(results: dict) -> str:
    """The noise-scale sweep (paper Table 11) as a text table: per b, the seed-0 average score (%)
    of the individual MergOPT experts and of each merge, with its gain relative to AdamW's
    seed-0 row; the b of the main run (fitted, or set by the noise offset) comes first."""
    accuracy = results["accuracy"]
    merges = [name for name in results["sweep"][0]["scores"] if name != "individual"] if results["sweep"] else []
    main = {"label": f"main run ({results['noise']['source']})", "b": results["noise"]["scale"],
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


def plot_lambda_curves(entries: list[dict], lambdas, path, title: str) -> Path:
    """Task arithmetic's average score (%, mean over seeds) against lambda, one line per
    optimizer of ``lambda_summary``'s ``entries``, written as a PNG."""
    fig = analysis._new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for entry in entries:
        ax.plot(lambdas, entry["curve"], marker="o", markersize=3,
                label=f"{LABELS.get(entry['optimizer'], entry['optimizer'])} (area {entry['area']:.2f})")
    ax.set_xlabel("task arithmetic lambda")
    ax.set_ylabel("average score (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    path = analysis._output_path(path)
    fig.savefig(path)
    return path


def format_report(results: dict, config, protocol: str, threads: int) -> str:
    """The report the demo prints: the set-up (device, base, the Laplace fit, the noise and its
    offset, the noise-off control's check, the matched-norm lrs), the summary table, the
    verdicts, the lambda sweep, the noise sweep (``--large``) and the merge landscape's share."""
    noise, fit = results["noise"], results["noise"]["fit"]
    lines = [f"device {config.device}, {threads} CPU thread(s); tasks {' '.join(results['tasks'])}"]
    if "base" in results:
        cache = results["base"]["cache"]
        lines.append(f"base: {results['base']['parameters']:,} parameters, "
                     f"{'loaded from' if cache['hit'] else 'pre-trained and saved to'} {cache['path']}")
    lines.append(f"Laplace fit of the pilot AdamW task vectors: mu={fit['mu']:.3g}, b={fit['b']:.3g}, "
                 f"K-S {fit['ks_statistic']:.3f}, avg log-lik {fit['avg_log_likelihood']:.2f} ({fit['n']:,} values); "
                 f"paper Table 10 (LLM task vectors): K-S about 0.10, avg log-lik 5.8 to 6.5")
    lines.append(f"MergOPT noise: {config.distribution}, scale {noise['scale']:.3g} (from the {noise['source']}); "
                 f"offset E|s| b / lr = {noise['offset']:.1f} Adam steps (the fitted b's: "
                 f"{noise['fitted_offset']:.1f}; paper: 5e-4 at lr 2e-5, about 21)")
    lines.append(f"control (FusedMergOptAdamW, noise off) vs torch.optim.AdamW: largest weight difference "
                 f"{max(results['control_max_abs_diff']):.2e}")
    if results["matched_norm"]:
        lines.append(format_matched_norm(results["matched_norm"], results["tasks"], config.finetune.lr))
    lines.append("")
    metric = "Task score: exact match (python: next-char accuracy)" if protocol == "lm" else "Test accuracy"
    lines.append(format_table(summarise(results["accuracy"]), results["tasks"], config.seeds, metric))
    lines.append(format_verdicts(verdicts(results["accuracy"]) + lambda_verdicts(results["lambda_sweep"])))
    lines.append(format_lambda_sweep(lambda_summary(results["lambda_sweep"]), results["lambda_sweep"]["lambdas"]))
    if results["sweep"]:
        lines.append(format_sweep(results))
    grids = results["artifacts"]["grids"]
    lines.append(f"merge landscape of {' + '.join(results['landscape']['tasks'])} (seed 0): share of (a1, a2) cells "
                 f"within 10% of the minimum joint loss: AdamW {low_loss_share(grids['adamw']):.2f}, "
                 f"MergOPT {low_loss_share(grids['mergopt']):.2f}")
    return "\n".join(lines)


def _environment() -> str:
    """Date, machine (with its 1-minute load average: other jobs slow a run down), versions."""
    cpu = platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} CPUs{gpu}, "
            f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def write_outputs(results: dict, out_dir, report: str | None = None, command: str = "",
                  wall_s: float | None = None) -> dict[str, Path]:
    """Write ``results.json`` (results plus the summary, the verdicts and the lambda summary),
    ``task_vector_histogram.png``, ``merge_landscape_{adamw,mergopt}.png`` and
    ``lambda_curves.png`` into ``out_dir``, and with ``report`` (``format_report``'s text)
    ``report.md``: the command that made it, date, machine, versions and wall time, the report
    and the figures. Returns their paths by name."""
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
    sweep = results["lambda_sweep"]
    lambdas_entries = lambda_summary(sweep)
    paths["lambda_curves"] = plot_lambda_curves(
        lambdas_entries, sweep["lambdas"], out / "lambda_curves.png",
        title=f"Task arithmetic of the {len(results['tasks'])} experts, mean over {results['config']['seeds']} seed(s)")
    data = {key: value for key, value in results.items() if key != "artifacts"}
    data["summary"] = summarise(results["accuracy"])
    data["verdicts"] = verdicts(results["accuracy"]) + lambda_verdicts(sweep)
    data["lambda_summary"] = lambdas_entries
    data["landscape"]["low_loss_share"] = {kind: low_loss_share(grid) for kind, grid in artifacts["grids"].items()}
    data["landscape"]["color_range"] = list(color_range)
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(data, indent=1))
    if report is not None:
        timing = "" if wall_s is None else f"; wall time {wall_s:.0f} s"
        figures = "\n".join(f"![{name}]({path.name})" for name, path in paths.items() if path.suffix == ".png")
        paths["report"] = out / "report.md"
        paths["report"].write_text(f"# `{command}`\n\n{_environment()}{timing}.\n\n"
                                   f"<!-- not-run: program output -->\n```text\n{report}\n```\n\n{figures}\n")
    return paths
