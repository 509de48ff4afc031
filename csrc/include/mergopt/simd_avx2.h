// AVX2 versions of the noise stream: Philox4x32-10 on 8 counters at once and the Laplace and
// Gaussian transforms on 8 words at once.
//
// Every function performs the IEEE operations of its scalar counterpart (philox.h, noise.h) in the
// same order, without FMA (there is no FMA intrinsic here and the build uses -ffp-contract=off), so
// each lane is bit-identical to the scalar code; csrc/tests/test_core.cpp checks that.
//
// The functions carry __attribute__((target("avx2"))): this header compiles in a baseline x86-64
// translation unit, and callers must check the CPU (mergopt::simd::cpu_has_avx2()) before calling
// into code built on it. MERGOPT_HAVE_AVX2 is 1 where this is available (GCC or Clang on x86).
#pragma once

#include "mergopt/config.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define MERGOPT_HAVE_AVX2 1
#include <immintrin.h>
#else
#define MERGOPT_HAVE_AVX2 0
#endif

#if MERGOPT_HAVE_AVX2

#define MERGOPT_AVX2_INLINE inline __attribute__((always_inline, target("avx2")))

namespace mergopt {
namespace simd {

namespace tc = transform_constants;

inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}

// Eight lanes, lane j holds element group G + j (or word j of a group vector).
struct Words8 {
  __m256i w0, w1, w2, w3;
};

// hi and lo words of the 32x32 -> 64 products a * m lane-wise (m: the multiplier in every 64-bit
// lane). _mm256_mul_epu32 multiplies the even lanes; the odd lanes are shifted down and multiplied
// again; blends put hi and lo words back in lane order.
MERGOPT_AVX2_INLINE void mul_hi_lo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Ten Philox rounds on kBlocks x eight counters lane-wise; the output replaces them. The blocks are
// independent: interleaving them gives the out-of-order core several multiply chains at once.
// Rounds first_round .. 9 only, when given first_round (the earlier ones done by the caller).
template <int kBlocks>
MERGOPT_AVX2_INLINE void philox8(Words8 (&c)[kBlocks], PhiloxKey key, int first_round = 0) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  uint32_t k0 = key.k0 + static_cast<uint32_t>(first_round) * kPhiloxW0;
  uint32_t k1 = key.k1 + static_cast<uint32_t>(first_round) * kPhiloxW1;
  for (int round = first_round; round < kPhiloxRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int b = 0; b < kBlocks; ++b) {
      __m256i hi0, lo0, hi1, lo1;
      mul_hi_lo8(c[b].w0, m0, hi0, lo0);
      mul_hi_lo8(c[b].w2, m1, hi1, lo1);
      c[b].w0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c[b].w1), key0);
      c[b].w1 = lo1;
      c[b].w2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c[b].w3), key1);
      c[b].w3 = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The counters of the eight element groups group .. group + 7: (G & 0xffffffff, G >> 32, step,
// param_id), the carry into G >> 32 included.
MERGOPT_AVX2_INLINE Words8 group_counters8(uint64_t group, uint32_t step, uint32_t param_id) {
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group)));
  const __m256i lo = _mm256_add_epi32(base_lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // lo < base_lo (unsigned) where the low word wrapped: the mask is -1 there.
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, flip), _mm256_xor_si256(lo, flip));
  const __m256i hi = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(group >> 32))), carry);
  return Words8{lo, hi, _mm256_set1_epi32(static_cast<int>(step)), _mm256_set1_epi32(static_cast<int>(param_id))};
}

