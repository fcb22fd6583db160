// The int8 KV cache (one scale per token and head): `qwen_q8::quantize_kv` writes it and
// `qwen_q8::decode_attention` reads it.
//
// Quantization is kv_layout.py's arithmetic in AVX512: scale = max|x| / 127, q = x * (1 / scale)
// rounded to nearest even; natively because a decode step quantizes 2 x layers tiny tensors,
// where torch's per-op overhead (~20 us a call) cost as much as the attention itself.
//
// One query token per row reads keys and values stored as int8 with float32 scales: half the
// bytes of bf16, and decode attention is memory bound. Arithmetic, all float32: scores are
// q . k_int8 (the integers converted exactly to float) times the key's scale and the softmax
// scale, plus the additive bias; softmax with the max trick; output sum_c p_c v_int8 * v_scale
// divided by sum_c p_c. Columns whose bias is -inf are never read in the value pass and their
// scores never reach the softmax, so anything (finite) may sit in them. A row with no visible
// column gives zeros.
//
// Work is split over (batch row, kv head) with at::parallel_for; each task serves the query
// heads sharing its kv head, so a key or value row is converted to float once per group.
// Columns go in blocks of 16: a block with no visible column is skipped without being read
// (right-aligned caches have left padding and unwritten spare columns), and the 16 dot
// products of a block are reduced together by a shuffle tree instead of one at a time.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

using qwen_simd::exp_nonpositive;
using qwen_simd::kLanes;
using qwen_simd::load16;
using qwen_simd::reduce16;

constexpr int64_t kMaxChunks = 16;    // head_dim up to 256
constexpr int kAccumulators = 16;     // value-pass registers: heads per pass * chunks <= 16

struct Problem {
  const float* queries;  // [B, H, D]
  const int8_t* keys;    // [B, KVH, C, D]
  const float* key_scales;
  const int8_t* values;
  const float* value_scales;
  const float* bias;  // [B, C]
  float* out;         // [B, H, D]
  int64_t heads;
  int64_t kv_heads;
  int64_t columns;
  float scale;
};

