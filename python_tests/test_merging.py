"""Tests of mergopt_kernels.merging: hand-checked cases, invariants, a brute-force TIES reference."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import numpy_philox
import pytest
import torch

from mergopt_kernels import merging
from mergopt_kernels.merging import dare, task_arithmetic, ties_merging, weight_average

EPS32 = torch.finfo(torch.float32).eps


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def random_model(seed: int | None = None, dtype=torch.float32, shapes=((7, 5), (13,), (3, 1, 11))):
    """A small model with odd-sized float tensors plus an integer counter and a bool buffer."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    model = {f"w{i}": torch.randn(shape, generator=gen).to(dtype) for i, shape in enumerate(shapes)}
    model["steps"] = torch.tensor(11, dtype=torch.int64)
    model["mask"] = torch.rand(4, generator=gen) > 0.5
    return model


def random_experts(base, count: int, scale: float = 0.1, differ_non_float: bool = False):
    """Experts near ``base``; their non-float entries equal the base's unless ``differ_non_float``."""
    experts = []
    for _ in range(count):
        expert = {}
        for key, value in base.items():
            if value.is_floating_point():
                noise = scale * torch.randn(value.shape)
                expert[key] = (value.float() + noise).to(value.dtype)
            elif not differ_non_float:
                expert[key] = value.clone()
            elif value.dtype == torch.bool:
                expert[key] = ~value
            else:
                expert[key] = value + 7
        experts.append(expert)
    return experts


def float_keys(state):
    return [key for key, value in state.items() if value.is_floating_point()]


def assert_close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Brute-force TIES on the concatenated model (the reference our streaming version must equal)
# ---------------------------------------------------------------------------------------------

def ties_reference(base, experts, scaling, density, per_tensor=False, taus=None, weights=None,
                   merge_func="mean", exact_count=False, count_rounding="nearest", zero_sign="majority"):
    """TIES on the flattened model with sorts. ``density`` one value or one per expert; with
    ``exact_count`` the k largest by a stable sort (ties: lowest index first)."""
    keys = float_keys(base)
    sizes = [base[key].numel() for key in keys]
    if taus is None:
        taus = [torch.stack([(e[key].double() - base[key].double()).float().reshape(-1) for e in experts])
                for key in keys]
    flat = torch.cat(taus, dim=1)                                           # [K, N], whole model
    rows = flat.shape[0]
    densities = list(density) if isinstance(density, (list, tuple)) else [density] * rows
    segments = [(0, flat.shape[1])] if not per_tensor else []
    start = 0
    for size in sizes:
        if per_tensor:
            segments.append((start, start + size))
        start += size
    trimmed = torch.zeros_like(flat)
    for lo, hi in segments:
        for r in range(rows):
            part = flat[r, lo:hi]
            wanted = densities[r] * (hi - lo) + (0.5 if count_rounding == "nearest" else 0.0)
            k = min(hi - lo, max(1, math.floor(wanted)))
            order = part.abs().sort(descending=True, stable=True)
            if exact_count:
                keep = torch.zeros(hi - lo, dtype=torch.bool)
                keep[order.indices[:k]] = True
            else:
                keep = part.abs() >= order.values[k - 1]
            trimmed[r, lo:hi] = torch.where(keep, part, 0.0)
    w = torch.ones(rows) if weights is None else torch.tensor(weights, dtype=torch.float32)
    weighted = trimmed * w[:, None]
    sign = torch.sign(weighted.sum(0))
    majority = 1.0 if zero_sign == "positive" or (sign > 0).sum() >= (sign < 0).sum() else -1.0
    sign[sign == 0] = majority
    agree = torch.where(sign > 0, weighted > 0, weighted < 0)
    merged = (weighted * agree).double().sum(0)
    if merge_func == "mean":
        divisor = (w[:, None].double() * agree).sum(0)
        merged = merged / torch.where(divisor == 0, 1.0, divisor)
    out, start = dict(base), 0
    for key, size in zip(keys, sizes):
        delta = merged[start:start + size].reshape(base[key].shape)
        out[key] = (base[key].double() + scaling * delta).to(base[key].dtype)
        start += size
    return out


# ---------------------------------------------------------------------------------------------
# Hand-checked cases
# ---------------------------------------------------------------------------------------------

def test_weight_average_hand_case():
    experts = [{"w": t(1.0, 2.0), "n": torch.tensor(3)}, {"w": t(3.0, -2.0), "n": torch.tensor(3)}]
    out = weight_average(experts)
    assert torch.equal(out["w"], t(2.0, 0.0))
    assert torch.equal(out["n"], torch.tensor(3))
    assert torch.equal(weight_average(experts, weights=[3.0, 1.0])["w"], t(1.5, 1.0))


