"""The noise stream: known-answer vectors, bit-exact replay across implementations, invariance
to chunking, edge words, and statistics."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
import triton
import triton.language as tl

from mergopt_kernels import noise
from mergopt_kernels.ops import triton_noise, triton_step

import numpy_philox

KAT = [  # Random123 kat_vectors: counter, key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@triton.jit
def _dump_kernel(words_ptr, noise_ptr, scale_ptr, alphas_ptr, seed, param_id, step, first_group,
                 loc, scale, n_alphas, k_max, BLOCK_G: tl.constexpr, GAUSSIAN: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    group = first_group + pid * BLOCK_G
    w0, w1, w2, w3 = triton_noise.group_words(seed, param_id, step, group, BLOCK_G)
    words = triton_noise.interleave4(w0, w1, w2, w3)
    offsets = pid * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    tl.store(words_ptr + offsets, words.to(tl.int64))
    z = triton_noise.element_noise(seed, param_id, step, group, loc, scale, BLOCK_G, GAUSSIAN)
    tl.store(noise_ptr + offsets, z)
    tl.store(scale_ptr + tl.arange(0, 1), triton_noise.step_scale(seed, step, alphas_ptr, n_alphas, k_max))


def triton_dump(seed, param_id, step, first_group, groups, block_g, distribution="laplace",
                loc=0.0, scale=1.0):
    """Words (int64), noise (fp32) of 4 * groups elements and s_t, from the Triton functions."""
    assert groups % block_g == 0
    words = torch.empty(4 * groups, dtype=torch.int64)
    values = torch.empty(4 * groups, dtype=torch.float32)
    step_scale = torch.empty(1, dtype=torch.float32)
    alphas = torch.tensor(ALPHAS, dtype=torch.float32)
    _dump_kernel[(groups // block_g,)](words, values, step_scale, alphas, noise.seed_as_int64(seed),
                                       param_id, step, first_group, loc, scale, len(ALPHAS), 7,
                                       BLOCK_G=block_g, GAUSSIAN=distribution == "gaussian")
    return words & 0xFFFFFFFF, values, float(step_scale)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answer_vectors(counter, key, expected):
    seed = key[0] | (key[1] << 32)
    assert tuple(int(w) for w in noise.philox4x32(seed, *counter)) == expected
    assert tuple(int(w) for w in numpy_philox.philox(key[0], key[1], *counter)) == expected


@triton.jit
def _kat_kernel(out_ptr, seed, c0, c1, c2, c3):
    zero = tl.zeros([1], dtype=tl.uint32)
    w0, w1, w2, w3 = triton_noise.philox(seed, zero + c0, zero + c1, zero + c2, zero + c3)
    tl.store(out_ptr + tl.arange(0, 1), w0.to(tl.int64))
    tl.store(out_ptr + 1 + tl.arange(0, 1), w1.to(tl.int64))
    tl.store(out_ptr + 2 + tl.arange(0, 1), w2.to(tl.int64))
    tl.store(out_ptr + 3 + tl.arange(0, 1), w3.to(tl.int64))


def triton_kat(counter, key):
    """The four words of triton_noise.philox for a counter (c0..c3) and key (k0, k1) of uint32 values."""
    seed = key[0] | (key[1] << 32)
    out = torch.zeros(4, dtype=torch.int64)
    signed_counter = [c - (1 << 32) if c >= 1 << 31 else c for c in counter]
    _kat_kernel[(1,)](out, noise.seed_as_int64(seed), *signed_counter)
    return tuple(int(w) & 0xFFFFFFFF for w in out)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answer_vectors_triton(counter, key, expected):
    assert triton_kat(counter, key) == expected


@pytest.mark.parametrize("start,count", [(0, 1), (3, 7), (1021, 4099), (2**33 + 5, 13)])
def test_torch_words_replay_numpy(fresh_seed, start, count):
    param_id, step = 17, 123456
    words = noise.element_words(fresh_seed, param_id, step, start, count).numpy().astype(np.uint32)
    expected = numpy_philox.element_words(fresh_seed, param_id, step, np.arange(start, start + count))
    np.testing.assert_array_equal(words, expected)


def ulp32(x):
    """The fp32 ulp of float64 values (as float64)."""
    return np.spacing(np.abs(np.asarray(x)).astype(np.float32)).astype(np.float64)


def transform_bound(exact, words, loc, scale, distribution):
    """The stated error bound of the Triton transforms against float64, per element.

    Laplace: one ulp of the scaled log plus the rounding of the final add (measured over the
    whole 24-bit grid: at most 0.81 ulp of the log). Gaussian: two ulps of the scaled value plus
    scale * radius * 2**-23 for the angle (measured: at most 0.74 of that; torch's fp32 Box-Muller,
    which rounds 2 pi u in fp32 first, reaches 3.5 times it).
    """
    bound = ulp32(exact - loc) + ulp32(exact)
    if distribution == "gaussian":
        pairs = np.asarray(words, dtype=np.uint32).reshape(-1, 2)
        radius = np.repeat(np.sqrt(-2.0 * np.log(((pairs[:, 0] >> 8) + 1.0) / 2.0**24)), 2)
        bound = 2 * ulp32(exact - loc) + ulp32(exact) + scale * radius * 2.0**-23
    return bound


@pytest.mark.parametrize("distribution", ["laplace", "gaussian"])
def test_triton_matches_torch_and_numpy(fresh_seed, distribution):
    first_group, groups = 2**31 - 3, 1024  # crosses the 32-bit boundary of the group counter
    words, values, step_scale = triton_dump(fresh_seed, 5, 9, first_group, groups, 256, distribution,
                                            loc=0.25, scale=2.0)
    start = 4 * first_group
    expected_words = numpy_philox.element_words(fresh_seed, 5, 9, np.arange(start, start + 4 * groups))
    np.testing.assert_array_equal(words.numpy().astype(np.uint32), expected_words)
    transform = numpy_philox.laplace if distribution == "laplace" else numpy_philox.gaussian
    exact = transform(expected_words, 0.25, 2.0)
    error = np.abs(values.double().numpy() - exact)
    assert (error <= transform_bound(exact, expected_words, 0.25, 2.0, distribution)).all()
    if distribution == "laplace":  # the same fp32 formula as torch's, up to the log's rounding
        reference = noise.element_noise(fresh_seed, 5, 9, start, 4 * groups, 0.25, 2.0, distribution)
        torch.testing.assert_close(values, reference, rtol=4 * 2.0**-23, atol=4 * 2.0**-23 * 2.0)
    assert step_scale == noise.step_scale(fresh_seed, 9, ALPHAS, 7)


@triton.jit
def _transform_kernel(words_a_ptr, words_b_ptr, out_ptr, GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words_a = tl.load(words_a_ptr + offsets).to(tl.uint32)
    if GAUSSIAN:
        a, b = triton_noise._gaussian_pair(words_a, tl.load(words_b_ptr + offsets).to(tl.uint32), 0.0, 1.0)
        tl.store(out_ptr + 2 * offsets, a)
        tl.store(out_ptr + 2 * offsets + 1, b)
    else:
        tl.store(out_ptr + offsets, triton_noise._laplace(words_a, 0.0, 1.0))


def triton_transform(words_a, words_b, distribution):
    """Laplace of words_a, or the Box-Muller pairs of (words_a, words_b), from the Triton
    functions (int64 tensors of uint32 words whose length is a multiple of 2**16)."""
    block = 1 << 16 if triton_step.interpreted() else 1024  # the interpreter pays per program
    gaussian = distribution == "gaussian"
    out = torch.empty(len(words_a) * (2 if gaussian else 1))
    _transform_kernel[(len(words_a) // block,)](words_a.to(torch.int32), words_b.to(torch.int32), out,
                                                GAUSSIAN=gaussian, BLOCK=block)
    return out.double().numpy()


def test_triton_laplace_error_over_the_grid():
    # The transform sees only w >> 8: 2**24 values. Every third of them, and both ends (the
    # whole grid, 2**24 values, gave at most 0.81 ulp when the bound was measured).
    grid = torch.cat([torch.arange(0, 1 << 24, 3), torch.tensor([(1 << 24) - 1])])
    grid = torch.cat([grid, grid[-1].repeat((-len(grid)) % (1 << 16))])
    words = grid.to(torch.int64) << 8
    ours = triton_transform(words, words, "laplace")
    exact = numpy_philox.laplace(words.numpy().astype(np.uint32), 0.0, 1.0)
    assert np.abs(ours - exact).max() / 2.0**-24 < 9  # |z| <= 16.6: never more than 8 ulps of 1 away
    assert (np.abs(ours - exact) <= ulp32(exact)).all()


def test_triton_gaussian_error(fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed & 0x7FFFFFFFFFFFFFFF)
    words = torch.randint(0, 1 << 32, (2, 1 << 20), generator=generator, dtype=torch.int64)
    words[0, :1024] = 0xFFFFFFFF  # u1 = 1 - small: radius 0; and u1 = 2**-24 below: the largest radius
    words[0, 1024:2048] = 0
    words[1, :4096] = torch.arange(4096) << 20  # angles on a grid through every quadrant boundary
    ours = triton_transform(words[0], words[1], "gaussian")
    interleaved = words.T.reshape(-1).numpy().astype(np.uint32)
    exact = numpy_philox.gaussian(interleaved, 0.0, 1.0)
    assert (np.abs(ours - exact) <= transform_bound(exact, interleaved, 0.0, 1.0, "gaussian")).all()


def test_laplace_matches_float64_inverse_cdf(fresh_seed):
    words = noise.element_words(fresh_seed, 0, 1, 0, 100_003)
    ours = noise.laplace_from_words(words, 0.0, 1.0).double().numpy()
    exact = numpy_philox.laplace(words.numpy().astype(np.uint32), 0.0, 1.0)
    # fp32 evaluation of log near 1 - 2|d|: absolute error of a few ulps of 1.
    np.testing.assert_allclose(ours, exact, rtol=2.0**-21, atol=2.0**-22)


@pytest.mark.parametrize("block_g", [16, 64, 256])
def test_noise_independent_of_block_size(block_g, fresh_seed):
    _, values, _ = triton_dump(fresh_seed, 3, 4, 100, 512, block_g)
    _, baseline, _ = triton_dump(fresh_seed, 3, 4, 100, 512, 512)
    assert torch.equal(values, baseline)


def test_noise_independent_of_chunking(fresh_seed):
    whole = noise.element_noise(fresh_seed, 2, 7, 0, 10_001, 0.0, 1.0, "gaussian")
    cuts = [0, 1, 6, 4097, 5000, 10_001]
    parts = [noise.element_noise(fresh_seed, 2, 7, a, b - a, 0.0, 1.0, "gaussian") for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole)


def test_extreme_words_give_finite_noise():
    edge = torch.tensor([0, 1, 0xFF, 0x100, 0x7FFFFFFF, 0x80000000, 0x800000FF, 0xFFFFFF00, 0xFFFFFFFF],
                        dtype=torch.int64)
    laplace = noise.laplace_from_words(edge, 0.0, 1.0)
    assert torch.isfinite(laplace).all()
    # The extreme words reach the ends of the 24-bit grid: |z| = -log(2**-24) = 24 log 2.
    assert laplace.abs().max().item() == pytest.approx(24 * math.log(2), rel=1e-6)
    pairs = torch.stack([edge, edge.flip(0)], dim=1).reshape(-1)
    assert torch.isfinite(noise.gaussian_from_words(pairs, 0.0, 1.0)).all()


@triton.jit
def _edge_kernel(words_ptr, out_ptr, BLOCK: tl.constexpr):
    words = tl.load(words_ptr + tl.arange(0, BLOCK)).to(tl.uint32)
    tl.store(out_ptr + tl.arange(0, BLOCK), triton_noise._laplace(words, 0.0, 1.0))
    a, b = triton_noise._gaussian_pair(words, words, 0.0, 1.0)
    tl.store(out_ptr + BLOCK + tl.arange(0, BLOCK), a)
    tl.store(out_ptr + 2 * BLOCK + tl.arange(0, BLOCK), b)


EDGE_WORDS = (0, 1, 0xFF, 0x100, 0x7FFFFFFF, 0x80000000, 0xFFFFFF00, 0xFFFFFFFF)


def triton_edge_noise(words):
    """Laplace, then the two Box-Muller outputs of (w, w), of a power-of-two count of words (fp32)."""
    edge = torch.tensor(words, dtype=torch.int64).to(torch.int32)
    out = torch.empty(3 * len(words))
    _edge_kernel[(1,)](edge, out, BLOCK=len(words))
    return out


def test_extreme_words_triton():
    assert torch.isfinite(triton_edge_noise(EDGE_WORDS)).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("distribution,cdf", [("laplace", scipy.stats.laplace.cdf), ("gaussian", scipy.stats.norm.cdf)])
def test_distribution_ks_and_scale(fresh_seed, distribution, cdf, backend):
    n = 196_608  # three programs of 2**16 elements in the interpreter
    if backend == "torch":
        z = noise.element_noise(fresh_seed, 11, 3, 0, n, 0.0, 1.0, distribution).double().numpy()
    else:
        z = triton_dump(fresh_seed, 11, 3, 0, n // 4, n // 12, distribution)[1].double().numpy()
    statistic = scipy.stats.kstest(z, cdf).statistic
    # Kolmogorov bound: P(sqrt(n) D > 1.95) ~ 1e-3; the 24-bit grid adds < 1e-6.
    assert statistic < 1.95 / math.sqrt(n)
    expected_mad = 1.0 if distribution == "laplace" else math.sqrt(2 / math.pi)
    # Standard error of the mean absolute value is below 1.5 / sqrt(n) for both.
    assert abs(np.abs(z).mean() - expected_mad) < 6 * 1.5 / math.sqrt(n)
    assert abs(z.mean()) < 6 * 1.5 / math.sqrt(n)


def test_no_correlation_between_neighbours_params_and_steps(fresh_seed):
    n = 100_000
    base = noise.element_noise(fresh_seed, 0, 1, 0, n + 4, 0.0, 1.0, "laplace").double().numpy()
    others = {
        "neighbour": base[1:n + 1], "same word next group": base[4:n + 4],
        "next param": noise.element_noise(fresh_seed, 1, 1, 0, n, 0.0, 1.0, "laplace").double().numpy(),
        "next step": noise.element_noise(fresh_seed, 0, 2, 0, n, 0.0, 1.0, "laplace").double().numpy(),
        "next seed": noise.element_noise(fresh_seed ^ 1, 0, 1, 0, n, 0.0, 1.0, "laplace").double().numpy(),
    }
    for name, other in others.items():
        correlation = np.corrcoef(base[:n], other)[0, 1]
        assert abs(correlation) < 6 / math.sqrt(n), name  # 6 standard errors of a null correlation


def test_step_scale_matches_numpy_and_covers_the_grid(fresh_seed):
    seen = set()
    for step in range(1, 400):
        k, alpha = numpy_philox.step_scale(fresh_seed, step, ALPHAS, 7)
        expected = float(np.float32(np.float32(k) * np.float32(alpha)) - np.float32(1.0))
        assert noise.step_scale(fresh_seed, step, ALPHAS, 7) == expected
        seen.add((k, alpha))
    # 42 equally likely (K, alpha) pairs in 399 draws: all but a handful appear.
    assert len(seen) >= 38
    assert all(1 <= k <= 7 for k, _ in seen)


def aot_launches(record):
    """The launches this file's kernels make, recorded by ``record(kernel, launch, label)`` of
    ``tools/triton_aot.py`` for the ahead-of-time compile test."""
    launches = []
    for block_g in (16, 64, 256):
        for distribution in ("laplace", "gaussian"):
            for seed in (12345, 2**64 - 3):  # int32 and int64 seed arguments
                launches += record(_dump_kernel, lambda: triton_dump(seed, 5, 9, 2**31 - 3, 256, block_g, distribution),
                                   f"test _dump_kernel BLOCK_G={block_g} {distribution} seed={seed:#x}")
    for counter, key, _ in KAT:
        launches += record(_kat_kernel, lambda: triton_kat(counter, key), f"test _kat_kernel key={key}")
    launches += record(_edge_kernel, lambda: triton_edge_noise(EDGE_WORDS), "test _edge_kernel")
    words = torch.zeros(1 << 16, dtype=torch.int64)
    for distribution in ("laplace", "gaussian"):
        launches += record(_transform_kernel, lambda: triton_transform(words, words, distribution),
                           f"test _transform_kernel {distribution}")
    return launches
