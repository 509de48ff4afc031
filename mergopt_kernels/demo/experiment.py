"""The demo experiment: pre-train a base, calibrate the noise scale, fine-tune experts with
AdamW, MergOPT and the noise-off control over several seeds, merge each set of experts, and
evaluate every model on every task (paper Table 1, Fig. 1 and Fig. 2 at toy scale)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import analysis, merging
from .finetune import OPTIMIZERS, FinetuneConfig, finetune
from .model import PretrainConfig, pretrain, task_accuracy, task_loss
from .tasks import DEFAULT_TASKS, VIEWS, Task, check_task_names, load_digit_splits, make_tasks

StateDict = dict[str, torch.Tensor]

# Merge methods with the paper's settings: (base, experts, seed) -> merged state dict.
MERGES: dict[str, Callable[[StateDict, list[StateDict], int], StateDict]] = {
    "weight_average": lambda base, experts, seed: merging.weight_average(experts),
    "task_arithmetic": lambda base, experts, seed: merging.task_arithmetic(base, experts, scaling=0.3),
    "ties": lambda base, experts, seed: merging.ties_merging(base, experts, scaling=0.3, density=0.2),
    "dare": lambda base, experts, seed: merging.dare(base, experts, scaling=0.3, drop_rate=0.5, seed=seed),
}
LANDSCAPE_MAX = 2.0  # the landscape grid spans merge coefficients [0, LANDSCAPE_MAX] per expert


@dataclass
class DemoConfig:
    """Everything the demo's results depend on.

    Attributes:
        tasks: task names (keys of ``tasks.VIEWS``), at least two.
        seeds: number of fine-tuning seeds (data order, noise and DARE masks); seeds 0..n-1.
        noise_scale: MergOPT's ``b``; ``None`` fits a Laplace to the task vectors of pilot AdamW
            fine-tunes (those of seed 0) and uses its ``b``, as the paper chose its ``b``.
        distribution: ``"laplace"`` or ``"gaussian"`` noise.
        merges: merge methods (keys of ``MERGES``).
        landscape_points: grid size per axis of the two-expert merge landscape over
            [0, LANDSCAPE_MAX]^2 (seed 0, the first two tasks).
        device: torch device for training and evaluation.
        progress: show tqdm progress bars.
    """

    tasks: tuple[str, ...] = DEFAULT_TASKS
    seeds: int = 10
    noise_scale: float | None = None
    distribution: str = "laplace"
    merges: tuple[str, ...] = tuple(MERGES)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    landscape_points: int = 11
    device: str = "cpu"
    progress: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` for settings the experiment cannot run with."""
        check_task_names(self.tasks)
        unknown = [m for m in self.merges if m not in MERGES]
        if unknown or not self.merges:
            raise ValueError(f"merges must be a non-empty subset of {list(MERGES)}, got {list(self.merges)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.noise_scale is not None and not self.noise_scale >= 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}")
        if self.landscape_points < 2:
            raise ValueError(f"landscape_points must be >= 2, got {self.landscape_points}")
        if self.finetune.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.finetune.epochs}")


def quick_config(**overrides) -> DemoConfig:
    """A configuration that runs every stage in seconds: one seed, one epoch, a 5x5 landscape."""
    settings = dict(seeds=1, landscape_points=5, finetune=FinetuneConfig(epochs=1))
    settings.update(overrides)
    return DemoConfig(**settings)


def _evaluate(model: torch.nn.Module, state: StateDict, tasks: list[Task]) -> list[float]:
    model.load_state_dict(state)
    return [task_accuracy(model, task) for task in tasks]


