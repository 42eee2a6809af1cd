// Quantized matmuls with integer dot products (AVX2, or AVX-512 where the CPU has it), for any number of rows
// of activations (decoding, batches, prompts); and the attention of one decoded token over its cache, at the end.
//
// As llama.cpp does, each row of x is quantized per block of 32 columns with a float scale, x ~= qx * dx,
// and each weight block is multiplied with it in integers:
//
//   int4 (Int4Linear, e.g. Q4_1):   w = qw * dw + mw   ->  sum(w x) = dw dx dot(qw, qx) + mw dx sum(qx)
//   int8 (Int8Linear, e.g. Q8_0):   w = qw * dw        ->  sum(w x) = dw dx dot(qw, qx)
//
// Where the CPU has AVX512-VNNI, vpdpwssd does each multiply-and-add of int16 pairs in one instruction, on
// 512-bit vectors (lanes_tile_avx512).
//
// Unlike llama.cpp, qx has 16 bits (|qx| <= 32767), not 8: with 8 bits SmolLM2's quality guard moved from
// perplexity x1.001 to x1.014. The weights are widened to int16 and multiplied with _mm256_madd_epi16. A block's
// int4 sum stays below 2^24 (32 * 15 * 32767), so it converts to float exactly and the result is exactly the
// dequantized weight times the quantized x; an int8 block's sum can pass 2^24 and is rounded to float32's
// 24 bits when converted, as any float32 sum would be.
//
// Prompts take the same path on CPUs without fast bfloat16. On a 2-vCPU Zen 3 _mm256_madd_epi16 runs at about
// float32 FMA's rate (16 products a cycle), so with many rows this kernel and a float32 matmul multiply equally
// fast, but the kernel skips converting each layer's weights to float32 first: 1.5-2.4x faster at 64-128 rows,
// ~1.1x at 512 (SmolLM2's int4 layers). Where the CPU has avx512_bf16, prompts of 64 rows or more go to a
// bfloat16 matmul instead, on weights dequantized by `lanes_to_bf16` (below; quantize.bf16_prompt).
//
// The kernel reads the weights in its own layout (lanes, below), which Int4Linear and Int8Linear hold in memory
// while gptchat's kernel serves them; checkpoints keep the portable row-major form.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "simd.h"

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

// The maximum of |x| over a block of 32, and the block as int16 (round to nearest even, as std::nearbyint)
// with the sum of its values; vectorized, the same numbers as the scalar loop.
inline float block_amax(const float* xb) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb));
  for (int j = 8; j < BLOCK; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// x quantized, in buffers that the calling thread keeps from call to call: decoding makes ~120 calls a token,
// and allocating (and zeroing) new ones each time showed in its profile. Valid until the thread's next call.
const QuantizedRows& quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = M * K / BLOCK;
  thread_local QuantizedRows r;
  r.q.resize(M * K);
  r.d.resize(blocks);
  r.sum.resize(blocks);
  for (int64_t i = 0; i < blocks; ++i) {
    const float* xb = x + i * BLOCK;
    const float amax = block_amax(xb);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? STEPS / amax : 0.f);
    __m256i q[4], sum = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), inv));  // |q| <= 32767
      sum = _mm256_add_epi32(sum, q[j]);
    }
    // packs interleaves 128-bit halves: [q0 lo, q1 lo, q0 hi, q1 hi]; the permute puts them back in order
    for (int j = 0; j < 2; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.q.data() + i * BLOCK + 16 * j),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * j], q[2 * j + 1]), 0xD8));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    r.d[i] = amax / STEPS;
    r.sum[i] = r.d[i] * static_cast<float>(_mm_cvtsi128_si32(s));
  }
  return r;
}

