// Causal attention of a prompt: T queries, the last T of S keys (a prompt's tokens after what a cache already
// holds), grouped-query heads, softmax(q k^T / sqrt(D)) v in float32 arithmetic.
//
// PyTorch's CPU flash kernel took 4.3 ms a layer for a 500-token SmolLM2 prompt (9 query heads over 3 key/value
// heads, D = 64) in float32, ~6 ms on the engine's bfloat16 queries and float16 cache: a quarter of the whole
// prompt's time. It works in small blocks with an online softmax and a gemm call per block; at D = 64 the calls
// and the rescaling cost more than the arithmetic. Here a task takes 16 query positions of one key/value head,
// i.e. the G * 16 query rows that read the same keys, and does three plain passes:
//
//   scores   rows x keys up to the last row's position, tiles of 6 rows x 16 keys in registers (12 accumulators)
//            over the keys transposed (16 keys' d-th values side by side), so no horizontal sums;
//   softmax  each row over its own keys (the causal mask is where a row stops), exp_nonpositive (simd.h);
//   mix      tiles of 2 rows x 32 columns of v, scaled by 1 / the row's total at the end.
//
// Where the CPU has AVX-512 the score and mix tiles take 512-bit vectors and more rows at once (below).
// Before them, each key/value head's keys are transposed and its values converted to float32 once, whatever
// the cache holds (float32, float16 or bfloat16). Tasks are handed out light and heavy alternately (a query
// block late in the prompt reads many more keys than an early one), so the threads' halves weigh the same.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t QUERY_BLOCK = 16;  // query positions per task
constexpr int64_t KEY_TILE = 16;     // keys per score tile: two vectors
constexpr int SCORE_ROWS = 6;        // rows per score tile: 12 accumulators + 2 key vectors + a broadcast, of 16 registers
constexpr int MIX_ROWS = 2;          // rows per mix tile: 8 accumulators + 4 value vectors + a broadcast (mix_tile)

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// keys [S, D] (row stride `row`) -> kt [S_pad / 16][D][16] float32, zero past S: a score tile's keys are 4 KB in a row
template <typename T>
void transpose_keys(const T* k, int64_t row, int64_t S, int64_t D, float* kt) {
  for (int64_t j0 = 0; j0 < round_up(S, KEY_TILE); j0 += KEY_TILE) {
    float* tile = kt + j0 * D;
    for (int64_t j = j0; j < j0 + KEY_TILE; ++j) {
      if (j >= S) {
        for (int64_t d = 0; d < D; ++d) tile[d * KEY_TILE + j - j0] = 0.f;
        continue;
      }
      alignas(32) float r[8];
      for (int64_t d = 0; d < D; d += 8) {
        _mm256_store_ps(r, load8(k + j * row + d));
        for (int i = 0; i < 8; ++i) tile[(d + i) * KEY_TILE + j - j0] = r[i];
      }
    }
  }
}

template <typename T>
void convert_values(const T* v, int64_t row, int64_t S, int64_t D, float* out) {
  for (int64_t j = 0; j < S; ++j)
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(out + j * D + d, load8(v + j * row + d));
}

// sc[r, j] = q[r] . k[j] for R rows and keys [0, n), n a multiple of 16
template <int R>
void score_tile(const float* q, int64_t D, const float* kt, int64_t n, float* sc, int64_t sc_row) {
  for (int64_t j0 = 0; j0 < n; j0 += KEY_TILE) {
    const float* tile = kt + j0 * D;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(tile + d * KEY_TILE), k1 = _mm256_loadu_ps(tile + d * KEY_TILE + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 qd = _mm256_broadcast_ss(q + r * D + d);
        acc[r][0] = _mm256_fmadd_ps(qd, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qd, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(sc + r * sc_row + j0, acc[r][0]);
      _mm256_storeu_ps(sc + r * sc_row + j0 + 8, acc[r][1]);
    }
  }
}

// out[r, d0 : d0 + 32] = sum over j < n of p[r, j] v[j, d0 : d0 + 32], for R = 1 or 2 rows. The accumulators are
// named one by one: as arrays, GCC stored them to the stack on every key (2x slower).
template <int R>
void mix_tile(const float* p, int64_t p_row, const float* v, int64_t D, int64_t n, int64_t d0, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = v + j * D + d0;
    const __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8), v2 = _mm256_loadu_ps(vj + 16), v3 = _mm256_loadu_ps(vj + 24);
    const __m256 w = _mm256_broadcast_ss(p + j);
    a0 = _mm256_fmadd_ps(w, v0, a0), a1 = _mm256_fmadd_ps(w, v1, a1), a2 = _mm256_fmadd_ps(w, v2, a2), a3 = _mm256_fmadd_ps(w, v3, a3);
    if (R == 2) {
      const __m256 x = _mm256_broadcast_ss(p + p_row + j);
      b0 = _mm256_fmadd_ps(x, v0, b0), b1 = _mm256_fmadd_ps(x, v1, b1), b2 = _mm256_fmadd_ps(x, v2, b2), b3 = _mm256_fmadd_ps(x, v3, b3);
    }
  }
  float* o = out + d0;
  _mm256_storeu_ps(o, a0), _mm256_storeu_ps(o + 8, a1), _mm256_storeu_ps(o + 16, a2), _mm256_storeu_ps(o + 24, a3);
  if (R == 2) {
    o += D;
    _mm256_storeu_ps(o, b0), _mm256_storeu_ps(o + 8, b1), _mm256_storeu_ps(o + 16, b2), _mm256_storeu_ps(o + 24, b3);
  }
}

