// Host API of the CUDA fused step (fused_step_kernel.cu). Plain C++ + the CUDA runtime: the
// torch binding (fused_step_binding.cpp) and the CUDA test program include it.
#pragma once

#include <cuda_runtime.h>

#include "mergopt/step_args.h"

namespace mergopt_cuda {

// The kernel takes the alphas by value, at most this many.
constexpr uint32_t kMaxAlphas = 16;

// Runs the fused step over `n_tensors` tensors (in device memory; `args.noise_step` and each
// tensor's `step` too, read in the kernel) on `stream`: one launch per up to kMaxTensors tensors /
// kMaxBlocks chunks (apex multi_tensor_apply). Returns the first launch error, or
// cudaErrorInvalidValue for arguments the kernel cannot take (no alphas or more than kMaxAlphas,
// k_max 0).
cudaError_t launch_fused_step(const mergopt::TensorArgs* tensors, int n_tensors, const mergopt::StepArgs& args,
                              cudaStream_t stream);

}  // namespace mergopt_cuda
