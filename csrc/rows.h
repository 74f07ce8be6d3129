// Row primitives shared by the logit-side CPU kernels (posterior.cpp, sample_categorical.cpp): the value
// check's status codes, vectorised max / exp-sum passes, the "affine" row of weights with its chunked
// inverse-CDF draw, and the per-row statistics pass.
//
// One row at a time (rows in parallel): one pass over the row that takes each chunk of CH categories'
// max and exp-sum while the chunk is in L1, then the inverse-CDF draw: the chunk sums locate the chunk
// where the cumulative weight crosses u * W, sums of 32 categories inside it the sub-chunk, and only
// that sub-chunk is walked element by element with float64 weights, as the reference computes them.
// No (N, V) buffer exists.
//
// Precision: float64 logits, and rows of at most kExactV categories, are computed in float64
// throughout (exp from libm). Wider float32/float16/bfloat16 rows sum their weights with a vectorised
// float32 exp (about 1 ulp) accumulated in float64; the crossing chunk is then walked in float64, so a
// draw can differ from the reference's only where u * W lies within about 1e-7 of a CDF boundary.
//
// Everything here has internal linkage (an anonymous namespace): each translation unit that includes it
// gets its own copy, so the function-multiversioned loops (FASTDIFF_CLONES) never clash at link time.
#pragma once

#include "cpu_common.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fastdiff {
namespace {

constexpr int64_t CH = 512;          // categories per CDF chunk
constexpr int64_t kExactV = 2048;    // rows this narrow are computed in float64 whatever their dtype

// Status of the in-kernel value check, ordered as check_finite_above reports them (the highest status of
// any row is reported, as the Python check finds NaN anywhere first, then +inf, ...). kOnlyMask: a masked
// absorbing row whose only finite logit is the (ignored) mask logit.
constexpr int kOk = 0, kOnlyMask = 1, kAllNegInf = 2, kPosInf = 3, kNaN = 4;

// The Python check's messages (fastdiff/ops/_common.py), word for word.
inline const char* status_message(int status) {
  switch (status) {
    case kNaN: return "contains NaN";
    case kPosInf: return "contains +inf";
    case kAllNegInf: return "a row has every logit at -inf (no category can be drawn)";
    default:
      return "a masked row (x_t == mask_id) has every logit but the mask's at -inf (the mask logit is ignored, so "
             "there is no x0 distribution to draw from)";
  }
}


// ---- vector primitives --------------------------------------------------------------------------------
FASTDIFF_CLONES float vmax_f32(const float* x, int64_t n, int* nan) {
  float m = -kInfF;
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    bad |= (x[i] != x[i]);
    m = x[i] > m ? x[i] : m;
  }
  *nan |= bad;
  return m;
}

// float32 lanes suffice for one chunk (at most CH / lanes additions each, relative error below
// 1e-6); chunks are combined in float64. The draw walks a chunk in float64 whenever the chunk sum is
// within 1e-5 of the target, so these errors never move a draw, only the total W (by ~1e-7).
FASTDIFF_CLONES double esum_f32(const float* x, int64_t n, float M, float inv_t, float thr) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_f32((x[i] - M) * inv_t);
    s += x[i] >= thr ? e : 0.0f;
  }
  return static_cast<double>(s);
}

// Four independent accumulators over the four quarters of the range: four exp polynomials in flight per
// step instead of one chain of vector additions. M is the range's maximum (row_stats), so every argument
// is <= 0: exp_f32_nonpos.
FASTDIFF_CLONES double esum_all_f32(const float* x, int64_t n, float M, float inv_t) {
  const int64_t q = n / 4;
  const float* x1 = x + q;
  const float* x2 = x + 2 * q;
  const float* x3 = x + 3 * q;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < q; ++i) {
    s0 += exp_f32_nonpos((x[i] - M) * inv_t);
    s1 += exp_f32_nonpos((x1[i] - M) * inv_t);
    s2 += exp_f32_nonpos((x2[i] - M) * inv_t);
    s3 += exp_f32_nonpos((x3[i] - M) * inv_t);
  }
  for (int64_t i = 4 * q; i < n; ++i) s0 += exp_f32_nonpos((x[i] - M) * inv_t);
  return static_cast<double>((s0 + s1) + (s2 + s3));
}