// The same for 8 columns (head sizes that are not a multiple of 32 end with these).
template <int R>
void mix_narrow(const float* p, int64_t p_row, const float* v, int64_t D, int64_t n, int64_t d0, float* out) {
  __m256 a = _mm256_setzero_ps(), b = a;
  for (int64_t j = 0; j < n; ++j) {
    const __m256 vj = _mm256_loadu_ps(v + j * D + d0);
    a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), vj, a);
    if (R == 2) b = _mm256_fmadd_ps(_mm256_broadcast_ss(p + p_row + j), vj, b);
  }
  _mm256_storeu_ps(out + d0, a);
  if (R == 2) _mm256_storeu_ps(out + D + d0, b);
}

template <int R>
void mix_rows(const float* p, int64_t p_row, const float* v, int64_t D, int64_t n, float* out) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) mix_tile<R>(p, p_row, v, D, n, d0, out);
  for (; d0 < D; d0 += 8) mix_narrow<R>(p, p_row, v, D, n, d0, out);
}

// Row r of the scores, in place: exp(x - max) over its first n keys, zero from there to `end`; returns the total.
float softmax_row(float* x, int64_t n, int64_t end) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  auto keep = [&](int64_t j) {  // lanes j .. j + 7 that are below n
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), lane));
  };
  __m256 m = ninf;
  for (int64_t j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_blendv_ps(ninf, _mm256_loadu_ps(x + j), keep(j)));
  m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4E));
  m = _mm256_max_ps(m, _mm256_permute_ps(m, 0xB1));  // the maximum in every lane
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j < n; j += 8) {
    const __m256 e = _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), m)), keep(j));
    _mm256_storeu_ps(x + j, e);
    total = _mm256_add_ps(total, e);
  }
  for (; j < end; ++j) x[j] = 0.f;
  return hsum(total);
}

template <typename T>
inline void store_row(const float* x, float scale, int64_t D, T* out) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + d), s);
    if constexpr (std::is_same_v<T, float>)
      _mm256_storeu_ps(out + d, y);
    else if constexpr (std::is_same_v<T, c10::BFloat16>)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), to_bf16(y));
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
  }
}

// ---- the same tiles with 512-bit vectors (simd.h: where the CPU has AVX-512, unless GPTCHAT_VNNI=0) ----
// A key tile's 16 keys fit one vector and are loaded once for up to 12 rows; a value row's 32 columns fit two,
// loaded once for up to 4 rows. Each output is the same float32 operations in the same order as in the AVX2
// tiles above, so both give the same numbers. On the Zen 4, alternating in one process: a 500-token SmolLM2
// layer (bfloat16 queries, float16 cache) 2.63-2.94 -> 2.05-2.08 ms; a whole 500-token prompt 488 -> 468 ms
// (medians of 10). What is left is mostly the softmax's exp.

constexpr int SCORE_ROWS_512 = 12;  // 12 accumulators + a key vector + a broadcast, of 32 registers
constexpr int MIX_ROWS_512 = 4;     // 8 accumulators + 2 value vectors + a broadcast

template <int R>
AVX512_TARGET void score_tile_avx512(const float* q, int64_t D, const float* kt, int64_t n, float* sc, int64_t sc_row) {
  for (int64_t j0 = 0; j0 < n; j0 += KEY_TILE) {
    const float* tile = kt + j0 * D;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m512 kd = _mm512_loadu_ps(tile + d * KEY_TILE);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + d]), kd, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(sc + r * sc_row + j0, acc[r]);
  }
}

