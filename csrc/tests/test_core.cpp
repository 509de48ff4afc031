// Unit tests of the header-only core (ctest): Philox known-answer vectors, the counter layout
// against values printed by mergopt_kernels/noise.py, exhaustive accuracy of the transcendental
// functions on every input the transforms can produce, extreme words, AdamW against double.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "mergopt/adamw.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"
#include "mergopt/simd_avx2.h"
#include "mergopt/simd_avx512.h"

namespace {

int g_failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++g_failures;                                         \
      std::fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
    }                                                       \
  } while (0)

// Distance in units in the last place of `exact` (rounded to float) between `value` and `exact`.
double ulp_error(float value, double exact) {
  const float rounded = static_cast<float>(exact);
  const double ulp = std::nextafter(std::fabs(rounded), INFINITY) - std::fabs(rounded);
  return std::fabs(static_cast<double>(value) - exact) / ulp;
}

void test_known_answers() {
  struct Vector {
    uint32_t counter[4];
    uint32_t key[2];
    uint32_t expected[4];
  };
  const Vector vectors[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Vector& v : vectors) {
    uint32_t c[4] = {v.counter[0], v.counter[1], v.counter[2], v.counter[3]};
    mergopt::philox4x32_10(c[0], c[1], c[2], c[3], mergopt::PhiloxKey{v.key[0], v.key[1]});
    for (int i = 0; i < 4; ++i) {
      EXPECT(c[i] == v.expected[i], "word %d: %08x != %08x", i, c[i], v.expected[i]);
    }
  }
  const mergopt::PhiloxKey key = mergopt::philox_key(0xa4093822299f31d0ull);
  EXPECT(key.k0 == 0x299f31d0u && key.k1 == 0xa4093822u, "seed split %08x %08x", key.k0, key.k1);
}

// Values printed by mergopt_kernels/noise.py for seed 0x0123456789abcdef.
void test_stream_layout() {
  const mergopt::PhiloxKey key = mergopt::philox_key(0x0123456789abcdefull);
  uint32_t w[4];
  // element_words(seed, param_id=3, step=5, start=8, count=4)
  mergopt::element_group_words(key, 2, 5, 3, w[0], w[1], w[2], w[3]);
  const uint32_t a[4] = {0xc3212f9b, 0x99c20add, 0xf2f52426, 0x3b150b7f};
  // element_words(seed, param_id=7, step=1, start=2**34 + 4, count=4): G >> 32 reaches c1
  uint32_t b[4];
  mergopt::element_group_words(key, (1ull << 32) + 1, 1, 7, b[0], b[1], b[2], b[3]);
  const uint32_t b_expected[4] = {0x37dc4c3d, 0x1ee36045, 0x5f300dfb, 0x991c5803};
  for (int i = 0; i < 4; ++i) {
    EXPECT(w[i] == a[i], "word %d: %08x != %08x", i, w[i], a[i]);
    EXPECT(b[i] == b_expected[i], "high group word %d: %08x != %08x", i, b[i], b_expected[i]);
  }
  const float alphas[6] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
  const struct {
    uint32_t step;
    float scale;
  } scales[] = {{1, 0x1.4p+1f}, {2, -0x1.cccccc0p-1f}, {3, -0x1.99999a0p-1f}, {100, 0x1.6666680p+0f}};
  for (const auto& s : scales) {
    const float got = mergopt::step_scale(key, s.step, alphas, 6, 7);
    EXPECT(got == s.scale, "step %u scale %a != %a", s.step, got, s.scale);
  }
}

void test_log_exhaustive() {
  double worst = 0.0;
  float worst_x = 0.0f;
  for (uint32_t k = 1; k <= (1u << 24); ++k) {  // every u1 and every 1 - 2|d|
    const float x = static_cast<float>(k) * 0x1.0p-24f;
    const float got = mergopt::log_unit(x);
    const double exact = std::log(static_cast<double>(x));
    const double err = k == (1u << 24) ? (got == 0.0f ? 0.0 : 1e9) : ulp_error(got, exact);
    if (err > worst) {
      worst = err;
      worst_x = x;
    }
  }
  std::printf("log_unit: max error %.3f ulp (at %a)\n", worst, worst_x);
  EXPECT(worst <= 1.0, "log_unit error %.3f ulp at %a", worst, worst_x);
}

void test_sincos_exhaustive() {
  constexpr float kTwoPi = 6.28318530717958647692f;
  double worst = 0.0;
  float worst_a = 0.0f;
  for (uint32_t k = 0; k < (1u << 24); ++k) {  // every Box-Muller angle
    const float a = kTwoPi * (static_cast<float>(k) * 0x1.0p-24f);
    float s;
    float c;
    mergopt::sincos_small(a, s, c);
    const double es = ulp_error(s, std::sin(static_cast<double>(a)));
    const double ec = ulp_error(c, std::cos(static_cast<double>(a)));
    const double err = es > ec ? es : ec;
    if (err > worst) {
      worst = err;
      worst_a = a;
    }
  }
  std::printf("sincos_small: max error %.3f ulp (at %a)\n", worst, worst_a);
  EXPECT(worst <= 1.0, "sincos error %.3f ulp at %a", worst, worst_a);
}

void test_extreme_words() {
  const uint32_t words[] = {0u, 0xffffffffu, 0x80000000u, 0x7fffffffu, 0xffu, 0x100u, 0x1ffu, 0xffffff00u, 0x000000ffu};
  for (uint32_t w : words) {
    const float z = mergopt::laplace_from_word(w, 0.0f, 1.0f);
    EXPECT(std::isfinite(z), "laplace(%08x) = %a", w, z);
    EXPECT(mergopt::laplace_from_word(~w, 0.0f, 1.0f) == -z, "laplace symmetry at %08x", w);
    for (uint32_t w2 : words) {
      float first;
      float second;
      mergopt::gaussian_from_words(w, w2, 0.0f, 1.0f, first, second);
      EXPECT(std::isfinite(first) && std::isfinite(second), "gaussian(%08x, %08x)", w, w2);
    }
  }
  // Values printed by noise.laplace_from_words / gaussian_from_words (loc 0, scale 1).
  EXPECT(mergopt::laplace_from_word(0u, 0.0f, 1.0f) == -0x1.0a2b24p+4f, "laplace(0)");
  EXPECT(mergopt::laplace_from_word(0x80000000u, 0.0f, 1.0f) == 0x1.0p-24f, "laplace(0x80000000)");
  EXPECT(mergopt::laplace_from_word(0x100u, 0.0f, 1.0f) == -0x1.f12e72p+3f, "laplace(0x100)");
  const float lap = mergopt::laplace_from_word(0x12345678u, 0.0f, 1.0f);
  EXPECT(ulp_error(lap, -0x1.f34b16p+0) <= 1.0, "laplace(0x12345678) = %a", lap);
  float first;
  float second;
  mergopt::gaussian_from_words(0u, 0xffffffffu, 0.0f, 1.0f, first, second);
  EXPECT(first == 0x1.7128acp+2f, "gaussian first %a", first);
  EXPECT(std::fabs(second - -0x1.d397d4p-20f) <= 2 * 0x1.0p-43f, "gaussian second %a", second);
}

