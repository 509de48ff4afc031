"""Produce python_tests/data/mergekit_reference.{safetensors,json} with mergekit 0.1.5.

Run from the repository root, in a scratch environment that has mergekit (it is not a
dependency of this package):

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit==0.1.5   # torch pinned to 2.13.0
    /tmp/mk/bin/python python_tests/data/make_mergekit_reference.py

A tiny Llama (every tensor size a multiple of 4, so mergekit's keep count int(density * n) and
ours floor(density * n + 1/2) agree) is saved as a base and three experts, each config of
CASES is merged with ``mergekit-yaml CONFIG OUT --no-copy-tokenizer``, and the inputs and outputs are stored
together; the .json file holds the configs, the versions and this command.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
SEED = 20261201
CONFIG = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, tie_word_embeddings=False)
MODELS = ["expert0", "expert1", "expert2"]
CASES = {
    "linear": {"merge_method": "linear",
               "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(MODELS, (0.3, 0.5, 0.2))]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "parameters": {"lambda": 0.7},
                        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(MODELS, (1.0, 0.6, -0.4))]},
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in MODELS]},
    "ties_weighted": {"merge_method": "ties", "base_model": "base",
                      "models": [{"model": m, "parameters": {"weight": w, "density": d}}
                                 for m, w, d in zip(MODELS, (1.0, 0.5, 2.0), (0.5, 0.25, 0.75))]},
    "ties_sum": {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": False, "lambda": 1.0},
                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.25}} for m in MODELS]},
}


def main() -> None:
    import mergekit  # noqa: F401  (fails early outside the scratch environment)
    from importlib.metadata import version

    rng = np.random.default_rng(SEED)
    config = transformers.LlamaConfig(**CONFIG)
    base_model = transformers.LlamaForCausalLM(config)
    names = list(base_model.state_dict())
    base = {k: torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(np.float32))
            for k, v in base_model.state_dict().items()}
    inputs = {"base": base}
    for m in MODELS:
        inputs[m] = {k: v + torch.from_numpy(0.05 * rng.standard_normal(tuple(v.shape)).astype(np.float32))
                     for k, v in base.items()}
    stored = {f"input/{m}/{k}": v for m, sd in inputs.items() for k, v in sd.items()}
    yaml_bin = Path(sys.executable).parent / "mergekit-yaml"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for m, sd in inputs.items():
            model = transformers.LlamaForCausalLM(config)
            model.load_state_dict(sd)
            model.save_pretrained(tmp / m)
        for case, cfg in CASES.items():
            absolute = json.loads(json.dumps(cfg))
            for model in absolute["models"]:
                model["model"] = str(tmp / model["model"])
            if "base_model" in absolute:
                absolute["base_model"] = str(tmp / absolute["base_model"])
            (tmp / f"{case}.yaml").write_text(json.dumps(dict(absolute, dtype="float32")))
            subprocess.run([str(yaml_bin), f"{case}.yaml", f"out_{case}", "--no-copy-tokenizer"], cwd=tmp, check=True)
            out = {}
            for path in sorted((tmp / f"out_{case}").glob("*.safetensors")):
                out.update(load_file(path))
            assert set(out) == set(names), (case, sorted(set(names) ^ set(out)))
            stored.update({f"{case}/{k}": v for k, v in out.items()})
    save_file(stored, HERE / "mergekit_reference.safetensors")
    (HERE / "mergekit_reference.json").write_text(json.dumps({
        "command": "/tmp/mk/bin/python python_tests/data/make_mergekit_reference.py",
        "mergekit": version("mergekit"), "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": "float32", "cases": CASES}, indent=1) + "\n")


if __name__ == "__main__":
    main()
