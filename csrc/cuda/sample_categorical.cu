// sample_categorical on CUDA: temperature (0: a first-maximum argmax), then tie-inclusive top-k / top-p by a
// radix threshold search over order keys (no sort), then the inverse-CDF draw of the row's Philox uniform.
// One block per row, weights and CDF in float64. Launchers: see launchers.h.
//
// Passes over the row (each reads the logits; those of a search also take exp):
//   plain draw:        max, total, draw (the draw stops at the chunk holding the token);
//   top-k (+ top-p):   max, byte-wise count levels (radix_threshold<false>), [W, byte-wise mass levels
//                      (radix_threshold<true>)], total, draw;
//   top-p alone:       max (with the smallest logit), topp_search, draw. topp_search's first level also gives
//                      W (its bins hold every positive weight) and spreads its 255 bins over the key range of
//                      [max(wmin, (1 - top_p) / (2 V)), 1], where the crossing lies (the byte-wise search's
//                      first level is nearly useless: every weight in (2^-15, 1] has the top byte 0x3F); a
//                      crossing bin of at most kCap = 2048 weights is copied into shared memory in one pass
//                      and settled there (bitonic sort + block scan) instead of by more levels; the kept total
//                      comes from the search (no pass of its own).
// On the benchmark's rows (x = 2 N(0, 1): normal x, flat x / 20, peaked 4 x; V = 32768 and 50257, top_p 0.9
// and 0.5), scripts/cuda_topp_passes.py (a NumPy model of this search, not a GPU run) gives topp_search 2
// passes a row (normal, flat: level 0 + the copy) and 1-2 (peaked: mostly one element in level 0's crossing
// bin), so top-p alone takes 3-4 passes against the plain draw's 3 (1.0-1.33x, counting the draw as a whole
// pass); the byte-wise search it replaces took 3-4 levels + W + total: 6-8 passes (2.0-2.7x), and 8 levels
// (12 passes, 4x) on the same rows rounded to bf16, where the new search still takes 2. The final crossing bins
// held at most ~1300 weights (flat, V = 50257, top_p 0.5), within kCap; a larger one costs one level more
// (3 passes: 5 a row, 1.67x). Worst case: a tie group of more than kCap weights holding the crossing with
// near-equal neighbours in its bins: levels until one key (<= ~9). These count reads of the row; a histogram
// pass does more per element than a plain pass (the bin sums: a warp's lanes of one bin are summed by
// shuffles, in lane order), so times need a GPU run (benchmarks/benchmark_sample_categorical.py,
// test_top_p_cost, ratio_to_plain).
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "common.cuh"
#include "philox.cuh"
#include "rows.cuh"