// out[r, d0 : d0 + 32] for R = 1 to 4 rows; named accumulators, as in mix_tile.
template <int R>
AVX512_TARGET void mix_tile_avx512(const float* p, int64_t p_row, const float* v, int64_t D, int64_t n, int64_t d0, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, e0 = a0, e1 = a0;
  for (int64_t j = 0; j < n; ++j) {
    const __m512 v0 = _mm512_loadu_ps(v + j * D + d0), v1 = _mm512_loadu_ps(v + j * D + d0 + 16);
    const __m512 w = _mm512_set1_ps(p[j]);
    a0 = _mm512_fmadd_ps(w, v0, a0), a1 = _mm512_fmadd_ps(w, v1, a1);
    if (R > 1) {
      const __m512 x = _mm512_set1_ps(p[p_row + j]);
      b0 = _mm512_fmadd_ps(x, v0, b0), b1 = _mm512_fmadd_ps(x, v1, b1);
    }
    if (R > 2) {
      const __m512 x = _mm512_set1_ps(p[2 * p_row + j]);
      c0 = _mm512_fmadd_ps(x, v0, c0), c1 = _mm512_fmadd_ps(x, v1, c1);
    }
    if (R > 3) {
      const __m512 x = _mm512_set1_ps(p[3 * p_row + j]);
      e0 = _mm512_fmadd_ps(x, v0, e0), e1 = _mm512_fmadd_ps(x, v1, e1);
    }
  }
  float* o = out + d0;
  _mm512_storeu_ps(o, a0), _mm512_storeu_ps(o + 16, a1);
  if (R > 1) _mm512_storeu_ps(o + D, b0), _mm512_storeu_ps(o + D + 16, b1);
  if (R > 2) _mm512_storeu_ps(o + 2 * D, c0), _mm512_storeu_ps(o + 2 * D + 16, c1);
  if (R > 3) _mm512_storeu_ps(o + 3 * D, e0), _mm512_storeu_ps(o + 3 * D + 16, e1);
}

template <int R>
void mix_rows_avx512(const float* p, int64_t p_row, const float* v, int64_t D, int64_t n, float* out) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) mix_tile_avx512<R>(p, p_row, v, D, n, d0, out);
  for (; d0 < D; d0 += 8)  // 8 columns left: the AVX2 tile, two rows at a time
    for (int r = 0; r < R; r += 2) {
      if (r + 1 < R) mix_narrow<2>(p + r * p_row, p_row, v, D, n, d0, out + r * D);
      else mix_narrow<1>(p + r * p_row, p_row, v, D, n, d0, out + r * D);
    }
}

template <int R> struct Score { template <typename... A> static void run(A... a) { score_tile<R>(a...); } };
template <int R> struct Score512 { template <typename... A> static void run(A... a) { score_tile_avx512<R>(a...); } };
template <int R> struct Mix { template <typename... A> static void run(A... a) { mix_rows<R>(a...); } };
template <int R> struct Mix512 { template <typename... A> static void run(A... a) { mix_rows_avx512<R>(a...); } };

struct Scratch {  // one thread's rows: queries, scores, outputs
  std::vector<float> q, sc, o;
};