// hi and lo words of the 32x32 -> 64 product a * m.
MERGOPT_AVX2_INLINE void mul_hi_lo32(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// The Philox words of the 8 kBlocks element groups group .. group + 8 kBlocks - 1, block b in w[b].
// Where no group carries into G >> 32, counter words c1, c2, c3 are the same in every lane, and so
// are the words derived from them alone in rounds 1 and 2: those products are computed once, in
// scalar code, and the lane-wise rounds start at round 3.
template <int kBlocks>
MERGOPT_AVX2_INLINE void element_group_words8(Words8 (&w)[kBlocks], PhiloxKey key, uint64_t group, uint32_t step,
                                              uint32_t param_id) {
  const uint32_t lo_first = static_cast<uint32_t>(group);
  if (lo_first > 0xffffffffu - static_cast<uint32_t>(8 * kBlocks - 1)) {  // a carry: the plain rounds
    for (int b = 0; b < kBlocks; ++b) w[b] = group_counters8(group + 8 * b, step, param_id);
    philox8(w, key);
    return;
  }
  const uint32_t hi_word = static_cast<uint32_t>(group >> 32);
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // Round 1 on (c0 lane-wise, hi_word, step, param_id) with key (k0, k1).
  uint32_t hi1, lo1;
  mul_hi_lo32(step, kPhiloxM1, hi1, lo1);
  const uint32_t r1_c0 = hi1 ^ hi_word ^ key.k0;  // the same in every lane
  const uint32_t r1_c1 = lo1;
  const __m256i r1_c2_key = _mm256_set1_epi32(static_cast<int>(param_id ^ key.k1));
  // Round 2 with key (k0 + W0, k1 + W1): c0 and c1 are lane-constant, c2 and c3 are not.
  uint32_t hi0_r2, lo0_r2;
  mul_hi_lo32(r1_c0, kPhiloxM0, hi0_r2, lo0_r2);
  const __m256i r2_c0_key = _mm256_set1_epi32(static_cast<int>(r1_c1 ^ (key.k0 + kPhiloxW0)));
  const __m256i r2_c2_key = _mm256_set1_epi32(static_cast<int>(hi0_r2 ^ (key.k1 + kPhiloxW1)));
  const __m256i r2_c3 = _mm256_set1_epi32(static_cast<int>(lo0_r2));
  for (int b = 0; b < kBlocks; ++b) {
    const __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo_first + 8u * b)), lanes);
    __m256i hi0, lo0;
    mul_hi_lo8(c0, m0, hi0, lo0);
    const __m256i r1_c2 = _mm256_xor_si256(hi0, r1_c2_key);  // hi0 ^ c3 ^ k1
    const __m256i r1_c3 = lo0;
    __m256i hi1_r2, lo1_r2;
    mul_hi_lo8(r1_c2, m1, hi1_r2, lo1_r2);
    w[b].w0 = _mm256_xor_si256(hi1_r2, r2_c0_key);  // hi1 ^ c1 ^ k0
    w[b].w1 = lo1_r2;
    w[b].w2 = _mm256_xor_si256(r1_c3, r2_c2_key);   // hi0 ^ c3 ^ k1
    w[b].w3 = r2_c3;
  }
  philox8(w, key, 2);
}

// The words of the eight element groups group .. group + 7 (element_group_words lane-wise).
MERGOPT_AVX2_INLINE Words8 element_group_words8(PhiloxKey key, uint64_t group, uint32_t step, uint32_t param_id) {
  Words8 c[1] = {group_counters8(group, step, param_id)};
  philox8(c, key);
  return c[0];
}

// log_unit (noise.h) of x 2**-shift on eight floats, x 2**-shift in [2**-24, 1]: the power of two
// goes into the exponent k, which is exact, so the bits are those of log_unit(x * 2**-shift).
MERGOPT_AVX2_INLINE __m256 log_unit8(__m256 x, int shift = 0) {
  const __m256i ix0 = _mm256_add_epi32(_mm256_castps_si256(x), _mm256_set1_epi32(static_cast<int>(0x3f800000u - tc::kSqrtHalfBits)));
  const __m256i k = _mm256_sub_epi32(_mm256_srli_epi32(ix0, 23), _mm256_set1_epi32(0x7f + shift));
  const __m256i ix = _mm256_add_epi32(_mm256_and_si256(ix0, _mm256_set1_epi32(0x007fffff)),
                                      _mm256_set1_epi32(static_cast<int>(tc::kSqrtHalfBits)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(ix), one);
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.0f), f));
  const __m256 z = _mm256_mul_ps(s, s);
  const __m256 w = _mm256_mul_ps(z, z);
  const __m256 t1 = _mm256_mul_ps(
      w, _mm256_add_ps(_mm256_set1_ps(tc::kLg2), _mm256_mul_ps(w, _mm256_set1_ps(tc::kLg4))));
  const __m256 t2 = _mm256_mul_ps(
      z, _mm256_add_ps(_mm256_set1_ps(tc::kLg1), _mm256_mul_ps(w, _mm256_set1_ps(tc::kLg3))));
  const __m256 r = _mm256_add_ps(t2, t1);
  const __m256 hfsq = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), f), f);
  const __m256 dk = _mm256_cvtepi32_ps(k);
  __m256 out = _mm256_mul_ps(s, _mm256_add_ps(hfsq, r));
  out = _mm256_add_ps(out, _mm256_mul_ps(dk, _mm256_set1_ps(tc::kLn2Lo)));
  out = _mm256_sub_ps(out, hfsq);
  out = _mm256_add_ps(out, f);
  return _mm256_add_ps(out, _mm256_mul_ps(dk, _mm256_set1_ps(tc::kLn2Hi)));
}

