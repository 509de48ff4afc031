"""Fine-tuning one expert: the same data order, initial weights and noise seed for every row of
the table, so that AdamW, MergOPT and the controls differ only in what their ``Recipe`` says.

The rows (``OPTIMIZERS``) and what each trains:

* ``adamw``: torch.optim.AdamW, linear warm-up over the first tenth of the steps, then linear
  decay to 0.
* ``mergopt``: FusedMergOptAdamW with noise scale ``b`` (paper: Laplace, alpha in 0.1..0.6,
  K in 1..7), the same schedule.
* ``control``: FusedMergOptAdamW with the noise off; it must follow AdamW's trajectory.
* ``adamw_matched``: AdamW at a per-task lr, found so that the task vector's norm matches
  MergOPT's (``protocol.match_lr``): does MergOPT act only by shrinking the task vectors?
* ``mergopt_gaussian``: MergOPT with Gaussian noise of the same variance as its Laplace noise
  (std ``sqrt(2) b``).
* ``mergopt_fixed_s``: MergOPT with ``K = 1`` and one alpha, so that ``s = K alpha - 1`` is the
  mean of ``|s|`` over the paper's (alpha, K) at every step.
* ``adamw_constant``: AdamW at a constant lr: what the published code's MergOPT arm trains (its
  Trainer calls ``step()`` without a closure and its scheduler never reaches the inner AdamW).

The two noise controls use FusedMergOptAdamW's own options (``distribution``, ``alphas``,
``k_max``): no change to the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..optim import FusedMergOptAdamW
from .model import clone_state
from .tasks import Task

OPTIMIZERS = ("adamw", "mergopt", "control", "adamw_matched", "mergopt_gaussian", "mergopt_fixed_s",
              "adamw_constant")
MAIN_OPTIMIZERS = OPTIMIZERS[:3]  # the rows run without the controls
SCHEDULES = ("warmup_linear", "constant")
PAPER_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
PAPER_K_MAX = 7


def mean_abs_scale(alphas=PAPER_ALPHAS, k_max: int = PAPER_K_MAX) -> float:
    """Mean of ``|K alpha - 1|`` over alpha uniform on ``alphas`` and K uniform on 1..``k_max``."""
    return sum(abs(k * a - 1.0) for k in range(1, k_max + 1) for a in alphas) / (k_max * len(alphas))


def warmup_linear(total_steps: int, warmup_fraction: float = 0.1):
    """LambdaLR multiplier: linear warm-up over ``warmup_fraction`` of ``total_steps``, then linear decay to 0."""
    warmup = max(1, int(warmup_fraction * total_steps))
    return lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))


@dataclass(frozen=True)
class Recipe:
    """How one expert is trained.

    Attributes:
        optimizer: ``"adamw"`` (torch.optim.AdamW) or ``"fused"`` (FusedMergOptAdamW).
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        schedule: ``"warmup_linear"`` (``warmup_linear``) or ``"constant"``.
        noise_scale: FusedMergOptAdamW's ``noise_scale`` (Laplace b, or the Gaussian std); 0: off.
        distribution: ``"laplace"`` or ``"gaussian"``.
        alphas, k_max: where FusedMergOptAdamW draws alpha and K from.
    """

    optimizer: str
    lr: float
    weight_decay: float
    schedule: str = "warmup_linear"
    noise_scale: float = 0.0
    distribution: str = "laplace"
    alphas: tuple[float, ...] = PAPER_ALPHAS
    k_max: int = PAPER_K_MAX


def arm_recipe(kind: str, lr: float, weight_decay: float, noise_scale: float, distribution: str = "laplace",
               matched_lr: float | None = None) -> Recipe:
    """The recipe of row ``kind`` (one of ``OPTIMIZERS``, see the module docstring).

    Args:
        kind: the row.
        lr, weight_decay: the shared AdamW hyperparameters (peak lr of the schedule).
        noise_scale: MergOPT's b (of ``distribution``).
        distribution: MergOPT's noise distribution; the Gaussian control matches its variance.
        matched_lr: the lr of ``"adamw_matched"`` (required for it, ignored otherwise).
    """
    base = Recipe("adamw", lr, weight_decay)
    if kind == "adamw":
        return base
    if kind == "adamw_constant":
        return dataclasses.replace(base, schedule="constant")
    if kind == "adamw_matched":
        if matched_lr is None or not matched_lr > 0:
            raise ValueError(f"adamw_matched needs a matched_lr > 0, got {matched_lr}")
        return dataclasses.replace(base, lr=float(matched_lr))
    mergopt = dataclasses.replace(base, optimizer="fused", noise_scale=noise_scale, distribution=distribution)
    if kind == "mergopt":
        return mergopt
    if kind == "control":
        return dataclasses.replace(mergopt, noise_scale=0.0)
    if kind == "mergopt_gaussian":
        # Laplace(0, b) has variance 2 b^2; a Gaussian's noise_scale is its std.
        std = noise_scale * math.sqrt(2.0) if distribution == "laplace" else noise_scale
        return dataclasses.replace(mergopt, distribution="gaussian", noise_scale=std)
    if kind == "mergopt_fixed_s":
        # K = 1 and alpha = 1 + E|s| give s = K alpha - 1 = E|s| at every step (the noise is symmetric,
        # so the sign of s does not matter).
        return dataclasses.replace(mergopt, alphas=(1.0 + mean_abs_scale(mergopt.alphas, mergopt.k_max),), k_max=1)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")


def make_optimizer(recipe: Recipe, params, noise_seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer of ``recipe`` over ``params`` (FusedMergOptAdamW with seed ``noise_seed``)."""
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer != "fused":
        raise ValueError(f"recipe.optimizer must be 'adamw' or 'fused', got {recipe.optimizer!r}")
    return FusedMergOptAdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, noise_scale=recipe.noise_scale,
                             distribution=recipe.distribution, alphas=recipe.alphas, k_max=recipe.k_max,
                             seed=noise_seed)


