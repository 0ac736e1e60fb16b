// y = x @ w.T for a few bf16 rows of x: the CPU bf16 decode matmul.
//
// oneDNN streams a 576 x 1536 bf16 matrix at ~21 GB/s for 1-8 rows (2 threads, out of cache); inductor's fused
// reductions (model/matvec.py) do better up to 4 rows, then each row's convert, multiply and add bound the loop.
// Here AVX-512 BF16's vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 sums in one instruction, with
// no conversion, for up to 8 rows per pass over the weights: each 32-weight chunk is loaded once for all rows.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include "row_passes.h"

namespace {

constexpr int64_t kChunk = 32;     // bf16 per vector

// y[r0 + r, j] for r < M and begin <= j < end. Only these functions use AVX-512 BF16 instructions (the rest of
// the extension is built for AVX-512 VNNI CPUs, not all of which have BF16: cpu_kernels.py checks before calling).
template <int M>
__attribute__((target("avx512bf16"))) void rows_pass(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y,
                                                    int64_t n, int64_t k, int64_t r0, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const at::BFloat16* wj = w + j * k;
    __m512 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += kChunk) {
      const __m512bh weights = (__m512bh)_mm512_loadu_si512(wj + c);
      for (int r = 0; r < M; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(x + (r0 + r) * k + c), weights);
    }
    float sums[M];
    gpt_fast::lane_sums<M>(acc, sums);
    for (int r = 0; r < M; ++r) y[(r0 + r) * n + j] = static_cast<at::BFloat16>(sums[r]);
  }
}

using RowsPass = void (*)(const at::BFloat16*, const at::BFloat16*, at::BFloat16*, int64_t, int64_t, int64_t,
                          int64_t, int64_t);
constexpr RowsPass kRowsPass[gpt_fast::kPassRows] = {rows_pass<1>, rows_pass<2>, rows_pass<3>, rows_pass<4>,
                                                     rows_pass<5>, rows_pass<6>, rows_pass<7>, rows_pass<8>};

at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % kChunk == 0,
              "bf16_matvec: x [M, K], w [N, K] with K a multiple of 32");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "bf16_matvec: bf16 x, contiguous bf16 w");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  gpt_fast::for_row_passes(m, n, [&](int64_t r0, int64_t count, int64_t begin, int64_t end) {
    kRowsPass[count - 1](xp, wp, yp, n, k, r0, begin, end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt_fast, m) {
  m.def("bf16_matvec(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_fast, CPU, m) {
  m.impl("bf16_matvec", &bf16_matvec);
}
