"""The paper's protocol, shared by the demo's digits and language-model experiments: fit the noise
scale to pilot AdamW task vectors, fine-tune one expert per task with AdamW, MergOPT and the
noise-off control over several seeds, merge each set of experts, score every model on every task,
sweep the noise scale (paper Table 11) and draw the two-expert merge landscape (Fig. 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import analysis, merging
from .finetune import OPTIMIZERS

StateDict = dict[str, torch.Tensor]

# Merge methods with the paper's settings: (base, experts, seed) -> merged state dict.
MERGES: dict[str, Callable[[StateDict, list[StateDict], int], StateDict]] = {
    "weight_average": lambda base, experts, seed: merging.weight_average(experts),
    "task_arithmetic": lambda base, experts, seed: merging.task_arithmetic(base, experts, scaling=0.3),
    "ties": lambda base, experts, seed: merging.ties_merging(base, experts, scaling=0.3, density=0.2),
    "dare": lambda base, experts, seed: merging.dare(base, experts, scaling=0.3, drop_rate=0.5, seed=seed),
}
LANDSCAPE_MAX = 2.0  # the landscape grid spans merge coefficients [0, LANDSCAPE_MAX] per expert


@dataclass(frozen=True)
class Protocol:
    """What an experiment supplies to ``run_protocol``.

    Attributes:
        base: the pre-trained state dict.
        tasks: task names, at least two.
        finetune: ``(kind, task index, seed, noise scale) -> expert state dict`` for a kind of
            ``OPTIMIZERS``; the seed sets the data order, the noise seed derives from it.
        score: ``(state dict, task index) -> score in [0, 1]`` (higher is better).
        joint_loss: ``state dict -> float``, the loss the landscape shows (the first two tasks).
    """

    base: StateDict
    tasks: Sequence[str]
    finetune: Callable[[str, int, int, float], StateDict]
    score: Callable[[StateDict, int], float]
    joint_loss: Callable[[StateDict], float]


def check_settings(seeds: int, merges: Sequence[str], noise_scale: float | None, landscape_points: int,
                   epochs: int) -> None:
    """Raise ``ValueError`` for protocol settings ``run_protocol`` cannot run with."""
    unknown = [m for m in merges if m not in MERGES]
    if unknown or not merges:
        raise ValueError(f"merges must be a non-empty subset of {list(MERGES)}, got {list(merges)}")
    for name, value, least in (("seeds", seeds, 1), ("landscape_points", landscape_points, 2), ("epochs", epochs, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if noise_scale is not None and not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")


def noise_seed(seed: int, task_index: int) -> int:
    """The MergOPT seed of the expert of task ``task_index`` at fine-tuning seed ``seed``."""
    return (seed << 16) + task_index


def _max_abs_diff(a: StateDict, b: StateDict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def sweep_scales(fitted: float, paper_values: Sequence[float], multiples: Sequence[float]) -> list[dict]:
    """The noise scales of the sweep: the paper's values, then multiples of the fitted ``b``
    (each ``{"b", "label"}``), in that order."""
    return ([{"b": float(b), "label": f"paper {b:g}"} for b in paper_values]
            + [{"b": float(m * fitted), "label": f"{m:g} x fitted"} for m in multiples])


def run_protocol(protocol: Protocol, seeds: int, merges: Sequence[str], noise_scale: float | None,
                 landscape_points: int, sweep: tuple[Sequence[float], Sequence[float]] = ((), ()),
                 progress: bool = True) -> dict:
    """Run the protocol and return its results (JSON-serialisable apart from ``"artifacts"``).

    Args:
        protocol: the experiment's base, tasks, fine-tuning, scoring and landscape loss.
        seeds: fine-tuning seeds 0..seeds-1.
        merges: keys of ``MERGES``.
        noise_scale: MergOPT's b; ``None`` uses the Laplace fit of the seed-0 AdamW task vectors.
        landscape_points: points per axis of the landscape over [0, LANDSCAPE_MAX]^2 (seed 0).
        sweep: (paper values of b, multiples of the fitted b) for the seed-0 sweep; empty: none.
        progress: show progress bars.
    Returns:
        ``noise`` (scale used, fit), ``accuracy`` (row -> per-seed lists of per-task scores),
        ``control_max_abs_diff`` (per seed), ``sweep`` (per b: row -> per-task scores of seed 0),
        ``landscape`` and ``artifacts`` (task-vector sample, fit, grids, coefficients).
    """
    base, count = protocol.base, len(protocol.tasks)
    scales = sweep_scales(1.0, *sweep)  # sizes the bar; the multiples get the fitted b below
    experts: dict[tuple[str, int, float], list[StateDict]] = {}
    bar = tqdm(total=(seeds * len(OPTIMIZERS) + len(scales)) * count, desc="fine-tuning", unit="run",
               disable=not progress)

    def train(kind: str, seed: int, scale: float) -> list[StateDict]:
        key = (kind, seed, scale if kind == "mergopt" else 0.0)
        if key not in experts:
            runs = []
            for index in range(count):
                runs.append(protocol.finetune(kind, index, seed, key[2]))
                bar.update()
            experts[key] = runs
        return experts[key]

    def score_all(state: StateDict) -> list[float]:
        return [protocol.score(state, index) for index in range(count)]

    pilot = train("adamw", 0, 0.0)
    pooled = torch.cat([analysis.task_vector(base, expert) for expert in pilot])
    fit = analysis.fit_laplace(pooled)
    scale = fit.b if noise_scale is None else noise_scale

    accuracy: dict[str, list[list[float]]] = {"pre-trained": [score_all(base)]}
    control_diff = []
    for seed in range(seeds):
        for kind in OPTIMIZERS:
            runs = train(kind, seed, scale)
            accuracy.setdefault(f"individual/{kind}", []).append(
                [protocol.score(state, index) for index, state in enumerate(runs)])
        control_diff.append(max(_max_abs_diff(c, a) for c, a in zip(train("control", seed, scale),
                                                                          train("adamw", seed, scale))))
    sweep_results = []
    for entry in sweep_scales(fit.b, *sweep):
        runs = train("mergopt", 0, entry["b"])
        sweep_results.append({**entry, "scores": {
            "individual": [protocol.score(state, index) for index, state in enumerate(runs)],
            **{merge: score_all(MERGES[merge](base, runs, 0)) for merge in merges}}})
    bar.close()

    for merge in tqdm(merges, desc="merging", unit="method", disable=not progress):
        for kind in OPTIMIZERS:
            accuracy[f"{merge}/{kind}"] = [score_all(MERGES[merge](base, train(kind, seed, scale), seed))
                                           for seed in range(seeds)]

    coefficients = np.linspace(0.0, LANDSCAPE_MAX, landscape_points)
    grids = {kind: analysis.merge_loss_landscape(protocol.joint_loss, base, *train(kind, 0, scale)[:2], coefficients)
             for kind in tqdm(("adamw", "mergopt"), desc="landscape", disable=not progress)}
    return {
        "noise": {"scale": scale, "source": "laplace fit" if noise_scale is None else "--noise-scale",
                  "fit": {"mu": fit.mu, "b": fit.b, "ks_statistic": fit.ks_statistic,
                          "avg_log_likelihood": fit.avg_log_likelihood, "n": fit.n}},
        "accuracy": accuracy,
        "control_max_abs_diff": control_diff,
        "sweep": sweep_results,
        "landscape": {"tasks": list(protocol.tasks[:2]), "coefficients": coefficients.tolist(),
                      **{kind: grid.tolist() for kind, grid in grids.items()}},
        "artifacts": {"task_vector": pooled, "fit": fit, "grids": grids, "coefficients": coefficients},
    }
