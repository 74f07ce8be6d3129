// select_tokens on the CPU (fastdiff/ops/select_tokens.py): one decoding step of the confidence decoders.
// Candidate rows in parallel (parallel.h), each read once from memory: the max / chunk exp-sum pass of rows.h
// (which also checks the values), the token (first maximum, or sample_categorical's inverse-CDF draw with the
// very same chunk sums, so the tokens are those of fastdiff_cpp::sample_categorical), then the score from the
// row still in cache. The selection over (B, L) is a second, small pass per batch row.
#include "parallel.h"
#include "rows.h"

#include <atomic>
#include <optional>
#include <tuple>
#include <utility>

namespace fastdiff {
namespace {

enum Rule : int64_t { kProb = 0, kLlada = 1, kLogprob = 2, kMargin = 3, kEntropy = 4, kRandom = 5 };
enum Mode : int64_t { kAll = 0, kTopK = 1, kThreshold = 2 };

struct RowOut {
  int64_t token;
  double key;
};

// The score of one row: x its logits (exclusion applied), M its maximum, Zq the sum of exp((x - M) / tq).
template <typename C>
double row_score(const C* x, int64_t V, C M, double tq, double Zq, int64_t tok, int64_t rule, std::vector<C>& cmax,
                 std::vector<double>& chunks) {
  const double m = static_cast<double>(M);
  if (rule == kProb) return static_cast<float>(std::exp((static_cast<double>(x[tok]) - m) / tq) / Zq);
  if (rule == kLlada || rule == kLogprob) {
    double Z1 = Zq;
    if (tq != 1.0) {  // the untempered sum: one more pass over the row (in cache)
      C M1;
      Z1 = row_stats(x, V, -1, 1.0, &M1, chunks.data(), cmax).Z;
    }
    const float lp = static_cast<float>((static_cast<double>(x[tok]) - m) - std::log(Z1));
    return rule == kLlada ? std::exp(static_cast<double>(lp)) : static_cast<double>(lp);
  }
  if (rule == kMargin) {
    int64_t first = 0;
    while (first + 1 < V && !(x[first] == M)) ++first;
    double m2 = -kInf;
    for (int64_t j = 0; j < V; ++j) {
      if (j != first && static_cast<double>(x[j]) > m2) m2 = static_cast<double>(x[j]);
    }
    const double e2 = m2 > -kInf ? std::exp((m2 - m) / tq) : 0.0;
    return static_cast<float>((1.0 - e2) / Zq);
  }
  // kEntropy: sum p log(p + 1e-10), p = exp((x - M) / tq) / Zq (Dream's negative entropy)
  double s = 0.0;
  const double inv = 1.0 / Zq;
  for (int64_t j = 0; j < V; ++j) {
    const double p = std::exp((static_cast<double>(x[j]) - m) / tq) * inv;
    s += p * std::log(p + 1e-10);
  }
  return static_cast<float>(s);
}

template <typename T, typename C>
void score_rows(const T* logits, int64_t V, int64_t s0, int64_t s1, int64_t L, const int64_t* pos, int64_t n,
                const int64_t* counter, const double* uniform, int64_t rule, double temp, uint64_t seed,
                uint64_t offset, int64_t exclude, RowOut* out, int* status) {
  std::atomic<int> worst{kOk};
  const double tq = temp > 0.0 ? temp : 1.0;
  parallel_rows(n, V, [&](int64_t r0, int64_t r1) {  // a pass over V logits per row, plus the score's
    std::vector<C> buf, cmax;
    std::vector<double> chunks((V + CH - 1) / CH), chunks2((V + CH - 1) / CH);
    int local = kOk;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = pos[r];
      const T* src = logits + (p / L) * s0 + (p % L) * s1;
      const C* x;
      if constexpr (std::is_same<T, C>::value) {
        if (exclude < 0) {
          x = src;
        } else {  // the row with the excluded column at -inf, in cache for the passes below
          buf.assign(src, src + V);
          buf[exclude] = static_cast<C>(-kInf);
          x = buf.data();
        }
      } else {
        load_row<T, C>(src, V, buf);
        if (exclude >= 0) buf[exclude] = static_cast<C>(-kInf);
        x = buf.data();
      }
      C M;
      const RowStats rs = row_stats(x, V, -1, tq, &M, chunks.data(), cmax);
      const int st = rs.status;
      if (st != kOk) {  // the in-kernel value check: reported after the loop
        local = std::max(local, st);
        out[r] = {0, 0.0};
        continue;
      }
      const double Zq = rs.Z;
      int64_t tok;
      if (temp == 0.0) {  // the first maximum: float rows start at the first chunk whose maximum is M
        tok = 0;
        if constexpr (std::is_same<C, float>::value) {
          for (int64_t c = 0; c < static_cast<int64_t>(cmax.size()) && !(cmax[c] == M); ++c) tok += CH;
        }
        while (tok + 1 < V && !(x[tok] == M)) ++tok;
      } else {  // fastdiff_cpp::sample_categorical's plain draw, on the same chunk sums
        AffineRow<C> row{x, V, M, temp, static_cast<C>(-kInf), -1, -1, 1.0, 0.0, 0.0};
        const double W = row.chunk_w(chunks.data());
        tok = row.draw(chunks.data(), W, row_uniform(seed, offset, static_cast<uint64_t>(counter[p])));
      }
      const double key = rule == kRandom ? uniform[p] : row_score(x, V, M, tq, Zq, tok, rule, cmax, chunks2);
      out[r] = {tok, key};
    }
    int cur = worst.load();
    while (local > cur && !worst.compare_exchange_weak(cur, local)) {
    }
  });
  *status = worst.load();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_tokens(const at::Tensor& logits, const at::Tensor& candidates,
                                                             const std::optional<at::Tensor>& counter_rows,
                                                             const std::optional<at::Tensor>& k,
                                                             const std::optional<at::Tensor>& uniform, int64_t rule,
                                                             double temperature, int64_t seed, int64_t offset,
                                                             double threshold, int64_t mode, int64_t exclude) {
  TORCH_CHECK(logits.dim() == 3, "select_tokens: logits must be (B, L, V)");
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V >= 1, "select_tokens: empty vocabulary");
  TORCH_CHECK(V == 1 || logits.stride(2) == 1, "select_tokens: logits must have a unit column stride");
  TORCH_CHECK(candidates.scalar_type() == at::kBool && candidates.dim() == 2 && candidates.size(0) == B &&
                  candidates.size(1) == L && candidates.is_contiguous(),
              "select_tokens: candidates must be a contiguous (B, L) bool tensor");
  TORCH_CHECK(rule >= kProb && rule <= kRandom && mode >= kAll && mode <= kThreshold,
              "select_tokens: rule / mode out of range");
  TORCH_CHECK(temperature >= 0 && std::isfinite(temperature), "select_tokens: temperature");
  TORCH_CHECK(exclude >= -1 && exclude < V, "select_tokens: exclude out of range");
  auto side = [&](const std::optional<at::Tensor>& t, at::ScalarType dt, int64_t n1, const char* what) {
    TORCH_CHECK(t.has_value() && t->scalar_type() == dt && t->is_contiguous() && t->dim() == (n1 < 0 ? 1 : 2) &&
                    t->size(0) == B && (n1 < 0 || t->size(1) == n1),
                "select_tokens: ", what);
  };
  if (temperature > 0) side(counter_rows, at::kLong, L, "counter_rows must be a contiguous (B, L) int64 tensor");
  if (rule == kRandom) side(uniform, at::kDouble, L, "uniform must be a contiguous (B, L) float64 tensor");
  if (mode == kTopK) side(k, at::kLong, -1, "k must be a contiguous (B,) int64 tensor");

