"""FusedMergOptAdamW and MergOpt as DeepSpeed ZeRO client optimizers, on 2 CPU ranks (gloo,
DS_ACCELERATOR=cpu): every element gets the noise of the 1-process run, the noise advances once
per engine step whatever the sub-group size, the first forward is perturbed, clean_weights()
cleans the module and DeepSpeed's exports, checkpoints resume, and unsupported configurations
raise an error that names them.

Every rank feeds the same batches and gradient clipping is off, so a ZeRO run is compared with
the 1-process run (deepspeed_runs.reference) bit for bit. The one rounding that differs: under
bf16, DeepSpeed's fp32 partitions hold theta + s z in fp32 (the 1-process run keeps theta in an
exact master), so the fp32 masters agree within the restores' rounding (bound below).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import deepspeed_runs as runs
from dist_utils import run_ranks
from mergopt_kernels import noise

# DeepSpeed is imported by the ranks only: importing it here would leave it loaded for the
# whole session, where the optimizer looks for DeepSpeed wrappers.
pytestmark = [pytest.mark.deepspeed,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]


def _case(stage, dtype, optimizer="fused", sub_group_size=None, empty_group=False, load_before=False,
          zero_init=False, **zero_options):
    name = f"zero{stage}-{dtype}-{optimizer}" + (f"-subgroup{sub_group_size}" if sub_group_size else "")
    flags = (("empty_group", empty_group), ("load_before", load_before), ("zero_init", zero_init))
    name += "".join(f"-{key}" for key, on in flags if on) + "".join(f"-{key}" for key in zero_options)
    return dict(name=name, stage=stage, dtype=dtype, optimizer=optimizer, sub_group_size=sub_group_size,
                empty_group=empty_group, load_before=load_before, zero_init=zero_init, zero_options=zero_options)


# Stage 3 with sub_group_size=64 cuts this rank's 337 noisy elements into 3 sub-groups (plus one
# for the biases): DeepSpeed calls step() 4 times per engine step. Stages 1 and 2 lay the
# parameters out in another order with round_robin_gradients, with gaps with parameter_alignment.
# DeepSpeed's engine drops empty param groups at every stage (stage 0 leaves the optimizer
# alone otherwise); weights loaded into the model before deepspeed.initialize are clean theta;
# a model built under deepspeed.zero.Init is partitioned before the optimizer is built.
CASES = [_case(1, "fp32"), _case(2, "fp32"), _case(3, "fp32"), _case(3, "fp32", sub_group_size=64),
         _case(2, "fp32", round_robin_gradients=True, parameter_alignment=True),
         _case(1, "bf16"), _case(2, "bf16"), _case(3, "bf16", sub_group_size=64),
         _case(2, "fp32", "mergopt", empty_group=True), _case(3, "fp32", "mergopt", sub_group_size=64),
         _case(0, "fp32", empty_group=True), _case(2, "bf16", load_before=True), _case(3, "fp32", load_before=True),
         _case(3, "fp32", zero_init=True), _case(3, "bf16", sub_group_size=64, zero_init=True),
         _case(3, "fp32", "mergopt", zero_init=True)]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """Every case, trained on 2 ranks in one launch (DeepSpeed's start-up is paid once)."""
    out = tmp_path_factory.mktemp("zero")
    run_ranks(runs.run_cases, CASES, str(out))
    return torch.load(out / "runs.pt")


def restore_rounding_bound(theta: torch.Tensor, param_id: int) -> torch.Tensor:
    """Per element, how far an fp32 partition's theta may drift from the exact master over
    ``runs.STEPS`` steps: each restore fl(fl(theta + s z) - s z) errs by at most
    2^-24 (2 |theta| + |s z|), and the AdamW update applied to a theta that differs may round
    once more (2^-24 |theta|); |theta| over the run is at most the final |theta| + lr * steps."""
    magnitude = theta.abs().flatten() + runs.OPT_KWARGS["lr"] * runs.STEPS
    bound = torch.zeros_like(magnitude)
    for t in range(1, runs.STEPS + 1):
        s = noise.step_scale(runs.SEED, t, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6), 7)
        z = noise.element_noise(runs.SEED, param_id, t, 0, theta.numel(), 0.0, runs.OPT_KWARGS["noise_scale"],
                                "laplace")
        bound += 2.0**-24 * (3 * magnitude + (s * z).abs())
    return bound.view_as(theta)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_zero_run_follows_the_one_process_run(zero_runs, case):
    got, want = zero_runs[case["name"]], runs.reference(case)
    assert got["losses"] == want["losses"]  # every forward saw the same perturbed weights
    for key in ("first", "weights", "after"):  # after construction; clean; perturbed again
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), (key, name)
    param_ids = {name: i for i, name in enumerate(
        [n for n in want["weights"] if n.endswith("weight")] + [n for n in want["weights"] if n.endswith("bias")])}
    for name, theta in want["masters"].items():
        if case["dtype"] == "fp32" or name.endswith("bias"):  # biases: noise off, nothing restored
            assert torch.equal(got["masters"][name], theta.float()), name
        else:
            drift = (got["masters"][name] - theta).abs()
            assert bool((drift <= restore_rounding_bound(theta, param_ids[name])).all()), name


