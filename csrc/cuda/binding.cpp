// The one registration file of fastdiff._C_cuda (the CUDA kernels): checks, allocation, cuBLAS and launches
// (the math lives in the .cu files, launchers.h), registered as the torch.library ops fastdiff_cuda::<op> with
// the schemas every backend shares (../schema.h; fake kernels: registered in Python,
// fastdiff/ops/backends/cuda/), and bound with pybind11 for direct calls (FASTDIFF_CUSTOM_OP=0). Compiled by
// the host compiler only in a CUDA build of the extension; CI checks its syntax against the torch headers
// (tests/test_cuda_compile.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <optional>
#include <string>
#include <tuple>

#include "../schema.h"
#include "launchers.h"

namespace fastdiff {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, name, ": expected a floating dtype (float32/float64/float16/bfloat16), got ",
                              t.scalar_type());
  }
  return DType::kFloat32;
}

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
}

void check_rows(const Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == cols, name, ": expected shape (rows, ", cols, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name, ": the last dimension must be contiguous");
  // Read-only inputs: any row stride >= 0 is fine (0 broadcasts one row, as expand() gives).
  TORCH_CHECK_VALUE(t.stride(0) >= 0, name, ": negative row stride");
}

void check_vec(const Tensor& t, const char* name, int64_t n, at::ScalarType st, const Tensor& like) {
  check_cuda(t, name, like);
  TORCH_CHECK_TYPE(t.scalar_type() == st, name, ": expected dtype ", st, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), name, ": expected a contiguous (", n,
                    ",) tensor, got ", t.sizes());
}

Tensor require_f64(const OptTensor& t, const char* name, const Tensor& like, std::initializer_list<int64_t> shape) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), name, ": required for this process kind");
  check_cuda(*t, name, like);
  TORCH_CHECK_TYPE(t->scalar_type() == at::kDouble, name, ": expected float64, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->is_contiguous() && t->sizes() == at::IntArrayRef(shape), name, ": expected a contiguous ",
                    at::IntArrayRef(shape), " tensor, got ", t->sizes());
  return *t;
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(e));
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

int num_sms(const Tensor& t) {
  int n = 0;
  check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.device().index()), "device query");
  return n;
}

// ---- nearest_embedding ---------------------------------------------------------------------------
// The screen of fastdiff/ops/_nearest.py: (index of a minimum, minimum, second smallest score) per row.
std::tuple<Tensor, Tensor, Tensor> nearest_embedding_screen(const Tensor& x, const Tensor& weight, const Tensor& stat,
                                                            bool cosine) {
  check_cuda(x, "x", x);
  check_cuda(weight, "weight", x);
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "weight: dtype ", weight.scalar_type(), " differs from x's ",
                   x.scalar_type());
  const DType dt = dtype_of(x, "x");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) >= 1, "weight: expected shape (V, D) with V >= 1");
  const int64_t D = weight.size(1);
  check_rows(x, "x", D);
  check_rows(weight, "weight", D);
  const int64_t N = x.size(0), V = weight.size(0);
  const at::ScalarType cdt = dt == DType::kFloat64 ? at::kDouble : at::kFloat;
  check_vec(stat, "stat", V, cdt, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor idx = at::empty({N}, x.options().dtype(at::kLong));
  Tensor best = at::empty({N}, x.options().dtype(cdt));
  Tensor second = at::empty({N}, x.options().dtype(cdt));
  if (N == 0) return {idx, best, second};
  const int sms = num_sms(x);
  Tensor ws = at::empty({static_cast<int64_t>(nearest_embedding_workspace_bytes(N, V, dt, sms))},
                        x.options().dtype(at::kByte));
  check_launch(nearest_embedding_launch(x.data_ptr(), N > 1 ? x.stride(0) : D, weight.data_ptr(),
                                        V > 1 ? weight.stride(0) : D, stat.data_ptr(), N, V, D, dt, cosine,
                                        idx.data_ptr<int64_t>(), best.data_ptr(), second.data_ptr(), ws.data_ptr(),
                                        sms, stream_of(x)),
               "nearest_embedding");
  return {idx, best, second};
}