[[maybe_unused]] FASTDIFF_CLONES void eprobs_f32(const float* x, int64_t n, float M, float inv_t, float thr, float ca, float cb,
                                float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_f32((x[i] - M) * inv_t);
    out[i] = (x[i] >= thr ? e : 0.0f) * ca + cb;
  }
}

double vmax_f64(const double* x, int64_t n, int* nan) {
  double m = -kInf;
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bad |= (x[i] != x[i]);
    m = x[i] > m ? x[i] : m;
  }
  *nan |= bad;
  return m;
}

inline float vmax(const float* x, int64_t n, int* nan) { return vmax_f32(x, n, nan); }
inline double vmax(const double* x, int64_t n, int* nan) { return vmax_f64(x, n, nan); }

// Weight of one category exactly as the reference computes it: exp(x/temp - max/temp) in float64.
inline double ew(double x, double temp, double zM) { return std::exp(x / temp - zM); }

// Sum of the weights of x[0, n) with x >= thr (thr = -inf: all).
inline double esum(const float* x, int64_t n, float M, double temp, float thr) {
  return esum_f32(x, n, M, static_cast<float>(1.0 / temp), thr);
}
inline double esum(const double* x, int64_t n, double M, double temp, double thr) {
  const double zM = M / temp;
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] >= thr ? ew(x[i], temp, zM) : 0.0;
  return s;
}

// ---- one row ------------------------------------------------------------------------------------------
// The weights of every "affine" row (absorbing with a scalar schedule, uniform, plain sampling):
//   w_j = a * e_j * [j != skip] * [x_j >= thr] + b + [j == spike] * spike_val,  e_j = exp((x_j - M) / temp)
template <typename C>
struct AffineRow {
  const C* x;
  int64_t V;
  C M;
  double temp;
  C thr;
  int64_t skip, spike;
  double a, b, spike_val;

  double weight(int64_t j) const {
    double w = b;
    if (j != skip && x[j] >= thr) w += a * ew(static_cast<double>(x[j]), temp, static_cast<double>(M) / temp);
    if (j == spike) w += spike_val;
    return w;
  }

  // Chunk sums of e over [lo, hi) minus the skipped category; returns Z = their total.
  double chunk_e(double* E) const {
    double Z = 0.0;
    for (int64_t lo = 0, c = 0; lo < V; lo += CH, ++c) {
      const int64_t hi = std::min(V, lo + CH);
      double s;
      if (skip >= lo && skip < hi) {
        s = esum(x + lo, skip - lo, M, temp, thr) + esum(x + skip + 1, hi - skip - 1, M, temp, thr);
      } else {
        s = esum(x + lo, hi - lo, M, temp, thr);
      }
      E[c] = s;
      Z += s;
    }
    return Z;
  }

  // E -> chunk weights in place; returns W.
  double chunk_w(double* E) const {
    double W = 0.0;
    for (int64_t lo = 0, c = 0; lo < V; lo += CH, ++c) {
      const int64_t hi = std::min(V, lo + CH);
      double w = a * E[c] + b * static_cast<double>(hi - lo);
      if (spike >= lo && spike < hi) w += spike_val;
      E[c] = w;
      W += w;
    }
    return W;
  }

  // Weight of [lo, hi) from the vectorised e sums (the same sums as chunk_e, float32 exp for float rows).
  double range_w(int64_t lo, int64_t hi) const {
    double e;
    if (skip >= lo && skip < hi) {
      e = esum(x + lo, skip - lo, M, temp, thr) + esum(x + skip + 1, hi - skip - 1, M, temp, thr);
    } else {
      e = esum(x + lo, hi - lo, M, temp, thr);
    }
    double w = a * e + b * static_cast<double>(hi - lo);
    if (spike >= lo && spike < hi) w += spike_val;
    return w;
  }