def test_task_arithmetic_hand_case():
    base = {"w": t(1.0, 2.0)}
    experts = [{"w": t(2.0, 2.0)}, {"w": t(1.0, 4.0)}]
    assert torch.equal(task_arithmetic(base, experts, scaling=0.5)["w"], t(1.5, 3.0))


def test_ties_hand_case_sign_election_and_majority_tie():
    # density 1 keeps everything. Columns: sums -1 (elect -), 0 (zero sum), 1 (elect +), 0 (zero sum).
    # Elected signs over the model: one -, one + -> tie -> majority +1 for the zero-sum columns.
    base = {"w": t(0.0, 0.0, 0.0, 0.0)}
    experts = [{"w": t(1.0, -2.0, 3.0, 0.5)}, {"w": t(2.0, 1.0, -1.0, -0.5)}, {"w": t(-4.0, 1.0, -1.0, 0.0)}]
    out = ties_merging(base, experts, scaling=1.0, density=1.0)
    assert torch.equal(out["w"], t(-4.0, 1.0, 3.0, 0.5))


def test_ties_hand_case_negative_majority():
    # An extra tensor electing "-" makes the model's majority negative.
    base = {"w": t(0.0, 0.0, 0.0, 0.0), "v": t(0.0)}
    experts = [{"w": t(1.0, -2.0, 3.0, 0.5), "v": t(-1.0)}, {"w": t(2.0, 1.0, -1.0, -0.5), "v": t(-1.0)},
               {"w": t(-4.0, 1.0, -1.0, 0.0), "v": t(-3.0)}]
    out = ties_merging(base, experts, scaling=1.0, density=1.0)
    assert torch.equal(out["w"], t(-4.0, -2.0, 3.0, -0.5))
    assert torch.equal(out["v"], t(-5.0 / 3.0))


def test_ties_hand_case_trim_with_ties_at_threshold():
    base = {"w": t(0.0, 0.0, 0.0, 0.0, 0.0)}
    out = ties_merging(base, [{"w": t(1.0, -5.0, 2.0, 0.1, 0.0)}], scaling=0.5, density=0.4)   # k = 2
    assert torch.equal(out["w"], t(0.0, -2.5, 1.0, 0.0, 0.0))
    out = ties_merging(base, [{"w": t(3.0, -3.0, 3.0, 1.0, 0.5)}], scaling=1.0, density=0.4)   # k = 2, 3-way tie
    assert torch.equal(out["w"], t(3.0, -3.0, 3.0, 0.0, 0.0))


def test_ties_hand_case_global_versus_per_tensor():
    base = {"a": t(0.0, 0.0), "b": t(0.0, 0.0)}
    experts = [{"a": t(10.0, 9.0), "b": t(1.0, 2.0)}]
    glob = ties_merging(base, experts, scaling=1.0, density=0.5)
    assert torch.equal(glob["a"], t(10.0, 9.0)) and torch.equal(glob["b"], t(0.0, 0.0))
    local = ties_merging(base, experts, scaling=1.0, density=0.5, per_tensor=True)
    assert torch.equal(local["a"], t(10.0, 0.0)) and torch.equal(local["b"], t(0.0, 2.0))


def dare_keep_reference(seed, key, expert, shape, p):
    """The documented DARE mask, replayed with the numpy Philox: bool tensor of ``shape``."""
    h = int.from_bytes(hashlib.sha256(f"{expert}:{key}".encode()).digest()[:8], "little")
    n = math.prod(shape)
    words = numpy_philox.element_words(seed, h >> 32, h & 0xFFFFFFFF, np.arange(n, dtype=np.uint64))
    return torch.from_numpy((words >> 8) >= math.ceil(p * 2**24)).reshape(shape)


def test_dare_masks_follow_documented_stream():
    """Masks are the documented Philox words of (seed, expert, name, element), replayed in numpy."""
    base = random_model(dtype=torch.float32)
    experts = random_experts(base, 3)
    p, seed, scaling = 0.3, (1 << 64) - 1234, 0.7
    out = dare(base, experts, scaling, p, seed)
    for key in float_keys(base):
        tau = torch.stack([e[key] - base[key] for e in experts])
        keep = torch.stack([dare_keep_reference(seed, key, i, base[key].shape, p) for i in range(3)])
        expected = base[key] + (scaling * torch.where(keep, tau / (1 - p), 0.0)).sum(0)
        assert torch.equal(out[key], expected)          # the same fp32 operations in the same order