// fp64 AdamW in the same order as the fp32 update; the fp32 result must stay within a few fp32
// rounding errors relative to the size of the terms over many steps.
void test_adamw_against_double() {
  std::mt19937 rng(1234);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 1e-2;
  for (int amsgrad = 0; amsgrad < 2; ++amsgrad) {
    for (int maximize = 0; maximize < 2; ++maximize) {
      for (int trial = 0; trial < 200; ++trial) {
        float p = static_cast<float>(normal(rng)), m = 0.0f, v = 0.0f, vmax = 0.0f;
        double pd = p, md = 0.0, vd = 0.0, vmaxd = 0.0, gmax = 0.0;
        for (int step = 1; step <= 50; ++step) {
          const float g = static_cast<float>(normal(rng) * 0.1);
          const mergopt::AdamWScalars s = mergopt::adamw_scalars(lr, beta1, beta2, eps, wd, step);
          if (amsgrad) {
            mergopt::adamw_update<true>(p, g, m, v, vmax, s, maximize);
          } else {
            mergopt::adamw_update<false>(p, g, m, v, vmax, s, maximize);
          }
          const double gd = maximize ? -static_cast<double>(g) : g;
          gmax = std::fmax(gmax, std::fabs(gd));
          pd *= 1.0 - lr * wd;
          md += (1.0 - beta1) * (gd - md);
          vd = vd * beta2 + (1.0 - beta2) * gd * gd;
          vmaxd = std::fmax(vmaxd, vd);
          const double second = amsgrad ? vmaxd : vd;
          const double denom = std::sqrt(second) / std::sqrt(1.0 - std::pow(beta2, step)) + eps;
          pd -= lr / (1.0 - std::pow(beta1, step)) * md / denom;
          // Per step: two fp32 roundings of p (decay, update), each <= 1/2 ulp <= 2**-24 |p|, plus
          // a few ulp of relative error in an update of size <= ~lr.
          const double tol = step * (0x1.0p-23 * std::fabs(pd) + 1e-6 * lr);
          if (std::fabs(p - pd) > tol || std::fabs(m - md) > step * 0x1.0p-22 * gmax ||
              std::fabs(v - vd) > step * 0x1.0p-22 * gmax * gmax) {
            EXPECT(false, "amsgrad=%d maximize=%d step %d: p %.9g vs %.9g, m %.9g vs %.9g, v %.9g vs %.9g",
                   amsgrad, maximize, step, p, pd, m, md, v, vd);
            return;
          }
        }
      }
    }
  }
  // weight decay with lr = 0 is the identity; NaN propagates through amsgrad like torch.maximum.
  EXPECT(mergopt::nan_maximum(1.0f, NAN) != mergopt::nan_maximum(1.0f, NAN), "nan_maximum(1, nan)");
  EXPECT(mergopt::nan_maximum(NAN, 1.0f) != mergopt::nan_maximum(NAN, 1.0f), "nan_maximum(nan, 1)");
  EXPECT(mergopt::float_to_bf16_bits(1.00390625f) == 0x3f80, "bf16 ties to even");
  EXPECT(mergopt::float_to_bf16_bits(1.01171875f) == 0x3f82, "bf16 ties to even (odd)");
}

#if MERGOPT_HAVE_AVX2
// The AVX2 stream against the scalar one, lane by lane and bit for bit: Philox words for groups
// around the 2**32 boundary of G (the carry into counter word c1) and random groups; the noise
// of every input word class (all 2**24 Laplace inputs w >> 8, Gaussian on random pairs plus the
// extreme words), and the element order of scaled_noise8.
// Compares the 8 lanes of element_group_words8 at group g with the scalar words; counts mismatches.
__attribute__((target("avx2"))) void check_groups8(mergopt::PhiloxKey key, uint64_t g, uint32_t step,
                                                   uint32_t param_id, int& word_mismatches) {
  const mergopt::simd::Words8 v = mergopt::simd::element_group_words8(key, g, step, param_id);
  alignas(32) uint32_t lanes[4][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), v.w0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), v.w1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), v.w2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[3]), v.w3);
  for (int j = 0; j < 8; ++j) {
    uint32_t w[4];
    mergopt::element_group_words(key, g + j, step, param_id, w[0], w[1], w[2], w[3]);
    for (int k = 0; k < 4; ++k) {
      if (lanes[k][j] != w[k] && word_mismatches++ < 5) {
        EXPECT(false, "avx2 philox group %llx lane %d word %d: %08x != %08x", static_cast<unsigned long long>(g), j,
               k, lanes[k][j], w[k]);
      }
    }
  }
}

