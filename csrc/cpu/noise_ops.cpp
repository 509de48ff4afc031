// Inspection ops of the noise stream on the CPU: the Philox words, the noise z and the step scale
// exactly as the fused step computes them (tests and other backends compare against these).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "mergopt/noise.h"
#include "mergopt/philox.h"

namespace mergopt_cpu {
namespace {

// One row per element start .. start + count - 1 of the parameter; calls cover whole groups.
template <typename Fn>
void for_each_group(int64_t start, int64_t count, Fn&& fn) {
  TORCH_CHECK(start >= 0 && count >= 0, "start and count must be >= 0");
  if (count == 0) return;
  for (int64_t g = start >> 2; g <= (start + count - 1) >> 2; ++g) fn(g);
}

at::Tensor noise_words(int64_t seed, int64_t param_id, int64_t step, int64_t start, int64_t count) {
  at::Tensor out = at::empty({count}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const mergopt::PhiloxKey key = mergopt::philox_key(static_cast<uint64_t>(seed));
  for_each_group(start, count, [&](int64_t g) {
    uint32_t w[4];
    mergopt::element_group_words(key, static_cast<uint64_t>(g), static_cast<uint32_t>(step),
                                 static_cast<uint32_t>(param_id), w[0], w[1], w[2], w[3]);
    for (int k = 0; k < 4; ++k) {
      const int64_t j = 4 * g + k - start;
      if (j >= 0 && j < count) o[j] = w[k];
    }
  });
  return out;
}

at::Tensor element_noise(int64_t seed, int64_t param_id, int64_t step, int64_t start, int64_t count, double loc,
                         double scale, c10::string_view distribution) {
  TORCH_CHECK(distribution == "laplace" || distribution == "gaussian", "unknown distribution");
  const auto dist = distribution == "laplace" ? mergopt::Distribution::kLaplace : mergopt::Distribution::kGaussian;
  at::Tensor out = at::empty({count}, at::kFloat);
  float* o = out.data_ptr<float>();
  const mergopt::PhiloxKey key = mergopt::philox_key(static_cast<uint64_t>(seed));
  for_each_group(start, count, [&](int64_t g) {
    uint32_t w[4];
    float z[4];
    mergopt::element_group_words(key, static_cast<uint64_t>(g), static_cast<uint32_t>(step),
                                 static_cast<uint32_t>(param_id), w[0], w[1], w[2], w[3]);
    mergopt::noise_from_words(dist, w[0], w[1], w[2], w[3], static_cast<float>(loc), static_cast<float>(scale), z);
    for (int k = 0; k < 4; ++k) {
      const int64_t j = 4 * g + k - start;
      if (j >= 0 && j < count) o[j] = z[k];
    }
  });
  return out;
}

double step_scale(int64_t seed, int64_t step, at::ArrayRef<double> alphas, int64_t k_max) {
  TORCH_CHECK(!alphas.empty() && k_max >= 1, "alphas must be non-empty and k_max >= 1");
  std::vector<float> a(alphas.begin(), alphas.end());
  return mergopt::step_scale(mergopt::philox_key(static_cast<uint64_t>(seed)), static_cast<uint32_t>(step), a.data(),
                             static_cast<uint32_t>(a.size()), static_cast<uint32_t>(k_max));
}

}  // namespace
}  // namespace mergopt_cpu

TORCH_LIBRARY_FRAGMENT(mergopt_kernels, m) {
  m.def("noise_words(int seed, int param_id, int step, int start, int count) -> Tensor", &mergopt_cpu::noise_words);
  m.def(
      "element_noise(int seed, int param_id, int step, int start, int count, float loc, float scale, "
      "str distribution) -> Tensor",
      &mergopt_cpu::element_noise);
  m.def("step_scale(int seed, int step, float[] alphas, int k_max) -> float", &mergopt_cpu::step_scale);
}