def test_dare_masks_do_not_depend_on_key_order_or_other_keys():
    base = random_model()
    experts = random_experts(base, 2)
    out = dare(base, experts, 1.0, 0.5, 7)
    reverse = lambda sd: dict(reversed(list(sd.items())))  # noqa: E731
    out_reversed = dare(reverse(base), [reverse(e) for e in experts], 1.0, 0.5, 7)
    only_w2 = dare({"w2": base["w2"]}, [{"w2": e["w2"]} for e in experts], 1.0, 0.5, 7)
    assert all(torch.equal(out[key], out_reversed[key]) for key in base)
    assert torch.equal(out["w2"], only_w2["w2"])
    assert list(out_reversed) == list(reverse(base))


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_task_arithmetic_one_expert_scaling_one_returns_expert(dtype):
    base = random_model(dtype=dtype)
    (expert,) = random_experts(base, 1, scale=1.0)
    out = task_arithmetic(base, [expert], scaling=1.0)
    for key in float_keys(base):
        # b + (e - b) in the compute dtype (fp32, fp64 for fp64): one rounding of e - b and one of the
        # sum, each at most half an ulp of max(|b|, |e|), then the cast back to the entry's dtype.
        compute_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        scale = torch.maximum(base[key].abs(), expert[key].abs()).double()
        bound = compute_eps * scale + torch.finfo(dtype).eps / 2 * expert[key].double().abs()
        assert out[key].dtype == dtype
        assert ((out[key].double() - expert[key].double()).abs() <= bound).all()


def test_ties_density_one_agreeing_signs_is_mean_of_task_vectors():
    base = random_model(dtype=torch.float32)
    signs = {key: torch.randint(0, 2, base[key].shape) * 2.0 - 1.0 for key in float_keys(base)}
    experts = []
    for _ in range(4):
        expert = dict(base)
        for key in float_keys(base):
            expert[key] = base[key] + signs[key] * (torch.rand(base[key].shape) + 0.01)
        experts.append(expert)
    out = ties_merging(base, experts, scaling=0.37, density=1.0)
    for key in float_keys(base):
        taus = torch.stack([e[key].double() - base[key].double() for e in experts])
        expected = base[key].double() + 0.37 * taus.mean(0)
        assert_close(out[key].double(), expected, atol=8 * EPS32 * 4)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.37, 0.5, 1.0])
def test_ties_matches_brute_force_concatenation(density, per_tensor):
    base = random_model(shapes=((17, 9), (1,), (31,), (2, 3, 5), (64,)))
    experts = random_experts(base, 3, scale=0.05)
    out = ties_merging(base, experts, scaling=0.3, density=density, per_tensor=per_tensor)
    ref = ties_reference(base, experts, 0.3, density, per_tensor)
    for key in base:
        assert out[key].dtype == base[key].dtype
        assert_close(out[key], ref[key], atol=8 * EPS32 * 4)


def test_ties_global_threshold_with_mixed_precision_and_exact_ties():
    """Quantised task vectors (many exact ties) and an fp64 entry next to fp32 ones."""
    gen = torch.Generator().manual_seed(torch.seed())
    base = {"a": torch.zeros(41), "b": torch.zeros(5, 7, dtype=torch.float64), "c": torch.zeros(3)}
    experts = [{key: torch.randint(-4, 5, value.shape, generator=gen).to(value.dtype) / 8
                for key, value in base.items()} for _ in range(3)]
    for per_tensor in (False, True):
        for density in (0.1, 0.3, 0.77):
            out = ties_merging(base, experts, scaling=1.0, density=density, per_tensor=per_tensor)
            ref = ties_reference(base, experts, 1.0, density, per_tensor)
            for key in base:
                assert out[key].dtype == base[key].dtype
                assert_close(out[key], ref[key], atol=1e-6)


def test_kth_largest_magnitude_matches_sort_on_a_larger_model():
    tensors = [torch.randn(3, n) * torch.exp(torch.randn(3, 1) * 3) for n in (1, 7, 1000, 2777)]
    flat = torch.cat(tensors, dim=1)
    for k in (1, 2, 5, 1234, flat.shape[1]):
        expected = flat.abs().sort(dim=1, descending=True).values[:, k - 1]
        for dtype in (torch.float32, torch.float64):
            got, ties = merging._kth_largest_magnitude(lambda: iter(tensors), k, 3, dtype)
            assert torch.equal(got, expected.to(dtype))
            # ties: how many entries equal to the threshold are among the k largest
            expected_ties = k - (flat.abs().to(dtype) > expected.to(dtype)[:, None]).sum(1)
            assert torch.equal(ties, expected_ties)


