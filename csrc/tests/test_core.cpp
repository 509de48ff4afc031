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

}  // namespace

int main() {
  test_known_answers();
  test_stream_layout();
  test_extreme_words();
  test_adamw_against_double();
  test_log_exhaustive();
  test_sincos_exhaustive();
  if (g_failures) {
    std::fprintf(stderr, "%d failure(s)\n", g_failures);
    return EXIT_FAILURE;
  }
  std::printf("all core tests passed\n");
  return EXIT_SUCCESS;
}
