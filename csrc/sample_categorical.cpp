// sample_categorical on the CPU: temperature, top-k and top-p with the reference's tie-inclusive sets
// (fastdiff.ops.filter_weights), then the inverse-CDF draw with the row's Philox uniform. Rows in parallel
// (parallel.h); the row machinery is shared with posterior.cpp in rows.h. top-k ranks x/temp - max/temp in
// float64 with a size-k heap. top-p on float32 rows (wider than kExactV) is a threshold search over the
// row's stored float32 weights, a few vectorised passes (top_p_search_f32); on float64 rows it finds the
// crossing bucket of a 1024-bucket histogram of the weights' float32 bit patterns, splits a large one by
// the next 12 bits, and sorts only the crossing part.
#include "parallel.h"
#include "rows.h"

#include <atomic>
#include <cstring>
#include <functional>
#include <queue>
#include <utility>

namespace fastdiff {
namespace {

constexpr int kBuckets = 1024;  // top-p histogram: float32 bit patterns >> 20 of weights <= 1

// Top-k threshold as a logit: the reference ranks z_j = x_j / temp in float64, before the max is subtracted
// (values that round to the same z tie; ranking z - max z instead would also tie logits that only the
// subtraction's rounding merges, e.g. 1e-73 and 0 beside a max of 0.25), and keeps z_j >= the k-th largest
// z (ties kept). z is monotone in x, so the kept set is {x_j >= the smallest logit whose z reaches it}.
template <typename C>
C top_k_threshold(const C* x, int64_t V, int64_t k, double temp) {
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
  // z is monotone in x, so the k-th largest z is z(kx); smaller logits whose z rounds to it tie. They
  // lie within 2^-40 (relative) of kx: only those are evaluated.
  const C kx = heap.top();
  if (!(kx > static_cast<C>(-kInf))) return kx;
  const double kz = static_cast<double>(kx) / temp;
  const double lo = static_cast<double>(kx) - std::ldexp(std::fabs(static_cast<double>(kx)), -40) - 1e-300;
  C thr = kx;
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] < kx && static_cast<double>(x[i]) >= lo && static_cast<double>(x[i]) / temp >= kz) {
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

// A crossing bucket with many members (a flat row: the nucleus spans a few buckets of thousands) is
// split again by the next 12 bits of the float32 pattern, scanning only its members: the sub-buckets
// above the crossing one are kept whole (their mass added to G, their smallest logit to kept), those
// below dropped, and only the crossing sub-bucket is left in pairs to be sorted.
constexpr size_t kSubMin = 64;
constexpr int kSubBuckets = 4096;

inline int weight_sub_bucket(double e) {
  const float f = static_cast<float>(e);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<int>((bits >> 8) & (kSubBuckets - 1));
}

template <typename C>
void narrow_to_sub_bucket(std::vector<std::pair<double, C>>& pairs, double P, double& G, C& kept,
                          std::vector<double>& sub) {
  sub.assign(kSubBuckets, 0.0);
  for (const auto& pr : pairs) sub[weight_sub_bucket(pr.first)] += pr.first;
  int sstar = -1;
  double g = G;
  for (int b = kSubBuckets - 1; b >= 0; --b) {  // most probable first
    if (sub[b] == 0.0) continue;
    if (g + sub[b] > P) {
      sstar = b;
      break;
    }
    g += sub[b];
  }
  if (sstar < 0) return;  // rounding: the bucket's total crossed, its parts do not; sort it whole
  size_t n = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const int b = weight_sub_bucket(pairs[i].first);
    if (b > sstar) {
      kept = std::min(kept, pairs[i].second);
    } else if (b == sstar) {
      pairs[n++] = pairs[i];
    }
  }
  pairs.resize(n);
  G = g;
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
  C kept = last_min;
  if (pairs.size() > kSubMin) narrow_to_sub_bucket(pairs, P, G, kept, mass);
  std::sort(pairs.begin(), pairs.end(), [](const auto& p, const auto& q) { return p.first > q.first; });
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

// ---- top-p on float32 rows: a threshold search over the stored weights ------------------------------
// The float32 weights e_j = exp((x_j - M) / temp) (0 below the top-k threshold) are written once to a
// row-sized scratch that stays in L2. The kept set is {e >= tau}: tau is the smallest weight whose "mass
// strictly above" A(tau) = sum_{e > tau} e is below P = top_p * S, S = sum e (the reference's
// tie-inclusive nucleus, on these weights). A bracket lo < tau <= hi (A(lo) >= P: nothing <= lo is kept;
// A(hi) < P: everything >= hi is kept) is narrowed by vectorised passes over the stored weights, each
// evaluating A(t) and #{e > t} at one trial t (the first pass also S):
//   * the first t from a normal fit of the weighted logits (their mean and spread under the weights, from
//     a sample taken after the exp pass): a smooth row's nucleus edge lies near mean - Phi^-1(top_p) * spread;
//   * then Newton-like steps on h = Phi^-1(A / S) against log t (the fit's slope, then the slope through
//     the last two trials), each aimed about kBand / 4 categories past the predicted edge, away from the
//     last trial, so that the edge is soon bracketed closely from both sides (two or three passes on
//     smooth rows);
//   * after three steps in a row that halve neither the count inside nor the bracket's float32 bit
//     patterns, a bisection; the bisections alone empty the bracket in 32 steps, so the search ends on
//     any row, ties included.
// Once at most kBand weights can lie in (lo, hi], one pass sums the weights > hi per CDF chunk and
// collects those in (lo, hi] (a bit mask per 32); they are sorted and walked, tie groups whole, as the
// reference's sorted walk does, and added to their chunks' sums if kept. The walk orders and groups them
// by their float64 weights (the reference's ties), not by the float32 ones: distinct logits within a
// float32 rounding of each other share a float32 weight, and keeping such a group whole kept categories
// the reference drops (a row of near-equal logits at the edge drew outside the float64 nucleus). The
// band members not kept are zeroed in the scratch, so the kept set is exactly {stored e >= tau}. The draw
// then reads these chunk sums and the stored weights (no second exp pass).
//
// Exactness: the passes sum in float32 lanes within blocks of kBlock, four accumulators of eight lanes (the
// lanes' arithmetic is fixed by the vector types, whatever width a clone lowers them to): at most 10
// roundings deep, so within kSumErr of the block's sum, and combine the blocks in float64. A comparison
// with P that these bounds (of the mass and of S) cannot decide is made again from one float64 pass
// (topp_mass_f64), so every decision is the one float64 sums of these weights give. (Summing in float64
// lanes throughout cost more than these rare extra passes: about 15% of rows of the benchmark's normal
// logits, as of this writing.)
//
// Memory: the row's max pass is the only read from memory; the exp pass prefetches the next row into L2,
// so that the next row's max pass reads L2 (the plain draw's fused pass overlaps the two instead).
constexpr int64_t kBand = 48;
constexpr int64_t kBlock = 256;   // a multiple of 32; CH is one too
constexpr double kSumErr = 8e-7;  // > 10 roundings of 2^-24: 8 in each accumulator lane, 2 joining the four

// GCC vector extensions: eight float32 lanes (one AVX2 register, half an AVX-512 one, two SSE ones: each
// target clone lowers them to its own width); block sums are widened to float64 as vectors, so no pass
// reduces horizontally inside the row.
// (-Wpsabi: the helpers taking and returning them are always inlined, so no call crosses an ABI.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

FASTDIFF_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FASTDIFF_INLINE double hsum(v8d v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

FASTDIFF_INLINE int64_t hsum(v8i v) {
  int64_t s = 0;
  for (int k = 0; k < 8; ++k) s += v[k];
  return s;
}

FASTDIFF_INLINE int any_set(v8i v) {  // a horizontal OR in three shuffles (of bit masks: their union)
  v |= __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v |= __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v |= __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

// Writes e_j; *mom: the moments below (z_j = (x_j - M) / temp) from every eighth group of 16, for a first
// guess only (the exact sum of the weights comes from the first search pass). Prefetches next[0,
// next_bytes) into L2 meanwhile. The exp loop has no reduction (as eprobs_f32: the widest vectors, no lane
// spills); the moments are a second loop, by chunks of CH from L1. (A float64 reduction in the `omp simd` exp loop
// itself made GCC spill its simd-lane copies to a stack array it assumed 64-byte aligned, which a target
// clone's frame is not: the AVX-512 clone faulted; one 16-lane vector-extension loop was 5x slower.)
struct Moments {
  double w0, w1, w2;  // sum e, sum e z, sum e z^2: the logits' spread under the weights
  double n0, n1, n2;  // count, sum z, sum z^2 of the categories with e > 0: their spread by count
};

FASTDIFF_CLONES void topp_weights_f32(const float* x, int64_t n, float M, float inv_t, float thr, float* out,
                                      Moments* mom, const char* next, int64_t next_bytes) {
  const v8f Mv = v8f{} + M, iv = v8f{} + inv_t, zero = {}, one = zero + 1.0f;
  v8f s0 = {}, s1 = {}, s2 = {}, c0 = {}, c1 = {}, c2 = {};
  const int64_t bpe = next != nullptr && n > 0 ? (next_bytes + n - 1) / n : 0;  // bytes per element
  int64_t lo = 0;
  for (; lo < n; lo += CH) {
    const int64_t hi = std::min(n, lo + CH);
    if (bpe > 0) {
      for (int64_t b = lo * bpe; b < std::min(next_bytes, hi * bpe); b += 64) __builtin_prefetch(next + b, 0, 2);
    }
    if (thr == -kInfF) {  // no top-k: every weight (no select)
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) out[i] = exp_f32_nonpos((x[i] - M) * inv_t);
    } else {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        const float e = exp_f32_nonpos((x[i] - M) * inv_t);
        out[i] = x[i] >= thr ? e : 0.0f;
      }
    }
    if (hi - lo < CH) break;
    for (int64_t i = lo; i < hi; i += 128) {
      const v8f e0 = load8(out + i), e1 = load8(out + i + 8);
      const v8f z0 = (load8(x + i) - Mv) * iv, z1 = (load8(x + i + 8) - Mv) * iv;
      const v8i p0 = e0 > zero, p1 = e1 > zero;
      const v8f ez0 = p0 ? e0 * z0 : zero, ez1 = p1 ? e1 * z1 : zero;
      s0 += e0 + e1;
      s1 += ez0 + ez1;
      s2 += ez0 * z0 + ez1 * z1;
      const v8f y0 = p0 ? z0 : zero, y1 = p1 ? z1 : zero;
      c0 += (p0 ? one : zero) + (p1 ? one : zero);
      c1 += y0 + y1;
      c2 += y0 * y0 + y1 * y1;
    }
  }
  auto wide = [](v8f v) { return 8.0 * hsum(__builtin_convertvector(v, v8d)); };  // an eighth was sampled
  Moments m{wide(s0), wide(s1), wide(s2), wide(c0), wide(c1), wide(c2)};
  for (int64_t i = lo; i < n; ++i) {  // the partial last chunk, whole
    const double z = static_cast<double>((x[i] - M) * inv_t), e = static_cast<double>(out[i]);
    m.w0 += e;
    if (e > 0.0) {
      m.w1 += e * z;
      m.w2 += e * z * z;
      m.n0 += 1.0;
      m.n1 += z;
      m.n2 += z * z;
    }
  }
  *mom = m;
}

// A(t) = sum of e > t (float32 within blocks of kBlock, float64 across) and #{e > t}.
struct MassAt {
  double above;
  int64_t gt;
};

// (kTotal: also the sum of every weight, *total, in the same blocks.)
template <bool kTotal>
FASTDIFF_INLINE MassAt topp_mass_body(const float* e, int64_t n, float t, double* total) {
  const v8f tv = v8f{} + t, zero = {};
  v8d acc = {}, all = {};
  v8i c0 = {}, c1 = {};
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    v8f b0 = {}, b1 = {}, b2 = {}, b3 = {}, d0 = {}, d1 = {};
    for (int64_t j = i; j < i + kBlock; j += 32) {
      const v8f x0 = load8(e + j), x1 = load8(e + j + 8), x2 = load8(e + j + 16), x3 = load8(e + j + 24);
      const v8i k0 = x0 > tv, k1 = x1 > tv, k2 = x2 > tv, k3 = x3 > tv;
      b0 += k0 ? x0 : zero;
      b1 += k1 ? x1 : zero;
      b2 += k2 ? x2 : zero;
      b3 += k3 ? x3 : zero;
      c0 -= k0 + k1;  // a true comparison is -1
      c1 -= k2 + k3;
      if (kTotal) {
        d0 += x0 + x1;
        d1 += x2 + x3;
      }
    }
    acc += __builtin_convertvector((b0 + b1) + (b2 + b3), v8d);
    if (kTotal) all += __builtin_convertvector(d0 + d1, v8d);
  }
  MassAt m{hsum(acc), hsum(c0 + c1)};
  double s = hsum(all);
  for (; i < n; ++i) {
    m.above += e[i] > t ? static_cast<double>(e[i]) : 0.0;
    m.gt += e[i] > t ? 1 : 0;
    s += static_cast<double>(e[i]);
  }
  if (kTotal) *total = s;
  return m;
}

FASTDIFF_CLONES MassAt topp_mass_f32(const float* e, int64_t n, float t) {
  return topp_mass_body<false>(e, n, t, nullptr);
}

FASTDIFF_CLONES MassAt topp_mass_total_f32(const float* e, int64_t n, float t, double* total) {
  return topp_mass_body<true>(e, n, t, total);
}

// sum of e > t (or >= t) in float64 throughout, and *total, the sum of every e (the comparisons the
// float32 blocks cannot decide).
FASTDIFF_CLONES double topp_mass_f64(const float* e, int64_t n, float t, bool inclusive, double* total) {
  const v8f tv = v8f{} + t, zero = {};
  v8d a0 = {}, a1 = {}, s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v8f x0 = load8(e + i), x1 = load8(e + i + 8);
    const v8f k0 = inclusive ? (x0 >= tv ? x0 : zero) : (x0 > tv ? x0 : zero);
    const v8f k1 = inclusive ? (x1 >= tv ? x1 : zero) : (x1 > tv ? x1 : zero);
    a0 += __builtin_convertvector(k0, v8d);
    a1 += __builtin_convertvector(k1, v8d);
    s0 += __builtin_convertvector(x0, v8d);
    s1 += __builtin_convertvector(x1, v8d);
  }
  double s = hsum(a0 + a1), all = hsum(s0 + s1);
  for (; i < n; ++i) {
    s += (inclusive ? e[i] >= t : e[i] > t) ? static_cast<double>(e[i]) : 0.0;
    all += static_cast<double>(e[i]);
  }
  *total = all;
  return s;
}

