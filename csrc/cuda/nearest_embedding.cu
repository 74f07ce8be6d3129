// nearest_embedding on CUDA: the screen of fastdiff/ops/_nearest.py as a tiled score GEMM with a fused
// (min, second min, arg-min) epilogue; the vocabulary is split across blocks when there are few rows.
// Launchers: see launchers.h.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common.cuh"

namespace fastdiff {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
constexpr int kNeThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kMaxSplits = 64;
constexpr int64_t kNoIndex = INT64_MAX;

// The screen of fastdiff/ops/_nearest.py: per row the index of a minimum score, the minimum and the second
// smallest score (equal scores count twice), with the per-row statistic `stat` computed by the caller
// (l2: |w|^2, score = stat - 2 x.w; cosine: 1 / max(|w|, 1e-12), score = -(x.w) * stat). Rows whose two
// scores lie within rounding of each other are resolved in float64 by the caller.

// Fold the score `v` of column `i` into a running (best, second, index).
template <typename C>
__device__ __forceinline__ void fold(C v, int64_t i, C& best, C& second, int64_t& bi) {
  if (v < best) {
    second = best;
    best = v;
    bi = i;
  } else if (v < second) {
    second = v;
  }
}

// Merge two running (best, second, index) triples.
template <typename C>
__device__ __forceinline__ void merge(C ov, C os, int64_t oi, C& bv, C& bs, int64_t& bi) {
  const C s2 = fmin(fmax(bv, ov), fmin(bs, os));
  if (ov < bv || (ov == bv && oi < bi)) {
    bv = ov;
    bi = oi;
  }
  bs = s2;
}

// One block: kBM rows of x against the columns [v_begin, v_end) of its split, kBN at a time. Each thread
// owns rows ty + 16*i and columns tx + 16*j of a tile and keeps a running (best, second, index) per row.
template <typename T, typename C>
__global__ void __launch_bounds__(kNeThreads)
_nearest_embedding_fwd_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw,
                              const C* __restrict__ stat, int64_t N, int64_t V, int64_t D, bool cosine,
                              int64_t v_per_split, C* __restrict__ part_val, C* __restrict__ part_sec,
                              int64_t* __restrict__ part_idx) {
  __shared__ C xs[kBK][kBM + 1];
  __shared__ C ws[kBK][kBN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const int64_t v_begin = split * v_per_split;
  const int64_t v_end = min(V, v_begin + v_per_split);

  C best[kTM], second[kTM];
  int64_t best_i[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = C(INFINITY);
    second[i] = C(INFINITY);
    best_i[i] = kNoIndex;
  }

  for (int64_t v0 = v_begin; v0 < v_end; v0 += kBN) {
    C acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0;

    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
#pragma unroll
      for (int q = 0; q < (kBM * kBK) / kNeThreads; ++q) {
        const int e = tid + q * kNeThreads, r = e / kBK, c = e % kBK;
        const int64_t row = m0 + r, col = k0 + c, wrow = v0 + r;
        xs[c][r] = (row < N && col < D) ? load_as<C>(x, row * ldx + col) : C(0);
        ws[c][r] = (wrow < v_end && col < D) ? load_as<C>(w, wrow * ldw + col) : C(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        C a[kTM], b[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t col = v0 + tx + 16 * j;
      if (col >= v_end) continue;
      const C st = stat[col];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const C score = cosine ? -(acc[i][j] * st) : fma(C(-2), acc[i][j], st);
        fold(score, col, best[i], second[i], best_i[i]);
      }
    }
  }
  // Reduce over the 16 threads (tx) sharing a row: they are one half of a warp.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    C bv = best[i], bs = second[i];
    int64_t bi = best_i[i];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const C ov = __shfl_xor_sync(kFullMask, bv, o);
      const C os = __shfl_xor_sync(kFullMask, bs, o);
      const int64_t oi = __shfl_xor_sync(kFullMask, bi, o);
      merge(ov, os, oi, bv, bs, bi);
    }
    const int64_t row = m0 + ty + 16 * i;
    if (tx == 0 && row < N) {
      part_val[split * N + row] = bv;
      part_sec[split * N + row] = bs;
      part_idx[split * N + row] = bi;
    }
  }
}

