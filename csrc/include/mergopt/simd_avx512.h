// AVX-512 versions of the noise stream: Philox4x32-10 on 16 counters at once and the Laplace and
// Gaussian transforms on 16 words at once (AVX512F + AVX512DQ).
//
// As in simd_avx2.h, every function performs the IEEE operations of its scalar counterpart
// (philox.h, noise.h) in the same order, without FMA, so each lane is bit-identical to the scalar
// code (csrc/tests/test_core.cpp checks that). Callers check mergopt::simd::cpu_has_avx512()
// before calling into code built on it. MERGOPT_HAVE_AVX512 is 1 where this is available.
#pragma once

#include "mergopt/config.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define MERGOPT_HAVE_AVX512 1
#include <immintrin.h>
#else
#define MERGOPT_HAVE_AVX512 0
#endif

#if MERGOPT_HAVE_AVX512

#define MERGOPT_AVX512_INLINE inline __attribute__((always_inline, target("avx512f,avx512dq")))

// GCC 12's avx512fintrin.h initialises the undefined vectors of some intrinsics with themselves,
// which -Wuninitialized reports at every inlined use (GCC bug 105593, fixed in 12.3 / 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace mergopt {
namespace simd {

namespace tc = transform_constants;

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

// Sixteen lanes, lane j holds element group G + j (or word j of a group vector).
struct Words16 {
  __m512i w0, w1, w2, w3;
};

// hi and lo words of the 32x32 -> 64 products a * m lane-wise (m: the multiplier in every 64-bit
// lane). _mm512_mul_epu32 multiplies the even lanes; the odd lanes are moved down and multiplied
// again; one masked shuffle each puts the hi and lo words back in lane order.
MERGOPT_AVX512_INLINE void mul_hi_lo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                                       // lanes 2i
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), m);   // lanes 2i + 1
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);   // even lanes <- hi words of even
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);   // odd lanes <- lo words of odd
}

// Ten Philox rounds on kBlocks x sixteen counters lane-wise; the output replaces them. The blocks
// are independent: interleaving them gives the out-of-order core several multiply chains at once.
// Rounds first_round .. 9 only, when given first_round (the earlier ones done by the caller).
template <int kBlocks>
MERGOPT_AVX512_INLINE void philox16(Words16 (&c)[kBlocks], PhiloxKey key, int first_round = 0) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = key.k0 + static_cast<uint32_t>(first_round) * kPhiloxW0;
  uint32_t k1 = key.k1 + static_cast<uint32_t>(first_round) * kPhiloxW1;
  for (int round = first_round; round < kPhiloxRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int b = 0; b < kBlocks; ++b) {
      __m512i hi0, lo0, hi1, lo1;
      mul_hi_lo16(c[b].w0, m0, hi0, lo0);
      mul_hi_lo16(c[b].w2, m1, hi1, lo1);
      // 0x96: three-way exclusive or.
      const __m512i n0 = _mm512_ternarylogic_epi32(hi1, c[b].w1, key0, 0x96);
      const __m512i n2 = _mm512_ternarylogic_epi32(hi0, c[b].w3, key1, 0x96);
      c[b].w0 = n0;
      c[b].w1 = lo1;
      c[b].w2 = n2;
      c[b].w3 = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The counters of the sixteen element groups group .. group + 15: (G & 0xffffffff, G >> 32,
// step, param_id), the carry into G >> 32 included.
MERGOPT_AVX512_INLINE Words16 group_counters16(uint64_t group, uint32_t step, uint32_t param_id) {
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(group)));
  const __m512i lo =
      _mm512_add_epi32(base_lo, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, base_lo);  // the low word wrapped
  const __m512i hi0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(group >> 32)));
  const __m512i hi = _mm512_mask_add_epi32(hi0, carry, hi0, _mm512_set1_epi32(1));
  return Words16{lo, hi, _mm512_set1_epi32(static_cast<int>(step)), _mm512_set1_epi32(static_cast<int>(param_id))};
}

