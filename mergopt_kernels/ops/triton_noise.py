"""The noise stream of ``mergopt_kernels.noise`` as Triton device functions.

Same counters, same words, same fp32 transforms; see the docstring of ``noise.py`` for the
definition. ``tl.philox`` is Triton's Philox4x32-10 with key (seed lo32, seed hi32).
"""

import triton
import triton.language as tl

SCALE_STREAM = tl.constexpr(0xFFFFFFFF)
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _uniform24(word):
    """The top 24 bits of a uint32 word as an fp32 integer value in [0, 2**24)."""
    return (word >> 8).to(tl.int32).to(tl.float32)


@triton.jit
def _laplace(word, loc, scale):
    d = (2.0 * _uniform24(word) - 16777215.0) * 2.9802322387695312e-08  # 2**-25, exact
    e = tl.log(1.0 - 2.0 * tl.abs(d))
    return loc - scale * tl.where(d < 0, -e, e)


@triton.jit
def _gaussian_pair(word_a, word_b, loc, scale):
    u1 = (_uniform24(word_a) + 1.0) * 5.960464477539063e-08  # 2**-24
    u2 = _uniform24(word_b) * 5.960464477539063e-08
    radius = tl.sqrt(-2.0 * tl.log(u1))
    angle = TWO_PI * u2
    return loc + scale * (radius * tl.cos(angle)), loc + scale * (radius * tl.sin(angle))


@triton.jit
def group_words(seed, param_id, step, first_group, BLOCK_G: tl.constexpr):
    """The four words of each of the BLOCK_G groups from ``first_group`` on (uint32 [BLOCK_G] x4)."""
    groups = first_group + tl.arange(0, BLOCK_G).to(tl.int64)
    c0 = (groups & 0xFFFFFFFF).to(tl.uint32)
    c1 = (groups >> 32).to(tl.uint32)
    c2 = tl.zeros([BLOCK_G], dtype=tl.uint32) + step.to(tl.uint32)
    c3 = tl.zeros([BLOCK_G], dtype=tl.uint32) + param_id.to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3)


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
    w0, w1, _, _ = tl.philox(seed, c0, zero, zero, zero + SCALE_STREAM)
    alpha_index = (w0.to(tl.uint64) * n_alphas.to(tl.uint64)) >> 32
    k = 1 + ((w1.to(tl.uint64) * k_max.to(tl.uint64)) >> 32)
    alpha = tl.load(alphas_ptr + alpha_index.to(tl.int64))
    return k.to(tl.float32) * alpha - 1.0
