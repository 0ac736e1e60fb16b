// y = x @ w.T for int4 weights in groups (w = (code - 8) * scale + zero per 32 inputs), any number of rows of x:
// the CPU int4 matmul, with llama.cpp's recipe for Q4_1 (activations rounded to int8 in blocks of 32).
//
// Per block, x . w ~ d * (scale * (sum(q * code) - 8 * sum(q)) + zero * sum(q)), where x ~ q * d: the codes
// (0..15, unsigned) times the activations' int8 codes (signed) are vpdpbusd's products, 64 per instruction, and
// the error is the activations' rounding times the weights themselves (an all-zero group, stored as code 0,
// scale 1 and zero 8, adds exactly nothing). The float work per block is what bounds such a loop, so the weights
// are laid out in superblocks of 16 blocks (512 inputs) where lane l of every vector belongs to block l: 8
// vpdpbusd sum each block's 32 products in its own int32 lane, and one convert and three multiply-adds per
// superblock (not per vector) apply the scales.
// Inputs past the last whole superblock (K % 512, in chunks of 64) keep the plain order, two blocks a vector.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include "int8_activations.h"
#include "row_passes.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using gpt_fast::kBlock;
constexpr int64_t kSuper = 512;   // inputs per superblock: 16 blocks, one per lane
constexpr int64_t kChunk = 64;    // inputs per vector

// One activation row laid out like the weights: in a superblock, vector t's lane l holds the 4 inputs
// [32 l + 4 t, 32 l + 4 t + 4), i.e. inputs 4 t.. of block l; the remaining chunks in their plain order.
struct ActivationRow {
  std::vector<int8_t> q;
  std::vector<float> scales, sums, centers;  // per block: d, d * sum(q) (~ sum(x)), 8 * d * sum(q)
  // Per remaining chunk, 16 lanes (8 a block): d, d * sum(q), d * sum(q) / 8.
  std::vector<float> chunk_scales, chunk_centers, chunk_eighths;

  void assign(const at::BFloat16* x, int64_t k) {  // reuses the vectors' memory from call to call
    const int64_t blocks = k / kBlock, super_blocks = k / kSuper * (kSuper / kBlock);
    const int64_t chunks = (k % kSuper) / kChunk;
    q.resize(k);
    scales.resize(blocks);
    sums.resize(blocks);
    centers.resize(blocks);
    chunk_scales.resize(chunks * 16);
    chunk_centers.resize(chunks * 16);
    chunk_eighths.resize(chunks * 16);
    int8_t codes[kBlock];
    for (int64_t b = 0; b < blocks; ++b) {
      const bool in_super = b < super_blocks;
      int8_t* dst = in_super ? codes : &q[b * kBlock];
      const gpt_fast::RoundedBlock block = gpt_fast::round_block(x + b * kBlock, dst);
      scales[b] = block.scale;
      const float sum = block.scale * static_cast<float>(block.q_sum);
      sums[b] = sum;
      centers[b] = 8.f * sum;
      if (in_super) {  // scatter the block's 8 groups of 4 codes to lane l = b % 16 of vectors t = 0..7
        int8_t* super = &q[b / 16 * kSuper];
        for (int t = 0; t < 8; ++t) std::memcpy(super + (t * 16 + b % 16) * 4, codes + 4 * t, 4);
      } else {
        const int64_t lanes = (b - super_blocks) * 8;  // the block's 8 lanes of its chunk
        std::fill_n(&chunk_scales[lanes], 8, block.scale);
        std::fill_n(&chunk_centers[lanes], 8, sum);
        std::fill_n(&chunk_eighths[lanes], 8, sum / 8.f);
      }
    }
  }
};

// p[0] in lanes 0-7 and p[1] in lanes 8-15, as fp32: the pair broadcast as one 32-bit word holds p[1] in the high
// half of every lane already, and p[0] shifted up to it in the first 8.
inline __m512 lanes_of_pair(const at::BFloat16* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof pair);
  const __m512i word = _mm512_set1_epi32(pair);
  const __m512i high = _mm512_and_si512(word, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u)));
  return _mm512_castsi512_ps(_mm512_mask_slli_epi32(high, 0x00ff, word, 16));
}

