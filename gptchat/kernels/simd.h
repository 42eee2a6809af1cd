// Small AVX2 helpers the kernels share: loads of float32, float16 and bfloat16 as 8 floats, a horizontal sum,
// rounding to bfloat16, exp for x <= 0, and a run-time count turned into a template argument; and the switch
// of their AVX-512 paths. Included by each .cpp (one library, several translation units).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// The AVX-512 paths (512-bit tiles in quant_matmul.cpp and attention.cpp) need F, BW (16-bit lanes), VL and
// VNNI (vpdpwssd): Zen 4, Ice Lake, Sapphire Rapids and later. The files are compiled for AVX2; only the
// functions marked so are compiled for these, and they only run where the CPU has them.
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace gptchat_simd {

inline bool avx512_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// Whether the kernels take their AVX-512 paths: where the CPU has them, unless GPTCHAT_VNNI=0. One flag for the
// whole library (an inline variable: one object across its files); `set_vnni` switches it (A/B runs, tests).
inline std::atomic<bool> use_avx512{avx512_supported() && !(std::getenv("GPTCHAT_VNNI") && std::strcmp(std::getenv("GPTCHAT_VNNI"), "0") == 0)};

}  // namespace gptchat_simd

namespace {

// F<n>::run(args...) for n in 1..MAX as a compile-time constant (a count above MAX runs F<MAX>), so that tile
// loops over n rows or heads unroll and keep their accumulators in registers.
template <int MAX, template <int> class F, typename... Args>
inline void with_constant(int64_t n, Args... args) {
  if constexpr (MAX > 1) {
    if (n < MAX) return with_constant<MAX - 1, F>(n, args...);
  }
  F<MAX>::run(args...);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is float32's upper half
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline __m128i to_bf16(__m256 f) {  // 8 finite floats, rounded to nearest even
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

// exp(x) for x <= 0, 8 at a time: 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, with Cephes' expf
// polynomial (~1 ulp). Below -87 (where float32 turns subnormal), and for -inf, the result is exactly 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-87.f);
  const __m256 underflow = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));  // 1 at x = 0
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(two_n)));
}

inline float exp_nonpositive(float x) {  // one lane of the above, for the tail of a row
  alignas(32) float lanes[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_store_ps(lanes, exp_nonpositive(_mm256_load_ps(lanes)));
  return lanes[0];
}

}  // namespace
