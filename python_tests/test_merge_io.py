"""Tests of merging checkpoints on disk: mergopt_kernels.merge_io and the ``merge`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergopt_kernels import merging
from mergopt_kernels.__main__ import main
from mergopt_kernels.merge_cli import options_from_config
from mergopt_kernels.merge_config import MergeConfig
from mergopt_kernels.merge_io import INDEX_NAME, SafetensorsSource, merge_checkpoints, merge_from_config

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

METHODS = {
    "weight_average": lambda base, experts, **kw: merging.weight_average(experts, **kw),
    "task_arithmetic": lambda base, experts, **kw: merging.task_arithmetic(base, experts, **kw),
    "ties": lambda base, experts, **kw: merging.ties_merging(base, experts, **kw),
    "dare": lambda base, experts, **kw: merging.dare(base, experts, **kw),
}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder, read with the safetensors library (not our reader)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(path))
    return out


def assert_equal_state(got, expected):
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


# ---------------------------------------------------------------------------------------------
# A tiny HF model saved by transformers: a base with a tokenizer, three experts (one sharded)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("hf")
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(60)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(root / "base")
    experts = []
    for i in range(3):
        expert = transformers.LlamaForCausalLM(config)
        with torch.no_grad():
            for (name, p), q in zip(expert.named_parameters(), base.parameters()):
                p.copy_(q + 0.02 * torch.randn_like(q))
        # expert 0 in shards with an index, as save_pretrained writes a model larger than max_shard_size
        expert.save_pretrained(root / f"expert{i}", max_shard_size="20KB" if i == 0 else "5GB")
        experts.append(root / f"expert{i}")
    return {"root": root, "base": root / "base", "experts": experts, "seed": seed}


def test_fixture_expert_is_sharded(hf_models):
    index = json.loads((hf_models["experts"][0] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("method", list(METHODS))
def test_command_round_trip_equals_in_memory_merge(hf_models, method, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, experts = hf_models["base"], hf_models["experts"]
    out = tmp_path / "merged"
    # max shard size 16 kB: the output is sharded too
    assert main(["merge", "--method", method, "--base", str(base), "--experts", *map(str, experts),
                 "--out", str(out), "--max-shard-size", "16kB", "--no-progress"]) == 0
    expected = METHODS[method](read_folder(base), [read_folder(e) for e in experts])
    assert_equal_state(read_folder(out), expected)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in expected.items()), f"seed {hf_models['seed']}"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(out)("w3 w7")["input_ids"] == [4, 8]
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_sharded_and_single_inputs_read_alike(hf_models, tmp_path):
    """The sharded expert read through its index equals the same tensors saved as one file."""
    sharded = hf_models["experts"][0]
    single = tmp_path / "expert0.safetensors"
    safetensors_torch.save_file(read_folder(sharded), single)
    a, b = SafetensorsSource(sharded, "a"), SafetensorsSource(single, "b")
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        assert a.meta(key) == b.meta(key)
        assert torch.equal(a.load(key), b.load(key))


def test_python_m_entry_point_and_help(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mergopt_kernels", "merge", "--help"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert result.returncode == 0 and "--per-tensor" in result.stdout and "--drop-rate" in result.stdout


# ---------------------------------------------------------------------------------------------
# Reader and writer against the safetensors library, every dtype and odd shapes
# ---------------------------------------------------------------------------------------------

def odd_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(7, 13, generator=gen),
        "bf16": torch.randn(3, 1, 5, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(11, generator=gen).to(torch.float16),
        "f64": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(9, dtype=torch.int64).view(1, 9),
        "mask": torch.rand(6, generator=gen) > 0.5,
        "small": torch.randint(-5, 5, (3,), generator=gen, dtype=torch.int8),
    }


def test_reader_matches_safetensors_library(tmp_path):
    seed = torch.seed() % 2**31
    state = odd_state(seed)
    path = tmp_path / "odd.safetensors"
    safetensors_torch.save_file(state, path)
    source = SafetensorsSource(path, "odd")
    assert set(source.keys()) == set(state)
    with safe_open(path, framework="pt") as f:
        for key in state:
            assert source.meta(key) == (tuple(state[key].shape), state[key].dtype)
            assert torch.equal(source.load(key), f.get_tensor(key)), key


def test_writer_output_reads_back_with_safetensors_library(tmp_path):
    seed = torch.seed() % 2**31
    state = odd_state(seed)
    safetensors_torch.save_file(state, tmp_path / "a.safetensors")
    out = merge_checkpoints("weight_average", None, [tmp_path / "a.safetensors"], tmp_path / "out", max_shard_size=64)
    assert_equal_state(read_folder(tmp_path / "out"), state)
    with safe_open(next(out.glob("model-*.safetensors")), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


# ---------------------------------------------------------------------------------------------
# Equality with the in-memory functions, every option, .safetensors files as inputs
# ---------------------------------------------------------------------------------------------

def write_models(folder: Path, seed: int, experts: int = 3, dtype=torch.float32, extra=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb.weight": (37, 29), "norm.weight": (29,), "head.weight": (5, 29), "head.bias": (1,)}
    base = {key: torch.randn(shape, generator=gen).to(dtype) for key, shape in shapes.items()}
    base["position_ids"] = torch.arange(29).view(1, 29)
    models = [base] + [{key: ((value.float() + 0.05 * torch.randn(value.shape, generator=gen)).to(dtype)
                              if value.is_floating_point() else value.clone()) for key, value in base.items()}
                       for _ in range(experts)]
    if extra is not None:
        extra(models)
    paths = []
    for i, model in enumerate(models):
        paths.append(folder / f"model{i}.safetensors")
        safetensors_torch.save_file(model, paths[-1])
    return paths[0], paths[1:], models[0], models[1:]


OPTION_CASES = [
    ("task_arithmetic", dict(scaling=0.8, weights=[0.5, 1.5, -0.25])),
    ("ties", dict(scaling=1.0, density=[0.1, 0.5, 0.9], weights=[1.0, 2.0, 0.5])),
    ("ties", dict(per_tensor=True, merge_func="sum", density=0.3)),
    ("ties", dict(exact_count=True, density=0.35)),
    ("dare", dict(drop_rate=[0.2, 0.5, 0.7], seed=2**64 - 5, rescale="l1")),
    ("dare", dict(ties=True, density=0.4, seed=3, rescale="none")),
    ("weight_average", dict(weights=[1.0, 2.0, 3.0])),
]


@pytest.mark.parametrize("method, options", OPTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_merge_equals_in_memory_merge(method, options, dtype, tmp_path):
    seed = torch.seed() % 2**31
    base, experts, base_sd, expert_sds = write_models(tmp_path, seed, dtype=dtype)
    out = merge_checkpoints(method, base, experts, tmp_path / "out", **options)
    expected = METHODS[method](base_sd, expert_sds, **options)
    assert_equal_state(read_folder(out), expected)


def test_config_file_equals_in_memory_merge(tmp_path):
    seed = torch.seed() % 2**31
    base, experts, base_sd, expert_sds = write_models(tmp_path, seed)
    config = tmp_path / "merge.yaml"
    config.write_text(f"""
