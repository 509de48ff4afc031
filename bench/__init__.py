"""Benchmarks of mergopt_kernels against its peers; ``python -m bench.report`` runs them."""
