// Torch binding of the CUDA fused step: mergopt_kernels::fused_step for the CUDA dispatch key.
// Built only where torch has CUDA (setup.py); the kernels live in fused_step_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "fused_step_launch.h"
#include "torch_common/fused_step_args.h"

namespace mergopt_cuda {
namespace {

void fused_step_cuda(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList masters, at::TensorList steps, at::IntArrayRef param_ids,
                     at::IntArrayRef index_bases, int64_t seed, const at::Tensor& noise_step, double lr,
                     double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                     double noise_loc, double noise_scale, at::ArrayRef<double> alphas, int64_t k_max,
                     c10::string_view distribution, bool restore, int64_t apply_offset) {
  const std::vector<std::optional<at::Tensor>> grad_of = mergopt_torch::check_fused_step_args(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, param_ids, index_bases, noise_step,
      amsgrad, alphas, k_max);
  const mergopt::Distribution dist = mergopt_torch::parse_distribution(distribution);
  TORCH_CHECK(alphas.size() <= static_cast<size_t>(kMaxAlphas), "fused_step (CUDA): at most ", kMaxAlphas,
              " alphas");
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cuda(), "fused_step (CUDA): params are on ", params[0].device());
  const c10::cuda::CUDAGuard guard(params[0].device());

  StepConfig config{};
  config.seed = static_cast<uint64_t>(seed);  // the int64's two's-complement bits
  config.noise_step = noise_step.data_ptr<int64_t>();
  config.lr = lr;
  config.beta1 = beta1;
  config.beta2 = beta2;
  config.eps = eps;
  config.weight_decay = weight_decay;
  for (size_t i = 0; i < alphas.size(); ++i) config.alphas[i] = static_cast<float>(alphas[i]);
  config.n_alphas = static_cast<uint32_t>(alphas.size());
  config.k_max = static_cast<uint32_t>(k_max);
  config.noise_loc = static_cast<float>(noise_loc);
  config.noise_scale = static_cast<float>(noise_scale);
  config.distribution = static_cast<int>(dist);
  config.apply_offset = apply_offset < 0 ? -1 : static_cast<int>(apply_offset);
  config.restore = restore;
  config.amsgrad = amsgrad;
  config.maximize = maximize;
  const at::ScalarType dtype = params[0].scalar_type();
  config.param_type = dtype == at::kBFloat16 ? ParamType::kBFloat16
                      : dtype == at::kHalf   ? ParamType::kHalf
                                             : ParamType::kFloat;

  std::vector<TensorDesc> descs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TensorDesc& d = descs[i];
    d = TensorDesc{};
    d.param = params[i].data_ptr();
    d.master = masters.empty() ? nullptr : masters[i].data_ptr<float>();
    d.numel = params[i].numel();
    d.base = index_bases[i];
    d.param_id = static_cast<uint32_t>(param_ids[i]);
    if (grad_of[i].has_value()) {
      TORCH_CHECK(steps[i].device() == params[i].device() && steps[i].scalar_type() == at::kFloat,
                  "fused_step (CUDA): steps[", i, "] must be an fp32 tensor on ", params[i].device());
      d.grad = grad_of[i]->data_ptr();
      d.exp_avg = exp_avgs[i].data_ptr<float>();
      d.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
      d.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr;
      d.step = steps[i].data_ptr<float>();
    }
  }
  C10_CUDA_CHECK(launch_fused_step(descs.data(), static_cast<int>(descs.size()), config,
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace mergopt_cuda

TORCH_LIBRARY_IMPL(mergopt_kernels, CUDA, m) { m.impl("fused_step", &mergopt_cuda::fused_step_cuda); }
