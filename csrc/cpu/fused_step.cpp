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

// The CPU step of mergopt_kernels::fused_step (see torch_common/fused_step_args.h).
void run_step(const mergopt::StepArgs& args, const std::vector<mergopt::TensorArgs>& tensors,
              const at::Device& device) {
  TORCH_CHECK(device.is_cpu(), "fused_step (CPU): params are on ", device);
  const mergopt::StepNoise noise = mergopt::step_noise(args, *args.noise_step, args.alphas);
  std::vector<mergopt::AdamWScalars> scalars(tensors.size());
  std::vector<WorkItem> items;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const mergopt::TensorArgs& t = tensors[i];
    scalars[i] = mergopt::tensor_adamw_scalars(args, t);
    if (t.numel == 0) continue;
    const int64_t g_first = t.index_base >> 2;
    const int64_t g_end = ((t.index_base + t.numel - 1) >> 2) + 1;
    for (int64_t g0 = g_first; g0 < g_end; g0 += kItemGroups) {
      items.push_back(WorkItem{static_cast<int64_t>(i), g0, std::min(g_end, g0 + kItemGroups)});
    }
  }

  const Isa isa = pick_isa();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
#ifdef MERGOPT_HAVE_SIMD_PATHS
    if (isa == Isa::kAvx512) return avx512::run_items(tensors, scalars, items, args, noise, begin, end);
    if (isa == Isa::kAvx2) return avx2::run_items(tensors, scalars, items, args, noise, begin, end);
#endif
    generic::run_items(tensors, scalars, items, args, noise, begin, end);
  });
  (void)isa;
}

}  // namespace
}  // namespace mergopt_cpu

TORCH_LIBRARY(mergopt_kernels, m) { m.def(mergopt_torch::kFusedStepSchema); }

TORCH_LIBRARY_IMPL(mergopt_kernels, CPU, m) {
  m.impl("fused_step", &mergopt_torch::fused_step<mergopt_cpu::run_step>);
}
