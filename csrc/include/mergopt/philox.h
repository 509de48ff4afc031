// Philox4x32-10 (Random123, cuRAND curand_Philox4x32_10, Triton tl.philox) and the counter
// layout of the MergOPT noise stream (mergopt_kernels/noise.py is the specification).
#pragma once

#include "mergopt/config.h"

namespace mergopt {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// Counter word c3 reserved for the per-step scale; parameter ids stay below it.
constexpr uint32_t kScaleStream = 0xFFFFFFFFu;

struct PhiloxKey {
  uint32_t k0;
  uint32_t k1;
};

// Key of a 64-bit seed: (low 32 bits, high 32 bits).
MERGOPT_HOST_DEVICE MERGOPT_INLINE PhiloxKey philox_key(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// Ten rounds on the counter (c0, c1, c2, c3) in place; the four words are the output.
MERGOPT_HOST_DEVICE MERGOPT_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                                      PhiloxKey key) {
  uint32_t k0 = key.k0;
  uint32_t k1 = key.k1;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
#if defined(__CUDA_ARCH__)
    const uint32_t hi0 = __umulhi(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = __umulhi(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
#else
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(p1);
#endif
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The four words of element group G = i >> 2 of parameter `param_id` at step `step`:
// counter (G & 0xffffffff, G >> 32, step, param_id); element i takes word i & 3.
MERGOPT_HOST_DEVICE MERGOPT_INLINE void element_group_words(PhiloxKey key, uint64_t group, uint32_t step,
                                                            uint32_t param_id, uint32_t& w0, uint32_t& w1,
                                                            uint32_t& w2, uint32_t& w3) {
  w0 = static_cast<uint32_t>(group);
  w1 = static_cast<uint32_t>(group >> 32);
  w2 = step;
  w3 = param_id;
  philox4x32_10(w0, w1, w2, w3, key);
}

}  // namespace mergopt