// Combine the splits; a row whose scores were all +inf keeps index 0, as the reference does.
template <typename C>
__global__ void _nearest_embedding_reduce_kernel(const C* __restrict__ part_val, const C* __restrict__ part_sec,
                                                 const int64_t* __restrict__ part_idx, int64_t N, int splits,
                                                 int64_t* __restrict__ out, C* __restrict__ out_best,
                                                 C* __restrict__ out_second) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  C bv = part_val[row], bs = part_sec[row];
  int64_t bi = part_idx[row];
  for (int s = 1; s < splits; ++s) merge(part_val[s * N + row], part_sec[s * N + row], part_idx[s * N + row], bv, bs, bi);
  out[row] = bi == kNoIndex ? 0 : bi;
  out_best[row] = bv;
  out_second[row] = bs;
}

struct NeSplit {
  int splits;
  int64_t v_per_split;
};

NeSplit ne_split(int64_t N, int64_t V, int num_sms) {
  const int64_t row_blocks = (N + kBM - 1) / kBM;
  const int64_t col_tiles = (V + kBN - 1) / kBN;
  int64_t want = (2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1) + row_blocks - 1) / row_blocks;
  want = std::max<int64_t>(1, std::min<int64_t>({want, col_tiles, kMaxSplits}));
  const int64_t tiles_per_split = (col_tiles + want - 1) / want;
  const int64_t v_per_split = tiles_per_split * kBN;
  return NeSplit{static_cast<int>((V + v_per_split - 1) / v_per_split), v_per_split};
}

size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

template <typename T, typename C>
cudaError_t ne_launch(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* stat, int64_t N,
                      int64_t V, int64_t D, bool cosine, int64_t* out, void* out_best, void* out_second,
                      void* workspace, int num_sms, cudaStream_t stream) {
  const NeSplit sp = ne_split(N, V, num_sms);
  char* ws = static_cast<char*>(workspace);
  int64_t* part_idx = reinterpret_cast<int64_t*>(ws);
  ws += align256(sizeof(int64_t) * sp.splits * N);
  C* part_val = reinterpret_cast<C*>(ws);
  ws += align256(sizeof(C) * sp.splits * N);
  C* part_sec = reinterpret_cast<C*>(ws);

  dim3 grid(static_cast<unsigned>((N + kBM - 1) / kBM), static_cast<unsigned>(sp.splits));
  _nearest_embedding_fwd_kernel<T, C><<<grid, kNeThreads, 0, stream>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(w), ldw, static_cast<const C*>(stat), N, V, D, cosine,
      sp.v_per_split, part_val, part_sec, part_idx);
  _nearest_embedding_reduce_kernel<C><<<static_cast<unsigned>((N + 255) / 256), 256, 0, stream>>>(
      part_val, part_sec, part_idx, N, sp.splits, out, static_cast<C*>(out_best), static_cast<C*>(out_second));
  return last_launch_error();
}

}  // namespace

size_t nearest_embedding_workspace_bytes(int64_t N, int64_t V, DType dtype, int num_sms) {
  const NeSplit sp = ne_split(N, V, num_sms);
  const size_t c = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return align256(sizeof(int64_t) * sp.splits * N) + 2 * align256(c * sp.splits * N);
}

cudaError_t nearest_embedding_launch(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* stat,
                                     int64_t N, int64_t V, int64_t D, DType dtype, bool cosine, int64_t* out_idx,
                                     void* out_best, void* out_second, void* workspace, int num_sms,
                                     cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return ne_launch<float, float>(x, ldx, w, ldw, stat, N, V, D, cosine, out_idx, out_best, out_second, workspace,
                                     num_sms, stream);
    case DType::kFloat64:
      return ne_launch<double, double>(x, ldx, w, ldw, stat, N, V, D, cosine, out_idx, out_best, out_second,
                                       workspace, num_sms, stream);
    case DType::kFloat16:
      return ne_launch<__half, float>(x, ldx, w, ldw, stat, N, V, D, cosine, out_idx, out_best, out_second,
                                      workspace, num_sms, stream);
    case DType::kBFloat16:
      return ne_launch<__nv_bfloat16, float>(x, ldx, w, ldw, stat, N, V, D, cosine, out_idx, out_best, out_second,
                                             workspace, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdiff
