"""The demo's tasks: 10-way digit classification under five views of the same images.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1797 8x8 images, 10 classes), so the
demo needs no download. The images are split once, stratified, into a train and a test part.
A task shows every image through one fixed view (upright, mirrored, upside down, transposed,
inverted) and asks for its digit: the tasks share inputs, labels and the 10-way head, but each
needs its own features, so experts fine-tuned on different views conflict when merged, as
experts fine-tuned on different domains do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

IMAGE_SIDE = 8
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def _image_view(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply ``fn`` to ``[n, 8, 8]`` images given and returned as ``[n, 64]`` rows."""
    return lambda x: fn(x.view(-1, IMAGE_SIDE, IMAGE_SIDE)).reshape(-1, IMAGE_SIDE * IMAGE_SIDE)


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "upright": lambda x: x.clone(),
    "mirrored": _image_view(lambda img: img.flip(2)),
    "upside_down": _image_view(lambda img: img.flip(1)),
    "transposed": _image_view(lambda img: img.transpose(1, 2)),
    "inverted": lambda x: 1.0 - x,
}
DEFAULT_TASKS = tuple(VIEWS)


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (float32 ``[n, 64]``, pixels in [0, 1]) and labels ``y`` (int64 ``[n]``)."""

    x: torch.Tensor
    y: torch.Tensor

    def to(self, device) -> "Split":
        """The same split on ``device``."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Task:
    """A task: its name (a key of ``VIEWS``) and its train/test examples seen through that view."""

    name: str
    train: Split
    test: Split

    def to(self, device) -> "Task":
        """The same task with its data on ``device``."""
        return Task(self.name, self.train.to(device), self.test.to(device))


def load_digit_splits() -> tuple[Split, Split]:
    """The digits split once into (train, test), stratified by class, with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y,
                                              random_state=SPLIT_SEED)
    return (Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
            Split(torch.from_numpy(x_te), torch.from_numpy(y_te)))


def check_task_names(names, choices=DEFAULT_TASKS) -> list[str]:
    """``names`` as a list after checking them: among ``choices`` (default the digit views), no
    repeats, at least two.

    Raises:
        ValueError: an unknown or repeated name, or fewer than two tasks (nothing to merge).
    """
    names = list(names)
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(choices)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must not repeat, got {names}")
    if len(names) < 2:
        raise ValueError(f"need at least two tasks to merge, got {names}")
    return names


def make_tasks(names=DEFAULT_TASKS, splits: tuple[Split, Split] | None = None) -> list[Task]:
    """The tasks for ``names`` (keys of ``VIEWS``, checked by ``check_task_names``), built from
    ``splits`` = (train, test) or from ``load_digit_splits()``."""
    names = check_task_names(names)
    train, test = load_digit_splits() if splits is None else splits
    return [Task(name, Split(VIEWS[name](train.x), train.y), Split(VIEWS[name](test.x), test.y))
            for name in names]
