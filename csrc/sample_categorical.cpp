// sample_categorical on the CPU: temperature, top-k and top-p with the reference's tie-inclusive sets
// (fastdiff.ops.filter_weights), then the inverse-CDF draw with the row's Philox uniform. Rows in parallel
// (parallel.h); the row machinery is shared with posterior.cpp in rows.h. top-k ranks x/temp - max/temp in
// float64 with a size-k heap; top-p finds the crossing bucket of a 1024-bucket histogram of the weights'
// float32 bit patterns, splits a large one by the next 12 bits, and sorts only the crossing part.
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
