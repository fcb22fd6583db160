// A row's history read back from the paged KV pools as float32: `qwen_q8::paged_history`.
//
// A prompt chunk attends over the tokens before it, which live in the pools as blocks
// [NB, KVH, BS, D] (int8 with float32 scales [NB, KVH, BS], float32 or bfloat16). Torch needs
// four passes for that (gather the blocks, lay them out head-major, widen, and concatenate with
// the chunk's own keys), which took more of a chunk's step than its attention did. This is one
// pass, written straight into the buffer the chunk's keys then complete: out[h, t, :] for the
// row's first `length` tokens t. Values are widened exactly as kv_layout.dequantize_kv does
// (int8 as float times its scale, one rounding; bf16 and float32 exactly), so the result is
// bit for bit the torch path's.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "simd.h"

namespace {

using qwen_simd::kLanes;
using qwen_simd::load16;

template <typename T>
void copy_history(const T* pool, const float* scales, const int32_t* blocks, int64_t length,
                  float* out, int64_t kv_heads, int64_t block_size, int64_t dim,
                  int64_t out_tokens) {
  const int64_t used = (length + block_size - 1) / block_size;
  at::parallel_for(0, kv_heads * used, 4, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / used;
      const int64_t index = task % used;
      const int64_t base = (static_cast<int64_t>(blocks[index]) * kv_heads + head) * block_size;
      const int64_t first = index * block_size;
      const int64_t count = std::min(block_size, length - first);
      for (int64_t t = 0; t < count; ++t) {
        const T* src = pool + (base + t) * dim;
        float* dst = out + (head * out_tokens + first + t) * dim;
        const __m512 scale = _mm512_set1_ps(scales ? scales[base + t] : 1.0f);
        for (int64_t d = 0; d < dim; d += kLanes) {
          const __m512 widened = load16(src + d);
          _mm512_storeu_ps(dst + d, scales ? _mm512_mul_ps(widened, scale) : widened);
        }
      }
    }
  });
}

void paged_history(const at::Tensor& pool, const std::optional<at::Tensor>& scales,
                   const at::Tensor& blocks, int64_t length, const at::Tensor& out) {
  TORCH_CHECK(pool.dim() == 4 && pool.is_contiguous() &&
                  (pool.scalar_type() == at::kChar || pool.scalar_type() == at::kFloat ||
                   pool.scalar_type() == at::kBFloat16),
              "paged_history: the pool must be a contiguous int8, float32 or bfloat16 "
              "[NB, KVH, BS, D]");
  const int64_t kv_heads = pool.size(1);
  const int64_t block_size = pool.size(2);
  const int64_t dim = pool.size(3);
  TORCH_CHECK(dim % kLanes == 0 && dim > 0, "paged_history: head_dim must be a multiple of 16");
  const bool quantized = pool.scalar_type() == at::kChar;
  TORCH_CHECK(quantized == scales.has_value(),
              "paged_history: scales are required for an int8 pool and only for one");
  if (quantized) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                    scales->sizes() == pool.sizes().slice(0, 3),
                "paged_history: scales must be contiguous float32 [NB, KVH, BS]");
  }
  TORCH_CHECK(block_size > 0 && length >= 0, "paged_history: needs BS >= 1 and length >= 0");
  const int64_t used = (length + block_size - 1) / block_size;
  TORCH_CHECK(blocks.dim() == 1 && blocks.scalar_type() == at::kInt && blocks.is_contiguous() &&
                  blocks.size(0) >= used,
              "paged_history: blocks must be contiguous int32 covering the length");
  TORCH_CHECK(out.dim() == 3 && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.size(0) == kv_heads && out.size(1) >= length && out.size(2) == dim,
              "paged_history: out must be contiguous float32 [KVH, >= length, D]");
  const int32_t* ids = blocks.data_ptr<int32_t>();
  for (int64_t i = 0; i < used; ++i) {
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < pool.size(0), "paged_history: block id ", ids[i],
                " is outside the pool of ", pool.size(0));
  }
  const float* scale_ptr = quantized ? scales->data_ptr<float>() : nullptr;
  float* out_ptr = out.data_ptr<float>();
  switch (pool.scalar_type()) {
    case at::kChar:
      copy_history(pool.data_ptr<int8_t>(), scale_ptr, ids, length, out_ptr, kv_heads,
                   block_size, dim, out.size(1));
      break;
    case at::kFloat:
      copy_history(pool.data_ptr<float>(), scale_ptr, ids, length, out_ptr, kv_heads,
                   block_size, dim, out.size(1));
      break;
    default:
      copy_history(pool.data_ptr<c10::BFloat16>(), scale_ptr, ids, length, out_ptr, kv_heads,
                   block_size, dim, out.size(1));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_q8, m) {
  m.def(
      "paged_history(Tensor pool, Tensor? scales, Tensor blocks, int length, Tensor(a!) out) -> ()",
      &paged_history);
}