__attribute__((target("avx2"))) void test_avx2_matches_scalar() {
  const int failures_before = g_failures;
  const mergopt::PhiloxKey key = mergopt::philox_key(0x9E3779B97F4A7C15ull ^ (1ull << 63));
  std::mt19937_64 rng(99);
  int word_mismatches = 0;
  for (uint64_t hi = 0; hi < 3; ++hi) {
    for (int back = 0; back <= 8; ++back) {  // every offset of the 8 lanes across lo = 0xffffffff
      check_groups8(key, (hi << 32) + 0xfffffff8ull + back, 7, 3, word_mismatches);
      check_groups8(key, (hi << 32) + back, 2, 0xfffffffeu, word_mismatches);
    }
  }
  check_groups8(key, 0xfffffffffffffff8ull, 1, 1, word_mismatches);  // the last lane is G = 2**64 - 1
  for (int i = 0; i < 100000; ++i) {
    check_groups8(key, rng(), static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng()), word_mismatches);
  }
  // The four-block call, whose rounds 1 and 2 take a scalar shortcut unless a lane carries.
  for (int i = 0; i < 20000; ++i) {
    uint64_t g = rng();
    if (i < 66) g = (static_cast<uint64_t>(i % 3) << 32) + 0xffffffffull - 32 - 32 + i;  // the carry, both ways
    const uint32_t step = static_cast<uint32_t>(rng());
    const uint32_t param_id = static_cast<uint32_t>(rng());
    mergopt::simd::Words8 blocks[4];
    mergopt::simd::element_group_words8(blocks, key, g, step, param_id);
    for (int b = 0; b < 4; ++b) {
      alignas(32) uint32_t lanes[4][8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), blocks[b].w0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), blocks[b].w1);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), blocks[b].w2);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[3]), blocks[b].w3);
      for (int j = 0; j < 8; ++j) {
        uint32_t w[4];
        mergopt::element_group_words(key, g + 8 * b + j, step, param_id, w[0], w[1], w[2], w[3]);
        for (int k = 0; k < 4; ++k) {
          if (lanes[k][j] != w[k] && word_mismatches++ < 5) {
            EXPECT(false, "avx2 4-block philox group %llx block %d lane %d word %d: %08x != %08x",
                   static_cast<unsigned long long>(g), b, j, k, lanes[k][j], w[k]);
          }
        }
      }
    }
  }
  EXPECT(word_mismatches == 0, "%d philox word mismatches", word_mismatches);

  // Laplace: every value of w >> 8 (the low 8 bits are random), two (loc, scale) pairs.
  const float locs[2] = {0.0f, 0.25f};
  const float scales[2] = {1.0f, 5e-4f};
  int noise_mismatches = 0;
  for (int p = 0; p < 2; ++p) {
    const __m256 loc8 = _mm256_set1_ps(locs[p]);
    const __m256 scale8 = _mm256_set1_ps(scales[p]);
    for (uint32_t hi = 0; hi < (1u << 24); hi += 8) {
      alignas(32) uint32_t words[8];
      for (int j = 0; j < 8; ++j) words[j] = ((hi + j) << 8) | static_cast<uint32_t>(rng() & 0xff);
      if (hi == 0) words[0] = 0u;
      if (hi + 8 == (1u << 24)) words[7] = 0xffffffffu;
      alignas(32) float got[8];
      _mm256_store_ps(got, mergopt::simd::laplace8(_mm256_load_si256(reinterpret_cast<const __m256i*>(words)),
                                                   loc8, scale8));
      for (int j = 0; j < 8; ++j) {
        const float expected = mergopt::laplace_from_word(words[j], locs[p], scales[p]);
        if (mergopt::float_to_bits(got[j]) != mergopt::float_to_bits(expected) && noise_mismatches++ < 5) {
          EXPECT(false, "avx2 laplace(%08x) = %a, scalar %a", words[j], got[j], expected);
        }
      }
    }
    // Gaussian: random pairs and every pair of extreme words.
    const uint32_t extremes[8] = {0u, 0xffffffffu, 0x80000000u, 0x7fffffffu, 0xffu, 0x100u, 0xffffff00u, 0x12345678u};
    for (int i = 0; i < 200000; ++i) {
      alignas(32) uint32_t wa[8];
      alignas(32) uint32_t wb[8];
      for (int j = 0; j < 8; ++j) {
        wa[j] = i < 8 ? extremes[i] : static_cast<uint32_t>(rng());
        wb[j] = i < 8 ? extremes[j] : static_cast<uint32_t>(rng());
      }
      __m256 first;
      __m256 second;
      mergopt::simd::gaussian8(_mm256_load_si256(reinterpret_cast<const __m256i*>(wa)),
                               _mm256_load_si256(reinterpret_cast<const __m256i*>(wb)), loc8, scale8, first, second);
      alignas(32) float f[8];
      alignas(32) float s[8];
      _mm256_store_ps(f, first);
      _mm256_store_ps(s, second);
      for (int j = 0; j < 8; ++j) {
        float ef;
        float es;
        mergopt::gaussian_from_words(wa[j], wb[j], locs[p], scales[p], ef, es);
        if ((mergopt::float_to_bits(f[j]) != mergopt::float_to_bits(ef) ||
             mergopt::float_to_bits(s[j]) != mergopt::float_to_bits(es)) &&
            noise_mismatches++ < 5) {
          EXPECT(false, "avx2 gaussian(%08x, %08x) = (%a, %a), scalar (%a, %a)", wa[j], wb[j], f[j], s[j], ef, es);
        }
      }
    }
  }
  EXPECT(noise_mismatches == 0, "%d noise mismatches", noise_mismatches);

  // scaled_noise8<B>: element 4 (G - g) + k is factor * noise of word k of group G, for one
  // block and for the four interleaved blocks of the fused step (the 2**32 carry inside them).
  for (int dist = 0; dist < 2; ++dist) {
    const auto d = static_cast<mergopt::Distribution>(dist);
    for (uint64_t g : {0ull, 0xfffffffcull, 0xffffffeeull, 12345678901ull}) {
      float one[32];
      float four[128];
      mergopt::simd::scaled_noise32(one, key, g, 5, 9, d, 0.25f, 5e-4f, -0.75f);
      mergopt::simd::scaled_noise8<4>(four, key, g, 5, 9, d, 0.25f, 5e-4f, -0.75f);
      for (int j = 0; j < 32; ++j) {
        uint32_t w[4];
        float z[4];
        mergopt::element_group_words(key, g + j, 5, 9, w[0], w[1], w[2], w[3]);
        mergopt::noise_from_words(d, w[0], w[1], w[2], w[3], 0.25f, 5e-4f, z);
        for (int k = 0; k < 4; ++k) {
          const uint32_t expected = mergopt::float_to_bits(-0.75f * z[k]);
          EXPECT(mergopt::float_to_bits(four[4 * j + k]) == expected && (j >= 8 || mergopt::float_to_bits(one[4 * j + k]) == expected),
                 "scaled_noise8 dist %d group %llx element %d: %a, %a != %a", dist,
                 static_cast<unsigned long long>(g), 4 * j + k, four[4 * j + k], j < 8 ? one[4 * j + k] : 0.0f,
                 -0.75f * z[k]);
        }
      }
    }
  }
  if (g_failures == failures_before) std::printf("avx2 stream: bit-identical to the scalar stream\n");
}
#endif

