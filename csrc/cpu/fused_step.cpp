// CPU implementation of mergopt_kernels::fused_step, the schema, and its registration.
//
// Work is split into items of kItemGroups element groups (4 elements, one Philox call each),
// aligned to groups of the *global* element index so that no call is made twice; items of all
// tensors run under one at::parallel_for. The kernel body is compiled for baseline x86-64 and
// for AVX2 (chosen at run time by CPUID); -ffp-contract=off keeps the two bitwise identical.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "fused_step_common.h"

#define MERGOPT_CPU_NS generic
#include "fused_step_impl.h"
#undef MERGOPT_CPU_NS

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MERGOPT_HAVE_AVX2_PATH 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define MERGOPT_CPU_NS avx2
#include "fused_step_impl.h"
#undef MERGOPT_CPU_NS
#pragma GCC pop_options
#endif

namespace mergopt_cpu {
namespace {

constexpr int64_t kMaxParamId = 0xFFFFFFFFll;  // kScaleStream is reserved

bool use_avx2() {
#ifdef MERGOPT_HAVE_AVX2_PATH
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
#else
  return false;
#endif
}

Kind kind_of(at::ScalarType param) {
  switch (param) {
    case at::kFloat: return Kind::kFloat;
    case at::kBFloat16: return Kind::kBFloat16;
    case at::kHalf: return Kind::kHalf;
    default: TORCH_CHECK(false, "fused_step: unsupported parameter dtype ", param);
  }
}

void check_same(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* what, size_t i) {
  TORCH_CHECK(t.device() == param.device(), "fused_step: ", what, "[", i, "] is on ", t.device(), ", params[", i,
              "] on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_step: ", what, "[", i, "] has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.numel() == param.numel(), "fused_step: ", what, "[", i, "] has ", t.numel(), " elements, params[",
              i, "] ", param.numel());
  TORCH_CHECK(t.is_contiguous(), "fused_step: ", what, "[", i, "] must be contiguous");
}

}  // namespace

void fused_step_cpu(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList masters, at::TensorList steps, at::IntArrayRef param_ids,
                    at::IntArrayRef index_bases, int64_t seed, const at::Tensor& noise_step, double lr,
                    double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    double noise_loc, double noise_scale, at::ArrayRef<double> alphas, int64_t k_max,
                    c10::string_view distribution, bool restore, int64_t apply_offset) {
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
  TORCH_CHECK(k_max >= 1 && k_max <= kMaxParamId, "fused_step: k_max must be in [1, 2**32)");
  mergopt::Distribution dist;
  if (distribution == "laplace") {
    dist = mergopt::Distribution::kLaplace;
  } else if (distribution == "gaussian") {
    dist = mergopt::Distribution::kGaussian;
  } else {
    TORCH_CHECK(false, "fused_step: distribution must be 'laplace' or 'gaussian', got '", std::string(distribution),
                "'");
  }
  if (n == 0) return;

  StepArgs args;
  // seed arrives as int64: its two's-complement bits are the 64-bit Philox seed.
  args.noise = NoiseSpec{mergopt::philox_key(static_cast<uint64_t>(seed)), dist, static_cast<float>(noise_loc),
                         static_cast<float>(noise_scale)};
  args.noise_on = noise_scale != 0.0;
  args.restore = restore;
  args.apply = apply_offset >= 0;
  const int64_t t = noise_step.item<int64_t>();
  args.step = static_cast<uint32_t>(t);
  args.apply_step = static_cast<uint32_t>(t + (apply_offset > 0 ? apply_offset : 0));
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.restore_scale = 0.0f;
  args.apply_scale = 0.0f;
  if (args.noise_on) {
    std::vector<float> alphas_f(alphas.begin(), alphas.end());
    const auto n_alphas = static_cast<uint32_t>(alphas_f.size());
    args.restore_scale = mergopt::step_scale(args.noise.key, args.step, alphas_f.data(), n_alphas,
                                             static_cast<uint32_t>(k_max));
    args.apply_scale = mergopt::step_scale(args.noise.key, args.apply_step, alphas_f.data(), n_alphas,
                                           static_cast<uint32_t>(k_max));
  }

  const at::ScalarType param_dtype = params[0].scalar_type();
  std::vector<TensorArgs> tensors(n);
  std::vector<WorkItem> items;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "fused_step (CPU): params[", i, "] is on ", p.device());
    TORCH_CHECK(p.scalar_type() == param_dtype, "fused_step: all params must share one dtype");
    TORCH_CHECK(p.is_contiguous(), "fused_step: params[", i, "] must be contiguous");
    TORCH_CHECK(param_ids[i] >= 0 && param_ids[i] < kMaxParamId, "fused_step: param_ids[", i, "] out of range");
    TORCH_CHECK(index_bases[i] >= 0, "fused_step: index_bases[", i, "] must be >= 0");
    TensorArgs& a = tensors[i];
    const std::optional<at::Tensor> g = grads[i];
    const bool has_grad = g.has_value() && g->defined();
    a.kind = kind_of(param_dtype);
    a.param = p.data_ptr();
    a.grad = nullptr;
    a.exp_avg = a.exp_avg_sq = a.max_exp_avg_sq = nullptr;
    a.master = nullptr;
    a.numel = p.numel();
    a.base = index_bases[i];
    a.param_id = static_cast<uint32_t>(param_ids[i]);
    if (!masters.empty()) {
      check_same(masters[i], p, at::kFloat, "masters", i);
      a.master = masters[i].data_ptr<float>();
    }
    if (has_grad) {
      check_same(*g, p, param_dtype, "grads", i);
      check_same(exp_avgs[i], p, at::kFloat, "exp_avgs", i);
      check_same(exp_avg_sqs[i], p, at::kFloat, "exp_avg_sqs", i);
      a.grad = g->data_ptr();
      a.exp_avg = exp_avgs[i].data_ptr<float>();
      a.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
      if (amsgrad) {
        check_same(max_exp_avg_sqs[i], p, at::kFloat, "max_exp_avg_sqs", i);
        a.max_exp_avg_sq = max_exp_avg_sqs[i].data_ptr<float>();
      }
      TORCH_CHECK(steps[i].numel() == 1, "fused_step: steps[", i, "] must have one element");
      a.scalars = mergopt::adamw_scalars(lr, beta1, beta2, eps, weight_decay, steps[i].item<double>());
    } else {
      a.scalars = mergopt::adamw_scalars(lr, beta1, beta2, eps, weight_decay, 1.0);
    }
    if (a.numel == 0) continue;
    const int64_t g_first = a.base >> 2;
    const int64_t g_end = ((a.base + a.numel - 1) >> 2) + 1;
    for (int64_t g0 = g_first; g0 < g_end; g0 += kItemGroups) {
      items.push_back(WorkItem{static_cast<int64_t>(i), g0, std::min(g_end, g0 + kItemGroups)});
    }
  }

  const bool avx2 = use_avx2();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
#ifdef MERGOPT_HAVE_AVX2_PATH
    if (avx2) return avx2::run_items(tensors, items, args, begin, end);
#endif
    generic::run_items(tensors, items, args, begin, end);
  });
  (void)avx2;
}

}  // namespace mergopt_cpu

TORCH_LIBRARY(mergopt_kernels, m) {
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor[] steps, int[] param_ids, int[] index_bases, "
      "int seed, Tensor noise_step, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool amsgrad, bool maximize, float noise_loc, float noise_scale, float[] alphas, int k_max, "
      "str distribution, bool restore, int apply_offset) -> ()");
}

TORCH_LIBRARY_IMPL(mergopt_kernels, CPU, m) { m.impl("fused_step", &mergopt_cpu::fused_step_cpu); }
