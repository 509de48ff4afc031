"""Command line of mergopt_kernels: ``python -m mergopt_kernels demo [options]`` and
``python -m mergopt_kernels merge [options]`` (installed as ``mergopt-kernels``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .validation import cli_type, finite_number, positive_integer

DEFAULT_OUT = "mergopt_demo_out"
INSTALL_DEMO = "pip install 'mergopt_kernels[demo]'"


_positive_int = cli_type(int, positive_integer, "a positive integer")


def _non_negative(name: str, value: float) -> float:
    finite_number(name, value, minimum=0.0)
    return value


_non_negative_float = cli_type(float, _non_negative, "a finite number >= 0")


DEMO_EXTRA_MODULES = ("tqdm", "sklearn", "matplotlib")  # the [demo] extra


def _demo_names() -> tuple[dict, tuple, dict, tuple, str]:
    """(digit task views, default digit tasks, merge methods, LM tasks, the missing module's
    name or ""): empty when the [demo] extra is not installed, so that --help still works."""
    try:
        from .demo.experiment import MERGES
        from .demo.lm_tasks import LM_TASKS
        from .demo.tasks import DEFAULT_TASKS, VIEWS
    except ModuleNotFoundError as error:
        if error.name not in DEMO_EXTRA_MODULES:
            raise
        return {}, (), {}, (), error.name
    return VIEWS, DEFAULT_TASKS, MERGES, tuple(LM_TASKS), ""


def _default_cache_dir() -> str:
    import os

    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergopt_kernels")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``demo`` and ``merge``)."""
    views, default_tasks, merges, lm_tasks, missing = _demo_names()
    parser = argparse.ArgumentParser(prog="mergopt-kernels", description=__doc__)
    parser.set_defaults(missing_extra=missing)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="fine-tune experts with AdamW, MergOPT and controls, merge them, print the tables"
                     + (f" (needs the [demo] extra: {INSTALL_DEMO})" if missing else ""),
        description="Pre-train a base (--protocol digits: an MLP on scikit-learn's digits; --protocol lm: a "
                    "small GPT-style language model on seven generated or standard-library sequence tasks), "
                    "fine-tune one expert per task with AdamW, FusedMergOptAdamW, its noise-off control and four "
                    "controls (AdamW at the lr matching MergOPT's task-vector norm, MergOPT with Gaussian noise, "
                    "MergOPT with a fixed s, AdamW at a constant lr), merge each set of experts, sweep task "
                    "arithmetic's lambda and evaluate the merged models on every task (mean ± std over seeds, "
                    "seed-paired gains with 95% intervals, a verdict per control). Offline, CPU or CUDA.")
    demo.add_argument("--protocol", choices=("digits", "lm"), default="digits",
                      help="digits: an MLP on five views of scikit-learn's digits (default); lm: a small "
                           "GPT-style language model pre-trained here, seven experts on seven sequence tasks")
    demo.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                      help=f"tasks, at least two; digits: {list(views)} (default all: {' '.join(default_tasks)}); "
                           f"lm: {list(lm_tasks)} (default all)")
    demo.add_argument("--seeds", type=_positive_int, default=None,
                      help="number of seeds (default: digits 10, lm 5; --quick 1)")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="fine-tuning epochs per expert (default 3, --quick 1)")
    demo.add_argument("--large", action="store_true",
                      help="lm: the configuration for one GPU (a 25M-parameter base; its run time is not measured)")
    demo.add_argument("--cache-dir", default=None,
                      help="lm: folder of the cached pre-trained bases, keyed by everything that shapes "
                           "them (default $XDG_CACHE_HOME/mergopt_kernels or ~/.cache/mergopt_kernels)")
    demo.add_argument("--noise-scale", type=_non_negative_float, default=None,
                      help="MergOPT noise scale b (default: digits fitted to pilot AdamW task vectors; lm "
                           "set by the noise offset, see --noise-offset)")
    demo.add_argument("--noise-offset", type=_non_negative_float, default=None, metavar="STEPS",
                      help="set b so that the noise offset E|s| b / lr is STEPS Adam steps (paper: about 21); "
                           "excludes --noise-scale")
    demo.add_argument("--distribution", choices=("laplace", "gaussian"), default="laplace",
                      help="MergOPT noise distribution (default laplace)")
    demo.add_argument("--merges", nargs="+", choices=list(merges) or None, default=None, metavar="METHOD",
                      help=f"merge methods; choices {list(merges)}; default all")
    demo.add_argument("--no-controls", action="store_true",
                      help="run AdamW, MergOPT and the noise-off control only, without the four control rows "
                           "(matched norm, Gaussian, fixed s, constant lr)")
    demo.add_argument("--quick", action="store_true",
                      help="every stage, quickly: 1 seed, 1 epoch, 5x5 landscape (lm: a smaller base too)")
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="torch device (default: cuda when available, else cpu)")
    demo.add_argument("--threads", type=_positive_int, default=2,
                      help="CPU threads for torch (default 2; on a loaded machine 1 can be much faster)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    from .merge_cli import add_merge_parser
    add_merge_parser(commands)
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    import torch

    from .demo.experiment import DemoConfig, quick_config
    from .demo.lm_experiment import LMDemoConfig, lm_gpu_config, lm_quick_config

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.protocol != "lm" and (args.large or args.cache_dir is not None):
        parser.error("--large and --cache-dir apply to --protocol lm only")
    if args.large and args.quick:
        parser.error("--large and --quick exclude each other")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.noise_scale is not None and args.noise_offset is not None:
        parser.error("--noise-scale and --noise-offset exclude each other")
    overrides = dict(device=device, distribution=args.distribution, noise_scale=args.noise_scale,
                     progress=not args.no_progress, controls=not args.no_controls)
    if args.protocol == "lm":
        config = lm_quick_config() if args.quick else lm_gpu_config() if args.large else LMDemoConfig()
        overrides["cache_dir"] = args.cache_dir or _default_cache_dir()
    else:
        config = quick_config() if args.quick else DemoConfig()
    if args.noise_offset is not None:
        overrides["noise_offset"] = args.noise_offset
    if args.tasks is not None:
        overrides["tasks"] = tuple(args.tasks)
    if args.merges is not None:
        overrides["merges"] = tuple(dict.fromkeys(args.merges))
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.epochs is not None:
        overrides["finetune"] = dataclasses.replace(config.finetune, epochs=args.epochs)
    config = dataclasses.replace(config, **overrides)
    try:
        config.check()
    except ValueError as error:
        parser.error(str(error))
    return config


def run_demo_command(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """Run the demo for parsed arguments: print the report and write the outputs (``command``:
    the command line, recorded in ``report.md``)."""
    import torch

    from .demo import run_demo, write_outputs
    from .demo.lm_experiment import run_lm_demo
    from .demo.report import format_report

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = _config(args, parser)
    results = (run_lm_demo if args.protocol == "lm" else run_demo)(config)
    report = format_report(results, config, args.protocol, torch.get_num_threads())
    print(report)
    paths = write_outputs(results, args.out, report=report, command=command, wall_s=time.perf_counter() - start)
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    """Entry point of ``python -m mergopt_kernels`` and of the ``mergopt-kernels`` script."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "merge":
        from .merge_cli import run_merge_command
        return run_merge_command(args, parser)
    if args.missing_extra:
        parser.error(f"the demo needs the [demo] extra (module {args.missing_extra!r} is missing): {INSTALL_DEMO}")
    return run_demo_command(args, parser, " ".join(["python -m mergopt_kernels", *argv]))


if __name__ == "__main__":
    sys.exit(main())