RESUME_CASES = [_case(2, "fp32"), _case(3, "bf16", sub_group_size=64)]


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c["name"] for c in RESUME_CASES])
def test_checkpoints_resume_the_run_and_exports_are_clean(tmp_path, case):
    """A checkpoint saved as the run stands resumes bit for bit; one saved inside
    clean_weights() too, after apply_perturbation(). zero_to_fp32, the module state that
    save_checkpoint writes and the 16-bit export, made inside clean_weights(), hold theta."""
    run_ranks(runs.run_resume, case, str(tmp_path))
    results = torch.load(tmp_path / "resume.pt")
    for clean, result in results.items():
        assert result["resumed"] == result["straight"], clean
        assert result["reloaded"] == result["straight"], clean
        for name, theta in result["straight_weights"].items():
            assert torch.equal(result["resumed_weights"][name], theta), (clean, name)
        fp32, sixteen, module = result["zero_to_fp32"], result["sixteen_bit"], result["module"]
        for name, theta in result["resumed_weights"].items():
            assert torch.equal(fp32[name], theta), (clean, name)
            assert torch.equal(sixteen[name], result["clean_weights"][name]), (clean, name)
            assert torch.equal(sixteen[name], theta.to(sixteen[name].dtype)), (clean, name)
            if module is not None:
                assert torch.equal(module[name], sixteen[name]), (clean, name)


UNSUPPORTED = [
    ({"bf16": {"enabled": True}}, "bf16 without ZeRO (zero_optimization.stage 0)"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": False},
     "offload_optimizer"),
]


def test_unsupported_configurations_raise_errors_that_name_them(tmp_path):
    configs = [{"train_micro_batch_size_per_gpu": 8, "zero_allow_untested_optimizer": True, **config}
               for config, _ in UNSUPPORTED]
    run_ranks(runs.run_unsupported, configs, str(tmp_path))
    messages = torch.load(tmp_path / "errors.pt")
    for message, (_, named) in zip(messages, UNSUPPORTED):
        assert message is not None and named in message, message


def test_readme_snippet(tmp_path):
    """Eight batches: eight engine steps. The checkpoint saved inside clean_weights() and the
    16-bit export hold theta; the one saved before holds theta + s z."""
    run_ranks(runs.run_snippet, str(tmp_path))
    results = torch.load(tmp_path / "snippet.pt")
    assert results["noise_step"] == 9
    clean, sixteen = results["clean"]["zero_to_fp32"], results["clean"]["sixteen_bit"]
    perturbed = results["perturbed"]
    assert sorted(sixteen) == sorted(clean)
    for name, theta in clean.items():
        assert torch.equal(sixteen[name], theta.bfloat16()), name
    assert any(not torch.equal(perturbed[name], clean[name]) for name in clean)


def test_the_deepspeed_internals_read_are_those_of_the_pinned_release():
    """``_deepspeed`` reads the ZeRO optimizers' attributes of DeepSpeed 0.19: the installed
    release is one it reads, and another release is refused with an error that names it."""
    from importlib.metadata import version

    from mergopt_kernels.optim import _deepspeed

    _deepspeed.check_version(version("deepspeed"))
    assert version("deepspeed").startswith("0.19.")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.20\.1 is not supported.*0\.19"):
        _deepspeed.check_version("0.20.1")


# stage 3 keeps parameters under stage3_param_persistence_threshold (all of these, by default)
# gathered between forwards; at 0 each one is gathered for its module's forward and released
ATTACH_CASES = [_case(2, "fp32"), _case(3, "fp32"), _case(3, "fp32", stage3_param_persistence_threshold=0)]


def test_attach_makes_deepspeed_saves_and_evaluation_clean(tmp_path):
    """``opt.attach(engine)``: save_checkpoint (zero_to_fp32 and the module state) and
    save_16bit_model hold theta with no clean_weights() block; an eval-mode forward runs on
    theta; a training-mode forward runs on the same perturbation as before (every rank makes
    each call, as DeepSpeed's saves require)."""
    run_ranks(runs.run_attach, ATTACH_CASES, str(tmp_path))
    results = torch.load(tmp_path / "attach.pt")
    for case in ATTACH_CASES:
        got = results[case["name"]]
        assert any(not torch.equal(got["perturbed"][name], theta) for name, theta in got["clean"].items())
        for name, theta in got["clean"].items():
            assert torch.equal(got["zero_to_fp32"][name], theta), (case["name"], name)
            assert torch.equal(got["sixteen_bit"][name], theta), (case["name"], name)
            if got["module"] is not None:
                assert torch.equal(got["module"][name], theta), (case["name"], name)
            assert torch.equal(got["trained_on"][name], got["perturbed"][name]), (case["name"], name)
        reference = runs.make_model(case["dtype"])
        x, _ = runs.batch(2, case["dtype"])
        with torch.no_grad():
            reference.load_state_dict(got["clean"])
            assert torch.equal(got["evaluated"], reference(x)), case["name"]
            reference.load_state_dict(got["perturbed"])
            assert torch.equal(got["trained"], reference(x)), case["name"]
