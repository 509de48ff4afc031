"""Task vectors of one entry, made chunk by chunk, and their linear combinations.

``TaskVectors`` holds the experts' tensors of one entry as one ``[K, n]`` stack in the entry's
own dtype and makes the fp32 (fp64) task vectors of a chunk of columns on demand, checking the
inputs for non-finite values as it goes; ``linear`` (task arithmetic) and ``average`` (weight
averaging) combine them without sparsification or consensus.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..merge_plan import Entry, TensorSource
from .sparsify import dare_drop
from .spec import MergeSpec

CHUNK = 1 << 18            # elements per chunk of the elementwise TIES and DARE work
L1_EPS = 1e-7              # mergekit's threshold for a norm too small to rescale by


def chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def stack_experts(entry: Entry, experts: Sequence[TensorSource], device=None) -> torch.Tensor:
    """``[K, n]`` in the entry's dtype: expert ``i``'s tensor in row ``i``, zeros where it has none.

    On ``device``, or the first holder's device when it is ``None``.
    """
    out = None
    for i in entry.experts:
        value = experts[i].load(entry.key)
        if out is None:
            out = torch.zeros((len(experts), entry.numel), dtype=entry.dtype,
                              device=value.device if device is None else device)
        out[i].copy_(value.reshape(-1))
        del value  # free it before the next read
    if out is None:  # only the base holds the key (keys="union")
        out = torch.zeros((len(experts), entry.numel), dtype=entry.dtype, device=device)
    return out


class TaskVectors:
    """The task vectors of one entry, made chunk by chunk.

    The experts' tensors are held as one ``[K, n]`` stack in the entry's own dtype (a bf16
    checkpoint stays bf16 in memory), the base as read; ``chunk(part)`` computes the fp32 (fp64)
    task vectors of columns ``part``, with DARE's drop and rescale for ``dare``.
    """

    def __init__(self, entry: Entry, base: TensorSource | None, experts: Sequence[TensorSource], spec: MergeSpec):
        self.entry, self.spec = entry, spec
        self.names = ([base.name] if base is not None else []) + [source.name for source in experts]
        self.base = base.load(entry.key).reshape(-1) if base is not None else None
        self.experts = stack_experts(entry, experts, self.base.device if self.base is not None else None)
        device = self.experts.device
        rows = len(experts)
        self.present = None if len(entry.experts) == rows else \
            torch.tensor([i in entry.experts for i in range(rows)], device=device)[:, None]
        self.dare = spec.method_def.sparsification == "dare"
        self.l1_scale = None
        if self.dare and spec.rescale == "l1":
            before = torch.zeros(rows, dtype=entry.compute_dtype, device=device)
            after = torch.zeros_like(before)
            for part in chunks(entry.numel):
                _, tau = self._task_vectors(part)
                before += tau.abs().sum(1)
                after += dare_drop(self.spec, self.entry.key, tau, part).abs().sum(1)
            self.l1_scale = torch.where((before >= L1_EPS) & (after >= L1_EPS), before / after,
                                        torch.ones((), dtype=before.dtype, device=device))[:, None]

    def _check_finite(self, values: torch.Tensor, part: slice) -> None:
        """Raise naming the input and key when ``values`` (computed from columns ``part``) is not finite."""
        if self.spec.allow_non_finite or all_finite(values):
            return
        inputs = ([self.base[part][None]] if self.base is not None else []) + list(self.experts[:, part][:, None])
        name = next(name for name, x in zip(self.names, inputs) if not bool(torch.isfinite(x).all()))
        raise ValueError(f"{name}[{self.entry.key!r}] holds a non-finite value (NaN or Inf); the merge stops "
                         f"(allow_non_finite=True, --allow-non-finite, merges it anyway)")

    def _task_vectors(self, part: slice, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.base[part].to(self.entry.compute_dtype)
        tau = self.experts[:, part].to(self.entry.compute_dtype) - ref
        if self.present is not None:
            tau = torch.where(self.present, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
        if check:
            self._check_finite(tau, part)
        return ref, tau

    def check_inputs(self, part: slice) -> None:
        """Raise naming the input and key when an input of columns ``part`` is not finite."""
        if self.base is not None:
            self._task_vectors(part)
        else:
            self.raw_chunk(part)

    def chunk(self, part: slice, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(base ``[m]``, task vectors ``[K, m]``) of columns ``part``, in the compute dtype.

        ``check=False`` leaves out the check of the inputs for the caller that checks a result
        every non-finite input reaches (``linear``): with DARE, whose drop may remove one, the
        inputs are checked regardless."""
        ref, tau = self._task_vectors(part, check or self.dare)
        if self.dare:
            tau = dare_drop(self.spec, self.entry.key, tau, part)
            if self.l1_scale is not None:
                tau = tau * self.l1_scale
        return ref, tau

    def taus(self) -> Iterator[torch.Tensor]:
        """The task vectors ``[K, m]`` chunk by chunk, in column order."""
        return (self.chunk(part)[1] for part in chunks(self.entry.numel))

    def raw_chunk(self, part: slice, check: bool = True) -> torch.Tensor:
        """The experts' values ``[K, m]`` of columns ``part`` in the compute dtype (checked unless
        ``check=False``)."""
        values = self.experts[:, part].to(self.entry.compute_dtype)
        if check:
            self._check_finite(values, part)
        return values