// One (row, kv head): the `group` query heads that read it. `scores` holds group x padded.
template <int CHUNKS>
void attend_group(const Problem& p, int64_t row, int64_t kv_head, std::vector<float>& scores,
                  std::vector<uint16_t>& visible) {
  constexpr int64_t dim = CHUNKS * kLanes;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t columns = p.columns;
  const int64_t blocks = (columns + kLanes - 1) / kLanes;
  const int64_t padded = blocks * kLanes;
  scores.assign(group * padded, -std::numeric_limits<float>::infinity());
  visible.assign(blocks, 0);
  const int64_t base = (row * p.kv_heads + kv_head) * columns;
  const int8_t* keys = p.keys + base * dim;
  const int8_t* values = p.values + base * dim;
  const float* key_scales = p.key_scales + base;
  const float* value_scales = p.value_scales + base;
  const float* bias = p.bias + row * columns;
  const float* queries = p.queries + (row * p.heads + kv_head * group) * dim;
  float* out = p.out + (row * p.heads + kv_head * group) * dim;
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());

  __m512 partial[kLanes];
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t c0 = block * kLanes;
    const int64_t width = std::min(kLanes, columns - c0);
    const __mmask16 in_range = static_cast<__mmask16>((1u << width) - 1u);
    const __m512 b = _mm512_maskz_loadu_ps(in_range, bias + c0);
    const __mmask16 seen = _mm512_mask_cmp_ps_mask(in_range, b, neg_inf, _CMP_NEQ_OQ);
    visible[block] = seen;
    if (seen == 0) continue;
    const __m512 ks = _mm512_maskz_loadu_ps(in_range, key_scales + c0);
    const __m512 factor = _mm512_mul_ps(ks, _mm512_set1_ps(p.scale));
    for (int64_t g = 0; g < group; ++g) {
      const float* q = queries + g * dim;
      for (int64_t j = 0; j < width; ++j) {
        const int8_t* k = keys + (c0 + j) * dim;
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), load16(k));
#pragma GCC unroll 16
        for (int ch = 1; ch < CHUNKS; ++ch) {
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + ch * kLanes),
                                load16(k + ch * kLanes), acc);
        }
        partial[j] = acc;
      }
      for (int64_t j = width; j < kLanes; ++j) partial[j] = _mm512_setzero_ps();
      const __m512 s = _mm512_fmadd_ps(reduce16(partial), factor, b);
      _mm512_mask_storeu_ps(scores.data() + g * padded + c0, seen, s);
    }
  }

  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * padded;
    __m512 top = neg_inf;
    for (int64_t c = 0; c < padded; c += kLanes) top = _mm512_max_ps(top, _mm512_loadu_ps(s + c));
    const float peak = _mm512_reduce_max_ps(top);
    if (peak == -std::numeric_limits<float>::infinity()) continue;
    const __m512 shift = _mm512_set1_ps(peak);
    __m512 total = _mm512_setzero_ps();
    for (int64_t block = 0; block < blocks; ++block) {
      float* sb = s + block * kLanes;
      const __m512 e = _mm512_maskz_mov_ps(
          visible[block], exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sb), shift)));
      _mm512_storeu_ps(sb, e);
      total = _mm512_add_ps(total, e);
    }
    // Fold 1 / sum into the weights now, so the value pass is one fma per chunk.
    const float inverse = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t block = 0; block < blocks; ++block) {
      if (visible[block] == 0) continue;
      const __m512 vs = _mm512_maskz_loadu_ps(visible[block], value_scales + block * kLanes);
      float* sb = s + block * kLanes;
      _mm512_storeu_ps(sb, _mm512_mul_ps(_mm512_loadu_ps(sb),
                                         _mm512_mul_ps(vs, _mm512_set1_ps(inverse))));
    }
  }

  constexpr int64_t per_pass = std::max<int64_t>(1, kAccumulators / CHUNKS);
  for (int64_t g0 = 0; g0 < group; g0 += per_pass) {
    const int64_t count = std::min(per_pass, group - g0);
    __m512 acc[per_pass][CHUNKS];
    for (int64_t g = 0; g < per_pass; ++g) {
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) acc[g][ch] = _mm512_setzero_ps();
    }
    for (int64_t block = 0; block < blocks; ++block) {
      for (uint32_t mask = visible[block]; mask != 0; mask &= mask - 1) {
        const int64_t c = block * kLanes + __builtin_ctz(mask);
        const int8_t* v = values + c * dim;
        __m512 vf[CHUNKS];
#pragma GCC unroll 16
        for (int ch = 0; ch < CHUNKS; ++ch) vf[ch] = load16(v + ch * kLanes);
        for (int64_t g = 0; g < count; ++g) {
          const __m512 w = _mm512_set1_ps(scores[(g0 + g) * padded + c]);
#pragma GCC unroll 16
          for (int ch = 0; ch < CHUNKS; ++ch) acc[g][ch] = _mm512_fmadd_ps(w, vf[ch], acc[g][ch]);
        }
      }
    }
    for (int64_t g = 0; g < count; ++g) {
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) {
        _mm512_storeu_ps(out + (g0 + g) * dim + ch * kLanes, acc[g][ch]);
      }
    }
  }
}

using GroupKernel = void (*)(const Problem&, int64_t, int64_t, std::vector<float>&,
                             std::vector<uint16_t>&);

template <int... N>
constexpr auto make_group_kernels(std::integer_sequence<int, N...>) {
  return std::array<GroupKernel, sizeof...(N)>{&attend_group<N + 1>...};
}

constexpr auto kGroupKernels = make_group_kernels(std::make_integer_sequence<int, kMaxChunks>{});

void check_cache(const at::Tensor& t, const at::Tensor& scales, const at::Tensor& queries,
                 int64_t kv_heads, int64_t columns, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kChar && t.is_contiguous() &&
                  t.size(0) == queries.size(0) && t.size(1) == kv_heads &&
                  t.size(2) == columns && t.size(3) == queries.size(2),
              "decode_attention: ", name, " must be contiguous int8 [B, KVH, C, D]");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && scales.size(0) == t.size(0) &&
                  scales.size(1) == kv_heads && scales.size(2) == columns,
              "decode_attention: ", name, " scales must be contiguous float32 [B, KVH, C]");
}

