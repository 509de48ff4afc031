"""mergopt_kernels: fused kernels that make MergOPT fine-tuning cost what AdamW costs.

``FusedMergOptAdamW`` and ``MergOpt`` are the optimizers; ``mergopt_kernels.merging`` holds the
merging methods, ``mergopt_kernels.noise`` the definition of the noise stream.
"""

from .optim import FusedMergOptAdamW, MergOpt

__version__ = "0.1.0"
__all__ = ["FusedMergOptAdamW", "MergOpt", "__version__"]
