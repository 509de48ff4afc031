// CUDA fused step: restore s_t z_t, AdamW, apply s_u z_u, for many tensors in one launch.
//
// Multi-tensor apply as in apex: the kernel argument carries up to kMaxTensors tensor
// descriptors and a table mapping each block to (tensor, chunk). A chunk is kChunkGroups element
// groups of the *global* index (4 elements, one Philox call per stream). t and each tensor's step
// are read on the device, so the launch can be captured in a CUDA graph. Includes only the CUDA
// runtime and our headers; compile with --fmad=false to get the CPU op's bits.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fused_step_launch.h"
#include "mergopt/adamw.h"
#include "mergopt/noise.h"
#include "mergopt/philox.h"
#include "mergopt/step_args.h"

namespace mergopt_cuda {
namespace {

using mergopt::ParamDtype;
using mergopt::StepArgs;
using mergopt::StepNoise;
using mergopt::TensorArgs;

constexpr int kThreads = 256;
constexpr int64_t kChunkGroups = 2048;  // 8192 elements per block
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;

struct ChunkTable {
  TensorArgs tensors[kMaxTensors];
  float alphas[kMaxAlphas];  // StepArgs::alphas, which point to host memory
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

template <ParamDtype T>
struct ParamTraits;
template <>
struct ParamTraits<ParamDtype::kFloat> {
  using storage = float;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float x) { *p = x; }
};
template <>
struct ParamTraits<ParamDtype::kBFloat16> {
  using storage = uint16_t;
  static __device__ __forceinline__ float load(const uint16_t* p) { return mergopt::bf16_bits_to_float(*p); }
  static __device__ __forceinline__ void store(uint16_t* p, float x) { *p = mergopt::float_to_bf16_bits(x); }
};
template <>
struct ParamTraits<ParamDtype::kHalf> {
  using storage = __half;
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
};

struct BlockScalars {
  mergopt::AdamWScalars adamw;
  StepNoise noise;
};

__device__ __forceinline__ void group_delta(const StepNoise& n, uint64_t group, uint32_t step, uint32_t param_id,
                                            float scale, float out[4]) {
  uint32_t w0, w1, w2, w3;
  mergopt::element_group_words(n.key, group, step, param_id, w0, w1, w2, w3);
  mergopt::noise_from_words(n.distribution, w0, w1, w2, w3, n.loc, n.scale, out);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = scale * out[k];
}

template <ParamDtype T, bool kAmsgrad>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(ChunkTable table, StepArgs args) {
  using Traits = ParamTraits<T>;
  using P = typename Traits::storage;
  const TensorArgs& t = table.tensors[table.block_tensor[blockIdx.x]];
  const int64_t chunk = table.block_chunk[blockIdx.x];

  __shared__ BlockScalars shared;
  if (threadIdx.x == 0) {
    shared.noise = mergopt::step_noise(args, *args.noise_step, table.alphas);
    shared.adamw = mergopt::tensor_adamw_scalars(args, t);
  }
  __syncthreads();
  const BlockScalars s = shared;
  const bool restore_noise = s.noise.restore && t.master == nullptr;
  const bool apply_noise = s.noise.apply;

  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  const int64_t g_first = t.index_base >> 2;
  const int64_t g_last = (t.index_base + t.numel - 1) >> 2;
  const int64_t g_begin = g_first + chunk * kChunkGroups;
  const int64_t g_end = min(g_begin + kChunkGroups, g_last + 1);
  for (int64_t g = g_begin + threadIdx.x; g < g_end; g += kThreads) {
    float restore_delta[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float apply_delta[4] = {-0.0f, -0.0f, -0.0f, -0.0f};
    if (restore_noise) {
      group_delta(s.noise, static_cast<uint64_t>(g), s.noise.step, t.param_id, s.noise.restore_scale, restore_delta);
    }
    if (apply_noise) {
      group_delta(s.noise, static_cast<uint64_t>(g), s.noise.apply_step, t.param_id, s.noise.apply_scale, apply_delta);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // ILP: four independent elements per thread
      const int64_t j = 4 * g + k - t.index_base;
      if (j < 0 || j >= t.numel) continue;
      float theta = t.master != nullptr ? t.master[j] : Traits::load(param + j) - restore_delta[k];
      if (grad != nullptr) {
        float m = t.exp_avg[j];
        float v = t.exp_avg_sq[j];
        float vmax = kAmsgrad ? t.max_exp_avg_sq[j] : 0.0f;
        mergopt::adamw_update<kAmsgrad>(theta, Traits::load(grad + j), m, v, vmax, s.adamw, args.maximize);
        t.exp_avg[j] = m;
        t.exp_avg_sq[j] = v;
        if (kAmsgrad) t.max_exp_avg_sq[j] = vmax;
      }
      if (t.master != nullptr) t.master[j] = theta;
      Traits::store(param + j, theta + apply_delta[k]);
    }
  }
}

template <ParamDtype T, bool kAmsgrad>
cudaError_t launch_typed(const TensorArgs* tensors, int n_tensors, const StepArgs& args, cudaStream_t stream) {
  ChunkTable table;
  for (uint32_t i = 0; i < args.n_alphas; ++i) table.alphas[i] = args.alphas[i];
  int n_table = 0;
  int n_blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (n_blocks == 0) return cudaSuccess;
    fused_step_kernel<T, kAmsgrad><<<n_blocks, kThreads, 0, stream>>>(table, args);
    n_blocks = 0;
    n_table = 0;
    return cudaGetLastError();
  };
  for (int i = 0; i < n_tensors; ++i) {
    const TensorArgs& d = tensors[i];
    if (d.numel == 0) continue;
    const int64_t n_groups = ((d.index_base + d.numel - 1) >> 2) - (d.index_base >> 2) + 1;
    const int64_t n_chunks = (n_groups + kChunkGroups - 1) / kChunkGroups;
    bool listed = false;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      if (!listed) {
        if (n_table == kMaxTensors) {
          const cudaError_t err = flush();
          if (err != cudaSuccess) return err;
        }
        table.tensors[n_table++] = d;
        listed = true;
      }
      table.block_tensor[n_blocks] = static_cast<unsigned char>(n_table - 1);
      table.block_chunk[n_blocks] = static_cast<int>(chunk);
      ++n_blocks;
      if (n_blocks == kMaxBlocks) {
        const cudaError_t err = flush();
        if (err != cudaSuccess) return err;
        listed = false;
      }
    }
  }
  return flush();
}

template <ParamDtype T>
cudaError_t launch_amsgrad(const TensorArgs* tensors, int n_tensors, const StepArgs& args, cudaStream_t stream) {
  return args.amsgrad ? launch_typed<T, true>(tensors, n_tensors, args, stream)
                      : launch_typed<T, false>(tensors, n_tensors, args, stream);
}

}  // namespace

cudaError_t launch_fused_step(const TensorArgs* tensors, int n_tensors, const StepArgs& args, cudaStream_t stream) {
  if (args.n_alphas == 0 || args.n_alphas > kMaxAlphas || args.k_max == 0) return cudaErrorInvalidValue;
  switch (args.param_dtype) {
    case ParamDtype::kFloat: return launch_amsgrad<ParamDtype::kFloat>(tensors, n_tensors, args, stream);
    case ParamDtype::kBFloat16: return launch_amsgrad<ParamDtype::kBFloat16>(tensors, n_tensors, args, stream);
    case ParamDtype::kHalf: return launch_amsgrad<ParamDtype::kHalf>(tensors, n_tensors, args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mergopt_cuda