def test_kth_largest_magnitude_matches_sort_with_ties_and_zeros(fresh_seed):
    # Quantized values: many entries equal to the threshold, zeros, rows of different scales.
    gen = torch.Generator().manual_seed(fresh_seed & 0x7FFFFFFF)
    tensors = [torch.round(torch.randn(4, n, generator=gen) * 3) / 4 * torch.exp(torch.randn(4, 1, generator=gen))
               for n in (3, 517, 2049)]
    flat = torch.cat(tensors, dim=1)
    k = torch.randint(1, flat.shape[1] + 1, (4,), generator=gen)
    for dtype in (torch.float32, torch.float64):
        magnitudes = flat.abs().to(dtype)
        expected = magnitudes.sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None]).squeeze(1)
        got, ties = merging._kth_largest_magnitude(lambda: iter(tensors), k, 4, dtype)
        assert torch.equal(got, expected), fresh_seed
        assert torch.equal(ties, k - (magnitudes > expected[:, None]).sum(1)), fresh_seed


def test_dare_drop_rate_zero_equals_task_arithmetic():
    base = random_model()
    experts = random_experts(base, 3)
    for key, value in dare(base, experts, scaling=0.4, drop_rate=0.0, seed=5).items():
        assert torch.equal(value, task_arithmetic(base, experts, scaling=0.4)[key])
    assert_close(dare(base, experts, 0.4, 0.0, ties=True, density=0.3)["w0"],
                 ties_merging(base, experts, 0.4, density=0.3)["w0"], atol=0.0)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.9])
def test_dare_rescales_kept_entries_exactly(p):
    base = {"w": torch.zeros(20011)}
    expert = {"w": torch.randn(20011)}
    out = dare(base, [expert], scaling=1.0, drop_rate=p, seed=torch.seed() % 2**31)["w"]
    kept = out != 0
    # exactly the fp32 quotient by (1 - p); the factor rounded to fp32 and the quotient rounded give
    # at most one ulp against the real-valued rescale
    assert torch.equal(out[kept], expert["w"][kept] / (1 - p))
    exact = expert["w"][kept].double() / (1 - p)
    assert ((out[kept].double() - exact).abs() <= EPS32 * exact.abs()).all()
    if p == 0.5:
        assert torch.equal(out[kept], 2 * expert["w"][kept])
    # drop fraction: binomial, 6 standard deviations
    n = kept.numel()
    assert abs((n - int(kept.sum())) / n - p) <= 6 * math.sqrt(p * (1 - p) / n)


def test_dare_seed_determinism():
    base = random_model()
    experts = random_experts(base, 2)
    a = dare(base, experts, drop_rate=0.5, seed=3)
    b = dare(base, experts, drop_rate=0.5, seed=3)
    c = dare(base, experts, drop_rate=0.5, seed=4)
    assert all(torch.equal(a[key], b[key]) for key in base)
    assert not all(torch.equal(a[key], c[key]) for key in float_keys(base))


