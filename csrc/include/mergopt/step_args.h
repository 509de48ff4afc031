// The arguments of one fused step, shared by the CPU op (csrc/cpu), the CUDA kernel
// (csrc/cuda) and its test program. Plain C++ plus our own headers: .cu files that include only
// the CUDA runtime can use it. The names are those of mergopt_kernels/ops/step_args.py's
// FusedStepArgs (per tensor: the singular of its list fields).
#pragma once

#include <cstdint>

#include "mergopt/adamw.h"
#include "mergopt/config.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"

namespace mergopt {

// Parameter (and gradient) dtype; moments and masters are always fp32.
enum class ParamDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// One contiguous parameter tensor and its state, all in the memory of the device that runs the
// step. grad == nullptr: no AdamW for it this step (exp_avg, exp_avg_sq, max_exp_avg_sq and step
// are then not read); master == nullptr: theta is restored from param.
struct TensorArgs {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // amsgrad only
  float* master;          // fp32 theta of a low-precision parameter
  const float* step;      // fp32 scalar: the AdamW step count, already incremented
  int64_t numel;
  int64_t index_base;     // index of element 0 in the whole parameter (sharded parameters)
  uint32_t param_id;      // the parameter's identity in the noise stream
};

// Everything else of one step, for tensors of one device and dtype.
struct StepArgs {
  uint64_t seed;
  const int64_t* noise_step;  // int64 scalar t on the tensors' device (read there: graph capturable)
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad;
  bool maximize;
  double noise_loc;
  double noise_scale;         // 0: no noise
  const float* alphas;        // n_alphas values in host memory
  uint32_t n_alphas;
  uint32_t k_max;
  Distribution distribution;
  bool restore;               // params hold theta + s_t z_t on entry
  int32_t apply_offset;       // -1: write theta; >= 0: write theta + s_u z_u, u = t + apply_offset
  ParamDtype param_dtype;
};

// What a step draws from: derived from StepArgs once t is known (once per call on the host,
// once per block on a GPU).
struct StepNoise {
  PhiloxKey key;
  Distribution distribution;
  float loc;
  float scale;
  bool restore;          // subtract s_t z_t (noise on, restore; parameters without a master only)
  bool apply;            // add s_u z_u (noise on, apply_offset >= 0)
  uint32_t step;         // t
  uint32_t apply_step;   // u
  float restore_scale;   // s_t, 0 with the noise off
  float apply_scale;     // s_u, 0 with the noise off
};

// `alphas` holds args.n_alphas values readable where this runs (args.alphas on the host).
MERGOPT_HOST_DEVICE MERGOPT_INLINE StepNoise step_noise(const StepArgs& args, int64_t t, const float* alphas) {
  StepNoise n;
  n.key = philox_key(args.seed);
  n.distribution = args.distribution;
  n.loc = static_cast<float>(args.noise_loc);
  n.scale = static_cast<float>(args.noise_scale);
  const bool noise_on = args.noise_scale != 0.0;
  n.restore = noise_on && args.restore;
  n.apply = noise_on && args.apply_offset >= 0;
  n.step = static_cast<uint32_t>(t);
  n.apply_step = static_cast<uint32_t>(t + (args.apply_offset > 0 ? args.apply_offset : 0));
  n.restore_scale = noise_on ? step_scale(n.key, n.step, alphas, args.n_alphas, args.k_max) : 0.0f;
  n.apply_scale = noise_on ? step_scale(n.key, n.apply_step, alphas, args.n_alphas, args.k_max) : 0.0f;
  return n;
}

// AdamW's scalars for tensor `t` (its step is read only when it has a gradient).
MERGOPT_HOST_DEVICE MERGOPT_INLINE AdamWScalars tensor_adamw_scalars(const StepArgs& args, const TensorArgs& t) {
  const double step = t.grad != nullptr ? static_cast<double>(*t.step) : 1.0;
  return adamw_scalars(args.lr, args.beta1, args.beta2, args.eps, args.weight_decay, step);
}

}  // namespace mergopt
