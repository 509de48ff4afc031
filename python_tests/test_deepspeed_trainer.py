"""transformers.Trainer with DeepSpeed ZeRO and MergOptCallback, on 2 CPU ranks (gloo,
DS_ACCELERATOR=cpu).

The route that works is ``Trainer(optimizer_cls_and_kwargs=(FusedMergOptAdamW, {...}),
callbacks=[MergOptCallback()])`` with ``TrainingArguments(deepspeed=config)``: at ZeRO stages 2
and 3 (fp32, and bf16 at stage 3) every training forward sees theta_t + s_t z_t, evaluations,
checkpoints, the saved and the final model see theta, the run is the 1-process Trainer run
(without DeepSpeed, same micro-batches) bit for bit, and resuming from a checkpoint continues it. With
``optimizers=(opt, scheduler)`` the Trainer drops the optimizer under DeepSpeed: the callback
raises an error that names ``optimizer_cls_and_kwargs``. How the ranks are set up on CPU:
deepspeed_trainer_runs.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import deepspeed_trainer_runs as runs  # noqa: E402
from mergopt_kernels import FusedMergOptAdamW, noise  # noqa: E402
from mergopt_kernels.integrations.hf import MergOptCallback  # noqa: E402

EPS32 = 2.0**-23
EPS_BF16 = 2.0**-8  # bf16's unit roundoff
LAYER_WEIGHT = runs.LAYER + ".weight"
SEED = int.from_bytes(os.urandom(8), "little")  # one per session, shared by the runs; failures name it

ROUTES = [dict(name="zero2", kind="route", stage=2), dict(name="zero3", kind="route", stage=3),
          dict(name="zero3-bf16", kind="route", stage=3, bf16=True)]
CASES = ROUTES + [dict(name="resume-zero3", kind="resume", stage=3),
                  dict(name="dropped", kind="dropped", stage=2, explicit=False),
                  dict(name="dropped-explicit", kind="dropped", stage=2, explicit=True)]


@contextlib.contextmanager
def one_thread():
    """One CPU thread here and in the ranks spawned meanwhile (Accelerate would give each rank
    half the cores), restored after."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    """Every case, on 2 ranks in one launch (DeepSpeed's start-up is paid once). DeepSpeed is
    imported by the ranks only (see test_deepspeed.py)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    from dist_utils import run_ranks

    out = tmp_path_factory.mktemp("trainer")
    with one_thread():  # as the reference: the same kernels, the same rounding
        run_ranks(runs.run_cases, [dict(case, seed=SEED) for case in CASES], str(out))
    return out, torch.load(out / "results.pt", weights_only=False)


def result(ds_runs, name: str) -> dict:
    got = ds_runs[1][name]
    assert "failed" not in got, got.get("failed")
    return got


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run in 1 process without DeepSpeed: the micro-batches each rank gets (both get
    the same), clipping at max_grad_norm as DeepSpeed's gradient_clipping."""
    out = tmp_path_factory.mktemp("reference")
    args = transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, max_steps=runs.STEPS, save_strategy="steps", save_steps=1, logging_steps=1,
        eval_strategy="steps", eval_steps=2, eval_on_start=True, report_to=[], seed=0, data_seed=0,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
        weight_decay=runs.WEIGHT_DECAY)
    trainer = transformers.Trainer(model=runs.tiny_gpt2(), args=args, train_dataset=runs.dataset(ranks=1),
                                   eval_dataset=runs.dataset(ranks=1)[:8], callbacks=[MergOptCallback()],
                                   optimizer_cls_and_kwargs=(FusedMergOptAdamW, dict(runs.OPT_KWARGS, seed=SEED)))
    with one_thread():
        trainer.train()
    return out, {"losses": runs.log(trainer, "loss"), "eval_losses": runs.log(trainer, "eval_loss")}


def checkpoint(folder, step: int) -> dict:
    return safetensors_torch.load_file(os.path.join(folder, f"checkpoint-{step}", "model.safetensors"))


