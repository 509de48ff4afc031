"""Merge methods as a package: the parts of generalized task arithmetic, and a registry of methods.

* ``spec``: the options, checked into a ``MergeSpec`` (``merge_spec``).
* ``registry``: each method (weight average, task arithmetic, TIES, DARE) as a configuration:
  its options, task vectors or not, sparsification, consensus.
* ``task_vectors``: the task vectors of one entry chunk by chunk; linear combination, average.
* ``sparsify``: magnitude trim (exact top-k by radix select) and DARE's drop and rescale.
* ``consensus``: TIES sign election and disjoint merge.
* ``driver``: ``merge_tensors``, every planned entry made as its method's configuration says.

The public API (state-dict functions, the exact rules) is ``mergopt_kernels.merging``.
"""
