// The kernel ABI every backend implements: the torch.library schemas of the ops that fastdiff._C registers
// as fastdiff_cpp::<op> and fastdiff._C_cuda as fastdiff_cuda::<op> (the Triton glue registers
// fastdiff_triton::<op> with the same text: tests/ops/test_custom_ops.py compares them), and the posterior's
// kind codes (fastdiff/ops/_plan.py holds the same table; the test checks it against this file).
//
// No torch include: csrc/cuda/binding.cpp includes this file too, so the CPU and CUDA modules cannot
// disagree on an argument's position or a kind's code.
//
// Conventions shared by every backend:
// * seed, offset and row_offset are the uint64 counter words passed as int64 (the same 64 bits); row r of a
//   call draws with the float64 uniform of Philox(seed; row_offset + r, offset) (fastdiff.random).
// * logits are (N, V) with a unit column stride (any row stride); index arrays are contiguous int64 (N,);
//   schedule tables are contiguous float64.
#pragma once

#include <cstdint>

namespace fastdiff {

// Posterior row formulas (fastdiff/ops/_plan.py). What each kind reads besides logits, x_t, t, s:
enum PosteriorKindCode : int64_t {
  kKindAbsorbing = 0,          // mask_id, a_t (N,), a_s (N,)
  kKindAbsorbingPerToken = 1,  // mask_id, ab_table (T+1, V) indexed by t and s
  kKindUniform = 2,            // a_t (N,), a_s (N,)
  kKindMatrix = 3,             // fact1 (N, V), qbar_s (P, V, V), pair (N,)
};

}  // namespace fastdiff

// categorical_posterior (sample = false: (N, V) probabilities, float32; float64 for float64 logits) and
// posterior_sample (sample = true: (N,) int64 tokens) of a lowered PosteriorPlan.
#define FASTDIFF_SCHEMA_POSTERIOR                                                                           \
  "posterior(Tensor logits, Tensor x_t, Tensor t, Tensor s, int kind, int mask_id, float temperature, "   \
  "Tensor? a_t, Tensor? a_s, Tensor? ab_table, Tensor? fact1, Tensor? qbar_s, Tensor? pair, bool sample, " \
  "int seed, int offset, int row_offset) -> Tensor"

// (N,) int64 tokens: temperature (0: greedy), top_k (0: off), top_p (1.0: off).
#define FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL                                                                  \
  "sample_categorical(Tensor logits, int seed, int offset, float temperature, int top_k, float top_p, "   \
  "int row_offset) -> Tensor"

// The fused chunked cross-entropy of the C++ and CUDA backends: x (N, D), weight (V, D), bias (V,) in one
// compute dtype (float32 / float64), target (N,) int64. Returns the per-row losses and the gradients of
// sum_r row_scale[r] * loss_r (row_scale: (1,) for one scale, or (N,)) that need_* asks for; a gradient not
// asked for is an empty (0,) tensor. Rows go through in chunks of chunk_rows (the only logits buffer).
#define FASTDIFF_SCHEMA_ROUNDING_LOSS                                                                       \
  "rounding_loss(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, Tensor row_scale, " \
  "bool need_gx, bool need_gw, bool need_gb, int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor)"

// select_tokens (fastdiff/ops/select_tokens.py): logits (B, L, V) with a unit column stride, candidates (B, L)
// bool; counter_rows (B, L) int64 (needed when temperature > 0), k (B,) int64 (mode 1), uniform (B, L) float64
// (rule 5), all contiguous. rule: 0 prob, 1 llada, 2 logprob, 3 margin, 4 entropy, 5 random; mode: 0 every
// candidate, 1 top-k, 2 threshold; exclude: a column read as -inf (-1: none). Returns tokens (B, L) int64,
// confidence (B, L) float32 and the selection (B, L) bool.
#define FASTDIFF_SCHEMA_SELECT_TOKENS                                                                       \
  "select_tokens(Tensor logits, Tensor candidates, Tensor? counter_rows, Tensor? k, Tensor? uniform, "      \
  "int rule, float temperature, int seed, int offset, float threshold, int mode, int exclude) "             \
  "-> (Tensor, Tensor, Tensor)"
