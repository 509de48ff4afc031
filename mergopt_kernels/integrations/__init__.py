"""Integrations with training frameworks. Each submodule imports its framework when imported:
``mergopt_kernels.integrations.hf`` needs ``transformers`` (``pip install mergopt_kernels[hf]``)."""