// ---- the lanes layout: 16 weight rows side by side ----
// For rows 16g .. 16g + 15 and block b the kernel reads 256 bytes (int4) or 512 (int8), as 32-byte chunks; in
// chunk c, bytes 2j and 2j + 1 belong to row 16g + j:
//   int4: the row's values 4c and 4c + 1 in the low nibbles, 4c + 2 and 4c + 3 in the high ones (8 chunks)
//   int8: the row's values 2c and 2c + 1 (16 chunks)
// Widened to int16, a chunk is a vector whose 32-bit lane j holds a pair of row j's values, and a multiply-add of
// int16 pairs with the matching pair of x broadcast to every lane adds row j's two products in lane j. A block
// thus ends as one vector of the rows' sums, converted and scaled once for all of them, with no horizontal sum:
// 1.3-1.9x faster than one row at a time (which needed both). With AVX-512 a chunk is one 512-bit vector of 16
// rows, and vpdpwssd takes the broadcast pair straight from memory; with AVX2 each half of a chunk (8 rows) is
// one 256-bit vector. Scales and offsets are [N/16, G, 16] to match; rows are padded with zeros to a multiple
// of 16. They are float16, as in GGUF's blocks (gptchat's own quantizers round them so): in float32 they were a
// third of the bytes an int4 layer reads per token (8 of 24 per block of 32 weights), in float16 a fifth; at
// one row of x the int4 layers ran 4-14% faster.

constexpr int64_t LANES = 16;
constexpr int64_t HALF = LANES / 2;  // the rows of a 256-bit vector

struct Lanes {
  const uint8_t* q;        // [N/16, G, 256 or 512]
  const at::Half* scale;   // [N/16, G, 16]
  const at::Half* offset;  // [N/16, G, 16] (int4) or nullptr
};

// Whether the matmuls take the AVX-512 tile (simd.h: where the CPU has it, unless GPTCHAT_VNNI=0); `set_vnni`
// switches every AVX-512 path of the library and says whether they are on.
bool set_vnni(bool enable) {
  gptchat_simd::use_avx512 = enable && gptchat_simd::avx512_supported();
  return gptchat_simd::use_avx512;
}

// The tiles ask for the weights PREFETCH_AHEAD bytes past the block they start, into L2 (prefetcht1): without
// it they read the weights from memory at about 60% of the rate a plain loop over them reaches. In a sequence
// of SmolLM2's int4 layers, from memory, 2 threads: ~4.5 -> ~3.9 ms; 1 thread ~6.6 -> ~5.3 ms. Into L1
// (prefetcht0), or one group ahead, gained little. Past the end of a weight it reads what follows: harmless.
constexpr int64_t PREFETCH_AHEAD = 8192;

inline void prefetch_ahead(const uint8_t* block, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(block) + PREFETCH_AHEAD + at, _MM_HINT_T1);
}

// y[m0 + i, 16g + 8h .. 16g + 8h + 7] for MC rows of x, with AVX2: half h of each chunk of weights is widened
// once for the MC rows, and _mm256_madd_epi16 multiplies it with pairs of x.
template <bool INT4, int MC>
void lanes_tile_avx2(const QuantizedRows& x, int64_t m0, int64_t G, const Lanes& w, int64_t g, int64_t h, float* y, int64_t N) {
  constexpr int CHUNKS = INT4 ? 8 : 16;
  const int64_t n0 = g * LANES + h * HALF;
  if (n0 >= N) return;  // padding rows only
  const int16_t* xq = x.q.data() + m0 * G * BLOCK;
  const uint8_t* wq = w.q + g * G * CHUNKS * 2 * LANES + h * 2 * HALF;
  const int64_t ws = g * G * LANES + h * HALF;  // scales and offsets of block b: ws + b * LANES
  __m256 acc[MC];
  for (int i = 0; i < MC; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    if (m0 == 0 && h == 0) prefetch_ahead(wq + b * CHUNKS * 2 * LANES, CHUNKS * 2 * LANES);
    __m256i s[MC];
    for (int i = 0; i < MC; ++i) s[i] = _mm256_setzero_si256();
    for (int c = 0; c < CHUNKS; ++c) {
      const __m128i chunk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + (b * CHUNKS + c) * 2 * LANES));
      if (INT4) {
        const __m256i bytes = _mm256_cvtepu8_epi16(chunk);
        const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(bytes, 4);
        for (int i = 0; i < MC; ++i) {
          const int32_t* xp = reinterpret_cast<const int32_t*>(xq + (i * G + b) * BLOCK + 4 * c);
          s[i] = _mm256_add_epi32(s[i], _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_set1_epi32(xp[0])),
                                                         _mm256_madd_epi16(hi, _mm256_set1_epi32(xp[1]))));
        }
      } else {
        const __m256i pairs = _mm256_cvtepi8_epi16(chunk);
        for (int i = 0; i < MC; ++i) {
          const int32_t* xp = reinterpret_cast<const int32_t*>(xq + (i * G + b) * BLOCK + 2 * c);
          s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(pairs, _mm256_set1_epi32(xp[0])));
        }
      }
    }
    const __m256 dw = load8(w.scale + ws + b * LANES);
    for (int i = 0; i < MC; ++i) {
      const int64_t xb = (m0 + i) * G + b;
      acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(x.d[xb])), _mm256_cvtepi32_ps(s[i]), acc[i]);
      if (INT4) acc[i] = _mm256_fmadd_ps(load8(w.offset + ws + b * LANES), _mm256_set1_ps(x.sum[xb]), acc[i]);
    }
  }
  for (int i = 0; i < MC; ++i) {
    float* out = y + (m0 + i) * N + n0;
    if (n0 + HALF <= N) {
      _mm256_storeu_ps(out, acc[i]);
    } else {  // the padding rows of the last group are not written
      alignas(32) float tmp[HALF];
      _mm256_store_ps(tmp, acc[i]);
      std::copy(tmp, tmp + (N - n0), out);
    }
  }
}

