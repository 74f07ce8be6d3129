// Pieces shared by the row kernels over logits (posterior.cu, sample_categorical.cu): one block of kThreads
// per row, float64 weights, and the inverse-CDF draw in index order (a block-wide scan, fixed order).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace fastdiff {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;  // contiguous elements per thread in a CDF pass
constexpr int64_t kNone = INT64_MAX;
constexpr int kMaxGrid = 1 << 20;

struct RowScratch {
  double red[32];
  int64_t ired[32];
};

// The inverse-CDF draw min{j : w_0 + ... + w_j > target, w_j > 0} in index order, or, when rounding
// leaves none, the last positive-weight index; -1 when every weight is 0. Thread t sums kItems
// contiguous weights in order, an exclusive block scan orders the threads. Block-uniform result.
template <class WeightFn>
__device__ int64_t cdf_draw(int64_t V, WeightFn weight, double target, RowScratch& sm) {
  double running = 0.0;
  int64_t last_pos = -1;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kItems;
  for (int64_t base = 0; base < V; base += step) {
    const int64_t j0 = base + static_cast<int64_t>(threadIdx.x) * kItems;
    double w[kItems];
    double local = 0.0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      w[i] = j0 + i < V ? weight(j0 + i) : 0.0;
      local += w[i];
    }
    double chunk_total;
    double c = running + block_exclusive_scan(local, sm.red, chunk_total);
    int64_t cand = kNone;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      c += w[i];
      if (w[i] > 0.0) {
        if (cand == kNone && c > target) cand = j0 + i;
        last_pos = j0 + i;
      }
    }
    if (__syncthreads_or(cand != kNone)) return block_min_i64(cand, sm.ired);
    running += chunk_total;
  }
  return block_max_i64(last_pos, sm.ired);
}

inline unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, kMaxGrid)));
}

}  // namespace fastdiff
