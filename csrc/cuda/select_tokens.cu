// select_tokens on CUDA (fastdiff/ops/select_tokens.py): one block per candidate row. A pass over the row
// checks the values (NaN, +inf, every logit -inf) and finds the maximum and its first index; the sums of
// exp(z - max z) (z = x / tq) follow, in sample_categorical.cu's thread order, so that the draw (cdf_draw
// of rows.cuh at the row's Philox uniform) is that kernel's; then the score (float64, rounded as the
// reference's float32 score). The selection over (B, L) is binding.cpp's (ATen). Launchers: launchers.h.
#include <cmath>

#include "common.cuh"
#include "philox.cuh"
#include "rows.cuh"

namespace fastdiff {
namespace {

enum : int { kProb = 0, kLlada = 1, kLogprob = 2, kMargin = 3, kEntropy = 4, kRandom = 5 };

template <typename T>
__global__ void __launch_bounds__(kThreads)
_select_tokens_kernel(const T* __restrict__ logits, const int64_t* __restrict__ row_off,
                      const int64_t* __restrict__ counters, int64_t M, int64_t V, int64_t exclude, int rule,
                      double temperature, uint64_t seed, uint64_t offset, const int64_t* __restrict__ seed_offset,
                      int64_t* __restrict__ tok_out, double* __restrict__ key_out, int* __restrict__ status_out) {
  // seed_offset: (seed, offset) read on the device (a CUDA graph replay finds its step's values there), else the
  // host's arguments
  if (seed_offset != nullptr) {
    seed = static_cast<uint64_t>(seed_offset[0]);
    offset = static_cast<uint64_t>(seed_offset[1]);
  }
  __shared__ RowScratch sm;
  const double tq = temperature > 0.0 ? temperature : 1.0;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* x = logits + row_off[r];
    auto xv = [&](int64_t j) { return j == exclude ? -INFINITY : to_double(x[j]); };
    // pass 1: values, maximum, first maximum
    double best = -INFINITY;
    int64_t bi = kNone;
    int bad = 0;  // bit 0: NaN, bit 1: +inf
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const double v = xv(j);
      if (v != v) bad |= 1;
      if (v == INFINITY) bad |= 2;
      if (bi == kNone || v > best) {
        best = v;
        bi = j;
      }
    }
    const int nan = __syncthreads_or(bad & 1);
    const int pinf = __syncthreads_or(bad & 2);
    const double Mx = block_max(bi == kNone ? -INFINITY : best, sm.red);
    const int64_t first = block_min_i64(bi != kNone && best == Mx ? bi : kNone, sm.ired);
    const int status = nan ? 4 : pinf ? 3 : (Mx == -INFINITY ? 2 : 0);
    if (status != 0) {
      if (threadIdx.x == 0) {
        status_out[r] = status;
        tok_out[r] = 0;
        key_out[r] = 0.0;
      }
      __syncthreads();
      continue;
    }
    // the sums, as sample_categorical.cu forms them: z = x / tq, m = max z, w = exp(z - m)
    auto z = [&](int64_t j) { return xv(j) / tq + 0.0; };
    double m = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmax(m, z(j));
    m = block_max(m, sm.red);
    double total = 0.0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) total += exp(z(j) - m);
    total = block_sum(total, sm.red);
    int64_t tok = first < V ? first : 0;
    if (temperature > 0.0) {
      const double target = row_uniform(seed, offset, static_cast<uint64_t>(counters[r])) * total;
      const int64_t d = cdf_draw(V, [&](int64_t j) { return exp(z(j) - m); }, target, sm);
      tok = d >= 0 ? d : 0;
    }
    double key = 0.0;
    if (rule == kProb) {
      key = static_cast<float>(exp(z(tok) - m) / total);
    } else if (rule == kLlada || rule == kLogprob) {
      double W1 = 0.0;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) W1 += exp(xv(j) - Mx);
      W1 = block_sum(W1, sm.red);
      const float lp = static_cast<float>((xv(tok) - Mx) - log(W1));
      key = rule == kLlada ? exp(static_cast<double>(lp)) : static_cast<double>(lp);
    } else if (rule == kMargin) {
      double s = -INFINITY;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        if (j != first) s = fmax(s, xv(j));
      }
      s = block_max(s, sm.red);
      const double e2 = s == -INFINITY ? 0.0 : exp((s - Mx) / tq);
      key = static_cast<float>((1.0 - e2) / total * exp((Mx / tq + 0.0) - m));
    } else if (rule == kEntropy) {
      double s = 0.0;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const double p = exp(z(j) - m) / total;
        s += p * log(p + 1e-10);
      }
      key = static_cast<float>(block_sum(s, sm.red));
    }
    if (threadIdx.x == 0) {
      status_out[r] = 0;
      tok_out[r] = tok;
      key_out[r] = key;
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t select_launch_t(const void* logits, const int64_t* row_off, const int64_t* counters, int64_t M, int64_t V,
                            int64_t exclude, int rule, double temperature, uint64_t seed, uint64_t offset,
                            const int64_t* seed_offset, int64_t* tok, double* key, int* status, cudaStream_t stream) {
  _select_tokens_kernel<T><<<grid_for(M), kThreads, 0, stream>>>(static_cast<const T*>(logits), row_off, counters, M,
                                                                 V, exclude, rule, temperature, seed, offset,
                                                                 seed_offset, tok, key, status);
  return last_launch_error();
}
}  // namespace

namespace {
cudaError_t select_dispatch(const void* logits, const int64_t* row_off, const int64_t* counters, int64_t M, int64_t V,
                            DType dtype, int64_t exclude, int rule, double temperature, uint64_t seed, uint64_t offset,
                            const int64_t* seed_offset, int64_t* tok, double* key, int* status, cudaStream_t stream) {
  if (M <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return select_launch_t<float>(logits, row_off, counters, M, V, exclude, rule, temperature, seed, offset,
                                    seed_offset, tok, key, status, stream);
    case DType::kFloat64:
      return select_launch_t<double>(logits, row_off, counters, M, V, exclude, rule, temperature, seed, offset,
                                     seed_offset, tok, key, status, stream);
    case DType::kFloat16:
      return select_launch_t<__half>(logits, row_off, counters, M, V, exclude, rule, temperature, seed, offset,
                                     seed_offset, tok, key, status, stream);
    case DType::kBFloat16:
      return select_launch_t<__nv_bfloat16>(logits, row_off, counters, M, V, exclude, rule, temperature, seed, offset,
                                            seed_offset, tok, key, status, stream);
  }
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t select_tokens_launch(const void* logits, const int64_t* row_off, const int64_t* counters, int64_t M,
                                 int64_t V, DType dtype, int64_t exclude, int rule, double temperature, uint64_t seed,
                                 uint64_t offset, int64_t* tok, double* key, int* status, cudaStream_t stream) {
  return select_dispatch(logits, row_off, counters, M, V, dtype, exclude, rule, temperature, seed, offset, nullptr,
                         tok, key, status, stream);
}

cudaError_t select_tokens_counters_launch(const void* logits, const int64_t* row_off, const int64_t* counters,
                                          int64_t M, int64_t V, DType dtype, int64_t exclude, int rule,
                                          double temperature, const int64_t* seed_offset, int64_t* tok, double* key,
                                          int* status, cudaStream_t stream) {
  if (seed_offset == nullptr) return cudaErrorInvalidValue;
  return select_dispatch(logits, row_off, counters, M, V, dtype, exclude, rule, temperature, 0, 0, seed_offset, tok,
                         key, status, stream);
}

}  // namespace fastdiff