// hi and lo words of the 32x32 -> 64 product a * m.
MERGOPT_AVX512_INLINE void mul_hi_lo32(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// The Philox words of the 16 kBlocks element groups group .. group + 16 kBlocks - 1, block b in
// w[b]. Where no group carries into G >> 32, counter words c1, c2, c3 are the same in every lane,
// and so are the words derived from them alone in rounds 1 and 2: those products are computed once,
// in scalar code, and the lane-wise rounds start at round 3.
template <int kBlocks>
MERGOPT_AVX512_INLINE void element_group_words16(Words16 (&w)[kBlocks], PhiloxKey key, uint64_t group,
                                                 uint32_t step, uint32_t param_id) {
  const uint32_t lo_first = static_cast<uint32_t>(group);
  if (lo_first > 0xffffffffu - static_cast<uint32_t>(16 * kBlocks - 1)) {  // a carry: the plain rounds
    for (int b = 0; b < kBlocks; ++b) w[b] = group_counters16(group + 16 * b, step, param_id);
    philox16(w, key);
    return;
  }
  const uint32_t hi_word = static_cast<uint32_t>(group >> 32);
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Round 1 on (c0 lane-wise, hi_word, step, param_id) with key (k0, k1).
  uint32_t hi1, lo1;
  mul_hi_lo32(step, kPhiloxM1, hi1, lo1);
  const uint32_t r1_c0 = hi1 ^ hi_word ^ key.k0;  // the same in every lane
  const uint32_t r1_c1 = lo1;
  const __m512i r1_c2_key = _mm512_set1_epi32(static_cast<int>(param_id ^ key.k1));
  // Round 2 with key (k0 + W0, k1 + W1): c0 and c1 are lane-constant, c2 and c3 are not.
  uint32_t hi0_r2, lo0_r2;
  mul_hi_lo32(r1_c0, kPhiloxM0, hi0_r2, lo0_r2);
  const __m512i r2_c0_key = _mm512_set1_epi32(static_cast<int>(r1_c1 ^ (key.k0 + kPhiloxW0)));
  const __m512i r2_c2_key = _mm512_set1_epi32(static_cast<int>(hi0_r2 ^ (key.k1 + kPhiloxW1)));
  const __m512i r2_c3 = _mm512_set1_epi32(static_cast<int>(lo0_r2));
  for (int b = 0; b < kBlocks; ++b) {
    const __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo_first + 16u * b)), lanes);
    __m512i hi0, lo0;
    mul_hi_lo16(c0, m0, hi0, lo0);
    const __m512i r1_c2 = _mm512_xor_si512(hi0, r1_c2_key);  // hi0 ^ c3 ^ k1
    const __m512i r1_c3 = lo0;
    __m512i hi1_r2, lo1_r2;
    mul_hi_lo16(r1_c2, m1, hi1_r2, lo1_r2);
    w[b].w0 = _mm512_xor_si512(hi1_r2, r2_c0_key);  // hi1 ^ c1 ^ k0
    w[b].w1 = lo1_r2;
    w[b].w2 = _mm512_xor_si512(r1_c3, r2_c2_key);   // hi0 ^ c3 ^ k1
    w[b].w3 = r2_c3;
  }
  philox16(w, key, 2);
}

// The words of the sixteen element groups group .. group + 15 (element_group_words lane-wise).
MERGOPT_AVX512_INLINE Words16 element_group_words16(PhiloxKey key, uint64_t group, uint32_t step,
                                                   uint32_t param_id) {
  Words16 c[1] = {group_counters16(group, step, param_id)};
  philox16(c, key);
  return c[0];
}

