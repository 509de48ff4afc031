// Work split shared by the CPU fused step's front end (fused_step.cpp) and its
// per-instruction-set kernel bodies (fused_step_impl.h). The step's arguments are
// mergopt::StepArgs and mergopt::TensorArgs (mergopt/step_args.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mergopt/adamw.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"
#include "mergopt/step_args.h"

namespace mergopt_cpu {

constexpr int64_t kTileGroups = 64;                 // Philox calls per tile
constexpr int64_t kTileElems = 4 * kTileGroups;     // 256 elements: the tile's buffers stay in L1
constexpr int64_t kItemGroups = 16 * kTileGroups;   // 4096 elements per parallel work item

struct WorkItem {
  int64_t tensor;
  int64_t g_begin;       // global element groups [g_begin, g_end)
  int64_t g_end;
};

}  // namespace mergopt_cpu
