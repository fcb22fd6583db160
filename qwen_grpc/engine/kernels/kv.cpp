// The int8 KV cache's write side (one scale per token and head): `qwen_q8::quantize_kv`.
// paged.cpp's decode attention reads what it writes.
//
// Quantization is kv_layout.py's arithmetic in vectors (simd.h): scale = max|x| / 127, q = x * (1 / scale)
// rounded to nearest even; natively because a decode step quantizes 2 x layers tiny tensors,
// where torch's per-op overhead (~20 us a call) cost as much as the attention itself.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "simd.h"

namespace {

using namespace qwen_simd;

template <typename T>
void quantize_tokens(const T* x, int8_t* q, float* scales, int64_t tokens, int64_t dim) {
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = x + t * dim;
      F32x16 top = zeros();
      for (int64_t d = 0; d < dim; d += kLanes) top = maximum(top, absolute(load16(row + d)));
      const float scale = reduce_max(top) / 127.0f;
      const F32x16 inverse = broadcast(scale != 0.0f ? 1.0f / scale : 0.0f);
      for (int64_t d = 0; d < dim; d += kLanes) {
        store_int8(q + t * dim + d, mul(load16(row + d), inverse));
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
}