def perturbation(got: dict, t: int, shape) -> torch.Tensor:
    """s_t z_t of LAYER's weight: its noise identity is its position in the optimizer's list."""
    s = noise.step_scale(SEED, t, got["alphas"], 7)
    z = noise.element_noise(SEED, got["param_ids"].index(LAYER_WEIGHT), t, 0, shape.numel(), 0.0,
                            runs.NOISE_SCALE, "laplace")
    return s * z.view(shape)


@pytest.mark.deepspeed
@pytest.mark.parametrize("case", ROUTES, ids=[c["name"] for c in ROUTES])
def test_forward_sees_perturbed_weights_and_the_model_is_clean(ds_runs, case):
    got = result(ds_runs, case["name"])
    folder = ds_runs[0] / case["name"]
    assert got["chain"][1:] == ["DeepSpeedZeroOptimizer" if case["stage"] < 3 else "DeepSpeedZeroOptimizer_Stage3",
                                "FusedMergOptAdamW"]
    assert got["world_size"] == 2 and got["seed"] == SEED and got["noise_step"] == runs.STEPS + 1
    bf16 = case.get("bf16", False)
    initial = got["initial"][LAYER_WEIGHT].to(torch.bfloat16 if bf16 else torch.float32)
    # theta_t: checkpoint-(t-1) holds it (saved by the Trainer after the callback cleaned the model);
    # theta_1 is the initial model, up to the rounding of the first perturbation's removal.
    theta = {1: initial, **{t: checkpoint(folder, t - 1)[LAYER_WEIGHT] for t in range(2, runs.STEPS + 2)}}
    assert sorted(got["seen"]) == list(range(1, runs.STEPS + 1))
    shifted = 0
    for t, forwards in got["seen"].items():
        assert len(forwards) == 2 and torch.equal(forwards[0], forwards[1])  # both micro-batches
        seen, clean = forwards[0], theta[t]
        assert seen.dtype == clean.dtype == (torch.bfloat16 if bf16 else torch.float32)
        expected = clean.float() + perturbation(got, t, clean.shape)
        if bf16:  # seen = bf16(theta + s z) of the fp32 partition; clean = bf16(theta)
            bound = EPS_BF16 * (clean.float().abs() + expected.abs()) * 1.01
            assert bool(((seen.float() - expected).abs() <= bound).all()), (t, SEED)
        else:
            torch.testing.assert_close(seen, expected, rtol=4 * EPS32, atol=4 * EPS32, msg=f"t={t} seed={SEED}")
        if noise.step_scale(SEED, t, got["alphas"], 7) != 0.0:
            shifted += 1
            assert (seen.float() - clean.float()).abs().max() > 1e-3, (t, SEED)  # not the clean weights
    assert shifted > 0, SEED
    # Evaluations (before training, after steps 2 and 4) see theta.
    assert sorted(got["evaluated"]) == [1, 3, 5]
    for t, forwards in got["evaluated"].items():
        if t == 1:  # one rounding of the initial weights (bf16: of their fp32 value) apart
            tolerance = 2 * EPS_BF16 if bf16 else 4 * EPS32
            torch.testing.assert_close(forwards[0], theta[1], rtol=tolerance, atol=tolerance)
        else:
            assert torch.equal(forwards[0], theta[t]), t
    # The model after train(), and what save_model() then writes, are theta too: the last checkpoint's.
    last = checkpoint(folder, runs.STEPS)
    saved = safetensors_torch.load_file(os.path.join(folder, "final", "model.safetensors"))
    for name, value in got["final"].items():  # (ZeRO-2 files also hold lm_head.weight, tied to wte)
        assert torch.equal(last[name], value), name
        assert torch.equal(saved[name], value), name


@pytest.mark.deepspeed
@pytest.mark.parametrize("case", ROUTES[:2], ids=[c["name"] for c in ROUTES[:2]])
def test_zero_run_follows_the_one_process_run(ds_runs, reference, case):
    """Bit for bit the Trainer's run without DeepSpeed: losses, evaluations and checkpoints
    (both ranks get the same micro-batches, so DeepSpeed's gradient average is exact)."""
    got = result(ds_runs, case["name"])
    folder, want = reference
    assert got["losses"] == want["losses"] and got["eval_losses"] == want["eval_losses"], SEED
    for step in range(1, runs.STEPS + 1):
        ours, theirs = checkpoint(ds_runs[0] / case["name"], step), checkpoint(folder, step)
        for name, value in theirs.items():
            assert torch.equal(ours[name], value), (step, name, SEED)


