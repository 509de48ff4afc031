"""The LM protocol of the demo (``demo --protocol lm``): the generated tasks and their known
answers, the metrics against oracle models, the base cache and its key, and tiny end-to-end runs
(the command line, and the GPU configuration on the CPU with tiny sizes)."""

import dataclasses
import json
import random
import re

import pytest
import torch

from mergopt_kernels.__main__ import main
from mergopt_kernels.demo import lm_experiment
from mergopt_kernels.demo.finetune import OPTIMIZERS
from mergopt_kernels.demo.lm_experiment import LMFinetuneConfig, lm_gpu_config, run_lm_demo
from mergopt_kernels.demo.lm_model import (GPT, GPTConfig, LMPretrainConfig, base_cache_key, count_parameters,
                                           exact_match, load_or_pretrain, next_token_accuracy)
from mergopt_kernels.demo.lm_tasks import (LM_TASKS, PAD, Sequences, decode, encode, in_anbn,
                                           is_balanced, make_lm_task, pretraining_mixture, python_source,
                                           question_examples, vocab_size)
from mergopt_kernels.demo.protocol import MERGES
from mergopt_kernels.demo.tasks import check_task_names

TINY_MODEL = GPTConfig(width=16, layers=1, heads=2, context=32)
TINY = dict(seeds=1, model=TINY_MODEL, pretrain=LMPretrainConfig(steps=4, batch_size=8), pretrain_examples=16,
            finetune=LMFinetuneConfig(train_examples=8, epochs=1, batch_size=8), test_examples=8,
            landscape_points=2, progress=False)


def _solve(name: str, prompt: str) -> str:
    """An independent solver of the question tasks, from the prompt text alone."""
    body = prompt.split(" ", 1)[1].strip().rstrip("=")
    if name == "arithmetic":
        a, b = body.split("+")
        return f"{int(a) + int(b):03d}"
    if name == "sorting":
        return "".join(sorted(body))
    if name == "reversal":
        return body[::-1]
    if name == "brackets":
        while any(pair in body for pair in ("()", "[]")):
            body = body.replace("()", "").replace("[]", "")
        return "y" if body == "" else "n"
    if name == "grammar":
        return "y" if re.fullmatch(r"(a+)(b+)", body) and body.count("a") == body.count("b") else "n"
    if name == "lookup":
        pairs, key = body.split("|")
        return dict(zip(pairs[::2], pairs[1::2]))[key]
    raise AssertionError(name)


@pytest.mark.parametrize("name", [name for name in LM_TASKS if name != "python"])
def test_question_tasks_are_deterministic_and_answers_correct(name):
    seed = random.randrange(1 << 30)
    pairs = question_examples(name, 200, seed)
    assert pairs == question_examples(name, 200, seed), f"seed {seed}"
    assert pairs != question_examples(name, 200, seed + 1), f"seed {seed}"
    assert len({len(prompt) for prompt, _ in pairs}) == 1, "prompts of a task share one length"
    assert len({len(answer) for _, answer in pairs}) == 1
    for prompt, answer in pairs:
        assert answer == _solve(name, prompt), (seed, prompt, answer)
        assert decode(encode(prompt + answer)) == prompt + answer
    if name in ("brackets", "grammar"):
        share = sum(answer == "y" for _, answer in pairs) / len(pairs)
        assert 0.2 < share < 0.8, f"seed {seed}: share of 'y' {share}"


@pytest.mark.parametrize("text, balanced", [("", True), ("()", True), ("([])[]", True), ("([)]", False),
                                            ("((", False), ("])", False), ("[()()]", True)])
def test_is_balanced_known_answers(text, balanced):
    assert is_balanced(text) is balanced


@pytest.mark.parametrize("text, member", [("ab", True), ("aaabbb", True), ("", False), ("aab", False),
                                          ("abab", False), ("ba", False), ("aabbb", False)])
def test_in_anbn_known_answers(text, member):
    assert in_anbn(text) is member


def test_tasks_sequences_masks_and_python_text():
    task = make_lm_task("sorting", 5, 7)
    again = make_lm_task("sorting", 5, 7)
    assert torch.equal(task.train.tokens, again.train.tokens) and torch.equal(task.test_prompts, again.test_prompts)
    prompt_length = task.test_prompts.shape[1]
    assert task.answer_length == 5 and task.test.tokens.shape == (7, prompt_length + 5)
    assert task.test.mask[:, prompt_length:].all() and not task.test.mask[:, :prompt_length].any()
    assert torch.equal(task.test.tokens[:, prompt_length:], task.test_answers)
    python = make_lm_task("python", 6, 4)
    assert python.test_prompts is None and python.answer_length == 0 and python.train.mask.all()
    source = python_source("test")
    for row in python.test.tokens.tolist():
        assert decode(row) in source
    assert python_source("train") != source
    mixture = pretraining_mixture(LM_TASKS, 3)
    assert mixture.tokens.shape[0] == 3 * len(LM_TASKS)
    assert torch.equal(mixture.tokens, pretraining_mixture(LM_TASKS, 3).tokens)
    assert not (mixture.mask & (mixture.tokens == PAD)).any()


