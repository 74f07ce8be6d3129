// Logit-side CPU kernels: categorical_posterior / posterior_sample (the three row formulas of
// fastdiff/ops/_plan.py) and sample_categorical (temperature, top-k, top-p), plus the module binding.
//
// One row at a time (rows in parallel): a max pass, then a pass that sums the row's exp weights per
// chunk of CH categories (the row is cache-resident by then), then the inverse-CDF draw: the chunk
// sums locate the chunk where the cumulative weight crosses u * W, and only that chunk is walked
// element by element with float64 weights, as the reference computes them. No (N, V) buffer exists.
//
// Precision: float64 logits, and rows of at most kExactV categories, are computed in float64
// throughout (exp from libm). Wider float32/float16/bfloat16 rows sum their weights with a vectorised
// float32 exp (about 1 ulp) accumulated in float64; the crossing chunk is then walked in float64, so a
// draw can differ from the reference's only where u * W lies within about 1e-7 of a CDF boundary.
#include "cpu_common.h"
#include "parallel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <queue>
#include <utility>

namespace fastdiff {
namespace {

constexpr int64_t CH = 512;          // categories per CDF chunk
constexpr int64_t kExactV = 2048;    // rows this narrow are computed in float64 whatever their dtype
constexpr int kBuckets = 1024;       // top-p histogram: float32 bit patterns >> 20 of weights <= 1

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

FASTDIFF_CLONES double esum_all_f32(const float* x, int64_t n, float M, float inv_t) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_f32((x[i] - M) * inv_t);
  return static_cast<double>(s);
}

FASTDIFF_CLONES void eprobs_f32(const float* x, int64_t n, float M, float inv_t, float thr, float ca, float cb,
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

  // min{j : cumsum(w)_j > u * W}, chunk sums first, the crossing chunk in float64; else the last
  // positive-weight category.
  int64_t draw(const double* Wc, double W, double u) const {
    const double target = u * W;
    double cum = 0.0;
    for (int64_t lo = 0, c = 0; lo < V; lo += CH, ++c) {
      const int64_t hi = std::min(V, lo + CH);
      if (cum + Wc[c] * (1.0 + 1e-5) + 1e-6 * W >= target) {
        for (int64_t j = lo; j < hi; ++j) {
          cum += weight(j);
          if (cum > target) return j;
        }
      } else {
        cum += Wc[c];
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

// Inverse CDF over an explicit float64 weight vector (the generic rows: per-token absorbing, matrix).
int64_t draw_dense(const double* w, int64_t V, double u) {
  double Z = 0.0;
  for (int64_t j = 0; j < V; ++j) Z += w[j];
  const double target = u * Z;
  double cum = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    cum += w[j];
    if (cum > target) return j;
  }
  for (int64_t j = V - 1; j >= 0; --j) {
    if (w[j] > 0.0) return j;
  }
  return V - 1;  // no positive weight (an undefined posterior): the reference's fallback index
}

// Row loading: float32 rows are read in place when the fast path applies; everything else is converted
// into the thread's buffer (float for the fast path, double for the exact one).
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

// ---- posterior ----------------------------------------------------------------------------------------
enum Kind { kAbsorbing = 0, kAbsorbingPerToken = 1, kUniform = 2, kMatrix = 3 };

struct PostArgs {
  Kind kind;
  int64_t V, N, row_stride, mask;
  const int64_t *xt, *t, *s, *pair;
  const double *a_t, *a_s, *ab, *fact1, *qbar;
  double temp;
  bool sample, check;
  uint64_t seed, offset;
  uint64_t row0;  // global index of row 0: row r draws with Philox counter (row0 + r, offset)
};

template <typename C>
int check_row(const C* x, int64_t V) {
  int nan = 0;
  const C m = vmax(x, V, &nan);
  if (nan) return kNaN;
  if (m == static_cast<C>(kInf)) return kPosInf;
  if (m == static_cast<C>(-kInf)) return kAllNegInf;
  return kOk;
}

// One posterior row; returns the drawn token (sample) or writes probabilities to out (O*).
template <typename C, typename O>
int64_t posterior_row(const PostArgs& A, int64_t r, const C* x, O* out, std::vector<double>& dbuf,
                      std::vector<double>& chunks, std::vector<C>& cmax, int* status) {
  const int64_t V = A.V, xt = A.xt[r];
  auto keep = [&]() -> int64_t {
    if (!A.sample) {
      std::fill(out, out + V, static_cast<O>(0));
      out[xt] = static_cast<O>(1);
    }
    return xt;
  };
  const double temp = A.temp;
  if (A.kind == kAbsorbing || A.kind == kUniform) {
    const bool absorbing = A.kind == kAbsorbing;
    const int64_t skip = absorbing ? A.mask : -1;
    C M;
    chunks.resize((V + CH - 1) / CH);
    const RowStats st = row_stats(x, V, skip, temp, &M, chunks.data(), cmax);
    *status = st.status;
    if (st.status != kOk) return xt;
    if (M == static_cast<C>(-kInf)) {  // absorbing: only the (ignored) mask logit is finite
      *status = kOnlyMask;
      return xt;
    }
    AffineRow<C> row{x, V, M, temp, static_cast<C>(-kInf), skip, -1, 0.0, 0.0, 0.0};
    const double Z = st.Z;
    const double a_t = A.a_t[r], a_s = A.a_s[r];
    if (absorbing) {
      row.a = (a_s - a_t) / Z;
      row.spike = A.mask;
      row.spike_val = 1.0 - a_s;
    } else {
      const double rr = a_s > 0 ? a_t / a_s : 0.0, Vd = static_cast<double>(V);
      row.a = (1.0 - rr) / Vd * a_s / Z;
      row.b = (1.0 - rr) / Vd * (1.0 - a_s) / Vd;
      row.spike = xt;
      // spike_val is r * f2(x_t); weight(x_t) adds the affine part on top.
      row.spike_val = rr * (a_s * ew(static_cast<double>(x[xt]), temp, static_cast<double>(M) / temp) / Z +
                            (1.0 - a_s) / Vd);
    }
    const double W = row.chunk_w(chunks.data());
    if (!(W > 0.0)) return keep();  // no weight at all (x_t unreachable from x0): keep x_t, as every backend
    if (A.sample) return row.draw(chunks.data(), W, row_uniform(A.seed, A.offset, A.row0 + static_cast<uint64_t>(r)));
    row.write(out, W);
    return 0;
  }
  // Generic rows in float64: w (V) in dbuf.
  *status = check_row(x, V);
  if (*status != kOk) return xt;
  dbuf.resize(V);
  double* w = dbuf.data();
  int nan = 0;
  C M;
  if (A.kind == kAbsorbingPerToken) {
    const C m1 = vmax(x, A.mask, &nan), m2 = vmax(x + A.mask + 1, V - A.mask - 1, &nan);
    M = std::max(m1, m2);
    if (M == static_cast<C>(-kInf)) {  // only the (ignored) mask logit is finite
      *status = kOnlyMask;
      return xt;
    }
  } else {
    M = vmax(x, V, &nan);
  }
  const double zM = static_cast<double>(M) / temp;
  double Z = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const double e = (A.kind == kAbsorbingPerToken && j == A.mask) ? 0.0 : ew(static_cast<double>(x[j]), temp, zM);
    w[j] = e;
    Z += e;
  }
  if (A.kind == kAbsorbingPerToken) {
    const double* At = A.ab + A.t[r] * V;
    const double* As = A.ab + A.s[r] * V;
    double wm = 0.0;
    for (int64_t j = 0; j < V; ++j) {
      const double p = w[j] / Z;
      wm += p * (1.0 - As[j]);
      w[j] = (As[j] - At[j]) * p;
    }
    w[A.mask] = wm;
    double W = 0.0;
    for (int64_t j = 0; j < V; ++j) W += w[j];
    if (!(W > 0.0)) return keep();
    if (A.sample) return draw_dense(w, V, row_uniform(A.seed, A.offset, A.row0 + static_cast<uint64_t>(r)));
    for (int64_t j = 0; j < V; ++j) out[j] = static_cast<O>(w[j] / W);
    return 0;
  }
  // matrix: w_j = fact1[r, j] * sum_i p_i qbar[pair[r], i, j]
  std::vector<double> g(V, 0.0);
  const double* Q = A.qbar + A.pair[r] * V * V;
  for (int64_t i = 0; i < V; ++i) {
    const double p = w[i] / Z;
    if (p == 0.0) continue;
    const double* qi = Q + i * V;
    for (int64_t j = 0; j < V; ++j) g[j] += p * qi[j];
  }
  const double* f1 = A.fact1 + r * V;
  double W = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    w[j] = f1[j] * g[j];
    W += w[j];
  }
  if (!(W > 0.0)) return keep();  // x_t unreachable from the x0 distribution: keep x_t
  if (A.sample) return draw_dense(w, V, row_uniform(A.seed, A.offset, A.row0 + static_cast<uint64_t>(r)));
  for (int64_t j = 0; j < V; ++j) out[j] = static_cast<O>(w[j] / W);
  return 0;
}

template <typename T, typename C, typename O>
void posterior_rows(const PostArgs& A, const T* logits, O* probs, int64_t* tokens, int* status) {
  const int64_t V = A.V;
  std::atomic<int> worst{kOk};
  // Work per row (parallel.h): one pass over V logits; the matrix kind's sum over qbar is V x V.
  parallel_rows(A.N, A.kind == kMatrix ? V * V : V, [&](int64_t r0, int64_t r1) {
    std::vector<C> buf, cmax;
    std::vector<double> dbuf, chunks;
    int local = kOk;
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = logits + r * A.row_stride;
      const bool carried = (A.kind == kAbsorbing || A.kind == kAbsorbingPerToken) && A.xt[r] != A.mask;
      if (carried) {  // the row is only read for the value check
        if (A.check) {
          const C* x = load_row<T, C>(src, V, buf);
          local = std::max(local, check_row(x, V));
        }
        if (A.sample) {
          tokens[r] = A.xt[r];
        } else {
          O* out = probs + r * V;
          std::fill(out, out + V, static_cast<O>(0));
          out[A.xt[r]] = static_cast<O>(1);
        }
        continue;
      }
      const C* x = load_row<T, C>(src, V, buf);
      int st = kOk;
      const int64_t tok = posterior_row<C, O>(A, r, x, A.sample ? nullptr : probs + r * V, dbuf, chunks, cmax, &st);
      local = std::max(local, st);
      if (A.sample) tokens[r] = tok;
    }
    int cur = worst.load();
    while (local > cur && !worst.compare_exchange_weak(cur, local)) {
    }
  });
  *status = worst.load();
}

// ---- sample_categorical -------------------------------------------------------------------------------
// Top-k threshold as a logit: the reference ranks d_j = x_j / temp - max / temp in float64 (values that
// round to the same d tie) and keeps d_j >= the k-th largest d (ties kept). d is monotone in x, so the
// kept set is {x_j >= the smallest logit whose d reaches that value}.
template <typename C>
C top_k_threshold(const C* x, int64_t V, int64_t k, double temp, double zM) {
  // The k largest raw logits (min-heap); a block of 64 whose max cannot enter is skipped.
  std::priority_queue<C, std::vector<C>, std::greater<C>> heap;
  int64_t j = 0;
  for (; j < V && static_cast<int64_t>(heap.size()) < k; ++j) heap.push(x[j]);
  constexpr int64_t B = 64;
  int nan = 0;
  for (; j < V; j += B) {
    const int64_t n = std::min(B, V - j);
    if (!(vmax(x + j, n, &nan) > heap.top())) continue;
    for (int64_t i = j; i < j + n; ++i) {
      if (x[i] > heap.top()) {
        heap.pop();
        heap.push(x[i]);
      }
    }
  }
  // d is monotone in x, so the k-th largest d is d(kx); smaller logits whose d rounds to it tie. They
  // lie within 2^-40 (relative) of kx: only those are evaluated.
  const C kx = heap.top();
  if (!(kx > static_cast<C>(-kInf))) return kx;
  const double kd = static_cast<double>(kx) / temp - zM;
  const double lo = static_cast<double>(kx) -
                    std::ldexp(std::max(std::fabs(static_cast<double>(kx)), std::fabs(zM * temp)), -40) - 1e-300;
  C thr = kx;
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] < kx && static_cast<double>(x[i]) >= lo && static_cast<double>(x[i]) / temp - zM >= kd) {
      thr = std::min(thr, x[i]);
    }
  }
  return thr;
}