// Per CDF chunk c: E[c] = sum of e > hi in it (float32 lanes per half chunk of kBlock); returns their
// float64 total. band: the indices of lo < e <= hi (at most cap; band has room for cap + 32), from a
// bit mask per group of 32. (hi's own weights are in the band: see the walk in top_p_search_f32.)
static_assert(CH == 2 * kBlock, "a CDF chunk is two blocks");
FASTDIFF_CLONES double topp_collect_f32(const float* e, int64_t n, float lo, float hi, double* E, int64_t* band,
                                        int64_t cap, int64_t* nband) {
  const v8f lov = v8f{} + lo, hiv = v8f{} + hi, zero = {};
  double G = 0.0;
  int64_t nb = 0;
  auto scan = [&](int64_t a, int64_t b) {  // the row's tail
    for (int64_t j = a; j < b; ++j) {
      band[nb] = j;
      nb += (e[j] > lo) & (e[j] <= hi);
    }
    nb = std::min(nb, cap);
  };
  const v8i bit = {1, 2, 4, 8, 16, 32, 64, 128};
  int64_t c = 0, i = 0;
  for (; i + CH <= n; i += CH, ++c) {
    v8d ec = {};
    for (int64_t h = i; h < i + CH; h += kBlock) {
      v8f b0 = {}, b1 = {}, b2 = {}, b3 = {};
      for (int64_t j = h; j < h + kBlock; j += 32) {
        const v8f x0 = load8(e + j), x1 = load8(e + j + 8), x2 = load8(e + j + 16), x3 = load8(e + j + 24);
        const v8i k0 = x0 > hiv, k1 = x1 > hiv, k2 = x2 > hiv, k3 = x3 > hiv;
        b0 += k0 ? x0 : zero;
        b1 += k1 ? x1 : zero;
        b2 += k2 ? x2 : zero;
        b3 += k3 ? x3 : zero;
        // lane l of vector v inside: bit 8 v + l of the group's mask
        const v8i in = ((x0 > lov) & ~k0 & bit) | (((x1 > lov) & ~k1 & bit) << 8) |
                       (((x2 > lov) & ~k2 & bit) << 16) | (((x3 > lov) & ~k3 & bit) << 24);
        uint32_t mask = static_cast<uint32_t>(any_set(in));
        while (__builtin_expect(mask != 0, 0) && nb < cap) {
          band[nb++] = j + __builtin_ctz(mask);
          mask &= mask - 1;
        }
      }
      ec += __builtin_convertvector((b0 + b1) + (b2 + b3), v8d);
    }
    E[c] = hsum(ec);
    G += E[c];
  }
  if (i < n) {
    double s = 0.0;
    for (int64_t j = i; j < n; ++j) s += e[j] > hi ? static_cast<double>(e[j]) : 0.0;
    scan(i, n);
    E[c] = s;
    G += s;
  }
  *nband = nb;
  return G;
}

