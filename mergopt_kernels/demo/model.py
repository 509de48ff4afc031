"""The demo's model: a small MLP over the 64 digit pixels with one shared 10-way head, its
pre-training on a broad but weak task, and its evaluation per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .tasks import Task

NUM_CLASSES = 10
INPUT_DIM = 64


def make_model(hidden: int = 128) -> nn.Module:
    """``64 -> hidden -> hidden -> 10`` MLP with GELU activations (parameters in float32)."""
    return nn.Sequential(nn.Linear(INPUT_DIM, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, NUM_CLASSES))


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training: ``steps`` AdamW steps of batch ``batch_size`` drawn from a ``fraction`` of
    the pooled train examples of the given tasks: a broad base that knows every view a little,
    so that fine-tuning has room to improve each task."""

    hidden: int = 128
    fraction: float = 0.25
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


def pretrain(tasks: list[Task], config: PretrainConfig, device) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build and pre-train the base model on the pooled train splits of ``tasks``.

    Returns:
        The model (on ``device``) and a copy of its state dict.
    """
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = make_model(config.hidden).to(device)
    x = torch.cat([task.train.x for task in tasks]).to(device)
    y = torch.cat([task.train.y for task in tasks]).to(device)
    subset = torch.randperm(y.numel(), generator=gen)[:max(config.batch_size, int(config.fraction * y.numel()))]
    x, y = x[subset.to(device)], y[subset.to(device)]
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    for _ in range(config.steps):
        idx = torch.randint(0, y.numel(), (config.batch_size,), generator=gen).to(device)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, clone_state(model)


@torch.no_grad()
def task_accuracy(model: nn.Module, task: Task) -> float:
    """Test accuracy (10-way) of ``model`` on ``task``."""
    return float((model(task.test.x).argmax(1) == task.test.y).float().mean())


@torch.no_grad()
def task_loss(model: nn.Module, task: Task) -> float:
    """Test cross-entropy of ``model`` on ``task``."""
    return float(nn.functional.cross_entropy(model(task.test.x), task.test.y))