// acc + the pairwise products of a and the int16 pair at x broadcast to all 16 lanes: one vpdpwssd, the
// broadcast folded into its memory operand ({1to16}; GCC would issue a separate vpbroadcastd).
AVX512_TARGET inline __m512i dot_add_pair(__m512i acc, __m512i a, const int32_t* x) {
  asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*x));
  return acc;
}

// y[m0 + i, 16g .. 16g + 15] for MC rows of x, with AVX-512: each chunk is widened once into a 512-bit vector
// for the MC rows, and vpdpwssd multiplies it with a pair of x broadcast from memory (dot_add_pair) and adds
// the products (the same exact integer sums as the AVX2 tile: the two give the same numbers). Half the
// instructions of the earlier 256-bit VNNI tile: at one row, weights in cache, an int4 layer ~1.3x faster.
template <bool INT4, int MC>
AVX512_TARGET void lanes_tile_avx512(const QuantizedRows& x, int64_t m0, int64_t G, const Lanes& w, int64_t g, float* y, int64_t N) {
  constexpr int CHUNKS = INT4 ? 8 : 16;
  const int16_t* xq = x.q.data() + m0 * G * BLOCK;
  const uint8_t* wq = w.q + g * G * CHUNKS * 2 * LANES;
  const int64_t ws = g * G * LANES;
  __m512 acc[MC];
  for (int i = 0; i < MC; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    if (m0 == 0) prefetch_ahead(wq + b * CHUNKS * 2 * LANES, CHUNKS * 2 * LANES);
    __m512i s[MC], t[MC];  // two chains of vpdpwssd (each waits for the last), added below
    for (int i = 0; i < MC; ++i) s[i] = t[i] = _mm512_setzero_si512();
    for (int c = 0; c < CHUNKS; ++c) {
      const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + (b * CHUNKS + c) * 2 * LANES));
      if (INT4) {
        const __m512i bytes = _mm512_cvtepu8_epi16(chunk);
        const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(bytes, 4);
        for (int i = 0; i < MC; ++i) {
          const int32_t* xp = reinterpret_cast<const int32_t*>(xq + (i * G + b) * BLOCK + 4 * c);
          s[i] = dot_add_pair(s[i], lo, xp);
          t[i] = dot_add_pair(t[i], hi, xp + 1);
        }
      } else {
        const __m512i pairs = _mm512_cvtepi8_epi16(chunk);
        for (int i = 0; i < MC; ++i) {
          const int32_t* xp = reinterpret_cast<const int32_t*>(xq + (i * G + b) * BLOCK + 2 * c);
          if (c % 2)
            t[i] = dot_add_pair(t[i], pairs, xp);
          else
            s[i] = dot_add_pair(s[i], pairs, xp);
        }
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scale + ws + b * LANES)));
    for (int i = 0; i < MC; ++i) {
      const int64_t xb = (m0 + i) * G + b;
      const __m512i sum = _mm512_add_epi32(s[i], t[i]);
      acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(x.d[xb])), _mm512_cvtepi32_ps(sum), acc[i]);
      if (INT4) {
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.offset + ws + b * LANES)));
        acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.sum[xb]), acc[i]);
      }
    }
  }
  const int64_t n0 = g * LANES;
  const __mmask16 rows = N - n0 >= LANES ? 0xFFFF : (1u << (N - n0)) - 1;  // the padding rows are not written
  for (int i = 0; i < MC; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * N + n0, rows, acc[i]);
}