// log_unit (noise.h) of x 2**-shift on sixteen floats, x 2**-shift in [2**-24, 1]: the power of two
// goes into the exponent k, which is exact, so the bits are those of log_unit(x * 2**-shift).
MERGOPT_AVX512_INLINE __m512 log_unit16(__m512 x, int shift = 0) {
  const __m512i ix0 = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x3f800000u - tc::kSqrtHalfBits)));
  const __m512i k = _mm512_sub_epi32(_mm512_srli_epi32(ix0, 23), _mm512_set1_epi32(0x7f + shift));
  const __m512i ix = _mm512_add_epi32(_mm512_and_si512(ix0, _mm512_set1_epi32(0x007fffff)),
                                      _mm512_set1_epi32(static_cast<int>(tc::kSqrtHalfBits)));
  const __m512 f = _mm512_sub_ps(_mm512_castsi512_ps(ix), _mm512_set1_ps(1.0f));
  const __m512 s = _mm512_div_ps(f, _mm512_add_ps(_mm512_set1_ps(2.0f), f));
  const __m512 z = _mm512_mul_ps(s, s);
  const __m512 w = _mm512_mul_ps(z, z);
  const __m512 t1 = _mm512_mul_ps(
      w, _mm512_add_ps(_mm512_set1_ps(tc::kLg2), _mm512_mul_ps(w, _mm512_set1_ps(tc::kLg4))));
  const __m512 t2 = _mm512_mul_ps(
      z, _mm512_add_ps(_mm512_set1_ps(tc::kLg1), _mm512_mul_ps(w, _mm512_set1_ps(tc::kLg3))));
  const __m512 r = _mm512_add_ps(t2, t1);
  const __m512 hfsq = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), f), f);
  const __m512 dk = _mm512_cvtepi32_ps(k);
  __m512 out = _mm512_mul_ps(s, _mm512_add_ps(hfsq, r));
  out = _mm512_add_ps(out, _mm512_mul_ps(dk, _mm512_set1_ps(tc::kLn2Lo)));
  out = _mm512_sub_ps(out, hfsq);
  out = _mm512_add_ps(out, f);
  return _mm512_add_ps(out, _mm512_mul_ps(dk, _mm512_set1_ps(tc::kLn2Hi)));
}

// laplace_from_word on sixteen words, with exact integer shortcuts of the scalar steps: with
// h = w >> 8 and c = 2h - (2**24 - 1), x = 1 - 2|d| = (2**24 - |c|) 2**-24 exactly (the 2**-24 is folded into log_unit's exponent),
// and
// 2**24 - |c| = 2 (h' & 0x7fffff) + 1 where h' is h with its bits flipped when w >= 2**31;
// d < 0 exactly when bit 31 of w is clear.
MERGOPT_AVX512_INLINE __m512 laplace16(__m512i word, __m512 loc, __m512 scale) {
  const __m512i flipped = _mm512_xor_si512(word, _mm512_srai_epi32(word, 31));
  // 0xEA: (A & B) | C.
  const __m512i xi = _mm512_ternarylogic_epi32(_mm512_srli_epi32(flipped, 7), _mm512_set1_epi32(0xfffffe),
                                               _mm512_set1_epi32(1), 0xEA);
  const __m512 e = log_unit16(_mm512_cvtepi32_ps(xi), 24);
  // d < 0 ? -e : e, the sign bit flipped where bit 31 of w is clear. 0xD2: A ^ (~B & C).
  const __m512 signed_e = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      _mm512_castps_si512(e), word, _mm512_set1_epi32(static_cast<int>(0x80000000u)), 0xD2));
  return _mm512_sub_ps(loc, _mm512_mul_ps(scale, signed_e));
}

// sincos_small on eight doubles (the float angles widened); the results rounded to float.
MERGOPT_AVX512_INLINE void sincos8(__m512d x, __m256& sin_out, __m256& cos_out) {
  const __m256i q = _mm512_cvttpd_epi32(_mm512_add_pd(_mm512_mul_pd(x, _mm512_set1_pd(tc::kInvPio2)),
                                                      _mm512_set1_pd(0.5)));
  const __m512d qd = _mm512_cvtepi32_pd(q);
  const __m512d y = _mm512_sub_pd(_mm512_sub_pd(x, _mm512_mul_pd(qd, _mm512_set1_pd(tc::kPio2Hi))),
                                  _mm512_mul_pd(qd, _mm512_set1_pd(tc::kPio2Lo)));
  const __m512d z = _mm512_mul_pd(y, y);
  const __m512d w = _mm512_mul_pd(z, z);
  const __m512d zy = _mm512_mul_pd(z, y);
  const __m512d s1 = _mm512_set1_pd(tc::kS1);
  const __m512d s2 = _mm512_set1_pd(tc::kS2);
  const __m512d s3 = _mm512_set1_pd(tc::kS3);
  const __m512d s4 = _mm512_set1_pd(tc::kS4);
  const __m512d c0 = _mm512_set1_pd(tc::kC0);
  const __m512d c1 = _mm512_set1_pd(tc::kC1);
  const __m512d c2 = _mm512_set1_pd(tc::kC2);
  const __m512d c3 = _mm512_set1_pd(tc::kC3);
  const __m512d sin_y =
      _mm512_add_pd(_mm512_add_pd(y, _mm512_mul_pd(zy, _mm512_add_pd(s1, _mm512_mul_pd(z, s2)))),
                    _mm512_mul_pd(_mm512_mul_pd(zy, w), _mm512_add_pd(s3, _mm512_mul_pd(z, s4))));
  const __m512d cos_y = _mm512_add_pd(
      _mm512_add_pd(_mm512_add_pd(_mm512_set1_pd(1.0), _mm512_mul_pd(z, c0)), _mm512_mul_pd(w, c1)),
      _mm512_mul_pd(_mm512_mul_pd(w, z), _mm512_add_pd(c2, _mm512_mul_pd(z, c3))));
  const __m512i quadrant = _mm512_cvtepi32_epi64(_mm256_and_si256(q, _mm256_set1_epi32(3)));
  const __mmask8 odd = _mm512_test_epi64_mask(quadrant, _mm512_set1_epi64(1));
  const __m512d s = _mm512_mask_blend_pd(odd, sin_y, cos_y);
  const __m512d c = _mm512_mask_blend_pd(odd, cos_y, sin_y);
  // Sign bits: bit 1 of quadrant (sin) and of quadrant + 1 (cos), moved to bit 63.
  const __m512i two = _mm512_set1_epi64(2);
  const __m512i sin_sign = _mm512_slli_epi64(_mm512_and_si512(quadrant, two), 62);
  const __m512i cos_sign = _mm512_slli_epi64(_mm512_and_si512(_mm512_add_epi64(quadrant, _mm512_set1_epi64(1)), two), 62);
  sin_out = _mm512_cvtpd_ps(_mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(s), sin_sign)));
  cos_out = _mm512_cvtpd_ps(_mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(c), cos_sign)));
}

// gaussian_from_words on sixteen word pairs (wa, wb): the first and second values of each pair.
MERGOPT_AVX512_INLINE void gaussian16(__m512i wa, __m512i wb, __m512 loc, __m512 scale, __m512& first,
                                      __m512& second) {
  const __m512 unit = _mm512_set1_ps(0x1.0p-24f);
  // u1 = (h + 1) 2**-24, its log taken as log_unit16(h + 1, 24).
  const __m512 u1_scaled = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_srli_epi32(wa, 8), _mm512_set1_epi32(1)));
  const __m512 u2 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(wb, 8)), unit);
  const __m512 radius = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_unit16(u1_scaled, 24)));
  const __m512 angle = _mm512_mul_ps(_mm512_set1_ps(6.28318530717958647692f), u2);
  __m256 sin_lo, cos_lo, sin_hi, cos_hi;
  sincos8(_mm512_cvtps_pd(_mm512_castps512_ps256(angle)), sin_lo, cos_lo);
  sincos8(_mm512_cvtps_pd(_mm512_extractf32x8_ps(angle, 1)), sin_hi, cos_hi);
  const __m512 sin_a = _mm512_insertf32x8(_mm512_castps256_ps512(sin_lo), sin_hi, 1);
  const __m512 cos_a = _mm512_insertf32x8(_mm512_castps256_ps512(cos_lo), cos_hi, 1);
  first = _mm512_add_ps(loc, _mm512_mul_ps(scale, _mm512_mul_ps(radius, cos_a)));
  second = _mm512_add_ps(loc, _mm512_mul_ps(scale, _mm512_mul_ps(radius, sin_a)));
}