  // min{j : cumsum(w)_j > u * W}: chunk sums first; the crossing chunk by SUB-category sums (vectorised);
  // only the crossing sub-chunk element by element in float64, as the reference computes the weights.
  // A (sub-)chunk is entered whenever its sum could reach the target within the float32 sums' error;
  // if the float64 walk does not cross there, the walk goes on with the next one. Else the last
  // positive-weight category.
  int64_t draw(const double* Wc, double W, double u) const {
    constexpr int64_t SUB = 32;
    const double target = u * W;
    double cum = 0.0;
    auto near = [&](double w) { return cum + w * (1.0 + 1e-5) + 1e-6 * W >= target; };
    for (int64_t lo = 0, c = 0; lo < V; lo += CH, ++c) {
      const int64_t hi = std::min(V, lo + CH);
      if (!near(Wc[c])) {
        cum += Wc[c];
        continue;
      }
      for (int64_t slo = lo; slo < hi; slo += SUB) {
        const int64_t shi = std::min(hi, slo + SUB);
        const double ws = range_w(slo, shi);
        if (!near(ws)) {
          cum += ws;
          continue;
        }
        for (int64_t j = slo; j < shi; ++j) {
          cum += weight(j);
          if (cum > target) return j;
        }
      }
    }
    for (int64_t j = V - 1; j >= 0; --j) {
      if (weight(j) > 0.0) return j;
    }
    return V - 1;  // no positive weight (an undefined posterior): the reference's fallback index
  }

  template <typename O>
  void write(O* out, double W) const {
    const double ca = a / W, cb = b / W;
    if constexpr (std::is_same<C, float>::value && std::is_same<O, float>::value) {
      eprobs_f32(x, V, M, static_cast<float>(1.0 / temp), thr, static_cast<float>(ca), static_cast<float>(cb), out);
    } else {
      const double zM = static_cast<double>(M) / temp;
      for (int64_t j = 0; j < V; ++j) {
        const double e = x[j] >= thr ? ew(static_cast<double>(x[j]), temp, zM) : 0.0;
        out[j] = static_cast<O>(e * ca + cb);
      }
    }
    if (skip >= 0) out[skip] = static_cast<O>(cb);
    if (spike >= 0) out[spike] = static_cast<O>(weight(spike) / W);
  }
};

// One pass over a row: the maximum M over j != skip, the chunk sums E[c] of e_j = exp((x_j - M) / temp)
// (j != skip), their total Z, and the value check (NaN, +inf, every logit -inf) over the whole row.
// float rows: each chunk's max and exp-sum are taken while the chunk is in L1 (one read from memory),
// relative to the chunk's own max, and rescaled to M in float64 at the end.
struct RowStats {
  double Z;
  int status;
};

template <typename C>
inline RowStats finish_stats(C M, C m_skip, int nan, double Z) {
  int status = kOk;
  nan |= (m_skip != m_skip);  // a NaN in the skipped (mask) column: std::max below would drop it
  const C m_all = std::max(M, m_skip);
  if (nan) {
    status = kNaN;
  } else if (m_all == static_cast<C>(kInf)) {
    status = kPosInf;
  } else if (m_all == static_cast<C>(-kInf)) {
    status = kAllNegInf;
  }
  return {Z, status};
}