// The tiles of rows 16g .. 16g + 15 for all M rows of x, 4 rows of x at a time.
template <bool INT4, bool AVX512>
void lanes_group(const QuantizedRows& qx, int64_t M, int64_t G, const Lanes& w, int64_t g, float* out, int64_t N) {
  auto tile = [&](auto rows, int64_t m) {
    constexpr int MC = decltype(rows)::value;
    if constexpr (AVX512) {
      lanes_tile_avx512<INT4, MC>(qx, m, G, w, g, out, N);
    } else {
      for (int64_t h = 0; h < 2; ++h) lanes_tile_avx2<INT4, MC>(qx, m, G, w, g, h, out, N);
    }
  };
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>(), m);
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>(), m); break;
    case 2: tile(std::integral_constant<int, 2>(), m); break;
    case 1: tile(std::integral_constant<int, 1>(), m); break;
  }
}

template <bool INT4>
at::Tensor lanes_matmul(const at::Tensor& x, const Lanes& w, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), G = K / BLOCK, groups = (N + LANES - 1) / LANES;
  const QuantizedRows& qx = quantize_rows(x.data_ptr<float>(), M, K);
  at::Tensor y = at::empty({M, N}, x.options());
  float* out = y.data_ptr<float>();
  const bool avx512 = gptchat_simd::use_avx512;
  at::parallel_for(0, groups, 2, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      if (avx512)
        lanes_group<INT4, true>(qx, M, G, w, g, out, N);
      else
        lanes_group<INT4, false>(qx, M, G, w, g, out, N);
    }
  });
  return y;
}

// ---- conversion to the lanes layout (and back: quantize.lanes_to_portable, tensor ops) ----

// int4 [N, K/2] (column 2k in the low nibble of byte k) or int8 [N, K] weights, with float32 scales [N, G] or
// [N, 1] and offsets [N, G] (int4; undefined for int8), as the lanes layout's three tensors; the scales and
// offsets become float16 (rounded to nearest, if they are not float16 values already).
std::vector<at::Tensor> to_lanes(const at::Tensor& weight_in, const at::Tensor& scale_in, const c10::optional<at::Tensor>& offset_in) {
  const bool int4 = weight_in.scalar_type() == at::kByte;
  TORCH_CHECK(weight_in.dim() == 2 && (int4 || weight_in.scalar_type() == at::kChar), "to_lanes: uint8 [N, K/2] or int8 [N, K] weights");
  const at::Tensor weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const int64_t N = weight.size(0), K = int4 ? 2 * weight.size(1) : weight.size(1), G = K / BLOCK;
  TORCH_CHECK(K % BLOCK == 0 && scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == N &&
              (scale.size(1) == G || (!int4 && scale.size(1) == 1)), "to_lanes: K a multiple of 32, scale float32 [N, K/32]",
              int4 ? "" : " or [N, 1]");
  TORCH_CHECK(int4 == (offset_in.has_value() && offset_in->defined()), "to_lanes: int4 weights need an offset, int8 none");
  const at::Tensor offset = int4 ? offset_in->contiguous() : at::Tensor();
  TORCH_CHECK(!int4 || (offset.scalar_type() == at::kFloat && offset.sizes() == scale.sizes()), "to_lanes: offset float32 like scale");
  const int64_t groups = (N + LANES - 1) / LANES, block_bytes = int4 ? BLOCK / 2 : BLOCK;
  at::Tensor q = at::zeros({groups, G * LANES * block_bytes}, weight.options());
  at::Tensor s = at::zeros({groups, G * LANES}, scale.options().dtype(at::kHalf));
  at::Tensor m = int4 ? at::zeros({groups, G * LANES}, scale.options().dtype(at::kHalf)) : at::Tensor();
  const uint8_t* src = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  uint8_t* dst = reinterpret_cast<uint8_t*>(q.data_ptr());
  const int64_t per_row = scale.size(1);
  const float *scale_in_p = scale.data_ptr<float>(), *offset_in_p = int4 ? offset.data_ptr<float>() : nullptr;
  at::Half *scale_p = s.data_ptr<at::Half>(), *offset_p = int4 ? m.data_ptr<at::Half>() : nullptr;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t j = 0; j < LANES && g * LANES + j < N; ++j) {
        const int64_t n = g * LANES + j;
        for (int64_t b = 0; b < G; ++b) {
          const uint8_t* row = src + n * K / (int4 ? 2 : 1) + b * block_bytes;
          uint8_t* out = dst + (g * G + b) * LANES * block_bytes + 2 * j;  // chunk c at out + 2 * LANES * c
          if (int4) {  // bytes 2c, 2c + 1 hold values 4c, 4c + 1 and 4c + 2, 4c + 3 (low nibble first)
            for (int c = 0; c < 8; ++c) {
              const uint8_t first = row[2 * c], second = row[2 * c + 1];
              out[2 * LANES * c] = (first & 15) | (second << 4);        // values 4c (low) and 4c + 2 (high)
              out[2 * LANES * c + 1] = (first >> 4) | (second & 0xF0);  // values 4c + 1 and 4c + 3
            }
          } else {
            for (int c = 0; c < 16; ++c) out[2 * LANES * c] = row[2 * c], out[2 * LANES * c + 1] = row[2 * c + 1];
          }
          scale_p[(g * G + b) * LANES + j] = scale_in_p[n * per_row + (per_row == 1 ? 0 : b)];
          if (int4) offset_p[(g * G + b) * LANES + j] = offset_in_p[n * G + b];
        }
      }
  });
  return int4 ? std::vector<at::Tensor>{q, s, m} : std::vector<at::Tensor>{q, s};
}

// The lanes tensors, contiguous (copies only if they are not), checked against N rows of K columns.
std::vector<at::Tensor> lanes_inputs(const at::Tensor& weight_in, const at::Tensor& scale_in, const at::Tensor* offset_in,
                                     int64_t N, int64_t K) {
  const bool int4 = offset_in != nullptr;
  const int64_t groups = (N + LANES - 1) / LANES, G = K / BLOCK, bytes = G * LANES * (int4 ? BLOCK / 2 : BLOCK);
  TORCH_CHECK(K % BLOCK == 0 && K > 0 && N > 0, "the weight's columns must be a multiple of 32 (got ", K, ")");
  TORCH_CHECK(weight_in.scalar_type() == (int4 ? at::kByte : at::kChar) && weight_in.dim() == 2 &&
              weight_in.size(0) == groups && weight_in.size(1) == bytes, int4 ? "int4" : "int8", " lanes weight: ",
              int4 ? "uint8" : "int8", " [", groups, ", ", bytes, "] expected for ", N, " rows of ", K, " columns");
  TORCH_CHECK(scale_in.scalar_type() == at::kHalf && scale_in.dim() == 2 && scale_in.size(0) == groups &&
              scale_in.size(1) == G * LANES, "lanes scale: float16 [", groups, ", ", G * LANES, "] expected");
  TORCH_CHECK(!int4 || (offset_in->sizes() == scale_in.sizes() && offset_in->scalar_type() == at::kHalf),
              "lanes offset: float16, shaped like the scale");
  std::vector<at::Tensor> t{weight_in.contiguous(), scale_in.contiguous()};
  if (int4) t.push_back(offset_in->contiguous());
  return t;
}

