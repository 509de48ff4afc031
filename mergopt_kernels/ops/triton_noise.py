"""The noise stream of ``mergopt_kernels.noise`` as Triton device functions.

Same counters, same words, same fp32 transforms; see the docstring of ``noise.py`` for the
definition. ``philox`` is Philox4x32-10 with key (seed lo32, seed hi32), the words of
``tl.philox``, written with one 32x32->64-bit multiply per product instead of ``tl.philox``'s
separate high and low multiplies (one IMAD.WIDE instead of two instructions).

The transforms use their own short ``log``, ``sin`` and ``cos`` (plain fp32 arithmetic, so the
interpreter runs exactly the code a GPU runs) instead of libdevice's general ones: their
arguments are known to be positive normal numbers, or angles 2 pi u with u in [0, 1). Error
against float64 (``python_tests/test_noise.py``; the interpreter evaluates without contracted
multiply-adds, the GPU with them):
- Laplace: at most 0.81 ulp of the log over all 2**24 values of the grid (torch's fp32 log:
  0.88 ulp), bounded by one ulp in the tests; the fp32 transform of torch's backend and this
  one differ by at most 4 ulps.
- Gaussian: at most 0.74 of (2 ulps + radius * 2**-23) on 4M random pairs and the extreme
  words; torch's fp32 Box-Muller, which rounds 2 pi u to fp32 before its cos/sin, reaches 3.5
  times that bound, so the two backends differ by up to about 1.7e-6 * scale.
Both keep the K-S statistic of the stream below the Kolmogorov bound (tested on 196608 draws).
"""

import triton
import triton.language as tl

from .. import noise

