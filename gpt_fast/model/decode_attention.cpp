// Attention of a few query rows per sequence over the KV cache: the CPU decode attention.
//
// Compiled, the written-out attention (transformer.explicit_attention) became one inductor kernel a layer whose
// parallel loops and `omp single` sections met at ~10 barriers, plus ~14 scratch buffers the graph's Python
// allocated: ~20 us a SmolLM2 layer at any cache length up to a few hundred positions. Here each kv head's query
// rows (the GQA group times the step's tokens) are one task: ~7 us a SmolLM2 layer over 192 cached positions in
// cache, 12-14 us with the cache read from memory as in a step. The rounding is explicit_attention's: logits to
// bf16 before the scale, probabilities to bf16 before they weigh the values, the output to bf16; sums and the
// softmax in fp32 (the outputs are equal but for ~1 in 10^4 elements that differ by one bf16 step).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "row_passes.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kKeys = 8;        // keys per pass of a row's dot products (lane_sums' 8 accumulators)
constexpr int64_t kTaskWork = 256;  // query rows x keys below which the tasks are not worth a second thread

// e^x for 16 lanes, x <= 0 (-inf gives 0): 2^n * e^r with |r| <= ln2 / 2, a degree-6 polynomial (~1 ulp).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // below it e^x is 0 in fp32
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), x));
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// fp32 lanes rounded to bf16 (to nearest even) and back: where explicit_attention's tensors are bf16.
__attribute__((target("avx512bf16"))) inline __m512 round_bf16(__m512 v) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << std::min<int64_t>(n, 16)) - 1); }

// The cache is read from memory (a step's weights have evicted it): the first row's pass over the keys fetches
// the keys kPrefetchKeys ahead, and the values it will weigh later.
constexpr int64_t kPrefetchKeys = 16;
inline void prefetch(const at::BFloat16* keys, const at::BFloat16* values, int64_t key_stride, int64_t d,
                     int64_t begin, int64_t end, int64_t n_keys) {
  for (int64_t s = begin; s < end; ++s)
    for (int64_t c = 0; c < d; c += 32) {
      if (s + kPrefetchKeys < n_keys)
        _mm_prefetch(reinterpret_cast<const char*>(keys + (s + kPrefetchKeys) * key_stride + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(values + s * key_stride + c), _MM_HINT_T1);
    }
}

// Row i's logits li[0, n_keys): bf16 products summed in fp32 (vdpbf16ps) 8 keys at a time, rounded to bf16 and
// scaled, -inf where the mask is false.
__attribute__((target("avx512bf16"))) void logits(const at::BFloat16* qi, const at::BFloat16* keys,
                                                  const at::BFloat16* values, int64_t key_stride, const bool* mi,
                                                  int64_t n_keys, int64_t d, float scale, bool first_row,
                                                  float* li) {
  const __m512 scales = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t s0 = 0; s0 < n_keys; s0 += kKeys) {
    const int64_t count = std::min(kKeys, n_keys - s0);
    if (first_row) prefetch(keys, values, key_stride, d, s0, s0 + count, n_keys);
    __m512 acc[kKeys];
    for (int64_t s = 0; s < kKeys; ++s) acc[s] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 32) {
      const __m512bh qc = (__m512bh)_mm512_loadu_si512(qi + c);
      for (int64_t s = 0; s < count; ++s)
        acc[s] = _mm512_dpbf16_ps(acc[s], qc, (__m512bh)_mm512_loadu_si512(keys + (s0 + s) * key_stride + c));
    }
    alignas(64) float dots[16] = {};
    gpt_fast::lane_sums<kKeys>(acc, dots);
    const __mmask16 lanes = first_lanes(count);
    const __m512i attend = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, mi + s0));
    const __m512 v = _mm512_mul_ps(round_bf16(_mm512_load_ps(dots)), scales);
    _mm512_mask_storeu_ps(li + s0, lanes,
                          _mm512_mask_blend_ps(_mm512_test_epi32_mask(attend, attend), minus_inf, v));
  }
}

// li = softmax(li) in fp32, each probability then rounded to bf16 (explicit_attention's .to(values.dtype)).
__attribute__((target("avx512bf16"))) void softmax_rounded(float* li, int64_t n_keys) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t s = 0; s < n_keys; s += 16)
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first_lanes(n_keys - s), li + s));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < n_keys; s += 16) {
    const __mmask16 lanes = first_lanes(n_keys - s);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, li + s), shift)));
    _mm512_mask_storeu_ps(li + s, lanes, e);
    total = _mm512_add_ps(total, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t s = 0; s < n_keys; s += 16) {
    const __mmask16 lanes = first_lanes(n_keys - s);
    _mm512_mask_storeu_ps(li + s, lanes, round_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, li + s), inverse)));
  }
}

