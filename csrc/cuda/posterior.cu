// categorical_posterior / posterior_sample on CUDA: the row formulas of fastdiff/ops/_plan.py, one block per
// row; every weight and CDF in float64; draws invert the CDF in index order with the uniform of Philox counter
// (row0 + row, offset), as fastdiff/random.py. Launchers: see launchers.h.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common.cuh"
#include "philox.cuh"
#include "rows.cuh"

namespace fastdiff {
namespace {

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

// The mask shortcut of a masked absorbing row with a scalar schedule (the reference's _affine_sample, the C++
// posterior_row): the mask's weight is 1 - a_s out of W = 1 - a_t in closed form, and with the mask the last
// (first) category its interval of the index-order CDF is the last [a_s - a_t, W) (first [0, 1 - a_s)). When
// u * W falls in it, or the row has no weight (W = 0, x_t kept), the row stays the mask and its logits are
// never read (the public op has checked their values). The same float64 operations as the reference, so the
// decision is the reference's exactly. Only for a decreasing schedule (both shares non-negative).
__device__ __forceinline__ bool mask_shortcut(const PosteriorArgs& a, int64_t row, double u) {
  if (a.kind != PosteriorKind::kAbsorbing || a.ab_table != nullptr) return false;
  const bool last = a.mask_id == a.V - 1;
  if (!last && a.mask_id != 0) return false;
  const double a_t = a.a_t[row], a_s = a.a_s[row], W = 1.0 - a_t;
  if (!(a_s >= a_t && a_s <= 1.0)) return false;
  const double target = u * W;
  return !(W > 0.0) || (last ? target >= a_s - a_t : target < 1.0 - a_s);
}

template <typename T, typename O, bool kSample>
__global__ void __launch_bounds__(kThreads)
_posterior_kernel(const PosteriorArgs a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* __restrict__ tokens,
                  O* __restrict__ probs, bool stage_p, const int64_t* __restrict__ counters) {
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
    double u = 0.0;
    if (kSample && ok && !one_hot) {
      // counters: (seed, offset, row0) read on the device, where a CUDA graph replay finds its step's values
      u = counters == nullptr
          ? row_uniform(seed, offset, row0 + static_cast<uint64_t>(row))
          : row_uniform(static_cast<uint64_t>(counters[0]), static_cast<uint64_t>(counters[1]),
                        static_cast<uint64_t>(counters[2]) + static_cast<uint64_t>(row));
      one_hot = mask_shortcut(a, row, u);  // the row stays the mask; its logits are never read
    }
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
      const double target = u * total;
      const int64_t tok = cdf_draw(V, [&](int64_t j) { return R.weight(j); }, target, sm);
      if (threadIdx.x == 0) tokens[row] = tok >= 0 ? tok : xt;
    } else {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) out[j] = static_cast<O>(R.weight(j) / total);
    }
    __syncthreads();  // the staged probabilities and scratch are reused by the next row
  }
}

template <typename T, typename O, bool kSample>
cudaError_t posterior_launch_t(const PosteriorArgs& a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* tokens,
                               void* probs, const int64_t* counters,
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
  kernel<<<grid_for(a.N), kThreads, smem, stream>>>(a, seed, offset, row0, tokens, static_cast<O*>(probs), stage,
                                                    counters);
  return last_launch_error();
}

template <bool kSample>
cudaError_t posterior_dispatch(const PosteriorArgs& a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* tokens,
                               void* probs, const int64_t* counters,
                               DType out_dtype, cudaStream_t stream) {
  if (a.N <= 0 || a.V <= 0) return cudaSuccess;
  if (!kSample && (out_dtype == DType::kFloat64) != (a.dtype == DType::kFloat64)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32:
      return posterior_launch_t<float, float, kSample>(a, seed, offset, row0, tokens, probs, counters, stream);
    case DType::kFloat64:
      return posterior_launch_t<double, double, kSample>(a, seed, offset, row0, tokens, probs, counters, stream);
    case DType::kFloat16:
      return posterior_launch_t<__half, float, kSample>(a, seed, offset, row0, tokens, probs, counters, stream);
    case DType::kBFloat16:
      return posterior_launch_t<__nv_bfloat16, float, kSample>(a, seed, offset, row0, tokens, probs, counters, stream);
  }
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t categorical_posterior_launch(const PosteriorArgs& a, void* probs, DType out_dtype, cudaStream_t stream) {
  return posterior_dispatch<false>(a, 0, 0, 0, nullptr, probs, nullptr, out_dtype, stream);
}

cudaError_t posterior_sample_launch(const PosteriorArgs& a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* out,
                                    cudaStream_t stream) {
  return posterior_dispatch<true>(a, seed, offset, row0, out, nullptr, nullptr, DType::kFloat64, stream);
}

cudaError_t posterior_sample_counters_launch(const PosteriorArgs& a, const int64_t* counters, int64_t* out,
                                             cudaStream_t stream) {
  if (counters == nullptr) return cudaErrorInvalidValue;
  return posterior_dispatch<true>(a, 0, 0, 0, out, nullptr, counters, DType::kFloat64, stream);
}

}  // namespace fastdiff