// y[r0 + r, j] for r < M and begin <= j < end, every weight chunk loaded and unpacked once for the M rows.
template <int M>
void rows_pass(const ActivationRow* rows, const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
               at::BFloat16* y, int64_t n, int64_t k, int64_t r0, int64_t begin, int64_t end) {
  // Up to 4 rows, two int32 sums a row (one for the low nibbles, one for the high): one row's 8 vpdpbusd of a
  // superblock would otherwise wait on each other.
  constexpr int kSets = M <= 4 ? 2 : 1;
  const int64_t blocks = k / kBlock, supers = k / kSuper, chunks = (k % kSuper) / kChunk;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* wj = w + j * (k / 2);
    const at::BFloat16 *sj = scales + j * blocks, *zj = zeros + j * blocks;
    __m512 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t s = 0; s < supers; ++s) {
      __m512i dots[kSets][M];
      for (int set = 0; set < kSets; ++set)
        for (int r = 0; r < M; ++r) dots[set][r] = _mm512_setzero_si512();
      for (int u = 0; u < 4; ++u) {  // 64 bytes: vector 2u in the low nibbles, 2u + 1 in the high
        const __m512i packed = _mm512_loadu_si512(wj + s * kSuper / 2 + u * 64);
        const __m512i low = _mm512_and_si512(packed, nibble);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        for (int r = 0; r < M; ++r) {
          const int8_t* q = &rows[r].q[s * kSuper + u * 128];
          dots[0][r] = _mm512_dpbusd_epi32(dots[0][r], low, _mm512_loadu_si512(q));
          dots[kSets - 1][r] = _mm512_dpbusd_epi32(dots[kSets - 1][r], high, _mm512_loadu_si512(q + 64));
        }
      }
      const __m512 scale = gpt_fast::load_bf16(sj + s * 16), zero = gpt_fast::load_bf16(zj + s * 16);
      for (int r = 0; r < M; ++r) {
        const __m512i dot = kSets == 2 ? _mm512_add_epi32(dots[0][r], dots[kSets - 1][r]) : dots[0][r];
        const ActivationRow& row = rows[r];
        const __m512 codes_dot = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(&row.scales[s * 16]),
                                                 _mm512_loadu_ps(&row.centers[s * 16]));
        acc[r] = _mm512_fmadd_ps(scale, codes_dot, acc[r]);
        acc[r] = _mm512_fmadd_ps(zero, _mm512_loadu_ps(&row.sums[s * 16]), acc[r]);
      }
    }
    for (int64_t c = 0; c < chunks; ++c) {  // 32 bytes: the chunk's first 32 inputs in the low nibbles
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + supers * kSuper / 2 + c * 32));
      const __m512i codes = _mm512_and_si512(
          _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1), nibble);
      const int64_t b = supers * 16 + 2 * c;
      const __m512 scale = lanes_of_pair(sj + b), zero = lanes_of_pair(zj + b);
      for (int r = 0; r < M; ++r) {
        const ActivationRow& row = rows[r];
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes,
                                                _mm512_loadu_si512(&row.q[supers * kSuper + c * kChunk]));
        // A block's 8 lanes each take d * sum(q) once (8 times in all) and add an eighth of zero * d * sum(q).
        const __m512 codes_dot = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(&row.chunk_scales[c * 16]),
                                                 _mm512_loadu_ps(&row.chunk_centers[c * 16]));
        acc[r] = _mm512_fmadd_ps(scale, codes_dot, acc[r]);
        acc[r] = _mm512_fmadd_ps(zero, _mm512_loadu_ps(&row.chunk_eighths[c * 16]), acc[r]);
      }
    }
    float sums[M];
    gpt_fast::lane_sums<M>(acc, sums);
    for (int r = 0; r < M; ++r) y[(r0 + r) * n + j] = static_cast<at::BFloat16>(sums[r]);
  }
}

using RowsPass = void (*)(const ActivationRow*, const uint8_t*, const at::BFloat16*, const at::BFloat16*,
                          at::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t);
constexpr RowsPass kRowsPass[gpt_fast::kPassRows] = {rows_pass<1>, rows_pass<2>, rows_pass<3>, rows_pass<4>,
                                                     rows_pass<5>, rows_pass<6>, rows_pass<7>, rows_pass<8>};

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % kChunk == 0 && x.scalar_type() == at::kBFloat16,
              "int4_matmul: x must be bf16 [M, K] with K a multiple of 64");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.size(1) * 2 == k && w.scalar_type() == at::kByte && w.is_contiguous(),
              "int4_matmul: w must be contiguous uint8 [N, K / 2]");
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) * kBlock == k && t->is_contiguous() &&
                    t->scalar_type() == at::kBFloat16,
                "int4_matmul: scales and zeros must be contiguous bf16 [N, K / 32]");
  const ActivationRow* rows = gpt_fast::rounded_rows<ActivationRow>(x.contiguous());
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::BFloat16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  gpt_fast::for_row_passes(m, n, [&](int64_t r0, int64_t count, int64_t begin, int64_t end) {
    kRowsPass[count - 1](rows + r0, wp, sp, zp, yp, n, k, r0, begin, end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt_fast, m) {
  m.def("int4_matmul(Tensor x, Tensor w, Tensor scales, Tensor zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_fast, CPU, m) {
  m.impl("int4_matmul", &int4_matmul);
}
