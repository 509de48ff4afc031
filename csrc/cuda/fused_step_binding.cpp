// Torch binding of the CUDA fused step: mergopt_kernels::fused_step for the CUDA dispatch key.
// Built only where torch has CUDA (setup.py); the kernels live in fused_step_kernel.cu, the
// argument checks and conversion in torch_common/fused_step_args.h.
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

void run_step(const mergopt::StepArgs& args, const std::vector<mergopt::TensorArgs>& tensors,
              const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "fused_step (CUDA): params are on ", device);
  TORCH_CHECK(args.n_alphas <= kMaxAlphas, "fused_step (CUDA): at most ", kMaxAlphas, " alphas, got ", args.n_alphas);
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch_fused_step(tensors.data(), static_cast<int>(tensors.size()), args,
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace mergopt_cuda

TORCH_LIBRARY_IMPL(mergopt_kernels, CUDA, m) {
  m.impl("fused_step", &mergopt_torch::fused_step<mergopt_cuda::run_step>);
}
