"""The language-model experiment (``demo --protocol lm``): pre-train a small GPT-style LM on the
mixture of seven sequence tasks (or load it from the cache), then run the paper's protocol with
seven experts (K_max = 7): AdamW, MergOPT, the noise-off control and the four controls of
``finetune``, the merges, task arithmetic's lambda sweep, the noise-scale sweep of Table 11 and
the merge landscape of the first two tasks."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .finetune import Recipe, train_recipe
from .lm_model import (GPTConfig, LMPretrainConfig, count_parameters, lm_loss, load_or_pretrain, task_metric,
                       task_test_loss)
from .lm_tasks import LM_TASKS, Sequences, make_lm_task, pretraining_mixture, vocab_size
from .protocol import MERGES, Protocol, StateDict, check_settings, noise_seed, run_protocol
from .tasks import check_task_names

PAPER_SWEEP = (5e-4, 1e-3, 5e-2)  # the noise scales of the paper's Table 11
FITTED_MULTIPLES = (0.5, 2.0)


# The regime of the default run, fixed from seed-0 calibration runs (``tools/lm_calibration.py``,
# the calibration table of docs/experiments.md) before the 5-seed run: a 3-layer model whose base,
# pre-trained for 340 steps, leaves room (the seed-0 AdamW experts gain 16.3 points over it and
# the four merges keep 0.31 of that gain on average), fine-tuning at batch 12 and lr 3e-4, and b
# set so that the noise offset E|s| b / lr is 20 Adam steps (the paper's 5e-4 at lr 2e-5: 21).
REGIME_MODEL = GPTConfig(width=64, layers=3, heads=4, context=64)
"""The default run's model shape (about 160k parameters)."""
REGIME_PRETRAIN_STEPS = 340
"""Pre-training steps of the default run's base model (the seed-0 AdamW experts gain 16.3
points over a base pre-trained this long)."""
REGIME_NOISE_OFFSET = 20.0
"""The default run's noise offset E|s| b / lr in Adam steps, which sets b (the paper's 5e-4 at
lr 2e-5: about 21)."""


@dataclass(frozen=True)
class LMFinetuneConfig:
    """Fine-tuning of one expert, the same for every row of the table: the paper's recipe (AdamW,
    weight decay 1e-3, a few epochs) with the lr scaled up for a model of ~10^5 rather than 10^9
    parameters and batch 12 rather than 8 (both from the calibration), and a linear warm-up
    (first tenth) then linear decay to 0."""

    train_examples: int = 480
    epochs: int = 3
    batch_size: int = 12
    lr: float = 3e-4
    weight_decay: float = 1e-3


