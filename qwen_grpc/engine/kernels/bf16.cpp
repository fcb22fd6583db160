// bf16-weight linear with float32 activations, accumulation and output: `qwen_q8::bf16_linear`.
//
// Why: a bf16 model served with bf16 activations and bf16 outputs (oneDNN's path) drifts from
// float32 more than llama.cpp's BF16 does. Keeping the weights in bf16 (the bytes decode
// streams, so the same speed where memory bound) while computing everything else in float32
// is the most faithful of the three. Each bf16 weight becomes float32 exactly (a 16-bit
// shift), so the only difference from a float64 product of the same numbers is float32
// summation.
//
// Layout (bf16_layout.py `pack`): output rows in tiles of 16; for each tile the K values are
// stored as K/2 vectors of 64 bytes where vector g holds, for row r, the 32-bit pair
// (w[r, 2g], w[r, 2g + 1]), the even element in the low half. One 512-bit load then gives two
// float32 vectors of 16 rows with two cheap integer operations and no shuffle: the even k is
// `v << 16`, the odd k is `v & 0xffff0000`. Each is FMA'd with a broadcast activation of every
// batch row, so one weight load serves up to 8 activation rows (2 with AVX2's 16 registers);
// larger batches loop over row blocks while the tile (K * 32 bytes) stays in cache. Threads take tiles
// (`at::parallel_for`), so no output is split between threads either: results do not depend
// on the thread count. Written against simd.h: AVX512F, or AVX2 with fewer rows per weight load.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <utility>

#include "simd.h"

namespace {

using namespace qwen_simd;

constexpr int64_t kTileRows = 16;
constexpr int64_t kPairLanes = 2 * kTileRows;  // bf16 values in one 64-byte vector
// Two accumulators per activation row, one for even and one for odd columns: a fixed summation
// order whatever the batch size (a row gives the same bits alone or batched) that still keeps
// two FMA chains in flight for a single row.
// AVX-512: 16 accumulators, 2 weights and a mask in 32 registers; AVX2: 8 + 4 + 2 of 16.
constexpr int64_t kMaxBatchRows = kWide ? 8 : 2;
constexpr int64_t kKStep = 16;

// One tile of 16 output rows times ROWS activation rows starting at x (row stride k).
template <int ROWS>
void tile_kernel(const uint16_t* w, const float* x, int64_t k, float* out, int64_t out_stride,
                 const float* bias, Mask16 valid) {
  F32x16 even_acc[ROWS];
  F32x16 odd_acc[ROWS];
#pragma GCC unroll 8
  for (int m = 0; m < ROWS; ++m) {
    even_acc[m] = zeros();
    odd_acc[m] = zeros();
  }
  for (int64_t col = 0; col < k; col += 2) {
    F32x16 even;
    F32x16 odd;
    load_bf16_pairs(w + col * kTileRows, even, odd);
#pragma GCC unroll 8
    for (int m = 0; m < ROWS; ++m) {
      even_acc[m] = fmadd(even, broadcast(x[m * k + col]), even_acc[m]);
      odd_acc[m] = fmadd(odd, broadcast(x[m * k + col + 1]), odd_acc[m]);
    }
  }
  const F32x16 bv = bias ? load_masked(valid, bias) : zeros();
#pragma GCC unroll 8
  for (int m = 0; m < ROWS; ++m) {
    store_masked(out + m * out_stride, valid, add(add(even_acc[m], odd_acc[m]), bv));
  }
}

using TileKernel = void (*)(const uint16_t*, const float*, int64_t, float*, int64_t, const float*,
                            Mask16);

template <int... R>
constexpr auto make_kernels(std::integer_sequence<int, R...>) {
  return std::array<TileKernel, sizeof...(R)>{&tile_kernel<R + 1>...};
}

constexpr auto kKernels = make_kernels(std::make_integer_sequence<int, kMaxBatchRows>{});

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed,
                       const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kBFloat16 &&
                  packed.is_contiguous() && packed.size(2) == kPairLanes,
              "bf16_linear: packed weights must be contiguous bfloat16 [tiles, K/2, 32]");
  TORCH_CHECK(out_features > (packed.size(0) - 1) * kTileRows &&
                  out_features <= packed.size(0) * kTileRows,
              "bf16_linear: out_features does not match the number of tiles");
  const int64_t k = packed.size(1) * 2;
  TORCH_CHECK(k % kKStep == 0, "bf16_linear: in_features must be a multiple of 16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.is_contiguous() &&
                  x.scalar_type() == at::kFloat,
              "bf16_linear: x must be contiguous float32 [M, in_features]");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == out_features,
                "bf16_linear: bias must be contiguous float32 [out_features]");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows, out_features}, x.options());
  float* out_ptr = out.data_ptr<float>();
  const float* x_ptr = x.data_ptr<float>();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const int64_t tile_values = packed.size(1) * kPairLanes;
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTileRows;
      const int64_t width = std::min(kTileRows, out_features - n0);
      const Mask16 valid = prefix(width);
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxBatchRows) {
        const int64_t count = std::min(kMaxBatchRows, rows - m0);
        kKernels[count - 1](w + t * tile_values, x_ptr + m0 * k, k,
                            out_ptr + m0 * out_features + n0, out_features,
                            bias_ptr ? bias_ptr + n0 : nullptr, valid);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_q8, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor",
        &bf16_linear);
}
