"""Fine-tuning one expert: the same data order and initial weights for every optimizer, so
AdamW, MergOPT and the noise-off control differ only in the optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..optim import FusedMergOptAdamW
from .model import clone_state
from .tasks import Task

# "control" is FusedMergOptAdamW with noise_scale=0: it must follow AdamW's trajectory.
OPTIMIZERS = ("adamw", "mergopt", "control")


@dataclass(frozen=True)
class FinetuneConfig:
    """AdamW hyperparameters shared by all three optimizers (paper: weight decay 1e-3, batch 8,
    3-7 epochs; the learning rate is chosen for this model's scale)."""

    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-3


def make_optimizer(kind: str, params, lr: float, weight_decay: float, noise_scale: float = 0.0,
                   distribution: str = "laplace", noise_seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``kind`` over ``params``: ``"adamw"`` (torch.optim.AdamW), ``"mergopt"``
    (FusedMergOptAdamW with ``noise_scale``, ``distribution`` and seed ``noise_seed``) or
    ``"control"`` (FusedMergOptAdamW with the noise off)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    return FusedMergOptAdamW(params, lr=lr, weight_decay=weight_decay,
                             noise_scale=noise_scale if kind == "mergopt" else 0.0,
                             distribution=distribution, seed=noise_seed)


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


def _digit_batches(task: Task, config: FinetuneConfig, data_seed: int):
    gen = torch.Generator().manual_seed(data_seed)
    x, y = task.train.x, task.train.y
    for _ in range(config.epochs):
        order = torch.randperm(y.numel(), generator=gen).to(y.device)
        for start in range(0, y.numel(), config.batch_size):
            idx = order[start:start + config.batch_size]
            yield x[idx], y[idx]


def finetune(model: nn.Module, base_state: dict, task: Task, kind: str, config: FinetuneConfig,
             data_seed: int, noise_scale: float = 0.0, distribution: str = "laplace",
             noise_seed: int = 0) -> dict[str, torch.Tensor]:
    """Fine-tune ``model`` from ``base_state`` on ``task`` with optimizer ``kind``.

    Args:
        model: the network (its weights are overwritten by ``base_state`` first).
        base_state: the pre-trained state dict.
        task: the task; its train split must be on the model's device.
        kind: ``"adamw"`` (torch.optim.AdamW), ``"mergopt"`` (FusedMergOptAdamW with
            ``noise_scale``) or ``"control"`` (FusedMergOptAdamW with the noise off).
        config: epochs, batch size, lr, weight decay.
        data_seed: seed of the per-epoch shuffles (the same for every ``kind``).
        noise_scale, distribution, noise_seed: MergOPT's noise (``"mergopt"`` only).
    Returns:
        The expert's clean weights (MergOPT's perturbation removed) as a new state dict.
    """
    model.load_state_dict(base_state)
    opt = make_optimizer(kind, model.parameters(), config.lr, config.weight_decay, noise_scale, distribution,
                         noise_seed)
    return train_expert(model, opt, _digit_batches(task, config, data_seed),
                        lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]))
