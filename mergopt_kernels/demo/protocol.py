"""The paper's protocol, shared by the demo's digits and language-model experiments: fit the noise
scale to pilot AdamW task vectors, find the matched-norm AdamW lr per task, fine-tune one expert
per task for every row of ``finetune.OPTIMIZERS`` over several seeds (same base, data order and
noise seed per seed), merge each set of experts, sweep task arithmetic's lambda, score every model
on every task, sweep the noise scale (paper Table 11) and draw the two-expert merge landscape
(Fig. 2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import analysis, merging
from .finetune import MAIN_OPTIMIZERS, OPTIMIZERS, PAPER_ALPHAS, PAPER_K_MAX, Recipe, arm_recipe, mean_abs_scale

StateDict = dict[str, torch.Tensor]

MERGE_SCALING = 0.3  # lambda of task arithmetic, TIES and DARE in the table


def _ties_as_published(base: StateDict, experts: list[StateDict], seed: int) -> StateDict:
    """TIES as the paper's published code runs it: each task vector trimmed to its top 30 %
    magnitudes per tensor, the trimmed vectors summed (no sign election, no disjoint mean)."""
    trimmed = [merging.ties_merging(base, [expert], scaling=1.0, density=0.3, per_tensor=True) for expert in experts]
    return merging.task_arithmetic(base, trimmed, scaling=MERGE_SCALING)


# Merge methods: (base, experts, seed) -> merged state dict. The first four with FusionBench's
# settings, the last two with those of the paper's published code (DARE drop 0.9; TIES above).
MERGES: dict[str, Callable[[StateDict, list[StateDict], int], StateDict]] = {
    "weight_average": lambda base, experts, seed: merging.weight_average(experts),
    "task_arithmetic": lambda base, experts, seed: merging.task_arithmetic(base, experts, scaling=MERGE_SCALING),
    "ties": lambda base, experts, seed: merging.ties_merging(base, experts, scaling=MERGE_SCALING, density=0.2),
    "dare": lambda base, experts, seed: merging.dare(base, experts, scaling=MERGE_SCALING, drop_rate=0.5, seed=seed),
    "ties_paper": _ties_as_published,
    "dare_paper": lambda base, experts, seed: merging.dare(base, experts, scaling=MERGE_SCALING, drop_rate=0.9,
                                                           seed=seed),
}
LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # task arithmetic's lambda sweep, 0.1 .. 1.0
LANDSCAPE_MAX = 2.0  # the landscape grid spans merge coefficients [0, LANDSCAPE_MAX] per expert
MATCH_TOLERANCE = 0.002  # the matched-norm search stops within 0.2 % of MergOPT's norm
MATCH_TRIALS = 4  # at most this many extra pilot runs per task


@dataclass(frozen=True)
class Protocol:
    """What an experiment supplies to ``run_protocol``.

    Attributes:
        base: the pre-trained state dict.
        tasks: task names, at least two.
        lr, weight_decay, distribution: the shared fine-tuning settings (peak lr) and MergOPT's noise
            distribution, from which every row's ``Recipe`` is built (``finetune.arm_recipe``).
        finetune: ``(recipe, task index, seed) -> expert state dict``; the seed sets the data
            order, the noise seed derives from it (``noise_seed``).
        score: ``(state dict, task index) -> score in [0, 1]`` (higher is better).
        joint_loss: ``state dict -> float``, the loss the landscape shows (the first two tasks).
    """

    base: StateDict
    tasks: Sequence[str]
    lr: float
    weight_decay: float
    distribution: str
    finetune: Callable[[Recipe, int, int], StateDict]
    score: Callable[[StateDict, int], float]
    joint_loss: Callable[[StateDict], float]


def check_settings(seeds: int, merges: Sequence[str], noise_scale: float | None, landscape_points: int,
                   epochs: int, noise_offset: float | None = None) -> None:
    """Raise ``ValueError`` for protocol settings ``run_protocol`` cannot run with."""
    unknown = [m for m in merges if m not in MERGES]
    if unknown or not merges:
        raise ValueError(f"merges must be a non-empty subset of {list(MERGES)}, got {list(merges)}")
    for name, value, least in (("seeds", seeds, 1), ("landscape_points", landscape_points, 2), ("epochs", epochs, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if noise_scale is not None and not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    if noise_offset is not None and not noise_offset >= 0:
        raise ValueError(f"noise_offset must be >= 0, got {noise_offset}")


def noise_seed(seed: int, task_index: int) -> int:
    """The MergOPT seed of the expert of task ``task_index`` at fine-tuning seed ``seed``."""
    return (seed << 16) + task_index


def noise_offset_steps(noise_scale: float, lr: float, alphas=PAPER_ALPHAS, k_max: int = PAPER_K_MAX) -> float:
    """MergOPT's noise offset in Adam steps: the mean size of the perturbation, E|s| b with
    s = K alpha - 1 (``mean_abs_scale``), over the peak lr, roughly the size of one Adam step.
    The paper's b = 5e-4 at lr 2e-5 gives about 21."""
    if not (lr > 0 and noise_scale >= 0):
        raise ValueError(f"lr must be > 0 and noise_scale >= 0, got {lr}, {noise_scale}")
    return mean_abs_scale(alphas, k_max) * noise_scale / lr


