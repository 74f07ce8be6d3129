// rounding_loss on the CPU: the fused linear cross-entropy in row chunks (FASTDIFF_SCHEMA_ROUNDING_LOSS in
// schema.h). Per chunk: at::mm_out logits into one reused buffer, a parallel per-row pass (bias add, max,
// float64 sum of exp, loss (m - z_t) + log s, and row_scale * (softmax - onehot) in place), then the chunk's
// gradients by BLAS (gx = dz W, gW += dz^T x, gb += sum dz).
#include "cpu_common.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>

namespace fastdiff {
namespace {

// ---- rounding_loss: one row of a logits chunk -> loss, and dz = scale * (softmax - onehot) in place --
template <typename C>
inline C exp_c(C v);
template <>
inline float exp_c<float>(float v) {
  return exp_f32(v);
}
template <>
inline double exp_c<double>(double v) {
  return std::exp(v);
}

FASTDIFF_CLONES float row_max_f32(const float* z, int64_t n) {
  float m = -kInfF;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

FASTDIFF_CLONES double row_max_f64(const double* z, int64_t n) {
  double m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

FASTDIFF_CLONES double sum_exp_f32(const float* z, int64_t n, float m) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(exp_f32(z[i] - m));
  return s;
}

FASTDIFF_CLONES void scaled_exp_f32(float* z, int64_t n, float m, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = exp_f32(z[i] - m) * scale;
}

FASTDIFF_CLONES void add_bias_f32(float* z, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] += b[i];
}

inline float row_max(const float* z, int64_t n) { return row_max_f32(z, n); }
inline double row_max(const double* z, int64_t n) { return row_max_f64(z, n); }
inline double sum_exp(const float* z, int64_t n, float m) { return sum_exp_f32(z, n, m); }
inline double sum_exp(const double* z, int64_t n, double m) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(z[i] - m);
  return s;
}
inline void scaled_exp(float* z, int64_t n, float m, float scale) { scaled_exp_f32(z, n, m, scale); }
inline void scaled_exp(double* z, int64_t n, double m, double scale) {
  for (int64_t i = 0; i < n; ++i) z[i] = std::exp(z[i] - m) * scale;
}
inline void add_bias(float* z, const float* b, int64_t n) { add_bias_f32(z, b, n); }
inline void add_bias(double* z, const double* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] += b[i];
}

template <typename C>
void loss_rows(C* z, int64_t rn, int64_t V, const C* bias, const int64_t* target, int64_t ignore_index,
               const C* scale, bool scalar_scale, bool need_grad, C* loss) {
  parallel_rows(rn, 2 * V, [&](int64_t a, int64_t b) {  // max, exp-sum (and the gradient's exp) per row
    for (int64_t r = a; r < b; ++r) {
      C* zr = z + r * V;
      if (bias != nullptr) add_bias(zr, bias, V);
      const int64_t tgt = target[r];
      if (tgt == ignore_index) {
        loss[r] = 0;
        if (need_grad) std::fill(zr, zr + V, static_cast<C>(0));
        continue;
      }
      const C m = row_max(zr, V);
      const double s = sum_exp(zr, V, m);
      // (m - z_t) + log s: the shift first keeps log s when |m| is large (m + log s rounds it away at 1e20)
      loss[r] = static_cast<C>((static_cast<double>(m) - static_cast<double>(zr[tgt])) + std::log(s));
      if (need_grad) {
        const C sc = scalar_scale ? scale[0] : scale[r];
        scaled_exp(zr, V, m, static_cast<C>(static_cast<double>(sc) / s));
        zr[tgt] -= sc;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rounding_loss(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, const at::Tensor& row_scale, bool need_gx, bool need_gw, bool need_gb, int64_t chunk_rows) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "rounding_loss: shapes");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "rounding_loss: x and weight must share a float32/float64 compute dtype");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && target.is_contiguous(), "rounding_loss: layout");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == x.size(0), "rounding_loss: target");
  TORCH_CHECK(row_scale.scalar_type() == x.scalar_type() && row_scale.is_contiguous() &&
                  (row_scale.numel() == 1 || row_scale.numel() == x.size(0)),
              "rounding_loss: row_scale");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == weight.size(0),
                "rounding_loss: bias");
  }
  TORCH_CHECK(chunk_rows >= 1, "rounding_loss: chunk_rows");
  need_gb = need_gb && has_bias;
  const bool need_grad = need_gx || need_gw || need_gb;
  const int64_t N = x.size(0), V = weight.size(0), D = x.size(1);
  const auto opt = x.options();
  at::Tensor loss = at::empty({N}, opt);
  // A gradient that is not asked for is an empty (0,) tensor (a torch.library op returns tensors, not None).
  at::Tensor gx = need_gx ? at::empty({N, D}, opt) : at::empty({0}, opt);
  at::Tensor gw = need_gw ? at::zeros({V, D}, opt) : at::empty({0}, opt);
  at::Tensor gb = need_gb ? at::zeros({V}, opt) : at::empty({0}, opt);
  if (N == 0) return {loss, gx, gw, gb};
  // Every target is read in int64 as the row pass reads it (zr[tgt]): check them all here, so that no
  // caller (the public op checks first) can make it read or write outside the row.
  const int64_t* tgt = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = tgt[r];
    TORCH_CHECK_VALUE(t == ignore_index || (t >= 0 && t < V), "rounding_loss: target ", t, " at row ", r,
                      " lies outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  }
  const int64_t R = std::min(chunk_rows, N);
  at::Tensor buf = at::empty({R * V}, opt);
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rn = std::min(R, N - r0);
    const at::Tensor xc = x.narrow(0, r0, rn);
    at::Tensor z = buf.narrow(0, 0, rn * V).view({rn, V});
    at::mm_out(z, xc, weight.t());
    const bool scalar_scale = row_scale.numel() == 1;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rounding_loss_rows", [&] {
      loss_rows<scalar_t>(z.data_ptr<scalar_t>(), rn, V, has_bias ? bias->data_ptr<scalar_t>() : nullptr,
                          tgt + r0, ignore_index,
                          row_scale.data_ptr<scalar_t>() + (scalar_scale ? 0 : r0), scalar_scale, need_grad,
                          loss.data_ptr<scalar_t>() + r0);
    });
    if (need_gx) {
      at::Tensor gxc = gx.narrow(0, r0, rn);
      at::mm_out(gxc, z, weight);
    }
    if (need_gw) gw.addmm_(z.t(), xc);
    if (need_gb) gb.add_(z.sum(0));
  }
  return {loss, gx, gw, gb};
}

}  // namespace fastdiff
