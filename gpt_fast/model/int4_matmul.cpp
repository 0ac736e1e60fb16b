// y = x @ w.T for int4 weights in groups (w = (code - 8) * scale + zero per 32 inputs), any number of rows of x:
// the CPU int4 matmul, with llama.cpp's recipe for Q4_1 (activations rounded to int8 in blocks of 32).
//
// Per block, x . w ~ d * (scale * (sum(q * code) - 8 * sum(q)) + zero * sum(q)), where x ~ q * d: the codes
// (0..15, unsigned) times the activations' int8 codes (signed) are vpdpbusd's products, 64 per instruction, and
// the error is the activations' rounding times the weights themselves (an all-zero group, stored as code 0,
// scale 1 and zero 8, adds exactly nothing). The float work per block is what bounds such a loop, so the weights
// are laid out in superblocks of 16 blocks (512 inputs) where lane l of every vector belongs to block l: 8
// vpdpbusd sum each block's 32 products in its own int32 lane, and one convert and three multiply-adds per
// superblock (not per vector) apply the scales. What remains of K after the superblocks is cut into smaller parts
// of the same 16 lanes, a block taking 2, 4 or 8 of them (for_parts).
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

// A row's inputs are cut into parts of 16 lanes: superblocks of 16 blocks with one lane each (512 inputs), then
// what remains (K % 512, a multiple of 64) as at most one part each of 8 blocks x 2 lanes (256 inputs), 4 x 4 (128)
// and 2 x 8 (64). In a part of L lanes a block, vector t's lane l holds the 4 inputs at 4 * (t * L + l % L) of
// block l / L; each part ends with the same float work whatever its size.
template <typename Visit>
void for_parts(int64_t k, const Visit& visit) {  // visit(L, first block, part index)
  int64_t block = 0, part = 0;
  for (; block + 16 <= k / kBlock; block += 16) visit(1, block, part++);
  for (int lanes : {2, 4, 8})
    if (k / kBlock - block >= 16 / lanes) {
      visit(lanes, block, part++);
      block += 16 / lanes;
    }
}

// One activation row laid out like the weights, with the float terms of each part's 16 lanes. In vectors, so
// 64-byte aligned: the loop's loads of them would otherwise each touch two cache lines.
struct ActivationRow {
  std::vector<__m512i> q;  // the codes, 64 a vector
  // Per part, 16 lanes: d, 8 * d * sum(q) / L and d * sum(q) / L of the lane's block (its L lanes add up to them).
  std::vector<__m512> scales, centers, sums;

  const int8_t* codes(int64_t input) const { return reinterpret_cast<const int8_t*>(q.data()) + input; }

  void assign(const at::BFloat16* x, int64_t k) {  // reuses the vectors' memory from call to call
    q.resize(k / 64);
    int64_t parts = 0;
    for_parts(k, [&](int, int64_t, int64_t) { ++parts; });
    scales.resize(parts);
    centers.resize(parts);
    sums.resize(parts);
    int8_t* out = reinterpret_cast<int8_t*>(q.data());
    for_parts(k, [&](int lanes, int64_t first, int64_t part) {
      alignas(64) float lane_scales[16], lane_centers[16], lane_sums[16];
      int8_t rounded[kBlock];
      for (int64_t b = 0; b < 16 / lanes; ++b) {
        const gpt_fast::RoundedBlock block = gpt_fast::round_block(x + (first + b) * kBlock, rounded);
        const float sum = block.scale * static_cast<float>(block.q_sum) / lanes;
        for (int p = 0; p < lanes; ++p) {
          const int64_t lane = b * lanes + p;
          lane_scales[lane] = block.scale;
          lane_centers[lane] = 8.f * sum;
          lane_sums[lane] = sum;
          for (int t = 0; t < 8 / lanes; ++t)  // the block's 4 codes at 4 * (t * L + p), to vector t, lane `lane`
            std::memcpy(out + first * kBlock + (t * 16 + lane) * 4, rounded + 4 * (t * lanes + p), 4);
        }
      }
      scales[part] = _mm512_load_ps(lane_scales);
      centers[part] = _mm512_load_ps(lane_centers);
      sums[part] = _mm512_load_ps(lane_sums);
    });
  }
};

// The 16 / L values at p (one per block, bf16) as fp32 lanes, each in its block's L lanes.
template <int L>
inline __m512 block_lanes(const at::BFloat16* p) {
  if constexpr (L == 1) {
    return gpt_fast::load_bf16(p);
  } else {
    const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << (16 / L)) - 1), p);
    const __m512 values = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_permutexvar_ps(_mm512_srli_epi32(lane, L == 2 ? 1 : L == 4 ? 2 : 3), values);
  }
}