merge_method: ties
base_model: {base.name}
models:
  - model: {experts[0].name}
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {experts[1].name}
    parameters: {{weight: 0.5, density: 0.6}}
  - model: {experts[2].name}
    parameters: {{weight: 2.0, density: 0.1}}
parameters:
  lambda: 0.7
  normalize: false
  per_tensor: true
""")
    assert main(["merge", "--config", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    expected = merging.ties_merging(base_sd, expert_sds, 0.7, [0.3, 0.6, 0.1], True, weights=[1.0, 0.5, 2.0],
                                    merge_func="sum")
    assert_equal_state(read_folder(tmp_path / "out"), expected)


def test_config_mergekit_conventions_map_to_options(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({
        "merge_method": "dare_ties", "conventions": "mergekit", "base_model": "b",
        "models": [{"model": "x", "parameters": {"weight": 0.5, "density": 0.7}},
                   {"model": "y", "parameters": {"weight": 1.0, "density": 0.4}}]}))
    method, base, experts, options = options_from_config(tmp_path / "c.json")
    assert (method, base, experts) == ("dare", str(tmp_path / "b"), [str(tmp_path / "x"), str(tmp_path / "y")])
    assert options == dict(scaling=1.0, per_tensor=True, exact_count=True, density=1.0, rescale="l1", merge_func="sum",
                           ties=True, count_rounding="down", zero_sign="positive",
                           weights=[0.5, 1.0], drop_rate=[pytest.approx(0.3), pytest.approx(0.6)])
    (tmp_path / "p.json").write_text(json.dumps({"merge_method": "linear", "models": [{"model": "x"}]}))
    assert options_from_config(tmp_path / "p.json") == ("weight_average", None, [str(tmp_path / "x")], {})


@pytest.mark.parametrize("config, match", [
    ({"merge_method": "slerp", "models": [{"model": "x"}]}, r"merge_method: Input should be 'weight_average'"),
    ({"merge_method": "ties", "models": []}, r"models: List should have at least 1 item"),
    ({"merge_method": "ties", "models": [{"model": "x"}], "dtype": "bfloat16"}, r"dtype: Extra inputs are not permitted"),
    ({"merge_method": "ties", "models": [{"model": "x"}], "parameters": {"gamma": 1}},
     r"parameters.gamma: Extra inputs are not permitted"),
    ({"merge_method": "ties", "models": [{"model": "x", "parameters": {"density": 0.2}}, {"model": "y"}]},
     r"models\[1\].parameters.density is not set: density is set for some models only"),
    ({"merge_method": "ties", "conventions": "fusion", "models": [{"model": "x"}]},
     r"conventions: Input should be 'paper' or 'mergekit'"),
    ({"merge_method": ["ties"], "models": [{"model": "x"}]}, r"merge_method: Input should be .* \(got \['ties'\]\)"),
    ({"merge_method": "ties", "base_model": 123, "models": [{"model": "x"}]},
     r"base_model: Input should be a valid string \(got 123\)"),
    ({"merge_method": "ties", "models": [{"model": None}]}, r"models\[0\].model: Input should be a valid string"),
    ({"merge_method": "ties", "models": [{"model": "x"}], "parameters": [1, 2]},
     r"parameters: Input should be a valid dictionary"),
    ({"merge_method": "ties", "models": [{"model": "x"}], "parameters": "abc"},
     r"parameters: Input should be a valid dictionary .* \(got 'abc'\)"),
    ({"merge_method": "ties", "models": [{"model": "x", "parameters": {"weight": "heavy"}}]},
     r"models\[0\].parameters.weight: Input should be a valid number"),
    ({"merge_method": "ties", "models": [{"model": "x"}], "parameters": {"seed": -1}}, r"parameters.seed: .*>= 0|"
     r"parameters.seed: Input should be greater than or equal to 0"),
    ({"merge_method": "ties", "models": [{"model": "x"}], "parameters": {"lambda": 1, "scaling": 2}},
     r"give lambda or scaling, not both"),
    ([{"merge_method": "ties"}], r"the top level: Input should be a valid dictionary"),
])
def test_config_errors(config, match, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        options_from_config(tmp_path / "c.json")
    code, err = run_merge_cli(["--config", tmp_path / "c.json", "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"config {tmp_path / 'c.json'}: " in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["merge_method: ties\nmodels: [{model: x}\n", "merge_method: ties\n  - a: b: c\n",
                                  "\tmerge_method: ties\n"])
def test_malformed_yaml_exits_2(text, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    code, err = run_merge_cli(["--config", tmp_path / "c.yaml", "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"config {tmp_path / 'c.yaml'}: not valid YAML" in err and "Traceback" not in err


def test_config_coerces_switches_as_mergekit_does(tmp_path):
    """mergekit's pydantic config reads 'false' (quoted), 'no', 'off' and 0 as False, 'true' and 1 as True."""
    for text, expected in [("'false'", False), ("'no'", False), ("'off'", False), ("0", False), ("'true'", True),
                           ("1", True)]:
        (tmp_path / "c.yaml").write_text(f"merge_method: ties\nbase_model: b\nmodels: [{{model: x}}]\n"
                                         f"parameters: {{normalize: {text}, per_tensor: {text}, density: '0.5'}}\n")
        _, _, _, options = options_from_config(tmp_path / "c.yaml")
        assert options == dict(merge_func="mean" if expected else "sum", per_tensor=expected, density=0.5), text


# The TIES options ``conventions: mergekit`` sets besides lambda and the per-tensor trim.
MERGEKIT_TIES = dict(exact_count=True, count_rounding="down", zero_sign="positive")


def test_python_api_takes_the_config_object(tmp_path):
    """MergeConfig built in Python (keyword arguments), conventions: mergekit, gives mergekit's TIES defaults."""
    seed = torch.seed() % 2**31
    base, experts, base_sd, expert_sds = write_models(tmp_path, seed)
    config = MergeConfig(merge_method="ties", conventions="mergekit", base_model=str(base),
                         models=[{"model": str(path), "parameters": {"weight": 0.5, "density": 0.5}}
                                 for path in experts])
    out = merge_from_config(config, tmp_path / "out")
    expected = merging.ties_merging(base_sd, expert_sds, 1.0, 0.5, True, weights=[0.5] * 3, merge_func="mean",
                                    **MERGEKIT_TIES)
    assert_equal_state(read_folder(out), expected), f"seed {seed}"
    assert MergeConfig.from_options("ties", base, experts, density=0.5, per_tensor=True, scaling=1.0,
                                    weights=[0.5] * 3).resolve()[3] == dict(
        density=0.5, per_tensor=True, scaling=1.0, weights=[0.5] * 3)


# ---------------------------------------------------------------------------------------------
# Errors, not silent choices; no half-written output
# ---------------------------------------------------------------------------------------------