// The inverse-CDF draw over the kept weights (stored e >= tau), as AffineRow::draw does it: the chunk
// sums E locate the chunk where the cumulative weight crosses u * W, sums of 32 stored weights the
// sub-chunk, and only that one is walked with float64 weights (ew, as the reference computes them). A
// (sub-)chunk is entered whenever its float32 sum could reach the target within its error.
int64_t topp_draw(const float* x, const float* e, int64_t V, float M, double temp, float tau, const double* E,
                  double u) {
  constexpr int64_t SUB = 32;
  const int64_t nch = (V + CH - 1) / CH;
  double W = 0.0;
  for (int64_t c = 0; c < nch; ++c) W += E[c];
  const double target = u * W, zM = static_cast<double>(M) / temp;
  double cum = 0.0;
  auto near = [&](double w) { return cum + w * (1.0 + 1e-5) + 1e-6 * W >= target; };
  for (int64_t lo = 0, c = 0; lo < V; lo += CH, ++c) {
    const int64_t hi = std::min(V, lo + CH);
    if (!near(E[c])) {
      cum += E[c];
      continue;
    }
    for (int64_t slo = lo; slo < hi; slo += SUB) {
      const int64_t shi = std::min(hi, slo + SUB);
      double ws = 0.0;
      for (int64_t j = slo; j < shi; ++j) ws += e[j] >= tau ? static_cast<double>(e[j]) : 0.0;
      if (!near(ws)) {
        cum += ws;
        continue;
      }
      for (int64_t j = slo; j < shi; ++j) {
        if (!(e[j] >= tau)) continue;
        cum += ew(static_cast<double>(x[j]), temp, zM);
        if (cum > target) return j;
      }
    }
  }
  for (int64_t j = V - 1; j >= 0; --j) {
    if (e[j] >= tau && e[j] > 0.0f) return j;
  }
  return V - 1;
}