#if MERGOPT_HAVE_AVX512
#define MERGOPT_TEST_AVX512 __attribute__((target("avx512f,avx512dq")))
// Compares the 16 lanes of element_group_words16 at group g with the scalar words.
MERGOPT_TEST_AVX512 void check_groups16(mergopt::PhiloxKey key, uint64_t g, uint32_t step, uint32_t param_id,
                                        int& word_mismatches) {
  const mergopt::simd::Words16 v = mergopt::simd::element_group_words16(key, g, step, param_id);
  alignas(64) uint32_t lanes[4][16];
  _mm512_store_si512(lanes[0], v.w0);
  _mm512_store_si512(lanes[1], v.w1);
  _mm512_store_si512(lanes[2], v.w2);
  _mm512_store_si512(lanes[3], v.w3);
  for (int j = 0; j < 16; ++j) {
    uint32_t w[4];
    mergopt::element_group_words(key, g + j, step, param_id, w[0], w[1], w[2], w[3]);
    for (int k = 0; k < 4; ++k) {
      if (lanes[k][j] != w[k] && word_mismatches++ < 5) {
        EXPECT(false, "avx512 philox group %llx lane %d word %d: %08x != %08x", static_cast<unsigned long long>(g),
               j, k, lanes[k][j], w[k]);
      }
    }
  }
}

// The AVX-512 stream against the scalar one, bit for bit (as test_avx2_matches_scalar).
MERGOPT_TEST_AVX512 void test_avx512_matches_scalar() {
  const int failures_before = g_failures;
  const mergopt::PhiloxKey key = mergopt::philox_key(0x9E3779B97F4A7C15ull ^ (1ull << 63));
  std::mt19937_64 rng(77);
  int word_mismatches = 0;
  for (uint64_t hi = 0; hi < 3; ++hi) {
    for (int back = 0; back <= 16; ++back) {  // every offset of the 16 lanes across lo = 0xffffffff
      check_groups16(key, (hi << 32) + 0xfffffff0ull + back, 7, 3, word_mismatches);
      check_groups16(key, (hi << 32) + back, 2, 0xfffffffeu, word_mismatches);
    }
  }
  check_groups16(key, 0xfffffffffffffff0ull, 1, 1, word_mismatches);  // the last lane is G = 2**64 - 1
  for (int i = 0; i < 50000; ++i) {
    check_groups16(key, rng(), static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng()), word_mismatches);
  }
  // The four-block call, whose rounds 1 and 2 take a scalar shortcut unless a lane carries.
  for (int i = 0; i < 20000; ++i) {
    uint64_t g = rng();
    if (i < 130) g = (static_cast<uint64_t>(i % 3) << 32) + 0xffffffffull - 64 - 64 + i;  // the carry, both ways
    const uint32_t step = static_cast<uint32_t>(rng());
    const uint32_t param_id = static_cast<uint32_t>(rng());
    mergopt::simd::Words16 blocks[4];
    mergopt::simd::element_group_words16(blocks, key, g, step, param_id);
    for (int b = 0; b < 4; ++b) {
      alignas(64) uint32_t lanes[4][16];
      _mm512_store_si512(lanes[0], blocks[b].w0);
      _mm512_store_si512(lanes[1], blocks[b].w1);
      _mm512_store_si512(lanes[2], blocks[b].w2);
      _mm512_store_si512(lanes[3], blocks[b].w3);
      for (int j = 0; j < 16; ++j) {
        uint32_t w[4];
        mergopt::element_group_words(key, g + 16 * b + j, step, param_id, w[0], w[1], w[2], w[3]);
        for (int k = 0; k < 4; ++k) {
          if (lanes[k][j] != w[k] && word_mismatches++ < 5) {
            EXPECT(false, "avx512 4-block philox group %llx block %d lane %d word %d: %08x != %08x",
                   static_cast<unsigned long long>(g), b, j, k, lanes[k][j], w[k]);
          }
        }
      }
    }
  }
  EXPECT(word_mismatches == 0, "%d avx512 philox word mismatches", word_mismatches);

  const float locs[2] = {0.0f, 0.25f};
  const float scales[2] = {1.0f, 5e-4f};
  int noise_mismatches = 0;
  for (int p = 0; p < 2; ++p) {
    const __m512 loc16 = _mm512_set1_ps(locs[p]);
    const __m512 scale16 = _mm512_set1_ps(scales[p]);
    for (uint32_t hi = 0; hi < (1u << 24); hi += 16) {  // every value of w >> 8
      alignas(64) uint32_t words[16];
      for (int j = 0; j < 16; ++j) words[j] = ((hi + j) << 8) | static_cast<uint32_t>(rng() & 0xff);
      if (hi == 0) words[0] = 0u;
      if (hi + 16 == (1u << 24)) words[15] = 0xffffffffu;
      alignas(64) float got[16];
      _mm512_store_ps(got, mergopt::simd::laplace16(_mm512_load_si512(words), loc16, scale16));
      for (int j = 0; j < 16; ++j) {
        const float expected = mergopt::laplace_from_word(words[j], locs[p], scales[p]);
        if (mergopt::float_to_bits(got[j]) != mergopt::float_to_bits(expected) && noise_mismatches++ < 5) {
          EXPECT(false, "avx512 laplace(%08x) = %a, scalar %a", words[j], got[j], expected);
        }
      }
    }
    const uint32_t extremes[8] = {0u, 0xffffffffu, 0x80000000u, 0x7fffffffu, 0xffu, 0x100u, 0xffffff00u, 0x12345678u};
    for (int i = 0; i < 100000; ++i) {
      alignas(64) uint32_t wa[16];
      alignas(64) uint32_t wb[16];
      for (int j = 0; j < 16; ++j) {
        wa[j] = i < 8 ? extremes[i] : static_cast<uint32_t>(rng());
        wb[j] = i < 8 ? extremes[j % 8] : static_cast<uint32_t>(rng());
      }
      __m512 first;
      __m512 second;
      mergopt::simd::gaussian16(_mm512_load_si512(wa), _mm512_load_si512(wb), loc16, scale16, first, second);
      alignas(64) float f[16];
      alignas(64) float s[16];
      _mm512_store_ps(f, first);
      _mm512_store_ps(s, second);
      for (int j = 0; j < 16; ++j) {
        float ef;
        float es;
        mergopt::gaussian_from_words(wa[j], wb[j], locs[p], scales[p], ef, es);
        if ((mergopt::float_to_bits(f[j]) != mergopt::float_to_bits(ef) ||
             mergopt::float_to_bits(s[j]) != mergopt::float_to_bits(es)) &&
            noise_mismatches++ < 5) {
          EXPECT(false, "avx512 gaussian(%08x, %08x) = (%a, %a), scalar (%a, %a)", wa[j], wb[j], f[j], s[j], ef,
                 es);
        }
      }
    }
  }
  EXPECT(noise_mismatches == 0, "%d avx512 noise mismatches", noise_mismatches);

  for (int dist = 0; dist < 2; ++dist) {
    const auto d = static_cast<mergopt::Distribution>(dist);
    for (uint64_t g : {0ull, 0xfffffff8ull, 0xffffffdaull, 12345678901ull}) {
      float one[64];
      float four[256];
      mergopt::simd::scaled_noise64(one, key, g, 5, 9, d, 0.25f, 5e-4f, -0.75f);
      mergopt::simd::scaled_noise16<4>(four, key, g, 5, 9, d, 0.25f, 5e-4f, -0.75f);
      for (int j = 0; j < 64; ++j) {
        uint32_t w[4];
        float z[4];
        mergopt::element_group_words(key, g + j, 5, 9, w[0], w[1], w[2], w[3]);
        mergopt::noise_from_words(d, w[0], w[1], w[2], w[3], 0.25f, 5e-4f, z);
        for (int k = 0; k < 4; ++k) {
          const uint32_t expected = mergopt::float_to_bits(-0.75f * z[k]);
          EXPECT(mergopt::float_to_bits(four[4 * j + k]) == expected && (j >= 16 || mergopt::float_to_bits(one[4 * j + k]) == expected),
                 "scaled_noise16 dist %d group %llx element %d: %a, %a != %a", dist,
                 static_cast<unsigned long long>(g), 4 * j + k, four[4 * j + k], j < 16 ? one[4 * j + k] : 0.0f,
                 -0.75f * z[k]);
        }
      }
    }
  }
  if (g_failures == failures_before) std::printf("avx512 stream: bit-identical to the scalar stream\n");
}
#endif

}  // namespace

int main() {
  test_known_answers();
  test_stream_layout();
  test_extreme_words();
  test_adamw_against_double();
  test_log_exhaustive();
  test_sincos_exhaustive();
#if MERGOPT_HAVE_AVX2
  if (mergopt::simd::cpu_has_avx2()) {
    test_avx2_matches_scalar();
  } else {
    std::printf("avx2 stream: skipped, the CPU has no AVX2\n");
  }
#endif
#if MERGOPT_HAVE_AVX512
  if (mergopt::simd::cpu_has_avx512()) {
    test_avx512_matches_scalar();
  } else {
    std::printf("avx512 stream: skipped, the CPU has no AVX-512\n");
  }
#endif
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return EXIT_FAILURE;
  }
  std::printf("all core tests passed\n");
  return EXIT_SUCCESS;
}
