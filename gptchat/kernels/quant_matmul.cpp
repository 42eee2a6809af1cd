// Quantized matmuls for a few rows of activations (decoding), with AVX2 integer dot products; dequantization
// to float32 for many rows (prompts); and the attention of one decoded token over its cache, at the end.
//
// As llama.cpp does, each row of x is quantized per block of 32 columns with a float scale, x ~= qx * dx,
// and each weight block is multiplied with it in integers:
//
//   int4 (Int4Linear, e.g. Q4_1):   w = qw * dw + mw   ->  sum(w x) = dw dx dot(qw, qx) + mw dx sum(qx)
//   int8 (Int8Linear, e.g. Q8_0):   w = qw * dw        ->  sum(w x) = dw dx dot(qw, qx)
//
// The result is exactly the dequantized weight times the quantized x. Unlike llama.cpp, qx has 16 bits
// (|qx| <= 32767), not 8: with 8 bits SmolLM2's quality guard moved from perplexity x1.001 to x1.014. The
// weights are widened to int16 and multiplied with _mm256_madd_epi16, two per block. (An earlier version
// held 14-bit qx as two int8 digits for _mm256_maddubs_epi16: four multiply instructions per block instead
// of two, and 1.3-1.9x slower.) A block's 8 int32 partial sums stay below 2^24, so they convert to float
// exactly: 4 * 15 * 32767 for int4, 4 * 128 * 32767 for int8.
//
// Weights stay in gptchat's stored layout. A block of 32 int4 columns is 16 bytes, column 2j in the low
// nibble of byte j and 2j + 1 in the high one, so the bytes widened to int16, masked and shifted, give the
// even columns and the odd ones; the activations are quantized in that same order instead.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;

constexpr float STEPS = 32767.f;  // |qx| <= 32767: int16 activations

struct QuantizedRows {  // x [M, K] per block of 32: x ~= q * d; sum = d * sum(q) per block
  std::vector<int16_t> q;
  std::vector<float> d, sum;
};

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, bool even_then_odd) {
  const int64_t blocks = M * K / BLOCK;
  QuantizedRows r{std::vector<int16_t>(M * K), std::vector<float>(blocks), std::vector<float>(blocks)};
  for (int64_t i = 0; i < blocks; ++i) {
    const float* xb = x + i * BLOCK;
    float amax = 0.f;
    for (int j = 0; j < BLOCK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float inv = amax > 0.f ? STEPS / amax : 0.f;
    int sum = 0;
    for (int j = 0; j < BLOCK; ++j) {
      const int q = static_cast<int>(std::nearbyint(xb[j] * inv));
      r.q[i * BLOCK + (even_then_odd ? (j % 2) * (BLOCK / 2) + j / 2 : j)] = static_cast<int16_t>(q);
      sum += q;
    }
    r.d[i] = amax / STEPS;
    r.sum[i] = r.d[i] * static_cast<float>(sum);
  }
  return r;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Weights {
  const uint8_t* q;      // [N, K/2] nibbles (int4) or [N, K] int8
  const float* scale;    // [N, scale_groups]: per block, or one per row
  const float* offset;   // [N, K/32] (int4) or nullptr
  int64_t scale_groups;
};

// y[m, n] for MC rows of x from m0 and NR weight rows from n0: each weight block is widened once for the MC
// rows of x, and the MC * NR accumulators are independent chains of FMAs (one alone would wait on latency).
template <bool INT4, int MC, int NR>
void tile(const QuantizedRows& x, int64_t m0, int64_t G, const Weights& w, int64_t n0, float* y, int64_t N) {
  const int64_t row_bytes = INT4 ? G * BLOCK / 2 : G * BLOCK;
  const bool per_block = w.scale_groups != 1;
  const int16_t* xq = x.q.data() + m0 * G * BLOCK;
  const float* xd = x.d.data() + m0 * G;
  __m256 acc[MC][NR];
  for (int i = 0; i < MC; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    for (int r = 0; r < NR; ++r) {
      const uint8_t* wq = w.q + (n0 + r) * row_bytes;
      __m256i w0, w1;  // the block's 32 weights as int16: even then odd columns (int4), or in order (int8)
      if (INT4) {
        const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + b * BLOCK / 2)));
        w0 = _mm256_and_si256(bytes, _mm256_set1_epi16(15));
        w1 = _mm256_srli_epi16(bytes, 4);
      } else {
        w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + b * BLOCK)));
        w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + b * BLOCK + 16)));
      }
      const float dw = w.scale[(n0 + r) * w.scale_groups + (per_block ? b : 0)];
      for (int i = 0; i < MC; ++i) {
        const int16_t* xb = xq + (i * G + b) * BLOCK;
        const __m256i s = _mm256_add_epi32(
            _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
            _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))));
        acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[i * G + b]), _mm256_cvtepi32_ps(s), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MC; ++i) {
    for (int r = 0; r < NR; ++r) {
      __m256 v = acc[i][r];
      float tail = 0.f;
      if (INT4) {  // + sum over blocks of offset * dx sum(qx), 8 blocks at a time
        const float* mw = w.offset + (n0 + r) * G;
        const float* sx = x.sum.data() + (m0 + i) * G;
        int64_t b = 0;
        for (; b + 8 <= G; b += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(mw + b), _mm256_loadu_ps(sx + b), v);
        for (; b < G; ++b) tail += mw[b] * sx[b];
      }
      y[(m0 + i) * N + n0 + r] = hsum(v) + tail;
    }
  }
}