// acc[r] += one part's products for M rows: the part's 8 / L vectors of codes, unpacked once for all rows. Always
// inlined: called through for_parts' visitor, it was not, and spilling the accumulators cost ~30% at 8 rows.
template <int L, int M>
__attribute__((always_inline)) inline void add_part(const ActivationRow* rows, const uint8_t* codes,
                                                    const at::BFloat16* scales, const at::BFloat16* zeros,
                                                    int64_t first, int64_t part, __m512* acc) {
  // Two int32 sums a row (low and high nibbles) where rows are few and a part long: the vpdpbusd of one row would
  // otherwise wait on each other.
  constexpr int kSets = (M <= 4 && L <= 2) ? 2 : 1;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512i dots[kSets][M];
  for (int set = 0; set < kSets; ++set)
    for (int r = 0; r < M; ++r) dots[set][r] = _mm512_setzero_si512();
  const int64_t q0 = first * kBlock;
  if constexpr (L == 8) {  // 32 bytes: the vector's first 32 codes in the low nibbles, the last 32 in the high
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    const __m512i vector = _mm512_and_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1), nibble);
    for (int r = 0; r < M; ++r)
      dots[0][r] = _mm512_dpbusd_epi32(dots[0][r], vector, _mm512_load_si512(rows[r].codes(q0)));
  } else {
    for (int u = 0; u < 4 / L; ++u) {  // 64 bytes: vector 2u in the low nibbles, 2u + 1 in the high
      const __m512i packed = _mm512_loadu_si512(codes + u * 64);
      const __m512i low = _mm512_and_si512(packed, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      for (int r = 0; r < M; ++r) {
        const int8_t* q = rows[r].codes(q0 + u * 128);
        dots[0][r] = _mm512_dpbusd_epi32(dots[0][r], low, _mm512_load_si512(q));
        dots[kSets - 1][r] = _mm512_dpbusd_epi32(dots[kSets - 1][r], high, _mm512_load_si512(q + 64));
      }
    }
  }
  const __m512 scale = block_lanes<L>(scales + first), zero = block_lanes<L>(zeros + first);
  for (int r = 0; r < M; ++r) {
    const __m512i dot = kSets == 2 ? _mm512_add_epi32(dots[0][r], dots[kSets - 1][r]) : dots[0][r];
    const ActivationRow& row = rows[r];
    const __m512 codes_dot = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot), row.scales[part], row.centers[part]);
    acc[r] = _mm512_fmadd_ps(scale, codes_dot, acc[r]);
    acc[r] = _mm512_fmadd_ps(zero, row.sums[part], acc[r]);
  }
}

// y[r0 + r, j] for r < M and begin <= j < end, every weight part loaded and unpacked once for the M rows.
template <int M>
void rows_pass(const ActivationRow* rows, const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
               at::BFloat16* y, int64_t n, int64_t k, int64_t r0, int64_t begin, int64_t end) {
  const int64_t blocks = k / kBlock;
  // Rows ~4 KB ahead are prefetched: at one row the loop's work per byte is enough that the hardware's prefetch
  // alone kept 27-35 GB/s from memory (2 threads; 37-49 with this, where bf16's simpler loop streams ~50).
  const int64_t ahead = std::max<int64_t>(1, 4096 / (k / 2));
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* wj = w + j * (k / 2);
    const at::BFloat16 *sj = scales + j * blocks, *zj = zeros + j * blocks;
    if (j + ahead < n) {
      for (int64_t b = 0; b < k / 2; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wj + ahead * (k / 2) + b), _MM_HINT_T0);
      for (int64_t b = 0; b < blocks * 2; b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(sj + ahead * blocks) + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(zj + ahead * blocks) + b, _MM_HINT_T0);
      }
    }
    __m512 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
    for_parts(k, [&](int lanes, int64_t first, int64_t part) {
      const uint8_t* codes = wj + first * kBlock / 2;
      switch (lanes) {
        case 1: add_part<1, M>(rows, codes, sj, zj, first, part, acc); break;
        case 2: add_part<2, M>(rows, codes, sj, zj, first, part, acc); break;
        case 4: add_part<4, M>(rows, codes, sj, zj, first, part, acc); break;
        default: add_part<8, M>(rows, codes, sj, zj, first, part, acc);
      }
    });
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
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 64 == 0 && x.scalar_type() == at::kBFloat16,
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
