// Word -> noise transforms and the per-step scale of the MergOPT noise stream.
//
// mergopt_kernels/noise.py is the specification. The transcendental functions are our own
// (branch-free, so host loops vectorize, and the same code runs on the device): the host and
// the CUDA kernels produce bit-identical noise when compiled without FMA contraction
// (-ffp-contract=off, nvcc --fmad=false). Each is within 1 ulp of the exact value on its whole
// domain (the ctest tests check every input the transforms can produce).
#pragma once

#include <math.h>

#include "mergopt/config.h"
#include "mergopt/philox.h"

namespace mergopt {

enum class Distribution : int { kLaplace = 0, kGaussian = 1 };

// Constants of the transforms, shared by the scalar code below and the AVX2/AVX-512 kernels.
namespace transform_constants {
// log_unit: x = 2**k * (1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)).
constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;  // sqrt(2)/2
constexpr float kLn2Hi = 6.9313812256e-01f;  // 0x3f317180: k * kLn2Hi is exact
constexpr float kLn2Lo = 9.0580006145e-06f;  // 0x3717f7d1
constexpr float kLg1 = 0xaaaaaa.0p-24f;
constexpr float kLg2 = 0xccce13.0p-25f;
constexpr float kLg3 = 0x91e9ee.0p-25f;
constexpr float kLg4 = 0xf89e26.0p-26f;
// sincos_small
constexpr double kInvPio2 = 6.36619772367581382433e-01;
constexpr double kPio2Hi = 1.57079631090164184570e+00;  // 33 bits: q * kPio2Hi is exact
constexpr double kPio2Lo = 1.58932547735281966916e-08;
constexpr double kS1 = -0x15555554cbac77.0p-55;
constexpr double kS2 = 0x111110896efbb2.0p-59;
constexpr double kS3 = -0x1a00f9e2cae774.0p-65;
constexpr double kS4 = 0x16cd878c3b46a7.0p-71;
constexpr double kC0 = -0x1ffffffd0c5e81.0p-54;
constexpr double kC1 = 0x155553e1053a42.0p-57;
constexpr double kC2 = -0x16c087e80f1e27.0p-62;
constexpr double kC3 = 0x199342e0ee5069.0p-68;
}  // namespace transform_constants

// Natural log for x in [2**-24, 1] (positive normal numbers; that is every argument the
// transforms produce). musl's logf (FreeBSD e_logf.c): x = 2**k * (1 + f), 1 + f in
// [sqrt(2)/2, sqrt(2)), log(1 + f) = f - f*f/2 + s*(f*f/2 + R(s*s)), s = f / (2 + f).
MERGOPT_HOST_DEVICE MERGOPT_INLINE float log_unit(float x) {
  using namespace transform_constants;
  uint32_t ix = float_to_bits(x) + (0x3f800000u - kSqrtHalfBits);
  const int k = static_cast<int>(ix >> 23) - 0x7f;
  ix = (ix & 0x007fffffu) + kSqrtHalfBits;
  const float f = bits_to_float(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (kLg2 + w * kLg4);
  const float t2 = z * (kLg1 + w * kLg3);
  const float r = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  return s * (hfsq + r) + dk * kLn2Lo - hfsq + f + dk * kLn2Hi;
}

// sin(a) and cos(a) for a float angle a in [0, 8): musl's sinf/cosf kernels, evaluated in double
// after an exact reduction by pi/2, then rounded to float.
MERGOPT_HOST_DEVICE MERGOPT_INLINE void sincos_small(float a, float& sin_out, float& cos_out) {
  using namespace transform_constants;
  const double x = static_cast<double>(a);
  const int q = static_cast<int>(x * kInvPio2 + 0.5);  // a >= 0: truncation is floor
  const double qd = static_cast<double>(q);
  const double y = (x - qd * kPio2Hi) - qd * kPio2Lo;  // |y| <= pi/4 + tiny
  const double z = y * y;
  const double w = z * z;
  const double zy = z * y;
  const double sin_y = (y + zy * (kS1 + z * kS2)) + zy * w * (kS3 + z * kS4);
  const double cos_y = ((1.0 + z * kC0) + w * kC1) + (w * z) * (kC2 + z * kC3);
  const int quadrant = q & 3;
  const double s = (quadrant & 1) ? cos_y : sin_y;
  const double c = (quadrant & 1) ? sin_y : cos_y;
  sin_out = static_cast<float>((quadrant & 2) ? -s : s);
  cos_out = static_cast<float>(((quadrant + 1) & 2) ? -c : c);
}

// Laplace(loc, scale) from one word: d = (2 * (w >> 8) - (2**24 - 1)) * 2**-25,
// e = log(1 - 2|d|), z = loc - scale * sign(d) * e. Finite for every word.
MERGOPT_HOST_DEVICE MERGOPT_INLINE float laplace_from_word(uint32_t word, float loc, float scale) {
  const int32_t centred = static_cast<int32_t>(2u * (word >> 8)) - ((1 << 24) - 1);
  const float d = static_cast<float>(centred) * 0x1.0p-25f;
  const float e = log_unit(1.0f - 2.0f * fabsf(d));
  return loc - scale * (d < 0.0f ? -e : e);
}

// Box-Muller on a word pair (wa, wb): u1 = ((wa >> 8) + 1) * 2**-24 in (0, 1],
// u2 = (wb >> 8) * 2**-24 in [0, 1), r = sqrt(-2 log u1), angle = fp32(2 pi) * u2,
// (first, second) = loc + scale * r * (cos, sin)(angle).
MERGOPT_HOST_DEVICE MERGOPT_INLINE void gaussian_from_words(uint32_t wa, uint32_t wb, float loc, float scale,
                                                            float& first, float& second) {
  constexpr float kTwoPi = 6.28318530717958647692f;
  const float u1 = static_cast<float>(static_cast<int32_t>((wa >> 8) + 1u)) * 0x1.0p-24f;
  const float u2 = static_cast<float>(static_cast<int32_t>(wb >> 8)) * 0x1.0p-24f;
  const float radius = sqrtf(-2.0f * log_unit(u1));
  float sin_a;
  float cos_a;
  sincos_small(kTwoPi * u2, sin_a, cos_a);
  first = loc + scale * (radius * cos_a);
  second = loc + scale * (radius * sin_a);
}

// Noise of the four elements 4G..4G+3 from the four words of their Philox call.
MERGOPT_HOST_DEVICE MERGOPT_INLINE void noise_from_words(Distribution dist, uint32_t w0, uint32_t w1, uint32_t w2,
                                                         uint32_t w3, float loc, float scale, float out[4]) {
  if (dist == Distribution::kGaussian) {
    gaussian_from_words(w0, w1, loc, scale, out[0], out[1]);
    gaussian_from_words(w2, w3, loc, scale, out[2], out[3]);
  } else {
    out[0] = laplace_from_word(w0, loc, scale);
    out[1] = laplace_from_word(w1, loc, scale);
    out[2] = laplace_from_word(w2, loc, scale);
    out[3] = laplace_from_word(w3, loc, scale);
  }
}

// Step scale s_t = K_t * alpha_t - 1 from words (w0, w1) of counter (t, 0, 0, kScaleStream):
// alpha_t = alphas[(w0 * n_alphas) >> 32], K_t = 1 + ((w1 * k_max) >> 32), in fp32.
MERGOPT_HOST_DEVICE MERGOPT_INLINE float step_scale(PhiloxKey key, uint32_t step, const float* alphas,
                                                    uint32_t n_alphas, uint32_t k_max) {
  uint32_t c0 = step;
  uint32_t c1 = 0;
  uint32_t c2 = 0;
  uint32_t c3 = kScaleStream;
  philox4x32_10(c0, c1, c2, c3, key);
  const uint32_t alpha_index = static_cast<uint32_t>((static_cast<uint64_t>(c0) * n_alphas) >> 32);
  const uint32_t k = 1u + static_cast<uint32_t>((static_cast<uint64_t>(c1) * k_max) >> 32);
  const float product = static_cast<float>(k) * alphas[alpha_index];
  return product - 1.0f;
}

}  // namespace mergopt