def _max_abs_diff(a: StateDict, b: StateDict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def run_demo(config: DemoConfig) -> dict:
    """Run the experiment and return its results (JSON-serialisable, plus ``"artifacts"``:
    tensors and grids for the figures, which ``report.write_outputs`` consumes).

    Result keys: ``config``, ``tasks``, ``noise`` (the scale used and the Laplace fit),
    ``accuracy`` (row -> per-seed lists of per-task accuracies), ``control_max_abs_diff``
    (per seed, the largest |control - AdamW| weight over all experts), ``landscape``,
    ``wall_time_s``.
    """
    config.check()
    start = time.perf_counter()
    device = torch.device(config.device)
    splits = load_digit_splits()
    tasks = [task.to(device) for task in make_tasks(config.tasks, splits)]
    # The base is pre-trained on every view, whichever tasks are chosen.
    model, base = pretrain(make_tasks(VIEWS, splits), config.pretrain, device)

    accuracy: dict[str, list[list[float]]] = {"pre-trained": [_evaluate(model, base, tasks)]}
    experts: dict[tuple[str, int], list[StateDict]] = {}
    bar = tqdm(total=config.seeds * len(tasks) * len(OPTIMIZERS), desc="fine-tuning", unit="run",
               disable=not config.progress)

    def train_experts(kind: str, seed: int, noise_scale: float) -> list[StateDict]:
        if (kind, seed) not in experts:
            runs = []
            for index, task in enumerate(tasks):
                runs.append(finetune(model, base, task, kind, config.finetune, data_seed=seed,
                                     noise_scale=noise_scale, distribution=config.distribution,
                                     noise_seed=(seed << 16) + index))
                bar.update()
            experts[kind, seed] = runs
        return experts[kind, seed]

    # Noise scale: the paper fitted Laplace(mu, b) to task vectors of AdamW fine-tunes.
    pilot = train_experts("adamw", 0, 0.0)
    pooled = torch.cat([analysis.task_vector(base, expert) for expert in pilot])
    fit = analysis.fit_laplace(pooled)
    noise_scale = fit.b if config.noise_scale is None else config.noise_scale

    control_diff = []
    for seed in range(config.seeds):
        for kind in OPTIMIZERS:
            runs = train_experts(kind, seed, noise_scale)
            accuracy.setdefault(f"individual/{kind}", []).append(
                [_evaluate(model, state, [task])[0] for state, task in zip(runs, tasks)])
        control_diff.append(max(_max_abs_diff(c, a) for c, a in zip(experts["control", seed], experts["adamw", seed])))
    bar.close()

    for merge in tqdm(config.merges, desc="merging", unit="method", disable=not config.progress):
        for kind in OPTIMIZERS:
            accuracy[f"{merge}/{kind}"] = [_evaluate(model, MERGES[merge](base, experts[kind, seed], seed), tasks)
                                           for seed in range(config.seeds)]

    coefficients = np.linspace(0.0, LANDSCAPE_MAX, config.landscape_points)

    def joint_loss(state: StateDict) -> float:
        model.load_state_dict(state)
        return task_loss(model, tasks[0]) + task_loss(model, tasks[1])

    grids = {kind: analysis.merge_loss_landscape(joint_loss, base, experts[kind, 0][0], experts[kind, 0][1],
                                                 coefficients)
             for kind in tqdm(("adamw", "mergopt"), desc="landscape", disable=not config.progress)}

    return {
        "config": asdict(config),
        "tasks": [task.name for task in tasks],
        "noise": {"scale": noise_scale, "source": "laplace fit" if config.noise_scale is None else "--noise-scale",
                  "fit": {"mu": fit.mu, "b": fit.b, "ks_statistic": fit.ks_statistic,
                          "avg_log_likelihood": fit.avg_log_likelihood, "n": fit.n}},
        "accuracy": accuracy,
        "control_max_abs_diff": control_diff,
        "landscape": {"tasks": [tasks[0].name, tasks[1].name], "coefficients": coefficients.tolist(),
                      **{kind: grid.tolist() for kind, grid in grids.items()}},
        "wall_time_s": time.perf_counter() - start,
        "artifacts": {"task_vector": pooled, "fit": fit, "grids": grids, "coefficients": coefficients},
    }
