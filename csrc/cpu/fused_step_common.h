// Argument structs shared by the CPU fused step's front end (fused_step.cpp) and its
// per-instruction-set kernel bodies (fused_step_impl.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mergopt/adamw.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"

namespace mergopt_cpu {

constexpr int64_t kTileGroups = 64;                 // Philox calls per tile
constexpr int64_t kTileElems = 4 * kTileGroups;     // 256 elements: the tile's buffers stay in L1
constexpr int64_t kItemGroups = 16 * kTileGroups;   // 4096 elements per parallel work item

// Parameter dtype (AdamW moments and masters are always fp32).
enum class Kind { kFloat, kBFloat16, kHalf };

struct NoiseSpec {
  mergopt::PhiloxKey key;
  mergopt::Distribution distribution;
  float loc;
  float scale;
};

struct StepArgs {
  NoiseSpec noise;
  bool noise_on;         // noise_scale != 0
  bool restore;          // params hold theta + s_t z_t on entry
  bool apply;            // apply_offset >= 0: params get theta + s_u z_u on exit
  uint32_t step;         // t
  uint32_t apply_step;   // u = t + apply_offset
  float restore_scale;   // s_t
  float apply_scale;     // s_u
  bool amsgrad;
  bool maximize;
};

struct TensorArgs {
  Kind kind;
  void* param;
  const void* grad;      // nullptr: no gradient this step
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;
  float* master;         // nullptr: no fp32 master copy
  int64_t numel;
  int64_t base;          // global index of local element 0
  uint32_t param_id;
  mergopt::AdamWScalars scalars;
};

struct WorkItem {
  int64_t tensor;
  int64_t g_begin;       // global element groups [g_begin, g_end)
  int64_t g_end;
};

}  // namespace mergopt_cpu
