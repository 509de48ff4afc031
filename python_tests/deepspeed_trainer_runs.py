"""transformers.Trainer runs under DeepSpeed ZeRO on 2 CPU ranks (gloo), for
test_deepspeed_trainer.py; run through ``dist_utils.run_ranks`` (which starts the gloo group).

The route that works: the Trainer builds the optimizer itself, from
``Trainer(optimizer_cls_and_kwargs=(FusedMergOptAdamW, {...}))`` (with ``deepspeed=`` it
discards ``optimizers=(opt, scheduler)``), and ``MergOptCallback()`` finds it behind
Accelerate's and DeepSpeed's wrappers.

On CPU-only machines (these tests) ``TrainingArguments(use_cpu=True, deepspeed=config)``:
Accelerate then sets up the ranks over gloo, and the Trainer's Accelerator still takes the
DeepSpeed path (DS_ACCELERATOR=cpu). Without ``use_cpu`` Accelerate finds no device to take
its backend from and gives every rank a world of its own (num_processes 1: every rank the
main process, the data not sharded, every rank writing the checkpoints), while DeepSpeed
trains on 2 ranks. With GPUs, no ``use_cpu``.
"""

from __future__ import annotations

import os
import traceback

import torch

STEPS = 4
NOISE_SCALE = 0.02
OPT_KWARGS = dict(lr=1e-2, noise_scale=NOISE_SCALE)
WEIGHT_DECAY = 0.01
LAYER = "transformer.h.0.mlp.c_fc"  # the layer whose weights the forwards record


def tiny_gpt2(init_seed: int = 0):
    import transformers

    torch.manual_seed(init_seed)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def dataset(ranks: int = 2, batch: int = 4):
    """32 sequences in micro-batches of ``batch``, each one repeated ``ranks`` times in a row:
    read in order (``train_sampling_strategy="sequential"``), the ranks get the same micro-batch
    at every step, so DeepSpeed's gradient average (g + g) / 2 is exact, and the 1-process run
    (``ranks=1``) has the same gradients."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (32, 8), generator=g)
    rows = [row for start in range(0, len(ids), batch) for _ in range(ranks) for row in ids[start:start + batch]]
    return [{"input_ids": row, "labels": row} for row in rows]


def ds_config(stage: int) -> dict:
    """"auto" values come from the TrainingArguments (gradient_clipping from max_grad_norm:
    DeepSpeed clips, not the Trainer). No "optimizer" section: with one, the Trainer lets
    DeepSpeed build its own optimizer, whatever optimizer_cls_and_kwargs says."""
    zero = {"stage": stage}
    if stage == 3:  # else the Trainer saves no model.safetensors under ZeRO-3
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": "auto"}, "steps_per_print": 10**9}


def training_args(output_dir: str, stage: int, bf16: bool = False, **options):
    import transformers

    return transformers.TrainingArguments(
        output_dir=output_dir, deepspeed=ds_config(stage), use_cpu=True, bf16=bf16, per_device_train_batch_size=4,
        max_steps=STEPS, save_strategy="steps", save_steps=1, logging_steps=1, report_to=[], seed=0, data_seed=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, weight_decay=WEIGHT_DECAY, **options)


def optimizer_chain(optimizer) -> list:
    names = []
    while optimizer is not None:
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return names


def model_weights(trainer) -> dict:
    """The Trainer's model, whole (gathered under ZeRO-3: a collective call)."""
    import deepspeed

    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def log(trainer, key: str) -> list:
    return [(e["step"], e[key]) for e in trainer.state.log_history if key in e]


