"""Optimizers: FusedMergOptAdamW (fused AdamW base) and MergOpt (any base optimizer)."""

from .fused_adamw import FusedMergOptAdamW
from .mergopt import MergOpt

__all__ = ["FusedMergOptAdamW", "MergOpt"]