// Four lane-per-group vectors (value k of group G + j in v[k] lane j) to element order:
// out[m] holds elements 16m .. 16m + 15 of the 64 elements of the sixteen groups.
MERGOPT_AVX512_INLINE void groups_to_elements16(const __m512 v[4], __m512 out[4]) {
  // Within each 128-bit block L: g04 holds group 4L (its four values), g15 4L + 1, ...
  const __m512 t0 = _mm512_unpacklo_ps(v[0], v[1]);
  const __m512 t1 = _mm512_unpackhi_ps(v[0], v[1]);
  const __m512 t2 = _mm512_unpacklo_ps(v[2], v[3]);
  const __m512 t3 = _mm512_unpackhi_ps(v[2], v[3]);
  const __m512 a = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 b = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 c = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 d = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  // 4x4 transpose of the 128-bit blocks: out[m] = (a_m, b_m, c_m, d_m).
  const __m512 ab01 = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 cd01 = _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 ab23 = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 cd23 = _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2));
  out[0] = _mm512_shuffle_f32x4(ab01, cd01, _MM_SHUFFLE(2, 0, 2, 0));
  out[1] = _mm512_shuffle_f32x4(ab01, cd01, _MM_SHUFFLE(3, 1, 3, 1));
  out[2] = _mm512_shuffle_f32x4(ab23, cd23, _MM_SHUFFLE(2, 0, 2, 0));
  out[3] = _mm512_shuffle_f32x4(ab23, cd23, _MM_SHUFFLE(3, 1, 3, 1));
}

// The noise z of the 64 * kBlocks elements of groups group .. group + 16 kBlocks - 1, in element
// order, times `factor` (the step scale; scalar code: factor * noise_from_words(...)).
template <int kBlocks>
MERGOPT_AVX512_INLINE void scaled_noise16(float* out, PhiloxKey key, uint64_t group, uint32_t step,
                                        uint32_t param_id, Distribution dist, float loc, float scale,
                                        float factor) {
  Words16 w[kBlocks];
  element_group_words16(w, key, group, step, param_id);
  const __m512 loc16 = _mm512_set1_ps(loc);
  const __m512 scale16 = _mm512_set1_ps(scale);
  const __m512 factor16 = _mm512_set1_ps(factor);
  __m512 z[kBlocks][4];
  if (dist == Distribution::kGaussian) {
    for (int b = 0; b < kBlocks; ++b) {
      gaussian16(w[b].w0, w[b].w1, loc16, scale16, z[b][0], z[b][1]);
      gaussian16(w[b].w2, w[b].w3, loc16, scale16, z[b][2], z[b][3]);
    }
  } else {
    for (int b = 0; b < kBlocks; ++b) {
      z[b][0] = laplace16(w[b].w0, loc16, scale16);
      z[b][1] = laplace16(w[b].w1, loc16, scale16);
      z[b][2] = laplace16(w[b].w2, loc16, scale16);
      z[b][3] = laplace16(w[b].w3, loc16, scale16);
    }
  }
  for (int b = 0; b < kBlocks; ++b) {
    __m512 e[4];
    groups_to_elements16(z[b], e);
    for (int m = 0; m < 4; ++m) _mm512_storeu_ps(out + 64 * b + 16 * m, _mm512_mul_ps(factor16, e[m]));
  }
}

// scaled_noise16 for one block of sixteen groups: out must hold 64 floats.
MERGOPT_AVX512_INLINE void scaled_noise64(float* out, PhiloxKey key, uint64_t group, uint32_t step,
                                          uint32_t param_id, Distribution dist, float loc, float scale,
                                          float factor) {
  scaled_noise16<1>(out, key, group, step, param_id, dist, loc, scale, factor);
}

}  // namespace simd
}  // namespace mergopt

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#undef MERGOPT_AVX512_INLINE

#endif  // MERGOPT_HAVE_AVX512
