// nearest_embedding (tiled score GEMM with a fused arg-min) and the rounding_loss epilogue (online
// logsumexp + softmax gradient over a chunk of logits rows). Launchers: see launchers.h.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common.cuh"

namespace fastdiff {
namespace {

// ------------------------------------------------------------------------------------------------
// nearest_embedding
// ------------------------------------------------------------------------------------------------
constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
constexpr int kNeThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kMaxSplits = 64;
constexpr int64_t kNoIndex = INT64_MAX;

// Per-row statistic of the weight matrix, one warp per row: l2 -> |w|^2, cosine -> max(|w|, 1e-12).
template <typename T, typename C>
__global__ void _nearest_embedding_stats_kernel(const T* __restrict__ w, int64_t ldw, int64_t V, int64_t D,
                                                bool cosine, C* __restrict__ stat) {
  const int lane = threadIdx.x & 31;
  const int64_t v = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (v >= V) return;  // whole warps leave together: v is uniform within a warp
  const T* row = w + v * ldw;
  C acc = 0;
  for (int64_t k = lane; k < D; k += 32) {
    const C e = load_as<C>(row, k);
    acc += e * e;
  }
  acc = warp_sum(acc);
  if (lane == 0) stat[v] = cosine ? fmax(sqrt(acc), C(1e-12)) : acc;
}

__device__ __forceinline__ bool better(double v, int64_t i, double bv, int64_t bi) {
  return v < bv || (v == bv && i < bi);
}

// One block: kBM rows of x against the columns [v_begin, v_end) of its split, kBN at a time. Each thread
// owns rows ty + 16*i and columns tx + 16*j of a tile and keeps a running (best, index) per row; columns
// reach a thread in increasing order, so a strict '<' keeps the lowest index among equal scores.
template <typename T, typename C>
__global__ void __launch_bounds__(kNeThreads)
_nearest_embedding_fwd_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw,
                              const C* __restrict__ stat, int64_t N, int64_t V, int64_t D, bool cosine,
                              int64_t v_per_split, C* __restrict__ part_val, int64_t* __restrict__ part_idx) {
  __shared__ C xs[kBK][kBM + 1];
  __shared__ C ws[kBK][kBN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const int64_t v_begin = split * v_per_split;
  const int64_t v_end = min(V, v_begin + v_per_split);

  C best[kTM];
  int64_t best_i[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = C(INFINITY);
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
        // The reference's order: (x.w) * -2 + |w|^2 (the product by -2 is exact), or -(x.w / |w|).
        const C score = cosine ? -(acc[i][j] / st) : fma(C(-2), acc[i][j], st);
        if (score < best[i]) {
          best[i] = score;
          best_i[i] = col;
        }
      }
    }
  }
  // Reduce over the 16 threads (tx) sharing a row: they are one half of a warp.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    C bv = best[i];
    int64_t bi = best_i[i];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const C ov = __shfl_xor_sync(kFullMask, bv, o);
      const int64_t oi = __shfl_xor_sync(kFullMask, bi, o);
      if (better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    const int64_t row = m0 + ty + 16 * i;
    if (tx == 0 && row < N) {
      part_val[split * N + row] = bv;
      part_idx[split * N + row] = bi;
    }
  }
}

