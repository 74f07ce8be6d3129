// nearest_embedding on the CPU: the screen of fastdiff/ops/_nearest.py (the clamp). Row blocks of vectors
// against vocabulary tiles: each tile's scores come from the BLAS behind at::mm_out (MKL / OpenBLAS) into a
// per-thread buffer that is reused, and are consumed by one fused vector pass, so no N x V matrix exists.
#include "cpu_common.h"
#include "parallel.h"

#include <algorithm>
#include <vector>

namespace fastdiff {
namespace {

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
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_embedding_screen(const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& stat, bool cosine,
                                                                        int64_t block_rows, int64_t block_cols) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "nearest_embedding: shapes");
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

}  // namespace fastdiff
