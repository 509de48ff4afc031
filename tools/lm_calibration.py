"""Calibrate the LM protocol's regime on the pilot seed (seed 0) only: pre-train (or load) a base,
fine-tune the AdamW experts of seed 0, fit the Laplace noise scale to their task vectors, report
the noise offset (E|s| b / lr, in Adam steps), the experts' gain over the base and the share of
that gain each merge keeps; optionally the same for MergOPT experts (at the fitted b, or at
``--noise-scale`` / ``--noise-offset``). Every setting defaults to the LM demo's default run.

Nothing here looks at more than seed 0, so settings chosen from it are fixed before any
multi-seed result exists.

    python tools/lm_calibration.py --noise-offset 20 --mergopt    # the default run's seed 0
    python tools/lm_calibration.py --layers 2 --pretrain-steps 350 --batch-size 16 --lr 3e-4 \\
        [--json runs.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import torch

from mergopt_kernels import analysis
from mergopt_kernels.demo.finetune import arm_recipe, train_recipe
from mergopt_kernels.demo.lm_experiment import REGIME_MODEL, LMDemoConfig, LMFinetuneConfig, _epochs
from mergopt_kernels.demo.lm_model import GPTConfig, LMPretrainConfig, lm_loss, load_or_pretrain, task_metric
from mergopt_kernels.demo.lm_tasks import LM_TASKS, make_lm_task, pretraining_mixture
from mergopt_kernels.demo.protocol import MERGES, noise_offset_steps, noise_scale_for_offset, noise_seed


def _average(values) -> float:
    return 100.0 * sum(values) / len(values)


def calibrate(pretrain: LMPretrainConfig, pretrain_examples: int, finetune: LMFinetuneConfig, test_examples: int,
              mergopt: bool, cache_dir: str | None, noise_scale: float | None = None,
              shape: GPTConfig = REGIME_MODEL) -> dict:
    config = LMDemoConfig(model=shape, pretrain=pretrain, pretrain_examples=pretrain_examples, finetune=finetune,
                          test_examples=test_examples, seeds=1, cache_dir=cache_dir, progress=False)
    start = time.perf_counter()
    tasks = [make_lm_task(name, finetune.train_examples, test_examples) for name in LM_TASKS]
    model, base, _ = load_or_pretrain(pretraining_mixture(LM_TASKS, pretrain_examples),
                                      config.model, pretrain, "cpu", cache_dir)
    steps = finetune.epochs * -(-finetune.train_examples // finetune.batch_size)

    def score(state) -> list[float]:
        model.load_state_dict(state)
        return [task_metric(model, task) for task in tasks]

    def experts(kind: str, scale: float) -> list[dict]:
        recipe = arm_recipe(kind, finetune.lr, finetune.weight_decay, scale)
        return [train_recipe(model, base, recipe, _epochs(task.train, finetune, 0), steps, lm_loss, noise_seed(0, i))
                for i, task in enumerate(tasks)]

    base_scores = score(base)
    out = {"model": asdict(config.model), "pretrain": asdict(pretrain), "pretrain_examples": pretrain_examples, "finetune": asdict(finetune),
           "steps": steps,
           "base": _average(base_scores), "base_per_task": [round(100 * s, 1) for s in base_scores], "rows": {}}
    adamw = experts("adamw", 0.0)
    fit = analysis.fit_laplace(torch.cat([analysis.task_vector(base, e) for e in adamw]))
    scale = fit.b if noise_scale is None else noise_scale
    out.update(fitted_b=fit.b, ks=fit.ks_statistic, b=scale, offset=noise_offset_steps(scale, finetune.lr))
    for kind, states in (("adamw", adamw), *((("mergopt", experts("mergopt", scale)),) if mergopt else ())):
        individual = [score(state)[i] for i, state in enumerate(states)]
        gain = _average(individual) - out["base"]
        row = {"individual": _average(individual), "individual_per_task": [round(100 * s, 1) for s in individual],
               "gain": gain, "merges": {}, "kept": {}}
        for merge, fn in MERGES.items():
            merged = score(fn(base, states, 0))
            row["merges"][merge] = _average(merged)
            row["kept"][merge] = (_average(merged) - out["base"]) / gain if gain else float("nan")
            row.setdefault("merge_per_task", {})[merge] = [round(100 * s, 1) for s in merged]
        out["rows"][kind] = row
    out["wall_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    regime = LMDemoConfig()
    parser.add_argument("--pretrain-steps", type=int, default=regime.pretrain.steps)
    parser.add_argument("--pretrain-examples", type=int, default=regime.pretrain_examples)
    parser.add_argument("--pretrain-lr", type=float, default=regime.pretrain.lr)
    parser.add_argument("--train-examples", type=int, default=regime.finetune.train_examples)
    parser.add_argument("--epochs", type=int, default=regime.finetune.epochs)
    parser.add_argument("--batch-size", type=int, default=regime.finetune.batch_size)
    parser.add_argument("--lr", type=float, default=regime.finetune.lr)
    parser.add_argument("--test-examples", type=int, default=regime.test_examples)
    parser.add_argument("--noise-scale", type=float, default=None)
    parser.add_argument("--noise-offset", type=float, default=None,
                        help="set b so that E|s| b / lr is this many Adam steps (the default run's: 20)")
    parser.add_argument("--width", type=int, default=None, help="model width (default: the LM demo's)")
    parser.add_argument("--layers", type=int, default=None, help="model layers (default: the LM demo's)")
    parser.add_argument("--mergopt", action="store_true")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = replace(regime.model, width=args.width or regime.model.width, layers=args.layers or regime.model.layers)
    noise_scale = args.noise_scale
    if args.noise_offset is not None:
        noise_scale = noise_scale_for_offset(args.noise_offset, args.lr)
    out = calibrate(LMPretrainConfig(steps=args.pretrain_steps, lr=args.pretrain_lr), args.pretrain_examples,
                    LMFinetuneConfig(train_examples=args.train_examples, epochs=args.epochs,
                                     batch_size=args.batch_size, lr=args.lr),
                    args.test_examples, args.mergopt, args.cache_dir, noise_scale, shape)
    text = json.dumps(out)
    print(text)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(text + "\n")
    print(f"base {out['base']:.1f}  b {out['b']:.4g} (fit {out['fitted_b']:.4g}) offset {out['offset']:.1f}  "
          f"steps {out['steps']}  wall {out['wall_s']:.0f}s")
    for kind, row in out["rows"].items():
        kept = " ".join(f"{m} {row['merges'][m]:.1f} ({row['kept'][m]:+.2f})" for m in MERGES)
        print(f"  {kind}: experts {row['individual']:.1f} (gain {row['gain']:+.1f})  {kept}")


if __name__ == "__main__":
    main()