// NR weight rows from n against all M rows of x, 4 at a time: the weights are read from memory once.
template <bool INT4, int NR>
void weight_rows(const QuantizedRows& x, int64_t M, int64_t G, const Weights& w, int64_t n, float* y, int64_t N) {
  // the next rows' weights, from memory while these compute (a 49152-row head does not fit in any cache)
  const int64_t row_bytes = INT4 ? G * BLOCK / 2 : G * BLOCK;
  const char* next = reinterpret_cast<const char*>(w.q + (n + NR) * row_bytes);
  for (int64_t at = 0; at < NR * row_bytes; at += 64) _mm_prefetch(next + at, _MM_HINT_T0);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<INT4, 4, NR>(x, m, G, w, n, y, N);
  switch (M - m) {
    case 3: tile<INT4, 3, NR>(x, m, G, w, n, y, N); break;
    case 2: tile<INT4, 2, NR>(x, m, G, w, n, y, N); break;
    case 1: tile<INT4, 1, NR>(x, m, G, w, n, y, N); break;
  }
}

template <bool INT4>
at::Tensor quantized_matmul(const at::Tensor& x_in, const Weights& w, int64_t N) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = K / BLOCK;
  const QuantizedRows qx = quantize_rows(x.data_ptr<float>(), M, K, INT4);
  at::Tensor y = at::empty({M, N}, x.options());
  float* out = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 4096 / (G * M));  // ~4096 block products per task at least
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    int64_t n = begin;  // one row of x: 4 weight rows at a time (4 chains of FMAs); more: 2 (registers)
    if (M == 1)
      for (; n + 4 <= end; n += 4) weight_rows<INT4, 4>(qx, M, G, w, n, out, N);
    for (; n + 2 <= end; n += 2) weight_rows<INT4, 2>(qx, M, G, w, n, out, N);
    for (; n < end; ++n) weight_rows<INT4, 1>(qx, M, G, w, n, out, N);
  });
  return y;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be float32 [M, K] on the CPU");
  TORCH_CHECK(K % BLOCK == 0 && x.size(1) == K, "x has ", x.size(1), " columns; the weight wants ", K, " (a multiple of 32)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == weight.size(0),
              "scale must be float32 [N, groups]");
}

// The weights are read in place (.contiguous() copies nothing when they already are, as gptchat stores them).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scale_in,
                       const at::Tensor& offset_in) {
  const at::Tensor weight = weight_in.contiguous(), scale = scale_in.contiguous(), offset = offset_in.contiguous();
  const int64_t K = 2 * weight.size(1);
  check_inputs(x, weight, scale, K);
  TORCH_CHECK(weight.scalar_type() == at::kByte && scale.size(1) == K / BLOCK && offset.sizes() == scale.sizes() &&
              offset.scalar_type() == at::kFloat, "int4: uint8 [N, K/2], scale and offset float32 [N, K/32]");
  const Weights w{weight.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), scale.size(1)};
  return quantized_matmul<true>(x, w, weight.size(0));
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scale_in) {
  const at::Tensor weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const int64_t K = weight.size(1);
  check_inputs(x, weight, scale, K);
  TORCH_CHECK(weight.scalar_type() == at::kChar && (scale.size(1) == K / BLOCK || scale.size(1) == 1),
              "int8: int8 [N, K], scale float32 [N, K/32] or [N, 1]");
  const Weights w{reinterpret_cast<const uint8_t*>(weight.data_ptr<int8_t>()), scale.data_ptr<float>(), nullptr, scale.size(1)};
  return quantized_matmul<false>(x, w, weight.size(0));
}

