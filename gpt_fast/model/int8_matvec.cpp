// y = x @ (w * scales).T for a few rows of x: the CPU int8 decode matmul, with llama.cpp's recipe for Q8_0.
//
// Each row of x is quantized to int8 in blocks of 32 (one fp32 scale per block), so a weight row's dot product
// is 64 int8 products per AVX-512 VNNI instruction (vpdpbusd) instead of 16 float multiply-adds after converting
// every weight: the loop then streams int8 weights at memory speed. vpdpbusd takes unsigned x signed bytes, so
// x's absolute value is the unsigned side and its sign is moved onto the weight (codes are within [-127, 127]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline __m512 load_bf16(const at::BFloat16* p) {  // 16 bf16 -> 16 fp32 (a bf16 is the high half of an fp32)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

constexpr int64_t kBlock = 32;   // inputs per activation scale
constexpr int64_t kChunk = 64;   // bytes per vector: two blocks

// One activation row, quantized to int8 in blocks of 32 and laid out for the loop: x ~ q * scale per block.
struct QuantizedRow {
  std::vector<uint8_t> magnitude;   // |q|
  std::vector<__mmask64> negative;  // per chunk: which of its 64 inputs are negative
  std::vector<float> lane_scales;   // per chunk: 16 lanes, the first 8 of its first block's scale, 8 of the second's

  void assign(const at::BFloat16* x, int64_t k) {  // reuses the vectors' memory from call to call
    magnitude.resize(k);
    negative.resize(k / kChunk);
    lane_scales.resize(k / kChunk * 16);
    for (int64_t c = 0; c < k / kChunk; ++c) {
      __m128i codes[4];  // the chunk's 64 codes, 16 at a time
      for (int64_t h = 0; h < 2; ++h) {  // its two blocks
        const __m512 lo = load_bf16(x + c * kChunk + h * kBlock), hi = load_bf16(x + c * kChunk + h * kBlock + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        // Rounded to nearest even, as std::nearbyint; within [-127, 127], so the saturating packs never clip.
        codes[2 * h] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse)));
        codes[2 * h + 1] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse)));
        std::fill_n(&lane_scales[c * 16 + h * 8], 8, amax / 127.f);
      }
      const __m512i q = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_set_m128i(codes[1], codes[0])), _mm256_set_m128i(codes[3], codes[2]), 1);
      _mm512_storeu_si512(&magnitude[c * kChunk], _mm512_abs_epi8(q));
      negative[c] = _mm512_movepi8_mask(q);
    }
  }

  float dot(const int8_t* w) const {
    __m512 acc = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (size_t c = 0; c < negative.size(); ++c) {
      const __m512i weights = _mm512_loadu_si512(w + c * kChunk);
      const __m512i signed_weights = _mm512_mask_sub_epi8(weights, negative[c], zero, weights);
      const __m512i sums = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(&magnitude[c * kChunk]), signed_weights);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(&lane_scales[c * 16]), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
};

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % kChunk == 0,
              "int8_matvec: x [M, K], w [N, K] with K a multiple of 64");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && scales.scalar_type() == at::kBFloat16,
              "int8_matvec: x and scales must be bf16");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_matvec: w must be contiguous int8");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  static thread_local std::vector<QuantizedRow> rows;  // the calling thread's, reused: a decode step makes ~200 calls
  if (static_cast<int64_t>(rows.size()) < m) rows.resize(m);
  for (int64_t r = 0; r < m; ++r) rows[r].assign(xc.data_ptr<at::BFloat16>() + r * k, k);
  at::Tensor y = at::empty({m, n}, x.options());
  const QuantizedRow* rp = rows.data();
  const int8_t* wp = w.data_ptr<int8_t>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t r = 0; r < m; ++r) yp[r * n + j] = rp[r].dot(wp + j * k) * static_cast<float>(sp[j]);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gpt_fast, m) {
  m.def("int8_matvec(Tensor x, Tensor w, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_fast, CPU, m) {
  m.impl("int8_matvec", &int8_matvec);
}
