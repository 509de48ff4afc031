// mergopt_kernels::fused_step's torch-facing side, shared by the CPU and CUDA implementations:
// the schema, the flat signature, the argument checks and the conversion into the structs of
// mergopt/step_args.h. The schema lists the fields of FusedStepArgs (ops/step_args.py) in order;
// python_tests/test_native_cpu.py checks that the two agree.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "mergopt/noise.h"
#include "mergopt/step_args.h"

namespace mergopt_torch {

constexpr const char* kFusedStepSchema =
    "fused_step(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor[] steps, int[] param_ids, int[] index_bases, "
    "int seed, Tensor noise_step, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "bool amsgrad, bool maximize, float noise_loc, float noise_scale, float[] alphas, int k_max, "
    "str distribution, bool restore, int apply_offset) -> ()";

constexpr int64_t kMaxParamId = 0xFFFFFFFFll;  // mergopt::kScaleStream is reserved

inline mergopt::Distribution parse_distribution(c10::string_view distribution) {
  if (distribution == "laplace") return mergopt::Distribution::kLaplace;
  if (distribution == "gaussian") return mergopt::Distribution::kGaussian;
  TORCH_CHECK(false, "fused_step: distribution must be 'laplace' or 'gaussian', got '", std::string(distribution),
              "'");
}

inline mergopt::ParamDtype param_dtype(at::ScalarType dtype) {
  if (dtype == at::kFloat) return mergopt::ParamDtype::kFloat;
  if (dtype == at::kBFloat16) return mergopt::ParamDtype::kBFloat16;
  TORCH_CHECK(dtype == at::kHalf, "fused_step: unsupported parameter dtype ", dtype,
              " (float32, bfloat16 or float16)");
  return mergopt::ParamDtype::kHalf;
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

// Runs a checked step on one device; `device` is the tensors' device.
using StepRunner = void (*)(const mergopt::StepArgs& args, const std::vector<mergopt::TensorArgs>& tensors,
                            const at::Device& device);

// The implementation of mergopt_kernels::fused_step for one dispatch key: checks every argument
// (before anything is written), fills StepArgs and one TensorArgs per parameter, and hands them
// to Run. Tensors read only for a parameter with a gradient (moments, step) may be placeholders
// otherwise.
template <StepRunner Run>
void fused_step(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                at::TensorList steps, at::IntArrayRef param_ids, at::IntArrayRef index_bases, int64_t seed,
                const at::Tensor& noise_step, double lr, double beta1, double beta2, double eps, double weight_decay,
                bool amsgrad, bool maximize, double noise_loc, double noise_scale, at::ArrayRef<double> alphas,
                int64_t k_max, c10::string_view distribution, bool restore, int64_t apply_offset) {
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
  TORCH_CHECK(apply_offset >= -1 && apply_offset <= 1, "fused_step: apply_offset must be -1, 0 or 1, got ",
              apply_offset);
  const mergopt::Distribution dist = parse_distribution(distribution);
  if (n == 0) return;

  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  std::vector<float> alphas_f(alphas.begin(), alphas.end());
  mergopt::StepArgs args{};
  args.seed = static_cast<uint64_t>(seed);  // the int64's two's-complement bits
  args.noise_step = noise_step.data_ptr<int64_t>();
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.noise_loc = noise_loc;
  args.noise_scale = noise_scale;
  args.alphas = alphas_f.data();
  args.n_alphas = static_cast<uint32_t>(alphas_f.size());
  args.k_max = static_cast<uint32_t>(k_max);
  args.distribution = dist;
  args.restore = restore;
  args.apply_offset = static_cast<int32_t>(apply_offset);
  args.param_dtype = param_dtype(dtype);
  TORCH_CHECK(noise_step.device() == device, "fused_step: noise_step is on ", noise_step.device(), ", params on ",
              device);

  std::vector<mergopt::TensorArgs> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device && p.scalar_type() == dtype,
                "fused_step: all params must share one device and dtype");
    TORCH_CHECK(p.is_contiguous(), "fused_step: params[", i, "] must be contiguous");
    TORCH_CHECK(param_ids[i] >= 0 && param_ids[i] < kMaxParamId, "fused_step: param_ids[", i, "] out of range");
    TORCH_CHECK(index_bases[i] >= 0, "fused_step: index_bases[", i, "] must be >= 0");
    mergopt::TensorArgs& t = tensors[i];  // value-initialised: no grad, no master
    t.param = p.data_ptr();
    t.numel = p.numel();
    t.index_base = index_bases[i];
    t.param_id = static_cast<uint32_t>(param_ids[i]);
    if (!masters.empty()) {
      check_like(masters[i], p, at::kFloat, "masters", i);
      t.master = masters[i].data_ptr<float>();
    }
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    check_like(*g, p, dtype, "grads", i);
    check_like(exp_avgs[i], p, at::kFloat, "exp_avgs", i);
    check_like(exp_avg_sqs[i], p, at::kFloat, "exp_avg_sqs", i);
    if (amsgrad) check_like(max_exp_avg_sqs[i], p, at::kFloat, "max_exp_avg_sqs", i);
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat && steps[i].device() == device,
                "fused_step: steps[", i, "] must be a 1-element fp32 tensor on ", device);
    t.grad = g->data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr;
    t.step = steps[i].data_ptr<float>();
  }
  Run(args, tensors, device);
}

}  // namespace mergopt_torch