def make_scheduler(recipe: Recipe, opt: torch.optim.Optimizer, total_steps: int):
    """The lr scheduler of ``recipe`` over ``total_steps`` steps (``None`` for a constant lr)."""
    if recipe.schedule == "constant":
        return None
    if recipe.schedule != "warmup_linear":
        raise ValueError(f"recipe.schedule must be one of {SCHEDULES}, got {recipe.schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(total_steps))


def train_expert(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable,
                 loss_fn: Callable[[nn.Module, object], torch.Tensor], scheduler=None) -> dict[str, torch.Tensor]:
    """From the weights ``model`` holds (loaded before ``opt`` was built on its parameters, since
    MergOPT perturbs them when built), take one step of ``opt`` per batch of ``batches`` on ``loss_fn(model, batch)`` (and of
    ``scheduler`` if given), and return the clean weights (MergOPT's perturbation removed) as a
    new state dict."""
    for batch in batches:
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    if isinstance(opt, FusedMergOptAdamW):
        opt.remove_perturbation()
    return clone_state(model)


def train_recipe(model: nn.Module, base_state: dict, recipe: Recipe, batches: Iterable, total_steps: int,
                 loss_fn: Callable[[nn.Module, object], torch.Tensor], noise_seed: int) -> dict[str, torch.Tensor]:
    """Load ``base_state`` into ``model``, build ``recipe``'s optimizer and scheduler (over
    ``total_steps``, the number of ``batches``) and train; returns the clean expert weights."""
    model.load_state_dict(base_state)
    opt = make_optimizer(recipe, model.parameters(), noise_seed)
    return train_expert(model, opt, batches, loss_fn, make_scheduler(recipe, opt, total_steps))


@dataclass(frozen=True)
class FinetuneConfig:
    """AdamW hyperparameters shared by every row (paper: weight decay 1e-3, batch 8, 3-7 epochs;
    the learning rate is chosen for this model's scale and is the peak of the schedule)."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-3


def _digit_batches(task: Task, config: FinetuneConfig, data_seed: int):
    gen = torch.Generator().manual_seed(data_seed)
    x, y = task.train.x, task.train.y
    for _ in range(config.epochs):
        order = torch.randperm(y.numel(), generator=gen).to(y.device)
        for start in range(0, y.numel(), config.batch_size):
            idx = order[start:start + config.batch_size]
            yield x[idx], y[idx]


def digit_steps(task: Task, config: FinetuneConfig) -> int:
    """Optimizer steps of one expert: epochs times batches per epoch."""
    return config.epochs * -(-task.train.y.numel() // config.batch_size)


def finetune_recipe(model: nn.Module, base_state: dict, task: Task, recipe: Recipe, config: FinetuneConfig,
                    data_seed: int, noise_seed: int = 0) -> dict[str, torch.Tensor]:
    """Fine-tune ``model`` from ``base_state`` on the digit ``task`` with ``recipe`` (epochs and
    batch size from ``config``, per-epoch shuffles from ``data_seed``); returns the clean expert."""
    return train_recipe(model, base_state, recipe, _digit_batches(task, config, data_seed), digit_steps(task, config),
                        lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]), noise_seed)


def finetune(model: nn.Module, base_state: dict, task: Task, kind: str, config: FinetuneConfig,
             data_seed: int, noise_scale: float = 0.0, distribution: str = "laplace",
             noise_seed: int = 0, matched_lr: float | None = None) -> dict[str, torch.Tensor]:
    """Fine-tune ``model`` from ``base_state`` on ``task`` as row ``kind`` of the table.

    Args:
        model: the network (its weights are overwritten by ``base_state`` first).
        base_state: the pre-trained state dict.
        task: the task; its train split must be on the model's device.
        kind: one of ``OPTIMIZERS`` (see the module docstring).
        config: epochs, batch size, lr, weight decay.
        data_seed: seed of the per-epoch shuffles (the same for every ``kind``).
        noise_scale, distribution, noise_seed: MergOPT's noise (its rows only).
        matched_lr: the lr of ``"adamw_matched"``.
    Returns:
        The expert's clean weights (MergOPT's perturbation removed) as a new state dict.
    """
    recipe = arm_recipe(kind, config.lr, config.weight_decay, noise_scale, distribution, matched_lr)
    return finetune_recipe(model, base_state, task, recipe, config, data_seed, noise_seed)
