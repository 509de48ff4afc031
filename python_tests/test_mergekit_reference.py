"""Our merges against mergekit 0.1.5's outputs on the same tensors (values checked in).

python_tests/data/mergekit_reference.safetensors holds a tiny Llama base, three experts and
mergekit's merges of them; mergekit_reference.json the configs and the command that produced
them (python_tests/data/make_mergekit_reference.py). Each config is run here twice: through the
in-memory functions with the equivalent options, and as the same config file through
``mergopt-kernels merge --config`` with ``conventions: mergekit``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergopt_kernels import merging
from mergopt_kernels.__main__ import main

safetensors_torch = pytest.importorskip("safetensors.torch")

DATA = Path(__file__).resolve().parent / "data"
EPS32 = torch.finfo(torch.float32).eps
REFERENCE = safetensors_torch.load_file(DATA / "mergekit_reference.safetensors")
CASES = json.loads((DATA / "mergekit_reference.json").read_text())["cases"]


def state(prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) + 1:]: value for key, value in REFERENCE.items() if key.startswith(prefix + "/")}


BASE = state("input/base")
EXPERTS = [state(f"input/expert{i}") for i in range(3)]


def model_options(case: str, name: str) -> list:
    return [model["parameters"][name] for model in CASES[case]["models"]]


def ours(case: str) -> dict[str, torch.Tensor]:
    """The in-memory merge with the options that mirror mergekit's config."""
    config = CASES[case]
    weights = model_options(case, "weight")
    if config["merge_method"] == "linear":
        return merging.weight_average(EXPERTS, weights=weights)
    scaling = config.get("parameters", {}).get("lambda", 1.0)
    if config["merge_method"] == "task_arithmetic":
        return merging.task_arithmetic(BASE, EXPERTS, scaling, weights=weights)
    normalize = config.get("parameters", {}).get("normalize", True)
    return merging.ties_merging(BASE, EXPERTS, scaling, model_options(case, "density"), per_tensor=True,
                                weights=weights, merge_func="mean" if normalize else "sum", exact_count=True,
                                count_rounding="down", zero_sign="positive")


def tolerance(case: str, key: str) -> torch.Tensor | float:
    """0 for TIES (the same fp32 operations in the same order: equal bits). Linear and task
    arithmetic accumulate in another order (mergekit: addcmul, then the division or lambda), so
    each side is within K + 1 roundings of the exact sum: 4 eps times the sum of magnitudes."""
    config = CASES[case]
    if config["merge_method"] == "ties":
        return 0.0
    weights = model_options(case, "weight")
    if config["merge_method"] == "linear":
        magnitude = sum(abs(w) * e[key].abs() for w, e in zip(weights, EXPERTS)) / abs(sum(weights))
    else:
        scaling = abs(config.get("parameters", {}).get("lambda", 1.0))
        magnitude = BASE[key].abs() + scaling * sum(abs(w) * (e[key] - BASE[key]).abs()
                                                    for w, e in zip(weights, EXPERTS))
    return 4 * EPS32 * magnitude


def assert_matches_mergekit(case: str, merged: dict[str, torch.Tensor]) -> None:
    expected = state(case)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert ((merged[key] - value).abs() <= tolerance(case, key)).all(), (case, key)


@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_functions_match_mergekit(case):
    assert_matches_mergekit(case, ours(case))


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_config_file_matches_mergekit(case, tmp_path):
    for name, sd in [("base", BASE)] + [(f"expert{i}", e) for i, e in enumerate(EXPERTS)]:
        (tmp_path / name).mkdir()
        safetensors_torch.save_file(sd, tmp_path / name / "model.safetensors")
    (tmp_path / "merge.json").write_text(json.dumps(dict(CASES[case], conventions="mergekit")))
    assert main(["merge", "--config", str(tmp_path / "merge.json"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert_matches_mergekit(case, safetensors_torch.load_file(tmp_path / "out" / "model.safetensors"))
