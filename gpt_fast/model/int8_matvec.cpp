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

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;   // inputs per activation scale
constexpr int64_t kChunk = 64;   // bytes per vector: two blocks

struct QuantizedRow {
  std::vector<uint8_t> magnitude;  // |round(x / scale)|, K bytes
  std::vector<__mmask64> negative;  // per chunk: which of its 64 inputs are negative
  std::vector<float> lane_scales;   // per chunk: 16 lanes, the first 8 of block 2c's scale, the last 8 of 2c+1's
};

QuantizedRow quantize_row(const float* x, int64_t k) {
  QuantizedRow row{std::vector<uint8_t>(k), std::vector<__mmask64>(k / kChunk), std::vector<float>(k / kChunk * 16)};
  for (int64_t b = 0; b < k / kBlock; ++b) {
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[b * kBlock + i]));
    const float scale = amax / 127.f;
    const float inverse = scale > 0.f ? 1.f / scale : 0.f;
    for (int64_t i = 0; i < kBlock; ++i) {
      const int64_t j = b * kBlock + i;
      const int q = static_cast<int>(std::nearbyint(x[j] * inverse));
      row.magnitude[j] = static_cast<uint8_t>(std::abs(q));
      if (q < 0) row.negative[j / kChunk] |= __mmask64{1} << (j % kChunk);
    }
    for (int64_t lane = 0; lane < 8; ++lane) row.lane_scales[(b / 2) * 16 + (b % 2) * 8 + lane] = scale;
  }
  return row;
}

float dot(const QuantizedRow& row, const int8_t* w, int64_t k) {
  __m512 acc = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < k / kChunk; ++c) {
    const __m512i weights = _mm512_loadu_si512(w + c * kChunk);
    const __m512i signed_weights = _mm512_mask_sub_epi8(weights, row.negative[c], zero, weights);
    const __m512i magnitude = _mm512_loadu_si512(row.magnitude.data() + c * kChunk);
    const __m512i sums = _mm512_dpbusd_epi32(zero, magnitude, signed_weights);  // 16 sums of 4 products
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(row.lane_scales.data() + c * 16), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % kChunk == 0,
              "int8_matvec: x [M, K], w [N, K], K a multiple of 64");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_matvec: w must be contiguous int8");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  std::vector<QuantizedRow> rows;
  for (int64_t r = 0; r < m; ++r) rows.push_back(quantize_row(x32.data_ptr<float>() + r * k, k));
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = s32.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t r = 0; r < m; ++r) yp[r * n + j] = dot(rows[r], wp + j * k, k) * sp[j];
    }
  });
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(gpt_fast, m) {
  m.def("int8_matvec(Tensor x, Tensor w, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_fast, CPU, m) {
  m.impl("int8_matvec", &int8_matvec);
}