def test_dare_ties_is_ties_of_rescaled_vectors():
    base = random_model(shapes=((9, 11), (23,)))
    experts = random_experts(base, 3)
    p, seed = 0.4, 77
    taus = []
    for key in float_keys(base):
        tau = torch.stack([e[key] - base[key] for e in experts])
        keep = torch.stack([dare_keep_reference(seed, key, i, base[key].shape, p) for i in range(3)])
        taus.append(torch.where(keep, tau / (1 - p), 0.0).reshape(3, -1))
    ref = ties_reference(base, experts, 0.3, 0.25, taus=taus)
    out = dare(base, experts, 0.3, p, seed, ties=True, density=0.25)
    for key in float_keys(base):
        assert_close(out[key], ref[key], atol=8 * EPS32 * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtype_preserved_and_computed_in_fp32(dtype):
    base = random_model(dtype=dtype)
    experts = random_experts(base, 3)
    up = lambda sd: {key: (v.float() if v.is_floating_point() else v) for key, v in sd.items()}  # noqa: E731
    cases = [
        (task_arithmetic(base, experts, 0.3), task_arithmetic(up(base), [up(e) for e in experts], 0.3)),
        (weight_average(experts), weight_average([up(e) for e in experts])),
        (ties_merging(base, experts, 0.3, 0.3), ties_merging(up(base), [up(e) for e in experts], 0.3, 0.3)),
        (dare(base, experts, 0.3, 0.5, 9), dare(up(base), [up(e) for e in experts], 0.3, 0.5, 9)),
    ]
    for out, ref32 in cases:
        for key in float_keys(base):
            assert out[key].dtype == dtype
            # the fp32 result rounded once to the low-precision dtype
            assert torch.equal(out[key], ref32[key].to(dtype))


def test_non_float_entries_that_differ_are_an_error_naming_the_key():
    base = random_model()
    experts = random_experts(base, 2, differ_non_float=True)
    experts[1]["steps"] = experts[1]["steps"] + 1   # differs from experts[0] too (for the weight average)
    for call in (lambda **kw: task_arithmetic(base, experts, **kw), lambda **kw: ties_merging(base, experts, **kw),
                 lambda **kw: dare(base, experts, **kw), lambda **kw: weight_average(experts, **kw)):
        with pytest.raises(ValueError, match=r"non-float entry 'steps' differs between (base|experts\[0\]) and "
                                             r"experts\[\d\]"):
            call()
        out = call(non_float="base")
        assert list(out) == list(base)


def test_non_float_entries_taken_from_the_base_are_copies():
    base = random_model()
    experts = random_experts(base, 2, differ_non_float=True)
    for out in (task_arithmetic(base, experts, non_float="base"), ties_merging(base, experts, non_float="base"),
                dare(base, experts, non_float="base"), dare(base, experts, ties=True, non_float="base")):
        assert torch.equal(out["steps"], base["steps"]) and torch.equal(out["mask"], base["mask"])
        assert out["steps"].data_ptr() != base["steps"].data_ptr()
        assert list(out) == list(base)
    averaged = weight_average(experts, non_float="base")
    assert torch.equal(averaged["steps"], experts[0]["steps"]) and torch.equal(averaged["mask"], experts[0]["mask"])


# ---------------------------------------------------------------------------------------------
# Errors and input immutability
# ---------------------------------------------------------------------------------------------

ALL_METHODS = {
    "task_arithmetic": lambda b, e, **kw: task_arithmetic(b, e, **kw),
    "ties_merging": lambda b, e, **kw: ties_merging(b, e, **kw),
    "dare": lambda b, e, **kw: dare(b, e, **kw),
    "weight_average": lambda b, e, **kw: weight_average(e, **kw),
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_structural_errors(method):
    call = ALL_METHODS[method]
    base = random_model()
    experts = random_experts(base, 2)
    with pytest.raises(ValueError, match="experts is empty"):
        call(base, [])
    with pytest.raises(TypeError, match="experts must be a sequence"):
        call(base, experts[0])
    missing = dict(experts[1])
    del missing["w1"]
    with pytest.raises(ValueError, match=r"experts\[1\].*missing \['w1'\]"):
        call(base, [experts[0], missing])
    extra = dict(experts[1], extra=torch.zeros(1))
    with pytest.raises(ValueError, match=r"experts\[1\].*unexpected \['extra'\]"):
        call(base, [experts[0], extra])
    reshaped = dict(experts[1], w0=experts[1]["w0"].reshape(5, 7))
    with pytest.raises(ValueError, match=r"experts\[1\]\['w0'\] has shape \(5, 7\)"):
        call(base, [experts[0], reshaped])
    retyped = dict(experts[1], w0=experts[1]["w0"].double())
    with pytest.raises(TypeError, match=r"experts\[1\]\['w0'\] has dtype torch.float64"):
        call(base, [experts[0], retyped])
    with pytest.raises(TypeError, match=r"experts\[1\] must be a state dict"):
        call(base, [experts[0], [1, 2]])


def test_base_mismatch_errors_name_the_base():
    base = random_model()
    experts = random_experts(base, 1)
    with pytest.raises(ValueError, match=r"experts\[0\]\['w2'\] has shape .* base\['w2'\]"):
        task_arithmetic(dict(base, w2=torch.zeros(3, 11)), experts)
    with pytest.raises(TypeError, match="base must be a state dict"):
        task_arithmetic([base], experts)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(density):
    base = random_model()
    experts = random_experts(base, 2)
    with pytest.raises(ValueError, match="density"):
        ties_merging(base, experts, density=density)
    with pytest.raises(ValueError, match="density"):
        dare(base, experts, ties=True, density=density)


@pytest.mark.parametrize("drop_rate", [1.0, -0.01, 2.0, float("inf")])
def test_drop_rate_out_of_range(drop_rate):
    base = random_model()
    with pytest.raises(ValueError, match="drop_rate"):
        dare(base, random_experts(base, 2), drop_rate=drop_rate)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties_merging", "dare"])
@pytest.mark.parametrize("scaling", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_scaling(method, scaling):
    base = random_model()
    with pytest.raises(ValueError, match="scaling must be finite"):
        ALL_METHODS[method](base, random_experts(base, 2), scaling=scaling)


def test_argument_type_errors():
    base = random_model()
    experts = random_experts(base, 2)
    with pytest.raises(TypeError, match="scaling must be a real number"):
        task_arithmetic(base, experts, scaling="0.3")
    with pytest.raises(TypeError, match="density must be a real number"):
        ties_merging(base, experts, density=None)
    with pytest.raises(TypeError, match=r"seed must be an integer in \[0, 2\*\*64\), got float 0.5"):
        dare(base, experts, seed=0.5)


def test_inputs_are_not_modified():
    base = random_model()
    experts = random_experts(base, 3)
    saved_base, saved_experts = copy.deepcopy(base), copy.deepcopy(experts)
    for method in ALL_METHODS.values():
        method(base, experts)
    dare(base, experts, ties=True)
    ties_merging(base, experts, per_tensor=True)
    for before, after in zip([saved_base, *saved_experts], [base, *experts]):
        assert list(before) == list(after)
        assert all(torch.equal(before[key], after[key]) for key in before)


# ---------------------------------------------------------------------------------------------
# Options: per-model weights and densities, exact keep count, mean or sum, DARE rescale
# ---------------------------------------------------------------------------------------------

def test_task_arithmetic_weights_hand_case():
    base = {"w": t(1.0, 2.0)}
    experts = [{"w": t(2.0, 2.0)}, {"w": t(1.0, 4.0)}]
    assert torch.equal(task_arithmetic(base, experts, scaling=0.5, weights=[2.0, -1.0])["w"], t(2.0, 1.0))


@pytest.mark.parametrize("merge_func", ["mean", "sum"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_ties_weights_densities_and_merge_func_match_brute_force(merge_func, per_tensor):
    seed = torch.seed()
    base = random_model(seed, shapes=((17, 9), (1,), (31,), (2, 3, 5), (64,)))
    experts = random_experts(base, 3, scale=0.05)
    weights, densities = [0.5, 1.75, -0.3], [0.1, 0.45, 0.8]
    out = ties_merging(base, experts, 0.7, densities, per_tensor, weights=weights, merge_func=merge_func)
    ref = ties_reference(base, experts, 0.7, densities, per_tensor, weights=weights, merge_func=merge_func)
    for key in float_keys(base):
        # fp32 products and sums of 3 terms against the fp64 reference; magnitudes below 4
        assert_close(out[key], ref[key], atol=16 * EPS32 * 4), f"seed {seed}"


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("count_rounding, zero_sign", [("down", "positive"), ("down", "majority"),
                                                       ("nearest", "positive")])
def test_ties_count_rounding_and_zero_sign_match_brute_force(per_tensor, count_rounding, zero_sign, fresh_seed):
    # Entries of the experts cancel exactly on a quarter of the elements (a zero sign sum where
    # the trim keeps both), and most elected signs are negative: the zero sign decides there.
    gen = torch.Generator().manual_seed(fresh_seed & 0x7FFFFFFF)
    base = {"a": torch.zeros(203), "b": torch.zeros(7, 13)}
    first = {key: -torch.rand(v.shape, generator=gen) - 0.1 for key, v in base.items()}
    second = {key: torch.where(torch.rand(v.shape, generator=gen) < 0.25, -first[key],
                               -torch.rand(v.shape, generator=gen)) for key, v in base.items()}
    experts, density = [first, second], 0.55   # d n is not an integer: the roundings differ
    options = dict(per_tensor=per_tensor, exact_count=True, count_rounding=count_rounding, zero_sign=zero_sign)
    out = ties_merging(base, experts, 1.0, density, **options)
    ref = ties_reference(base, experts, 1.0, density, **options)
    paper = ties_merging(base, experts, 1.0, density, per_tensor=per_tensor, exact_count=True)
    for key in base:
        assert_close(out[key], ref[key], atol=4 * EPS32), f"seed {fresh_seed}"
    assert any(not torch.equal(out[key], paper[key]) for key in base), f"seed {fresh_seed}"


def test_ties_exact_count_hand_case():
    # k = 2 of 5 with a 3-way tie at the threshold: exact_count keeps the first two tied entries
    base = {"w": t(0.0, 0.0, 0.0, 0.0, 0.0)}
    out = ties_merging(base, [{"w": t(1.0, -3.0, 3.0, 3.0, 0.5)}], scaling=1.0, density=0.4, exact_count=True)
    assert torch.equal(out["w"], t(0.0, -3.0, 3.0, 0.0, 0.0))
    # whole model: the budget of tied entries runs through the keys in order
    base = {"a": t(0.0, 0.0), "b": t(0.0, 0.0, 0.0)}
    expert = {"a": t(1.0, 2.0), "b": t(2.0, -2.0, 5.0)}
    out = ties_merging(base, [expert], scaling=1.0, density=0.6, exact_count=True)     # k = 3
    assert torch.equal(out["a"], t(0.0, 2.0)) and torch.equal(out["b"], t(2.0, 0.0, 5.0))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_ties_exact_count_keeps_exactly_k_in_bfloat16(per_tensor):
    seed = torch.seed()
    gen = torch.Generator().manual_seed(seed)
    base = {"a": torch.zeros(4099, dtype=torch.bfloat16), "b": torch.zeros(37, 29, dtype=torch.bfloat16)}
    experts = [{key: (torch.randn(v.shape, generator=gen) * 1e-2).to(torch.bfloat16) for key, v in base.items()}
               for _ in range(2)]
    density = 0.25
    n_total = sum(v.numel() for v in base.values())
    for exact in (False, True):
        for i, expert in enumerate(experts):
            out = ties_merging(base, [expert], scaling=1.0, density=density, per_tensor=per_tensor, exact_count=exact)
            kept = {key: int((out[key] != 0).sum()) for key in base}
            wanted = [math.floor(density * v.numel() + 0.5) for v in base.values()] if per_tensor else \
                [math.floor(density * n_total + 0.5)]
            got = list(kept.values()) if per_tensor else [sum(kept.values())]
            if exact:
                assert got == wanted, f"seed {seed}"
            else:
                assert all(g >= w for g, w in zip(got, wanted)), f"seed {seed}"
        ref = ties_reference(base, experts, 1.0, density, per_tensor, exact_count=exact)
        out = ties_merging(base, experts, scaling=1.0, density=density, per_tensor=per_tensor, exact_count=exact)
        for key in base:
            assert torch.equal(out[key], ref[key]), f"seed {seed}"


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_dare_rescale_options(rescale):
    seed = torch.seed() % 2**63
    base = random_model(seed, shapes=((33, 7), (101,)))
    experts = random_experts(base, 2)
    p = [0.3, 0.6]
    out = dare(base, experts, scaling=1.0, drop_rate=p, seed=seed, rescale=rescale, weights=[1.0, 0.0])
    for key in float_keys(base):
        tau = experts[0][key] - base[key]
        keep = dare_keep_reference(seed, key, 0, base[key].shape, p[0])
        masked = torch.where(keep, tau, 0.0)
        if rescale == "inverse":
            expected = torch.where(keep, tau / (1 - p[0]), 0.0)
        elif rescale == "l1":
            expected = masked * (tau.abs().sum() / masked.abs().sum())
            # the L1 norm is preserved up to fp32 summation error
            assert abs(float(expected.abs().sum()) - float(tau.abs().sum())) <= 1e-5 * float(tau.abs().sum())
        else:
            expected = masked
        assert_close(out[key], base[key] + expected, atol=4 * EPS32 * 8, rtol=0.0), f"seed {seed}"


def test_keys_policies():
    base = {"a": t(0.0, 0.0), "b": t(1.0), "c": t(2.0)}
    experts = [{"a": t(2.0, 4.0), "b": t(3.0), "d": t(7.0)}, {"a": t(4.0, 0.0), "b": t(5.0), "c": t(4.0), "d": t(9.0)}]
    with pytest.raises(ValueError, match=r"experts\[0\] does not have the keys of base: missing \['c'\], "
                                         r"unexpected \['d'\]"):
        task_arithmetic(base, experts, 1.0)
    inter = task_arithmetic(base, experts, 1.0, keys="intersection")
    assert list(inter) == ["a", "b"] and torch.equal(inter["a"], t(6.0, 4.0)) and torch.equal(inter["b"], t(7.0))
    union = task_arithmetic(base, experts, 0.5, keys="union")
    assert list(union) == ["a", "b", "c", "d"]
    assert torch.equal(union["c"], t(3.0))          # experts[0] has no "c": zero task vector there
    assert torch.equal(union["d"], t(8.0))          # the base has no "d": the experts' average
    averaged = weight_average(experts, keys="union", weights=[1.0, 3.0])
    assert list(averaged) == ["a", "b", "d", "c"] and torch.equal(averaged["c"], t(4.0))
    for out in (ties_merging(base, experts, 1.0, 1.0, keys="union"), dare(base, experts, 1.0, 0.0, keys="union")):
        assert torch.equal(out["c"], t(4.0)) and torch.equal(out["d"], t(8.0))


def test_promote_dtypes():
    base = {"w": t(1.0, 2.0, dtype=torch.bfloat16)}
    experts = [{"w": t(1.5, 2.0, dtype=torch.float32)}, {"w": t(1.0, 3.0, dtype=torch.bfloat16)}]
    with pytest.raises(TypeError, match=r"experts\[0\]\['w'\] has dtype torch.float32, base\['w'\] has "
                                        r"torch.bfloat16 \(promote_dtypes=True"):
        task_arithmetic(base, experts)
    out = task_arithmetic(base, experts, 1.0, promote_dtypes=True)
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], t(1.5, 3.0))
    with pytest.raises(TypeError, match="a float entry cannot be merged with a non-float one"):
        task_arithmetic(base, [{"w": torch.tensor([1, 2])}], promote_dtypes=True)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weights=[1.0]), ValueError, r"weights must be one number or 2"),
    (dict(weights=[1.0, float("nan")]), ValueError, r"weights\[1\] must be finite"),
    (dict(density=[0.2, 1.5], ties=True), ValueError, r"density\[1\] must be in \(0, 1\]"),
    (dict(drop_rate=[0.2, 1.0]), ValueError, r"drop_rate\[1\] must be in \[0, 1\)"),
    (dict(merge_func="median", ties=True), ValueError, r"merge_func must be one of \['mean', 'sum'\]"),
    (dict(rescale="l2"), ValueError, r"rescale must be one of"),
    (dict(keys="all"), ValueError, r"keys must be one of \['strict', 'intersection', 'union'\]"),
    (dict(non_float="first"), ValueError, r"non_float must be one of"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=1 << 64), ValueError, r"seed must be in \[0, 2\*\*64\)"),
])
def test_option_errors(kwargs, error, match):
    base = random_model()
    with pytest.raises(error, match=match):
        dare(base, random_experts(base, 2), **kwargs)