@pytest.mark.deepspeed
def test_resume_from_checkpoint_continues_the_run(ds_runs):
    got = result(ds_runs, "resume-zero3")
    full, resumed = got["full"], got["resumed"]
    assert resumed["seed"] == full["seed"] == SEED and resumed["noise_step"] == full["noise_step"] == runs.STEPS + 1
    assert resumed["losses"] == full["losses"]  # steps 1-2 from the checkpoint's log, 3-4 trained again
    for name, value in full["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name


@pytest.mark.deepspeed
@pytest.mark.parametrize("name", ["dropped", "dropped-explicit"])
def test_optimizers_dropped_by_deepspeed_raise(ds_runs, name):
    """``optimizers=(FusedMergOptAdamW, scheduler)`` with ``deepspeed=``: the Trainer trains
    torch AdamW instead; the callback stops it before the first step, naming the route."""
    got = result(ds_runs, name)
    assert got["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "AdamW"]
    assert got["error"] == "TypeError" and got["global_step"] == 0
    for words in ("optimizer_cls_and_kwargs", "deepspeed=", "discards Trainer(optimizers=(opt, scheduler))"):
        assert words in got["message"]


# The callback's checks alone, with stand-ins for the Trainer's optimizer chain (no DeepSpeed run).

class _Wrapper:
    """Stands for Accelerate's DeepSpeedOptimizerWrapper and DeepSpeed's ZeRO optimizer: an
    object whose ``.optimizer`` is the optimizer it wraps."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def _callback_event(callback, event: str, optimizer, model=None, deepspeed=None):
    args = types.SimpleNamespace(deepspeed=deepspeed)
    control = transformers.TrainerControl()
    return getattr(callback, event)(args, transformers.TrainerState(), control, optimizer=optimizer, model=model)


def test_callback_names_the_deepspeed_route():
    """Under DeepSpeed (here: TrainingArguments.deepspeed set) the Trainer's optimizer must hold
    ours; the error names optimizer_cls_and_kwargs and the optimizer chain it found."""
    model = torch.nn.Linear(3, 3)
    adamw = torch.optim.AdamW(model.parameters())
    config = {"zero_optimization": {"stage": 2}}
    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs") as error:
        _callback_event(MergOptCallback(), "on_train_begin", _Wrapper(_Wrapper(adamw)), model, deepspeed=config)
    assert "_Wrapper -> _Wrapper -> AdamW" in str(error.value) and "deepspeed=" in str(error.value)
    # Given explicitly, the optimizer must be the one the Trainer trains with under DeepSpeed.
    mergopt = FusedMergOptAdamW(model.parameters(), lr=1e-2, seed=1)
    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs"):
        _callback_event(MergOptCallback(mergopt), "on_train_begin", _Wrapper(adamw), model, deepspeed=config)
    _callback_event(MergOptCallback(mergopt), "on_train_begin", _Wrapper(_Wrapper(mergopt)), model, deepspeed=config)
    _callback_event(MergOptCallback(), "on_train_begin", _Wrapper(_Wrapper(mergopt)), model, deepspeed=config)
    # Another MergOPT optimizer in the Trainer: the one given is not training.
    other = FusedMergOptAdamW(torch.nn.Linear(3, 3).parameters(), lr=1e-2, seed=1)
    with pytest.raises(TypeError, match="does not train with"):
        _callback_event(MergOptCallback(mergopt), "on_train_begin", _Wrapper(other), model)
    # Without DeepSpeed, an optimizer chain the callback cannot see through keeps the one given.
    _callback_event(MergOptCallback(mergopt), "on_train_begin", adamw, model)
    with pytest.raises(TypeError, match="FusedMergOptAdamW or MergOpt"):
        _callback_event(MergOptCallback(), "on_train_begin", adamw, model)