// Combine the splits in V order (a strict '<' keeps the earlier split on ties); a row whose scores were all
// +inf keeps index 0, as the reference does.
template <typename C>
__global__ void _nearest_embedding_reduce_kernel(const C* __restrict__ part_val, const int64_t* __restrict__ part_idx,
                                                 int64_t N, int splits, int64_t* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  C bv = part_val[row];
  int64_t bi = part_idx[row];
  for (int s = 1; s < splits; ++s) {
    const C v = part_val[s * N + row];
    const int64_t i = part_idx[s * N + row];
    if (better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
  out[row] = bi == kNoIndex ? 0 : bi;
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
cudaError_t ne_launch(const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t N, int64_t V, int64_t D,
                      bool cosine, int64_t* out, void* workspace, int num_sms, cudaStream_t stream) {
  const NeSplit sp = ne_split(N, V, num_sms);
  char* ws = static_cast<char*>(workspace);
  int64_t* part_idx = reinterpret_cast<int64_t*>(ws);
  ws += align256(sizeof(int64_t) * sp.splits * N);
  C* part_val = reinterpret_cast<C*>(ws);
  ws += align256(sizeof(C) * sp.splits * N);
  C* stat = reinterpret_cast<C*>(ws);

  const int stat_threads = 256;
  const int64_t stat_blocks = (V * 32 + stat_threads - 1) / stat_threads;
  _nearest_embedding_stats_kernel<T, C><<<static_cast<unsigned>(stat_blocks), stat_threads, 0, stream>>>(
      static_cast<const T*>(w), ldw, V, D, cosine, stat);
  dim3 grid(static_cast<unsigned>((N + kBM - 1) / kBM), static_cast<unsigned>(sp.splits));
  _nearest_embedding_fwd_kernel<T, C><<<grid, kNeThreads, 0, stream>>>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(w), ldw, stat, N, V, D, cosine, sp.v_per_split, part_val,
      part_idx);
  _nearest_embedding_reduce_kernel<C><<<static_cast<unsigned>((N + 255) / 256), 256, 0, stream>>>(
      part_val, part_idx, N, sp.splits, out);
  return last_launch_error();
}

// ------------------------------------------------------------------------------------------------
// rounding_loss epilogue
// ------------------------------------------------------------------------------------------------
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
                          int64_t ignore_index, C* __restrict__ loss, bool grad, double scale,
                          const C* __restrict__ row_scale) {
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
    const C lse = m + fd_log(s);
    const int64_t tgt = target[r];
    const bool valid = tgt != ignore_index && tgt >= 0 && tgt < V;
    if (threadIdx.x == 0) loss[r] = valid ? lse - row[tgt] : C(0);
    if (grad) {
      __syncthreads();  // row[tgt] is read above before any thread overwrites it
      const C sc = valid ? static_cast<C>(scale) * (row_scale ? row_scale[r] : C(1)) : C(0);
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const C g = fd_exp(row[j] - lse) * sc;
        row[j] = j == tgt ? g - sc : g;
      }
    }
  }
}

}  // namespace

size_t nearest_embedding_workspace_bytes(int64_t N, int64_t V, DType dtype, int num_sms) {
  const NeSplit sp = ne_split(N, V, num_sms);
  const size_t c = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return align256(sizeof(int64_t) * sp.splits * N) + align256(c * sp.splits * N) + align256(c * V);
}

cudaError_t nearest_embedding_launch(const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t N, int64_t V,
                                     int64_t D, DType dtype, bool cosine, int64_t* out_idx, void* workspace,
                                     int num_sms, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return ne_launch<float, float>(x, ldx, w, ldw, N, V, D, cosine, out_idx, workspace, num_sms, stream);
    case DType::kFloat64:
      return ne_launch<double, double>(x, ldx, w, ldw, N, V, D, cosine, out_idx, workspace, num_sms, stream);
    case DType::kFloat16:
      return ne_launch<__half, float>(x, ldx, w, ldw, N, V, D, cosine, out_idx, workspace, num_sms, stream);
    case DType::kBFloat16:
      return ne_launch<__nv_bfloat16, float>(x, ldx, w, ldw, N, V, D, cosine, out_idx, workspace, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rounding_loss_epilogue_launch(void* logits, int64_t ld, int64_t R, int64_t V, DType dtype,
                                          const int64_t* target, int64_t ignore_index, void* loss, bool grad,
                                          double scale, const void* row_scale, cudaStream_t stream) {
  if (R <= 0 || V <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(R, 1 << 20));
  if (dtype == DType::kFloat32) {
    _rounding_loss_fwd_kernel<float><<<blocks, kRlThreads, 0, stream>>>(
        static_cast<float*>(logits), ld, R, V, target, ignore_index, static_cast<float*>(loss), grad, scale,
        static_cast<const float*>(row_scale));
  } else if (dtype == DType::kFloat64) {
    _rounding_loss_fwd_kernel<double><<<blocks, kRlThreads, 0, stream>>>(
        static_cast<double*>(logits), ld, R, V, target, ignore_index, static_cast<double*>(loss), grad, scale,
        static_cast<const double*>(row_scale));
  } else {
    return cudaErrorInvalidValue;  // the binding upcasts half types to float32 first
  }
  return last_launch_error();
}

}  // namespace fastdiff
