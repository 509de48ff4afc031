// CPU implementation of mergopt_kernels::fused_step, the schema, and its registration.
//
// Work is split into items of kItemGroups element groups (4 elements, one Philox call each),
// aligned to groups of the *global* element index so that no call is made twice; items of all
// tensors run under one at::parallel_for. The kernel body is compiled for baseline x86-64, AVX2
// and AVX-512 (chosen at run time by CPUID); the noise of the vector paths is written with
// intrinsics (mergopt/simd_avx2.h, simd_avx512.h) that repeat the scalar operations, and
// -ffp-contract=off keeps all three bitwise identical.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "fused_step_common.h"
#include "mergopt/simd_avx2.h"
#include "mergopt/simd_avx512.h"
#include "torch_common/fused_step_args.h"

#define MERGOPT_CPU_NS generic
#include "fused_step_impl.h"
#undef MERGOPT_CPU_NS

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MERGOPT_HAVE_SIMD_PATHS 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define MERGOPT_CPU_NS avx2
#define MERGOPT_CPU_AVX2 1
#include "fused_step_impl.h"
#undef MERGOPT_CPU_AVX2
#undef MERGOPT_CPU_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12 avx512fintrin.h, see simd_avx512.h
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MERGOPT_CPU_NS avx512
#define MERGOPT_CPU_AVX512 1
#include "fused_step_impl.h"
#undef MERGOPT_CPU_AVX512
#undef MERGOPT_CPU_NS
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace mergopt_cpu {
namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The best instruction set of this CPU, or a lower one named by MERGOPT_CPU_ISA ("generic",
// "avx2", "avx512"; read at every call, for tests and benchmarks). Every choice gives the same bits.
Isa pick_isa() {
  Isa best = Isa::kGeneric;
#ifdef MERGOPT_HAVE_SIMD_PATHS
  static const Isa supported = mergopt::simd::cpu_has_avx512() ? Isa::kAvx512
                               : mergopt::simd::cpu_has_avx2() ? Isa::kAvx2
                                                               : Isa::kGeneric;
  best = supported;
#endif
  const char* wanted = std::getenv("MERGOPT_CPU_ISA");
  if (wanted == nullptr || *wanted == '\0') return best;
  const std::string name(wanted);
  Isa isa = Isa::kGeneric;
  if (name == "avx512") {
    isa = Isa::kAvx512;
  } else if (name == "avx2") {
    isa = Isa::kAvx2;
  } else {
    TORCH_CHECK(name == "generic", "MERGOPT_CPU_ISA must be generic, avx2 or avx512, got '", name, "'");
  }
  return static_cast<int>(isa) < static_cast<int>(best) ? isa : best;
}

Kind kind_of(at::ScalarType param) {
  if (param == at::kBFloat16) return Kind::kBFloat16;
  if (param == at::kHalf) return Kind::kHalf;
  return Kind::kFloat;
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
  const std::vector<std::optional<at::Tensor>> grad_of = mergopt_torch::check_fused_step_args(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, param_ids, index_bases, noise_step,
      amsgrad, alphas, k_max);
  const mergopt::Distribution dist = mergopt_torch::parse_distribution(distribution);
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

  TORCH_CHECK(params[0].device().is_cpu(), "fused_step (CPU): params are on ", params[0].device());
  const Kind kind = kind_of(params[0].scalar_type());
  std::vector<TensorArgs> tensors(n);
  std::vector<WorkItem> items;
  for (size_t i = 0; i < n; ++i) {
    TensorArgs& a = tensors[i];
    a.kind = kind;
    a.param = params[i].data_ptr();
    a.grad = nullptr;
    a.exp_avg = a.exp_avg_sq = a.max_exp_avg_sq = nullptr;
    a.master = masters.empty() ? nullptr : masters[i].data_ptr<float>();
    a.numel = params[i].numel();
    a.base = index_bases[i];
    a.param_id = static_cast<uint32_t>(param_ids[i]);
    double step = 1.0;
    if (grad_of[i].has_value()) {
      a.grad = grad_of[i]->data_ptr();
      a.exp_avg = exp_avgs[i].data_ptr<float>();
      a.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
      a.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() : nullptr;
      step = steps[i].item<double>();
    }
    a.scalars = mergopt::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
    if (a.numel == 0) continue;
    const int64_t g_first = a.base >> 2;
    const int64_t g_end = ((a.base + a.numel - 1) >> 2) + 1;
    for (int64_t g0 = g_first; g0 < g_end; g0 += kItemGroups) {
      items.push_back(WorkItem{static_cast<int64_t>(i), g0, std::min(g_end, g0 + kItemGroups)});
    }
  }

  const Isa isa = pick_isa();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
#ifdef MERGOPT_HAVE_SIMD_PATHS
    if (isa == Isa::kAvx512) return avx512::run_items(tensors, items, args, begin, end);
    if (isa == Isa::kAvx2) return avx2::run_items(tensors, items, args, begin, end);
#endif
    generic::run_items(tensors, items, args, begin, end);
  });
  (void)isa;
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