@pytest.mark.parametrize("names, message", [(["arithmetic", "poetry"], "unknown task"),
                                            (["lookup", "lookup"], "must not repeat"), (["python"], "at least two")])
def test_bad_lm_task_names(names, message):
    with pytest.raises(ValueError, match=message):
        check_task_names(names, LM_TASKS)


class _Oracle(torch.nn.Module):
    """Predicts the next token of the known sequence that starts with the input (``wrong_rows``:
    sequences whose last token it gets wrong)."""

    def __init__(self, sequences: torch.Tensor, wrong_rows=()):
        super().__init__()
        self.sequences = sequences.clone()
        for row in wrong_rows:
            self.sequences[row, -1] = 1 + self.sequences[row, -1] % (vocab_size() - 1)

    def forward(self, tokens):
        length = tokens.shape[1]
        logits = torch.zeros(*tokens.shape, vocab_size())
        for i, row in enumerate(tokens):
            match = (self.sequences[:, :length] == row).all(1).nonzero()[0, 0]
            for position in range(length):
                if position + 1 < self.sequences.shape[1]:
                    logits[i, position, self.sequences[match, position + 1]] = 1.0
        return logits


def test_exact_match_and_next_token_accuracy_known_answers():
    task = make_lm_task("reversal", 4, 10)
    assert exact_match(_Oracle(task.test.tokens), task) == 1.0
    assert exact_match(_Oracle(task.test.tokens, wrong_rows=[1, 4, 7]), task, batch_size=3) == pytest.approx(0.7)
    assert next_token_accuracy(_Oracle(task.test.tokens), task.test) == 1.0
    # 3 of the 50 answer tokens wrong.
    assert next_token_accuracy(_Oracle(task.test.tokens, wrong_rows=[1, 4, 7]), task.test) == pytest.approx(47 / 50)


def test_count_parameters_matches_the_model_and_gpu_config_is_large():
    for config in (TINY_MODEL, GPTConfig(), GPTConfig(width=48, layers=3, heads=3, context=20)):
        model = GPT(config, vocab_size())
        assert count_parameters(config, vocab_size()) == sum(p.numel() for p in model.parameters())
    assert count_parameters(lm_gpu_config().model, vocab_size()) >= 25_000_000


