// The small ops between a layer's matmuls, each one pass over memory: RMSNorm, SwiGLU's silu(gate) * up and
// rotate-half RoPE.
//
// Run as PyTorch's ops, a 500-token SmolLM2 prompt spends ~60 ms in them (an eighth of its time): RMSNorm is
// five ops (pow, mean, add, rsqrt, two muls), RoPE five (neg, cat, two muls, add), SwiGLU two, and each writes a
// tensor the next reads back. A decoded token (eager) pays ~5 us of dispatch per op, 20 of them a layer. The
// compiled decode step does not use these: inductor fuses the same ops itself.
//
// rms_norm and rope compute what the PyTorch ops compute, in the same float32 operations (rope: bit for bit;
// rms_norm sums the squares in another order). silu_mul rounds once, to the input's dtype, where silu and mul in
// bfloat16 round twice.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t GRAIN = 16384;  // elements per task: below this, one thread (decoding's single rows)

inline int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, GRAIN / std::max<int64_t>(width, 1)); }

// x [..., C] float32 -> x / sqrt(mean(x^2) + eps) * weight, float32.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "rms_norm: float32 CPU tensors");
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(weight_in.numel() == C, "rms_norm: weight has ", weight_in.numel(), " values for rows of ", C);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t R = C ? x.numel() / C : 0;
  const float* xs = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* ys = out.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, R, rows_per_task(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xs + r * C;
      float* yr = ys + r * C;
      __m256 acc = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) acc = _mm256_fmadd_ps(load8(xr + c), load8(xr + c), acc);
      float squares = hsum(acc);
      for (; c < C; ++c) squares += xr[c] * xr[c];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(C) + epsilon);
      const __m256 inv8 = _mm256_set1_ps(inv);
      for (c = 0; c + 8 <= C; c += 8) _mm256_storeu_ps(yr + c, _mm256_mul_ps(_mm256_mul_ps(load8(xr + c), inv8), load8(w + c)));
      for (; c < C; ++c) yr[c] = (xr[c] * inv) * w[c];
    }
  });
  return out;
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }

inline __m256 silu(__m256 g) {  // g * sigmoid(g), sigmoid from exp(-|g|) <= 1 (no overflow)
  const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.f), g)));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 numerator = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(g, _mm256_div_ps(numerator, _mm256_add_ps(one, e)));
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

template <typename T>
void silu_mul_rows(const T* in, T* out, int64_t R, int64_t H) {
  at::parallel_for(0, R, rows_per_task(2 * H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = in + r * 2 * H;
      const T* up = gate + H;
      T* y = out + r * H;
      int64_t c = 0;
      for (; c + 8 <= H; c += 8) store8(y + c, _mm256_mul_ps(silu(load8(gate + c)), load8(up + c)));
      for (; c < H; ++c) y[c] = static_cast<T>(silu(static_cast<float>(gate[c])) * static_cast<float>(up[c]));
    }
  });
}

// gate_up [..., 2H] (gate, then up) -> silu(gate) * up [..., H], float32 or bfloat16 (computed in float32).
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const auto dtype = gate_up_in.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && gate_up_in.device().is_cpu(),
              "silu_mul: float32 or bfloat16 CPU tensor");
  TORCH_CHECK(gate_up_in.dim() >= 1 && gate_up_in.size(-1) % 2 == 0, "silu_mul: an even last dimension");
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t H = gate_up.size(-1) / 2;
  auto shape = gate_up.sizes().vec();
  shape.back() = H;
  at::Tensor out = at::empty(shape, gate_up.options());
  const int64_t R = H ? out.numel() / H : 0;
  if (dtype == at::kFloat) {
    silu_mul_rows(gate_up.data_ptr<float>(), out.data_ptr<float>(), R, H);
  } else {
    silu_mul_rows(gate_up.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), R, H);
  }
  return out;
}

template <typename T>
void rope_rows(const at::Tensor& x, const float* cos, const float* sin, bool cos_per_batch, float* out) {
  const int64_t B = x.size(0), T_ = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  const T* xs = x.data_ptr<T>();
  at::parallel_for(0, B * T_, rows_per_task(H * D), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / T_, t = p % T_;
      const float* c = cos + ((cos_per_batch ? b * T_ : 0) + t) * D;
      const float* s = sin + ((cos_per_batch ? b * T_ : 0) + t) * D;
      for (int64_t h = 0; h < H; ++h) {
        const T* x1 = xs + b * sb + t * st + h * sh;
        const T* x2 = x1 + half;
        float* y = out + (p * H + h) * D;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {  // x * cos + cat(-x2, x1) * sin, as in model.apply_rope
          const __m256 a = load8(x1 + i), b2 = load8(x2 + i);
          _mm256_storeu_ps(y + i, _mm256_sub_ps(_mm256_mul_ps(a, load8(c + i)), _mm256_mul_ps(b2, load8(s + i))));
          _mm256_storeu_ps(y + half + i, _mm256_add_ps(_mm256_mul_ps(b2, load8(c + half + i)), _mm256_mul_ps(a, load8(s + half + i))));
        }
        for (; i < half; ++i) {
          const float a = static_cast<float>(x1[i]), b2 = static_cast<float>(x2[i]);
          y[i] = a * c[i] - b2 * s[i];
          y[half + i] = b2 * c[half + i] + a * s[half + i];
        }
      }
    }
  });
}

// x [B, T, H, D] (float32 or bfloat16; any strides but the last), cos and sin [B or 1, T, 1, D] float32 ->
// rotate-half RoPE, float32 [B, T, H, D].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "rope: x [B, T, H, D], contiguous along an even D");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.device().is_cpu(),
              "rope: float32 or bfloat16 CPU tensor");
  TORCH_CHECK(cos_in.scalar_type() == at::kFloat && sin_in.scalar_type() == at::kFloat && cos_in.sizes() == sin_in.sizes(),
              "rope: float32 cos and sin of one shape");
  TORCH_CHECK(cos_in.dim() == 4 && (cos_in.size(0) == x.size(0) || cos_in.size(0) == 1) && cos_in.size(1) == x.size(1) &&
              cos_in.size(2) == 1 && cos_in.size(3) == x.size(3), "rope: cos and sin [B or 1, T, 1, D]");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const bool per_batch = cos.size(0) != 1;
  if (x.scalar_type() == at::kFloat) {
    rope_rows<float>(x, cos.data_ptr<float>(), sin.data_ptr<float>(), per_batch, out.data_ptr<float>());
  } else {
    rope_rows<c10::BFloat16>(x, cos.data_ptr<float>(), sin.data_ptr<float>(), per_batch, out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptchat, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptchat, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope", &rope);
}