at::Tensor decode_attention(const at::Tensor& queries, const at::Tensor& keys,
                            const at::Tensor& key_scales, const at::Tensor& values,
                            const at::Tensor& value_scales, const at::Tensor& bias,
                            double scale) {
  TORCH_CHECK(queries.dim() == 3 && queries.scalar_type() == at::kFloat &&
                  queries.is_contiguous(),
              "decode_attention: queries must be contiguous float32 [B, H, D]");
  TORCH_CHECK(keys.dim() == 4, "decode_attention: keys must be [B, KVH, C, D]");
  const int64_t batch = queries.size(0);
  const int64_t heads = queries.size(1);
  const int64_t dim = queries.size(2);
  const int64_t kv_heads = keys.size(1);
  const int64_t columns = keys.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0,
              "decode_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(dim % kLanes == 0 && dim > 0 && dim <= kMaxChunks * kLanes,
              "decode_attention: head_dim must be a multiple of 16, at most 256");
  check_cache(keys, key_scales, queries, kv_heads, columns, "keys");
  check_cache(values, value_scales, queries, kv_heads, columns, "values");
  TORCH_CHECK(bias.dim() == 2 && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                  bias.size(0) == batch && bias.size(1) == columns,
              "decode_attention: bias must be contiguous float32 [B, C]");
  at::Tensor out = at::zeros({batch, heads, dim}, queries.options());
  if (columns == 0 || batch == 0 || heads == 0) return out;
  const Problem problem{queries.data_ptr<float>(),    keys.data_ptr<int8_t>(),
                        key_scales.data_ptr<float>(), values.data_ptr<int8_t>(),
                        value_scales.data_ptr<float>(), bias.data_ptr<float>(),
                        out.data_ptr<float>(),        heads,
                        kv_heads,                     columns,
                        static_cast<float>(scale)};
  const GroupKernel kernel = kGroupKernels[dim / kLanes - 1];
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<uint16_t> visible;
    for (int64_t task = begin; task < end; ++task) {
      kernel(problem, task / kv_heads, task % kv_heads, scores, visible);
    }
  });
  return out;
}

template <typename T>
void quantize_tokens(const T* x, int8_t* q, float* scales, int64_t tokens, int64_t dim) {
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = x + t * dim;
      __m512 top = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += kLanes) top = _mm512_max_ps(top, _mm512_abs_ps(load16(row + d)));
      const float scale = _mm512_reduce_max_ps(top) / 127.0f;
      const __m512 inverse = _mm512_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
      for (int64_t d = 0; d < dim; d += kLanes) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row + d), inverse));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + t * dim + d), _mm512_cvtsepi32_epi8(v));
      }
      scales[t] = scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_kv(const at::Tensor& states) {
  TORCH_CHECK(states.dim() >= 1 && states.is_contiguous() &&
                  (states.scalar_type() == at::kFloat || states.scalar_type() == at::kBFloat16),
              "quantize_kv: states must be contiguous float32 or bfloat16 [..., head_dim]");
  const int64_t dim = states.size(-1);
  TORCH_CHECK(dim % kLanes == 0 && dim > 0, "quantize_kv: head_dim must be a multiple of 16");
  at::Tensor values = at::empty(states.sizes(), states.options().dtype(at::kChar));
  at::Tensor scales = at::empty(states.sizes().slice(0, states.dim() - 1),
                                states.options().dtype(at::kFloat));
  const int64_t tokens = states.numel() / dim;
  if (states.scalar_type() == at::kFloat) {
    quantize_tokens(states.data_ptr<float>(), values.data_ptr<int8_t>(), scales.data_ptr<float>(),
                    tokens, dim);
  } else {
    quantize_tokens(states.data_ptr<c10::BFloat16>(), values.data_ptr<int8_t>(),
                    scales.data_ptr<float>(), tokens, dim);
  }
  return {values, scales};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_q8, m) {
  m.def("quantize_kv(Tensor states) -> (Tensor, Tensor)", &quantize_kv);
  m.def(
      "decode_attention(Tensor queries, Tensor keys, Tensor key_scales, Tensor values, "
      "Tensor value_scales, Tensor bias, float scale) -> Tensor",
      &decode_attention);
}