def all_finite(values: torch.Tensor) -> bool:
    """Whether every element of ``values`` is finite. One sum decides when it is finite (a NaN
    or Inf anywhere makes the sum NaN or Inf); only a non-finite sum (a NaN or Inf, or finite
    values whose sum overflows) runs the elementwise check, which is several times slower."""
    total = values.sum(dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(values).all())


def check_output(spec: MergeSpec, entry: Entry, values: torch.Tensor, inputs: TaskVectors | None = None,
                 part: slice | None = None) -> None:
    """Raise naming the key when merged ``values`` overflowed to Inf or NaN. With ``inputs``, whose
    columns ``part`` were not checked, a non-finite value is first traced to a non-finite input
    (named in the error): a linear combination is finite only when all its inputs are."""
    if not spec.allow_non_finite and not all_finite(values):
        if inputs is not None:
            inputs.check_inputs(part)
        raise ValueError(f"the merged {entry.key!r} is not finite: it overflows {entry.dtype} (scaling "
                         f"{spec.scaling}, weights {list(spec.weights) if spec.weights else 'all 1'}); the merge stops "
                         f"(allow_non_finite=True, --allow-non-finite, writes it anyway)")


def column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(weights, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


def average(entry: Entry, experts: Sequence[TensorSource], spec: MergeSpec) -> torch.Tensor:
    """Mean (weighted: ``sum_i w_i x_i / sum_i w_i``) of the experts holding the entry."""
    values, weights = TaskVectors(entry, None, experts, spec), spec.weights
    plain = weights is None and len(entry.experts) == len(experts)
    w = [(weights[i] if weights is not None else 1.0) if i in entry.experts else 0.0 for i in range(len(experts))]
    if not plain and sum(w) == 0:
        raise ValueError(f"the weights of the experts holding {entry.key!r} sum to 0: no weighted average")
    out = torch.empty(entry.numel, dtype=entry.dtype, device=values.experts.device)
    for part in chunks(entry.numel):
        chunk = values.raw_chunk(part, check=False)
        out[part] = chunk.mean(0) if plain else (column(w, chunk) * chunk).sum(0) / sum(w)
        check_output(spec, entry, out[part], values, part)
    return out.view(entry.shape)


def linear(entry: Entry, base: TensorSource, experts: Sequence[TensorSource], spec: MergeSpec,
            coefficients: Sequence[float] | None = None) -> torch.Tensor:
    """``base + sum_i c_i tau_i`` with ``c_i = scaling * w_i`` unless ``coefficients`` are given."""
    if coefficients is None:
        coefficients = [spec.scaling * (spec.weights[i] if spec.weights is not None else 1.0)
                        for i in range(len(experts))]
    vectors = TaskVectors(entry, base, experts, spec)
    out = torch.empty(entry.numel, dtype=entry.dtype, device=vectors.experts.device)
    for part in chunks(entry.numel):
        ref, tau = vectors.chunk(part, check=False)
        out[part] = ref + (column(coefficients, tau) * tau).sum(0)
        check_output(spec, entry, out[part], vectors, part)
    return out.view(entry.shape)
