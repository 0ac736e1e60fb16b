// How the kernels walk a matmul y [M, N] = x [M, K] @ w.T: each thread takes a range of weight rows, tile by tile,
// and each tile meets the activation rows in passes of up to 8 (their accumulators stay in registers), so a
// prefill's many passes read a tile from cache; lane_sums finishes each weight row's dot products.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace gpt_fast {

constexpr int64_t kPassRows = 8;  // activation rows per pass over the weights
constexpr int64_t kTile = 64;     // weight rows per tile

// pass(r0, rows, begin, end) computes y[r0, r0 + rows) x [begin, end), rows <= kPassRows.
template <typename Pass>
void for_row_passes(int64_t m, int64_t n, const Pass& pass) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; tile += kTile)
      for (int64_t r0 = 0; r0 < m; r0 += kPassRows)
        pass(r0, std::min(kPassRows, m - r0), tile, std::min(end, tile + kTile));
  });
}

// The sums of the 16 lanes of up to 8 accumulators, for the last step per weight row: one reduction a row is ~8
// shuffles and adds, a tree over 8 rows at once ~20 in all.
// sums[r] = the sum of acc[r]'s lanes, r < M <= 8.
template <int M>
inline void lane_sums(const __m512* acc, float* sums) {
  static_assert(M >= 1 && M <= 8);
  if constexpr (M <= 2) {
    for (int r = 0; r < M; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
  } else {
    __m512 v[8];
    for (int r = 0; r < 8; ++r) v[r] = r < M ? acc[r] : _mm512_setzero_ps();
    // Halves of rows (2i, 2i + 1): w[i] = 8 partial sums of row 2i, then 8 of row 2i + 1.
    __m512 w[4];
    for (int i = 0; i < 4; ++i)
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
    // Quarters: u[i]'s 128-bit lane k = 4 partial sums of row 4i + k.
    __m512 u[2];
    for (int i = 0; i < 2; ++i)
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xdd));
    // Within each 128-bit lane, rows of u[0] and u[1] interleaved, then the last two partial sums added.
    const __m512 pairs = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    const __m512 total = _mm512_add_ps(pairs, _mm512_shuffle_ps(pairs, pairs, 0x4e));
    // 128-bit lane k now holds the sums [row k, row 4 + k, row k, row 4 + k].
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, total);
    constexpr int kLane[8] = {0, 4, 8, 12, 1, 5, 9, 13};
    for (int r = 0; r < M; ++r) sums[r] = lanes[kLane[r]];
  }
}

}  // namespace gpt_fast
