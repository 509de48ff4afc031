"""``python -m mergopt_kernels demo``: does MergOPT make experts merge better, at toy scale?

Modules: ``tasks`` (the data and tasks), ``model`` (MLP, pre-training, evaluation),
``finetune`` (one expert per optimizer), ``experiment`` (the whole run), ``report`` (table,
JSON, figures).
"""

from .experiment import MERGES, DemoConfig, quick_config, run_demo
from .report import format_table, summarise, write_outputs

__all__ = ["MERGES", "DemoConfig", "quick_config", "run_demo", "format_table", "summarise", "write_outputs"]
