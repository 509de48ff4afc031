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
callback attaches the optimizer to the model (``opt.attach(model)``), so that everything the
Trainer reads or writes between steps sees the clean weights theta: checkpoints
(``model.safetensors``), evaluation during training, the best-model reload and the model left
after ``train()``; ``resume_from_checkpoint`` continues the uninterrupted run (same noise from
the next step on, weights equal up to fp rounding).

With DeepSpeed ZeRO (``TrainingArguments(deepspeed=config)``, stages 1, 2 and 3, fp32 or
bf16), the Trainer discards ``optimizers=(opt, sched)`` and builds the optimizer itself (the
callback raises if it is not a MergOPT optimizer): let it build ours from
``optimizer_cls_and_kwargs``, and give the DeepSpeed config no ``"optimizer"`` section (with one,
DeepSpeed builds its own)::

    config = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
              "zero_allow_untested_optimizer": True,        # required for a client optimizer
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}   # "auto": from args
    args = TrainingArguments(..., deepspeed=config, weight_decay=1e-3, max_grad_norm=1.0,
                             lr_scheduler_type="linear", warmup_steps=10)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(FusedMergOptAdamW, {"lr": 2e-5, "seed": 0}),
                      callbacks=[MergOptCallback()])

The Trainer makes the param groups: ``weight_decay`` from the TrainingArguments for the
weights, 0 for biases and norms (a ``weight_decay`` in the kwargs is overridden; every group
gets the kwargs' noise options); the learning rate is the kwargs' ``lr``, scheduled by the
TrainingArguments' scheduler; DeepSpeed clips at ``gradient_clipping`` (``max_grad_norm``). The
callback finds the optimizer inside DeepSpeed's ZeRO optimizer; its calls are then collective,
made by every rank at the same points. ``stage3_gather_16bit_weights_on_model_save`` gives
ZeRO-3 checkpoints a ``model.safetensors`` (without it the Trainer writes DeepSpeed's shards
only). ``from_pretrained``/``from_config`` after TrainingArguments with a ZeRO-3 config build
the model under ``deepspeed.zero.Init``, partitioned from the start: the optimizer perturbs
each rank's slices. On machines without GPUs run DeepSpeed with ``DS_ACCELERATOR=cpu`` and
``TrainingArguments(use_cpu=True, deepspeed=...)``: without ``use_cpu`` Accelerate finds no
device to take its backend from, and every rank runs as a world of its own.
"""

from __future__ import annotations

from typing import Optional

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mergopt_kernels.integrations.hf needs transformers: "
                      "pip install 'mergopt_kernels[hf]' (or transformers)") from exc

import torch

from ..optim.attach import attachment_of
from ..optim.perturbed_optimizer import PerturbedOptimizer

__all__ = ["MergOptCallback"]


def _chain(optimizer) -> list:
    """``optimizer`` and the optimizers it wraps, outermost first: Accelerate's wrapper, then
    (under DeepSpeed) DeepSpeed's ZeRO optimizer, then the client optimizer, each the
    ``.optimizer`` of the one before."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        chain.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _find_mergopt(optimizer) -> Optional[PerturbedOptimizer]:
    """The MergOPT optimizer inside ``optimizer`` (Accelerate wraps it in ``.optimizer``, and
    under DeepSpeed Accelerate's wrapper holds DeepSpeed's ZeRO optimizer, which holds it)."""
    return next((o for o in _chain(optimizer) if isinstance(o, PerturbedOptimizer)), None)


def _uses_deepspeed(args, optimizer) -> bool:
    """Whether the Trainer trains with DeepSpeed: its optimizer is wrapped by DeepSpeed (or by
    Accelerate's DeepSpeed wrapper), or TrainingArguments carry a DeepSpeed config."""
    for o in _chain(optimizer):
        kind = type(o)
        if kind.__module__.startswith("deepspeed.") or kind.__name__ == "DeepSpeedOptimizerWrapper":
            return True
    return bool(getattr(args, "deepspeed", None))


def _describe(optimizer) -> str:
    return " -> ".join(type(o).__name__ for o in _chain(optimizer)) or "None"


DEEPSPEED_ROUTE = (
    "with TrainingArguments(deepspeed=...), the Trainer discards Trainer(optimizers=(opt, scheduler)) and builds "
    "its optimizer itself (DeepSpeed's, from the config's \"optimizer\" section if it has one, else from "
    "TrainingArguments.optim). Let it build a MergOPT optimizer: "
    "Trainer(optimizer_cls_and_kwargs=(FusedMergOptAdamW, {\"lr\": ..., \"seed\": ...}), "
    "callbacks=[MergOptCallback()]), and leave the \"optimizer\" section out of the DeepSpeed config")


class MergOptCallback(TrainerCallback):
    """``opt.attach(model)`` for ``transformers.Trainer``: everything the Trainer reads between
    steps sees theta.

    - when the Trainer is built (or, under DeepSpeed, whose optimizer the Trainer builds in
      ``train()``, when training begins): attaches the optimizer to the Trainer's model (unless
      it is attached already) and removes the perturbation, so checkpoints
      (``model.safetensors``, ``save_model``) hold theta and evaluation (the Trainer's eval-mode
      forwards, ``evaluate()`` before ``train()`` too) runs on theta, while every training
      forward runs on theta_t + s_t z_t; loads (``resume_from_checkpoint``, the best-model
      reload) land as theta;
    - before a save (``control.should_save`` after a step): removes the perturbation, because
      under DeepSpeed ZeRO-3 the Trainer gathers the 16-bit weights through the engine, which
      does not call ``state_dict()``;
    - when training ends: removes the perturbation and takes off the hooks it attached, so the
      model left after ``train()`` holds theta and is a plain module again.

    Under DeepSpeed the Trainer's optimizer is Accelerate's wrapper around DeepSpeed's ZeRO
    optimizer around ours (built from ``Trainer(optimizer_cls_and_kwargs=...)``, see the
    module's docstring); the callback finds it there, and its calls copy the partitions into
    the model (collective calls, made on every rank).

    Args:
        optimizer: the ``FusedMergOptAdamW``/``MergOpt`` to manage; by default the Trainer's
            optimizer (also found inside Accelerate's and DeepSpeed's wrappers).

    Raises:
        TypeError: ``optimizer`` (or the Trainer's optimizer when training begins) is not a
            MergOPT optimizer; or, when training begins, the Trainer's optimizer is not the
            ``optimizer`` given, under DeepSpeed or when it holds another MergOPT optimizer.
            Under DeepSpeed (``TrainingArguments(deepspeed=...)``), which replaces
            ``Trainer(optimizers=(opt, scheduler))`` by an optimizer of its own, the message
            names ``optimizer_cls_and_kwargs``, the route that works.
    """

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None):
        if optimizer is not None and _find_mergopt(optimizer) is None:
            raise TypeError(f"optimizer must be a FusedMergOptAdamW or MergOpt, got {type(optimizer).__name__}")
        self._optimizer = _find_mergopt(optimizer) if optimizer is not None else None
        self._attachment = None  # the hooks this callback put on the Trainer's model

    def _mergopt(self, kwargs: dict, required: bool = False, args=None) -> Optional[PerturbedOptimizer]:
        """The optimizer to manage. ``required``: raise unless it is the one the Trainer trains
        with (``args``: the TrainingArguments, to tell whether DeepSpeed is on)."""
        trainer_optimizer = kwargs.get("optimizer")
        found = _find_mergopt(trainer_optimizer)
        if not required:
            return self._optimizer if self._optimizer is not None else found
        deepspeed = _uses_deepspeed(args, trainer_optimizer)
        if self._optimizer is not None:
            # Given explicitly: it must be the one training, when the Trainer's optimizer is known
            # to wrap another one (DeepSpeed's own optimizer, or another MergOPT optimizer).
            if trainer_optimizer is None or found is self._optimizer or (found is None and not deepspeed):
                return self._optimizer
            raise TypeError(
                f"MergOptCallback was given a {type(self._optimizer).__name__} that the Trainer does not train with: "
                f"the Trainer's optimizer is {_describe(trainer_optimizer)}"
                + (f"; {DEEPSPEED_ROUTE}" if deepspeed else ""))
        if found is None:
            if deepspeed:
                raise TypeError(f"MergOptCallback: the Trainer trains with DeepSpeed and its optimizer is "
                                f"{_describe(trainer_optimizer)}, not a FusedMergOptAdamW or MergOpt: "
                                f"{DEEPSPEED_ROUTE}")
            raise TypeError("MergOptCallback needs the Trainer's optimizer to be a FusedMergOptAdamW or "
                            f"MergOpt (Trainer(optimizers=(opt, scheduler)), or with DeepSpeed "
                            f"Trainer(optimizer_cls_and_kwargs=(FusedMergOptAdamW, {{...}}))), got "
                            f"{_describe(trainer_optimizer)}")
        return found

    def _attach(self, opt: PerturbedOptimizer, model: torch.nn.Module) -> None:
        if attachment_of(opt) is None:
            self._attachment = opt.attach(model)
        opt.remove_perturbation()

    def on_init_end(self, args, state, control, **kwargs):
        opt = self._mergopt(kwargs)
        if opt is not None:  # None under DeepSpeed: the Trainer builds its optimizer in train()
            self._attach(opt, kwargs["model"])

    def on_train_begin(self, args, state, control, **kwargs):
        self._attach(self._mergopt(kwargs, required=True, args=args), kwargs["model"])

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._mergopt(kwargs).remove_perturbation()

    def on_train_end(self, args, state, control, **kwargs):
        self._mergopt(kwargs).remove_perturbation()
        if self._attachment is not None:
            self._attachment.remove()
            self._attachment = None