// Smallest logit kept by top-p among x >= thr: v is kept iff the mass of categories strictly more
// probable than v is below top_p (ties, as in the reference, are equal float64 weights). A histogram
// keyed by the weight's float32 bit pattern (monotone in the weight, 8 buckets per octave) finds the
// bucket where the mass crosses top_p * S; only that bucket is sorted.
inline int weight_bucket(double e) {
  const float f = static_cast<float>(e);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const int b = static_cast<int>(bits >> 20);
  return b < kBuckets ? b : kBuckets - 1;
}

template <typename C>
C top_p_threshold(const C* x, int64_t V, C M, double temp, C thr, double top_p, std::vector<double>& mass,
                  std::vector<C>& xmin, std::vector<std::pair<double, C>>& pairs, std::vector<C>& ebuf) {
  mass.assign(kBuckets, 0.0);
  xmin.assign(kBuckets, static_cast<C>(kInf));
  const double zM = static_cast<double>(M) / temp;
  ebuf.resize(V);
  C* ev = ebuf.data();
  if constexpr (std::is_same<C, float>::value) {
    eprobs_f32(x, V, M, static_cast<float>(1.0 / temp), thr, 1.0f, 0.0f, ev);
  } else {
    for (int64_t j = 0; j < V; ++j) ev[j] = x[j] >= thr ? ew(x[j], temp, zM) : 0.0;
  }
  double S = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const double e = static_cast<double>(ev[j]);
    if (e == 0.0) continue;
    const int b = weight_bucket(e);
    mass[b] += e;
    xmin[b] = std::min(xmin[b], x[j]);
    S += e;
  }
  const double P = top_p * S;
  double G = 0.0;
  C last_min = static_cast<C>(kInf);
  int bstar = -1;
  for (int b = kBuckets - 1; b >= 0; --b) {  // most probable first
    if (mass[b] == 0.0) continue;
    if (G + mass[b] > P) {
      bstar = b;
      break;
    }
    G += mass[b];
    last_min = std::min(last_min, xmin[b]);
  }
  if (bstar < 0) return thr;
  pairs.clear();
  for (int64_t j = 0; j < V; ++j) {
    const double e = static_cast<double>(ev[j]);
    if (e == 0.0 || weight_bucket(e) != bstar) continue;
    pairs.emplace_back(e, x[j]);
  }
  std::sort(pairs.begin(), pairs.end(), [](const auto& p, const auto& q) { return p.first > q.first; });
  C kept = last_min;
  for (size_t i = 0; i < pairs.size();) {
    if (!(G < P)) break;
    size_t k = i;
    double gm = 0.0;
    while (k < pairs.size() && pairs[k].first == pairs[i].first) {
      kept = std::min(kept, pairs[k].second);
      gm += pairs[k++].first;
    }
    G += gm;
    i = k;
  }
  return kept;
}

