"""The demo (``python -m mergopt_kernels demo``): tasks, the control run against torch's AdamW,
the definitions of the four control rows, the report's intervals and verdicts, the end-to-end
quick run and its outputs, and the command line's argument errors."""

import contextlib
import dataclasses
import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergopt_kernels import noise
from mergopt_kernels.__main__ import main
from mergopt_kernels.demo import MERGES, quick_config, run_demo, summarise
from mergopt_kernels.demo.finetune import (MAIN_OPTIMIZERS, OPTIMIZERS, FinetuneConfig, Recipe, arm_recipe, finetune,
                                           make_optimizer, make_scheduler, mean_abs_scale, train_expert)
from mergopt_kernels.demo.model import PretrainConfig, pretrain
from mergopt_kernels.demo.protocol import LAMBDAS, MATCH_TOLERANCE, match_lr, noise_offset_steps, task_vector_norm
from mergopt_kernels.demo.report import LABELS, lambda_summary, lambda_verdicts, paired_interval, verdicts
from mergopt_kernels.demo.tasks import DEFAULT_TASKS, load_digit_splits, make_tasks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits()


def test_tasks_share_labels_and_differ_in_view(splits):
    train, test = splits
    tasks = make_tasks(DEFAULT_TASKS, splits)
    assert len(tasks) >= 4 and [t.name for t in tasks] == list(DEFAULT_TASKS)
    assert train.y.numel() + test.y.numel() == 1797
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(10))
    for task in tasks:
        assert torch.equal(task.train.y, train.y) and torch.equal(task.test.y, test.y)
        assert task.train.x.shape == train.x.shape and task.train.x.dtype == torch.float32
        assert 0.0 <= float(task.train.x.min()) and float(task.train.x.max()) <= 1.0
    inputs = [task.train.x for task in tasks]
    for i in range(len(inputs)):
        for j in range(i + 1, len(inputs)):
            assert not torch.equal(inputs[i], inputs[j]), (tasks[i].name, tasks[j].name)
    # Each view is a pixel permutation (or the inversion) of the upright image.
    upright = tasks[0].train.x
    for task in tasks[1:]:
        x = task.train.x
        same_pixels = torch.equal(x.sort(1).values, upright.sort(1).values)
        assert same_pixels or torch.allclose(x, 1.0 - upright), task.name


@pytest.mark.parametrize("names, message", [
    (["upright", "sideways"], "unknown task"),
    (["upright", "upright"], "must not repeat"),
    (["upright"], "at least two"),
])
def test_bad_task_names(splits, names, message):
    with pytest.raises(ValueError, match=message):
        make_tasks(names, splits)


