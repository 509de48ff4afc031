"""An independent numpy implementation of the noise stream's words, for bit-exact replay.

Written from the Random123 definition with uint64 arithmetic, sharing no code with the package.
"""

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
LOW = np.uint64(0xFFFFFFFF)
THIRTY_TWO = np.uint64(32)


def philox(key0, key1, c0, c1, c2, c3):
    """Philox4x32-10 over arrays of counters; returns four uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint64) & LOW for x in np.broadcast_arrays(c0, c1, c2, c3)]
    k0, k1 = np.uint64(key0), np.uint64(key1)
    for _ in range(10):
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        c = [((p1 >> THIRTY_TWO) ^ c[1] ^ k0) & LOW, p1 & LOW,
             ((p0 >> THIRTY_TWO) ^ c[3] ^ k1) & LOW, p0 & LOW]
        k0, k1 = (k0 + W0) & LOW, (k1 + W1) & LOW
    return [x.astype(np.uint32) for x in c]


def element_words(seed, param_id, step, indices):
    """The word of each element index (uint32 array) of one parameter at one step."""
    indices = np.asarray(indices, dtype=np.uint64)
    groups = indices >> np.uint64(2)
    words = philox(seed & 0xFFFFFFFF, seed >> 32, groups & LOW, groups >> THIRTY_TWO, step, param_id)
    return np.choose((indices & np.uint64(3)).astype(np.int64), words)


def laplace(words, loc, scale):
    """Laplace samples in float64 from uint32 words (the 24-bit inverse CDF of the stream)."""
    u = ((words >> 8).astype(np.float64) + 0.5) / 2.0**24
    return loc - scale * np.sign(u - 0.5) * np.log(1.0 - 2.0 * np.abs(u - 0.5))


def step_scale(seed, step, alphas, k_max):
    w0, w1, _, _ = philox(seed & 0xFFFFFFFF, seed >> 32, step, 0, 0, 0xFFFFFFFF)
    alpha = alphas[(int(w0) * len(alphas)) >> 32]
    k = 1 + ((int(w1) * k_max) >> 32)
    return k, alpha


def gaussian(words, loc, scale):
    """Box-Muller samples in float64 from uint32 words whose consecutive pairs are (w0, w1), (w2, w3) of a call."""
    pairs = np.asarray(words, dtype=np.uint32).reshape(-1, 2)
    u1 = ((pairs[:, 0] >> 8).astype(np.float64) + 1.0) / 2.0**24
    u2 = (pairs[:, 1] >> 8).astype(np.float64) / 2.0**24
    radius = np.sqrt(-2.0 * np.log(u1))
    normal = np.stack([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return loc + scale * normal.reshape(-1)