def test_missing_and_extra_keys_are_an_error_listing_them_unless_a_policy_is_chosen(tmp_path):
    def drop_key(models):
        del models[2]["head.bias"]
        models[3]["extra.weight"] = torch.ones(2)

    base, experts, base_sd, expert_sds = write_models(tmp_path, 1, extra=drop_key)
    with pytest.raises(ValueError, match=r"experts\[1\] does not have the keys of base: missing \['head.bias'\]"):
        merge_checkpoints("task_arithmetic", base, experts, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for keys in ("intersection", "union"):
        out = merge_checkpoints("task_arithmetic", base, experts, tmp_path / keys, keys=keys)
        assert_equal_state(read_folder(out), merging.task_arithmetic(base_sd, expert_sds, keys=keys))
    assert "extra.weight" in read_folder(tmp_path / "union") and "head.bias" in read_folder(tmp_path / "union")
    assert "head.bias" not in read_folder(tmp_path / "intersection")


def test_differing_non_float_entry_is_an_error_naming_it(tmp_path, capsys):
    def shift_ids(models):
        models[2]["position_ids"] = models[2]["position_ids"] + 1

    base, experts, base_sd, expert_sds = write_models(tmp_path, 2, extra=shift_ids)
    with pytest.raises(ValueError, match=r"non-float entry 'position_ids' differs between base and experts\[1\]"):
        merge_checkpoints("ties", base, experts, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--method", "ties", "--base", str(base), "--experts", *map(str, experts),
              "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2 and "position_ids" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    out = merge_checkpoints("ties", base, experts, tmp_path / "out", non_float="base")
    assert torch.equal(read_folder(out)["position_ids"], base_sd["position_ids"])


def test_dtype_mismatch_is_refused_or_promoted(tmp_path):
    def to_double(models):
        models[1]["norm.weight"] = models[1]["norm.weight"].double()

    base, experts, base_sd, expert_sds = write_models(tmp_path, 3, extra=to_double)
    with pytest.raises(TypeError, match=r"experts\[0\]\['norm.weight'\] has dtype torch.float64, "
                                        r"base\['norm.weight'\] has torch.float32 \(promote_dtypes=True"):
        merge_checkpoints("task_arithmetic", base, experts, tmp_path / "out")
    out = merge_checkpoints("task_arithmetic", base, experts, tmp_path / "out", promote_dtypes=True)
    merged = read_folder(out)
    assert merged["norm.weight"].dtype == torch.float64
    assert_equal_state(merged, merging.task_arithmetic(base_sd, expert_sds, promote_dtypes=True))


def test_truncated_file_is_refused_before_writing(tmp_path):
    base, experts, _, _ = write_models(tmp_path, 4)
    data = experts[1].read_bytes()
    experts[1].write_bytes(data[:-40])
    with pytest.raises(ValueError, match=r"experts\[1\]: .*model2.safetensors is not a valid safetensors file"):
        merge_checkpoints("task_arithmetic", base, experts, tmp_path / "out", max_shard_size=1)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_and_bad_inputs_are_refused_before_writing(tmp_path):
    base, experts, _, _ = write_models(tmp_path, 5)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out: .* exists and is not an empty folder"):
        merge_checkpoints("ties", base, experts, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"experts\[1\]: .* holds neither model.safetensors nor "
                                                r"model.safetensors.index.json"):
        merge_checkpoints("ties", base, [experts[0], tmp_path / "empty"], tmp_path / "new")
    with pytest.raises(ValueError, match="base is required for ties"):
        merge_checkpoints("ties", None, experts, tmp_path / "new")
    with pytest.raises(ValueError, match="density must be in"):
        merge_checkpoints("ties", base, experts, tmp_path / "new", density=0.0)
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# Memory: peak extra memory within 3 x (experts + 1) x the largest tensor, measured
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
@pytest.mark.parametrize("method, options", [("ties", {}), ("ties", {"exact_count": True}),
                                             ("task_arithmetic", {}), ("dare", {"ties": True})])
def test_peak_memory_within_bound(method, options, tmp_path):
    from bench.merge_memory import measure, write_models as write_large

    numel, count = 1 << 22, 3                        # a 16 MiB fp32 tensor, 3 experts
    base, experts = write_large(tmp_path, numel, count)
    result = measure(method, base, experts, tmp_path / "out", options)
    assert result["extra_bytes"] <= 3 * (count + 1) * numel * 4, result
    assert_equal_state(read_folder(tmp_path / "out"),
                       METHODS[method](safetensors_torch.load_file(base),
                                       [safetensors_torch.load_file(p) for p in experts], **options))


README_MERGES = {  # the README's merge snippets and the in-memory merge each equals
    "merge": lambda base, experts: merging.ties_merging(base, experts, 0.3, 0.2),
    "merge-config": lambda base, experts: merging.ties_merging(base, experts, 1.0, 0.5, True, weights=[0.5, 0.5],
                                                               **MERGEKIT_TIES),
}


def docs_models(tmp_path):
    """(seed, base, experts) written as the folders the documentation's merges name: base,
    expert_math, expert_code."""
    seed = torch.seed() % 2**31
    _, _, base_sd, expert_sds = write_models(tmp_path, seed, experts=2)
    for folder, sd in zip(("base", "expert_math", "expert_code"), [base_sd, *expert_sds]):
        (tmp_path / folder).mkdir()
        safetensors_torch.save_file(sd, tmp_path / folder / "model.safetensors")
    return seed, base_sd, expert_sds


@pytest.mark.parametrize("name", list(README_MERGES))
def test_readme_merge_snippet(name, tmp_path, monkeypatch):
    from test_snippets import snippet

    seed, base_sd, expert_sds = docs_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet(name), f"<snippet {name}>", "exec"), {})
    assert_equal_state(read_folder(tmp_path / "merged"), README_MERGES[name](base_sd, expert_sds)), f"seed {seed}"