def test_weight_average_weights_summing_to_zero():
    base = random_model()
    with pytest.raises(ValueError, match="weights must not sum to 0"):
        weight_average(random_experts(base, 2), weights=[1.0, -1.0])


def test_zero_size_and_scalar_entries():
    base = {"empty": torch.zeros(0, 4), "scalar": torch.tensor(1.0), "w": t(1.0, -1.0)}
    experts = [{"empty": torch.zeros(0, 4), "scalar": torch.tensor(2.0), "w": t(2.0, 1.0)}] * 2
    for out in (task_arithmetic(base, experts, 0.5), ties_merging(base, experts, 0.5, 1.0),
                dare(base, experts, 0.5, 0.0), dare(base, experts, 0.5, 0.3, ties=True, density=1.0),
                weight_average(experts), task_arithmetic(base, experts, 0.5, weights=[1.0, 0.0])):
        assert out["empty"].shape == (0, 4) and out["scalar"].shape == ()
    assert torch.equal(task_arithmetic(base, experts, 0.5)["scalar"], torch.tensor(2.0))


def test_exact_count_ties_do_not_depend_on_the_key_order(fresh_seed):
    """bf16 task vectors tie at the threshold across tensors; which tied entries are kept follows
    the sorted key names, so the same tensors listed in another order merge alike."""
    gen = torch.Generator().manual_seed(fresh_seed & 0x7FFFFFFF)
    base = {name: torch.zeros(n, dtype=torch.bfloat16) for name, n in (("b", 301), ("a", 257), ("c", 129))}
    experts = [{name: (torch.randint(-3, 4, t.shape, generator=gen) * 0.25).to(torch.bfloat16)
                for name, t in base.items()} for _ in range(2)]

    def reordered(state):
        return {key: state[key] for key in reversed(list(state))}

    forward = merging.ties_merging(base, experts, density=0.35, exact_count=True)
    backward = merging.ties_merging(reordered(base), [reordered(e) for e in experts], density=0.35, exact_count=True)
    for key in base:
        assert torch.equal(forward[key], backward[key]), (key, fresh_seed)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("exact_count", [False, True])
def test_density_one_keeps_all_without_selecting(per_tensor, exact_count, monkeypatch):
    """density 1 (mergekit's dare_ties) skips the top-k selection; the result is the selection's,
    bit for bit, NaN entries dropped at the trim included."""
    from mergopt_kernels.merge import sparsify

    gen = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(100, 7, generator=gen), "b": torch.randn(33, generator=gen).bfloat16()}
    experts = [{k: v + (0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()}
               for _ in range(3)]
    experts[1]["a"][3, 2] = float("nan")
    experts[2]["a"][5, 1] = float("inf")

    def merges():
        options = dict(per_tensor=per_tensor, exact_count=exact_count, allow_non_finite=True)
        return [ties_merging(base, experts, 1.0, 1.0, **options),
                dare(base, experts, 1.0, drop_rate=0.3, ties=True, density=1.0, **options)]

    shortcut = merges()
    monkeypatch.setattr(sparsify, "keeps_all", lambda density, n, rounding: False)
    for fast, selected in zip(shortcut, merges()):
        for key in fast:
            assert torch.equal(fast[key].view(torch.int16 if fast[key].dtype == torch.bfloat16 else torch.int32),
                               selected[key].view(torch.int16 if fast[key].dtype == torch.bfloat16 else torch.int32))
