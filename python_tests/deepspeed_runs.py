"""Training runs under DeepSpeed ZeRO on 2 CPU ranks (gloo), and their 1-process references,
for test_deepspeed.py. Every rank feeds the same batches, so DeepSpeed's gradient average
(g + g) / 2 is exact and a ZeRO run can be compared with a 1-process run element by element.

A case is a dict: ``stage`` (0 to 3), ``dtype`` ("fp32" or "bf16"), ``sub_group_size``
(stage 3; None: DeepSpeed's default), ``optimizer`` ("fused": FusedMergOptAdamW, "mergopt":
MergOpt around torch AdamW), ``zero_options`` (more zero_optimization keys), ``empty_group``
(an empty param group first, which DeepSpeed's engine drops) and ``load_before`` (other
weights loaded into the model after the optimizer is built, before DeepSpeed takes it).
"""

from __future__ import annotations

import os

import torch

# The ranks are spawned processes that import this module first: DeepSpeed on the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SEED = 0x9E3779B97F4A7C15
STEPS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPT_KWARGS = dict(lr=1e-2, weight_decay=0.1, noise_scale=0.05)


def make_model(dtype: str) -> torch.nn.Module:
    """709 parameters of odd sizes: 2 ranks split them unevenly, stage 3 pads every slice."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 1))
    return model.to(DTYPES[dtype])


def make_optimizer(model: torch.nn.Module, kind: str, seed: int = SEED, empty_group: bool = False):
    """Two groups: the weights with noise, the biases without (as README advises for norms);
    ``empty_group``: an empty one before them."""
    from mergopt_kernels import FusedMergOptAdamW, MergOpt

    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    groups = [{"params": weights}, {"params": biases, "noise_scale": 0.0}]
    if empty_group:
        groups.insert(0, {"params": [], "noise_scale": 0.0})
    if kind == "fused":
        return FusedMergOptAdamW(groups, **OPT_KWARGS, seed=seed)
    base = torch.optim.AdamW(groups, lr=OPT_KWARGS["lr"], weight_decay=OPT_KWARGS["weight_decay"])
    return MergOpt(base, noise_scale=OPT_KWARGS["noise_scale"], seed=seed)


def batch(step: int, dtype: str):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 13, generator=g).to(DTYPES[dtype]), torch.randn(8, 1, generator=g)


def loss_of(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x).float(), y)


def reference(case: dict, steps: int = STEPS) -> dict:
    """The 1-process run: the weights after construction (perturbed), the losses (at the
    perturbed weights) of ``steps`` steps, the clean weights then and their exact fp32 theta
    (bf16 parameters: the masters), and the loss of one more step and the weights after it."""
    model, opt = model_and_optimizer(case)
    first = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for step in range(steps):
        loss = loss_of(model, *batch(step, case["dtype"]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with opt.clean_weights():
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        state = opt._masters if case["optimizer"] == "mergopt" else opt.state
        theta = {name: state[p]["master"].clone() if p.dtype != torch.float32 else p.detach().clone()
                 for name, p in model.named_parameters()}
    loss = loss_of(model, *batch(steps, case["dtype"]))  # one more step, perturbed again
    loss.backward()
    opt.step()
    losses.append(loss.item())
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"first": first, "losses": losses, "weights": weights, "masters": theta, "after": after}


def ds_config(case: dict) -> dict:
    zero = {"stage": case["stage"], **case.get("zero_options", {})}
    if case["stage"] == 3:  # save_16bit_model() writes nothing under stage 3 without it
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if case.get("sub_group_size"):
        zero["sub_group_size"] = case["sub_group_size"]
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
            "bf16": {"enabled": case["dtype"] == "bf16"}, "steps_per_print": 10**9}


def full_weights(engine) -> dict:
    """The module's weights, gathered under stage 3 (a collective call)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def masters(engine) -> dict:
    """DeepSpeed's fp32 master of every parameter, whole (a collective call)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.zero_optimization_stage() == 0:  # the optimizer updates the module's parameters
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}
    return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()}


def train(engine, case: dict, steps) -> list:
    losses = []
    for step in steps:
        loss = loss_of(engine, *batch(step, case["dtype"]))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def model_and_optimizer(case: dict, model=None):
    model = make_model(case["dtype"]) if model is None else model
    opt = make_optimizer(model, case["optimizer"], empty_group=case.get("empty_group", False))
    if case.get("load_before"):
        torch.manual_seed(1)
        other = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5),
                                    torch.nn.Tanh(), torch.nn.Linear(5, 1))
        model.load_state_dict(other.state_dict())  # clean theta, written from outside
    return model, opt


def initialize(case: dict):
    """The engine and the optimizer of ``case`` (``zero_init``: the model built under
    deepspeed.zero.Init, partitioned from the start, with make_model's weights: zero.Init's own
    bf16 initialisation draws other ones)."""
    import deepspeed

    model = None
    if case.get("zero_init"):
        weights = make_model(case["dtype"]).state_dict()
        with deepspeed.zero.Init(config_dict_or_path=ds_config(case)):
            model = make_model(case["dtype"])
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(weights)
    model, opt = model_and_optimizer(case, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(case))
    return engine, opt


def run_cases(rank: int, world_size: int, cases: list, out_dir: str) -> None:
    """For each case: train STEPS steps; record the losses, the weights and masters inside
    ``clean_weights()``, the module weights after it (perturbed again) and the loss of one more
    step (whose forward must see those). Rank 0 saves."""
    results = {}
    for case in cases:
        engine, opt = initialize(case)
        first = full_weights(engine)
        losses = train(engine, case, range(STEPS))
        with opt.clean_weights():
            clean, clean_masters = full_weights(engine), masters(engine)
        losses += train(engine, case, [STEPS])  # before any gathering: the persistent parameters
        results[case["name"]] = {"losses": losses, "weights": clean, "masters": clean_masters,
                                 "first": first, "after": full_weights(engine)}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "runs.pt"))


def run_resume(rank: int, world_size: int, case: dict, out_dir: str) -> None:
    """Save a checkpoint after 2 of 4 steps (``clean`` False: as the run stands; True: inside
    ``clean_weights()``), train 2 more steps, load it back into that engine and train them again;
    resume it in a new engine (with ``clean``, then ``apply_perturbation()``); compare both with
    the uninterrupted run; also write the clean exports of the final model.
    The noise scale changes before the save: the held perturbation is restored with the
    options that wrote it."""
    results = {}
    for clean in (False, True):
        engine, opt = initialize(case)
        train(engine, case, range(2))
        opt.param_groups[0]["noise_scale"] = 2 * OPT_KWARGS["noise_scale"]
        folder = os.path.join(out_dir, f"ckpt-{clean}")
        if clean:
            with opt.clean_weights():
                engine.save_checkpoint(folder, tag="t2")
        else:
            engine.save_checkpoint(folder, tag="t2")
        straight = train(engine, case, range(2, 4))
        with opt.clean_weights():
            straight_weights = masters(engine)
        engine.load_checkpoint(folder, tag="t2")  # into the engine that stepped: no call needed
        reloaded = train(engine, case, range(2, 4))
        engine, opt = initialize(case)
        engine.load_checkpoint(folder, tag="t2")
        if clean:
            opt.apply_perturbation()
        resumed = train(engine, case, range(2, 4))
        with opt.clean_weights():
            resumed_weights, clean_weights = masters(engine), full_weights(engine)
            export = os.path.join(out_dir, f"export-{clean}")
            engine.save_checkpoint(export, tag="final")
            engine.save_16bit_model(export, "model16.bin")
        results[clean] = {"straight": straight, "resumed": resumed, "reloaded": reloaded, "straight_weights": straight_weights,
                          "resumed_weights": resumed_weights, "clean_weights": clean_weights,
                          **exports(export, "final", os.path.join(export, "model16.bin"))}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "resume.pt"))


def exports(folder: str, tag, sixteen_bit: str) -> dict:
    """What DeepSpeed's tools read from ``folder`` once every rank wrote it: ``zero_to_fp32``'s
    fp32 state dict of checkpoint ``tag``, the module state dict ``save_checkpoint`` wrote
    (stages 1 and 2; None under stage 3) and the 16-bit model file at path ``sixteen_bit``."""
    import torch.distributed as dist
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    dist.barrier()
    if tag is None:
        with open(os.path.join(folder, "latest")) as latest:
            tag = latest.read().strip()
    module_file = os.path.join(folder, tag, "mp_rank_00_model_states.pt")  # stages 1 and 2
    module = torch.load(module_file, weights_only=False)["module"] if os.path.exists(module_file) else None
    return {"zero_to_fp32": get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag), "module": module,
            "sixteen_bit": torch.load(sixteen_bit)}


def run_unsupported(rank: int, world_size: int, configs: list, out_dir: str) -> None:
    """deepspeed.initialize and a step with each config (``"zero_init": True``: the model is
    built under deepspeed.zero.Init); rank 0 saves the ValueErrors raised (None where none was)."""
    import deepspeed

    messages = []
    for config in configs:
        dtype = "bf16" if config.get("bf16", {}).get("enabled") else "fp32"
        try:
            with deepspeed.zero.Init(config_dict_or_path=config, enabled=config.get("zero_init", False)):
                model = make_model(dtype)
            opt = make_optimizer(model, "fused")
            config = {k: v for k, v in config.items() if k != "zero_init"}
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            train(engine, {"dtype": dtype}, range(1))
            messages.append(None)
        except ValueError as error:
            messages.append(str(error))
    if rank == 0:
        torch.save(messages, os.path.join(out_dir, "errors.pt"))


def run_snippet(rank: int, world_size: int, directory: str) -> None:
    """README's DeepSpeed snippet, executed as written on small stand-ins (an fp32 model, which
    its bf16 config casts); rank 0 saves the noise step it ends at and what DeepSpeed's tools
    read from the checkpoints and the export."""
    import test_snippets

    os.chdir(directory)
    namespace = test_snippets.run("deepspeed", test_snippets.stand_ins(8))
    results = {"noise_step": namespace["opt"].noise_step(), "clean": exports("clean", None, "export/pytorch_model.bin"),
               "perturbed": exports("checkpoint", None, "export/pytorch_model.bin")["zero_to_fp32"]}
    if rank == 0:
        torch.save(results, os.path.join(directory, "snippet.pt"))


def run_attach(rank: int, world_size: int, cases: list, out_dir: str) -> None:
    """``opt.attach(engine)``, then for each case: 2 steps; the clean and the perturbed weights
    (inside and after ``clean_weights()``); an eval-mode forward (a switch to theta), a
    training-mode forward (back to the same perturbation) and the weights after it;
    ``save_16bit_model`` and ``save_checkpoint`` with no block around them (a switch to theta);
    one more step. Rank 0 saves, per case, the outputs and what DeepSpeed's tools read from both
    saves."""
    results = {}
    for case in cases:
        engine, opt = initialize(case)
        opt.attach(engine)
        train(engine, case, range(2))
        with opt.clean_weights():
            clean = full_weights(engine)
        perturbed = full_weights(engine)
        x, _ = batch(2, case["dtype"])
        engine.eval()
        with torch.no_grad():
            evaluated = engine(x).detach().clone()
        engine.train()
        trained = engine(x).detach().clone()
        trained_on = full_weights(engine)
        folder = os.path.join(out_dir, case["name"])
        engine.save_16bit_model(folder, "model16.bin")
        engine.save_checkpoint(folder, tag="t2")
        saved = exports(folder, "t2", os.path.join(folder, "model16.bin"))
        losses = train(engine, case, [2])
        results[case["name"]] = {"clean": clean, "perturbed": perturbed, "evaluated": evaluated, "trained": trained,
                                 "trained_on": trained_on, "losses": losses, **saved}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "attach.pt"))
