"""``mergopt-kernels merge``: merge checkpoints on disk from the command line or a config file.

    mergopt-kernels merge --method ties --base BASE --experts A B --out MERGED [--density 0.2] ...
    mergopt-kernels merge --config merge.yaml --out MERGED

The config file (YAML or JSON) has mergekit's layout, for the methods both packages have::

    merge_method: ties            # weight_average | task_arithmetic | ties | dare, or mergekit's
                                  # linear | task_arithmetic | ties | dare_linear | dare_ties
    conventions: paper            # paper (default) or mergekit: the defaults of unset options
    base_model: ./base
    models:
      - model: ./expert_a
        parameters: {weight: 1.0, density: 0.3}
      - model: ./expert_b
        parameters: {weight: 0.5}
    parameters:                   # shared options; per-model ones override weight and density
      lambda: 0.3                 # or scaling
      density: 0.2
      normalize: true             # TIES: true = disjoint mean, false = sum
      per_tensor: false
      exact_count: false
      count_rounding: nearest     # TIES keep count density * n: nearest | down
      zero_sign: majority         # TIES sign where the sum is 0: majority | positive
      drop_rate: 0.5              # DARE (paper conventions)
      rescale: inverse            # inverse | l1 | none (true = l1, false = none, as in mergekit)
      seed: 0
      keys: strict                # strict | intersection | union
      non_float: error            # error | base
      promote_dtypes: false
      allow_non_finite: false     # true: merge NaN/Inf inputs, write non-finite results

The file is read into a ``merge_config.MergeConfig`` (pydantic, with mergekit's coercions), as
the flags are: every error in it, like every error about the inputs and the output, exits with
status 2 and one line naming the key, the file or the entry. An option the method does not use
is refused. ``conventions: mergekit`` makes unset options mergekit 0.1.5's, for the options the
method uses: ``lambda`` 1, per-tensor trim, ``density`` 1, ``normalize`` true for ``ties`` and
false for ``dare_ties``, DARE ``rescale`` l1, the keep count ``int(density * n)``
(``count_rounding: down``), +1 where the sign sum is 0 (``zero_sign: positive``), and for the
DARE methods ``density`` is the keep fraction (``drop_rate = 1 - density``), with no magnitude
trim in ``dare_ties``. Differences that remain: mergekit's DARE masks come from
``torch.bernoulli`` (ours from the Philox stream of ``merging``), and of the entries tied with
the k-th largest magnitude it keeps those its (unstable) argsort puts first, where we keep the
first in position order.
"""

from __future__ import annotations

import argparse

from .merge_config import MergeConfig
from .validation import cli_type, number_in

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _bytes(text: str) -> float:
    """``5GB``, ``500MiB``, ``1000000``: the number of bytes (``ValueError`` for another form)."""
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number):].upper()
    if unit not in SIZE_UNITS:
        raise ValueError(text)
    return float(number) * SIZE_UNITS[unit]


_size = cli_type(_bytes, lambda name, value: int(number_in(name, value, 1)), "a size such as 5GB, 500MiB or 1000000")