at::Tensor check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be float32 [M, K] on the CPU");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns; the weight wants ", K);
  return x.contiguous();
}

// y = x @ w.T for the N rows of w (the layout pads them to a multiple of 8); its columns come from the weight's shape.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& offset, int64_t N) {
  const int64_t K = weight.size(-1) / (LANES * BLOCK / 2) * BLOCK;
  const auto t = lanes_inputs(weight, scale, &offset, N, K);
  const Lanes w{t[0].data_ptr<uint8_t>(), t[1].data_ptr<at::Half>(), t[2].data_ptr<at::Half>()};
  return lanes_matmul<true>(check_x(x, K), w, N);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t N) {
  const int64_t K = weight.size(-1) / (LANES * BLOCK) * BLOCK;
  const auto t = lanes_inputs(weight, scale, nullptr, N, K);
  const Lanes w{reinterpret_cast<const uint8_t*>(t[0].data_ptr<int8_t>()), t[1].data_ptr<at::Half>(), nullptr};
  return lanes_matmul<false>(check_x(x, K), w, N);
}

// ---- dequantized to bfloat16, for prompts on CPUs with fast bfloat16 matmuls ----
//
// Where the CPU has avx512_bf16, a long prompt goes faster through a bfloat16 matmul (oneDNN) on the layer's
// weights dequantized for the occasion than through the integer dot products above, which run at float32's rate.
// w = q * scale (+ offset) in float32, a multiplication then an addition (as quantize.py's `dequantized`), rounded
// to the nearest bfloat16 (ties to even, as PyTorch's conversion): the same numbers as dequantized().bfloat16().

// 8 vectors of 8 32-bit lanes, transposed in registers: afterwards a[j] holds lane j of every input, in order.
inline void transpose8(__m256i a[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(a[i], a[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(a[i], a[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    a[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    a[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// Rows 16g .. 16g + 15, block by block, one half of each chunk (8 rows) at a time. A half chunk widened to
// int16 holds in its 32-bit lane j two values of row j (see the layout above): int4, the low nibbles values 4c and 4c + 1, the high ones 4c + 2 and 4c + 3; int8,
// values 2c and 2c + 1. A block's 16 such vectors, transposed as two 8 x 8 matrices of 32-bit lanes, give each
// row's 32 values in order, which are scaled and rounded 8 at a time. (Scattering the lanes through memory
// instead took 1.7-1.9x as long on one thread.)
template <bool INT4>
void dequantize_group(const Lanes& w, int64_t g, int64_t G, int64_t N, int64_t K, uint16_t* out) {
  constexpr int CHUNKS = INT4 ? 8 : 16;
  for (int64_t part = 0; part < 2 && g * LANES + part * HALF < N; ++part) {  // rows 16g + 8 part .. + 7
    const int64_t n0 = g * LANES + part * HALF, rows = std::min(HALF, N - n0);
    for (int64_t b = 0; b < G; ++b) {
      const uint8_t* q = w.q + (g * G + b) * CHUNKS * 2 * LANES + part * 2 * HALF;
      __m256i a[2][8];  // a[h][i]: the i-th vector of values 16h .. 16h + 15 of the 8 rows
      for (int c = 0; c < CHUNKS; ++c) {
        const __m128i chunk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 2 * LANES * c));
        if (INT4) {
          const __m256i v = _mm256_cvtepu8_epi16(chunk);
          a[c / 4][2 * (c % 4)] = _mm256_and_si256(v, _mm256_set1_epi16(15));
          a[c / 4][2 * (c % 4) + 1] = _mm256_srli_epi16(v, 4);
        } else {
          a[c / 8][c % 8] = _mm256_cvtepi8_epi16(chunk);
        }
      }
      transpose8(a[0]);
      transpose8(a[1]);
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t at = (g * G + b) * LANES + part * HALF + j;  // its scale and offset
        const __m256 scale = _mm256_set1_ps(static_cast<float>(w.scale[at]));
        const __m256 offset = INT4 ? _mm256_set1_ps(static_cast<float>(w.offset[at])) : _mm256_setzero_ps();
        uint16_t* row = out + (n0 + j) * K + b * BLOCK;
        for (int h = 0; h < 2; ++h) {
          const __m128i halves[2] = {_mm256_castsi256_si128(a[h][j]), _mm256_extracti128_si256(a[h][j], 1)};
          for (int k = 0; k < 2; ++k) {
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(halves[k])), scale);
            if (INT4) f = _mm256_add_ps(f, offset);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 16 * h + 8 * k), to_bf16(f));
          }
        }
      }
    }
  }
}

// The N rows of a lanes-layout weight as bfloat16 [N, K].
at::Tensor lanes_to_bf16(const at::Tensor& weight, const at::Tensor& scale, const c10::optional<at::Tensor>& offset, int64_t N) {
  const bool int4 = offset.has_value() && offset->defined();
  const int64_t K = weight.size(-1) / (LANES * BLOCK / (int4 ? 2 : 1)) * BLOCK, G = K / BLOCK;
  const auto t = lanes_inputs(weight, scale, int4 ? &*offset : nullptr, N, K);
  const Lanes w{reinterpret_cast<const uint8_t*>(t[0].data_ptr()), t[1].data_ptr<at::Half>(),
                int4 ? t[2].data_ptr<at::Half>() : nullptr};
  at::Tensor out = at::empty({N, K}, weight.options().dtype(at::kBFloat16));
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, (N + LANES - 1) / LANES, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      if (int4) dequantize_group<true>(w, g, G, N, K, o); else dequantize_group<false>(w, g, G, N, K, o);
    }
  });
  return out;
}