// out rows = probabilities x values, fp32 sums, up to 4 rows x 64 dims at a time. A vector of 32 bf16 values
// splits into its even and odd dims as fp32 with one shift and one and; the sums are interleaved back at the end.
void weighted_values(const float* probs, const at::BFloat16* values, int64_t key_stride, int64_t n_rows,
                     int64_t n_keys, int64_t d, at::BFloat16* out, const std::vector<int64_t>& out_rows) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t c = 0; c < d; c += 64) {
    const int64_t halves = std::min<int64_t>(64, d - c) / 32;  // vectors of 32 dims: 2, or 1 at the end of d
    for (int64_t i0 = 0; i0 < n_rows; i0 += 4) {
      const int64_t count = std::min<int64_t>(4, n_rows - i0);
      __m512 acc[4][4];  // [row][2 * half + parity]
      for (int64_t i = 0; i < 4; ++i)
        for (int64_t v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
      for (int64_t s = 0; s < n_keys; ++s) {
        __m512 value[4];
        for (int64_t h = 0; h < halves; ++h) {
          const __m512i pairs = _mm512_loadu_si512(values + s * key_stride + c + 32 * h);
          value[2 * h] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
          value[2 * h + 1] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
        }
        for (int64_t i = 0; i < count; ++i) {
          const __m512 p = _mm512_set1_ps(probs[(i0 + i) * n_keys + s]);
          for (int64_t v = 0; v < 2 * halves; ++v) acc[i][v] = _mm512_fmadd_ps(p, value[v], acc[i][v]);
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        alignas(64) float sums[4][16];
        for (int64_t v = 0; v < 2 * halves; ++v) _mm512_store_ps(sums[v], acc[i][v]);
        at::BFloat16* o = out + out_rows[i0 + i] + c;
        for (int64_t h = 0; h < halves; ++h)
          for (int64_t j = 0; j < 16; ++j) {
            o[32 * h + 2 * j] = static_cast<at::BFloat16>(sums[2 * h][j]);
            o[32 * h + 2 * j + 1] = static_cast<at::BFloat16>(sums[2 * h + 1][j]);
          }
      }
    }
  }
}

// One kv head's attention for its query rows: row i is token i % seqlen of the group's query head i / seqlen,
// at rows[i] in q and out_rows[i] in out.
void kv_head(const at::BFloat16* q, const at::BFloat16* keys, const at::BFloat16* values, int64_t key_stride,
             const bool* mask, int64_t mask_t, int64_t seqlen, const std::vector<int64_t>& rows, at::BFloat16* out,
             const std::vector<int64_t>& out_rows, int64_t n_keys, int64_t d, float scale, std::vector<float>& probs) {
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  probs.resize(n_rows * n_keys);
  for (int64_t s = 0; s < std::min(kPrefetchKeys, n_keys); ++s)
    for (int64_t c = 0; c < d; c += 32)
      _mm_prefetch(reinterpret_cast<const char*>(keys + s * key_stride + c), _MM_HINT_T0);
  for (int64_t i = 0; i < n_rows; ++i) {
    float* li = probs.data() + i * n_keys;
    logits(q + rows[i], keys, values, key_stride, mask + i % seqlen * mask_t, n_keys, d, scale, i == 0, li);
    softmax_rounded(li, n_keys);
  }
  weighted_values(probs.data(), values, key_stride, n_rows, n_keys, d, out, out_rows);
}

// q [B, H, T, D], keys and values [B, Hkv, S, D], mask [B, 1, T, S] (bool: attend) -> [B, H, T, D]; H a multiple
// of Hkv (query head h reads kv head h / (H / Hkv)), D a multiple of 32, the last dimension of each contiguous.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes() && mask.dim() == 4,
              "decode_attention: q [B, H, T, D], keys and values [B, Hkv, S, D], mask [B, 1, T, S]");
  const int64_t bsz = q.size(0), n_head = q.size(1), seqlen = q.size(2), d = q.size(3);
  const int64_t n_kv = keys.size(1), n_keys = keys.size(2);
  TORCH_CHECK(keys.size(0) == bsz && keys.size(3) == d && n_head % n_kv == 0 && d % 32 == 0,
              "decode_attention: keys must match q's batch and head size (a multiple of 32) and divide its heads");
  TORCH_CHECK(mask.size(0) == bsz && mask.size(1) == 1 && mask.size(2) == seqlen && mask.size(3) == n_keys &&
                  mask.scalar_type() == at::kBool,
              "decode_attention: mask must be bool [B, 1, T, S]");
  for (const at::Tensor* t : {&q, &keys, &values})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->stride(3) == 1,
                "decode_attention: q, keys and values must be bf16 with a contiguous last dimension");
  TORCH_CHECK(keys.strides() == values.strides(), "decode_attention: keys and values must have the same strides");
  const at::Tensor m = mask.stride(3) == 1 ? mask : mask.contiguous();
  at::Tensor out = at::empty({bsz, n_head, seqlen, d}, q.options());
  const int64_t group = n_head / n_kv;
  const at::BFloat16 *qp = q.data_ptr<at::BFloat16>(), *kp = keys.data_ptr<at::BFloat16>(),
                     *vp = values.data_ptr<at::BFloat16>();
  const bool* mp = m.data_ptr<bool>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t tasks = bsz * n_kv, rows_per_task = group * seqlen;
  const int64_t grain = std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, rows_per_task * n_keys));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(rows_per_task), out_rows(rows_per_task);
    std::vector<float> probs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_kv, g = task % n_kv;
      for (int64_t h = 0; h < group; ++h)
        for (int64_t t = 0; t < seqlen; ++t) {
          const int64_t i = h * seqlen + t, head = g * group + h;
          rows[i] = b * q.stride(0) + head * q.stride(1) + t * q.stride(2);
          out_rows[i] = ((b * n_head + head) * seqlen + t) * d;
        }
      kv_head(qp, kp + b * keys.stride(0) + g * keys.stride(1), vp + b * keys.stride(0) + g * keys.stride(1),
              keys.stride(2), mp + b * m.stride(0), m.stride(2), seqlen, rows, op, out_rows, n_keys, d,
              static_cast<float>(scale), probs);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt_fast, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt_fast, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
