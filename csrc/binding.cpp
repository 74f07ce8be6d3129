// The one registration file of fastdiff._C (the C++ CPU kernels):
// * the entry points of the kernel files (one op family a file: nearest_embedding.cpp, rounding_loss.cpp,
//   posterior.cpp, sample_categorical.cpp), declared below;
// * the torch.library ops fastdiff_cpp::<op> (schemas in schema.h, CPU kernels from the op files), which the
//   glue in fastdiff/ops/backends/cpp/ calls so that torch.compile traces them (fake kernels: registered in
//   Python, fastdiff/ops/backends/cpp/);
// * a pybind11 module exposing the same functions for direct calls (FASTDIFF_CUSTOM_OP=0 skips the
//   dispatcher, about 3 us per call), and the helpers that are not ops: philox_words (fastdiff.random),
//   row_uniform (tests) and the thread-team counters of parallel.h.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "parallel.h"
#include "schema.h"

#include <optional>
#include <tuple>

namespace fastdiff {

// ---- the kernel files' entry points -----------------------------------------------------------------
// Every function re-checks shapes, dtypes and index ranges (TORCH_CHECK), so a direct call cannot read out of
// bounds; the public ops in fastdiff/ops check their arguments first and name them in their errors.

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

// FASTDIFF_SCHEMA_SELECT_TOKENS (schema.h); checks the candidate rows' values as sample_categorical does.
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_tokens(const at::Tensor& logits, const at::Tensor& candidates,
                                                             const std::optional<at::Tensor>& counter_rows,
                                                             const std::optional<at::Tensor>& k,
                                                             const std::optional<at::Tensor>& uniform, int64_t rule,
                                                             double temperature, int64_t seed, int64_t offset,
                                                             double threshold, int64_t mode, int64_t exclude);

// ---- helpers that are not ops -----------------------------------------------------------------------

// The four Philox words of counters (start + i, offset), i = 0..n-1, as int64 (n, 4): what fastdiff.random's
// uniform / randn build their floats from (the floating-point part stays in PyTorch, so the results are
// the same bits with or without this function).
at::Tensor philox_words(uint64_t seed, uint64_t offset, int64_t n, uint64_t start) {
  TORCH_CHECK(n >= 0, "philox_words: n must be >= 0, got ", n);
  at::Tensor out = at::empty({n, 4}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  parallel_rows(n, 16, [&](int64_t b, int64_t e) {  // one Philox4x32-10 block per counter (parallel.h)
    uint32_t w[4];
    for (int64_t i = b; i < e; ++i) {
      philox4x32(seed, offset, start + static_cast<uint64_t>(i), w);
      for (int j = 0; j < 4; ++j) o[4 * i + j] = static_cast<int64_t>(w[j]);
    }
  });
  return out;
}

}  // namespace fastdiff

TORCH_LIBRARY(fastdiff_cpp, m) {
  m.def(FASTDIFF_SCHEMA_POSTERIOR);
  m.def(FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL);
  m.def(FASTDIFF_SCHEMA_ROUNDING_LOSS);
  m.def("nearest_embedding_screen(Tensor x, Tensor weight, Tensor stat, bool cosine, int block_rows, "
        "int block_cols) -> (Tensor, Tensor, Tensor)");
  m.def(FASTDIFF_SCHEMA_SELECT_TOKENS);
}

TORCH_LIBRARY_IMPL(fastdiff_cpp, CPU, m) {
  m.impl("posterior", &fastdiff::posterior);
  m.impl("sample_categorical", &fastdiff::sample_categorical);
  m.impl("rounding_loss", &fastdiff::rounding_loss);
  m.impl("nearest_embedding_screen", &fastdiff::nearest_embedding_screen);
  m.impl("select_tokens", &fastdiff::select_tokens);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff C++ CPU kernels: the ops fastdiff_cpp::* (torch.library) and the same functions for direct "
            "calls; the glue is fastdiff/ops/backends/cpp/";
  m.def("nearest_embedding_screen", &fastdiff::nearest_embedding_screen,
        "the screen of fastdiff.ops._nearest: (argmin, min, second smallest) of the scores per row", py::arg("x"),
        py::arg("weight"), py::arg("stat"), py::arg("cosine"), py::arg("block_rows"), py::arg("block_cols"));
  m.def("rounding_loss", &fastdiff::rounding_loss,
        "per-row cross-entropy of x.W^T + b and the gradients asked for, in row chunks", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("target"), py::arg("ignore_index"), py::arg("row_scale"),
        py::arg("need_gx"), py::arg("need_gw"), py::arg("need_gb"), py::arg("chunk_rows"));
  m.def("posterior", &fastdiff::posterior, "posterior probabilities or draws of a lowered PosteriorPlan",
        py::arg("logits"), py::arg("x_t"), py::arg("t"), py::arg("s"), py::arg("kind"), py::arg("mask_id"),
        py::arg("temperature"), py::arg("a_t"), py::arg("a_s"), py::arg("ab_table"), py::arg("fact1"),
        py::arg("qbar_s"), py::arg("pair"), py::arg("sample"), py::arg("seed"), py::arg("offset"),
        py::arg("row_offset"));
  m.def("sample_categorical", &fastdiff::sample_categorical, "temperature / top-k / top-p draws", py::arg("logits"),
        py::arg("seed"), py::arg("offset"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("row_offset"));
  m.def("select_tokens", &fastdiff::select_tokens, "one confidence-decoding step: tokens, scores, selection",
        py::arg("logits"), py::arg("candidates"), py::arg("counter_rows"), py::arg("k"), py::arg("uniform"),
        py::arg("rule"), py::arg("temperature"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
        py::arg("mode"), py::arg("exclude"));
  m.def("philox_words", &fastdiff::philox_words,
        "Philox4x32-10 words of counters (start..start+n-1, offset), int64 (n, 4)", py::arg("seed"),
        py::arg("offset"), py::arg("n"), py::arg("start") = 0);
  m.def("row_uniform", &fastdiff::row_uniform, "the float64 uniform of Philox counter (row, offset)",
        py::arg("seed"), py::arg("offset"), py::arg("row"));
  m.def("team_stats", &fastdiff::team::stats_dict,
        "the kernels' thread-team counters and policy constants (csrc/parallel.h)");
  m.def("team_set_contended", &fastdiff::team::set_contended,
        "mark the process contended for kHoldNs (True) or idle (False); for tests and benchmarks", py::arg("on"));
}
