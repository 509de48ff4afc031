"""The demo experiment: pre-train a base, calibrate the noise scale, fine-tune experts with
AdamW, MergOPT, the noise-off control and the four controls of ``finetune`` over several seeds,
merge each set of experts, and evaluate every model on every task (paper Table 1, Fig. 1 and
Fig. 2 at toy scale)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .finetune import FinetuneConfig, Recipe, finetune_recipe
from .model import PretrainConfig, pretrain, task_accuracy, task_loss
from .protocol import MERGES, Protocol, check_settings, StateDict, noise_seed, run_protocol
from .tasks import DEFAULT_TASKS, VIEWS, check_task_names, load_digit_splits, make_tasks


@dataclass
class DemoConfig:
    """Everything the demo's results depend on.

    Attributes:
        tasks: task names (keys of ``tasks.VIEWS``), at least two.
        seeds: number of fine-tuning seeds (data order, noise and DARE masks); seeds 0..n-1.
        noise_scale: MergOPT's ``b``; ``None`` fits a Laplace to the task vectors of pilot AdamW
            fine-tunes (those of seed 0) and uses its ``b``, as the paper chose its ``b``.
        noise_offset: with ``noise_scale=None``, set ``b`` so that the noise offset
            (``protocol.noise_offset_steps``) is this many Adam steps; ``None``: the fitted ``b``.
        distribution: ``"laplace"`` or ``"gaussian"`` noise.
        merges: merge methods (keys of ``MERGES``).
        controls: also run the four control rows (matched norm, Gaussian, fixed s, constant lr).
        landscape_points: grid size per axis of the two-expert merge landscape over
            [0, protocol.LANDSCAPE_MAX]^2 (seed 0, the first two tasks).
        device: torch device for training and evaluation.
        progress: show tqdm progress bars.
    """

    tasks: tuple[str, ...] = DEFAULT_TASKS
    seeds: int = 10
    noise_scale: float | None = None
    noise_offset: float | None = None
    distribution: str = "laplace"
    merges: tuple[str, ...] = tuple(MERGES)
    controls: bool = True
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    landscape_points: int = 11
    device: str = "cpu"
    progress: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` for settings the experiment cannot run with."""
        check_task_names(self.tasks)
        check_settings(self.seeds, self.merges, self.noise_scale, self.landscape_points, self.finetune.epochs,
                       self.noise_offset)


def quick_config(**overrides) -> DemoConfig:
    """A configuration that runs every stage in seconds: one seed, one epoch, a 5x5 landscape."""
    settings = dict(seeds=1, landscape_points=5, finetune=FinetuneConfig(epochs=1))
    settings.update(overrides)
    return DemoConfig(**settings)


def run_demo(config: DemoConfig) -> dict:
    """Run the digits experiment and return its results (JSON-serialisable, plus ``"artifacts"``:
    tensors and grids for the figures, which ``report.write_outputs`` consumes).

    Result keys: those of ``protocol.run_protocol`` (``sweep`` empty here) plus ``config``,
    ``tasks`` and ``wall_time_s``.
    """
    config.check()
    start = time.perf_counter()
    device = torch.device(config.device)
    splits = load_digit_splits()
    tasks = [task.to(device) for task in make_tasks(config.tasks, splits)]
    # The base is pre-trained on every view, whichever tasks are chosen.
    model, base = pretrain(make_tasks(VIEWS, splits), config.pretrain, device)

    def expert(recipe: Recipe, index: int, seed: int) -> StateDict:
        return finetune_recipe(model, base, tasks[index], recipe, config.finetune, data_seed=seed,
                               noise_seed=noise_seed(seed, index))

    def score(state: StateDict, index: int) -> float:
        model.load_state_dict(state)
        return task_accuracy(model, tasks[index])

    def joint_loss(state: StateDict) -> float:
        model.load_state_dict(state)
        return task_loss(model, tasks[0]) + task_loss(model, tasks[1])

    protocol = Protocol(base, config.tasks, config.finetune.lr, config.finetune.weight_decay, config.distribution,
                        expert, score, joint_loss)
    results = run_protocol(protocol, config.seeds, config.merges, config.noise_scale, config.landscape_points,
                           progress=config.progress, controls=config.controls, noise_offset=config.noise_offset)
    return {"config": asdict(config), "tasks": [task.name for task in tasks], **results,
            "wall_time_s": time.perf_counter() - start}