// The standard normal quantile Phi^-1(p), by P. J. Acklam's rational approximations (relative error about
// 1e-9; only the search's trials are aimed with it).
inline double normal_quantile(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01,  -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  p = std::min(std::max(p, 1e-300), 1.0 - 1e-16);
  auto tail = [&](double q) {
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
           ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  };
  if (p < 0.02425) return tail(std::sqrt(-2.0 * std::log(p)));
  if (p > 1.0 - 0.02425) return -tail(std::sqrt(-2.0 * std::log1p(-p)));
  const double q = p - 0.5, r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
         (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
}

inline float float_mid(float a, float b) {  // the middle float32 bit pattern of 0 <= a < b
  uint32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  const uint32_t im = ia + (ib - ia) / 2;
  float m;
  std::memcpy(&m, &im, 4);
  return m;
}

inline uint32_t float_bits(float a) {
  uint32_t i;
  std::memcpy(&i, &a, 4);
  return i;
}

// Scratch of one thread's rows.
struct TopPWork {
  std::vector<float> e;
  std::vector<int64_t> band;
  struct Member {
    double w;  // the reference's float64 weight of a member sharing its float32 weight (else 0): order, ties
    float e;   // the stored float32 weight: the masses, as every other sum here
    int64_t j;
  };
  std::vector<Member> vals;
};

// The smallest kept weight tau of the top-p set of a float32 row (kept: the stored e >= tau); fills E with
// the kept weights' chunk sums. next / next_bytes: the next row's storage, prefetched meanwhile.
float top_p_search_f32(const float* x, int64_t V, float M, double temp, float thr, double top_p, TopPWork& w,
                       double* E, const char* next, int64_t next_bytes) {
  w.e.resize(V);
  float* e = w.e.data();
  Moments mo;
  topp_weights_f32(x, V, M, static_cast<float>(1.0 / temp), thr, e, &mo, next, next_bytes);
  // S, the weights' sum, comes from the first search pass in float32 blocks (within kSumErr * S), so P is
  // known to within errP. A comparison with P that these bounds cannot decide is made again in float64:
  // S and the mass in one pass (exact).
  double S = 0.0, P = 0.0, errP = 0.0, Pexact = -1.0;
  auto exact = [&](float t, bool inclusive) {  // the mass above t in float64; sets Pexact
    double total;
    const double A = topp_mass_f64(e, V, t, inclusive, &total);
    Pexact = top_p * total;
    return A;
  };
  auto below = [&](double As, float t) {  // A(t) < P
    const double err = kSumErr * As + errP + 1e-300;
    if (As + err < P) return true;
    if (As - err >= P) return false;
    const double A = exact(t, false);
    return A < Pexact;
  };
  // The bracket, also as log t; gt_lo - gt_hi = #{lo < e <= hi} bounds the count strictly inside (V and 0
  // before they first move: bounds).
  float lo = 0.0f, hi = 1.0f;  // A(0) = S >= P; A(1) = 0 < P (every weight is <= 1)
  int64_t gt_lo = V, gt_hi = 0;
  // h = Phi^-1(A / S): linear in log t, of slope -1 / spread, where the weighted logits are normal.
  auto h = [&](double A) { return normal_quantile(A / S); };
  const double target = normal_quantile(top_p);  // h(P)
  double ulo = -88.0, uhi = 0.0;  // below e^-87.3 every weight is 0
  const double mu = mo.w1 / mo.w0, sd = std::sqrt(std::max(mo.w2 / mo.w0 - mu * mu, 1e-12));
  // Categories per unit of log t near u, by a normal fit of the logits by count (the aim past the edge
  // before two trials have measured it).
  const double n0 = std::max(mo.n0, 1.0), cm = mo.n1 / n0, cs = std::sqrt(std::max(mo.n2 / n0 - cm * cm, 1e-12));
  auto model_density = [&](double uu) {
    const double q = (uu - cm) / cs;
    return mo.n0 * std::exp(-0.5 * q * q) / (cs * 2.5066282746310002);
  };
  double u = mu - sd * target;
  double ucur = u, hcur = 0.0, uprev = 0.0, hprev = 0.0;         // the last two trials
  int64_t gtcur = 0, gtprev = 0;
  bool last_hi = false, bisect = false;
  int slow = 0;  // consecutive steps that halved neither the count bound nor the bracket's bit patterns
  for (int it = 0; it < 128 && gt_lo - gt_hi > kBand; ++it) {
    const uint32_t width = float_bits(hi) - float_bits(lo);
    const int64_t count = gt_lo - gt_hi;
    if (it > 0) {
      u = 0.5 * (ulo + uhi);
      if (!bisect) {
        const double slope = it > 1 && ucur != uprev ? (hcur - hprev) / (ucur - uprev) : -1.0 / sd;
        if (slope < 0.0) {
          double us = ucur + (target - hcur) / slope;
          const double density = it > 1 && gtcur != gtprev
                                     ? std::fabs(static_cast<double>(gtcur - gtprev) / (ucur - uprev))
                                     : model_density(us);
          if (density > 0.0) us += (last_hi ? -1.0 : 1.0) * (kBand / 4.0) / density;
          if (us > ulo && us < uhi) u = us;
        }
      }
    }
    float t = static_cast<float>(std::exp(u));
    if (!(t > lo && t < hi)) t = float_mid(lo, hi);
    if (!(t > lo && t < hi)) break;  // adjacent floats: nothing lies strictly between
    MassAt m;
    if (it == 0) {
      m = topp_mass_total_f32(e, V, t, &S);
      P = top_p * S;
      errP = top_p * kSumErr * S;
    } else {
      m = topp_mass_f32(e, V, t);
    }
    uprev = ucur;
    hprev = hcur;
    gtprev = gtcur;
    ucur = std::log(static_cast<double>(t));
    hcur = h(m.above);
    gtcur = m.gt;
    last_hi = below(m.above, t);
    if (last_hi) {
      hi = t;
      uhi = ucur;
      gt_hi = m.gt;
    } else {
      lo = t;
      ulo = ucur;
      gt_lo = m.gt;
    }
    const bool halved = (float_bits(hi) - float_bits(lo)) * 2 <= width || (gt_lo - gt_hi) * 2 <= count;
    slow = halved ? 0 : slow + 1;
    bisect = !bisect && slow >= 3;
  }
  const int64_t cap = std::max<int64_t>(gt_lo - gt_hi, 0);
  w.band.resize(static_cast<size_t>(cap + 32));
  int64_t nb;
  double G = topp_collect_f32(e, V, lo, hi, E, w.band.data(), cap, &nb);
  w.vals.resize(nb);
  for (int64_t i = 0; i < nb; ++i) w.vals[i] = {0.0, e[w.band[i]], w.band[i]};
  using Member = TopPWork::Member;
  std::sort(w.vals.begin(), w.vals.end(), [](const Member& a, const Member& b) { return a.e > b.e; });
  // Only members that share a float32 weight need the float64 one (the reference's, ew): they are ordered
  // by it within their float32 group. (A lone member keeps w = 0: groups never span two float32 values.)
  const double zM = static_cast<double>(M) / temp;
  for (size_t i = 0; i < w.vals.size();) {
    size_t k = i + 1;
    while (k < w.vals.size() && w.vals[k].e == w.vals[i].e) ++k;
    if (k - i > 1) {
      for (size_t q = i; q < k; ++q) w.vals[q].w = ew(static_cast<double>(x[w.vals[q].j]), temp, zM);
      std::sort(w.vals.begin() + i, w.vals.begin() + k, [](const Member& a, const Member& b) { return a.w > b.w; });
    }
    i = k;
  }
  auto same = [](const Member& a, const Member& b) { return a.e == b.e && a.w == b.w; };
  // The walk, most probable first, tie groups (equal float64 weights) whole: a group is kept iff the mass
  // above it is < P. Its comparisons are made on the float32-lane G (the mass > hi); if one falls within
  // G's error bound, G is summed again in float64 and the walk repeated.
  size_t kept_n = 0;
  if (S == 0.0) {  // the search made no pass (at most kBand weights in the row): S in float64 now
    exact(0.0f, true);
    P = Pexact;
  }
  for (int pass = 0; pass < 2; ++pass) {
    const double err = pass == 0 ? kSumErr * G + errP + 1e-300 : 0.0;
    const double Pw = pass == 0 ? P : Pexact;
    double g = G;
    bool unsure = false;
    kept_n = 0;
    for (size_t i = 0; i < w.vals.size();) {
      if (g + err >= Pw && g - err < Pw) unsure = true;
      if (!(g < Pw)) break;
      size_t k = i;
      while (k < w.vals.size() && same(w.vals[k], w.vals[i])) g += static_cast<double>(w.vals[k++].e);
      kept_n = k;
      i = k;
    }
    if (!unsure) break;
    G = exact(hi, false);
  }
  // Kept: every e > hi and the walk's first kept_n members; the others are zeroed, so {e >= tau} is the set.
  float tau = std::nextafter(hi, 2.0f);
  for (size_t i = 0; i < kept_n; ++i) {
    E[w.vals[i].j / CH] += static_cast<double>(w.vals[i].e);
    tau = std::min(tau, w.vals[i].e);
  }
  for (size_t i = kept_n; i < w.vals.size(); ++i) e[w.vals[i].j] = 0.0f;
  return tau;
}

template <typename T, typename C>
void sample_rows(const T* logits, int64_t N, int64_t V, int64_t row_stride, uint64_t seed, uint64_t offset,
                 uint64_t row0, double temp, int64_t top_k, double top_p, int64_t* tokens, int* status) {
  std::atomic<int> worst{kOk};
  parallel_rows(N, V, [&](int64_t r0, int64_t r1) {  // a pass or two over V logits per row (parallel.h)
    std::vector<C> buf, xmin, cmax, ebuf;
    std::vector<double> chunks, mass;
    std::vector<std::pair<double, C>> pairs;
    TopPWork topp;
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
      if (top_k > 0 && top_k < V) thr = top_k_threshold(x, V, top_k, temp);
      if (top_p < 1.0) {
        if constexpr (std::is_same<C, float>::value) {
          const bool more = r + 1 < r1;  // prefetch this thread's next row while this one is searched
          const float tau = top_p_search_f32(
              x, V, M, temp, thr, top_p, topp, chunks.data(),
              more ? reinterpret_cast<const char*>(logits + (r + 1) * row_stride) : nullptr,
              more ? V * static_cast<int64_t>(sizeof(T)) : 0);
          tokens[r] = topp_draw(x, topp.e.data(), V, M, temp, tau, chunks.data(),
                                row_uniform(seed, offset, row0 + static_cast<uint64_t>(r)));
          continue;
        } else {
          thr = top_p_threshold(x, V, M, temp, thr, top_p, mass, xmin, pairs, ebuf);
        }
      }
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


}  // namespace

at::Tensor sample_categorical(const at::Tensor& logits, int64_t seed, int64_t offset, double temperature,
                              int64_t top_k, double top_p, int64_t row_offset) {
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
    sample_rows<T, C>(ptr, N, V, logits.stride(0), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                      static_cast<uint64_t>(row_offset), temperature, top_k, top_p, tokens.data_ptr<int64_t>(), &status);
  });
  // The same ValueError as ops._common.check_finite_above, so the public op skips its own read pass.
  if (status != kOk) TORCH_CHECK_VALUE(false, "logits: ", status_message(status));
  return tokens;
}

}  // namespace fastdiff