@dataclass
class LMDemoConfig:
    """Everything the LM experiment's results depend on.

    Attributes:
        tasks: task names (``lm_tasks.LM_TASKS``), at least two; the base is pre-trained on all.
        seeds: fine-tuning seeds 0..seeds-1 (data order, noise, DARE masks).
        noise_scale: MergOPT's b; ``None``: set by ``noise_offset``, or without it the Laplace fit
            of the seed-0 AdamW task vectors (the fit is made and reported either way).
        noise_offset: with ``noise_scale=None``, the b whose noise offset E|s| b / lr
            (``protocol.noise_offset_steps``) is this many Adam steps; ``None``: the fitted b.
        distribution: ``"laplace"`` or ``"gaussian"``.
        merges: keys of ``MERGES``.
        controls: also run the four control rows (matched norm, Gaussian, fixed s, constant lr).
        sweep: the b values swept at seed 0: (paper values, multiples of the fitted b).
        model, pretrain: the base's shape and pre-training (both part of the cache key).
        pretrain_examples: pre-training examples per task.
        finetune: the experts' fine-tuning.
        test_examples: held-out examples per task.
        landscape_points: points per axis of the landscape of the first two tasks (seed 0).
        cache_dir: folder of the pre-trained bases (``None``: no cache).
        device, progress: torch device; progress bars.
    """

    tasks: tuple[str, ...] = LM_TASKS
    seeds: int = 5
    noise_scale: float | None = None
    noise_offset: float | None = REGIME_NOISE_OFFSET
    distribution: str = "laplace"
    merges: tuple[str, ...] = tuple(MERGES)
    controls: bool = True
    sweep: tuple[tuple[float, ...], tuple[float, ...]] = (PAPER_SWEEP, FITTED_MULTIPLES)
    model: GPTConfig = REGIME_MODEL
    pretrain: LMPretrainConfig = field(default_factory=lambda: LMPretrainConfig(steps=REGIME_PRETRAIN_STEPS))
    pretrain_examples: int = 4000
    finetune: LMFinetuneConfig = field(default_factory=LMFinetuneConfig)
    test_examples: int = 200
    landscape_points: int = 11
    cache_dir: str | None = None
    device: str = "cpu"
    progress: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` for settings the experiment cannot run with."""
        check_task_names(self.tasks, LM_TASKS)
        check_settings(self.seeds, self.merges, self.noise_scale, self.landscape_points, self.finetune.epochs,
                       self.noise_offset)
        for name, value in (("pretrain_examples", self.pretrain_examples), ("test_examples", self.test_examples),
                            ("finetune.train_examples", self.finetune.train_examples)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def lm_quick_config(**overrides) -> LMDemoConfig:
    """Every stage in well under two minutes on 2 CPU cores: one seed, a shorter pre-training,
    one epoch, fewer test examples, the sweep's paper values only, a 5x5 landscape."""
    settings = dict(seeds=1, pretrain=LMPretrainConfig(steps=300), pretrain_examples=1000,
                    finetune=LMFinetuneConfig(train_examples=320, epochs=1), test_examples=100,
                    sweep=(PAPER_SWEEP[:1], ()), landscape_points=5)
    settings.update(overrides)
    return LMDemoConfig(**settings)


def lm_gpu_config(**overrides) -> LMDemoConfig:
    """The larger configuration for one GPU: a 25.3M-parameter base (width 512, 8 layers) with
    longer pre-training and more data, batch 16 and the fitted b. Its run time is not measured,
    and it is not calibrated like the default."""
    settings = dict(model=GPTConfig(width=512, layers=8, heads=8, context=64),
                    pretrain=LMPretrainConfig(steps=3000, batch_size=64, lr=6e-4), pretrain_examples=20000,
                    finetune=LMFinetuneConfig(lr=3e-4, batch_size=16), test_examples=500,
                    noise_offset=None, device="cuda")
    settings.update(overrides)
    return LMDemoConfig(**settings)


def _epochs(data: Sequences, config: LMFinetuneConfig, seed: int):
    gen = torch.Generator().manual_seed(seed)
    count = data.tokens.shape[0]
    for _ in range(config.epochs):
        order = torch.randperm(count, generator=gen).to(data.tokens.device)
        for start in range(0, count, config.batch_size):
            yield data.select(order[start:start + config.batch_size])


def run_lm_demo(config: LMDemoConfig) -> dict:
    """Run the LM experiment and return its results (JSON-serialisable apart from ``"artifacts"``).

    Result keys: those of ``protocol.run_protocol`` plus ``config``, ``tasks``, ``metric`` (per
    task: ``"exact match"`` or ``"next-char accuracy"``), ``base`` (parameters, cache, held-out
    losses), ``wall_time_s``.
    """
    config.check()
    start = time.perf_counter()
    device = torch.device(config.device)
    tasks = [make_lm_task(name, config.finetune.train_examples, config.test_examples).to(device)
             for name in config.tasks]
    mixture = pretraining_mixture(LM_TASKS, config.pretrain_examples).to(device)
    model, base, cache = load_or_pretrain(mixture, config.model, config.pretrain, device, config.cache_dir,
                                          config.progress)
    steps = config.finetune.epochs * -(-config.finetune.train_examples // config.finetune.batch_size)

    def expert(recipe: Recipe, index: int, seed: int) -> StateDict:
        return train_recipe(model, base, recipe, _epochs(tasks[index].train, config.finetune, seed), steps, lm_loss,
                            noise_seed(seed, index))

    def score(state: StateDict, index: int) -> float:
        model.load_state_dict(state)
        return task_metric(model, tasks[index])

    def joint_loss(state: StateDict) -> float:
        model.load_state_dict(state)
        return task_test_loss(model, tasks[0]) + task_test_loss(model, tasks[1])

    model.load_state_dict(base)
    base_losses = {task.name: task_test_loss(model, task) for task in tasks}
    protocol = Protocol(base, config.tasks, config.finetune.lr, config.finetune.weight_decay, config.distribution,
                        expert, score, joint_loss)
    results = run_protocol(protocol, config.seeds, config.merges, config.noise_scale, config.landscape_points,
                           config.sweep, config.progress, config.controls, config.noise_offset)
    return {"config": asdict(config), "tasks": list(config.tasks),
            "metric": {task.name: "exact match" if task.answer_length else "next-char accuracy" for task in tasks},
            "base": {"parameters": count_parameters(config.model, vocab_size()), "cache": cache,
                     "test_loss": base_losses},
            **results, "wall_time_s": time.perf_counter() - start}


__all__ = ["LMDemoConfig", "LMFinetuneConfig", "REGIME_MODEL", "REGIME_NOISE_OFFSET", "REGIME_PRETRAIN_STEPS", "lm_quick_config", "lm_gpu_config", "run_lm_demo"]
