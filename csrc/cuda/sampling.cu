// Row kernels over logits: categorical_posterior / posterior_sample (the three row formulas of
// fastdiff/ops/_plan.py) and sample_categorical (temperature, tie-inclusive top-k / top-p by a radix
// threshold search, no sort). One block per row; every weight and CDF in float64; draws invert the CDF
// in index order with the uniform of Philox counter (row0 + row, offset), as fastdiff/random.py.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common.cuh"
#include "philox.cuh"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;  // contiguous elements per thread in a CDF pass
constexpr int64_t kNone = INT64_MAX;
constexpr int kMaxGrid = 1 << 20;

struct RowScratch {
  double red[32];
  int64_t ired[32];
};

__device__ __forceinline__ uint64_t ordered_key(double v) {
  // Order-preserving map of a double to uint64 (-0.0 is folded into +0.0 by the caller).
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ uint64_t weight_key(double w) {  // w >= 0: the bit pattern is monotone
  return static_cast<uint64_t>(__double_as_longlong(w));
}

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

// ------------------------------------------------------------------------------------------------
// Posterior rows
// ------------------------------------------------------------------------------------------------
template <typename T>
struct PosteriorRow {
  const PosteriorArgs& a;
  const T* x;
  int64_t V, xt;
  double m = 0.0, S = 1.0;                        // max of z over the row, sum of exp(z - m)
  double a_t = 0.0, a_s = 0.0, r = 0.0, c0 = 0.0;  // scalar schedules; uniform's r and (1 - r)/V
  double w_mask = 0.0;                             // absorbing: the mask column's weight
  double A = 0.0;                                  // per-token absorbing: sum_{j != mask} e_j (A_s - A_t)_j
  const double* At = nullptr;                      // per-token alpha_bar rows
  const double* As = nullptr;
  const double* f1 = nullptr;                      // matrix: fact1 row, qbar_s[pair]
  const double* q = nullptr;
  const double* p_smem = nullptr;                  // matrix: the row's x0 probabilities, when staged

  __device__ PosteriorRow(const PosteriorArgs& args, const T* row, int64_t x_t) : a(args), x(row), V(args.V), xt(x_t) {}
  __device__ __forceinline__ double z(int64_t j) const { return to_double(x[j]) / a.temperature; }
  __device__ __forceinline__ double p(int64_t j) const { return exp(z(j) - m) / S; }
  __device__ __forceinline__ double matrix_p(int64_t i) const { return p_smem ? p_smem[i] : p(i); }

  __device__ double weight(int64_t j) const {
    switch (a.kind) {
      case PosteriorKind::kAbsorbing:
        if (j == a.mask_id) return w_mask;
        return At ? (As[j] - At[j]) * p(j) : (a_s - a_t) * p(j);
      case PosteriorKind::kUniform: {
        const double f = a_s * p(j) + (1.0 - a_s) / static_cast<double>(V);
        return j == xt ? c0 * f + r * f : c0 * f;
      }
      case PosteriorKind::kMatrix: {
        double acc = 0.0;
        for (int64_t i = 0; i < V; ++i) acc += matrix_p(i) * q[i * V + j];
        return f1[j] * acc;
      }
    }
    return 0.0;
  }
};

// Returns false when an index of the row lies outside its table (the launcher's caller checked them; this
// keeps a bad index from turning into an out-of-bounds read).
template <typename T>
__device__ bool posterior_row_setup(PosteriorRow<T>& R, int64_t row, double* p_stage, RowScratch& sm) {
  const PosteriorArgs& a = R.a;
  const int64_t V = R.V;
  const bool absorbing = a.kind == PosteriorKind::kAbsorbing;
  const int64_t t = a.t[row], s = a.s[row];
  if (absorbing && a.ab_table) {
    if (t < 0 || t >= a.ab_rows || s < 0 || s >= a.ab_rows) return false;
    R.At = a.ab_table + t * V;
    R.As = a.ab_table + s * V;
  } else if (a.kind != PosteriorKind::kMatrix) {
    R.a_t = a.a_t[row];
    R.a_s = a.a_s[row];
  } else {
    const int64_t pr = a.pair[row];
    if (pr < 0 || pr >= a.qbar_count) return false;
    R.q = a.qbar_s + pr * V * V;
    R.f1 = a.fact1 + row * V;
  }
  // x0 distribution: softmax(z), the mask logit ignored for absorbing.
  double m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
    if (!(absorbing && j == a.mask_id)) m = fmax(m, R.z(j));
  R.m = block_max(m, sm.red);
  double S = 0.0, A = 0.0, B = 0.0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    if (absorbing && j == a.mask_id) continue;
    const double e = exp(R.z(j) - R.m);
    S += e;
    if (R.At) {
      A += e * (R.As[j] - R.At[j]);
      B += e * (1.0 - R.As[j]);
    }
  }
  R.S = block_sum(S, sm.red);
  if (R.At) {
    R.A = block_sum(A, sm.red);
    B = block_sum(B, sm.red);
  }
  if (absorbing) {
    R.w_mask = R.At ? B / R.S : 1.0 - R.a_s;
  } else if (a.kind == PosteriorKind::kUniform) {
    R.r = R.a_s > 0.0 ? R.a_t / R.a_s : 0.0;
    R.c0 = (1.0 - R.r) / static_cast<double>(V);
  } else if (p_stage) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) p_stage[i] = R.p(i);
    __syncthreads();
    R.p_smem = p_stage;
  }
  return true;
}

