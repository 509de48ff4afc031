// The CUDA fused step against the host core, bit for bit (both without FMA contraction).
// Built by CMake wherever nvcc is; run it on a machine with a GPU (exit 0: pass, 77: no GPU).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fused_step_launch.h"
#include "mergopt/adamw.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"
#include "mergopt/step_args.h"

#define CHECK_CUDA(call)                                                              \
  do {                                                                                \
    cudaError_t err_ = (call);                                                        \
    if (err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

namespace {

uint32_t bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// s_step z of element `index`, from the host core's scalar code.
float host_delta(const mergopt::StepArgs& c, uint32_t step, uint32_t param_id, int64_t index) {
  const mergopt::PhiloxKey key = mergopt::philox_key(c.seed);
  uint32_t w[4];
  float z[4];
  mergopt::element_group_words(key, static_cast<uint64_t>(index >> 2), step, param_id, w[0], w[1], w[2], w[3]);
  mergopt::noise_from_words(c.distribution, w[0], w[1], w[2], w[3], static_cast<float>(c.noise_loc),
                            static_cast<float>(c.noise_scale), z);
  const float s = mergopt::step_scale(key, step, c.alphas, c.n_alphas, c.k_max);
  return s * z[index & 3];
}

int run_case(mergopt::Distribution distribution, bool amsgrad) {
  const int64_t sizes[] = {1, 7, 4099, 70001, 3000000};
  const int64_t bases[] = {0, 5, 3, (1ll << 34) + 1, 2};
  const int n = 5;
  float alphas[6];
  for (int i = 0; i < 6; ++i) alphas[i] = 0.1f * (i + 1);
  mergopt::StepArgs c{};
  c.seed = 0x9E3779B97F4A7C15ull;
  c.lr = 1e-3; c.beta1 = 0.9; c.beta2 = 0.999; c.eps = 1e-8; c.weight_decay = 0.01;
  c.alphas = alphas;
  c.n_alphas = 6; c.k_max = 7; c.noise_loc = 0.0; c.noise_scale = 5e-4;
  c.distribution = distribution; c.apply_offset = 1; c.restore = true; c.amsgrad = amsgrad; c.maximize = false;
  c.param_dtype = mergopt::ParamDtype::kFloat;
  const int64_t t = 7;
  int64_t* d_t;
  CHECK_CUDA(cudaMalloc(&d_t, sizeof(int64_t)));
  CHECK_CUDA(cudaMemcpy(d_t, &t, sizeof(t), cudaMemcpyHostToDevice));
  c.noise_step = d_t;
  const float step = 3.0f;
  float* d_step;
  CHECK_CUDA(cudaMalloc(&d_step, sizeof(float)));
  CHECK_CUDA(cudaMemcpy(d_step, &step, sizeof(step), cudaMemcpyHostToDevice));

  std::vector<mergopt::TensorArgs> descs(n);
  std::vector<std::vector<float>> host(n * 5);
  std::vector<float*> device(n * 5);
  for (int i = 0; i < n; ++i) {
    for (int a = 0; a < 5; ++a) {  // param, grad, m, v, vmax
      std::vector<float>& h = host[5 * i + a];
      h.resize(sizes[i]);
      for (int64_t j = 0; j < sizes[i]; ++j) h[j] = std::sin(0.37f * j + a + i) * (a >= 3 ? 1e-4f : 0.1f);
      if (a >= 3) for (float& x : h) x = std::fabs(x);
      CHECK_CUDA(cudaMalloc(&device[5 * i + a], sizes[i] * sizeof(float)));
      CHECK_CUDA(cudaMemcpy(device[5 * i + a], h.data(), sizes[i] * sizeof(float), cudaMemcpyHostToDevice));
    }
    descs[i] = mergopt::TensorArgs{device[5 * i], i == 2 ? nullptr : device[5 * i + 1], device[5 * i + 2],
                                   device[5 * i + 3], amsgrad ? device[5 * i + 4] : nullptr, nullptr, d_step,
                                   sizes[i], bases[i], static_cast<uint32_t>(10 + i)};
  }
  CHECK_CUDA(mergopt_cuda::launch_fused_step(descs.data(), n, c, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());

  int mismatches = 0;
  const mergopt::AdamWScalars s = mergopt::adamw_scalars(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, step);
  for (int i = 0; i < n; ++i) {
    std::vector<float> got(sizes[i]);
    CHECK_CUDA(cudaMemcpy(got.data(), device[5 * i], sizes[i] * sizeof(float), cudaMemcpyDeviceToHost));
    for (int64_t j = 0; j < sizes[i]; ++j) {
      const int64_t index = bases[i] + j;
      float theta = host[5 * i][j] - host_delta(c, 7, 10 + i, index);
      float m = host[5 * i + 2][j], v = host[5 * i + 3][j], vmax = host[5 * i + 4][j];
      if (i != 2 && amsgrad) mergopt::adamw_update<true>(theta, host[5 * i + 1][j], m, v, vmax, s, false);
      if (i != 2 && !amsgrad) mergopt::adamw_update<false>(theta, host[5 * i + 1][j], m, v, vmax, s, false);
      const float expected = theta + host_delta(c, 8, 10 + i, index);
      if (bits(expected) != bits(got[j]) && mismatches++ < 10) {
        std::fprintf(stderr, "tensor %d element %lld: %a != %a\n", i, static_cast<long long>(j), got[j], expected);
      }
    }
  }
  for (float* p : device) CHECK_CUDA(cudaFree(p));
  CHECK_CUDA(cudaFree(d_t));
  CHECK_CUDA(cudaFree(d_step));
  std::printf("distribution %d amsgrad %d: %d mismatches\n", static_cast<int>(distribution), amsgrad, mismatches);
  return mismatches;
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  int failures = 0;
  for (mergopt::Distribution distribution : {mergopt::Distribution::kLaplace, mergopt::Distribution::kGaussian}) {
    failures += run_case(distribution, false);
    failures += run_case(distribution, true);
  }
  return failures == 0 ? 0 : 1;
}