@pytest.mark.parametrize("name", ["merge-cli", "merge-yaml"])
def test_docs_merge_command_and_config_file(name, tmp_path, monkeypatch):
    """The command line and the config file of docs/merging.md, run as written."""
    import shlex

    from test_snippets import snippet

    seed, base_sd, expert_sds = docs_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    if name == "merge-cli":
        command = shlex.split(snippet(name))
        assert command[:2] == ["mergopt-kernels", "merge"]
        assert main([*command[1:], "--no-progress"]) == 0
        expected = merging.ties_merging(base_sd, expert_sds, 0.3, 0.2)
    else:
        (tmp_path / "merge.yaml").write_text(snippet(name))
        assert main(["merge", "--config", "merge.yaml", "--out", "merged", "--no-progress"]) == 0
        expected = merging.ties_merging(base_sd, expert_sds, 0.3, [0.3, 0.2], weights=[1.0, 0.5])
    assert_equal_state(read_folder(tmp_path / "merged"), expected), f"seed {seed}"


# ---------------------------------------------------------------------------------------------
# Untrusted files: hostile headers and indexes, shard paths leaving the model folder
# ---------------------------------------------------------------------------------------------

def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A .safetensors file with exactly this header and data (no checks: hostile files)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def run_merge_cli(args, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``merge`` with ``args``."""
    try:
        code = main(["merge", *map(str, args), "--no-progress"])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


F32_2 = {"dtype": "F32", "shape": [2]}
HOSTILE_HEADERS = {
    "negative offset": ({"w": {**F32_2, "data_offsets": [-8, 0]}}, 8, "expected usize"),
    "overlapping offsets": ({"w": {**F32_2, "data_offsets": [0, 8]}, "v": {**F32_2, "data_offsets": [4, 12]}}, 12,
                            "invalid offset"),
    "span is not shape x itemsize": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8,
                                     "invalid shape, data type, or offset"),
    "missing dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, 8, "missing field `dtype`"),
    "data beyond the file": ({"w": {**F32_2, "data_offsets": [0, 8]}}, 4, "not fully covered"),
    "huge offsets": ({"w": {**F32_2, "data_offsets": [10**16, 10**16 + 8]}}, 8, "invalid offset"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_header_exits_2_naming_the_file(case, tmp_path, capsys):
    header, size, reason = HOSTILE_HEADERS[case]
    base = tmp_path / "base.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, base)
    bad = write_raw_safetensors(tmp_path / "bad.safetensors", header, bytes(size))
    code, err = run_merge_cli(["--method", "task_arithmetic", "--base", base, "--experts", bad,
                               "--out", tmp_path / "out"], capsys)
    assert code == 2, err
    assert f"experts[0]: {bad} is not a valid safetensors file" in err and reason in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def sharded_expert(folder: Path, weight_map: dict) -> Path:
    """A model folder with two tensors in one shard and an index ``{"weight_map": weight_map}``."""
    folder.mkdir()
    safetensors_torch.save_file({"w": torch.ones(2), "v": torch.ones(3)}, folder / "part-1.safetensors")
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_index_without_weight_map_exits_2(tmp_path, capsys):
    folder = sharded_expert(tmp_path / "expert", {})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 20}}))
    code, err = run_merge_cli(["--method", "weight_average", "--experts", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"experts[0]: {folder / INDEX_NAME} has no weight_map" in err and "Traceback" not in err
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": 3}}))
    code, err = run_merge_cli(["--method", "weight_average", "--experts", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "weight_map['w'] must be a shard file name, got 3" in err


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE",
                                   "link.safetensors", "passwd.safetensors"])
def test_shard_outside_the_model_folder_is_refused(shard, tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"
    safetensors_torch.save_file({"v": torch.full((3,), 1e16)}, outside)
    folder = tmp_path / "models" / "expert"
    folder.parent.mkdir()
    name = str(outside) if shard == "ABSOLUTE" else shard
    sharded_expert(folder, {"w": "part-1.safetensors", "v": name})
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "passwd.safetensors").symlink_to("/etc/passwd")
    (tmp_path / "models" / "outside.safetensors").write_bytes(outside.read_bytes())
    code, err = run_merge_cli(["--method", "weight_average", "--experts", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2, err
    assert f"experts[0]: {folder / INDEX_NAME}: weight_map['v'] is {name!r}" in err
    assert ("symlink that leaves the model folder" if shard.startswith(("link", "passwd")) else
            "absolute paths and '..' are refused") in err
    assert "Traceback" not in err and "header" not in err and not (tmp_path / "out").exists()


def test_text_file_as_shard_is_not_a_valid_safetensors_file(tmp_path, capsys):
    folder = sharded_expert(tmp_path / "expert", {"w": "part-1.safetensors", "v": "notes.safetensors"})
    (folder / "notes.safetensors").write_text("root:x:0:0:root:/root:/bin/bash\n" * 4)
    code, err = run_merge_cli(["--method", "weight_average", "--experts", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"{folder / 'notes.safetensors'} is not a valid safetensors file" in err
    assert "Traceback" not in err


def test_hub_cache_snapshot_links_into_its_blobs_are_read(tmp_path):
    """A Hugging Face hub cache snapshot: its files are symlinks into the repository's blobs/."""
    repo = tmp_path / "models--org--expert"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    state = {"w": torch.randn(5), "v": torch.randn(2, 3)}
    safetensors_torch.save_file(state, repo / "blobs" / "f00d")
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    out = merge_checkpoints("weight_average", None, [snapshot], tmp_path / "out")
    assert_equal_state(read_folder(out), state)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.safetensors").symlink_to(repo / "blobs" / "f00d")
    with pytest.raises(ValueError, match="a symlink that leaves the model folder"):
        merge_checkpoints("weight_average", None, [tmp_path / "plain"], tmp_path / "out2")


# ---------------------------------------------------------------------------------------------
# Non-finite values stop the merge, naming the model and the tensor, unless allowed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, options", [("weight_average", []), ("task_arithmetic", []), ("ties", []),
                                             ("dare", ["--rescale", "l1"]), ("dare", ["--ties"])])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_exits_2_naming_model_and_tensor(method, options, bad, tmp_path, capsys):
    def poison(models):
        models[2]["head.weight"][3, 7] = bad

    base, experts, _, _ = write_models(tmp_path, 6, extra=poison)
    code, err = run_merge_cli(["--method", method, *(["--base", base] if method != "weight_average" else []),
                               "--experts", *experts, "--out", tmp_path / "out", "--max-shard-size", "1", *options],
                              capsys)
    assert code == 2 and "experts[1]['head.weight'] holds a non-finite value (NaN or Inf)" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_non_finite_base_is_named(tmp_path):
    def poison(models):
        models[0]["norm.weight"][0] = float("-inf")

    base, experts, _, _ = write_models(tmp_path, 7, extra=poison)
    with pytest.raises(ValueError, match=r"base\['norm.weight'\] holds a non-finite value"):
        merge_checkpoints("task_arithmetic", base, experts, tmp_path / "out")


