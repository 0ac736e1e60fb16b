// Activations rounded to int8 in blocks of 32 values, one fp32 scale per block (llama.cpp's Q8_0 / Q8_1): the
// signed side of the int8 and int4 kernels' vpdpbusd products.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

namespace gpt_fast {

constexpr int64_t kBlock = 32;  // values per activation scale

inline __m512 load_bf16(const at::BFloat16* p) {  // 16 bf16 -> 16 fp32 (a bf16 is the high half of an fp32)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

struct RoundedBlock {
  float scale;     // x ~ q * scale
  int32_t q_sum;   // the sum of the 32 codes
};

// Rounds x[0, 32) to q[0, 32): to nearest even, as std::nearbyint, within [-127, 127] so the saturating packs
// never clip.
inline RoundedBlock round_block(const at::BFloat16* x, int8_t* q) {
  const __m512 lo = load_bf16(x), hi = load_bf16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
  const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qhi));
  return {amax / 127.f, _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi))};
}

}  // namespace gpt_fast