def train_route(stage: int, seed: int, output_dir: str, bf16: bool = False) -> dict:
    """The working route, 2 micro-batches a step, evaluations before training and every other
    step, a checkpoint every step; records the weights of LAYER that every forward saw, by
    noise step t (a forward hook: under ZeRO-3 the weights are gathered there)."""
    import transformers

    from mergopt_kernels import FusedMergOptAdamW
    from mergopt_kernels.integrations.hf import MergOptCallback, _find_mergopt

    model = tiny_gpt2()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen, evaluated, trainer = {}, {}, None

    def record(module, args, output):
        t = _find_mergopt(trainer.optimizer).noise_step()
        (seen if module.training else evaluated).setdefault(t, []).append(module.weight.detach().clone())

    model.get_submodule(LAYER).register_forward_hook(record)
    args = training_args(output_dir, stage, bf16=bf16, gradient_accumulation_steps=2, eval_strategy="steps",
                         eval_steps=2, eval_on_start=True, per_device_eval_batch_size=4)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), eval_dataset=dataset(ranks=1)[:8],
                                   optimizer_cls_and_kwargs=(FusedMergOptAdamW, dict(OPT_KWARGS, seed=seed)),
                                   callbacks=[MergOptCallback()])
    trainer.train()
    opt = _find_mergopt(trainer.optimizer)
    # The noise identities: positions in the optimizer's parameter list, which the Trainer
    # makes of two groups: the decayed parameters, then the others.
    decay = set(trainer.get_decay_parameter_names(model))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n in names if n in decay] + [n for n in names if n not in decay]
    final = model_weights(trainer)
    trainer.save_model(os.path.join(output_dir, "final"))
    return {"seen": seen, "evaluated": evaluated, "initial": initial, "final": final, "param_ids": order,
            "noise_step": opt.noise_step(), "seed": opt.seed, "alphas": opt.param_groups[0]["alphas"],
            "chain": optimizer_chain(trainer.optimizer), "world_size": trainer.args.world_size,
            "losses": log(trainer, "loss"), "eval_losses": log(trainer, "eval_loss")}


def train_resume(stage: int, seed: int, output_dir: str) -> dict:
    """The route ("full"), then a new Trainer with another model init and seed resumed from
    its checkpoint-2 ("resumed"): the losses and weights of both."""
    import transformers

    from mergopt_kernels import FusedMergOptAdamW
    from mergopt_kernels.integrations.hf import MergOptCallback, _find_mergopt

    results = {}
    for name, init_seed, opt_seed, resume in (("full", 0, seed, None), ("resumed", 7, seed ^ 1, "checkpoint-2")):
        model = tiny_gpt2(init_seed)
        trainer = transformers.Trainer(model=model, args=training_args(os.path.join(output_dir, name), stage),
                                       train_dataset=dataset(),
                                       optimizer_cls_and_kwargs=(FusedMergOptAdamW, dict(OPT_KWARGS, seed=opt_seed)),
                                       callbacks=[MergOptCallback()])
        trainer.train(resume_from_checkpoint=None if resume is None else os.path.join(output_dir, "full", resume))
        opt = _find_mergopt(trainer.optimizer)
        results[name] = {"losses": log(trainer, "loss"), "weights": model_weights(trainer), "seed": opt.seed,
                         "noise_step": opt.noise_step()}
    return results


def train_dropped(stage: int, seed: int, output_dir: str, explicit: bool) -> dict:
    """``deepspeed=`` with ``optimizers=(FusedMergOptAdamW, scheduler)``, which the Trainer
    drops: the callback (given the optimizer or not) must stop the run before any step."""
    import transformers

    from mergopt_kernels import FusedMergOptAdamW
    from mergopt_kernels.integrations.hf import MergOptCallback

    model = tiny_gpt2()
    opt = FusedMergOptAdamW(model.parameters(), **OPT_KWARGS, seed=seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = transformers.Trainer(model=model, args=training_args(output_dir, stage), train_dataset=dataset(),
                                   optimizers=(opt, scheduler), callbacks=[MergOptCallback(opt if explicit else None)])
    result = {"error": None, "message": None}
    try:
        trainer.train()
    except (TypeError, ValueError) as error:
        result = {"error": type(error).__name__, "message": str(error)}
    return dict(result, chain=optimizer_chain(trainer.optimizer), global_step=trainer.state.global_step)


def run_cases(rank: int, world_size: int, cases: list, out_dir: str) -> None:
    """Every case in turn (DeepSpeed's start-up is paid once); rank 0 saves the results. A case
    that raises records its traceback (both ranks raise alike, so no collective is left waiting)."""
    results = {}
    for case in cases:
        output_dir = os.path.join(out_dir, case["name"])
        try:
            if case["kind"] == "route":
                results[case["name"]] = train_route(case["stage"], case["seed"], output_dir, case.get("bf16", False))
            elif case["kind"] == "resume":
                results[case["name"]] = train_resume(case["stage"], case["seed"], output_dir)
            else:
                results[case["name"]] = train_dropped(case["stage"], case["seed"], output_dir, case["explicit"])
        except Exception:  # noqa: BLE001 - the test reports it
            results[case["name"]] = {"failed": traceback.format_exc()}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