inline RowStats row_stats(const float* x, int64_t V, int64_t skip, double temp, float* M_out, double* E,
                          std::vector<float>& mc) {
  const float inv_t = static_cast<float>(1.0 / temp);
  const int64_t nch = (V + CH - 1) / CH;
  mc.resize(nch);
  int nan = 0;
  float M = -kInfF;
  for (int64_t lo = 0, c = 0; lo < V; lo += CH, ++c) {
    const int64_t hi = std::min(V, lo + CH);
    // Ask for the chunk after next while this one is computed, so memory and exp overlap.
    for (int64_t p = lo + 2 * CH; p < std::min(V, lo + 3 * CH); p += 16) __builtin_prefetch(x + p, 0, 3);
    float m;
    double sc = 0.0;
    if (skip >= lo && skip < hi) {
      m = std::max(vmax_f32(x + lo, skip - lo, &nan), vmax_f32(x + skip + 1, hi - skip - 1, &nan));
      if (m > -kInfF) {
        sc = esum_all_f32(x + lo, skip - lo, m, inv_t) + esum_all_f32(x + skip + 1, hi - skip - 1, m, inv_t);
      }
    } else {
      m = vmax_f32(x + lo, hi - lo, &nan);
      if (m > -kInfF) sc = esum_all_f32(x + lo, hi - lo, m, inv_t);
    }
    mc[c] = m;
    E[c] = sc;
    M = std::max(M, m);
  }
  double Z = 0.0;
  for (int64_t c = 0; c < nch; ++c) {
    E[c] = mc[c] > -kInfF ? E[c] * std::exp((static_cast<double>(mc[c]) - static_cast<double>(M)) / temp) : 0.0;
    Z += E[c];
  }
  *M_out = M;
  return finish_stats<float>(M, skip >= 0 ? x[skip] : -kInfF, nan, Z);
}

inline RowStats row_stats(const double* x, int64_t V, int64_t skip, double temp, double* M_out, double* E,
                          std::vector<double>&) {
  int nan = 0;
  double M;
  if (skip >= 0) {
    M = std::max(vmax_f64(x, skip, &nan), vmax_f64(x + skip + 1, V - skip - 1, &nan));
  } else {
    M = vmax_f64(x, V, &nan);
  }
  double Z = 0.0;
  if (M > -kInf && M < kInf && !nan) {
    AffineRow<double> row{x, V, M, temp, -kInf, skip, -1, 1.0, 0.0, 0.0};
    Z = row.chunk_e(E);
  }
  *M_out = M;
  return finish_stats<double>(M, skip >= 0 ? x[skip] : -kInf, nan, Z);
}

template <typename T, typename C>
const C* load_row(const T* src, int64_t V, std::vector<C>& buf) {
  if constexpr (std::is_same<T, C>::value) {
    return src;
  } else {
    buf.resize(V);
    for (int64_t j = 0; j < V; ++j) buf[j] = static_cast<C>(static_cast<float>(src[j]));
    return buf.data();
  }
}

template <typename C>
int check_row(const C* x, int64_t V) {
  int nan = 0;
  const C m = vmax(x, V, &nan);
  if (nan) return kNaN;
  if (m == static_cast<C>(kInf)) return kPosInf;
  if (m == static_cast<C>(-kInf)) return kAllNegInf;
  return kOk;
}


template <typename F>
void dispatch_logits(const at::Tensor& logits, bool exact, F&& f) {
  const auto st = logits.scalar_type();
  if (st == at::kDouble) {
    f(logits.data_ptr<double>(), double{});
  } else if (st == at::kFloat) {
    if (exact) {
      f(logits.data_ptr<float>(), double{});
    } else {
      f(logits.data_ptr<float>(), float{});
    }
  } else if (st == at::kHalf) {
    if (exact) {
      f(logits.data_ptr<at::Half>(), double{});
    } else {
      f(logits.data_ptr<at::Half>(), float{});
    }
  } else if (st == at::kBFloat16) {
    if (exact) {
      f(logits.data_ptr<at::BFloat16>(), double{});
    } else {
      f(logits.data_ptr<at::BFloat16>(), float{});
    }
  } else {
    TORCH_CHECK(false, "logits: unsupported dtype ", st);
  }
}

}  // namespace
}  // namespace fastdiff
