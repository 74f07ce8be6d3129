// Shared pieces of the C++ CPU kernels (fastdiff._C): counter-based uniforms and a vectorisable exp.
// Kernel translation units include ATen only (the binding, csrc/binding.cpp, is the one that parses
// torch/extension.h and torch/library.h): a third of the compile time of each.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

// Hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, chosen at load time (GCC
// function multi-versioning), so the wheel runs on any x86-64 and uses the widest vectors it finds.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTDIFF_NO_CLONES)
#define FASTDIFF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDIFF_CLONES
#endif

// The scalar helpers the cloned loops call must be inlined into each clone to be vectorised there; GCC's
// heuristics sometimes keep one out-of-line copy instead (seen: exp_f32_nonpos called per element from
// esum_all_f32 in select_tokens.cpp, 10x slower), so force it.
#if defined(__GNUC__)
#define FASTDIFF_INLINE inline __attribute__((always_inline))
#else
#define FASTDIFF_INLINE inline
#endif

namespace fastdiff {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kInfF = std::numeric_limits<float>::infinity();

// Philox4x32-10 (Random123 / Triton convention): the four words of counter (row, offset) under key seed.
inline void philox4x32(uint64_t seed, uint64_t offset, uint64_t row, uint32_t w[4]) {
  uint32_t c0 = static_cast<uint32_t>(row), c1 = static_cast<uint32_t>(row >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// The float64 open-interval uniform of fastdiff.random.row_uniforms: words 0 and 1 of Philox(seed; row, offset).
inline double row_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
  uint32_t w[4];
  philox4x32(seed, offset, row, w);
  const uint64_t k = (static_cast<uint64_t>(w[0] >> 6) << 26) + (w[1] >> 6);
  return (static_cast<double>(k) + 0.5) * 0x1p-52;
}

// exp for float, branch-free so that loops over it vectorise (Cephes expf: Cody-Waite reduction and
// a degree-6 polynomial, about 1 ulp). Arguments below -87.3 (including -inf) give exactly 0: such
// weights are below 2^-126 of the row maximum, and -inf logits must have weight 0.
FASTDIFF_INLINE float exp_f32(float x) {
  const bool under = x < -87.3f;
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.3f ? 88.3f : xc;
  // round-to-nearest by the 1.5 * 2^23 trick (std::floor is a libm call unless -ffast-math)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return under ? 0.0f : y * scale;
}

// exp_f32 for arguments known to be <= 0 (or NaN), such as (x - max) / temperature: the same polynomial and
// underflow rule without the overflow clamp, two vector operations fewer in the hot exp-sum loop.
FASTDIFF_INLINE float exp_f32_nonpos(float x) {
  const bool under = x < -87.3f;
  const float xc = under ? -87.3f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return under ? 0.0f : y * scale;
}

}  // namespace fastdiff
