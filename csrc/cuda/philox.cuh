// Counter-based random numbers, bit for bit as fastdiff/random.py.
//
// Philox4x32-10 with key (seed_lo, seed_hi) and counter (row_lo, row_hi, offset_lo, offset_hi); a row's
// float64 uniform on the open interval (0, 1) is ((w0 >> 6) * 2**26 + (w1 >> 6) + 0.5) * 2**-52.
// Host and device: tests compile this header into a host program and compare it with the reference.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fastdiff {

struct Philox4 {
  uint32_t w[4];
};

FD_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds: each round uses the current key, then bumps it.
FD_HOST_DEVICE Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi_b = mulhi32(kM1, c2), lo_b = kM1 * c2;
    const uint32_t hi_a = mulhi32(kM0, c0), lo_a = kM0 * c0;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// float64 uniform on (0, 1) from two 32-bit words: 52 random bits, never 0 or 1.
FD_HOST_DEVICE double uniform_from_words(uint32_t w0, uint32_t w1) {
  const uint64_t k = (static_cast<uint64_t>(w0 >> 6) << 26) | static_cast<uint64_t>(w1 >> 6);
  return (static_cast<double>(k) + 0.5) * 0x1p-52;
}

// The uniform of a categorical draw for global row `row`: words 0 and 1 of Philox(seed; row, offset).
FD_HOST_DEVICE double row_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
  const Philox4 r = philox4x32_10(seed, static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                                  static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
  return uniform_from_words(r.w[0], r.w[1]);
}

}  // namespace fastdiff