def test_control_equals_torch_adamw_and_mergopt_does_not(splits):
    tasks = make_tasks(["upright", "mirrored"], splits)
    model, base = pretrain(tasks, PretrainConfig(steps=20), "cpu")
    config = FinetuneConfig(epochs=1)
    experts = {kind: finetune(model, base, tasks[1], kind, config, data_seed=3, noise_scale=1e-2, noise_seed=5)
               for kind in MAIN_OPTIMIZERS}
    moved = max(float((experts["adamw"][k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-3
    for key in base:
        # Float rounding only: the native op may fuse differently from torch's foreach AdamW.
        torch.testing.assert_close(experts["control"][key], experts["adamw"][key], rtol=1e-5, atol=1e-6)
    noisy_diff = max(float((experts["mergopt"][k] - experts["adamw"][k]).abs().max()) for k in base)
    assert noisy_diff > 1e-4


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text()), printed.getvalue()


def test_quick_demo_writes_the_printed_report_as_report_md(quick_results):
    out, _, printed = quick_results
    report = (out / "report.md").read_text()
    command = f"python -m mergopt_kernels demo --quick --no-progress --threads 1 --out {out}"
    assert report.startswith(f"# `{command}`\n\n")
    assert "torch " in report and "wall time" in report
    body = report.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert body in printed and "MergOPT against each row" in body
    assert body.splitlines()[0].startswith("device cpu")
    for name in ("task_vector_histogram.png", "merge_landscape_adamw.png", "merge_landscape_mergopt.png",
                 "lambda_curves.png"):
        assert f"({name})" in report


def test_quick_demo_writes_results_and_figures(quick_results):
    out, data, _ = quick_results
    for name in ("task_vector_histogram.png", "merge_landscape_adamw.png", "merge_landscape_mergopt.png",
                 "lambda_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["tasks"] == list(DEFAULT_TASKS)
    assert data["config"]["seeds"] == 1
    noise = data["noise"]
    assert noise["source"] == "laplace fit" and noise["scale"] == noise["fit"]["b"] > 0
    expected_rows = ["pre-trained"] + [f"{method}/{kind}" for method in ("individual", *MERGES) for kind in OPTIMIZERS]
    assert list(data["accuracy"]) == expected_rows
    for row, per_seed in data["accuracy"].items():
        assert len(per_seed) == 1 and len(per_seed[0]) == len(DEFAULT_TASKS), row
        assert all(0.0 <= acc <= 1.0 for acc in per_seed[0]), row
    summary = {entry["row"]: entry for entry in data["summary"]}
    assert summary["individual/control"]["gain_mean"] == 0.0
    assert summary["individual/adamw"]["gain_mean"] is None
    assert len(summary["dare/mergopt"]["mean"]) == len(DEFAULT_TASKS) + 1
    # Fine-tuning helps each task over the pre-trained model.
    pre, individual = data["accuracy"]["pre-trained"][0], data["accuracy"]["individual/adamw"][0]
    assert all(i > p for i, p in zip(individual, pre))
    assert max(data["control_max_abs_diff"]) < 1e-5
    landscape = data["landscape"]
    n = len(landscape["coefficients"])
    assert n == 5 and all(len(landscape[kind]) == n and len(landscape[kind][0]) == n for kind in ("adamw", "mergopt"))
    assert set(landscape["low_loss_share"]) == {"adamw", "mergopt"}
    assert data["optimizers"] == list(OPTIMIZERS)
    assert data["lambda_sweep"]["lambdas"] == list(LAMBDAS) == pytest.approx([0.1 * i for i in range(1, 11)])
    for kind in OPTIMIZERS:
        assert np.asarray(data["lambda_sweep"]["scores"][kind]).shape == (1, len(LAMBDAS), len(DEFAULT_TASKS))
    # lambda 0.3 of the sweep is the task-arithmetic row of the table.
    assert data["lambda_sweep"]["scores"]["mergopt"][0][2] == data["accuracy"]["task_arithmetic/mergopt"][0]
    assert [entry["optimizer"] for entry in data["lambda_summary"]] == list(OPTIMIZERS)
    assert len(data["matched_norm"]) == len(DEFAULT_TASKS)
    assert all(abs(entry["ratio"] - 1) <= MATCH_TOLERANCE for entry in data["matched_norm"])
    assert {(v["control"], v["method"]) for v in data["verdicts"]} == {
        (kind, method) for kind in OPTIMIZERS if kind != "mergopt"
        for method in ("individual", *MERGES, "lambda best", "lambda area")}


def test_quick_demo_prints_every_row_and_the_lambda_areas(quick_results):
    _, data, printed = quick_results
    lines = printed.splitlines()
    for method in ("individual", *MERGES):
        for kind in OPTIMIZERS:
            assert any(line.split()[:1] == [method] and f"  {LABELS[kind]}  " in line for line in lines), (method, kind)
    sweep_start = next(i for i, line in enumerate(lines) if line.startswith("Task arithmetic, lambda"))
    for entry in data["lambda_summary"]:
        assert any(line.startswith(LABELS[entry["optimizer"]] + "  ") and f"{entry['area']:.2f}" in line
                   for line in lines[sweep_start:]), entry["optimizer"]
    assert any(line.startswith("vs AdamW, matched norm") for line in lines)


def test_summary_gain_is_relative_to_adamw_of_the_same_method():
    accuracy = {"pre-trained": [[0.5, 0.5]], "ties/adamw": [[0.5, 0.7], [0.6, 0.6]],
                "ties/mergopt": [[0.6, 0.6], [0.6, 0.8]]}
    summary = {entry["row"]: entry for entry in summarise(accuracy)}
    assert summary["ties/adamw"]["mean"] == pytest.approx([55.0, 65.0, 60.0])
    assert summary["ties/mergopt"]["gain_mean"] == pytest.approx((0.0 + 100 * 0.1 / 0.6) / 2)
    assert summary["ties/mergopt"]["gain_positive"] == 1 and summary["ties/adamw"]["gain_positive"] is None
    assert summary["pre-trained"]["std"] == [0.0, 0.0, 0.0]


def test_without_controls_only_the_three_main_rows_run():
    config = quick_config(tasks=("upright", "inverted"), merges=("ties",), progress=False, landscape_points=2,
                          controls=False)
    results = run_demo(config)
    assert results["optimizers"] == list(MAIN_OPTIMIZERS) and results["matched_norm"] == []
    assert set(results["accuracy"]) == {"pre-trained", *(f"{m}/{k}" for m in ("individual", "ties")
                                                         for k in MAIN_OPTIMIZERS)}
    assert set(results["lambda_sweep"]["scores"]) == set(MAIN_OPTIMIZERS)


def test_explicit_options_and_override_noise_scale(tmp_path):
    config = quick_config(tasks=("upright", "inverted"), merges=("ties",), noise_scale=0.0, progress=False,
                          landscape_points=2)
    results = run_demo(config)
    assert results["noise"]["scale"] == 0.0 and results["noise"]["source"] == "--noise-scale"
    assert set(results["accuracy"]) == {"pre-trained", *(f"{m}/{k}" for m in ("individual", "ties") for k in OPTIMIZERS)}
    # With the noise off, the MergOPT run is the control run.
    assert results["accuracy"]["ties/mergopt"] == results["accuracy"]["ties/control"]


def test_noise_offset_sets_b_and_every_run_reports_its_offset():
    config = quick_config(tasks=("upright", "inverted"), merges=("ties",), noise_offset=20.0, progress=False,
                          landscape_points=2, controls=False)
    results = run_demo(config)
    noise, lr = results["noise"], config.finetune.lr
    assert noise["scale"] == pytest.approx(20.0 * lr / mean_abs_scale()) and "offset of 20" in noise["source"]
    assert noise["offset"] == pytest.approx(20.0)
    assert noise["fitted_offset"] == pytest.approx(noise_offset_steps(noise["fit"]["b"], lr))
    # An explicit b wins over the offset.
    config = dataclasses.replace(config, noise_scale=0.0, seeds=1)
    assert run_demo(config)["noise"]["scale"] == 0.0
    with pytest.raises(ValueError, match="noise_offset"):
        quick_config(noise_offset=-1.0).check()


def test_noise_offset_known_answers():
    # The paper: b = 5e-4 at lr 2e-5, E|s| = 5/6: 20.8 Adam steps.
    assert noise_offset_steps(5e-4, 2e-5) == pytest.approx(125 / 6)
    assert noise_offset_steps(0.00395, 1e-3) == pytest.approx(0.00395 / 1e-3 * 5 / 6)
    # K = 1 and alpha 1.5: |s| = 0.5 at every step.
    assert noise_offset_steps(1e-3, 1e-4, alphas=(1.5,), k_max=1) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        noise_offset_steps(1e-3, 0.0)


@pytest.mark.parametrize("args, message", [
    (["--noise-scale", "1e-3", "--noise-offset", "20"], "exclude each other"),
    (["--noise-offset", "-1"], ">= 0"),
    (["--tasks", "upright", "sideways"], "unknown task"),
    (["--tasks", "upright"], "at least two"),
    (["--merges", "fisher"], "invalid choice"),
    (["--seeds", "0"], "positive integer"),
    (["--noise-scale", "-1"], ">= 0"),
    (["--distribution", "uniform"], "invalid choice"),
])
def test_cli_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "mergopt_kernels", "demo", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--noise-scale" in result.stdout


# --- the control rows: each is what its label says -------------------------------------------------

def test_control_recipes():
    lr, wd, b = 3e-4, 1e-3, 0.0125
    recipes = {kind: arm_recipe(kind, lr, wd, b, matched_lr=2e-4) for kind in OPTIMIZERS}
    assert recipes["adamw"].optimizer == "adamw" and recipes["adamw"].schedule == "warmup_linear"
    assert recipes["adamw_constant"] == Recipe("adamw", lr, wd, schedule="constant")
    assert recipes["adamw_matched"].lr == 2e-4 and recipes["adamw_matched"].schedule == "warmup_linear"
    assert recipes["mergopt"].noise_scale == b and recipes["control"].noise_scale == 0.0
    assert recipes["mergopt_gaussian"].distribution == "gaussian"
    assert recipes["mergopt_gaussian"].noise_scale == pytest.approx(b * math.sqrt(2))  # Var Laplace(0, b) = 2 b^2
    assert arm_recipe("mergopt_gaussian", lr, wd, b, "gaussian").noise_scale == b
    assert recipes["mergopt_fixed_s"].k_max == 1 and len(recipes["mergopt_fixed_s"].alphas) == 1
    # Every non-AdamW setting apart from the one the control changes is MergOPT's.
    for kind in ("mergopt_gaussian", "mergopt_fixed_s", "control"):
        assert (recipes[kind].lr, recipes[kind].weight_decay, recipes[kind].schedule) == (lr, wd, "warmup_linear")
    with pytest.raises(ValueError, match="matched_lr"):
        arm_recipe("adamw_matched", lr, wd, b)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        arm_recipe("sgd", lr, wd, b)


def test_mean_abs_scale_of_the_paper_settings():
    # |K alpha - 1| over alpha in 0.1..0.6, K in 1..7, summed by hand in tenths: 175 / 42 / 5 = 5/6.
    assert mean_abs_scale() == pytest.approx(5 / 6, rel=1e-12)
    seed = random.randrange(2**32)
    recipe = arm_recipe("mergopt", 1e-3, 0.0, 1e-2)
    drawn = [abs(noise.step_scale(seed, t, recipe.alphas, recipe.k_max)) for t in range(1, 4001)]
    # std of |s| is below 0.7: 6 standard errors over 4000 steps.
    assert np.mean(drawn) == pytest.approx(5 / 6, abs=6 * 0.7 / math.sqrt(4000)), f"seed {seed}"


def _perturbation_after_build(recipe, seed, n):
    """The perturbation FusedMergOptAdamW puts on a zero parameter when built (step 1)."""
    p = torch.nn.Parameter(torch.zeros(n))
    make_optimizer(recipe, [p], noise_seed=seed)
    return p.detach().double()


def _seed_with_scale(recipe, least=0.3):
    while True:
        seed = random.randrange(2**32)
        scale = noise.step_scale(seed, 1, recipe.alphas, recipe.k_max)
        if abs(scale) >= least:
            return seed, scale


def test_gaussian_control_has_the_variance_of_the_laplace_noise():
    n, b = 400_000, 0.02
    moments = {}
    for kind in ("mergopt", "mergopt_gaussian"):
        recipe = arm_recipe(kind, 1e-3, 0.0, b)
        seed, scale = _seed_with_scale(recipe)
        z = _perturbation_after_build(recipe, seed, n) / scale
        moments[kind] = (float(z.var()), float((z ** 4).mean() / z.var() ** 2), seed)
    # Sample variance: relative std sqrt((kurtosis - 1) / n), 0.35 % for Laplace; 6 of them.
    for kind, (var, _, seed) in moments.items():
        assert var == pytest.approx(2 * b * b, rel=6 * math.sqrt(5 / n)), f"{kind}, seed {seed}"
    # Same variance, different shape: kurtosis 3 (Gaussian) against 6 (Laplace).
    assert moments["mergopt_gaussian"][1] == pytest.approx(3.0, abs=0.1), f"seed {moments['mergopt_gaussian'][2]}"
    assert moments["mergopt"][1] == pytest.approx(6.0, abs=0.5), f"seed {moments['mergopt'][2]}"


def test_fixed_s_control_perturbs_every_step_by_the_mean_abs_s():
    n, b = 1_003, 0.02
    recipe = arm_recipe("mergopt_fixed_s", 0.0, 0.0, b)
    seed = random.randrange(2**32)
    scales = {noise.step_scale(seed, t, recipe.alphas, recipe.k_max) for t in range(1, 2001)}
    assert len(scales) == 1 and scales.pop() == pytest.approx(5 / 6, rel=1e-6), f"seed {seed}"
    p = torch.nn.Parameter(torch.zeros(n))
    opt = make_optimizer(recipe, [p], noise_seed=seed)
    for t in range(1, 6):  # lr 0: theta stays 0, the parameter holds s_t z_t
        z = noise.element_noise(seed, 0, t, 0, n, 0.0, b, "laplace")
        torch.testing.assert_close(p.detach(), (5 / 6) * z, rtol=2**-21, atol=0.0, msg=f"seed {seed}, step {t}")
        p.grad = torch.zeros(n)
        opt.step()
    varying = arm_recipe("mergopt", 0.0, 0.0, b)
    assert len({noise.step_scale(seed, t, varying.alphas, varying.k_max) for t in range(1, 200)}) > 5


@pytest.mark.parametrize("kind", ["adamw", "adamw_constant", "mergopt"])
def test_lr_schedule_of_each_row(kind):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    recipe = arm_recipe(kind, 1e-3, 1e-3, 1e-3)
    opt = make_optimizer(recipe, model.parameters(), noise_seed=1)
    steps, seen = 40, []

    def batches():
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])  # the lr of the step about to be taken
            yield torch.randn(4, 3)

    train_expert(model, opt, batches(), lambda net, x: net(x).square().mean(), make_scheduler(recipe, opt, steps))
    if kind == "adamw_constant":
        assert seen == [1e-3] * steps
    else:  # warm-up over the first 4 steps, then linear decay towards 0
        assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and max(seen) == pytest.approx(1e-3)
        assert seen[-1] == pytest.approx(1e-3 / 36) and all(a >= b for a, b in zip(seen[3:], seen[4:]))


def test_match_lr_finds_the_lr_of_a_target_norm():
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    c, power = rng.uniform(0.5, 5.0), rng.uniform(0.5, 1.2)
    calls = []

    def norm_at(lr):
        calls.append(lr)
        return c * lr ** power

    target = c * (3e-4 * rng.uniform(0.5, 2.0)) ** power
    found = match_lr(norm_at, 3e-4, c * 3e-4 ** power, target)
    assert abs(found["ratio"] - 1) <= MATCH_TOLERANCE and found["norm"] == pytest.approx(c * found["lr"] ** power)
    assert len(calls) <= 4 and found["tried"][0] == [3e-4, c * 3e-4 ** power], f"seed {seed}"
    assert match_lr(norm_at, 1e-3, 2.0, 2.0 * (1 + MATCH_TOLERANCE / 2))["lr"] == 1e-3 and len(calls) <= 4


def test_matched_norm_row_really_matches_mergopt_norm(splits):
    tasks = ("upright", "inverted")
    config = quick_config(tasks=tasks, merges=("task_arithmetic",), noise_scale=0.05, landscape_points=2,
                          progress=False)
    results = run_demo(config)
    all_tasks = make_tasks(tasks, splits)
    model, base = pretrain(make_tasks(DEFAULT_TASKS, splits), config.pretrain, "cpu")
    for index, (task, entry) in enumerate(zip(all_tasks, results["matched_norm"])):
        assert entry["lr"] != config.finetune.lr  # b = 0.05 changes the norm: the search had to move
        common = dict(data_seed=0, noise_scale=0.05, noise_seed=index)
        matched = finetune(model, base, task, "adamw_matched", config.finetune, matched_lr=entry["lr"], **common)
        mergopt = finetune(model, base, task, "mergopt", config.finetune, **common)
        ratio = task_vector_norm(base, matched) / task_vector_norm(base, mergopt)
        assert abs(ratio - 1) <= MATCH_TOLERANCE and ratio == pytest.approx(entry["ratio"], rel=1e-9), task.name


def test_paired_interval_and_verdicts_known_answers():
    # t(0.975, 2) = 4.302652729911275; gains 1, 2, 3: mean 2, std 1.
    interval = paired_interval([1.0, 2.0, 3.0])
    assert interval == {"mean": 2.0, "half": pytest.approx(4.302652729911275 / math.sqrt(3)), "positive": 3, "n": 3}
    assert paired_interval([0.5])["half"] is None
    accuracy = {"pre-trained": [[0.5, 0.5]] * 3,
                "ties/adamw": [[0.50, 0.50], [0.60, 0.60], [0.40, 0.40]],
                "ties/mergopt": [[0.51, 0.51], [0.61, 0.61], [0.41, 0.41]],
                "ties/control": [[0.52, 0.52], [0.62, 0.62], [0.42, 0.42]],
                "ties/mergopt_fixed_s": [[0.50, 0.52], [0.61, 0.61], [0.40, 0.42]]}
    found = {entry["control"]: entry for entry in verdicts(accuracy)}
    assert set(found) == {"adamw", "control", "mergopt_fixed_s"}
    assert found["adamw"]["verdict"] == "beats" and found["control"]["verdict"] == "loses"
    assert found["mergopt_fixed_s"]["verdict"] == "ties"
    assert found["adamw"]["mean"] == pytest.approx(100 * (0.01 / 0.5 + 0.01 / 0.6 + 0.01 / 0.4) / 3)


def test_lambda_summary_known_answers():
    sweep = {"lambdas": [0.1, 0.2, 0.4],
             "scores": {"adamw": [[[0.5, 0.5], [0.6, 0.6], [0.4, 0.4]], [[0.5, 0.5], [0.7, 0.7], [0.5, 0.5]]],
                        "mergopt": [[[0.6, 0.4], [0.6, 0.6], [0.6, 0.6]], [[0.5, 0.5], [0.8, 0.8], [0.5, 0.5]]]}}
    adamw, mergopt = lambda_summary(sweep)
    # seed 0 AdamW: (50 + 60) / 2 * 0.1 + (60 + 40) / 2 * 0.2 = 15.5 over 0.3; seed 1: 18 over 0.3
    assert adamw["area"] == pytest.approx((15.5 + 18.0) / 0.3 / 2) and adamw["best"] == pytest.approx(65.0)
    assert adamw["best_lambda"] == 0.2 and adamw["best_gain"] is None
    assert mergopt["best"] == pytest.approx(70.0) and mergopt["curve"] == pytest.approx([50.0, 70.0, 55.0])
    assert mergopt["best_gain"]["mean"] == pytest.approx(100 * (0.0 / 60 + 10.0 / 70) / 2)
    found = {entry["method"]: entry for entry in lambda_verdicts(sweep)}
    assert set(found) == {"lambda best", "lambda area"} and found["lambda best"]["mean"] == mergopt["best_gain"]["mean"]
    assert found["lambda area"]["mean"] == pytest.approx(mergopt["area_gain"]["mean"])


def test_merges_at_the_published_code_settings():
    seed = random.randrange(2**32)
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (7, 13), "b": (1,), "c": (1001,)}
    base = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    merged = MERGES["ties_paper"](base, experts, 0)
    for key, value in base.items():
        total = torch.zeros_like(value, dtype=torch.float64)
        for expert in experts:
            tau = (expert[key] - value).double().flatten()
            keep = max(1, math.floor(0.3 * tau.numel() + 0.5))
            trimmed = torch.zeros_like(tau)
            top = tau.abs().topk(keep).indices
            trimmed[top] = tau[top]
            total += trimmed.view(value.shape)
        torch.testing.assert_close(merged[key].double(), value.double() + 0.3 * total, rtol=0, atol=1e-5,
                                   msg=f"{key}, seed {seed}")
    # DARE at drop 0.9: about a tenth of each task vector survives, scaled by 1 / 0.1, then lambda 0.3.
    single = MERGES["dare_paper"](base, experts[:1], seed)
    tau, kept = experts[0]["c"] - base["c"], single["c"] - base["c"]
    survivors = kept.abs() > 1e-6
    assert abs(float(survivors.double().mean()) - 0.1) < 5 * math.sqrt(0.09 / 1001), f"seed {seed}"
    torch.testing.assert_close(kept[survivors], 3.0 * tau[survivors], rtol=1e-4, atol=1e-6, msg=f"seed {seed}")