def test_overflowing_result_exits_2(tmp_path, capsys):
    base, experts, _, _ = write_models(tmp_path, 8)
    code, err = run_merge_cli(["--method", "task_arithmetic", "--base", base, "--experts", *experts,
                               "--out", tmp_path / "out", "--scaling", "1e308"], capsys)
    assert code == 2 and "the merged 'emb.weight' is not finite: it overflows torch.float32 (scaling 1e+308" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, options", [("weight_average", {}), ("task_arithmetic", {}), ("ties", {}),
                                             ("dare", {"rescale": "l1"})])
def test_allow_non_finite_merges_as_the_in_memory_function(method, options, tmp_path):
    seed = torch.seed() % 2**31

    def poison(models):
        models[2]["head.weight"][3, 7] = float("inf")
        models[3]["emb.weight"][0, 0] = float("nan")

    base, experts, base_sd, expert_sds = write_models(tmp_path, seed, extra=poison)
    with pytest.raises(ValueError, match="non-finite"):
        METHODS[method](base_sd, expert_sds, **options)
    out = merge_checkpoints(method, base, experts, tmp_path / "out", allow_non_finite=True, **options)
    expected = METHODS[method](base_sd, expert_sds, allow_non_finite=True, **options)
    got = read_folder(out)
    for key in expected:
        assert torch.equal(got[key].nan_to_num(), expected[key].nan_to_num()), (key, seed)
        assert torch.equal(got[key].isnan(), expected[key].isnan()), (key, seed)
    if method in ("weight_average", "task_arithmetic"):  # the bad values stay in their own elements
        assert got["head.weight"][3, 7] == float("inf") and got["emb.weight"][0, 0].isnan()
        assert int(got["head.weight"].isinf().sum()) == 1 and int(got["emb.weight"].isnan().sum()) == 1
    if method == "ties":  # a NaN magnitude is never above the threshold: trimmed
        assert not got["emb.weight"].isnan().any() and got["head.weight"][3, 7] == float("inf")
    if method == "dare":  # the Inf makes expert 1's L1 norm infinite: its whole tensor is non-finite
        assert not got["head.weight"].isfinite().any()