// ---- attention of one new token per row over its cache (decoding) ----
// Each group of G = H / Hkv query heads shares one key/value head. PyTorch runs this as small matmuls (G query
// rows against up to thousands of keys), and a compiled step as single-threaded loops; here each key and value
// row is read once for all G queries, and the keys (or value columns) are spread over the threads. The cache
// may hold float16 (what quantized models use: half the bytes a decoded token reads, and these ops are bound by
// reading them) or float32; the arithmetic is float32 either way.

constexpr int64_t SMALL_CACHE = 256;  // fewer keys than this (all rows together): one thread, no wake-up cost

void check_attention(const at::Tensor& a, const at::Tensor& kv, const char* what) {
  TORCH_CHECK(a.dim() == 3 && kv.dim() == 4 && a.scalar_type() == at::kFloat &&
              (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kHalf) &&
              a.size(0) == kv.size(0) && kv.size(1) > 0 && a.size(1) % kv.size(1) == 0 && a.size(1) / kv.size(1) <= 8 &&
              kv.stride(3) == 1, what, ": float32 [B, H, *] and float32 or float16 [B, Hkv, S, D], H / Hkv <= 8, D contiguous");
}

// Each task reads its keys (or value columns) row after row, a cache line or four per row: asking for the row
// 8 ahead made the 30 layers' ops ~15% faster at 700 cached tokens (the prefetch past the last row is harmless).
constexpr int64_t AHEAD = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {  // the cache lines of row[0 .. n)
  for (int64_t at = 0; at < n * int64_t(sizeof(T)); at += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + at, _MM_HINT_T0);
}

// scores[b, kh * G + g, s] = q[b, kh * G + g] . k[b, kh, s] for keys s0 <= s < s1
template <int G, typename T>
void scores_of(const float* q, const T* k, int64_t k_row, int64_t D, int64_t s0, int64_t s1, float* out, int64_t S) {
  for (int64_t s = s0; s < s1; ++s) {
    const T* kr = k + s * k_row;
    prefetch_row(kr + AHEAD * k_row, D);
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = load8(kr + d);
      for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) out[g * S + s] = hsum(acc[g]);
  }
}

