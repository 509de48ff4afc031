"""The demo (``python -m mergopt_kernels demo``): tasks, the control run against torch's AdamW,
the end-to-end quick run and its outputs, and the command line's argument errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergopt_kernels.__main__ import main
from mergopt_kernels.demo import MERGES, quick_config, run_demo, summarise
from mergopt_kernels.demo.finetune import OPTIMIZERS, FinetuneConfig, finetune
from mergopt_kernels.demo.model import PretrainConfig, pretrain
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
               for kind in OPTIMIZERS}
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
    assert main(["demo", "--quick", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_results_and_figures(quick_results):
    out, data = quick_results
    for name in ("task_vector_histogram.png", "merge_landscape_adamw.png", "merge_landscape_mergopt.png"):
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


def test_summary_gain_is_relative_to_adamw_of_the_same_method():
    accuracy = {"pre-trained": [[0.5, 0.5]], "ties/adamw": [[0.5, 0.7], [0.6, 0.6]],
                "ties/mergopt": [[0.6, 0.6], [0.6, 0.8]]}
    summary = {entry["row"]: entry for entry in summarise(accuracy)}
    assert summary["ties/adamw"]["mean"] == pytest.approx([55.0, 65.0, 60.0])
    assert summary["ties/mergopt"]["gain_mean"] == pytest.approx((0.0 + 100 * 0.1 / 0.6) / 2)
    assert summary["ties/mergopt"]["gain_positive"] == 1 and summary["ties/adamw"]["gain_positive"] is None
    assert summary["pre-trained"]["std"] == [0.0, 0.0, 0.0]


def test_explicit_options_and_override_noise_scale(tmp_path):
    config = quick_config(tasks=("upright", "inverted"), merges=("ties",), noise_scale=0.0, progress=False,
                          landscape_points=2)
    results = run_demo(config)
    assert results["noise"]["scale"] == 0.0 and results["noise"]["source"] == "--noise-scale"
    assert set(results["accuracy"]) == {"pre-trained", *(f"{m}/{k}" for m in ("individual", "ties") for k in OPTIMIZERS)}
    # With the noise off, the MergOPT run is the control run.
    assert results["accuracy"]["ties/mergopt"] == results["accuracy"]["ties/control"]


@pytest.mark.parametrize("args, message", [
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