def noise_scale_for_offset(offset: float, lr: float, alphas=PAPER_ALPHAS, k_max: int = PAPER_K_MAX) -> float:
    """The b whose noise offset (``noise_offset_steps``) at peak lr ``lr`` is ``offset`` Adam steps."""
    return offset * lr / mean_abs_scale(alphas, k_max)


def _max_abs_diff(a: StateDict, b: StateDict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def task_vector_norm(base: StateDict, expert: StateDict) -> float:
    """L2 norm of the task vector ``expert - base`` over all float entries."""
    return float(analysis.task_vector(base, expert).double().norm())


def match_lr(norm_at: Callable[[float], float], lr: float, norm: float, target: float,
             tolerance: float = MATCH_TOLERANCE, trials: int = MATCH_TRIALS) -> dict:
    """The lr at which ``norm_at(lr)`` (a task vector's norm) comes closest to ``target``.

    Secant steps on log(norm) against log(lr), starting from ``(lr, norm)`` and the guess
    ``lr * target / norm`` (Adam's steps scale with the lr); at most ``trials`` calls of
    ``norm_at``, fewer once one lands within ``tolerance`` (relative) of ``target``.

    Returns:
        ``{"lr", "norm", "ratio" (norm / target), "tried" ([lr, norm] pairs in order)}`` for the
        tried lr (``lr`` included) whose norm is closest to ``target`` in log scale.
    """
    if not (target > 0 and norm > 0 and lr > 0):
        raise ValueError(f"lr, norm and target must be > 0, got {lr}, {norm}, {target}")
    tried = [(lr, norm)]
    guess = lr * target / norm
    for _ in range(trials):
        if abs(tried[-1][1] / target - 1.0) <= tolerance:
            break
        tried.append((guess, norm_at(guess)))
        (lr0, n0), (lr1, n1) = tried[-2], tried[-1]
        slope = math.log(n1 / n0) / math.log(lr1 / lr0) if lr1 != lr0 and n1 != n0 else 1.0
        guess = lr1 * (target / n1) ** (1.0 / (slope if slope > 0.05 else 1.0))
    best_lr, best_norm = min(tried, key=lambda pair: abs(math.log(pair[1] / target)))
    return {"lr": best_lr, "norm": best_norm, "ratio": best_norm / target, "tried": [list(pair) for pair in tried]}


def sweep_scales(fitted: float, paper_values: Sequence[float], multiples: Sequence[float]) -> list[dict]:
    """The noise scales of the sweep: the paper's values, then multiples of the fitted ``b``
    (each ``{"b", "label"}``), in that order."""
    return ([{"b": float(b), "label": f"paper {b:g}"} for b in paper_values]
            + [{"b": float(m * fitted), "label": f"{m:g} x fitted"} for m in multiples])


def run_protocol(protocol: Protocol, seeds: int, merges: Sequence[str], noise_scale: float | None,
                 landscape_points: int, sweep: tuple[Sequence[float], Sequence[float]] = ((), ()),
                 progress: bool = True, controls: bool = True, noise_offset: float | None = None) -> dict:
    """Run the protocol and return its results (JSON-serialisable apart from ``"artifacts"``).

    Args:
        protocol: the experiment's base, tasks, fine-tuning, scoring and landscape loss.
        seeds: fine-tuning seeds 0..seeds-1.
        merges: keys of ``MERGES``.
        noise_scale: MergOPT's b; ``None`` uses the Laplace fit of the seed-0 AdamW task vectors,
            or ``noise_offset``.
        noise_offset: with ``noise_scale=None``, the b whose offset (``noise_offset``) is this many
            Adam steps at the protocol's lr, instead of the fit (which is still made and reported).
        landscape_points: points per axis of the landscape over [0, LANDSCAPE_MAX]^2 (seed 0).
        sweep: (paper values of b, multiples of the fitted b) for the seed-0 sweep; empty: none.
        progress: show progress bars.
        controls: also run the four control rows (``OPTIMIZERS[3:]``); else AdamW, MergOPT and
            the noise-off control only.
    Returns:
        ``optimizers`` (the rows run), ``noise`` (scale used, its source, its offset and the fitted
        b's, fit), ``matched_norm`` (per task the
        lr search's result, see ``match_lr``; empty without controls), ``accuracy`` (row ->
        per-seed lists of per-task scores), ``lambda_sweep`` (``lambdas`` and per optimizer
        ``[seed][lambda][task]`` scores of task arithmetic), ``control_max_abs_diff`` (per seed),
        ``sweep`` (per b: row -> per-task scores of seed 0), ``landscape`` and ``artifacts``
        (task-vector sample, fit, grids, coefficients).
    """
    base, count = protocol.base, len(protocol.tasks)
    kinds = OPTIMIZERS if controls else MAIN_OPTIMIZERS
    scales = sweep_scales(1.0, *sweep)  # sizes the bar; the multiples get the fitted b below
    experts: dict[tuple[Recipe, int, int], StateDict] = {}
    bar = tqdm(total=(seeds * len(kinds) + len(scales)) * count, desc="fine-tuning", unit="run",
               disable=not progress)

    def train_one(recipe: Recipe, seed: int, index: int) -> StateDict:
        key = (recipe, seed, index)
        if key not in experts:
            experts[key] = protocol.finetune(recipe, index, seed)
            bar.update()
        return experts[key]

    def recipe(kind: str, scale: float, matched_lr: float | None = None) -> Recipe:
        return arm_recipe(kind, protocol.lr, protocol.weight_decay, scale, protocol.distribution, matched_lr)

    def train(kind: str, seed: int, scale: float, matched: Sequence[float] | None = None) -> list[StateDict]:
        """The experts of row ``kind`` for every task (``matched``: the matched lr per task)."""
        return [train_one(recipe(kind, scale, None if matched is None else matched[index]), seed, index)
                for index in range(count)]

    def score_all(state: StateDict) -> list[float]:
        return [protocol.score(state, index) for index in range(count)]

    pilot = train("adamw", 0, 0.0)
    pooled = torch.cat([analysis.task_vector(base, expert) for expert in pilot])
    fit = analysis.fit_laplace(pooled)
    if noise_scale is not None:
        scale, source = noise_scale, "--noise-scale"
    elif noise_offset is not None:
        scale = noise_scale_for_offset(noise_offset, protocol.lr)
        source = f"offset of {noise_offset:g} Adam steps"
    else:
        scale, source = fit.b, "laplace fit"

    matched_norm, matched = [], None
    if controls:  # fixed from seed 0's norms only, before any score is computed
        for index, (adamw, mergopt) in enumerate(zip(pilot, train("mergopt", 0, scale))):
            def norm_at(lr: float, index=index) -> float:
                bar.total += 1
                return task_vector_norm(base, train_one(recipe("adamw_matched", scale, lr), 0, index))

            matched_norm.append(match_lr(norm_at, protocol.lr, task_vector_norm(base, adamw),
                                         task_vector_norm(base, mergopt)))
        matched = [entry["lr"] for entry in matched_norm]

    accuracy: dict[str, list[list[float]]] = {"pre-trained": [score_all(base)]}
    control_diff = []
    for seed in range(seeds):
        for kind in kinds:
            accuracy.setdefault(f"individual/{kind}", []).append(
                [protocol.score(state, index) for index, state in enumerate(train(kind, seed, scale, matched))])
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
        for kind in kinds:
            accuracy[f"{merge}/{kind}"] = [score_all(MERGES[merge](base, train(kind, seed, scale, matched), seed))
                                           for seed in range(seeds)]
    lambda_scores = {kind: [[score_all(merging.task_arithmetic(base, train(kind, seed, scale, matched), scaling=lam))
                             for lam in LAMBDAS] for seed in range(seeds)]
                     for kind in tqdm(kinds, desc="lambda sweep", unit="row", disable=not progress)}

    coefficients = np.linspace(0.0, LANDSCAPE_MAX, landscape_points)
    grids = {kind: analysis.merge_loss_landscape(protocol.joint_loss, base, *train(kind, 0, scale)[:2], coefficients)
             for kind in tqdm(("adamw", "mergopt"), desc="landscape", disable=not progress)}
    return {
        "optimizers": list(kinds),
        "noise": {"scale": scale, "source": source, "offset": noise_offset_steps(scale, protocol.lr),
                  "fitted_offset": noise_offset_steps(fit.b, protocol.lr),
                  "fit": {"mu": fit.mu, "b": fit.b, "ks_statistic": fit.ks_statistic,
                          "avg_log_likelihood": fit.avg_log_likelihood, "n": fit.n}},
        "matched_norm": matched_norm,
        "accuracy": accuracy,
        "lambda_sweep": {"lambdas": list(LAMBDAS), "scores": lambda_scores},
        "control_max_abs_diff": control_diff,
        "sweep": sweep_results,
        "landscape": {"tasks": list(protocol.tasks[:2]), "coefficients": coefficients.tolist(),
                      **{kind: grid.tolist() for kind, grid in grids.items()}},
        "artifacts": {"task_vector": pooled, "fit": fit, "grids": grids, "coefficients": coefficients},
    }