// out[b, kh * G + g, d0 : d0 + 8 NV] = sum over s of p[b, kh * G + g, s] v[b, kh, s, d0 : d0 + 8 NV]
template <int G, int NV, typename T>
void mix_of(const float* p, const T* v, int64_t v_row, int64_t S, float* out, int64_t D) {
  __m256 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const T* vr = v + s * v_row;
    prefetch_row(vr + AHEAD * v_row, 8 * NV);
    __m256 vs[NV];
    for (int j = 0; j < NV; ++j) vs[j] = load8(vr + 8 * j);
    for (int g = 0; g < G; ++g) {
      const __m256 w = _mm256_set1_ps(p[g * S + s]);
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_fmadd_ps(w, vs[j], acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + g * D + 8 * j, acc[g][j]);
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
  const float* qp = q.data_ptr<float>();
  float* o = out.data_ptr<float>();
  constexpr int64_t CHUNK = 128;  // keys per task
  const int64_t chunks = (S + CHUNK - 1) / CHUNK;
  const int64_t tasks = B * Hkv * chunks;
  auto run = [&](const auto* kp) {
    at::parallel_for(0, tasks, B * S < SMALL_CACHE ? tasks : 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / (Hkv * chunks), kh = t / chunks % Hkv, s0 = t % chunks * CHUNK;
        with_constant<8, Scores>(G, qp + (b * H + kh * G) * D, kp + b * k.stride(0) + kh * k.stride(1), k.stride(2), D,
                                 s0, std::min(S, s0 + CHUNK), o + (b * H + kh * G) * S, S);
      }
    });
  };
  if (k.scalar_type() == at::kHalf) run(k.data_ptr<at::Half>()); else run(k.data_ptr<float>());
  return out;
}

// p [B, H, S] @ v [B, Hkv, S, D] -> [B, H, D], 32 columns (else 8) per task
at::Tensor gqa_mix(const at::Tensor& p_in, const at::Tensor& v) {
  const at::Tensor p = p_in.contiguous();
  check_attention(p, v, "gqa_mix");
  const int64_t B = p.size(0), H = p.size(1), S = p.size(2), Hkv = v.size(1), D = v.size(3), G = H / Hkv;
  TORCH_CHECK(v.size(2) == S && D % 8 == 0, "gqa_mix: p and v key counts differ, or the head size is not a multiple of 8");
  at::Tensor out = at::empty({B, H, D}, p.options());
  const float* pp = p.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t width = D % 32 == 0 ? 32 : 8, parts = D / width;  // columns per task
  const int64_t tasks = B * Hkv * parts;
  auto run = [&](const auto* vp) {
    at::parallel_for(0, tasks, B * S < SMALL_CACHE ? tasks : 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / (Hkv * parts), kh = t / parts % Hkv, d0 = t % parts * width;
        const float* pt = pp + (b * H + kh * G) * S;
        const auto* vt = vp + b * v.stride(0) + kh * v.stride(1) + d0;
        float* ot = o + (b * H + kh * G) * D + d0;
        if (width == 32)
          with_constant<8, Mix>(G, pt, vt, v.stride(2), S, ot, D);
        else
          with_constant<8, NarrowMix>(G, pt, vt, v.stride(2), S, ot, D);
      }
    });
  };
  if (v.scalar_type() == at::kHalf) run(v.data_ptr<at::Half>()); else run(v.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(gptchat, m) {
  m.def("to_lanes(Tensor weight, Tensor scale, Tensor? offset) -> Tensor[]");
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scale, Tensor offset, int N) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, int N) -> Tensor");
  m.def("gqa_scores(Tensor q, Tensor k) -> Tensor");
  m.def("gqa_mix(Tensor p, Tensor v) -> Tensor");
  m.def("lanes_to_bf16(Tensor weight, Tensor scale, Tensor? offset, int N) -> Tensor");
  m.def("set_vnni(bool enable) -> bool");
}

TORCH_LIBRARY_IMPL(gptchat, CPU, m) {
  m.impl("to_lanes", &to_lanes);
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("gqa_scores", &gqa_scores);
  m.impl("gqa_mix", &gqa_mix);
  m.impl("lanes_to_bf16", &lanes_to_bf16);
}

TORCH_LIBRARY_IMPL(gptchat, CatchAll, m) {
  m.impl("set_vnni", &set_vnni);
}
