"""The MergOPT noise stream: one definition, implemented here with torch tensor ops.

Every backend (this module, the Triton kernels in ``ops/triton_noise.py``, the C++/CUDA core in
``csrc/``) produces the same 32-bit words for the same element; the tests pin them together with
the Random123 known-answer vectors and a numpy replay.

Generator
    Philox4x32-10. Key ``(k0, k1) = (seed & 0xffffffff, seed >> 32)`` for a 64-bit ``seed``.

Element noise (parameter ``param_id``, step ``t``, element index ``i`` in the *whole*
flattened parameter, whatever shard or chunk holds it)
    counter ``(c0, c1, c2, c3) = (G & 0xffffffff, G >> 32, t, param_id)`` with ``G = i >> 2``;
    the element takes output word ``i & 3``. One Philox call serves four consecutive elements.
    ``param_id`` is the parameter's position in the optimizer's parameter list (all groups, in
    order), so it is stable across processes and across a save/load; it must be below
    ``SCALE_STREAM`` (0xffffffff), which is reserved for the step scale.

Step scale ``s_t = K_t * alpha_t - 1`` (shared by every parameter of step ``t``)
    words ``(w0, w1, _, _)`` of counter ``(t, 0, 0, SCALE_STREAM)``;
    ``alpha_t = alphas[(w0 * len(alphas)) >> 32]``, ``K_t = 1 + ((w1 * k_max) >> 32)``,
    ``s_t = fp32(fp32(K_t * fp32(alpha_t)) - 1)``.

Laplace (inverse CDF, 24-bit uniform grid, no 0 or 1, hence never inf or NaN)
    ``d = (2 * (w >> 8) - (2**24 - 1)) * 2**-25``  (``d = u - 1/2`` for ``u = ((w >> 8) + 1/2) / 2**24``;
    an odd multiple of 2**-25, exact in fp32),
    ``e = log(1 - 2|d|)`` (argument in [2**-24, 1 - 2**-24], exact in fp32),
    ``z = loc - scale * sign(d) * e``.

Gaussian (Box-Muller on the word pairs (w0, w1) and (w2, w3) of a call)
    ``u1 = ((wa >> 8) + 1) * 2**-24`` in (0, 1], ``u2 = (wb >> 8) * 2**-24`` in [0, 1),
    ``r = sqrt(-2 log u1)``, elements ``4G+0, 4G+1`` get ``loc + scale * r * (cos, sin)(2 pi u2)``
    from (w0, w1), elements ``4G+2, 4G+3`` the same from (w2, w3). ``scale`` is the std.

Perturbation of step ``t``: ``delta = s_t * z``, all in fp32. The parameters hold ``theta_t + delta``
while the forward/backward of step ``t`` runs; the first step is ``t = 1``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["philox4x32", "element_words", "laplace_from_words", "gaussian_from_words", "element_noise",
           "step_scale", "max_abs_perturbation", "DISTRIBUTIONS"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
SCALE_STREAM = 0xFFFFFFFF
MASK32 = 0xFFFFFFFF
DISTRIBUTIONS = ("laplace", "gaussian")

# Elements per chunk of the torch implementation: large enough to amortise per-op overhead,
# small enough that a chunk's temporaries stay in cache.
TORCH_CHUNK = 1 << 16


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hi and lo 32-bit words of ``a * m`` for int64 tensors holding uint32 values.

    The 64-bit product would overflow int64, so ``m`` is split into 16-bit halves.
    """
    m_hi, m_lo = m >> 16, m & 0xFFFF
    part_lo = a * m_lo                      # < 2**48
    part_hi = a * m_hi                      # < 2**48
    low_sum = part_lo + ((part_hi & 0xFFFF) << 16)
    lo = low_sum & MASK32
    hi = (part_hi >> 16) + (low_sum >> 32)
    return hi, lo