# The stream's constants, defined once in noise.py.
SCALE_STREAM = tl.constexpr(noise.SCALE_STREAM)
PHILOX_M0 = tl.constexpr(noise.PHILOX_M0)
PHILOX_M1 = tl.constexpr(noise.PHILOX_M1)
PHILOX_W0 = tl.constexpr(noise.PHILOX_W0)
PHILOX_W1 = tl.constexpr(noise.PHILOX_W1)
PHILOX_ROUNDS = tl.constexpr(noise.PHILOX_ROUNDS)
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def philox(seed, c0, c1, c2, c3):
    """Philox4x32-10 of uint32 counter tensors under the 64-bit ``seed``: four uint32 tensors."""
    seed = tl.cast(seed, tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        product0 = c0.to(tl.uint64) * PHILOX_M0
        product2 = c2.to(tl.uint64) * PHILOX_M1
        c0, c1, c2, c3 = ((product2 >> 32).to(tl.uint32) ^ c1 ^ k0, product2.to(tl.uint32),
                          (product0 >> 32).to(tl.uint32) ^ c3 ^ k1, product0.to(tl.uint32))
        k0 += PHILOX_W0
        k1 += PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _uniform24(word):
    """The top 24 bits of a uint32 word as an fp32 integer value in [0, 2**24)."""
    return (word >> 8).to(tl.int32).to(tl.float32)


@triton.jit
def _log(x):
    """Natural log of positive normal fp32 values (cephes logf: the exponent split so that the
    mantissa m lies in [sqrt(1/2), sqrt(2)), then log(m) = f - f^2/2 + f^3 P(f), f = m - 1)."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = (bits - 0x3F3504F3) >> 23                       # arithmetic shift: floor
    f = (bits - (exponent << 23)).to(tl.float32, bitcast=True) - 1.0
    e = exponent.to(tl.float32)
    p = 7.0376836292e-2 * f - 1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f - 1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f - 1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f - 2.4999993993e-1
    p = p * f + 3.3333331174e-1
    f2 = f * f
    y = (p * f) * f2 - 2.12194440e-4 * e - 0.5 * f2            # ln 2 = 0.693359375 - 2.12194440e-4
    return (f + y) + 0.693359375 * e


@triton.jit
def _sincos_2pi(u):
    """(sin, cos) of 2 pi u for fp32 u in [0, 1) holding a multiple of 2**-24: the quarter
    turn q = round(4u) is split off exactly, then Taylor series on |angle| <= pi/4."""
    q = tl.floor(4.0 * u + 0.5)
    a = (u - 0.25 * q) * TWO_PI                                   # u - q/4 is exact
    a2 = a * a
    s = 2.7557319e-06 * a2 - 1.9841270e-04
    s = s * a2 + 8.3333333e-03
    s = s * a2 - 1.6666667e-01
    s = a + a * a2 * s
    c = -2.7557319e-07 * a2 + 2.4801587e-05
    c = c * a2 - 1.3888889e-03
    c = c * a2 + 4.1666667e-02
    c = c * a2 - 0.5
    c = 1.0 + a2 * c
    quarter = q.to(tl.int32) & 3
    sin = tl.where((quarter & 1) == 1, c, s)
    cos = tl.where((quarter & 1) == 1, s, c)
    sin = tl.where(quarter >= 2, -sin, sin)
    cos = tl.where((quarter == 1) | (quarter == 2), -cos, cos)
    return sin, cos


@triton.jit
def _laplace(word, loc, scale):
    d = (2.0 * _uniform24(word) - 16777215.0) * 2.9802322387695312e-08  # 2**-25, exact
    e = _log(1.0 - 2.0 * tl.abs(d))
    return loc - scale * tl.where(d < 0, -e, e)


@triton.jit
def _gaussian_pair(word_a, word_b, loc, scale):
    u1 = (_uniform24(word_a) + 1.0) * 5.960464477539063e-08  # 2**-24
    u2 = _uniform24(word_b) * 5.960464477539063e-08
    radius = tl.sqrt(-2.0 * _log(u1))
    sin, cos = _sincos_2pi(u2)
    return loc + scale * (radius * cos), loc + scale * (radius * sin)


@triton.jit
def group_words(seed, param_id, step, first_group, BLOCK_G: tl.constexpr):
    """The four words of each of the BLOCK_G groups from ``first_group`` on (uint32 [BLOCK_G] x4)."""
    groups = first_group + tl.arange(0, BLOCK_G).to(tl.int64)
    c0 = (groups & 0xFFFFFFFF).to(tl.uint32)
    c1 = (groups >> 32).to(tl.uint32)
    c2 = tl.zeros([BLOCK_G], dtype=tl.uint32) + step.to(tl.uint32)
    c3 = tl.zeros([BLOCK_G], dtype=tl.uint32) + param_id.to(tl.uint32)
    return philox(seed, c0, c1, c2, c3)


@triton.jit
def interleave4(x0, x1, x2, x3):
    """[BLOCK] x4 -> [4 * BLOCK] in element order x0[0], x1[0], x2[0], x3[0], x0[1], ..."""
    return tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))


@triton.jit
def element_noise(seed, param_id, step, first_group, loc, scale,
                  BLOCK_G: tl.constexpr, GAUSSIAN: tl.constexpr):
    """Noise of the 4 * BLOCK_G elements starting at global index 4 * first_group, fp32.

    One Philox call per group of four consecutive elements.
    """
    w0, w1, w2, w3 = group_words(seed, param_id, step, first_group, BLOCK_G)
    if GAUSSIAN:
        z0, z1 = _gaussian_pair(w0, w1, loc, scale)
        z2, z3 = _gaussian_pair(w2, w3, loc, scale)
    else:
        z0 = _laplace(w0, loc, scale)
        z1 = _laplace(w1, loc, scale)
        z2 = _laplace(w2, loc, scale)
        z3 = _laplace(w3, loc, scale)
    return interleave4(z0, z1, z2, z3)


@triton.jit
def step_scale(seed, step, alphas_ptr, n_alphas, k_max):
    """s_t = K_t * alpha_t - 1 for step t, as an fp32 tensor of shape [1]."""
    c0 = tl.zeros([1], dtype=tl.uint32) + step.to(tl.uint32)
    zero = tl.zeros([1], dtype=tl.uint32)
    w0, w1, _, _ = philox(seed, c0, zero, zero, zero + SCALE_STREAM)
    alpha_index = (w0.to(tl.uint64) * n_alphas.to(tl.uint64)) >> 32
    k = 1 + ((w1.to(tl.uint64) * k_max.to(tl.uint64)) >> 32)
    alpha = tl.load(alphas_ptr + alpha_index.to(tl.int64))
    return k.to(tl.float32) * alpha - 1.0
