"""``python -m mergopt_kernels demo``: does MergOPT make experts merge better, at toy scale?

Two protocols share ``protocol`` (noise fit, experts per optimizer and seed, merges, noise-scale
sweep, landscape), ``finetune`` (the optimizers and the training loop) and ``report`` (tables,
JSON, figures). Digits (the default): ``tasks`` (five views of the digits), ``model`` (MLP),
``experiment``. Language model (``--protocol lm``): ``lm_tasks`` (seven sequence tasks),
``lm_model`` (a small GPT, its pre-training, the base cache, the metrics), ``lm_experiment``.
"""

from .experiment import MERGES, DemoConfig, quick_config, run_demo
from .report import format_table, summarise, write_outputs

__all__ = ["MERGES", "DemoConfig", "quick_config", "run_demo", "format_table", "summarise", "write_outputs"]