template <typename T, typename C>
void sample_rows(const T* logits, int64_t N, int64_t V, int64_t row_stride, uint64_t seed, uint64_t offset,
                 uint64_t row0, double temp, int64_t top_k, double top_p, int64_t* tokens, int* status) {
  std::atomic<int> worst{kOk};
  parallel_rows(N, V, [&](int64_t r0, int64_t r1) {  // a pass or two over V logits per row (parallel.h)
    std::vector<C> buf, xmin, cmax, ebuf;
    std::vector<double> chunks, mass;
    std::vector<std::pair<double, C>> pairs;
    int local = kOk;
    for (int64_t r = r0; r < r1; ++r) {
      const C* x = load_row<T, C>(logits + r * row_stride, V, buf);
      chunks.resize((V + CH - 1) / CH);
      const bool filtered = (top_k > 0 && top_k < V) || top_p < 1.0;
      C M;
      int st = kOk;
      if (temp == 0.0 || filtered) {
        int nan = 0;
        M = vmax(x, V, &nan);
        st = finish_stats(M, static_cast<C>(-kInf), nan, 0.0).status;
      } else {  // plain: max and chunk sums in one pass
        st = row_stats(x, V, -1, temp, &M, chunks.data(), cmax).status;
      }
      if (st != kOk) {  // the in-kernel value check: reported after the loop, nothing is returned
        local = std::max(local, st);
        tokens[r] = 0;
        continue;
      }
      if (temp == 0.0) {  // greedy: the first maximum
        int64_t j = 0;
        while (j + 1 < V && !(x[j] == M)) ++j;
        tokens[r] = j;
        continue;
      }
      C thr = static_cast<C>(-kInf);
      if (top_k > 0 && top_k < V) thr = top_k_threshold(x, V, top_k, temp, static_cast<double>(M) / temp);
      if (top_p < 1.0) thr = top_p_threshold(x, V, M, temp, thr, top_p, mass, xmin, pairs, ebuf);
      AffineRow<C> row{x, V, M, temp, thr, -1, -1, 1.0, 0.0, 0.0};
      if (filtered) row.chunk_e(chunks.data());
      const double W = row.chunk_w(chunks.data());
      tokens[r] = row.draw(chunks.data(), W, row_uniform(seed, offset, row0 + static_cast<uint64_t>(r)));
    }
    int cur = worst.load();
    while (local > cur && !worst.compare_exchange_weak(cur, local)) {
    }
  });
  *status = worst.load();
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

const double* opt_ptr(const c10::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() >= numel, "posterior: ", name);
  static const double kEmpty = 0.0;  // an empty table (no rows) is present but has no storage
  return t->numel() == 0 ? &kEmpty : t->data_ptr<double>();
}

}  // namespace

