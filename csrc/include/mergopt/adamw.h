// AdamW element update in fp32, in the order of torch.optim.AdamW's single-tensor path
// (torch/optim/adam.py, decoupled weight decay, foreach=False, fused=False, capturable=False).
#pragma once

#include <math.h>

#include "mergopt/config.h"

namespace mergopt {

// Per-tensor scalars, each rounded to fp32 exactly where torch hands a Python float to an fp32
// tensor op. Bias corrections are computed in double from the step count, as Python does.
struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay
  float lerp_weight;    // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float bias2_sqrt;     // sqrt(1 - beta2**step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1**step)
};

MERGOPT_HOST_DEVICE MERGOPT_INLINE AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps,
                                                              double weight_decay, double step) {
  const double bias1 = 1.0 - ::pow(beta1, step);
  const double bias2 = 1.0 - ::pow(beta2, step);
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.lerp_weight = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.bias2_sqrt = static_cast<float>(::pow(bias2, 0.5));  // Python: bias2 ** 0.5
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-(lr / bias1));
  return s;
}

// torch.lerp(start, end, weight) for a scalar weight (ATen Lerp.h).
MERGOPT_HOST_DEVICE MERGOPT_INLINE float lerp(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

// torch.maximum: NaN in either operand gives NaN.
MERGOPT_HOST_DEVICE MERGOPT_INLINE float nan_maximum(float a, float b) {
  const float larger = a < b ? b : a;
  return b != b ? b : larger;
}

// One AdamW step of one element. `param` is theta in fp32; the moments are updated in place.
// With kAmsgrad, `max_exp_avg_sq` holds max(v) over the steps and is used in the denominator.
template <bool kAmsgrad>
MERGOPT_HOST_DEVICE MERGOPT_INLINE void adamw_update(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                                                     float& max_exp_avg_sq, const AdamWScalars& s, bool maximize) {
  const float g = maximize ? -grad : grad;
  param = param * s.decay;
  exp_avg = lerp(exp_avg, g, s.lerp_weight);
  exp_avg_sq = exp_avg_sq * s.beta2;
  exp_avg_sq = exp_avg_sq + s.one_minus_beta2 * g * g;
  float second = exp_avg_sq;
  if (kAmsgrad) {
    max_exp_avg_sq = nan_maximum(max_exp_avg_sq, exp_avg_sq);
    second = max_exp_avg_sq;
  }
  const float denom = sqrtf(second) / s.bias2_sqrt + s.eps;
  param = param + s.neg_step_size * exp_avg / denom;
}

}  // namespace mergopt
