// categorical_posterior / posterior_sample on the CPU: the four row formulas of fastdiff/ops/_plan.py over
// a lowered plan (kind codes in schema.h), one row at a time, rows in parallel (parallel.h). The row
// machinery (max and chunked exp-sum passes, the affine row and its chunked inverse-CDF draw) is shared with
// sample_categorical.cpp in rows.h; per-token absorbing and matrix rows use float64 weight vectors.
#include "parallel.h"
#include "rows.h"
#include "schema.h"

#include <atomic>

namespace fastdiff {
namespace {

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


// The value check of a masked absorbing row (status as row_stats reports it), without its statistics.
template <typename C>
int check_masked(const C* x, int64_t V, int64_t mask) {
  int nan = 0;
  const C m = std::max(vmax(x, mask, &nan), vmax(x + mask + 1, V - mask - 1, &nan));
  const int status = finish_stats<C>(m, x[mask], nan, 0.0).status;
  if (status != kOk) return status;
  return m == static_cast<C>(-kInf) ? kOnlyMask : kOk;
}

// ---- posterior ----------------------------------------------------------------------------------------
struct PostArgs {
  int64_t kind;  // PosteriorKindCode (schema.h)
  int64_t V, N, row_stride, mask;
  const int64_t *xt, *t, *s, *pair;
  const double *a_t, *a_s, *ab, *fact1, *qbar;
  double temp;
  bool sample, check;
  uint64_t seed, offset;
  uint64_t row0;  // global index of row 0: row r draws with Philox counter (row0 + r, offset)
};

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
  if (A.kind == kKindAbsorbing && A.sample && (A.mask == V - 1 || A.mask == 0)) {
    // The mask's weight is closed form (1 - a_s, out of W = 1 - a_t), and with the mask the last (first)
    // category its CDF interval is the last (first) one: when u * W falls in it, or the row has no weight
    // at all, the row stays mask and is only read for the value check.
    const double a_t = A.a_t[r], a_s = A.a_s[r], W = 1.0 - a_t;
    if (a_s >= a_t && a_s <= 1.0) {  // a decreasing schedule: both shares non-negative
      const double target = row_uniform(A.seed, A.offset, A.row0 + static_cast<uint64_t>(r)) * W;
      if (!(W > 0.0) || (A.mask == V - 1 ? target >= a_s - a_t : target < 1.0 - a_s)) {
        *status = check_masked(x, V, A.mask);
        return xt;
      }
    }
  }
  if (A.kind == kKindAbsorbing || A.kind == kKindUniform) {
    const bool absorbing = A.kind == kKindAbsorbing;
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
  if (A.kind == kKindAbsorbingPerToken) {
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
    const double e = (A.kind == kKindAbsorbingPerToken && j == A.mask) ? 0.0 : ew(static_cast<double>(x[j]), temp, zM);
    w[j] = e;
    Z += e;
  }
  if (A.kind == kKindAbsorbingPerToken) {
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
  parallel_rows(A.N, A.kind == kKindMatrix ? V * V : V, [&](int64_t r0, int64_t r1) {
    std::vector<C> buf, cmax;
    std::vector<double> dbuf, chunks;
    int local = kOk;
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = logits + r * A.row_stride;
      const bool carried = (A.kind == kKindAbsorbing || A.kind == kKindAbsorbingPerToken) && A.xt[r] != A.mask;
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

const double* opt_ptr(const std::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() >= numel, "posterior: ", name);
  static const double kEmpty = 0.0;  // an empty table (no rows) is present but has no storage
  return t->numel() == 0 ? &kEmpty : t->data_ptr<double>();
}

}  // namespace

at::Tensor posterior(const at::Tensor& logits, const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& s,
                     int64_t kind, int64_t mask_id, double temperature, const std::optional<at::Tensor>& a_t,
                     const std::optional<at::Tensor>& a_s, const std::optional<at::Tensor>& ab_table,
                     const std::optional<at::Tensor>& fact1, const std::optional<at::Tensor>& qbar_s,
                     const std::optional<at::Tensor>& pair, bool sample, int64_t seed, int64_t offset,
                     int64_t row_offset) {
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
  A.check = true;
  A.seed = static_cast<uint64_t>(seed);
  A.offset = static_cast<uint64_t>(offset);
  A.row0 = static_cast<uint64_t>(row_offset);
  A.a_t = opt_ptr(a_t, N, "a_t");
  A.a_s = opt_ptr(a_s, N, "a_s");
  A.ab = opt_ptr(ab_table, V, "ab_table");
  A.fact1 = opt_ptr(fact1, N * V, "fact1");
  A.qbar = opt_ptr(qbar_s, 0, "qbar_s");
  A.pair = nullptr;
  A.kind = kind;
  if (kind == kKindAbsorbing || kind == kKindAbsorbingPerToken) {
    TORCH_CHECK(mask_id >= 0 && mask_id < V, "posterior: mask_id");
    if (kind == kKindAbsorbingPerToken) {
      TORCH_CHECK(A.ab != nullptr, "posterior: absorbing schedule (per-token kind without ab_table)");
      const int64_t rows = ab_table->size(0);
      TORCH_CHECK(ab_table->dim() == 2 && ab_table->size(1) == V, "posterior: ab_table");
      if (N > 0) {
        TORCH_CHECK(t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < rows && s.min().item<int64_t>() >= 0 &&
                        s.max().item<int64_t>() < rows,
                    "posterior: steps outside ab_table");
      }
    } else {
      TORCH_CHECK(A.a_t != nullptr && A.a_s != nullptr, "posterior: absorbing schedule");
    }
  } else if (kind == kKindUniform) {
    TORCH_CHECK(A.a_t != nullptr && A.a_s != nullptr, "posterior: uniform schedule");
  } else if (kind == kKindMatrix) {
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
  // The in-kernel value check: the same ValueError as check_finite_above, raised before any result is
  // returned (the public op then skips its own read pass over the logits).
  if (status != kOk) TORCH_CHECK_VALUE(false, "x0_logits: ", status_message(status));
  return sample ? tokens : probs;
}

}  // namespace fastdiff
