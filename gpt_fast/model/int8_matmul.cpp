// y = x @ (w * scales).T: the CPU int8 matmul, with llama.cpp's recipe for Q8_0.
//
// Each row of x is quantized to int8 in blocks of 32 (one fp32 scale per block), so a weight row's dot product
// is 64 int8 products per AVX-512 VNNI instruction (vpdpbusd) instead of 16 float multiply-adds after converting
// every weight: the loop then streams int8 weights at memory speed, for up to 8 rows in one pass over them, and
// a prefill's passes take the weights tile by tile, from cache.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include "int8_activations.h"
#include "row_passes.h"

#include <vector>

namespace {

using gpt_fast::kBlock;
constexpr int64_t kChunk = 64;  // bytes per vector: two blocks

// One activation row, rounded to int8 in blocks of 32: x ~ q * scale per block. In vectors, so 64-byte aligned:
// the loop's loads of them would otherwise each touch two cache lines.
struct QuantizedRow {
  std::vector<__m512i> q;            // per chunk: its 64 codes
  std::vector<__m512> lane_scales;   // per chunk: 16 lanes, the first 8 its first block's scale, 8 the second's
  float offset = 0.f;                // 128 * sum of q * scale: what the weights' +128 (rows_pass) adds to a product

  void assign(const at::BFloat16* x, int64_t k) {  // reuses the vectors' memory from call to call
    q.resize(k / kChunk);
    lane_scales.resize(k / kChunk);
    offset = 0.f;
    int8_t* codes = reinterpret_cast<int8_t*>(q.data());
    for (int64_t c = 0; c < k / kChunk; ++c) {
      const int64_t at = c * kChunk;
      const gpt_fast::RoundedBlock first = gpt_fast::round_block(x + at, codes + at);
      const gpt_fast::RoundedBlock second = gpt_fast::round_block(x + at + kBlock, codes + at + kBlock);
      lane_scales[c] = _mm512_insertf32x8(_mm512_set1_ps(first.scale), _mm256_set1_ps(second.scale), 1);
      offset += 128.f * static_cast<float>(first.q_sum) * first.scale;
      offset += 128.f * static_cast<float>(second.q_sum) * second.scale;
    }
  }
};

// y[r0 + r, j] for r < M and begin <= j < end: each weight row's dot products with M activation rows in one pass,
// its 64-weight chunks loaded once for all of them. vpdpbusd multiplies unsigned by signed bytes: the weights,
// flipped to unsigned (w + 128, one xor), are the unsigned side and each row's offset takes the +128 back out.
template <int M>
void rows_pass(const QuantizedRow* rows, const int8_t* w, const at::BFloat16* scales, at::BFloat16* y, int64_t n,
               int64_t k, int64_t r0, int64_t begin, int64_t end) {
  // Below 4 rows, two accumulators a row (even and odd chunks): one row's multiply-adds would otherwise wait on
  // each other, bound by their latency instead of memory on one thread.
  constexpr int kSets = M < 4 ? 2 : 1;
  const __m512i zero = _mm512_setzero_si512(), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t chunks = k / kChunk;
  for (int64_t j = begin; j < end; ++j) {
    const int8_t* wj = w + j * k;
    __m512 acc[kSets][M];
    for (int s = 0; s < kSets; ++s)
      for (int r = 0; r < M; ++r) acc[s][r] = _mm512_setzero_ps();
    auto add_chunk = [&](int64_t c, __m512* sum) {
      const __m512i weights = _mm512_xor_si512(_mm512_loadu_si512(wj + c * kChunk), flip);
      for (int r = 0; r < M; ++r) {
        const __m512i dots = _mm512_dpbusd_epi32(zero, weights, rows[r].q[c]);
        sum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), rows[r].lane_scales[c], sum[r]);
      }
    };
    int64_t c = 0;
    for (; c + kSets <= chunks; c += kSets)
      for (int s = 0; s < kSets; ++s) add_chunk(c + s, acc[s]);
    for (; c < chunks; ++c) add_chunk(c, acc[0]);
    for (int s = 1; s < kSets; ++s)
      for (int r = 0; r < M; ++r) acc[0][r] = _mm512_add_ps(acc[0][r], acc[s][r]);
    float dots[M];
    gpt_fast::lane_sums<M>(acc[0], dots);
    for (int r = 0; r < M; ++r)
      y[(r0 + r) * n + j] = static_cast<at::BFloat16>((dots[r] - rows[r].offset) * static_cast<float>(scales[j]));
  }
}

using RowsPass = void (*)(const QuantizedRow*, const int8_t*, const at::BFloat16*, at::BFloat16*, int64_t, int64_t,
                          int64_t, int64_t, int64_t);
constexpr RowsPass kRowsPass[gpt_fast::kPassRows] = {rows_pass<1>, rows_pass<2>, rows_pass<3>, rows_pass<4>,
                                                     rows_pass<5>, rows_pass<6>, rows_pass<7>, rows_pass<8>};

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % kChunk == 0,
              "int8_matmul: x [M, K], w [N, K] with K a multiple of 64");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && scales.scalar_type() == at::kBFloat16,
              "int8_matmul: x and scales must be bf16");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_matmul: w must be contiguous int8");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  const at::Tensor xc = x.contiguous(), sc = scales.contiguous();
  const QuantizedRow* rows = gpt_fast::rounded_rows<QuantizedRow>(xc);
  at::Tensor y = at::empty({m, n}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  gpt_fast::for_row_passes(m, n, [&](int64_t r0, int64_t count, int64_t begin, int64_t end) {
    kRowsPass[count - 1](rows + r0, wp, sp, yp, n, k, r0, begin, end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gpt_fast, m) {
  m.def("int8_matmul(Tensor x, Tensor w, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_fast, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
}