def test_base_cache_reused_only_when_key_matches(tmp_path):
    data = pretraining_mixture(LM_TASKS, 4)
    pretrain = LMPretrainConfig(steps=3, batch_size=4)
    key = base_cache_key(TINY_MODEL, pretrain, data, "cpu")
    assert key == base_cache_key(TINY_MODEL, pretrain, pretraining_mixture(LM_TASKS, 4), torch.device("cpu"))
    # Everything that shapes the base changes the key.
    assert key != base_cache_key(dataclasses.replace(TINY_MODEL, width=32), pretrain, data, "cpu")
    assert key != base_cache_key(TINY_MODEL, dataclasses.replace(pretrain, lr=1e-4), data, "cpu")
    assert key != base_cache_key(TINY_MODEL, dataclasses.replace(pretrain, seed=1), data, "cpu")
    assert key != base_cache_key(TINY_MODEL, pretrain, data, "cuda")
    other = Sequences(data.tokens.clone(), data.mask.clone())
    other.tokens[0, 0] = 1 + other.tokens[0, 0] % 50
    assert key != base_cache_key(TINY_MODEL, pretrain, other, "cpu")
    other = Sequences(data.tokens.clone(), data.mask.clone())
    other.mask[0, -1] = ~other.mask[0, -1]
    assert key != base_cache_key(TINY_MODEL, pretrain, other, "cpu")
    assert key != base_cache_key(TINY_MODEL, pretrain, pretraining_mixture(LM_TASKS, 5), "cpu")

    _, first, info = load_or_pretrain(data, TINY_MODEL, pretrain, "cpu", tmp_path)
    assert not info["hit"] and info["key"] == key and (tmp_path / f"lm_base_{key}.pt").is_file()
    # A second, different file under the same key is what a hit loads (not a fresh pre-training).
    marked = {name: value + 1.0 for name, value in first.items()}
    torch.save(marked, tmp_path / f"lm_base_{key}.pt")
    _, loaded, info = load_or_pretrain(data, TINY_MODEL, pretrain, "cpu", tmp_path)
    assert info["hit"] and all(torch.equal(loaded[k], marked[k]) for k in marked)
    _, fresh, info = load_or_pretrain(data, TINY_MODEL, dataclasses.replace(pretrain, steps=4), "cpu", tmp_path)
    assert not info["hit"] and info["key"] != key and len(list(tmp_path.glob("lm_base_*.pt"))) == 2
    # Pre-training is deterministic: the same settings give the same base without a cache.
    _, again, _ = load_or_pretrain(data, TINY_MODEL, pretrain, "cpu", None)
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_lm_cli_end_to_end_and_cache_reuse(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_experiment, "lm_quick_config", lambda **kw: lm_experiment.LMDemoConfig(
        **{**TINY, "sweep": ((5e-4,), (2.0,))}))
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["demo", "--protocol", "lm", "--quick", "--no-progress", "--threads", "1", "--out", str(out),
            "--cache-dir", str(cache)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    for name in ("task_vector_histogram.png", "merge_landscape_adamw.png", "merge_landscape_mergopt.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["tasks"] == list(LM_TASKS) and not data["base"]["cache"]["hit"]
    assert data["metric"]["python"] == "next-char accuracy" and data["metric"]["lookup"] == "exact match"
    rows = ["pre-trained"] + [f"{method}/{kind}" for method in ("individual", *MERGES) for kind in OPTIMIZERS]
    assert list(data["accuracy"]) == rows
    for row, per_seed in data["accuracy"].items():
        assert len(per_seed) == 1 and len(per_seed[0]) == len(LM_TASKS), row
        assert all(0.0 <= score <= 1.0 for score in per_seed[0]), row
    assert max(data["control_max_abs_diff"]) < 1e-5
    assert data["accuracy"]["ties/control"] == data["accuracy"]["ties/adamw"]
    fitted = data["noise"]["fit"]["b"]
    assert [entry["b"] for entry in data["sweep"]] == pytest.approx([5e-4, 2.0 * fitted])
    assert all(set(entry["scores"]) == {"individual", *MERGES} for entry in data["sweep"])
    grids = [value for kind in ("adamw", "mergopt") for row in data["landscape"][kind] for value in row]
    assert data["landscape"]["color_range"] == [min(grids), max(grids)]
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["base"]["cache"]["hit"] and again["base"]["cache"]["key"] == data["base"]["cache"]["key"]
    assert again["accuracy"] == data["accuracy"]


def test_default_regime_settings_and_its_noise_offset():
    """The default regime, fixed from the seed-0 calibration runs (docs/experiments.md): a 3-layer
    base pre-trained for 340 steps, experts at batch 12 and lr 3e-4 over 3 epochs of 480
    examples, b from an offset of 20 Adam steps; --quick keeps the regime's model, fine-tuning
    and offset; the GPU configuration keeps the fitted b."""
    config = lm_experiment.LMDemoConfig()
    assert config.model == GPTConfig(width=64, layers=3, heads=4, context=64)
    assert config.pretrain == LMPretrainConfig(steps=340) and config.pretrain_examples == 4000
    assert config.finetune == LMFinetuneConfig(train_examples=480, epochs=3, batch_size=12, lr=3e-4,
                                               weight_decay=1e-3)
    assert config.noise_offset == 20.0 and config.noise_scale is None and config.seeds == 5
    quick = lm_experiment.lm_quick_config()
    assert (quick.model, quick.noise_offset, quick.finetune.lr, quick.finetune.batch_size) == (config.model, 20.0, 3e-4, 12)
    assert lm_gpu_config().noise_offset is None
    results = run_lm_demo(dataclasses.replace(config, **TINY, merges=("dare",), sweep=((), ()), controls=False))
    noise = results["noise"]
    assert noise["offset"] == pytest.approx(20.0) and noise["scale"] == pytest.approx(20.0 * 3e-4 / (5 / 6))
    assert results["config"]["noise_offset"] == 20.0


def test_gpu_configuration_dry_run_on_cpu_with_tiny_sizes():
    config = dataclasses.replace(lm_gpu_config(), device="cpu", merges=("dare",), sweep=((), ()),
                                 **{k: v for k, v in TINY.items() if k != "finetune"},
                                 finetune=dataclasses.replace(lm_gpu_config().finetune, train_examples=8, epochs=1))
    results = run_lm_demo(config)
    assert set(results["accuracy"]) == {"pre-trained", *(f"{m}/{k}" for m in ("individual", "dare") for k in OPTIMIZERS)}
    assert results["base"]["parameters"] == count_parameters(TINY_MODEL, vocab_size())
    assert results["config"]["finetune"]["lr"] == lm_gpu_config().finetune.lr


@pytest.mark.parametrize("args, message", [
    (["--protocol", "lm", "--tasks", "arithmetic", "poetry"], "unknown task"),
    (["--protocol", "lm", "--tasks", "python"], "at least two"),
    (["--large"], "--protocol lm only"),
    (["--protocol", "lm", "--large", "--quick"], "exclude each other"),
])
def test_lm_cli_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
