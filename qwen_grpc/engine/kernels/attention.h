// The building blocks of attention over paged KV pools, shared by the decode kernel
// (paged.cpp) and the prompt-chunk kernel (chunk.cpp): scores of query heads against a run of
// tokens, softmax in place, the weighted sum of values, and the checks of a pool and its
// scales. All float32: int8 and bf16 elements are widened exactly. Header-only and inline;
// native.py hashes it with the sources, so a change here rebuilds.

#pragma once

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "simd.h"

namespace qwen_attention {

using namespace qwen_simd;

constexpr int64_t kMaxChunks = 16;  // head_dim up to 256
// Value-pass accumulators (heads per pass * chunks), sized to the vector registers: 16 of 32
// with AVX-512, 4 vectors (8 of 16 registers) with AVX2.
constexpr int kAccumulators = kWide ? 16 : 4;
constexpr int64_t kCacheLine = 64;

template <typename T>
constexpr bool kQuantized = std::is_same_v<T, int8_t>;

// Asks for `tokens` rows of `dim` elements at p: the next block, while this one is computed.
// Blocks are where the hardware prefetcher loses the stream.
template <typename T>
inline void prefetch_rows(const T* p, int64_t tokens, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t size = tokens * dim * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < size; offset += kCacheLine) {
    _mm_prefetch(bytes + offset, _MM_HINT_T0);
  }
}

// Scores of the `group` query heads against one block's `count` tokens, written to
// scores[g * padded + first + j].
template <typename T, int CHUNKS>
inline void score_block(const float* queries, int64_t group, const T* keys,
                        const float* key_scales, int64_t count, float scale, float* scores,
                        int64_t padded) {
  constexpr int64_t dim = CHUNKS * kLanes;
  F32x16 partial[kLanes];
  for (int64_t j0 = 0; j0 < count; j0 += kLanes) {
    const int64_t width = std::min(kLanes, count - j0);
    const Mask16 in_range = prefix(width);
    F32x16 factor = broadcast(scale);
    if constexpr (kQuantized<T>) {
      factor = mul(load_masked(in_range, key_scales + j0), factor);
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* q = queries + g * dim;
      for (int64_t j = 0; j < width; ++j) {
        const T* k = keys + (j0 + j) * dim;
        F32x16 acc = mul(load(q), load16(k));
#pragma GCC unroll 16
        for (int ch = 1; ch < CHUNKS; ++ch) {
          acc = fmadd(load(q + ch * kLanes), load16(k + ch * kLanes), acc);
        }
        partial[j] = acc;
      }
      for (int64_t j = width; j < kLanes; ++j) partial[j] = zeros();
      store_masked(scores + g * padded + j0, in_range, mul(reduce16(partial), factor));
    }
  }
}

// Turns one head's `length` scores (padded with -inf to `padded`) into softmax weights in
// place, 1 / sum folded in so the value pass is one fma per chunk. False if nothing is
// visible (every score -inf), leaving the head's output at zero.
inline bool softmax_in_place(float* s, int64_t length, int64_t padded) {
  F32x16 top = broadcast(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < padded; c += kLanes) top = maximum(top, load(s + c));
  const float peak = reduce_max(top);
  if (peak == -std::numeric_limits<float>::infinity()) return false;
  const F32x16 shift = broadcast(peak);
  F32x16 total = zeros();
  for (int64_t c = 0; c < padded; c += kLanes) {
    const int64_t width = std::min(kLanes, length - c);
    const F32x16 e = select(prefix(width), exp_nonpositive(sub(load(s + c), shift)), zeros());
    store(s + c, e);
    total = add(total, e);
  }
  const F32x16 inverse = broadcast(1.0f / reduce_add(total));
  for (int64_t c = 0; c < padded; c += kLanes) store(s + c, mul(load(s + c), inverse));
  return true;
}

// acc[g] += sum_j w[g, first + j] * v_j (* value_scale_j) over one block's `count` tokens.
template <typename T, int CHUNKS, int PER_PASS>
inline void accumulate_block(F32x16 (&acc)[PER_PASS][CHUNKS], int64_t heads_in_pass,
                             const float* weights, int64_t padded, const T* values,
                             const float* value_scales, int64_t count) {
  constexpr int64_t dim = CHUNKS * kLanes;
  for (int64_t j = 0; j < count; ++j) {
    const T* v = values + j * dim;
    F32x16 vf[CHUNKS];
#pragma GCC unroll 16
    for (int ch = 0; ch < CHUNKS; ++ch) vf[ch] = load16(v + ch * kLanes);
    for (int64_t g = 0; g < heads_in_pass; ++g) {
      float weight = weights[g * padded + j];
      if constexpr (kQuantized<T>) weight *= value_scales[j];
      const F32x16 w = broadcast(weight);
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) acc[g][ch] = fmadd(w, vf[ch], acc[g][ch]);
    }
  }
}

// A pool [NB, KVH, BS, D] shaped and typed like `keys`, in one of the dtypes the kernels read.
inline void check_pool(const at::Tensor& pool, const at::Tensor& keys, const char* op,
                       const char* name) {
  TORCH_CHECK(pool.dim() == 4 && pool.is_contiguous() && pool.sizes() == keys.sizes() &&
                  pool.scalar_type() == keys.scalar_type(),
              op, ": ", name,
              " must be a contiguous pool [NB, KVH, BS, D] like keys");
  TORCH_CHECK(pool.scalar_type() == at::kChar || pool.scalar_type() == at::kFloat ||
                  pool.scalar_type() == at::kBFloat16,
              op, ": pools must be int8, float32 or bfloat16");
}

// Scales are required for int8 pools and meaningless for float ones.
inline const float* scales_of(const std::optional<at::Tensor>& scales, const at::Tensor& pool,
                              const char* op, const char* name) {
  if (pool.scalar_type() != at::kChar) {
    TORCH_CHECK(!scales.has_value(), op, ": ", name, " must be None for a float pool");
    return nullptr;
  }
  TORCH_CHECK(scales.has_value() && scales->dim() == 3 && scales->is_contiguous() &&
                  scales->scalar_type() == at::kFloat &&
                  scales->sizes() == pool.sizes().slice(0, 3),
              op, ": ", name, " must be contiguous float32 [NB, KVH, BS] for an int8 pool");
  return scales->data_ptr<float>();
}

}  // namespace qwen_attention