// ---- dequantization, for prompts ----
// With many rows of x a float32 matmul (PyTorch's, near the CPU's peak) beats integer dot products done
// row by row, so a layer's weights are converted to float32 first: here in one parallel pass over memory,
// where the same done as a chain of tensor ops (unpack, convert, scale, offset) costs several times more.

// q * s + m rounded twice (no FMA), as PyTorch computes it: the same float32 weights on both paths
inline void int4_block_to_float(const uint8_t* q, float s, float m, float* o) {  // 16 bytes -> 32 floats
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(15), lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);  // column order
  const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
  const __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
  for (int i = 0; i < 4; ++i)
    _mm256_storeu_ps(o + 8 * i, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), vs), vm));
}

at::Tensor int4_dequantize(const at::Tensor& weight_in, const at::Tensor& scale_in, const at::Tensor& offset_in) {
  const at::Tensor weight = weight_in.contiguous(), scale = scale_in.contiguous(), offset = offset_in.contiguous();
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && scale.scalar_type() == at::kFloat &&
              scale.dim() == 2 && scale.size(0) == weight.size(0) && offset.sizes() == scale.sizes() &&
              offset.scalar_type() == at::kFloat, "int4: uint8 [N, K/2], scale and offset float32 [N, groups]");
  const int64_t N = weight.size(0), K = 2 * weight.size(1), G = scale.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % BLOCK == 0, "int4: groups must be whole blocks of 32 columns");
  const int64_t group = K / G;
  at::Tensor out = at::empty({N, K}, scale.options());
  const uint8_t* q = weight.data_ptr<uint8_t>();
  const float *s = scale.data_ptr<float>(), *m = offset.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < K; k += BLOCK)
        int4_block_to_float(q + (n * K + k) / 2, s[n * G + k / group], m[n * G + k / group], o + n * K + k);
  });
  return out;
}

at::Tensor int8_dequantize(const at::Tensor& weight_in, const at::Tensor& scale_in) {
  const at::Tensor weight = weight_in.contiguous(), scale = scale_in.contiguous();
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && scale.scalar_type() == at::kFloat &&
              scale.dim() == 2 && scale.size(0) == weight.size(0), "int8: int8 [N, K], scale float32 [N, groups]");
  const int64_t N = weight.size(0), K = weight.size(1), G = scale.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 8 == 0, "int8: groups must be whole multiples of 8 columns");
  const int64_t group = K / G;
  at::Tensor out = at::empty({N, K}, scale.options());
  const int8_t* q = weight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < K; k += 8) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * K + k));
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        _mm256_storeu_ps(o + n * K + k, _mm256_mul_ps(v, _mm256_set1_ps(s[n * G + k / group])));
      }
  });
  return out;
}

// ---- attention of one new token per row over its cache (decoding) ----
// Each group of G = H / Hkv query heads shares one key/value head. PyTorch runs this as small matmuls (G query
// rows against up to thousands of keys), and a compiled step as single-threaded loops; here each key and value
// row is read once for all G queries, and the keys (or value columns) are spread over the threads.

constexpr int64_t SMALL_CACHE = 256;  // fewer keys than this (all rows together): one thread, no wake-up cost

void check_attention(const at::Tensor& a, const at::Tensor& kv, const char* what) {
  TORCH_CHECK(a.dim() == 3 && kv.dim() == 4 && a.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat &&
              a.size(0) == kv.size(0) && kv.size(1) > 0 && a.size(1) % kv.size(1) == 0 && a.size(1) / kv.size(1) <= 8 &&
              kv.stride(3) == 1, what, ": float32 [B, H, *] and [B, Hkv, S, D], H / Hkv <= 8, D contiguous");
}

// scores[b, kh * G + g, s] = q[b, kh * G + g] . k[b, kh, s] for keys s0 <= s < s1
template <int G>
void scores_of(const float* q, const float* k, int64_t k_row, int64_t D, int64_t s0, int64_t s1, float* out, int64_t S) {
  for (int64_t s = s0; s < s1; ++s) {
    const float* kr = k + s * k_row;
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = _mm256_loadu_ps(kr + d);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) out[g * S + s] = hsum(acc[g]);
  }
}