  const bool* cand = candidates.data_ptr<bool>();
  std::vector<int64_t> pos;
  for (int64_t i = 0; i < B * L; ++i) {
    if (cand[i]) pos.push_back(i);
  }
  const int64_t n = static_cast<int64_t>(pos.size());
  if (temperature > 0) {
    const int64_t* c = counter_rows->data_ptr<int64_t>();
    for (int64_t p : pos) TORCH_CHECK(c[p] >= 0, "select_tokens: counter_rows must be >= 0");
  }
  std::vector<RowOut> rows(n);
  int status = kOk;
  if (n) {
    const bool exact = logits.scalar_type() == at::kDouble || V <= kExactV;
    dispatch_logits(logits, exact, [&](auto* ptr, auto ctag) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(ptr)>>;
      using C = decltype(ctag);
      score_rows<T, C>(ptr, V, logits.stride(0), logits.stride(1), L, pos.data(), n,
                       temperature > 0 ? counter_rows->data_ptr<int64_t>() : nullptr,
                       rule == kRandom ? uniform->data_ptr<double>() : nullptr, rule, temperature,
                       static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), exclude, rows.data(), &status);
    });
  }
  // The same ValueError as ops._common.check_finite_above ("logits: ..."), before anything is returned.
  if (status != kOk) TORCH_CHECK_VALUE(false, "logits: ", status_message(status));

  auto opts = candidates.options();
  at::Tensor tokens = at::zeros({B, L}, opts.dtype(at::kLong));
  at::Tensor conf = at::full({B, L}, -kInf, opts.dtype(at::kFloat));
  at::Tensor sel = at::zeros({B, L}, opts.dtype(at::kBool));
  int64_t* tk = tokens.data_ptr<int64_t>();
  float* cf = conf.data_ptr<float>();
  bool* sl = sel.data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i) {
    tk[pos[i]] = rows[i].token;
    cf[pos[i]] = static_cast<float>(rows[i].key);
  }
  // The selection, row by row: best key first, ties to the lower position.
  std::vector<std::pair<double, int64_t>> cands;
  const auto better = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  for (int64_t b = 0, i = 0; b < B; ++b) {
    cands.clear();
    for (; i < n && pos[i] < (b + 1) * L; ++i) cands.emplace_back(rows[i].key, pos[i]);
    if (cands.empty()) continue;
    if (mode == kAll) {
      for (const auto& c : cands) sl[c.second] = true;
    } else if (mode == kTopK) {
      const int64_t kb = std::min<int64_t>(std::max<int64_t>(k->data_ptr<int64_t>()[b], 0),
                                           static_cast<int64_t>(cands.size()));
      if (kb == 0) continue;
      std::nth_element(cands.begin(), cands.begin() + (kb - 1), cands.end(), better);
      for (int64_t j = 0; j < kb; ++j) sl[cands[j].second] = true;
    } else {
      auto best = cands[0];
      for (const auto& c : cands) {
        if (c.first >= threshold) sl[c.second] = true;
        if (better(c, best)) best = c;
      }
      sl[best.second] = true;
    }
  }
  return {tokens, conf, sel};
}

}  // namespace fastdiff
