// Embedding-side CPU kernels: nearest_embedding (the clamp) and the chunked fused rounding loss.
//
// Both compute score tiles with the BLAS behind at::mm_out (MKL / OpenBLAS) into a buffer that is
// reused, and consume each tile with one fused vector pass, so no N x V matrix ever exists.
#include "cpu_common.h"
#include "parallel.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace fastdiff {
namespace {

// ---- nearest_embedding: the screen (fastdiff/ops/_nearest.py) ---------------------------------------
// One fused pass over one row of a score tile: s[i] <- stat[i] - 2 s[i] (l2, stat = |w|^2) or
// -(s[i] * stat[i]) (cosine, stat = 1 / max(|w|, 1e-12)); returns the minimum.
FASTDIFF_CLONES float score_min_f32(float* s, const float* stat, int64_t n, bool cosine) {
  float m = kInfF;
  if (!cosine) {
#pragma omp simd reduction(min : m)
    for (int64_t i = 0; i < n; ++i) {
      const float v = stat[i] + -2.0f * s[i];
      s[i] = v;
      m = v < m ? v : m;
    }
  } else {
#pragma omp simd reduction(min : m)
    for (int64_t i = 0; i < n; ++i) {
      const float v = -(s[i] * stat[i]);
      s[i] = v;
      m = v < m ? v : m;
    }
  }
  return m;
}

FASTDIFF_CLONES double score_min_f64(double* s, const double* stat, int64_t n, bool cosine) {
  double m = kInf;
  if (!cosine) {
#pragma omp simd reduction(min : m)
    for (int64_t i = 0; i < n; ++i) {
      const double v = stat[i] + -2.0 * s[i];
      s[i] = v;
      m = v < m ? v : m;
    }
  } else {
#pragma omp simd reduction(min : m)
    for (int64_t i = 0; i < n; ++i) {
      const double v = -(s[i] * stat[i]);
      s[i] = v;
      m = v < m ? v : m;
    }
  }
  return m;
}

inline float score_min(float* s, const float* stat, int64_t n, bool cosine) { return score_min_f32(s, stat, n, cosine); }
inline double score_min(double* s, const double* stat, int64_t n, bool cosine) {
  return score_min_f64(s, stat, n, cosine);
}

// The smallest of s[0, n) other than s[j] (+inf when n == 1).
template <typename C>
C min_except(const C* s, int64_t n, int64_t j) {
  C m = static_cast<C>(kInf);
#pragma omp simd reduction(min : m)
  for (int64_t i = 0; i < j; ++i) m = s[i] < m ? s[i] : m;
#pragma omp simd reduction(min : m)
  for (int64_t i = j + 1; i < n; ++i) m = s[i] < m ? s[i] : m;
  return m;
}

// Per row: the index of a minimum score, the minimum and the second smallest score (equal scores count
// twice). Only rows whose two are within rounding of each other need the float64 resolution.
template <typename C>
void nearest_blocks(const at::Tensor& flat, const at::Tensor& w, const C* stat_p, bool cosine, int64_t RB,
                    int64_t VT, int64_t* out_idx, C* out_best, C* out_second) {
  const int64_t N = flat.size(0), V = w.size(0);
  const int64_t nblocks = (N + RB - 1) / RB;
  // A block's GEMMs: RB x V x D multiply-adds, about 16 per unit (parallel.h).
  const int64_t block_work = RB * V * flat.size(1) / 16;
  parallel_rows(nblocks, block_work, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({RB * VT}, flat.options());
    C* tile_p = tile.data_ptr<C>();
    std::vector<C> best(RB), second(RB);
    std::vector<int64_t> arg(RB);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * RB, rn = std::min(RB, N - r0);
      const at::Tensor xb = flat.narrow(0, r0, rn);
      std::fill(best.begin(), best.end(), static_cast<C>(kInf));
      std::fill(second.begin(), second.end(), static_cast<C>(kInf));
      std::fill(arg.begin(), arg.end(), 0);
      for (int64_t v0 = 0; v0 < V; v0 += VT) {
        const int64_t vn = std::min(VT, V - v0);
        at::Tensor scores = tile.narrow(0, 0, rn * vn).view({rn, vn});
        at::mm_out(scores, xb, w.narrow(0, v0, vn).t());
        for (int64_t r = 0; r < rn; ++r) {
          C* s = tile_p + r * vn;
          const C m = score_min(s, stat_p + v0, vn, cosine);
          if (!(m < second[r])) continue;  // every score of the tile >= second >= best: nothing changes
          int64_t j = 0;
          while (j + 1 < vn && !(s[j] == m)) ++j;
          const C m2 = min_except(s, vn, j);
          // merge (best, second) with the tile's (m, m2)
          second[r] = std::min(std::max(best[r], m), std::min(second[r], m2));
          if (m < best[r]) {
            best[r] = m;
            arg[r] = v0 + j;
          }
        }
      }
      std::copy(arg.begin(), arg.begin() + rn, out_idx + r0);
      std::copy(best.begin(), best.begin() + rn, out_best + r0);
      std::copy(second.begin(), second.begin() + rn, out_second + r0);
    }
  });
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_embedding(const at::Tensor& x, const at::Tensor& weight,
                                                                 const at::Tensor& stat, const std::string& metric,
                                                                 int64_t block_rows, int64_t block_cols) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "nearest_embedding: shapes");
  TORCH_CHECK(metric == "l2" || metric == "cosine", "nearest_embedding: metric");
  TORCH_CHECK(block_rows >= 1 && block_cols >= 1, "nearest_embedding: block sizes");
  const auto cdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stat.scalar_type() == cdt && stat.dim() == 1 && stat.size(0) == weight.size(0) && stat.is_contiguous(),
              "nearest_embedding: stat must be a contiguous (V,) tensor of the compute dtype");
  const at::Tensor flat = x.to(cdt).contiguous();
  const at::Tensor w = weight.to(cdt).contiguous();
  const int64_t N = flat.size(0);
  const auto opt = x.options();
  at::Tensor idx = at::empty({N}, opt.dtype(at::kLong));
  at::Tensor best = at::empty({N}, opt.dtype(cdt));
  at::Tensor second = at::empty({N}, opt.dtype(cdt));
  if (N > 0 && w.size(0) > 0) {
    const int64_t RB = std::min(block_rows, N), VT = std::min(block_cols, w.size(0));
    const bool cosine = metric == "cosine";
    if (cdt == at::kDouble) {
      nearest_blocks<double>(flat, w, stat.data_ptr<double>(), cosine, RB, VT, idx.data_ptr<int64_t>(),
                             best.data_ptr<double>(), second.data_ptr<double>());
    } else {
      nearest_blocks<float>(flat, w, stat.data_ptr<float>(), cosine, RB, VT, idx.data_ptr<int64_t>(),
                            best.data_ptr<float>(), second.data_ptr<float>());
    }
  } else {
    idx.zero_();
    best.fill_(kInf);
    second.fill_(kInf);
  }
  return {idx, best, second};
}

std::vector<at::Tensor> rounding_loss_chunked(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                              int64_t ignore_index, const at::Tensor& row_scale, bool need_grad,
                                              int64_t chunk_rows) {
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
  const int64_t N = x.size(0), V = weight.size(0), D = x.size(1);
  const auto opt = x.options();
  at::Tensor loss = at::empty({N}, opt);
  at::Tensor gx, gw, gb;
  if (need_grad) {
    gx = at::empty({N, D}, opt);
    gw = at::zeros({V, D}, opt);
    gb = has_bias ? at::zeros({V}, opt) : at::Tensor();
  }
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
    if (need_grad) {
      at::Tensor gxc = gx.narrow(0, r0, rn);
      at::mm_out(gxc, z, weight);
      gw.addmm_(z.t(), xc);
      if (has_bias) gb.add_(z.sum(0));
    }
  }
  return {loss, gx, gw, gb};
}

}  // namespace fastdiff
