// The rounding_loss epilogue on CUDA: over a chunk of logits rows, in place, the online logsumexp, the per-row
// loss and (optionally) the softmax gradient scaled per row. The GEMMs around it are cuBLAS (binding.cpp).
// Launchers: see launchers.h.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common.cuh"

namespace fastdiff {
namespace {

constexpr int kRlThreads = 256;

__device__ __forceinline__ float fd_exp(float v) { return expf(v); }
__device__ __forceinline__ double fd_exp(double v) { return exp(v); }
__device__ __forceinline__ float fd_log(float v) { return logf(v); }
__device__ __forceinline__ double fd_log(double v) { return log(v); }

// Merge two online-softmax states (max m, sum s of exp(l - m)); an empty state is (-inf, 0).
template <typename C> __device__ __forceinline__ void lse_merge(C& m, C& s, C om, C os) {
  if (os == C(0)) return;
  if (s == C(0)) {
    m = om;
    s = os;
    return;
  }
  const C nm = fmax(m, om);
  s = s * fd_exp(m - nm) + os * fd_exp(om - nm);
  m = nm;
}

template <typename C>
__global__ void __launch_bounds__(kRlThreads)
_rounding_loss_fwd_kernel(C* __restrict__ logits, int64_t ld, int64_t R, int64_t V, const int64_t* __restrict__ target,
                          int64_t ignore_index, C* __restrict__ loss, bool grad,
                          const C* __restrict__ row_scale, int64_t row_scale_stride) {
  __shared__ C sm[32], ss[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    C* row = logits + r * ld;
    C m = C(-INFINITY), s = C(0);
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const C v = row[j];
      if (s == C(0)) {
        m = v;
        s = C(1);
      } else if (v > m) {
        s = s * fd_exp(m - v) + C(1);
        m = v;
      } else {
        s += fd_exp(v - m);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(kFullMask, m, o), __shfl_xor_sync(kFullMask, s, o));
    __syncthreads();
    if (lane == 0) {
      sm[warp] = m;
      ss[warp] = s;
    }
    __syncthreads();
    m = lane < nw ? sm[lane] : C(-INFINITY);
    s = lane < nw ? ss[lane] : C(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(kFullMask, m, o), __shfl_xor_sync(kFullMask, s, o));
    // Shifted by the max first: (m - z_t) + log s and exp((z - m) - log s) keep the digits that
    // z - (m + log s) rounds away when |z| is large (logits of 1e20 gave p = 1 in every column).
    const C ls = fd_log(s);
    const int64_t tgt = target[r];
    const bool valid = tgt != ignore_index && tgt >= 0 && tgt < V;
    if (threadIdx.x == 0) loss[r] = valid ? (m - row[tgt]) + ls : C(0);
    if (grad) {
      __syncthreads();  // row[tgt] is read above before any thread overwrites it
      const C sc = valid ? row_scale[r * row_scale_stride] : C(0);
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const C g = fd_exp((row[j] - m) - ls) * sc;
        row[j] = j == tgt ? g - sc : g;
      }
    }
  }
}

}  // namespace

cudaError_t rounding_loss_epilogue_launch(void* logits, int64_t ld, int64_t R, int64_t V, DType dtype,
                                          const int64_t* target, int64_t ignore_index, void* loss, bool grad,
                                          const void* row_scale, int64_t row_scale_stride, cudaStream_t stream) {
  if (R <= 0 || V <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(R, 1 << 20));
  if (dtype == DType::kFloat32) {
    _rounding_loss_fwd_kernel<float><<<blocks, kRlThreads, 0, stream>>>(
        static_cast<float*>(logits), ld, R, V, target, ignore_index, static_cast<float*>(loss), grad,
        static_cast<const float*>(row_scale), row_scale_stride);
  } else if (dtype == DType::kFloat64) {
    _rounding_loss_fwd_kernel<double><<<blocks, kRlThreads, 0, stream>>>(
        static_cast<double*>(logits), ld, R, V, target, ignore_index, static_cast<double*>(loss), grad,
        static_cast<const double*>(row_scale), row_scale_stride);
  } else {
    return cudaErrorInvalidValue;  // the binding upcasts half types to float32 first
  }
  return last_launch_error();
}

}  // namespace fastdiff
