// Host launchers of the fastdiff CUDA kernels: raw pointers and a stream, no torch types, so the kernels
// compile with nvcc alone (CI does that on machines without a GPU; see tests/test_cuda_compile.py).
// binding.cpp checks and allocates torch tensors and calls these. Every launcher returns the CUDA error
// of its launches (cudaSuccess when all went well); an empty problem launches nothing.
//
// Layouts: matrices are row-major with a leading dimension (elements between rows) `ld*`, the last
// dimension contiguous. Index arrays are int64. `dtype` codes are the DType values below.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastdiff {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---- nearest_embedding --------------------------------------------------------------------------
// The screen of fastdiff/ops/_nearest.py, scores in float32 (float64 for kFloat64):
//   l2: stat_v - 2 x.w_v (stat = |w|^2)      cosine: -(x.w_v) * stat_v (stat = 1 / max(|w_v|, 1e-12))
// x: (N, D) with leading dimension ldx, w: (V, D) with ldw, stat: (V,) of the compute dtype (the caller's).
// Per row: out_idx (N,) the index of a minimum, out_best / out_second (N,) of the compute dtype the minimum
// and the second smallest score (equal scores count twice); the caller resolves rows whose two are within
// rounding. workspace: nearest_embedding_workspace_bytes(...) bytes of device memory (no N x V buffer: it
// holds splits x N (value, second, index) partial results, splits <= 64).
size_t nearest_embedding_workspace_bytes(int64_t N, int64_t V, DType dtype, int num_sms);
cudaError_t nearest_embedding_launch(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* stat,
                                     int64_t N, int64_t V, int64_t D, DType dtype, bool cosine, int64_t* out_idx,
                                     void* out_best, void* out_second, void* workspace, int num_sms,
                                     cudaStream_t stream);

// ---- rounding_loss epilogue ---------------------------------------------------------------------
// In place over a chunk of R rows of logits (float32 or float64, row stride ld): per row the loss
// lse - logit[target] (0 for target == ignore_index), and, when `grad` is true, the logits replaced by
// the gradient (softmax - onehot(target)) * row_scale[r * row_scale_stride] (stride 0: one scale for every
// row; zero rows for ignored targets). target: (R,) int64, loss and row_scale of the logits' dtype.
cudaError_t rounding_loss_epilogue_launch(void* logits, int64_t ld, int64_t R, int64_t V, DType dtype,
                                          const int64_t* target, int64_t ignore_index, void* loss, bool grad,
                                          const void* row_scale, int64_t row_scale_stride, cudaStream_t stream);

// ---- posterior rows (fastdiff/ops/_plan.py) -----------------------------------------------------
// The kernels' own view of a row's formula: absorbing with a scalar schedule (a_t, a_s) or a per-token one
// (ab_table set), uniform, matrix. binding.cpp maps the ABI's kind codes (schema.h) onto it.
enum class PosteriorKind : int { kAbsorbing = 0, kUniform = 1, kMatrix = 2 };

struct PosteriorArgs {
  PosteriorKind kind;
  const void* logits;  // (N, V) with leading dimension ld, of `dtype`
  int64_t ld;
  DType dtype;
  int64_t N, V;
  const int64_t* x_t;  // (N,)
  const int64_t* t;    // (N,)
  const int64_t* s;    // (N,)
  double temperature;
  int64_t mask_id;            // absorbing
  const double* a_t;          // (N,) absorbing (scalar schedule), uniform
  const double* a_s;          // (N,)
  const double* ab_table;     // (T+1, V) absorbing per-token schedule, else null
  int64_t ab_rows;            // T + 1
  const double* fact1;        // (N, V) matrix
  const double* qbar_s;       // (P, V, V) matrix
  int64_t qbar_count;         // P
  const int64_t* pair;        // (N,) matrix
};

// probs: (N, V) contiguous, float32 or float64 (`out_dtype`): w / sum(w) per row (one-hot at x_t for an
// absorbing row with x_t != mask_id and for a row whose weights sum to 0).
cudaError_t categorical_posterior_launch(const PosteriorArgs& a, void* probs, DType out_dtype, cudaStream_t stream);
// out: (N,) the inverse-CDF draw of each row with the uniform of Philox counter (row0 + row, offset).
cudaError_t posterior_sample_launch(const PosteriorArgs& a, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* out,
                                    cudaStream_t stream);
// The same draw with (seed, offset, row0) read by the kernel from `counters`, a device array of three int64
// (the uint64 words' bits), so that a CUDA graph capturing the launch draws fresh numbers on every replay.
cudaError_t posterior_sample_counters_launch(const PosteriorArgs& a, const int64_t* counters, int64_t* out,
                                             cudaStream_t stream);

// ---- sample_categorical -------------------------------------------------------------------------
// temperature 0: argmax (lowest index). Otherwise softmax(logits / temperature), top-k (top_k <= 0 or
// >= V: off), top-p (top_p >= 1: off), both tie-inclusive as fastdiff.ops.filter_weights, then the
// inverse-CDF draw with the uniform of Philox counter (row0 + row, offset). logits: (N, V) with leading
// dimension ld; out: (N,).
cudaError_t sample_categorical_launch(const void* logits, int64_t ld, int64_t N, int64_t V, DType dtype,
                                      double temperature, int64_t top_k, double top_p, uint64_t seed,
                                      uint64_t offset, uint64_t row0, int64_t* out, cudaStream_t stream);

// ---- select_tokens (fastdiff/ops/select_tokens.py) ------------------------------------------------
// M candidate rows of V logits at logits + row_off[r] (elements), column `exclude` read as -inf (-1: none).
// Per row: tok (first maximum at temperature 0, else sample_categorical's draw with the uniform of Philox
// counter (counters[r], offset)), key (the score of rule: 0 prob, 1 llada, 2 logprob, 3 margin, 4 entropy,
// 5 none: the caller fills it) and status (0, or 4 NaN / 3 +inf / 2 every logit -inf).
cudaError_t select_tokens_launch(const void* logits, const int64_t* row_off, const int64_t* counters, int64_t M,
                                 int64_t V, DType dtype, int64_t exclude, int rule, double temperature, uint64_t seed,
                                 uint64_t offset, int64_t* tok, double* key, int* status, cudaStream_t stream);
// The same per row with (seed, offset) read by the kernel from `seed_offset`, a device array of two int64 (the
// op a CUDA graph of fastdiff.generate captures: a replay draws with the values written there before it).
cudaError_t select_tokens_counters_launch(const void* logits, const int64_t* row_off, const int64_t* counters,
                                          int64_t M, int64_t V, DType dtype, int64_t exclude, int rule,
                                          double temperature, const int64_t* seed_offset, int64_t* tok, double* key,
                                          int* status, cudaStream_t stream);

}  // namespace fastdiff