// ---- rounding_loss -------------------------------------------------------------------------------
// FASTDIFF_SCHEMA_ROUNDING_LOSS (schema.h). x: (N, D), weight: (V, D), bias: (V,) all float32 or all float64
// (the caller upcasts half types); target: (N,) int64; row_scale: (1,) or (N,) of x's dtype. Returns the
// per-row losses and the gradients of sum_r row_scale[r] * loss_r asked for ((0,) for the others). Rows go
// through in chunks of chunk_rows: the only logits buffer is one chunk.
std::tuple<Tensor, Tensor, Tensor, Tensor> rounding_loss(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                         const Tensor& target, int64_t ignore_index,
                                                         const Tensor& row_scale, bool need_gx, bool need_gw,
                                                         bool need_gb, int64_t chunk_rows) {
  check_cuda(x, "x", x);
  check_cuda(weight, "weight", x);
  const DType dt = dtype_of(x, "x");
  TORCH_CHECK_TYPE(dt == DType::kFloat32 || dt == DType::kFloat64, "x: expected float32 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight: dtype differs from x's");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "x: expected a contiguous (N, D) tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
                    "weight: expected a contiguous (V, D) tensor matching x's D");
  const int64_t N = x.size(0), V = weight.size(0);
  check_vec(target, "target", N, at::kLong, x);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_vec(*bias, "bias", V, x.scalar_type(), x);
  const bool per_row = row_scale.numel() != 1;
  check_vec(row_scale, "row_scale", per_row ? N : 1, x.scalar_type(), x);
  TORCH_CHECK_VALUE(chunk_rows >= 1, "chunk_rows: must be positive");
  const c10::cuda::CUDAGuard guard(x.device());
  need_gb = need_gb && has_bias;
  const bool grad = need_gx || need_gw || need_gb;
  Tensor loss = at::empty({N}, x.options());
  Tensor gx = need_gx ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor gw = need_gw ? at::zeros_like(weight) : at::empty({0}, x.options());
  Tensor gb = need_gb ? at::zeros({V}, x.options()) : at::empty({0}, x.options());
  const Tensor wt = weight.t();
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t r = std::min(chunk_rows, N - r0);
    const Tensor xc = x.narrow(0, r0, r);
    Tensor logits = has_bias ? at::addmm(*bias, xc, wt) : at::mm(xc, wt);  // (r, V), contiguous
    const void* rs = static_cast<const char*>(row_scale.data_ptr()) + (per_row ? r0 * row_scale.element_size() : 0);
    check_launch(rounding_loss_epilogue_launch(logits.data_ptr(), V, r, V, dt, target.data_ptr<int64_t>() + r0,
                                               ignore_index,
                                               static_cast<char*>(loss.data_ptr()) + r0 * loss.element_size(), grad,
                                               rs, per_row ? 1 : 0, stream_of(x)),
                 "rounding_loss");
    if (need_gx) {
      Tensor dst = gx.narrow(0, r0, r);
      at::mm_out(dst, logits, weight);
    }
    if (need_gw) gw.addmm_(logits.t(), xc);
    if (need_gb) gb.add_(logits.sum(0));
  }
  return {loss, gx, gw, gb};
}

// ---- posterior ops -------------------------------------------------------------------------------
// The ABI's kind codes (schema.h) onto the kernels' PosteriorKind (launchers.h).
PosteriorArgs posterior_args(const Tensor& logits, const Tensor& x_t, const Tensor& t, const Tensor& s, int64_t kind,
                             int64_t mask_id, double temperature, const OptTensor& a_t, const OptTensor& a_s,
                             const OptTensor& ab_table, const OptTensor& fact1, const OptTensor& qbar_s,
                             const OptTensor& pair) {
  check_cuda(logits, "x0_logits", logits);
  PosteriorArgs a{};
  a.dtype = dtype_of(logits, "x0_logits");
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, "x0_logits: expected shape (N, V)");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_rows(logits, "x0_logits", V);
  check_vec(x_t, "x_t", N, at::kLong, logits);
  check_vec(t, "t", N, at::kLong, logits);
  check_vec(s, "s", N, at::kLong, logits);
  TORCH_CHECK_VALUE(temperature > 0.0, "temperature: must be positive, got ", temperature);
  a.logits = logits.data_ptr();
  a.ld = N > 1 ? logits.stride(0) : V;
  a.N = N;
  a.V = V;
  a.x_t = x_t.data_ptr<int64_t>();
  a.t = t.data_ptr<int64_t>();
  a.s = s.data_ptr<int64_t>();
  a.temperature = temperature;
  a.mask_id = mask_id;
  if (kind == kKindAbsorbing || kind == kKindAbsorbingPerToken) {
    a.kind = PosteriorKind::kAbsorbing;
    TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < V, "mask_id: must lie in [0, ", V, "), got ", mask_id);
    if (kind == kKindAbsorbingPerToken) {
      TORCH_CHECK_VALUE(ab_table.has_value() && ab_table->defined() && ab_table->dim() == 2,
                        "ab_table: expected shape (T+1, V)");
      const Tensor tab = require_f64(ab_table, "ab_table", logits, {ab_table->size(0), V});
      a.ab_table = tab.data_ptr<double>();
      a.ab_rows = tab.size(0);
    } else {
      a.a_t = require_f64(a_t, "a_t", logits, {N}).data_ptr<double>();
      a.a_s = require_f64(a_s, "a_s", logits, {N}).data_ptr<double>();
    }
  } else if (kind == kKindUniform) {
    a.kind = PosteriorKind::kUniform;
    a.a_t = require_f64(a_t, "a_t", logits, {N}).data_ptr<double>();
    a.a_s = require_f64(a_s, "a_s", logits, {N}).data_ptr<double>();
  } else if (kind == kKindMatrix) {
    a.kind = PosteriorKind::kMatrix;
    a.fact1 = require_f64(fact1, "fact1", logits, {N, V}).data_ptr<double>();
    TORCH_CHECK_VALUE(qbar_s.has_value() && qbar_s->defined() && qbar_s->dim() == 3, "qbar_s: expected shape (P, V, V)");
    a.qbar_s = require_f64(qbar_s, "qbar_s", logits, {qbar_s->size(0), V, V}).data_ptr<double>();
    a.qbar_count = qbar_s->size(0);
    TORCH_CHECK_VALUE(pair.has_value() && pair->defined(), "pair: required for matrix processes");
    check_vec(*pair, "pair", N, at::kLong, logits);
    a.pair = pair->data_ptr<int64_t>();
  } else {
    TORCH_CHECK_VALUE(false, "kind: expected 0 (absorbing), 1 (absorbing, per-token schedule), 2 (uniform) or 3 "
                      "(matrix), got ", kind);
  }
  return a;
}

// FASTDIFF_SCHEMA_POSTERIOR (schema.h): (N, V) probabilities, or (N,) int64 tokens with `sample`.
Tensor posterior(const Tensor& logits, const Tensor& x_t, const Tensor& t, const Tensor& s, int64_t kind,
                 int64_t mask_id, double temperature, const OptTensor& a_t, const OptTensor& a_s,
                 const OptTensor& ab_table, const OptTensor& fact1, const OptTensor& qbar_s, const OptTensor& pair,
                 bool sample, int64_t seed, int64_t offset, int64_t row_offset) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const PosteriorArgs a = posterior_args(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1,
                                         qbar_s, pair);
  if (sample) {
    Tensor out = at::empty({a.N}, logits.options().dtype(at::kLong));
    check_launch(posterior_sample_launch(a, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                         static_cast<uint64_t>(row_offset), out.data_ptr<int64_t>(), stream_of(logits)),
                 "posterior_sample");
    return out;
  }
  const bool f64 = a.dtype == DType::kFloat64;
  Tensor out = at::empty({a.N, a.V}, logits.options().dtype(f64 ? at::kDouble : at::kFloat));
  check_launch(categorical_posterior_launch(a, out.data_ptr(), f64 ? DType::kFloat64 : DType::kFloat32,
                                            stream_of(logits)),
               "categorical_posterior");
  return out;
}

// posterior_sample with (seed, offset, row_offset) in a (3,) int64 device tensor that the kernel reads: the op a
// CUDA graph captures (fastdiff/sampling/_graph.py), so each replay draws with the counters of its step.
Tensor posterior_counters(const Tensor& logits, const Tensor& x_t, const Tensor& t, const Tensor& s, int64_t kind,
                          int64_t mask_id, double temperature, const OptTensor& a_t, const OptTensor& a_s,
                          const OptTensor& ab_table, const OptTensor& fact1, const OptTensor& qbar_s,
                          const OptTensor& pair, const Tensor& counters) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const PosteriorArgs a = posterior_args(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1,
                                         qbar_s, pair);
  check_vec(counters, "counters", 3, at::kLong, logits);
  Tensor out = at::empty({a.N}, logits.options().dtype(at::kLong));
  check_launch(posterior_sample_counters_launch(a, counters.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                                stream_of(logits)),
               "posterior_counters");
  return out;
}

// ---- sample_categorical --------------------------------------------------------------------------
// FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL (schema.h).
Tensor sample_categorical(const Tensor& logits, int64_t seed, int64_t offset, double temperature, int64_t top_k,
                          double top_p, int64_t row_offset) {
  check_cuda(logits, "logits", logits);
  const DType dt = dtype_of(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, "logits: expected shape (N, V)");
  const int64_t N = logits.size(0), V = logits.size(1);
  check_rows(logits, "logits", V);
  TORCH_CHECK_VALUE(temperature >= 0.0, "temperature: must be non-negative, got ", temperature);
  TORCH_CHECK_VALUE(top_p > 0.0, "top_p: must be positive, got ", top_p);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor out = at::empty({N}, logits.options().dtype(at::kLong));
  check_launch(sample_categorical_launch(logits.data_ptr(), N > 1 ? logits.stride(0) : V, N, V, dt, temperature,
                                         top_k, top_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                         static_cast<uint64_t>(row_offset), out.data_ptr<int64_t>(),
                                         stream_of(logits)),
               "sample_categorical");
  return out;
}

// ---- select_tokens --------------------------------------------------------------------------------
// The checks of select_tokens' logits (B, L, V) shared by its two entry points: their dtype.
DType check_select_logits(const Tensor& logits) {
  check_cuda(logits, "logits", logits);
  const DType dt = dtype_of(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(2) >= 1, "logits: expected shape (B, L, V)");
  TORCH_CHECK_VALUE(logits.size(2) <= 1 || logits.stride(2) == 1, "logits: the last dimension must be contiguous");
  TORCH_CHECK_VALUE(logits.stride(0) >= 0 && logits.stride(1) >= 0, "logits: negative stride");
  return dt;
}

// ... and of the draw's arguments: temperature, the excluded column, counter_rows (B, L) when sampling.
void check_select_draw(const Tensor& logits, const OptTensor& counter_rows, double temperature, int64_t exclude) {
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK_VALUE(temperature >= 0.0, "temperature: must be non-negative, got ", temperature);
  TORCH_CHECK_VALUE(exclude >= -1 && exclude < V, "exclude: out of range");
  if (temperature > 0.0) {
    TORCH_CHECK_VALUE(counter_rows.has_value(), "counter_rows: required when temperature > 0");
    check_cuda(*counter_rows, "counter_rows", logits);
    TORCH_CHECK_VALUE(counter_rows->scalar_type() == at::kLong && counter_rows->dim() == 2 &&
                          counter_rows->size(0) == B && counter_rows->size(1) == L,
                      "counter_rows: expected a (B, L) int64 tensor");
  }
}

// FASTDIFF_SCHEMA_SELECT_TOKENS (schema.h): the kernel per candidate row, the selection here (ATen).
std::tuple<Tensor, Tensor, Tensor> select_tokens(const Tensor& logits, const Tensor& candidates,
                                                 const OptTensor& counter_rows, const OptTensor& k,
                                                 const OptTensor& uniform, int64_t rule, double temperature,
                                                 int64_t seed, int64_t offset, double threshold, int64_t mode,
                                                 int64_t exclude) {
  const DType dt = check_select_logits(logits);
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  check_cuda(candidates, "candidates", logits);
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kBool, "candidates: expected bool");
  TORCH_CHECK_VALUE(candidates.dim() == 2 && candidates.size(0) == B && candidates.size(1) == L,
                    "candidates: expected shape (B, L)");
  TORCH_CHECK_VALUE(rule >= 0 && rule <= 5 && mode >= 0 && mode <= 2, "select_tokens: rule / mode out of range");
  check_select_draw(logits, counter_rows, temperature, exclude);
  if (rule == 5) {
    TORCH_CHECK_VALUE(uniform.has_value(), "uniform: required with the random rule");
    check_cuda(*uniform, "uniform", logits);
    TORCH_CHECK_VALUE(uniform->scalar_type() == at::kDouble && uniform->dim() == 2 && uniform->size(0) == B &&
                          uniform->size(1) == L,
                      "uniform: expected a (B, L) float64 tensor");
  }
  if (mode == 1) {
    TORCH_CHECK_VALUE(k.has_value(), "k: required for top-k");
    check_vec(*k, "k", B, at::kLong, logits);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor pos = candidates.reshape(-1).nonzero().squeeze(1);
  const int64_t M = pos.size(0);
  Tensor tok_m = at::empty({M}, logits.options().dtype(at::kLong));
  Tensor key_m = at::empty({M}, logits.options().dtype(at::kDouble));
  Tensor status = at::zeros({M}, logits.options().dtype(at::kInt));
  if (M) {
    const Tensor row_off = (at::div(pos, L, "floor") * logits.stride(0) + at::remainder(pos, L) * logits.stride(1))
                               .contiguous();
    const Tensor counters =
        temperature > 0.0 ? counter_rows->reshape(-1).index_select(0, pos).contiguous() : row_off;
    check_launch(select_tokens_launch(logits.data_ptr(), row_off.data_ptr<int64_t>(), counters.data_ptr<int64_t>(), M,
                                      V, dt, exclude, static_cast<int>(rule), temperature,
                                      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                      tok_m.data_ptr<int64_t>(), key_m.data_ptr<double>(), status.data_ptr<int>(),
                                      stream_of(logits)),
                 "select_tokens");
    const int worst = status.max().item<int>();
    // ops._common's messages, word for word (the same ValueError as every backend's value check).
    TORCH_CHECK_VALUE(worst != 4, "logits: contains NaN");
    TORCH_CHECK_VALUE(worst != 3, "logits: contains +inf");
    TORCH_CHECK_VALUE(worst != 2, "logits: a row has every logit at -inf (no category can be drawn)");
    if (rule == 5) key_m = uniform->reshape(-1).index_select(0, pos);
  }
  Tensor tokens = at::zeros({B * L}, tok_m.options()).index_copy_(0, pos, tok_m).reshape({B, L});
  Tensor key = at::full({B * L}, -INFINITY, key_m.options()).index_copy_(0, pos, key_m).reshape({B, L});
  Tensor conf = at::where(candidates, key.to(at::kFloat), at::full({}, -INFINITY, key.options().dtype(at::kFloat)));
  if (mode == 0) return {tokens, conf, candidates.clone()};
  // best first, ties to the lower position; candidates before every non-candidate (two stable sorts)
  Tensor order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/1, /*descending=*/true));
  order = order.gather(1, std::get<1>(at::sort(candidates.gather(1, order).to(at::kChar), /*stable=*/true,
                                               /*dim=*/1, /*descending=*/true)));
  if (mode == 1) {
    Tensor rank = at::empty_like(order).scatter_(1, order, at::arange(L, order.options()).expand_as(order));
    return {tokens, conf, candidates & (rank < k->unsqueeze(1))};
  }
  Tensor sel = candidates & (key >= threshold);
  if (L) {
    Tensor best = at::zeros_like(sel).scatter_(1, order.narrow(1, 0, 1), true);
    sel = sel | (best & candidates.any(1, /*keepdim=*/true));
  }
  return {tokens, conf, sel};
}