# ---------------------------------------------------------------------------------------------
# Options a method does not use, empty results
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, flags, unused, parameters", [
    ("weight_average", ["--scaling", "0.5"], "scaling", {"lambda": 0.5}),
    ("task_arithmetic", ["--density", "0.3"], "density", {"density": 0.3}),
    ("task_arithmetic", ["--seed", "3"], "seed", {"seed": 3}),
    ("ties", ["--drop-rate", "0.3"], "drop_rate", {"drop_rate": 0.3}),
    ("ties", ["--rescale", "l1"], "rescale", {"rescale": True}),
    ("dare", ["--density", "0.3"], "density", {"density": 0.3}),
    ("dare", ["--per-tensor"], "per_tensor", {"per_tensor": "false"}),
    ("weight_average", ["--merge-func", "sum"], "merge_func", {"normalize": True}),
])
def test_unused_option_is_refused_for_every_method(method, flags, unused, parameters, tmp_path, capsys):
    base, experts, _, _ = write_models(tmp_path, 9)
    code, err = run_merge_cli(["--method", method, "--base", base, "--experts", *experts, "--out", tmp_path / "out",
                               *flags], capsys)
    assert code == 2 and f"does not use ['{unused}']" in err and "Traceback" not in err, err
    (tmp_path / "c.json").write_text(json.dumps({"merge_method": method, "base_model": base.name,
                                                 "models": [{"model": e.name} for e in experts],
                                                 "parameters": parameters}))
    code, err = run_merge_cli(["--config", tmp_path / "c.json", "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"does not use ['{unused}']" in err, err
    assert not (tmp_path / "out").exists()


def test_unused_option_is_refused_in_memory():
    base = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"dare without ties does not use \['density'\]"):
        merging.dare(base, [base], density=0.3)
    with pytest.raises(ValueError, match=r"dare without ties does not use \['per_tensor'\]"):
        merging.dare(base, [base], per_tensor=False)
    assert torch.equal(merging.dare(base, [base], ties=True, density=0.3)["w"], base["w"])


@pytest.mark.parametrize("case", ["no tensors", "no common key"])
def test_empty_result_is_refused(case, tmp_path, capsys):
    if case == "no tensors":
        paths = [write_raw_safetensors(tmp_path / f"m{i}.safetensors", {"__metadata__": {"format": "pt"}}, b"")
                 for i in range(3)]
        flags = []
    else:
        paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
        for i, path in enumerate(paths):
            safetensors_torch.save_file({f"w{i}": torch.ones(2)}, path)
        flags = ["--keys", "intersection"]
    code, err = run_merge_cli(["--method", "task_arithmetic", "--base", paths[0], "--experts", *paths[1:],
                               "--out", tmp_path / "out", *flags], capsys)
    assert code == 2 and "the merge has no tensors to write" in err and not (tmp_path / "out").exists(), err


# ---------------------------------------------------------------------------------------------
# The output folder: symlinks, free space, a full disk, signals, partial folders of killed merges
# ---------------------------------------------------------------------------------------------

def test_out_symlink_is_refused_before_reading(tmp_path, monkeypatch):
    base, experts, _, _ = write_models(tmp_path, 10)
    (tmp_path / "target").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "target")
    monkeypatch.setattr(SafetensorsSource, "__init__", lambda *a: pytest.fail("an input was read"))
    with pytest.raises(FileExistsError, match=r"out: .*out is a symlink \(to .*target\)"):
        merge_checkpoints("ties", base, experts, tmp_path / "out")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="is a symlink"):
        merge_checkpoints("ties", base, experts, tmp_path / "dangling")