def add_merge_parser(commands) -> argparse.ArgumentParser:
    """Add the ``merge`` subcommand to an ``add_subparsers()`` object; returns its parser."""
    from .merge_io import DEFAULT_MAX_SHARD_SIZE
    from .merging import COUNT_ROUNDINGS, MERGE_FUNCS, METHODS, RESCALES, ZERO_SIGNS
    from .merge_plan import KEY_POLICIES, NON_FLOAT_POLICIES

    merge = commands.add_parser(
        "merge", help="merge fine-tuned checkpoints (HF folders or .safetensors files) into a new folder",
        description="Merge expert checkpoints into an HF model folder, reading and writing tensor by tensor. "
                    "Defaults are the paper's conventions (FusionBench); see mergopt_kernels.merging and the "
                    "README for their mergekit equivalents. A config file (--config) gives per-model options.")
    merge.add_argument("--method", choices=METHODS, help="merge method (required without --config)")
    merge.add_argument("--base", help="base checkpoint: HF folder or .safetensors file")
    merge.add_argument("--experts", nargs="+", metavar="DIR", help="expert checkpoints")
    merge.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    merge.add_argument("--config", help="YAML/JSON config with mergekit's layout (instead of the options below)")
    merge.add_argument("--scaling", type=float, help="lambda in base + lambda * merged task vector (default 0.3)")
    merge.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per expert (default 1)")
    merge.add_argument("--density", type=float, nargs="+", metavar="D",
                       help="TIES keep fraction, one value or one per expert (default 0.2)")
    merge.add_argument("--drop-rate", type=float, nargs="+", metavar="P",
                       help="DARE drop probability, one value or one per expert (default 0.5)")
    merge.add_argument("--seed", type=int, help="DARE mask seed (default 0)")
    merge.add_argument("--per-tensor", action="store_true", help="TIES: top-k within each tensor (mergekit)")
    merge.add_argument("--exact-count", action="store_true", help="TIES: keep exactly k entries, ties by position")
    merge.add_argument("--merge-func", choices=MERGE_FUNCS, help="TIES: mean (default) or sum of agreeing entries")
    merge.add_argument("--count-rounding", choices=COUNT_ROUNDINGS,
                       help="TIES: keep count density * n rounded to the nearest (default) or down (mergekit)")
    merge.add_argument("--zero-sign", choices=ZERO_SIGNS,
                       help="TIES: sign where the weighted sum is 0: the model's majority (default) or positive "
                            "(mergekit)")
    merge.add_argument("--rescale", choices=RESCALES, help="DARE rescale of kept entries (default inverse)")
    merge.add_argument("--ties", action="store_true", help="DARE: merge the rescaled vectors with TIES")
    merge.add_argument("--keys", choices=KEY_POLICIES, help="keys not in every input (default strict: an error)")
    merge.add_argument("--non-float", choices=NON_FLOAT_POLICIES,
                       help="non-float entries that differ (default error; base takes the base's)")
    merge.add_argument("--promote-dtypes", action="store_true", help="merge differing float dtypes, promoted")
    merge.add_argument("--allow-non-finite", action="store_true",
                       help="merge inputs holding NaN/Inf and write non-finite results (default: exit 2 naming "
                            "the model and tensor)")
    merge.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_SIZE,
                       help="bytes per output shard (default 5GB)")
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return merge


_FLAG_OPTIONS = ("scaling", "weights", "density", "drop_rate", "seed", "merge_func", "count_rounding", "zero_sign",
                 "rescale", "keys", "non_float")
_SWITCH_OPTIONS = ("per_tensor", "exact_count", "ties", "promote_dtypes", "allow_non_finite")


def _config_from_args(args: argparse.Namespace, parser) -> MergeConfig:
    if args.method is None or not args.experts:
        parser.error("merge: --method and --experts are required (or give --config)")
    options = {name: getattr(args, name) for name in _FLAG_OPTIONS if getattr(args, name) is not None}
    options.update({name: True for name in _SWITCH_OPTIONS if getattr(args, name)})
    for name in ("density", "drop_rate"):
        if name in options and len(options[name]) == 1:
            options[name] = options[name][0]
    return MergeConfig.from_options(args.method, args.base, args.experts, **options)


def options_from_config(path) -> tuple[str, str | None, list[str], dict]:
    """(method, base path, expert paths, ``merge_checkpoints`` options) from a config file.

    Relative model paths are taken relative to the config file's folder (``MergeConfig.from_file``).
    """
    return MergeConfig.from_file(path).resolve()


def _tqdm_progress(disabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda items, desc, total: tqdm(items, desc=desc, total=total, unit="tensor", disable=disabled)


def run_merge_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``merge`` for parsed arguments; prints where the merged model was written.

    Every error about the inputs, the config or the output exits with status 2 and one line
    naming what is wrong (no traceback).
    """
    from .merge_io import merge_from_config

    if args.config is not None:
        given = [f"--{name.replace('_', '-')}" for name in ("method", "base", "experts", *_FLAG_OPTIONS)
                 if getattr(args, name) is not None] + \
                [f"--{name.replace('_', '-')}" for name in _SWITCH_OPTIONS if getattr(args, name)]
        if given:
            parser.error(f"merge: --config sets the method, models and options; do not also give {given}")
    try:
        config = MergeConfig.from_file(args.config) if args.config is not None else _config_from_args(args, parser)
        out = merge_from_config(config, args.out, max_shard_size=args.max_shard_size,
                                progress=_tqdm_progress(args.no_progress))
    except (OSError, TypeError, ValueError) as error:
        parser.exit(2, f"{parser.prog} merge: error: {error}\n")
    print(f"wrote {out}")
    return 0
