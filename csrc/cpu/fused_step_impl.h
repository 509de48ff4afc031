// Kernel body of the CPU fused step. No include guard on purpose: fused_step.cpp includes it
// once per instruction set (baseline x86-64, AVX2, AVX-512), each time in its own namespace, and
// picks one at run time. All compile the same IEEE operations without FMA contraction, so every
// instruction set produces the same bits.
//
// Expects MERGOPT_CPU_NS (namespace name) to be defined and fused_step_common.h to be included.

namespace mergopt_cpu {
namespace MERGOPT_CPU_NS {

using mergopt::AdamWScalars;
using mergopt::StepArgs;
using mergopt::StepNoise;
using mergopt::TensorArgs;

MERGOPT_INLINE float to_f32(float x) { return x; }
MERGOPT_INLINE float to_f32(c10::BFloat16 x) { return mergopt::bf16_bits_to_float(x.x); }
MERGOPT_INLINE float to_f32(c10::Half x) { return static_cast<float>(x); }

template <typename T>
MERGOPT_INLINE T from_f32(float x);
template <>
MERGOPT_INLINE float from_f32<float>(float x) { return x; }
template <>
MERGOPT_INLINE c10::BFloat16 from_f32<c10::BFloat16>(float x) {
  return c10::BFloat16(mergopt::float_to_bf16_bits(x), c10::BFloat16::from_bits());
}
template <>
MERGOPT_INLINE c10::Half from_f32<c10::Half>(float x) { return c10::Half(x); }

// delta[e] = scale * z[e] for the 4 * n_groups elements of groups g0 .. g0 + n_groups - 1.
// The buffer holds whole tiles (kTileElems floats): the AVX2 and AVX-512 paths fill 32 and 64 groups
// at a time (mergopt/simd_avx2.h, simd_avx512.h: bit-identical to the scalar code) and may write
// past 4 * n_groups.
inline void fill_delta(float* __restrict delta, uint64_t g0, int64_t n_groups, uint32_t step, uint32_t param_id,
                       const StepNoise& noise, float scale) {
#if defined(MERGOPT_CPU_AVX512)
  // One call for the whole tile: four interleaved blocks of 16 groups.
  static_assert(kTileGroups == 64, "a tile is four blocks of 16 groups");
  (void)n_groups;
  mergopt::simd::scaled_noise16<4>(delta, noise.key, g0, step, param_id, noise.distribution, noise.loc, noise.scale,
                                   scale);
#elif defined(MERGOPT_CPU_AVX2)
  // Four interleaved blocks of 8 groups per call.
  static_assert(kTileGroups % 32 == 0, "tiles are whole blocks of 32 groups");
  for (int64_t i = 0; i < n_groups; i += 32) {
    mergopt::simd::scaled_noise8<4>(delta + 4 * i, noise.key, g0 + static_cast<uint64_t>(i), step, param_id,
                                    noise.distribution, noise.loc, noise.scale, scale);
  }
#else
  uint32_t w0[kTileGroups];
  uint32_t w1[kTileGroups];
  uint32_t w2[kTileGroups];
  uint32_t w3[kTileGroups];
  for (int64_t i = 0; i < n_groups; ++i) {
    mergopt::element_group_words(noise.key, g0 + static_cast<uint64_t>(i), step, param_id, w0[i], w1[i], w2[i],
                                 w3[i]);
  }
  const float loc = noise.loc;
  const float spread = noise.scale;
  if (noise.distribution == mergopt::Distribution::kGaussian) {
    for (int64_t i = 0; i < n_groups; ++i) {
      float z0, z1, z2, z3;
      mergopt::gaussian_from_words(w0[i], w1[i], loc, spread, z0, z1);
      mergopt::gaussian_from_words(w2[i], w3[i], loc, spread, z2, z3);
      delta[4 * i + 0] = scale * z0;
      delta[4 * i + 1] = scale * z1;
      delta[4 * i + 2] = scale * z2;
      delta[4 * i + 3] = scale * z3;
    }
  } else {
    for (int64_t i = 0; i < n_groups; ++i) {
      delta[4 * i + 0] = scale * mergopt::laplace_from_word(w0[i], loc, spread);
      delta[4 * i + 1] = scale * mergopt::laplace_from_word(w1[i], loc, spread);
      delta[4 * i + 2] = scale * mergopt::laplace_from_word(w2[i], loc, spread);
      delta[4 * i + 3] = scale * mergopt::laplace_from_word(w3[i], loc, spread);
    }
  }
#endif
}

// theta = master or param - restore_delta; AdamW on theta; param = theta + apply_delta.
template <typename P, bool kGrad, bool kAmsgrad, bool kMaster>
inline void update_span(int64_t n, P* __restrict param, const P* __restrict grad, float* __restrict exp_avg,
                        float* __restrict exp_avg_sq, float* __restrict max_exp_avg_sq, float* __restrict master,
                        const float* __restrict restore_delta, const float* __restrict apply_delta,
                        const AdamWScalars& scalars, bool maximize) {
  for (int64_t j = 0; j < n; ++j) {
    float theta = kMaster ? master[j] : to_f32(param[j]) - restore_delta[j];
    if (kGrad) {
      float unused = 0.0f;
      mergopt::adamw_update<kAmsgrad>(theta, to_f32(grad[j]), exp_avg[j], exp_avg_sq[j],
                                      kAmsgrad ? max_exp_avg_sq[j] : unused, scalars, maximize);
    }
    if (kMaster) master[j] = theta;
    param[j] = from_f32<P>(theta + apply_delta[j]);
  }
}

// One work item: global element groups [g_begin, g_end) of one tensor, tile by tile.
template <typename P, bool kGrad, bool kAmsgrad, bool kMaster>
void run_item(const TensorArgs& t, const AdamWScalars& scalars, const StepNoise& noise, bool maximize,
              int64_t g_begin, int64_t g_end) {
  alignas(64) float restore_delta[kTileElems];
  alignas(64) float apply_delta[kTileElems];
  const bool restore_noise = noise.restore && !kMaster;
  const bool apply_noise = noise.apply;
  if (!restore_noise) std::fill(restore_delta, restore_delta + kTileElems, 0.0f);   // p - (+0) == p
  if (!apply_noise) std::fill(apply_delta, apply_delta + kTileElems, -0.0f);        // x + (-0) == x
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  float* exp_avg = t.exp_avg;
  float* exp_avg_sq = t.exp_avg_sq;
  float* max_exp_avg_sq = t.max_exp_avg_sq;
  float* master = t.master;
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kTileGroups) {
    const int64_t n_groups = std::min<int64_t>(kTileGroups, g_end - g0);
    // Global element range of this tile, clipped to the local shard [base, base + numel).
    const int64_t first = std::max<int64_t>(4 * g0, t.index_base);
    const int64_t last = std::min<int64_t>(4 * (g0 + n_groups), t.index_base + t.numel);
    const int64_t offset = first - 4 * g0;  // into the tile's delta buffers
    const int64_t j = first - t.index_base; // into the local tensors
    if (restore_noise) {
      fill_delta(restore_delta, static_cast<uint64_t>(g0), n_groups, noise.step, t.param_id, noise,
                 noise.restore_scale);
    }
    if (apply_noise) {
      fill_delta(apply_delta, static_cast<uint64_t>(g0), n_groups, noise.apply_step, t.param_id, noise,
                 noise.apply_scale);
    }
    update_span<P, kGrad, kAmsgrad, kMaster>(
        last - first, param + j, kGrad ? grad + j : nullptr, kGrad ? exp_avg + j : nullptr,
        kGrad ? exp_avg_sq + j : nullptr, (kGrad && kAmsgrad) ? max_exp_avg_sq + j : nullptr,
        kMaster ? master + j : nullptr, restore_delta + offset, apply_delta + offset, scalars, maximize);
  }
}

template <typename P>
void run_item_dispatch(const TensorArgs& t, const AdamWScalars& scalars, const StepArgs& args,
                       const StepNoise& noise, int64_t g_begin, int64_t g_end) {
  const bool grad = t.grad != nullptr;
  const bool m = args.maximize;
  if (t.master != nullptr) {
    if (!grad) return run_item<P, false, false, true>(t, scalars, noise, m, g_begin, g_end);
    if (args.amsgrad) return run_item<P, true, true, true>(t, scalars, noise, m, g_begin, g_end);
    return run_item<P, true, false, true>(t, scalars, noise, m, g_begin, g_end);
  }
  if (!grad) return run_item<P, false, false, false>(t, scalars, noise, m, g_begin, g_end);
  if (args.amsgrad) return run_item<P, true, true, false>(t, scalars, noise, m, g_begin, g_end);
  return run_item<P, true, false, false>(t, scalars, noise, m, g_begin, g_end);
}

// Work items [begin, end); scalars[i] are tensors[i]'s AdamW scalars.
inline void run_items(const std::vector<TensorArgs>& tensors, const std::vector<AdamWScalars>& scalars,
                      const std::vector<WorkItem>& items, const StepArgs& args, const StepNoise& noise,
                      int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; ++w) {
    const WorkItem& item = items[w];
    const TensorArgs& t = tensors[item.tensor];
    const AdamWScalars& s = scalars[item.tensor];
    switch (args.param_dtype) {
      case mergopt::ParamDtype::kFloat: run_item_dispatch<float>(t, s, args, noise, item.g_begin, item.g_end); break;
      case mergopt::ParamDtype::kBFloat16:
        run_item_dispatch<c10::BFloat16>(t, s, args, noise, item.g_begin, item.g_end);
        break;
      case mergopt::ParamDtype::kHalf: run_item_dispatch<c10::Half>(t, s, args, noise, item.g_begin, item.g_end); break;
    }
  }
}

}  // namespace MERGOPT_CPU_NS
}  // namespace mergopt_cpu
