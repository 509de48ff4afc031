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

namespace mergopt_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkGroups = 2048;  // 8192 elements per block
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;

struct ChunkTable {
  TensorDesc tensors[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

template <ParamType T>
struct ParamTraits;
template <>
struct ParamTraits<ParamType::kFloat> {
  using storage = float;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float x) { *p = x; }
};
template <>
struct ParamTraits<ParamType::kBFloat16> {
  using storage = uint16_t;
  static __device__ __forceinline__ float load(const uint16_t* p) { return mergopt::bf16_bits_to_float(*p); }
  static __device__ __forceinline__ void store(uint16_t* p, float x) { *p = mergopt::float_to_bf16_bits(x); }
};
template <>
struct ParamTraits<ParamType::kHalf> {
  using storage = __half;
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
};

struct BlockScalars {
  mergopt::AdamWScalars adamw;
  float restore_scale;
  float apply_scale;
  uint32_t step;
  uint32_t apply_step;
};

__device__ __forceinline__ void group_delta(const StepConfig& c, mergopt::PhiloxKey key, uint64_t group,
                                            uint32_t step, uint32_t param_id, float scale, float out[4]) {
  uint32_t w0, w1, w2, w3;
  mergopt::element_group_words(key, group, step, param_id, w0, w1, w2, w3);
  mergopt::noise_from_words(static_cast<mergopt::Distribution>(c.distribution), w0, w1, w2, w3, c.noise_loc,
                            c.noise_scale, out);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = scale * out[k];
}

template <ParamType T, bool kAmsgrad>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(ChunkTable table, StepConfig c) {
  using Traits = ParamTraits<T>;
  using P = typename Traits::storage;
  const TensorDesc& t = table.tensors[table.block_tensor[blockIdx.x]];
  const int64_t chunk = table.block_chunk[blockIdx.x];

  __shared__ BlockScalars shared;
  const mergopt::PhiloxKey key = mergopt::philox_key(c.seed);
  const bool noise_on = c.noise_scale != 0.0f;
  if (threadIdx.x == 0) {
    const int64_t step_t = *c.noise_step;
    shared.step = static_cast<uint32_t>(step_t);
    shared.apply_step = static_cast<uint32_t>(step_t + (c.apply_offset > 0 ? c.apply_offset : 0));
    shared.restore_scale = noise_on ? mergopt::step_scale(key, shared.step, c.alphas, c.n_alphas, c.k_max) : 0.0f;
    shared.apply_scale = noise_on ? mergopt::step_scale(key, shared.apply_step, c.alphas, c.n_alphas, c.k_max) : 0.0f;
    const double adam_step = t.grad != nullptr ? static_cast<double>(*t.step) : 1.0;
    shared.adamw = mergopt::adamw_scalars(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, adam_step);
  }
  __syncthreads();
  const BlockScalars s = shared;
  const bool restore_noise = noise_on && c.restore && t.master == nullptr;
  const bool apply_noise = noise_on && c.apply_offset >= 0;

  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  const int64_t g_first = t.base >> 2;
  const int64_t g_last = (t.base + t.numel - 1) >> 2;
  const int64_t g_begin = g_first + chunk * kChunkGroups;
  const int64_t g_end = min(g_begin + kChunkGroups, g_last + 1);
  for (int64_t g = g_begin + threadIdx.x; g < g_end; g += kThreads) {
    float restore_delta[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float apply_delta[4] = {-0.0f, -0.0f, -0.0f, -0.0f};
    if (restore_noise) group_delta(c, key, static_cast<uint64_t>(g), s.step, t.param_id, s.restore_scale, restore_delta);
    if (apply_noise) group_delta(c, key, static_cast<uint64_t>(g), s.apply_step, t.param_id, s.apply_scale, apply_delta);
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // ILP: four independent elements per thread
      const int64_t j = 4 * g + k - t.base;
      if (j < 0 || j >= t.numel) continue;
      float theta = t.master != nullptr ? t.master[j] : Traits::load(param + j) - restore_delta[k];
      if (grad != nullptr) {
        float m = t.exp_avg[j];
        float v = t.exp_avg_sq[j];
        float vmax = kAmsgrad ? t.max_exp_avg_sq[j] : 0.0f;
        mergopt::adamw_update<kAmsgrad>(theta, Traits::load(grad + j), m, v, vmax, s.adamw, c.maximize);
        t.exp_avg[j] = m;
        t.exp_avg_sq[j] = v;
        if (kAmsgrad) t.max_exp_avg_sq[j] = vmax;
      }
      if (t.master != nullptr) t.master[j] = theta;
      Traits::store(param + j, theta + apply_delta[k]);
    }
  }
}

template <ParamType T, bool kAmsgrad>
cudaError_t launch_typed(const TensorDesc* tensors, int n_tensors, const StepConfig& config, cudaStream_t stream) {
  ChunkTable table;
  int n_table = 0;
  int n_blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (n_blocks == 0) return cudaSuccess;
    fused_step_kernel<T, kAmsgrad><<<n_blocks, kThreads, 0, stream>>>(table, config);
    n_blocks = 0;
    n_table = 0;
    return cudaGetLastError();
  };
  for (int i = 0; i < n_tensors; ++i) {
    const TensorDesc& d = tensors[i];
    if (d.numel == 0) continue;
    const int64_t n_groups = ((d.base + d.numel - 1) >> 2) - (d.base >> 2) + 1;
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

template <ParamType T>
cudaError_t launch_amsgrad(const TensorDesc* tensors, int n_tensors, const StepConfig& config, cudaStream_t stream) {
  return config.amsgrad ? launch_typed<T, true>(tensors, n_tensors, config, stream)
                        : launch_typed<T, false>(tensors, n_tensors, config, stream);
}

}  // namespace

cudaError_t launch_fused_step(const TensorDesc* tensors, int n_tensors, const StepConfig& config,
                              cudaStream_t stream) {
  if (config.n_alphas == 0 || config.n_alphas > kMaxAlphas || config.k_max == 0) return cudaErrorInvalidValue;
  switch (config.param_type) {
    case ParamType::kFloat: return launch_amsgrad<ParamType::kFloat>(tensors, n_tensors, config, stream);
    case ParamType::kBFloat16: return launch_amsgrad<ParamType::kBFloat16>(tensors, n_tensors, config, stream);
    case ParamType::kHalf: return launch_amsgrad<ParamType::kHalf>(tensors, n_tensors, config, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mergopt_cuda
