// Activations rounded to int8 in blocks of 32 values, one fp32 scale per block (llama.cpp's Q8_0 / Q8_1): the
// signed side of the int8 and int4 kernels' vpdpbusd products.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

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

// x's rows in Row's layout (Row::assign(row, k)): a prefill's rows in parallel, a decode step's inline. The
// calling thread keeps them from call to call (a decode step makes ~150-200 calls) and owns them until its next.
template <typename Row>
const Row* rounded_rows(const at::Tensor& x) {
  static thread_local std::vector<Row> rows;
  const int64_t m = x.size(0), k = x.size(1);
  if (static_cast<int64_t>(rows.size()) < m) rows.resize(m);
  Row* out = rows.data();  // by pointer: inside the parallel region `rows` would name each worker's own vector
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r].assign(xp + r * k, k);
  });
  return out;
}

}  // namespace gpt_fast
