// Entry points of the C++ CPU kernels (one op family a file: nearest_embedding.cpp, rounding_loss.cpp,
// posterior.cpp, sample_categorical.cpp). binding.cpp registers them as the torch.library ops
// fastdiff_cpp::<name> (schemas in schema.h) and binds the same functions with pybind11 for direct calls.
// Every function re-checks shapes, dtypes and index ranges (TORCH_CHECK), so a direct call cannot read out
// of bounds; the public ops in fastdiff/ops check their arguments first and name them in their errors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastdiff {

// The screen of fastdiff/ops/_nearest.py: x (N, D), weight (V, D), stat (V,) in the compute dtype ->
// (index of a minimum, minimum, second smallest score) per row; row blocks of block_rows vectors against
// vocabulary tiles of block_cols rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_embedding_screen(const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& stat, bool cosine,
                                                                        int64_t block_rows, int64_t block_cols);

// FASTDIFF_SCHEMA_ROUNDING_LOSS (schema.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rounding_loss(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, const at::Tensor& row_scale, bool need_gx, bool need_gw, bool need_gb, int64_t chunk_rows);

// FASTDIFF_SCHEMA_POSTERIOR (schema.h). Also checks the logits' values in the same pass (NaN, +inf, a row
// of -inf, a masked row with only the mask logit finite) and raises check_finite_above's ValueError.
at::Tensor posterior(const at::Tensor& logits, const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& s,
                     int64_t kind, int64_t mask_id, double temperature, const std::optional<at::Tensor>& a_t,
                     const std::optional<at::Tensor>& a_s, const std::optional<at::Tensor>& ab_table,
                     const std::optional<at::Tensor>& fact1, const std::optional<at::Tensor>& qbar_s,
                     const std::optional<at::Tensor>& pair, bool sample, int64_t seed, int64_t offset,
                     int64_t row_offset);

// FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL (schema.h); checks the logits' values as posterior does.
at::Tensor sample_categorical(const at::Tensor& logits, int64_t seed, int64_t offset, double temperature,
                              int64_t top_k, double top_p, int64_t row_offset);

}  // namespace fastdiff
