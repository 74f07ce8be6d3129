// Device helpers shared by the fastdiff kernels: element loads, warp/block reductions and scans.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace fastdiff {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct Acc { using type = float; };   // accumulation type of a storage type
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }
template <typename C, typename T> __device__ __forceinline__ C load_as(const T* p, int64_t i);
template <> __device__ __forceinline__ float load_as<float, float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float load_as<float, __half>(const __half* p, int64_t i) { return to_float(p[i]); }
template <> __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return to_float(p[i]);
}
template <> __device__ __forceinline__ double load_as<double, double>(const double* p, int64_t i) { return p[i]; }

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <typename T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide reductions for a 1-D block whose size is a multiple of 32 (at most 1024). `scratch` holds
// 32 values in shared memory; every thread gets the result. Fixed order: deterministic.
template <typename T> __device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nw ? scratch[lane] : T(0);
  return warp_sum(r);
}
template <typename T> __device__ T block_max(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < nw ? scratch[lane] : T(-INFINITY);
  return warp_max(r);
}
__device__ __forceinline__ int64_t block_min_i64(int64_t v, int64_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, static_cast<int64_t>(__shfl_xor_sync(kFullMask, v, o)));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int64_t r = lane < nw ? scratch[lane] : INT64_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) r = min(r, static_cast<int64_t>(__shfl_xor_sync(kFullMask, r, o)));
  return r;
}
__device__ __forceinline__ int64_t block_max_i64(int64_t v, int64_t* scratch) {
  return -block_min_i64(-v, scratch);
}

// Inclusive block scan in index (thread) order; `total` receives the block's sum. `scratch`: 32 values.
__device__ __forceinline__ double block_inclusive_scan(double v, double* scratch, double& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(kFullMask, t, o);
      if (lane >= o) t += n;
    }
    scratch[lane] = t;
  }
  __syncthreads();
  total = scratch[nw - 1];
  return warp > 0 ? v + scratch[warp - 1] : v;
}

// Exclusive block scan in index (thread) order, without subtractions; `total` receives the block's sum.
__device__ __forceinline__ double block_exclusive_scan(double v, double* scratch, double& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  double incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += n;
  }
  double excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) excl = 0.0;
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double t = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(kFullMask, t, o);
      if (lane >= o) t += n;
    }
    scratch[lane] = t;
  }
  __syncthreads();
  total = scratch[nw - 1];
  return warp > 0 ? scratch[warp - 1] + excl : excl;
}

// Launch-error helper: the error of the last launch (and clears it).
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

}  // namespace fastdiff