// out[b, kh * G + g, d0 : d0 + 8 NV] = sum over s of p[b, kh * G + g, s] v[b, kh, s, d0 : d0 + 8 NV]
template <int G, int NV>
void mix_of(const float* p, const float* v, int64_t v_row, int64_t S, float* out, int64_t D) {
  __m256 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const float* vr = v + s * v_row;
    __m256 vs[NV];
    for (int j = 0; j < NV; ++j) vs[j] = _mm256_loadu_ps(vr + 8 * j);
    for (int g = 0; g < G; ++g) {
      const __m256 w = _mm256_set1_ps(p[g * S + s]);
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_fmadd_ps(w, vs[j], acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + g * D + 8 * j, acc[g][j]);
}

template <template <int> class F, typename... Args>
void with_group(int64_t G, Args... args) {  // F<G>::run for G in 1..8, a compile-time constant
  switch (G) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    case 4: F<4>::run(args...); break;
    case 5: F<5>::run(args...); break;
    case 6: F<6>::run(args...); break;
    case 7: F<7>::run(args...); break;
    default: F<8>::run(args...); break;
  }
}
template <int G> struct Scores { template <typename... A> static void run(A... a) { scores_of<G>(a...); } };
template <int G> struct Mix { template <typename... A> static void run(A... a) { mix_of<G, 4>(a...); } };
template <int G> struct NarrowMix { template <typename... A> static void run(A... a) { mix_of<G, 1>(a...); } };

// q [B, H, D] . k [B, Hkv, S, D] -> scores [B, H, S]
at::Tensor gqa_scores(const at::Tensor& q_in, const at::Tensor& k) {
  const at::Tensor q = q_in.contiguous();
  check_attention(q, k, "gqa_scores");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  TORCH_CHECK(k.size(3) == D && D % 8 == 0, "gqa_scores: q and k head sizes differ, or are not a multiple of 8");
  at::Tensor out = at::empty({B, H, S}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  float* o = out.data_ptr<float>();
  constexpr int64_t CHUNK = 128;  // keys per task
  const int64_t chunks = (S + CHUNK - 1) / CHUNK;
  const int64_t tasks = B * Hkv * chunks;
  at::parallel_for(0, tasks, B * S < SMALL_CACHE ? tasks : 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (Hkv * chunks), kh = t / chunks % Hkv, s0 = t % chunks * CHUNK;
      with_group<Scores>(G, qp + (b * H + kh * G) * D, kp + b * k.stride(0) + kh * k.stride(1), k.stride(2), D, s0,
                         std::min(S, s0 + CHUNK), o + (b * H + kh * G) * S, S);
    }
  });
  return out;
}

// p [B, H, S] @ v [B, Hkv, S, D] -> [B, H, D], 32 columns (else 8) per task
at::Tensor gqa_mix(const at::Tensor& p_in, const at::Tensor& v) {
  const at::Tensor p = p_in.contiguous();
  check_attention(p, v, "gqa_mix");
  const int64_t B = p.size(0), H = p.size(1), S = p.size(2), Hkv = v.size(1), D = v.size(3), G = H / Hkv;
  TORCH_CHECK(v.size(2) == S && D % 8 == 0, "gqa_mix: p and v key counts differ, or the head size is not a multiple of 8");
  at::Tensor out = at::empty({B, H, D}, p.options());
  const float *pp = p.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t width = D % 32 == 0 ? 32 : 8, parts = D / width;  // columns per task
  const int64_t tasks = B * Hkv * parts;
  at::parallel_for(0, tasks, B * S < SMALL_CACHE ? tasks : 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (Hkv * parts), kh = t / parts % Hkv, d0 = t % parts * width;
      const float *pt = pp + (b * H + kh * G) * S, *vt = vp + b * v.stride(0) + kh * v.stride(1) + d0;
      float* ot = o + (b * H + kh * G) * D + d0;
      if (width == 32)
        with_group<Mix>(G, pt, vt, v.stride(2), S, ot, D);
      else
        with_group<NarrowMix>(G, pt, vt, v.stride(2), S, ot, D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(gptchat, m) {
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scale, Tensor offset) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("int4_dequantize(Tensor weight, Tensor scale, Tensor offset) -> Tensor");
  m.def("int8_dequantize(Tensor weight, Tensor scale) -> Tensor");
  m.def("gqa_scores(Tensor q, Tensor k) -> Tensor");
  m.def("gqa_mix(Tensor p, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptchat, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int8_dequantize", &int8_dequantize);
  m.impl("gqa_scores", &gqa_scores);
  m.impl("gqa_mix", &gqa_mix);
}