// TQ: the queries' and the output's dtype; TK: the keys' and values'.
template <typename TQ, typename TK>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = H / Hkv, S_pad = round_up(S, KEY_TILE);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const bool avx512 = gptchat_simd::use_avx512;
  at::Tensor kt = at::empty({B * Hkv, S_pad * D}, q.options().dtype(at::kFloat));
  at::Tensor vf = at::empty({B * Hkv, S * D}, q.options().dtype(at::kFloat));
  const TQ* qp = q.data_ptr<TQ>();
  const TK* kp = k.data_ptr<TK>();
  const TK* vp = v.data_ptr<TK>();
  TQ* op = out.data_ptr<TQ>();
  float* ktp = kt.data_ptr<float>();
  float* vfp = vf.data_ptr<float>();

  at::parallel_for(0, 2 * B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / 2, b = bh / Hkv, h = bh % Hkv;
      if (t % 2 == 0)
        transpose_keys(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), S, D, ktp + bh * S_pad * D);
      else
        convert_values(vp + b * v.stride(0) + h * v.stride(1), v.stride(2), S, D, vfp + bh * S * D);
    }
  });

  const int64_t blocks = (T + QUERY_BLOCK - 1) / QUERY_BLOCK, tasks = B * Hkv * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch s;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / blocks, b = bh / Hkv, h = bh % Hkv, i = t % blocks;
      const int64_t block = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;  // light and heavy blocks alternate
      const int64_t t0 = block * QUERY_BLOCK, t1 = std::min(T, t0 + QUERY_BLOCK), rows = (t1 - t0) * G;
      const int64_t past = S - T;  // keys before the first query's own
      const int64_t width = round_up(past + t1, KEY_TILE);
      s.q.resize(rows * D);
      s.sc.resize(rows * width);
      s.o.resize(rows * D);
      for (int64_t r = 0; r < rows; ++r) {  // row r: position t0 + r / G, query head h * G + r % G
        const TQ* qr = qp + b * q.stride(0) + (h * G + r % G) * q.stride(1) + (t0 + r / G) * q.stride(2);
        const __m256 sv = _mm256_set1_ps(scale);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(s.q.data() + r * D + d, _mm256_mul_ps(load8(qr + d), sv));
      }
      auto keys_of = [&](int64_t r) { return past + t0 + r / G + 1; };  // row r sees keys [0, keys_of(r))
      const int score_rows = avx512 ? SCORE_ROWS_512 : SCORE_ROWS, mix_rows_at_once = avx512 ? MIX_ROWS_512 : MIX_ROWS;
      for (int64_t r = 0; r < rows; r += score_rows) {
        const int n = static_cast<int>(std::min<int64_t>(score_rows, rows - r));
        const int64_t keys = round_up(keys_of(r + n - 1), KEY_TILE);
        if (avx512)
          with_constant<SCORE_ROWS_512, Score512>(n, s.q.data() + r * D, D, ktp + bh * S_pad * D, keys, s.sc.data() + r * width, width);
        else
          with_constant<SCORE_ROWS, Score>(n, s.q.data() + r * D, D, ktp + bh * S_pad * D, keys, s.sc.data() + r * width, width);
      }
      for (int64_t r = 0; r < rows; r += mix_rows_at_once) {
        const int n = static_cast<int>(std::min<int64_t>(mix_rows_at_once, rows - r));
        const int64_t last = keys_of(r + n - 1);
        float totals[MIX_ROWS_512];
        for (int i = 0; i < n; ++i) totals[i] = softmax_row(s.sc.data() + (r + i) * width, keys_of(r + i), last);
        if (avx512)
          with_constant<MIX_ROWS_512, Mix512>(n, s.sc.data() + r * width, width, vfp + bh * S * D, D, last, s.o.data() + r * D);
        else
          with_constant<MIX_ROWS, Mix>(n, s.sc.data() + r * width, width, vfp + bh * S * D, D, last, s.o.data() + r * D);
        for (int i = 0; i < n; ++i) {
          const int64_t row = r + i;
          TQ* dst = op + ((b * T + t0 + row / G) * H + h * G + row % G) * D;
          store_row(s.o.data() + row * D, 1.f / totals[i], D, dst);
        }
      }
    }
  });
}

template <typename TQ>
void attend_keys(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  switch (k.scalar_type()) {
    case at::kFloat: attend<TQ, float>(q, k, v, out); break;
    case at::kHalf: attend<TQ, at::Half>(q, k, v, out); break;
    default: attend<TQ, c10::BFloat16>(q, k, v, out); break;
  }
}

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// q [B, H, T, D] (any strides, D contiguous), k and v [B, Hkv, S, D] (D contiguous), S >= T: the queries are the
// last T key positions and each sees the keys up to its own. Returns [B, H, T, D] in q's dtype, laid out as
// [B, T, H, D] (so that the caller's transpose(1, 2).reshape(B, T, H * D) is free).
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
              "prompt_attention: q [B, H, T, D], k and v [B, Hkv, S, D] of one dtype");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && k.size(1) > 0 && H % k.size(1) == 0 && k.size(2) >= T,
              "prompt_attention: batch, head size or key count mismatch, or H not a multiple of Hkv");
  TORCH_CHECK(D % 8 == 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "prompt_attention: head size a multiple of 8, contiguous within a head");
  TORCH_CHECK(supported(q.scalar_type()) && supported(k.scalar_type()) && q.device().is_cpu() && k.device().is_cpu(),
              "prompt_attention: float32, float16 or bfloat16 CPU tensors");
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  if (out.numel() > 0) {
    switch (q.scalar_type()) {
      case at::kFloat: attend_keys<float>(q, k, v, out); break;
      case at::kHalf: attend_keys<at::Half>(q, k, v, out); break;
      default: attend_keys<c10::BFloat16>(q, k, v, out); break;
    }
  }
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptchat, m) {
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptchat, CPU, m) {
  m.impl("prompt_attention", &prompt_attention);
}
