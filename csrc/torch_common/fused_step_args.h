// Argument checks of mergopt_kernels::fused_step shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "mergopt/noise.h"

namespace mergopt_torch {

constexpr int64_t kMaxParamId = 0xFFFFFFFFll;  // mergopt::kScaleStream is reserved

inline mergopt::Distribution parse_distribution(c10::string_view distribution) {
  if (distribution == "laplace") return mergopt::Distribution::kLaplace;
  if (distribution == "gaussian") return mergopt::Distribution::kGaussian;
  TORCH_CHECK(false, "fused_step: distribution must be 'laplace' or 'gaussian', got '", std::string(distribution),
              "'");
}

inline void check_like(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* what,
                       size_t i) {
  TORCH_CHECK(t.device() == param.device(), "fused_step: ", what, "[", i, "] is on ", t.device(), ", params[", i,
              "] on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_step: ", what, "[", i, "] has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.numel() == param.numel(), "fused_step: ", what, "[", i, "] has ", t.numel(), " elements, params[",
              i, "] ", param.numel());
  TORCH_CHECK(t.is_contiguous(), "fused_step: ", what, "[", i, "] must be contiguous");
}

// Checks every argument; returns the gradient of each parameter (nullopt: none this step).
// Tensors read only for a parameter with a gradient (moments, step) may be placeholders otherwise.
inline std::vector<std::optional<at::Tensor>> check_fused_step_args(
    at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters, at::TensorList steps,
    at::IntArrayRef param_ids, at::IntArrayRef index_bases, const at::Tensor& noise_step, bool amsgrad,
    at::ArrayRef<double> alphas, int64_t k_max) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  param_ids.size() == n && index_bases.size() == n,
              "fused_step: params, grads, exp_avgs, exp_avg_sqs, steps, param_ids and index_bases must have the "
              "same length");
  TORCH_CHECK(max_exp_avg_sqs.size() == (amsgrad ? n : 0), "fused_step: max_exp_avg_sqs must have ",
              amsgrad ? n : 0, " tensors");
  TORCH_CHECK(masters.empty() || masters.size() == n, "fused_step: masters must be empty or match params");
  TORCH_CHECK(noise_step.numel() == 1 && noise_step.scalar_type() == at::kLong,
              "fused_step: noise_step must be a 1-element int64 tensor");
  TORCH_CHECK(!alphas.empty() && alphas.size() < (1ull << 32), "fused_step: alphas must be non-empty");
  TORCH_CHECK(k_max >= 1 && k_max < kMaxParamId, "fused_step: k_max must be in [1, 2**32 - 1)");
  std::vector<std::optional<at::Tensor>> result(n);
  if (n == 0) return result;
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_step: unsupported parameter dtype ", dtype);
  TORCH_CHECK(noise_step.device() == params[0].device(), "fused_step: noise_step is on ", noise_step.device(),
              ", params on ", params[0].device());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == params[0].device() && p.scalar_type() == dtype,
                "fused_step: all params must share one device and dtype");
    TORCH_CHECK(p.is_contiguous(), "fused_step: params[", i, "] must be contiguous");
    TORCH_CHECK(param_ids[i] >= 0 && param_ids[i] < kMaxParamId, "fused_step: param_ids[", i, "] out of range");
    TORCH_CHECK(index_bases[i] >= 0, "fused_step: index_bases[", i, "] must be >= 0");
    if (!masters.empty()) check_like(masters[i], p, at::kFloat, "masters", i);
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    check_like(*g, p, dtype, "grads", i);
    check_like(exp_avgs[i], p, at::kFloat, "exp_avgs", i);
    check_like(exp_avg_sqs[i], p, at::kFloat, "exp_avg_sqs", i);
    if (amsgrad) check_like(max_exp_avg_sqs[i], p, at::kFloat, "max_exp_avg_sqs", i);
    TORCH_CHECK(steps[i].numel() == 1, "fused_step: steps[", i, "] must have one element");
    result[i] = *g;
  }
  return result;
}

}  // namespace mergopt_torch