def philox4x32(seed: int, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors (or ints) holding uint32 counter words.

    Args:
        seed: 64-bit key, ``0 <= seed < 2**64``.
        c0..c3: counter words, broadcastable int64 tensors or Python ints in [0, 2**32).
    Returns:
        Four int64 tensors of the broadcast shape holding the uint32 output words.
    """
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def element_words(seed: int, param_id: int, step: int, start: int, count: int) -> torch.Tensor:
    """The 32-bit words of elements ``start .. start+count-1`` of a parameter, as int64 [count]."""
    first_group, last_group = start >> 2, (start + count - 1) >> 2
    groups = torch.arange(first_group, last_group + 1, dtype=torch.int64)
    words = torch.stack(philox4x32(seed, groups & MASK32, groups >> 32, step, param_id), dim=1)
    offset = start - 4 * first_group
    return words.reshape(-1)[offset:offset + count]


def laplace_from_words(words: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    """Laplace(loc, scale) samples (fp32, same shape) from int64 tensors of uint32 words."""
    d = (2 * (words >> 8) - (2**24 - 1)).to(torch.float32) * 2.0**-25
    e = torch.log(1.0 - 2.0 * d.abs())
    return loc - scale * torch.where(d < 0, -e, e)


def gaussian_from_words(words: torch.Tensor, loc: float, scale: float) -> torch.Tensor:
    """Normal(loc, scale) samples (fp32) by Box-Muller on word pairs.

    ``words`` has a last dimension of even length whose pairs are (w0, w1), (w2, w3) of one call.
    """
    pairs = words.reshape(*words.shape[:-1], -1, 2)
    u1 = ((pairs[..., 0] >> 8) + 1).to(torch.float32) * 2.0**-24
    u2 = (pairs[..., 1] >> 8).to(torch.float32) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    normal = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return loc + scale * normal.reshape(words.shape)


def element_noise(seed: int, param_id: int, step: int, start: int, count: int,
                  loc: float, scale: float, distribution: str) -> torch.Tensor:
    """Noise z of elements ``start .. start+count-1`` of a parameter, fp32 [count] on the CPU."""
    if distribution == "laplace":
        return laplace_from_words(element_words(seed, param_id, step, start, count), loc, scale)
    # Box-Muller pairs words within a call: generate whole calls, then slice.
    first = start & ~3
    stop = ((start + count + 3) >> 2) << 2
    words = element_words(seed, param_id, step, first, stop - first)
    return gaussian_from_words(words, loc, scale)[start - first:start - first + count]


def step_scale(seed: int, step: int, alphas, k_max: int) -> float:
    """s_t = K_t * alpha_t - 1 as an fp32 value (a Python float holding it exactly)."""
    w0, w1, _, _ = philox4x32(seed, step, 0, 0, SCALE_STREAM)
    alpha_index = (int(w0) * len(alphas)) >> 32
    k = 1 + ((int(w1) * k_max) >> 32)
    product = torch.tensor(k, dtype=torch.float32) * torch.tensor(alphas[alpha_index], dtype=torch.float32)
    return float(product - 1.0)


# The largest |z - loc| / scale any word can give: the 24-bit uniform grid stops 2**-24 from 0 and 1.
LAPLACE_MAX_DEVIATION = 24 * math.log(2.0)                # -log(2**-24)
GAUSSIAN_MAX_DEVIATION = math.sqrt(2 * 24 * math.log(2.0))  # sqrt(-2 log(2**-24))


def max_abs_perturbation(scale: float, loc: float, alphas, k_max: int, distribution: str) -> float:
    """An upper bound (a little above, for fp32 rounding) of ``|s_t z|`` over every step and
    element for these noise options: ``max|s| * (|loc| + scale * max deviation)``."""
    deviation = LAPLACE_MAX_DEVIATION if distribution == "laplace" else GAUSSIAN_MAX_DEVIATION
    largest_s = max(abs(k_max * max(alphas) - 1.0), abs(min(alphas) - 1.0))
    return largest_s * (abs(loc) + scale * deviation) * (1.0 + 2.0**-20)


def seed_as_int64(seed: int) -> int:
    """The int64 whose two's-complement bits are the 64-bit ``seed``: how kernels take it."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed
