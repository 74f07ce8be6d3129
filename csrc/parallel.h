// Thread-team policy of the C++ CPU kernels: when a loop over rows forks an OpenMP team and when it runs
// on the calling thread. Every kernel's parallel loop goes through parallel_rows() below.
//
// Why: a team's cost depends on the machine, not on the loop. On an idle machine, waking torch's OpenMP
// workers costs microseconds (measured on 2 cores: a team pays from about 64K row elements on).
// When other processes keep every core busy, a woken worker waits for the next scheduler tick (4 ms ticks
// here; 8-16 ms measured), while the caller spins at the team's barrier; a posterior_sample at the
// bundled model's size (4 x 64 x 4096) then took 16-24 ms on 2 threads against 0.8 ms on one.
//
// Policy (all of it measured on the 2-core CPU, benchmarks/benchmark_loaded.py):
// * Work is counted in "units" of about 1 ns of one core: a posterior / sampling row of V categories is
//   V units, a nearest_embedding row block rn x V x D / 16, a loss row 2 V, a Philox counter 16.
// * A team is forked only when every thread gets at least kQuietMinWork units (kContendedMinWork while
//   contended, below), so the grain is derived from the work, not from a row count; never inside another
//   parallel region, and never with at::get_num_threads() == 1 (torch.set_num_threads governs the kernels,
//   as it governs torch's own ops).
// * Contention is measured, not guessed: the team's workers note how long after the fork they started.
//   A start later than kLateNs (idle machines measure under 0.1 ms, loaded ones 4-16 ms) marks the process
//   contended for kHoldNs; meanwhile a team needs kContendedMinWork units per thread (about 8 ms: a
//   scheduler tick is then a small part of the gain). After kHoldNs the next large call probes again, so
//   a loaded machine pays at most one late team per kHoldNs.
// The split never changes a result: every row is computed on its own (its random draw keyed by its row
// number), and the kernels' reductions over rows (the value-check status) are order-free.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace fastdiff {
namespace team {

constexpr int64_t kQuietMinWork = int64_t{1} << 17;      // units per thread on an idle machine (~0.13 ms)
constexpr int64_t kContendedMinWork = int64_t{1} << 23;  // units per thread while contended (~8 ms)
constexpr int64_t kLateNs = 1000000;                     // a worker starting later than this: contended
constexpr int64_t kHoldNs = 2000000000;                  // how long a late start keeps the process contended

struct Stats {
  std::atomic<int64_t> teams{0};    // loops that forked a team
  std::atomic<int64_t> inlined{0};  // loops run on the calling thread
  std::atomic<int64_t> late{0};     // teams whose worker started later than kLateNs
  std::atomic<int64_t> worst_start_ns{0};  // latest worker start seen (since the last reset)
  std::atomic<int64_t> contended_until{0};  // steady-clock ns
};

inline Stats& stats() {
  static Stats s;  // one per process: an inline function's static is shared by every translation unit
  return s;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline bool contended() { return now_ns() < stats().contended_until.load(std::memory_order_relaxed); }

inline void set_contended(bool on) { stats().contended_until.store(on ? now_ns() + kHoldNs : 0); }

inline void store_max(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (v > cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

// For fastdiff._C.team_stats(): the counters, the current state and the policy's constants.
inline std::map<std::string, int64_t> stats_dict() {
  const Stats& s = stats();
  return {{"teams", s.teams.load()},
          {"inlined", s.inlined.load()},
          {"late", s.late.load()},
          {"worst_start_ns", s.worst_start_ns.load()},
          {"contended", contended() ? 1 : 0},
          {"quiet_min_work", kQuietMinWork},
          {"contended_min_work", kContendedMinWork},
          {"late_ns", kLateNs},
          {"hold_ns", kHoldNs}};
}

// Rows per thread at which a loop of rows costing `row_work` units each may fork a team.
inline int64_t grain_rows(int64_t row_work) {
  const int64_t need = contended() ? kContendedMinWork : kQuietMinWork;
  const int64_t w = std::max<int64_t>(1, row_work);
  return std::max<int64_t>(1, (need + w - 1) / w);
}

}  // namespace team

// MKL (torch's BLAS on x86-64) forks its own OpenMP team per call. Its C interface for a thread-local count
// is exported by libtorch_cpu there (the lower-case name is the Fortran one, which takes a pointer); weak,
// so that builds whose BLAS is not MKL load without it.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace team {
// For its lifetime, the BLAS calls this thread makes run on it alone (MKL's thread-local count 1; restored
// on exit, also on an exception). Nothing changes for other threads, or where the BLAS is not MKL.
class SerialBlas {
 public:
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      prev_ = MKL_Set_Num_Threads_Local(1);
      active_ = true;
    }
  }
  ~SerialBlas() {
    if (active_) MKL_Set_Num_Threads_Local(prev_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int prev_ = 0;
  bool active_ = false;
};
}  // namespace team

// f(begin, end) over the rows [0, n), each costing about `row_work` units: on the calling thread unless
// every thread of a team would get enough work (see the policy above), else as at::parallel_for. Run on the
// calling thread while contended, f's own BLAS calls run on it too: a nearest_embedding row block's GEMMs
// would otherwise fork MKL's team per score tile and wait a tick each time (8 tiles: 130-250 ms, not 12).
template <typename F>
void parallel_rows(int64_t n, int64_t row_work, const F& f) {
  if (n <= 0) return;
  team::Stats& st = team::stats();
  const int64_t grain = team::grain_rows(row_work);
  const int64_t threads = at::get_num_threads();
  if (n <= grain || threads <= 1 || at::in_parallel_region()) {
    st.inlined.fetch_add(1, std::memory_order_relaxed);
    if (threads > 1 && !at::in_parallel_region() && team::contended()) {
      team::SerialBlas serial;
      f(int64_t{0}, n);
    } else {
      f(int64_t{0}, n);
    }
    return;
  }
  st.teams.fetch_add(1, std::memory_order_relaxed);
  std::atomic<int64_t> latest{0};
  const int64_t t0 = team::now_ns();
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    if (at::get_thread_num() != 0) team::store_max(latest, team::now_ns() - t0);
    f(b, e);
  });
  const int64_t late = latest.load();
  team::store_max(st.worst_start_ns, late);
  if (late > team::kLateNs) {
    st.late.fetch_add(1, std::memory_order_relaxed);
    team::set_contended(true);
  }
}

}  // namespace fastdiff