at::Tensor posterior(const std::string& kind, const at::Tensor& logits, const at::Tensor& x_t,
                     const at::Tensor& t, const at::Tensor& s, double temperature, int64_t mask_id,
                     const c10::optional<at::Tensor>& a_t, const c10::optional<at::Tensor>& a_s,
                     const c10::optional<at::Tensor>& ab_table, const c10::optional<at::Tensor>& fact1,
                     const c10::optional<at::Tensor>& qbar_s, const c10::optional<at::Tensor>& pair, bool sample,
                     uint64_t seed, uint64_t offset, bool check_values, uint64_t row_offset) {
  TORCH_CHECK(logits.dim() == 2, "posterior: logits must be (N, V)");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(N == 0 || V <= 1 || logits.stride(1) == 1, "posterior: logits must have a unit column stride");
  TORCH_CHECK(V >= 1 || N == 0, "posterior: empty vocabulary");
  for (const at::Tensor* v : {&x_t, &t, &s}) {
    TORCH_CHECK(v->scalar_type() == at::kLong && v->is_contiguous() && v->numel() == N, "posterior: index arrays");
  }
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "posterior: temperature");
  PostArgs A{};
  A.V = V;
  A.N = N;
  A.row_stride = logits.stride(0);
  A.mask = mask_id;
  A.xt = x_t.data_ptr<int64_t>();
  A.t = t.data_ptr<int64_t>();
  A.s = s.data_ptr<int64_t>();
  A.temp = temperature;
  A.sample = sample;
  A.check = check_values;
  A.seed = seed;
  A.offset = offset;
  A.row0 = row_offset;
  A.a_t = opt_ptr(a_t, N, "a_t");
  A.a_s = opt_ptr(a_s, N, "a_s");
  A.ab = opt_ptr(ab_table, V, "ab_table");
  A.fact1 = opt_ptr(fact1, N * V, "fact1");
  A.qbar = opt_ptr(qbar_s, 0, "qbar_s");
  A.pair = nullptr;
  if (kind == "absorbing") {
    TORCH_CHECK(mask_id >= 0 && mask_id < V, "posterior: mask_id");
    A.kind = A.ab != nullptr ? kAbsorbingPerToken : kAbsorbing;
    TORCH_CHECK(A.ab != nullptr || (A.a_t != nullptr && A.a_s != nullptr), "posterior: absorbing schedule");
    if (A.ab != nullptr) {
      const int64_t rows = ab_table->size(0);
      TORCH_CHECK(ab_table->dim() == 2 && ab_table->size(1) == V, "posterior: ab_table");
      if (N > 0) {
        TORCH_CHECK(t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < rows && s.min().item<int64_t>() >= 0 &&
                        s.max().item<int64_t>() < rows,
                    "posterior: steps outside ab_table");
      }
    }
  } else if (kind == "uniform") {
    A.kind = kUniform;
    TORCH_CHECK(A.a_t != nullptr && A.a_s != nullptr, "posterior: uniform schedule");
  } else if (kind == "matrix") {
    A.kind = kMatrix;
    TORCH_CHECK(A.fact1 != nullptr && A.qbar != nullptr && pair.has_value(), "posterior: matrix tables");
    TORCH_CHECK(pair->scalar_type() == at::kLong && pair->is_contiguous() && pair->numel() == N, "posterior: pair");
    TORCH_CHECK(qbar_s->dim() == 3 && qbar_s->size(1) == V && qbar_s->size(2) == V, "posterior: qbar_s");
    A.pair = pair->data_ptr<int64_t>();
    if (N > 0) {
      TORCH_CHECK(pair->min().item<int64_t>() >= 0 && pair->max().item<int64_t>() < qbar_s->size(0),
                  "posterior: pair index");
    }
  } else {
    TORCH_CHECK(false, "posterior: unknown kind ", kind);
  }
  if (N > 0) {
    TORCH_CHECK(x_t.min().item<int64_t>() >= 0 && x_t.max().item<int64_t>() < V, "posterior: x_t out of range");
  }
  const bool exact = logits.scalar_type() == at::kDouble || V <= kExactV;
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor tokens = at::empty({sample ? N : 0}, x_t.options());
  at::Tensor probs = at::empty({sample ? 0 : N, V}, logits.options().dtype(out_dtype));
  int status = kOk;
  dispatch_logits(logits, exact, [&](auto* ptr, auto ctag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(ptr)>>;
    using C = decltype(ctag);
    if (out_dtype == at::kDouble) {
      posterior_rows<T, C, double>(A, ptr, sample ? nullptr : probs.data_ptr<double>(),
                                   sample ? tokens.data_ptr<int64_t>() : nullptr, &status);
    } else {
      posterior_rows<T, C, float>(A, ptr, sample ? nullptr : probs.data_ptr<float>(),
                                  sample ? tokens.data_ptr<int64_t>() : nullptr, &status);
    }
  });
  // The in-kernel value check (check_values): the same ValueError as check_finite_above, raised
  // before any result is returned.
  if (status != kOk) TORCH_CHECK_VALUE(false, "x0_logits: ", status_message(status));
  return sample ? tokens : probs;
}

at::Tensor sample_categorical(const at::Tensor& logits, uint64_t seed, uint64_t offset, double temperature,
                              int64_t top_k, double top_p, uint64_t row_offset) {
  TORCH_CHECK(logits.dim() == 2, "sample_categorical: logits must be (N, V)");
  TORCH_CHECK(temperature >= 0 && std::isfinite(temperature) && top_p > 0 && top_p <= 1,
              "sample_categorical: temperature / top_p");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(N == 0 || V <= 1 || logits.stride(1) == 1, "sample_categorical: logits must have a unit column stride");
  TORCH_CHECK(V >= 1 || N == 0, "sample_categorical: empty vocabulary");
  at::Tensor tokens = at::empty({N}, logits.options().dtype(at::kLong));
  if (N == 0) return tokens;
  const bool exact = logits.scalar_type() == at::kDouble || V <= kExactV;
  int status = kOk;
  dispatch_logits(logits, exact, [&](auto* ptr, auto ctag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(ptr)>>;
    using C = decltype(ctag);
    sample_rows<T, C>(ptr, N, V, logits.stride(0), seed, offset, row_offset, temperature, top_k, top_p,
                      tokens.data_ptr<int64_t>(), &status);
  });
  // The same ValueError as ops._common.check_finite_above, so the public op skips its own read pass.
  if (status != kOk) TORCH_CHECK_VALUE(false, "logits: ", status_message(status));
  return tokens;
}

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff C++ CPU kernels (called through fastdiff._cpp, which holds the op signatures)";
  m.def("nearest_embedding", &fastdiff::nearest_embedding,
        "the screen of fastdiff.ops._nearest: (argmin, min, second smallest) of the scores per row", py::arg("x"),
        py::arg("weight"), py::arg("stat"), py::arg("metric"), py::arg("block_rows"), py::arg("block_cols"));
  m.def("rounding_loss_chunked", &fastdiff::rounding_loss_chunked,
        "per-row cross-entropy of x.W^T + b and (optionally) its gradients, in row chunks", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("target"), py::arg("ignore_index"), py::arg("row_scale"),
        py::arg("need_grad"), py::arg("chunk_rows"));
  m.def("posterior", &fastdiff::posterior, "posterior probabilities or draws of a PosteriorPlan", py::arg("kind"),
        py::arg("logits"), py::arg("x_t"), py::arg("t"), py::arg("s"), py::arg("temperature"), py::arg("mask_id"),
        py::arg("a_t"), py::arg("a_s"), py::arg("ab_table"), py::arg("fact1"), py::arg("qbar_s"), py::arg("pair"),
        py::arg("sample"), py::arg("seed"), py::arg("offset"), py::arg("check_values"), py::arg("row_offset") = 0);
  m.def("sample_categorical", &fastdiff::sample_categorical, "temperature / top-k / top-p draws", py::arg("logits"),
        py::arg("seed"), py::arg("offset"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("row_offset") = 0);
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
