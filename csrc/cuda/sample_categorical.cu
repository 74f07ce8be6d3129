// sample_categorical on CUDA: temperature (0: a first-maximum argmax), then tie-inclusive top-k / top-p by a
// radix threshold search over order keys (no sort), then the inverse-CDF draw of the row's Philox uniform.
// One block per row, weights and CDF in float64. Launchers: see launchers.h.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common.cuh"
#include "philox.cuh"
#include "rows.cuh"

namespace fastdiff {
namespace {

__device__ __forceinline__ uint64_t ordered_key(double v) {
  // Order-preserving map of a double to uint64 (-0.0 is folded into +0.0 by the caller).
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ uint64_t weight_key(double w) {  // w >= 0: the bit pattern is monotone
  return static_cast<uint64_t>(__double_as_longlong(w));
}

// ------------------------------------------------------------------------------------------------
// sample_categorical
// ------------------------------------------------------------------------------------------------
struct SampleScratch {
  RowScratch row;
  double hsum[kWarps][256];  // per-warp bin sums (mass mode)
  unsigned cnt[256];
  uint64_t prefix;
  double above;
  int done;
};

// Threshold search without a sort. Over the eligible elements (elem(j, key, wt) returns eligibility, a
// uint64 order key and a non-negative weight; count mode uses weight 1), find
//     kappa = min{ key_v : sum of the weights of the elements with key > key_v  <  target }
// so that the kept set is {v : key_v >= kappa}: most significant byte first, a 256-bin histogram of
// the candidates per level, descending to the bin where the mass above crosses the target, until the bin
// holds one element or the key is complete. Per-warp bin sums are added one lane at a time, in lane
// order, and combined in warp order: the result is deterministic.
template <bool kMass, class ElemFn>
__device__ uint64_t radix_threshold(int64_t V, double target, ElemFn elem, SampleScratch& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t prefix = 0;
  double above = 0.0;
  for (int level = 0; level < 8; ++level) {
    const int shift = 56 - 8 * level;
    const uint64_t hi_mask = level == 0 ? 0ull : (~0ull << (shift + 8));
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      sm.cnt[i] = 0u;
      if (kMass)
        for (int w = 0; w < kWarps; ++w) sm.hsum[w][i] = 0.0;
    }
    __syncthreads();
    for (int64_t base = 0; base < V; base += blockDim.x) {
      const int64_t j = base + threadIdx.x;
      uint64_t key = 0;
      double wt = 0.0;
      bool in = j < V && elem(j, key, wt);
      in = in && (key & hi_mask) == prefix;
      const int d = static_cast<int>((key >> shift) & 255u);
      if (in) atomicAdd(&sm.cnt[d], 1u);
      if (kMass) {
        unsigned pending = __ballot_sync(kFullMask, in);
        while (pending) {
          const int l = __ffs(pending) - 1;
          pending &= pending - 1;
          if (lane == l) sm.hsum[warp][d] += wt;
          __syncwarp();
        }
      }
    }
    __syncthreads();
    if (kMass) {  // bin totals in warp order
      for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        double tot = 0.0;
        for (int w = 0; w < kWarps; ++w) tot += sm.hsum[w][i];
        sm.hsum[0][i] = tot;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      double acc = above;
      int pick = -1;
      for (int d = 255; d >= 0; --d) {
        if (sm.cnt[d] == 0u) continue;
        const double tot = kMass ? sm.hsum[0][d] : static_cast<double>(sm.cnt[d]);
        if (acc + tot >= target) {
          pick = d;
          break;
        }
        acc += tot;
      }
      int done = 1;  // no bin crosses: every remaining candidate is kept (threshold = prefix)
      if (pick >= 0) {
        prefix |= static_cast<uint64_t>(pick) << shift;
        above = acc;
        done = (sm.cnt[pick] == 1u || shift == 0) ? 1 : 0;
      }
      sm.prefix = prefix;
      sm.above = above;
      sm.done = done;
    }
    __syncthreads();
    prefix = sm.prefix;
    above = sm.above;
    const bool done = sm.done != 0;
    __syncthreads();
    if (done) break;
  }
  return prefix;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
_sample_categorical_kernel(const T* __restrict__ logits, int64_t ld, int64_t N, int64_t V, double temperature,
                           int64_t top_k, double top_p, uint64_t seed, uint64_t offset, uint64_t row0,
                           int64_t* __restrict__ out) {
  __shared__ SampleScratch sm;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const T* x = logits + row * ld;
    if (temperature == 0.0) {  // greedy: the first maximum
      double best = -INFINITY;
      int64_t bi = kNone;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const double v = to_double(x[j]);
        if (bi == kNone || v > best) {
          best = v;
          bi = j;
        }
      }
      const double M = block_max(bi == kNone ? -INFINITY : best, sm.row.red);
      const int64_t idx = block_min_i64(bi != kNone && best == M ? bi : kNone, sm.row.ired);
      if (threadIdx.x == 0) out[row] = idx < V ? idx : 0;
      __syncthreads();
      continue;
    }
    auto z = [&](int64_t j) { return to_double(x[j]) / temperature + 0.0; };  // + 0.0 folds -0.0
    double m = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmax(m, z(j));
    m = block_max(m, sm.row.red);

    const bool use_k = top_k > 0 && top_k < V;
    uint64_t kth = 0;  // top-k keeps key(z) >= kth: fewer than k logits strictly larger
    if (use_k) {
      kth = radix_threshold<false>(
          V, static_cast<double>(top_k),
          [&](int64_t j, uint64_t& key, double& wt) {
            key = ordered_key(z(j));
            wt = 1.0;
            return true;
          },
          sm);
    }
    const bool use_p = top_p < 1.0;
    uint64_t pth = 0;  // top-p keeps weight_key(w) >= pth: mass strictly more probable below top_p
    if (use_p) {
      double W = 0.0;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const double zj = z(j);
        if (!use_k || ordered_key(zj) >= kth) W += exp(zj - m);
      }
      W = block_sum(W, sm.row.red);
      pth = radix_threshold<true>(
          V, top_p * W,
          [&](int64_t j, uint64_t& key, double& wt) {
            const double zj = z(j);
            if (use_k && ordered_key(zj) < kth) return false;
            wt = exp(zj - m);
            key = weight_key(wt);
            return true;
          },
          sm);
    }
    auto weight = [&](int64_t j) {
      const double zj = z(j);
      if (use_k && ordered_key(zj) < kth) return 0.0;
      const double w = exp(zj - m);
      return (use_p && weight_key(w) < pth) ? 0.0 : w;
    };
    double total = 0.0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) total += weight(j);
    total = block_sum(total, sm.row.red);
    const double target = row_uniform(seed, offset, row0 + static_cast<uint64_t>(row)) * total;
    const int64_t tok = cdf_draw(V, weight, target, sm.row);
    if (threadIdx.x == 0) out[row] = tok >= 0 ? tok : 0;
    __syncthreads();
  }
}

template <typename T>
cudaError_t sample_launch_t(const void* logits, int64_t ld, int64_t N, int64_t V, double temperature, int64_t top_k,
                            double top_p, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* out,
                            cudaStream_t stream) {
  _sample_categorical_kernel<T><<<grid_for(N), kThreads, 0, stream>>>(static_cast<const T*>(logits), ld, N, V,
                                                                      temperature, top_k, top_p, seed, offset, row0, out);
  return last_launch_error();
}
}  // namespace

cudaError_t sample_categorical_launch(const void* logits, int64_t ld, int64_t N, int64_t V, DType dtype,
                                      double temperature, int64_t top_k, double top_p, uint64_t seed, uint64_t offset,
                                      uint64_t row0, int64_t* out, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return sample_launch_t<float>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
    case DType::kFloat64:
      return sample_launch_t<double>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
    case DType::kFloat16:
      return sample_launch_t<__half>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
    case DType::kBFloat16:
      return sample_launch_t<__nv_bfloat16>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdiff
