"""Where our TIES and mergekit 0.1.5's differ, and why: a bf16 Llama-shaped model, per-tensor top-k.

    python -m bench.mergekit_ties --mergekit /path/to/venv/bin/mergekit-yaml [--out DIR]

mergekit runs from its own environment (it is not a dependency: it pins its own transformers).
A base and 3 experts (bf16, 2 layers, hidden 128, task vectors about 0.002 * N(0, 1)) are saved
with ``save_pretrained``; mergekit merges them with ``ties`` (weight 1, density 0.25,
``normalize: true``) computing in bf16 (its default) and in fp32 (``dtype: float32``), and we
merge them with ``--per-tensor --exact-count --density 0.25 --scaling 1`` and with the same
config under ``conventions: mergekit``. Every element count n of the model is a multiple of 4,
so both keep counts (mergekit ``int(d n)``, ours ``floor(d n + 1/2)``) agree. Then the
mergekit algorithm is re-run here (``mergekit_ties``: top k by ``torch.argsort`` of the fp32
magnitudes, sign ``+1`` where the sum is ``>= 0``, disjoint mean) with both tie rules, to show
which part explains each difference. Prints one table of differing elements.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch

DENSITY = 0.25


# LlamaConfig of the tiny model (461,440 elements); ``write_models`` takes overrides of it
TINY_LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, tie_word_embeddings=False)


def write_models(root: Path, config: dict | None = None, experts: int = 3, max_shard_size: str = "5GB") -> int:
    """Base and experts e0..e{experts-1} as HF folders (bf16), saved by ``save_pretrained`` in shards of
    at most ``max_shard_size``: the base about 0.05 N(0, 1), task vectors about 0.002 N(0, 1). ``config``
    overrides ``TINY_LLAMA``. Returns the number of elements of one model."""
    import transformers

    torch.manual_seed(7)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **(config or {})})
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base = {k: (torch.randn(v.shape) * 0.05).to(torch.bfloat16) for k, v in model.state_dict().items()}
    for i, name in enumerate(["base"] + [f"e{j}" for j in range(experts)]):
        model.load_state_dict(base if i == 0 else {k: (v.float() + 0.002 * torch.randn(v.shape)).to(torch.bfloat16)
                                                   for k, v in base.items()})
        model.save_pretrained(root / name, max_shard_size=max_shard_size)
    return sum(v.numel() for v in base.values())


def mergekit_ties(base: torch.Tensor, experts: list[torch.Tensor], compute: torch.dtype, argsort: bool) -> torch.Tensor:
    """mergekit's TIES of one tensor (weights 1, normalize), keeping the top k by ``argsort`` or,
    with ``argsort=False``, the entries tied with the k-th magnitude in position order (ours)."""
    b = base.to(compute).reshape(-1)
    taus = torch.stack([e.to(compute).reshape(-1) - b for e in experts])
    k = int(DENSITY * b.numel())
    keep = torch.zeros(taus.shape, dtype=torch.bool)
    for i, magnitude in enumerate(taus.abs().float()):
        if argsort:
            keep[i, torch.argsort(magnitude, descending=True)[:k]] = True
        else:
            t = magnitude.sort(descending=True).values[k - 1]
            tied = magnitude == t
            keep[i] = (magnitude > t) | (tied & (tied.cumsum(0) <= k - int((magnitude > t).sum())))
    trimmed = torch.where(keep, taus, torch.zeros((), dtype=compute))
    sign = torch.where(trimmed.sum(0) >= 0, 1, -1).to(compute)
    agree = (trimmed.sign() == sign).to(compute)
    divisor = agree.sum(0)
    mixed = (trimmed * agree).sum(0) / torch.where(divisor == 0, torch.ones((), dtype=compute), divisor)
    return (b + mixed).to(base.dtype).view(base.shape)


def main(argv=None) -> None:
    """Write the models, run both tools, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", required=True, help="the mergekit-yaml of an environment with mergekit 0.1.5")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    from mergopt_kernels.merge_config import MergeConfig
    from mergopt_kernels.merge_io import merge_checkpoints, merge_from_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        write_models(root)
        models = "".join(f"  - model: {root}/e{i}\n    parameters: {{weight: 1.0, density: {DENSITY}}}\n" for i in range(3))
        for dtype in ("bfloat16", "float32"):
            (root / f"{dtype}.yaml").write_text(f"merge_method: ties\nbase_model: {root}/base\ndtype: {dtype}\n"
                                                f"out_dtype: bfloat16\nparameters: {{normalize: true}}\nmodels:\n{models}")
            subprocess.run([args.mergekit, str(root / f"{dtype}.yaml"), str(root / f"mergekit_{dtype}"),
                            "--no-copy-tokenizer"], check=True, capture_output=True)
        merge_checkpoints("ties", root / "base", [root / f"e{i}" for i in range(3)], root / "ours", per_tensor=True,
                          exact_count=True, density=DENSITY, scaling=1.0)
        config = MergeConfig(merge_method="ties", conventions="mergekit", base_model=str(root / "base"),
                             models=[{"model": str(root / f"e{i}"), "parameters": {"weight": 1.0, "density": DENSITY}}
                                     for i in range(3)])
        merge_from_config(config, root / "ours_config")
        load = {name: load_file(root / name / "model.safetensors") for name in
                ("base", "e0", "e1", "e2", "mergekit_bfloat16", "mergekit_float32", "ours", "ours_config")}
        experts = [load[f"e{i}"] for i in range(3)]
        rows = {"ours (--per-tensor --exact-count) vs mergekit, bf16 compute": ("ours", "mergekit_bfloat16", None),
                "ours vs mergekit, dtype: float32": ("ours", "mergekit_float32", None),
                "ours, conventions: mergekit vs mergekit, dtype: float32": ("ours_config", "mergekit_float32", None),
                "mergekit's algorithm here, bf16 compute, argsort ties vs mergekit bf16":
                    (None, "mergekit_bfloat16", (torch.bfloat16, True)),
                "mergekit's algorithm here, fp32, argsort ties vs mergekit float32":
                    (None, "mergekit_float32", (torch.float32, True)),
                "mergekit's algorithm here, fp32, ties in position order vs ours": (None, "ours", (torch.float32, False))}
        total = sum(t.numel() for t in load["base"].values())
        print(f"{total:,} elements in {len(load['base'])} tensors, density {DENSITY}, 3 experts")
        print("| comparison | differing elements | share |\n|---|---:|---:|")
        for label, (mine, theirs, emulate) in rows.items():
            differ = 0
            for key, base in load["base"].items():
                got = load[mine][key] if mine else mergekit_ties(base, [e[key] for e in experts], *emulate)
                differ += int((got != load[theirs][key]).sum())
            print(f"| {label} | {differ:,} | {100 * differ / total:.2f} % |")


if __name__ == "__main__":
    main()