// Sum of the row's weights: closed forms where they exist (sum p = 1), else a block sum.
template <typename T>
__device__ double posterior_total(const PosteriorRow<T>& R, RowScratch& sm) {
  switch (R.a.kind) {
    case PosteriorKind::kAbsorbing:  // sum_{j != mask} (A_s - A_t)_j p_j + w_mask
      return R.At ? R.A / R.S + R.w_mask : (R.a_s - R.a_t) + R.w_mask;
    case PosteriorKind::kUniform:
      return R.c0 + R.r * (R.a_s * R.p(R.xt) + (1.0 - R.a_s) / static_cast<double>(R.V));
    case PosteriorKind::kMatrix: {
      double acc = 0.0;
      for (int64_t j = threadIdx.x; j < R.V; j += blockDim.x) acc += R.weight(j);
      return block_sum(acc, sm.red);
    }
  }
  return 0.0;
}

template <typename T, typename O, bool kSample>
__global__ void __launch_bounds__(kThreads)
_posterior_kernel(const PosteriorArgs a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* __restrict__ tokens,
                  O* __restrict__ probs, bool stage_p) {
  extern __shared__ double p_stage[];
  __shared__ RowScratch sm;
  const int64_t V = a.V;
  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.logits) + row * a.ld;
    const int64_t xt = a.x_t[row];
    O* out = kSample ? nullptr : probs + row * V;
    bool ok = xt >= 0 && xt < V;
    bool one_hot = ok && a.kind == PosteriorKind::kAbsorbing && xt != a.mask_id;
    PosteriorRow<T> R(a, x, xt);
    double total = 0.0;
    if (ok && !one_hot) {
      ok = posterior_row_setup(R, row, stage_p ? p_stage : nullptr, sm);
      if (ok) {
        total = posterior_total(R, sm);
        one_hot = !(total > 0.0);  // the impossible case (no weight): keep x_t, as the reference
      }
    }
    if (!ok) {  // an index outside its table: mark the row
      if (kSample) {
        if (threadIdx.x == 0) tokens[row] = -1;
      } else {
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) out[j] = O(NAN);
      }
    } else if (one_hot) {
      if (kSample) {
        if (threadIdx.x == 0) tokens[row] = xt;
      } else {
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) out[j] = j == xt ? O(1) : O(0);
      }
    } else if (kSample) {
      const double target = row_uniform(seed, offset, row0 + static_cast<uint64_t>(row)) * total;
      const int64_t tok = cdf_draw(V, [&](int64_t j) { return R.weight(j); }, target, sm);
      if (threadIdx.x == 0) tokens[row] = tok >= 0 ? tok : xt;
    } else {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) out[j] = static_cast<O>(R.weight(j) / total);
    }
    __syncthreads();  // the staged probabilities and scratch are reused by the next row
  }
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

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, kMaxGrid))); }

template <typename T, typename O, bool kSample>
cudaError_t posterior_launch_t(const PosteriorArgs& a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* tokens,
                               void* probs,
                               cudaStream_t stream) {
  auto kernel = _posterior_kernel<T, O, kSample>;
  size_t smem = 0;
  bool stage = false;
  if (a.kind == PosteriorKind::kMatrix) {
    // Stage the row's x0 probabilities in shared memory when they fit (they are read V times each).
    const size_t need = static_cast<size_t>(a.V) * sizeof(double);
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return e;
    const size_t limit = static_cast<size_t>(optin) > sizeof(RowScratch) + 1024 ? optin - sizeof(RowScratch) - 1024 : 0;
    if (need <= limit) {
      if (need > 48 * 1024) {
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(need));
        if (e != cudaSuccess) return e;
      }
      smem = need;
      stage = true;
    }
  }
  kernel<<<grid_for(a.N), kThreads, smem, stream>>>(a, seed, offset, row0, tokens, static_cast<O*>(probs), stage);
  return last_launch_error();
}

template <bool kSample>
cudaError_t posterior_dispatch(const PosteriorArgs& a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* tokens,
                               void* probs,
                               DType out_dtype, cudaStream_t stream) {
  if (a.N <= 0 || a.V <= 0) return cudaSuccess;
  if (!kSample && (out_dtype == DType::kFloat64) != (a.dtype == DType::kFloat64)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32:
      return posterior_launch_t<float, float, kSample>(a, seed, offset, row0, tokens, probs, stream);
    case DType::kFloat64:
      return posterior_launch_t<double, double, kSample>(a, seed, offset, row0, tokens, probs, stream);
    case DType::kFloat16:
      return posterior_launch_t<__half, float, kSample>(a, seed, offset, row0, tokens, probs, stream);
    case DType::kBFloat16:
      return posterior_launch_t<__nv_bfloat16, float, kSample>(a, seed, offset, row0, tokens, probs, stream);
  }
  return cudaErrorInvalidValue;
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

cudaError_t categorical_posterior_launch(const PosteriorArgs& a, void* probs, DType out_dtype, cudaStream_t stream) {
  return posterior_dispatch<false>(a, 0, 0, 0, nullptr, probs, out_dtype, stream);
}

cudaError_t posterior_sample_launch(const PosteriorArgs& a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* out,
                                    cudaStream_t stream) {
  return posterior_dispatch<true>(a, seed, offset, row0, out, nullptr, DType::kFloat64, stream);
}

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