// laplace_from_word on eight words, with exact integer shortcuts of the scalar steps: with
// h = w >> 8 and c = 2h - (2**24 - 1), x = 1 - 2|d| = (2**24 - |c|) 2**-24 exactly (the 2**-24 is folded into log_unit's exponent),
// and
// 2**24 - |c| = 2 (h' & 0x7fffff) + 1 where h' is h with its bits flipped when w >= 2**31;
// d < 0 exactly when bit 31 of w is clear.
MERGOPT_AVX2_INLINE __m256 laplace8(__m256i word, __m256 loc, __m256 scale) {
  const __m256i flipped = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));
  const __m256i xi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(flipped, 7), _mm256_set1_epi32(0xfffffe)),
                                     _mm256_set1_epi32(1));
  const __m256 e = log_unit8(_mm256_cvtepi32_ps(xi), 24);
  // d < 0 ? -e : e: the sign bit flipped where bit 31 of w is clear.
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256 signed_e =
      _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(e), _mm256_andnot_si256(word, sign)));
  return _mm256_sub_ps(loc, _mm256_mul_ps(scale, signed_e));
}

// sincos_small on four doubles (the float angles widened); the results rounded to float.
MERGOPT_AVX2_INLINE void sincos4(__m256d x, __m128& sin_out, __m128& cos_out) {
  const __m128i q = _mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(x, _mm256_set1_pd(tc::kInvPio2)),
                                                      _mm256_set1_pd(0.5)));
  const __m256d qd = _mm256_cvtepi32_pd(q);
  const __m256d y = _mm256_sub_pd(_mm256_sub_pd(x, _mm256_mul_pd(qd, _mm256_set1_pd(tc::kPio2Hi))),
                                  _mm256_mul_pd(qd, _mm256_set1_pd(tc::kPio2Lo)));
  const __m256d z = _mm256_mul_pd(y, y);
  const __m256d w = _mm256_mul_pd(z, z);
  const __m256d zy = _mm256_mul_pd(z, y);
  const __m256d s1 = _mm256_set1_pd(tc::kS1);
  const __m256d s2 = _mm256_set1_pd(tc::kS2);
  const __m256d s3 = _mm256_set1_pd(tc::kS3);
  const __m256d s4 = _mm256_set1_pd(tc::kS4);
  const __m256d c0 = _mm256_set1_pd(tc::kC0);
  const __m256d c1 = _mm256_set1_pd(tc::kC1);
  const __m256d c2 = _mm256_set1_pd(tc::kC2);
  const __m256d c3 = _mm256_set1_pd(tc::kC3);
  const __m256d sin_y =
      _mm256_add_pd(_mm256_add_pd(y, _mm256_mul_pd(zy, _mm256_add_pd(s1, _mm256_mul_pd(z, s2)))),
                    _mm256_mul_pd(_mm256_mul_pd(zy, w), _mm256_add_pd(s3, _mm256_mul_pd(z, s4))));
  const __m256d cos_y = _mm256_add_pd(
      _mm256_add_pd(_mm256_add_pd(_mm256_set1_pd(1.0), _mm256_mul_pd(z, c0)), _mm256_mul_pd(w, c1)),
      _mm256_mul_pd(_mm256_mul_pd(w, z), _mm256_add_pd(c2, _mm256_mul_pd(z, c3))));
  const __m256i quadrant = _mm256_cvtepi32_epi64(_mm_and_si128(q, _mm_set1_epi32(3)));
  const __m256i odd = _mm256_cmpeq_epi64(_mm256_and_si256(quadrant, _mm256_set1_epi64x(1)), _mm256_set1_epi64x(1));
  const __m256d s = _mm256_blendv_pd(sin_y, cos_y, _mm256_castsi256_pd(odd));
  const __m256d c = _mm256_blendv_pd(cos_y, sin_y, _mm256_castsi256_pd(odd));
  // Sign bits: bit 1 of quadrant (sin) and of quadrant + 1 (cos), moved to bit 63.
  const __m256i two = _mm256_set1_epi64x(2);
  const __m256i sin_sign = _mm256_slli_epi64(_mm256_and_si256(quadrant, two), 62);
  const __m256i cos_sign =
      _mm256_slli_epi64(_mm256_and_si256(_mm256_add_epi64(quadrant, _mm256_set1_epi64x(1)), two), 62);
  sin_out = _mm256_cvtpd_ps(_mm256_xor_pd(s, _mm256_castsi256_pd(sin_sign)));
  cos_out = _mm256_cvtpd_ps(_mm256_xor_pd(c, _mm256_castsi256_pd(cos_sign)));
}

// gaussian_from_words on eight word pairs (wa, wb): the first and second values of each pair.
MERGOPT_AVX2_INLINE void gaussian8(__m256i wa, __m256i wb, __m256 loc, __m256 scale, __m256& first,
                                   __m256& second) {
  const __m256 unit = _mm256_set1_ps(0x1.0p-24f);
  // u1 = (h + 1) 2**-24, its log taken as log_unit8(h + 1, 24).
  const __m256 u1_scaled = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_srli_epi32(wa, 8), _mm256_set1_epi32(1)));
  const __m256 u2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(wb, 8)), unit);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_unit8(u1_scaled, 24)));
  const __m256 angle = _mm256_mul_ps(_mm256_set1_ps(6.28318530717958647692f), u2);
  __m128 sin_lo, cos_lo, sin_hi, cos_hi;
  sincos4(_mm256_cvtps_pd(_mm256_castps256_ps128(angle)), sin_lo, cos_lo);
  sincos4(_mm256_cvtps_pd(_mm256_extractf128_ps(angle, 1)), sin_hi, cos_hi);
  const __m256 sin_a = _mm256_insertf128_ps(_mm256_castps128_ps256(sin_lo), sin_hi, 1);
  const __m256 cos_a = _mm256_insertf128_ps(_mm256_castps128_ps256(cos_lo), cos_hi, 1);
  first = _mm256_add_ps(loc, _mm256_mul_ps(scale, _mm256_mul_ps(radius, cos_a)));
  second = _mm256_add_ps(loc, _mm256_mul_ps(scale, _mm256_mul_ps(radius, sin_a)));
}

// Four lane-per-group vectors (value k of group G + j in v[k] lane j) to element order:
// out[m] holds elements 8m .. 8m + 7 of the 32 elements of the eight groups.
MERGOPT_AVX2_INLINE void groups_to_elements8(const __m256 v[4], __m256 out[4]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]);  // a0 b0 a1 b1 | a4 b4 a5 b5
  const __m256 t1 = _mm256_unpackhi_ps(v[0], v[1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]);
  const __m256 t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 g04 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 g15 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 g26 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  const __m256 g37 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  out[0] = _mm256_permute2f128_ps(g04, g15, 0x20);
  out[1] = _mm256_permute2f128_ps(g26, g37, 0x20);
  out[2] = _mm256_permute2f128_ps(g04, g15, 0x31);
  out[3] = _mm256_permute2f128_ps(g26, g37, 0x31);
}

// The noise z of the 32 * kBlocks elements of groups group .. group + 8 kBlocks - 1, in element
// order, times `factor` (the step scale; scalar code: factor * noise_from_words(...)).
template <int kBlocks>
MERGOPT_AVX2_INLINE void scaled_noise8(float* out, PhiloxKey key, uint64_t group, uint32_t step, uint32_t param_id,
                                      Distribution dist, float loc, float scale, float factor) {
  Words8 w[kBlocks];
  element_group_words8(w, key, group, step, param_id);
  const __m256 loc8 = _mm256_set1_ps(loc);
  const __m256 scale8 = _mm256_set1_ps(scale);
  const __m256 factor8 = _mm256_set1_ps(factor);
  for (int b = 0; b < kBlocks; ++b) {
    __m256 z[4];
    if (dist == Distribution::kGaussian) {
      gaussian8(w[b].w0, w[b].w1, loc8, scale8, z[0], z[1]);
      gaussian8(w[b].w2, w[b].w3, loc8, scale8, z[2], z[3]);
    } else {
      z[0] = laplace8(w[b].w0, loc8, scale8);
      z[1] = laplace8(w[b].w1, loc8, scale8);
      z[2] = laplace8(w[b].w2, loc8, scale8);
      z[3] = laplace8(w[b].w3, loc8, scale8);
    }
    __m256 e[4];
    groups_to_elements8(z, e);
    for (int m = 0; m < 4; ++m) _mm256_storeu_ps(out + 32 * b + 8 * m, _mm256_mul_ps(factor8, e[m]));
  }
}

// scaled_noise8 for one block of eight groups: out must hold 32 floats.
MERGOPT_AVX2_INLINE void scaled_noise32(float* out, PhiloxKey key, uint64_t group, uint32_t step,
                                        uint32_t param_id, Distribution dist, float loc, float scale,
                                        float factor) {
  scaled_noise8<1>(out, key, group, step, param_id, dist, loc, scale, factor);
}

}  // namespace simd
}  // namespace mergopt

#undef MERGOPT_AVX2_INLINE

#endif  // MERGOPT_HAVE_AVX2