def test_free_space_is_checked_before_float_tensors_are_read(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from mergopt_kernels.merge import task_vectors

    base, experts, _, _ = write_models(tmp_path, 11)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**6, 0, 1000))
    monkeypatch.setattr(task_vectors.TaskVectors, "__init__", lambda *a: pytest.fail("a tensor was merged"))
    with pytest.raises(OSError, match=rf"out: {tmp_path} has 1,000 bytes free; the merged model needs"):
        merge_checkpoints("ties", base, experts, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    import errno
    import io

    from mergopt_kernels import merge_io

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    base, experts, _, _ = write_models(tmp_path, 12)
    monkeypatch.setattr(merge_io, "open", lambda path, mode: FullDisk(), raising=False)
    with pytest.raises(OSError, match=r"writing .*\.out\.partial-\d+-[0-9a-f]{8}/model.safetensors failed: "
                                      r"No space left on device"):
        merge_checkpoints("task_arithmetic", base, experts, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_partial_folder_of_a_killed_merge_is_removed_by_the_next_merge(tmp_path):
    import subprocess
    import sys

    base, experts, base_sd, expert_sds = write_models(tmp_path, 13)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(bytes(1000))
    with subprocess.Popen(["sleep", "60"]) as running:
        busy = tmp_path / f".out.partial-{running.pid}-89abcdef"
        busy.mkdir()
        other = tmp_path / ".other.partial-1-0123abcd"
        other.mkdir()
        with pytest.warns(UserWarning) as record:
            out = merge_checkpoints("task_arithmetic", base, experts, tmp_path / "out")
        running.kill()
    messages = [str(w.message) for w in record]
    assert f"removed {stale}, the partial output of an interrupted merge (process {int(dead.stdout)})" in messages
    assert any(f"{busy} is the partial output of process {running.pid}, which still runs" in m for m in messages)
    assert not stale.exists() and busy.exists() and other.exists()
    assert_equal_state(read_folder(out), merging.task_arithmetic(base_sd, expert_sds))


def test_a_signal_ends_the_merge_with_its_status_whatever_its_exception_became(tmp_path):
    """The handler's exception can cross C code (torch's storage, safetensors' reader) that
    replaces it by another error; the exit status is still 128 + the signal and the partial
    folder is removed."""
    import os
    import signal
    import time

    from mergopt_kernels.merge_output import partial_folder

    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        with partial_folder(out) as partial:
            (partial / "model.safetensors").write_bytes(bytes(10))
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs before this returns
            except BaseException:
                raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
    assert exited.value.code == 128 + signal.SIGTERM
    assert not partial.exists() and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_signal_removes_the_partial_folder(signame, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from bench.merge_memory import write_models as write_large

    base, experts = write_large(tmp_path, 1 << 21, 2)
    script = ("import sys; from mergopt_kernels.merge_io import merge_checkpoints; "
              "merge_checkpoints('dare', sys.argv[1], sys.argv[2:4], sys.argv[4], ties=True, max_shard_size=1)")
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, "-c", script, str(base), *map(str, experts), str(tmp_path / "out")],
                               cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*/*.safetensors")) and process.poll() is None:
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.01)
    process.send_signal(getattr(signal, signame))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, signame), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))



def test_copied_config_file_leaving_the_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "base"
    folder.mkdir()
    safetensors_torch.save_file({"w": torch.ones(2)}, folder / "model.safetensors")
    (folder / "tokenizer.json").symlink_to("/etc/passwd")
    code, err = run_merge_cli(["--method", "weight_average", "--experts", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"experts[0]: {folder / 'tokenizer.json'} is 'tokenizer.json', a symlink that leaves" in err
    assert not (tmp_path / "out").exists()