// select_tokens' per-row kernel on every (b, l) row of logits (B, L, V), candidate or not, with (seed, offset) read
// on the device from seed_offset (2,) int64: nothing here reads a value on the host (no nonzero, no status check),
// so a CUDA graph can capture it (fastdiff/generation/_graph.py, which masks the candidates, checks the status after
// the replay and selects with ATen as select_tokens above does). Returns (tokens, keys float64, status int32), (B, L).
std::tuple<Tensor, Tensor, Tensor> select_rows_counters(const Tensor& logits, const OptTensor& counter_rows,
                                                        int64_t rule, double temperature, int64_t exclude,
                                                        const Tensor& seed_offset) {
  const DType dt = check_select_logits(logits);
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK_VALUE(rule >= 0 && rule <= 5, "select_rows_counters: rule out of range");
  check_vec(seed_offset, "seed_offset", 2, at::kLong, logits);
  check_select_draw(logits, counter_rows, temperature, exclude);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t M = B * L;
  Tensor tok = at::zeros({M}, logits.options().dtype(at::kLong));
  Tensor key = at::zeros({M}, logits.options().dtype(at::kDouble));
  Tensor status = at::zeros({M}, logits.options().dtype(at::kInt));
  if (M) {
    const Tensor pos = at::arange(M, logits.options().dtype(at::kLong));
    const Tensor row_off = (at::div(pos, L, "floor") * logits.stride(0) + at::remainder(pos, L) * logits.stride(1))
                               .contiguous();
    const Tensor counters = temperature > 0.0 ? counter_rows->reshape(-1).contiguous() : row_off;
    check_launch(select_tokens_counters_launch(logits.data_ptr(), row_off.data_ptr<int64_t>(),
                                               counters.data_ptr<int64_t>(), M, V, dt, exclude, static_cast<int>(rule),
                                               temperature, seed_offset.data_ptr<int64_t>(), tok.data_ptr<int64_t>(),
                                               key.data_ptr<double>(), status.data_ptr<int>(), stream_of(logits)),
                 "select_rows_counters");
  }
  return {tok.reshape({B, L}), key.reshape({B, L}), status.reshape({B, L})};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY(fastdiff_cuda, m) {
  m.def(FASTDIFF_SCHEMA_POSTERIOR);
  m.def(FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL);
  m.def(FASTDIFF_SCHEMA_ROUNDING_LOSS);
  m.def("nearest_embedding_screen(Tensor x, Tensor weight, Tensor stat, bool cosine) -> (Tensor, Tensor, Tensor)");
  m.def(FASTDIFF_SCHEMA_SELECT_TOKENS);
  m.def("posterior_counters(Tensor logits, Tensor x_t, Tensor t, Tensor s, int kind, int mask_id, float temperature, "
        "Tensor? a_t, Tensor? a_s, Tensor? ab_table, Tensor? fact1, Tensor? qbar_s, Tensor? pair, Tensor counters) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff_cuda, CUDA, m) {
  m.impl("posterior", &fastdiff::posterior);
  m.impl("sample_categorical", &fastdiff::sample_categorical);
  m.impl("rounding_loss", &fastdiff::rounding_loss);
  m.impl("nearest_embedding_screen", &fastdiff::nearest_embedding_screen);
  m.impl("select_tokens", &fastdiff::select_tokens);
  m.impl("posterior_counters", &fastdiff::posterior_counters);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fastdiff;
  m.doc() = "fastdiff CUDA kernels: the ops fastdiff_cuda::* (torch.library) and the same functions for direct calls; "
            "the glue is fastdiff/ops/backends/cuda/";
  m.def("nearest_embedding_screen", &nearest_embedding_screen, py::arg("x"), py::arg("weight"), py::arg("stat"),
        py::arg("cosine"));
  m.def("rounding_loss", &rounding_loss, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("target"),
        py::arg("ignore_index"), py::arg("row_scale"), py::arg("need_gx"), py::arg("need_gw"), py::arg("need_gb"),
        py::arg("chunk_rows"));
  m.def("posterior", &posterior, py::arg("logits"), py::arg("x_t"), py::arg("t"), py::arg("s"), py::arg("kind"),
        py::arg("mask_id"), py::arg("temperature"), py::arg("a_t"), py::arg("a_s"), py::arg("ab_table"),
        py::arg("fact1"), py::arg("qbar_s"), py::arg("pair"), py::arg("sample"), py::arg("seed"), py::arg("offset"),
        py::arg("row_offset"));
  m.def("sample_categorical", &sample_categorical, py::arg("logits"), py::arg("seed"), py::arg("offset"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("row_offset"));
  m.def("select_tokens", &select_tokens, py::arg("logits"), py::arg("candidates"), py::arg("counter_rows"),
        py::arg("k"), py::arg("uniform"), py::arg("rule"), py::arg("temperature"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("mode"), py::arg("exclude"));
  m.def("posterior_counters", &posterior_counters, py::arg("logits"), py::arg("x_t"), py::arg("t"), py::arg("s"),
        py::arg("kind"), py::arg("mask_id"), py::arg("temperature"), py::arg("a_t"), py::arg("a_s"),
        py::arg("ab_table"), py::arg("fact1"), py::arg("qbar_s"), py::arg("pair"), py::arg("counters"));
  m.def("select_rows_counters", &select_rows_counters, py::arg("logits"), py::arg("counter_rows"), py::arg("rule"),
        py::arg("temperature"), py::arg("exclude"), py::arg("seed_offset"));
}
