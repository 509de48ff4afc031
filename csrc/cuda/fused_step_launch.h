// Host API of the CUDA fused step (fused_step_kernel.cu). Plain C++ + the CUDA runtime: the
// torch binding (fused_step_binding.cpp) and the CUDA test program include it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mergopt_cuda {

enum class ParamType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

constexpr int kMaxAlphas = 16;

// One parameter tensor (contiguous, on the device). grad == nullptr: no AdamW this step;
// master == nullptr: theta is restored from param; exp_avg etc. are read only with a grad.
struct TensorDesc {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // amsgrad only
  float* master;
  const float* step;      // device fp32 scalar: the AdamW step count, already incremented
  int64_t numel;
  int64_t base;           // global index of local element 0 (sharded parameters)
  uint32_t param_id;
};

struct StepConfig {
  uint64_t seed;
  const int64_t* noise_step;  // device int64 scalar t: read in the kernel (CUDA-graph capturable)
  double lr, beta1, beta2, eps, weight_decay;
  float alphas[kMaxAlphas];
  uint32_t n_alphas;
  uint32_t k_max;
  float noise_loc;
  float noise_scale;          // 0: no noise
  int distribution;           // mergopt::Distribution
  int apply_offset;           // -1: write theta; >= 0: write theta + s_u z_u, u = t + apply_offset
  bool restore;
  bool amsgrad;
  bool maximize;
  ParamType param_type;
};

// Runs the fused step over `n_tensors` tensors on `stream`: one launch per up to kMaxTensors
// tensors / kMaxBlocks chunks (apex multi_tensor_apply). Returns the first launch error.
cudaError_t launch_fused_step(const TensorDesc* tensors, int n_tensors, const StepConfig& config,
                              cudaStream_t stream);

}  // namespace mergopt_cuda
