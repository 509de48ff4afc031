"""Hugging Face ``transformers.Trainer`` support: ``MergOptCallback``.

Give the Trainer a MergOPT optimizer and this callback::

    from mergopt_kernels import FusedMergOptAdamW
    from mergopt_kernels.integrations.hf import MergOptCallback

    opt = FusedMergOptAdamW(model.parameters(), lr=2e-5, weight_decay=1e-3, seed=0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 10, 1000)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, sched), callbacks=[MergOptCallback()])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model()                 # clean weights: training ended with theta in the model

The optimizer alone already makes every training forward/backward see perturbed weights (the
Trainer calls ``step()`` without a closure, and ``step()`` writes the next perturbation). The
callback makes everything the Trainer reads or writes between steps see the clean weights
theta: checkpoints (``model.safetensors``), evaluation during training, the best-model reload
and the model left after ``train()``; and it makes ``resume_from_checkpoint`` continue the
uninterrupted run (same noise from the next step on, weights equal up to fp rounding).
"""

from __future__ import annotations

from typing import Optional

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mergopt_kernels.integrations.hf needs transformers: "
                      "pip install 'mergopt_kernels[hf]' (or transformers)") from exc

import torch

from ..optim._perturbation import PerturbationMixin


def _find_mergopt(optimizer) -> Optional[PerturbationMixin]:
    """The MergOPT optimizer inside ``optimizer`` (Accelerate wraps it in ``.optimizer``)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, PerturbationMixin):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class MergOptCallback(TrainerCallback):
    """Keep the model clean (theta) whenever ``transformers.Trainer`` is not training on it.

    - when the Trainer is built: remove the perturbation, so a checkpoint loaded by
      ``train(resume_from_checkpoint=...)`` lands in clean parameters;
    - when training begins: remove it again (Accelerate's optimizer wrapper reloads the
      optimizer's state dict, which writes the perturbation), so an ``eval_on_start``
      evaluation sees theta;
    - at the start of every optimizer step: write the current perturbation back
      (``apply_perturbation()``: a no-op when it is there already, e.g. after the Trainer
      loaded the optimizer's state);
    - after an optimizer step after which the Trainer will save, evaluate or stop, and at
      the end of an epoch and of training: remove it, so checkpoints, evaluation metrics and
      the final model are those of theta.

    Args:
        optimizer: the ``FusedMergOptAdamW``/``MergOpt`` to manage; by default the Trainer's
            optimizer (also found inside Accelerate's wrapper).

    Raises:
        TypeError: ``optimizer`` (or the Trainer's optimizer when training begins) is not a
            MergOPT optimizer.
    """

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None):
        if optimizer is not None and _find_mergopt(optimizer) is None:
            raise TypeError(f"optimizer must be a FusedMergOptAdamW or MergOpt, got {type(optimizer).__name__}")
        self._optimizer = _find_mergopt(optimizer) if optimizer is not None else None

    def _mergopt(self, kwargs: dict, required: bool = False) -> Optional[PerturbationMixin]:
        if self._optimizer is not None:
            return self._optimizer
        found = _find_mergopt(kwargs.get("optimizer"))
        if found is None and required:
            raise TypeError("MergOptCallback needs the Trainer's optimizer to be a FusedMergOptAdamW or "
                            f"MergOpt (Trainer(optimizers=(opt, scheduler))), got "
                            f"{type(kwargs.get('optimizer')).__name__}")
        return found

    def _remove(self, kwargs: dict) -> None:
        opt = self._mergopt(kwargs)
        if opt is not None:
            opt.remove_perturbation()

    def _apply(self, kwargs: dict) -> None:
        self._mergopt(kwargs, required=True).apply_perturbation()

    def on_init_end(self, args, state, control, **kwargs):
        self._remove(kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        self._mergopt(kwargs, required=True).remove_perturbation()

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate or control.should_training_stop:
            self._remove(kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._remove(kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove(kwargs)
