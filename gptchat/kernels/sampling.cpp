// One sampled token from one row of logits, in a single call: temperature, top-p, min-p and the draw.
//
// gptchat's sampler (gptchat/sampling.py) does the same steps in NumPy and torch. Right after a decode step,
// which streams the model's weights through the caches, each of its ~20 NumPy/torch calls cost 5-30 us here:
// ~0.5 ms a token more than a greedy token, 5% of a decode step. This is the same rule in two passes over the
// vocabulary (the maximum; then exp, the total and top-p's candidates) and a few small ones over what top-p
// keeps. The numbers differ from the NumPy path's only in the exp's last bits and in the order of float64 sums.
//
//   w_i = exp((x_i - max x) / temperature)               the probabilities up to a factor; the largest is 1
//   top-p (p < 1): the most likely tokens, in order, while the mass above a token leaves more than 1 - p of the
//                  total (float32, as Hugging Face's TopPLogitsWarper); the most likely always. Only tokens above
//                  a threshold (1e-4, else 1e-8 of the largest, else any weight) are ordered: those, when they hold
//                  more than p of the mass, contain every token that can be kept.
//   min-p:         then, tokens with w >= min_p * the largest kept one.
//   draw:          the first token (in top-p's order, else the vocabulary's) whose cumulative weight exceeds
//                  u * the total; when rounding puts u * total at the total, the last token with any weight.
//
// Returns -1 where the NumPy path should decide instead: a NaN or +inf logit, no finite logit at all, or a
// temperature that rounds to 0 in float32.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// The largest of x[0..n); false if any is NaN or +inf, or none is above -inf.
bool finite_max(const float* x, int64_t n, float& out) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 bad = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // NaN (unordered) or +inf
    m = _mm256_max_ps(m, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = *std::max_element(lanes, lanes + 8);
  bool ok = _mm256_movemask_ps(bad) == 0;
  for (; i < n; ++i) {
    ok = ok && !(std::isnan(x[i]) || x[i] == std::numeric_limits<float>::infinity());
    best = std::max(best, x[i]);
  }
  out = best;
  return ok && best > -std::numeric_limits<float>::infinity();
}

// w = exp((x - top) / temperature), as float32 arithmetic (the subtraction, then the division); the total of w
// in float64, and the ids whose weight is above `cut`.
double weights(const float* x, int64_t n, float top, float temperature, float cut, float* w, std::vector<int32_t>& ids) {
  const __m256 vtop = _mm256_set1_ps(top), vt = _mm256_set1_ps(temperature), vcut = _mm256_set1_ps(cut);
  __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();  // the total, in float64
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vtop), vt));
    _mm256_storeu_ps(w + i, e);
    for (int bits = _mm256_movemask_ps(_mm256_cmp_ps(e, vcut, _CMP_GT_OQ)); bits; bits &= bits - 1)
      ids.push_back(static_cast<int32_t>(i + __builtin_ctz(bits)));
    low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  const __m256d both = _mm256_add_pd(low, high);
  const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(both), _mm256_extractf128_pd(both, 1));
  double total = _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
  for (; i < n; ++i) {
    w[i] = exp_nonpositive((x[i] - top) / temperature);
    if (w[i] > cut) ids.push_back(static_cast<int32_t>(i));
    total += w[i];
  }
  return total;
}

// The first index of w[ids] (or of w, if ids is empty) whose cumulative float64 weight exceeds target; if
// none does (rounding), the last with any weight.
int64_t invert(const float* w, const std::vector<int32_t>& ids, int64_t n, double target) {
  double run = 0;
  int64_t last = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float wj = w[ids.empty() ? j : ids[j]];
    run += wj;
    if (wj > 0) last = j;
    if (run > target) return j;
  }
  return last;
}

int64_t sample_token(const at::Tensor& logits, int64_t vocab, double temperature, double top_p, double min_p, double u) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 1 &&
                  logits.is_contiguous() && logits.size(0) >= vocab && vocab > 0,
              "sample_token: logits must be a contiguous 1-D float32 CPU tensor of at least `vocab` values");
  TORCH_CHECK(temperature > 0 && top_p > 0 && top_p <= 1 && min_p >= 0 && min_p < 1 && u >= 0 && u < 1,
              "sample_token: temperature > 0, top_p in (0, 1], min_p in [0, 1) and u in [0, 1)");
  const float* x = logits.data_ptr<float>();
  const float temp = static_cast<float>(temperature);
  float top;
  if (!finite_max(x, vocab, top) || !(temp > 0)) return -1;  // (a temperature below float32's range, too)

  thread_local std::vector<float> w;
  thread_local std::vector<int32_t> ids;
  w.resize(vocab);
  ids.clear();
  const bool nucleus = top_p < 1;
  const double total = weights(x, vocab, top, temp, nucleus ? 1e-4f : std::numeric_limits<float>::infinity(), w.data(), ids);

  int64_t n = vocab;  // the tokens the draw runs over: ids[0..n) in top-p's order, else the whole vocabulary
  if (nucleus) {
    auto mass = [&] { double s = 0; for (int32_t i : ids) s += w[i]; return s; };
    for (const float cut : {1e-8f, 0.f}) {  // the 1e-4 candidates, when they hold enough mass; else lower cuts
      if (mass() > total * (top_p + 1e-6)) break;
      ids.clear();
      for (int64_t i = 0; i < vocab; ++i)
        if (w[i] > cut) ids.push_back(static_cast<int32_t>(i));
    }
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });
    const float cut = static_cast<float>(1.0 - top_p);
    double run = 0;
    n = 1;  // the most likely token always stays
    for (int64_t j = 0; j < static_cast<int64_t>(ids.size()); ++j) {
      run += w[ids[j]];
      if (j > 0 && !(static_cast<float>((total - (run - w[ids[j]])) / total) > cut)) break;
      n = j + 1;
    }
  }

  double kept = 0;
  if (min_p > 0 || nucleus) {  // the draw's total, over what top-p and min-p keep
    const float floor = static_cast<float>(min_p) * (nucleus ? w[ids[0]] : 1.f);  // the largest weight is 1
    for (int64_t j = 0; j < n; ++j) {
      float& wj = w[nucleus ? ids[j] : j];
      if (wj < floor) wj = 0;  // never the largest: it is >= min_p * itself
      kept += wj;
    }
  } else {
    kept = total;
  }
  if (!nucleus) ids.clear();
  const int64_t j = invert(w.data(), ids, n, u * kept);
  return nucleus ? ids[j] : j;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptchat, m) {
  m.def("sample_token(Tensor logits, int vocab, float temperature, float top_p, float min_p, float u) -> int");
}

TORCH_LIBRARY_IMPL(gptchat, CPU, m) {
  m.impl("sample_token", &sample_token);
}