namespace fastdiff {
namespace {

__device__ __forceinline__ uint64_t ordered_key(double v) {
  // Order-preserving map of a double to uint64 (-0.0 is folded into +0.0 by the caller).
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ uint64_t weight_key(double w) {  // w >= 0: the bit pattern is monotone
  return static_cast<uint64_t>(__double_as_longlong(w));
}

// ------------------------------------------------------------------------------------------------
// sample_categorical
// ------------------------------------------------------------------------------------------------
constexpr int kCap = kWarps * 256;  // candidates the top-p search finishes in shared memory (reuses hsum)
static_assert(kCap == kThreads * kItems, "the shared-memory finish gives each thread kItems candidates");
constexpr uint64_t kKeyOne = 0x3FF0000000000000ull;  // weight_key(1.0), the largest weight's key

struct SampleScratch {
  RowScratch row;
  union {
    double hsum[kWarps][256];  // per-warp bin sums (mass mode)
    double cand[kCap];         // top-p: the crossing bin's weights, sorted in place
  };
  unsigned cnt[256];
  uint64_t ured[2][32];  // block min / max of uint64 keys
  uint64_t prefix;
  double above;
  int done;
  // top-p search state (written by thread 0, read by all after a barrier)
  uint64_t lo, hi;
  double target, total;
  unsigned count, ncand;
  int state;
};

// The crossing rule of both threshold searches (thread 0, after a histogram pass): from the top bin down, the
// first non-empty bin d with acc + mass(d) >= target, acc (in: the mass above the bins) becoming the mass above
// it; -1 if none, acc then the total.
template <class MassFn>
__device__ __forceinline__ int crossing_bin(const unsigned* cnt, MassFn mass, double target, double& acc) {
  for (int d = 255; d >= 0; --d) {
    if (cnt[d] == 0u) continue;
    const double tot = mass(d);
    if (acc + tot >= target) return d;
    acc += tot;
  }
  return -1;
}

// Threshold search without a sort. Over the eligible elements (elem(j, key, wt) returns eligibility, a
// uint64 order key and a non-negative weight; count mode uses weight 1), find
//     kappa = min{ key_v : sum of the weights of the elements with key > key_v  <  target }
// so that the kept set is {v : key_v >= kappa}: most significant byte first, a 256-bin histogram of
// the candidates per level, descending to the bin where the mass above crosses the target, until the bin
// holds one element or the key is complete. Per-warp bin sums are added one lane at a time, in lane
// order, and combined in warp order: the result is deterministic.
template <bool kMass, class ElemFn>
__device__ uint64_t radix_threshold(int64_t V, double target, ElemFn elem, SampleScratch& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t prefix = 0;
  double above = 0.0;
  for (int level = 0; level < 8; ++level) {
    const int shift = 56 - 8 * level;
    const uint64_t hi_mask = level == 0 ? 0ull : (~0ull << (shift + 8));
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      sm.cnt[i] = 0u;
      if (kMass)
        for (int w = 0; w < kWarps; ++w) sm.hsum[w][i] = 0.0;
    }
    __syncthreads();
    for (int64_t base = 0; base < V; base += blockDim.x) {
      const int64_t j = base + threadIdx.x;
      uint64_t key = 0;
      double wt = 0.0;
      bool in = j < V && elem(j, key, wt);
      in = in && (key & hi_mask) == prefix;
      const int d = static_cast<int>((key >> shift) & 255u);
      if (in) atomicAdd(&sm.cnt[d], 1u);
      if (kMass) {
        unsigned pending = __ballot_sync(kFullMask, in);
        while (pending) {
          const int l = __ffs(pending) - 1;
          pending &= pending - 1;
          if (lane == l) sm.hsum[warp][d] += wt;
          __syncwarp();
        }
      }
    }
    __syncthreads();
    if (kMass) {  // bin totals in warp order
      for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        double tot = 0.0;
        for (int w = 0; w < kWarps; ++w) tot += sm.hsum[w][i];
        sm.hsum[0][i] = tot;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      double acc = above;
      const int pick = crossing_bin(
          sm.cnt, [&](int d) { return kMass ? sm.hsum[0][d] : static_cast<double>(sm.cnt[d]); }, target, acc);
      int done = 1;  // no bin crosses: every remaining candidate is kept (threshold = prefix)
      if (pick >= 0) {
        prefix |= static_cast<uint64_t>(pick) << shift;
        above = acc;
        done = (sm.cnt[pick] == 1u || shift == 0) ? 1 : 0;
      }
      sm.prefix = prefix;
      sm.above = above;
      sm.done = done;
    }
    __syncthreads();
    prefix = sm.prefix;
    above = sm.above;
    const bool done = sm.done != 0;
    __syncthreads();
    if (done) break;
  }
  return prefix;
}

// ------------------------------------------------------------------------------------------------
// top-p alone: a range-radix search that finds W, the threshold and the kept total (see the header)
// ------------------------------------------------------------------------------------------------
enum TopPState : int { kTopPLevel = 0, kTopPDone = 1, kTopPCompact = 2 };
constexpr int kTopPMaxLevels = 16;  // never reached: see topp_search

// Block-wide minimum and maximum of uint64 keys; every thread gets both. Barrier-ordered use of sm.ured.
__device__ __forceinline__ void block_minmax_u64(uint64_t& mn, uint64_t& mx, SampleScratch& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t a = __shfl_xor_sync(kFullMask, static_cast<unsigned long long>(mn), o);
    const uint64_t b = __shfl_xor_sync(kFullMask, static_cast<unsigned long long>(mx), o);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
  __syncthreads();  // sm.ured may still be read by a previous call
  if (lane == 0) {
    sm.ured[0][warp] = mn;
    sm.ured[1][warp] = mx;
  }
  __syncthreads();
  mn = lane < nw ? sm.ured[0][lane] : ~0ull;
  mx = lane < nw ? sm.ured[1][lane] : 0ull;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t a = __shfl_xor_sync(kFullMask, static_cast<unsigned long long>(mn), o);
    const uint64_t b = __shfl_xor_sync(kFullMask, static_cast<unsigned long long>(mx), o);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
}

// The smallest s with width >> s <= top (block-uniform arguments).
__device__ __forceinline__ int shift_for(uint64_t width, uint64_t top) {
  int s = 0;
  while ((width >> s) > top) ++s;
  return s;
}

// One histogram pass of the top-p search. Candidates: w > 0 with clo <= key <= chi. Bin of a candidate:
// key < base ? 0 : min(255, bottom + ((key - base) >> s)) (a level's bins never reach the clamp, it only
// bounds the index). cnt: the count per bin; hsum[0]: the mass per bin (per warp and batch of 32 elements the
// bin's lanes summed in lane order, the batches in order, the warps in warp order: deterministic); kmin /
// kmax: the smallest and largest candidate key (every thread). Ends with a barrier after which thread 0 may
// read cnt and hsum[0].
template <class WFn>
__device__ void topp_histogram(int64_t V, WFn wfn, uint64_t clo, uint64_t chi, uint64_t base, int bottom, int s,
                               SampleScratch& sm, uint64_t& kmin, uint64_t& kmax) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    sm.cnt[i] = 0u;
    for (int w = 0; w < kWarps; ++w) sm.hsum[w][i] = 0.0;
  }
  __syncthreads();
  uint64_t mn = ~0ull, mx = 0ull;
  for (int64_t b = 0; b < V; b += blockDim.x) {  // block-uniform trip count: every lane reaches the ballot
    const int64_t j = b + threadIdx.x;
    const double wt = j < V ? wfn(j) : 0.0;
    const uint64_t key = weight_key(wt);
    const bool in = wt > 0.0 && key >= clo && key <= chi;
    int d = 0;
    if (key >= base) {
      const uint64_t q = (key - base) >> s;
      d = q >= 255u ? 255 : min(255, bottom + static_cast<int>(q));
    }
    if (in) {
      mn = key < mn ? key : mn;
      mx = key > mx ? key : mx;
    }
    const unsigned act = __ballot_sync(kFullMask, in);
    if (act != 0u) {  // warp-uniform. The lanes of one bin: their weights summed in lane order (every lane
      // takes each candidate lane's weight in turn, keeps its bin's), added by the bin's lowest lane; one
      // shared update per bin and batch instead of one per lane in turn (bins are distinct among the leaders).
      const unsigned peers = __match_any_sync(kFullMask, in ? d : -1);
      double gsum = 0.0;
      for (unsigned rest = act; rest != 0u; rest &= rest - 1) {  // warp-uniform trip count
        const int l = __ffs(rest) - 1;
        const double v = __shfl_sync(kFullMask, wt, l);
        if ((peers >> l) & 1u) gsum += v;
      }
      if (in && lane == __ffs(peers) - 1) {
        sm.hsum[warp][d] += gsum;
        atomicAdd(&sm.cnt[d], static_cast<unsigned>(__popc(peers)));
      }
      __syncwarp();  // orders this batch's updates before the next batch's (another lane may lead a bin)
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {  // bin totals in warp order
    double tot = 0.0;
    for (int w = 0; w < kWarps; ++w) tot += sm.hsum[w][i];
    sm.hsum[0][i] = tot;
  }
  block_minmax_u64(mn, mx, sm);  // its first barrier orders the bin totals before thread 0 reads them
  kmin = mn;
  kmax = mx;
}

// top-p without top-k, on the weights wfn(j) = exp(z_j - m) in [0, 1] (0 < top_p < 1): returns
//     kappa = the smallest present weight key with mass(w > kappa) < top_p * W   (W = the sum of the weights)
// and sets kept_total to the mass of {w : key(w) >= kappa}; block-uniform. Keys are the float64 bit patterns,
// monotone for w >= 0. Level 0 (one pass, which also gives W: its bins hold every positive weight) splits
// [lo0, key(1.0)] into 255 equal key ranges, lo0 the key of max(wmin, (1 - top_p) / (2 V)) (less than
// (1 - top_p) of the mass lies below the second bound, so the crossing normally lies above it), bin 0 every
// smaller positive key. Each later level (one pass) splits the candidate range [lo, hi] into at most 256
// ranges of 2^s keys. After a level the crossing bin (the highest with above + its mass >= target) becomes
// the range, narrowed to the level's smallest / largest candidate key; the search ends when that bin holds
// one element or one key (kept: everything at or above the range's low end), or, when it holds at most kCap
// elements, one pass copies their weights into shared memory, where a bitonic sort and a block scan settle
// kappa exactly (tie groups whole). A level's range is narrower than 2^s of the level before, so s falls by
// 8 a level, and at s = 0 a bin is one key: at most ~9 levels (kTopPMaxLevels is never reached; if it were,
// the whole crossing bin would be kept).
template <class WFn>
__device__ uint64_t topp_search(int64_t V, WFn wfn, double top_p, double wmin, SampleScratch& sm,
                                double& kept_total) {
  const uint64_t kw = weight_key(wmin), kp = weight_key((1.0 - top_p) / (2.0 * static_cast<double>(V)));
  uint64_t lo0 = kw > kp ? kw : kp;  // <= kKeyOne (wmin <= 1, the bound < 1) unless wmin is NaN (a row of
  lo0 = lo0 < kKeyOne ? lo0 : kKeyOne;  // -inf only): clamped, so that the key arithmetic stays in range
  uint64_t lo = 1, hi = kKeyOne, base = lo0;  // level 0: every positive weight is a candidate
  int bottom = 1, s = shift_for(kKeyOne - lo0, 254);
  double above = 0.0, target = 0.0;
  int state = kTopPDone;
  for (int level = 0; level < kTopPMaxLevels; ++level) {
    uint64_t kmin, kmax;
    topp_histogram(V, wfn, lo, hi, base, bottom, s, sm, kmin, kmax);
    if (threadIdx.x == 0) {
      double tgt = target;
      if (level == 0) {  // W: every bin, top down (the order of the crossing scan below)
        double W = 0.0;
        for (int d = 255; d >= 0; --d)
          if (sm.cnt[d] != 0u) W += sm.hsum[0][d];
        tgt = top_p * W;
      }
      double acc = above;
      const int pick = crossing_bin(sm.cnt, [&](int d) { return sm.hsum[0][d]; }, tgt, acc);
      uint64_t nlo = lo, nhi = hi;
      double total = acc;  // no bin crosses (rounding, never at level 0): every candidate is kept
      int st = kTopPDone;
      if (pick >= 0) {
        uint64_t blo, bhi;
        if (bottom == 1 && pick == 0) {  // level 0's bin of the keys below lo0
          blo = lo;
          bhi = base - 1;
        } else {
          blo = base + (static_cast<uint64_t>(pick - bottom) << s);
          const uint64_t end = blo + ((1ull << s) - 1);
          bhi = end < hi ? end : hi;
        }
        nlo = blo > kmin ? blo : kmin;  // the bin's members lie in [kmin, kmax]: nlo <= nhi
        nhi = bhi < kmax ? bhi : kmax;
        total = acc + sm.hsum[0][pick];
        const unsigned c = sm.cnt[pick];
        st = (c == 1u || nlo == nhi) ? kTopPDone : (c <= static_cast<unsigned>(kCap) ? kTopPCompact : kTopPLevel);
        if (st == kTopPLevel && level == kTopPMaxLevels - 1) st = kTopPDone;  // unreachable (see above)
      }
      sm.lo = nlo;
      sm.hi = nhi;
      sm.above = acc;
      sm.target = tgt;
      sm.total = total;
      sm.state = st;
    }
    __syncthreads();
    lo = sm.lo;
    hi = sm.hi;
    above = sm.above;
    target = sm.target;
    kept_total = sm.total;
    state = sm.state;
    __syncthreads();
    if (state != kTopPLevel) break;
    base = lo;
    bottom = 0;
    s = shift_for(hi - lo, 255);
  }
  if (state == kTopPDone) return lo;

  // The crossing bin's members (count <= kCap, every w > 0 with lo <= key <= hi) into shared memory (hsum is
  // no longer read: the barriers above follow thread 0's last read).
  if (threadIdx.x == 0) sm.ncand = 0u;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const double wt = wfn(j);
    const uint64_t key = weight_key(wt);
    if (wt > 0.0 && key >= lo && key <= hi) {
      const unsigned slot = atomicAdd(&sm.ncand, 1u);
      if (slot < static_cast<unsigned>(kCap)) sm.cand[slot] = wt;
    }
  }
  __syncthreads();
  const int n = static_cast<int>(min(sm.ncand, static_cast<unsigned>(kCap)));  // the bin's count
  int P = 1;
  while (P < n) P <<= 1;  // <= kCap
  for (int i = n + static_cast<int>(threadIdx.x); i < P; i += blockDim.x) sm.cand[i] = 0.0;  // sorts last
  __syncthreads();
  // Bitonic sort, descending (slot order came from atomics; the sorted array does not depend on it).
  for (int k = 2; k <= P; k <<= 1) {
    for (int h = k >> 1; h > 0; h >>= 1) {
      for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const int p = i ^ h;  // < P: P is a power of two, h < P
        if (p > i) {
          const double a = sm.cand[i], b = sm.cand[p];
          if ((i & k) == 0 ? a < b : a > b) {
            sm.cand[i] = b;
            sm.cand[p] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  // Exclusive prefix masses in sorted order (kItems contiguous a thread, a block scan: fixed order; they do
  // not decrease). kappa: the smallest value v_i with above + prefix_i < target (i = 0 passes: above <
  // target). A tie group's first member has the group's smallest prefix, the mass strictly above it, so the
  // group passes iff its first member does: kept whole, as the definition wants.
  const int step = static_cast<int>(blockDim.x) * kItems;
  uint64_t kap = ~0ull, unused = 0ull;
  double running = 0.0;
  for (int b0 = 0; b0 < n; b0 += step) {
    const int i0 = b0 + static_cast<int>(threadIdx.x) * kItems;
    double v[kItems];
    double local = 0.0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      v[i] = i0 + i < n ? sm.cand[i0 + i] : 0.0;
      local += v[i];
    }
    double chunk;
    double c = running + block_exclusive_scan(local, sm.row.red, chunk);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int idx = i0 + i;
      if (idx < n && above + c < target) {
        const uint64_t kv = weight_key(v[i]);
        kap = kv < kap ? kv : kap;
      }
      c += v[i];
    }
    running += chunk;
  }
  block_minmax_u64(kap, unused, sm);
  const double kd = __longlong_as_double(static_cast<long long>(kap));
  // The kept part of the bin: its members >= kappa (a block sum in a fixed order, as the other totals; block_sum
  // begins with a barrier, so the scan's use of sm.row.red is over).
  double kept = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) kept += sm.cand[i] >= kd ? sm.cand[i] : 0.0;
  kept_total = above + block_sum(kept, sm.row.red);
  return kap;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
_sample_categorical_kernel(const T* __restrict__ logits, int64_t ld, int64_t N, int64_t V, double temperature,
                           int64_t top_k, double top_p, uint64_t seed, uint64_t offset, uint64_t row0,
                           int64_t* __restrict__ out) {
  __shared__ SampleScratch sm;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const T* x = logits + row * ld;
    if (temperature == 0.0) {  // greedy: the first maximum
      double best = -INFINITY;
      int64_t bi = kNone;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const double v = to_double(x[j]);
        if (bi == kNone || v > best) {
          best = v;
          bi = j;
        }
      }
      const double M = block_max(bi == kNone ? -INFINITY : best, sm.row.red);
      const int64_t idx = block_min_i64(bi != kNone && best == M ? bi : kNone, sm.row.ired);
      if (threadIdx.x == 0) out[row] = idx < V ? idx : 0;
      __syncthreads();
      continue;
    }
    auto z = [&](int64_t j) { return to_double(x[j]) / temperature + 0.0; };  // + 0.0 folds -0.0
    const bool use_k = top_k > 0 && top_k < V;
    const bool use_p = top_p < 1.0;
    double m = -INFINITY;
    uint64_t pth = 0;  // top-p keeps weight_key(w) >= pth: mass strictly more probable below top_p
    double total = 0.0;
    if (use_p && !use_k) {  // top-p alone: the max pass also finds the smallest logit; no W / total passes
      double zmin = INFINITY;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const double zj = z(j);
        m = fmax(m, zj);
        zmin = fmin(zmin, zj);
      }
      m = block_max(m, sm.row.red);
      zmin = -block_max(-zmin, sm.row.red);
      pth = topp_search(V, [&](int64_t j) { return exp(z(j) - m); }, top_p, exp(zmin - m), sm, total);
    } else {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmax(m, z(j));
      m = block_max(m, sm.row.red);
    }
    uint64_t kth = 0;  // top-k keeps key(z) >= kth: fewer than k logits strictly larger
    if (use_k) {
      kth = radix_threshold<false>(
          V, static_cast<double>(top_k),
          [&](int64_t j, uint64_t& key, double& wt) {
            key = ordered_key(z(j));
            wt = 1.0;
            return true;
          },
          sm);
    }
    if (use_p && use_k) {
      double W = 0.0;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const double zj = z(j);
        if (ordered_key(zj) >= kth) W += exp(zj - m);
      }
      W = block_sum(W, sm.row.red);
      pth = radix_threshold<true>(
          V, top_p * W,
          [&](int64_t j, uint64_t& key, double& wt) {
            const double zj = z(j);
            if (ordered_key(zj) < kth) return false;
            wt = exp(zj - m);
            key = weight_key(wt);
            return true;
          },
          sm);
    }
    auto weight = [&](int64_t j) {
      const double zj = z(j);
      if (use_k && ordered_key(zj) < kth) return 0.0;
      const double w = exp(zj - m);
      return (use_p && weight_key(w) < pth) ? 0.0 : w;
    };
    if (!use_p || use_k) {  // top-p alone has its kept total from the search
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) total += weight(j);
      total = block_sum(total, sm.row.red);
    }
    const double target = row_uniform(seed, offset, row0 + static_cast<uint64_t>(row)) * total;
    const int64_t tok = cdf_draw(V, weight, target, sm.row);
    if (threadIdx.x == 0) out[row] = tok >= 0 ? tok : 0;
    __syncthreads();
  }
}

template <typename T>
cudaError_t sample_launch_t(const void* logits, int64_t ld, int64_t N, int64_t V, double temperature, int64_t top_k,
                            double top_p, uint64_t seed, uint64_t offset, uint64_t row0, int64_t* out,
                            cudaStream_t stream) {
  _sample_categorical_kernel<T><<<grid_for(N), kThreads, 0, stream>>>(static_cast<const T*>(logits), ld, N, V,
                                                                      temperature, top_k, top_p, seed, offset, row0, out);
  return last_launch_error();
}
}  // namespace

cudaError_t sample_categorical_launch(const void* logits, int64_t ld, int64_t N, int64_t V, DType dtype,
                                      double temperature, int64_t top_k, double top_p, uint64_t seed, uint64_t offset,
                                      uint64_t row0, int64_t* out, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return sample_launch_t<float>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
    case DType::kFloat64:
      return sample_launch_t<double>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
    case DType::kFloat16:
      return sample_launch_t<__half>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
    case DType::kBFloat16:
      return sample_launch_t<__nv_bfloat16>(logits, ld, N, V, temperature, top_k, top_p, seed, offset, row0, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdiff
