// Portability macros shared by host C++ and CUDA device code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MERGOPT_HOST_DEVICE __host__ __device__
#define MERGOPT_INLINE __forceinline__
#elif defined(__GNUC__)
#define MERGOPT_HOST_DEVICE
#define MERGOPT_INLINE inline __attribute__((always_inline))
#else
#define MERGOPT_HOST_DEVICE
#define MERGOPT_INLINE inline
#endif

namespace mergopt {

MERGOPT_HOST_DEVICE MERGOPT_INLINE float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

MERGOPT_HOST_DEVICE MERGOPT_INLINE uint32_t float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

// bf16 <-> fp32 on raw 16-bit patterns (round to nearest even, NaN stays a quiet NaN), the same
// rounding as torch's Tensor.to(torch.bfloat16).
MERGOPT_HOST_DEVICE MERGOPT_INLINE float bf16_bits_to_float(uint16_t bits) {
  return bits_to_float(static_cast<uint32_t>(bits) << 16);
}

MERGOPT_HOST_DEVICE MERGOPT_INLINE uint16_t float_to_bf16_bits(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(value != value ? 0x7fc0u : rounded);
}

}  // namespace mergopt
