// Q8_0 linear and row gather for x86 CPUs with AVX512-VNNI, registered as torch ops `qwen_q8::*`.
//
// Arithmetic (llama.cpp's Q8_0 x Q8_0 dot product): weights and activations are quantized in
// blocks of 32 along K with scale d = max|v| / 127 and q = round_to_nearest_even(v * (1 / d)).
// A block's dot product is an exact int32 sum of int8 products, scaled by d_w * d_x and added
// to a float32 accumulator.
//
// Layout: output rows are grouped in tiles of 16. For each tile and K block the 16 x 32 int8
// weights are stored as 8 vectors of 64 bytes; vector g holds, for row r, bytes
// [r * 4, r * 4 + 4) = w[r, 4g .. 4g + 4). One vpdpbusd then multiplies 4 K values of all 16
// rows by 4 broadcast activation bytes, and one weight load serves every activation row.
// vpdpbusd multiplies unsigned by signed bytes, so weights are stored offset by +128 (u8) and
// the activations stay signed: sum((w + 128) x) - 128 sum(x) = sum(w x), exactly.
// Scales are fp32, [tile][block][16].

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileBlockBytes = kTileRows * kBlock;
constexpr int64_t kGroups = kBlock / 4;
constexpr int64_t kMaxBatchRows = 16;

// Activations quantized once per call, stored block-major ([block][row][32], [block][row]) so
// the rows of one K block sit at constant offsets from one pointer. Each block keeps its scale
// and -128 * sum(q), the start value of the integer accumulator that undoes the weight offset.
struct QuantizedRows {
  const int8_t* values;
  const float* scales;
  const int32_t* starts;
  int64_t rows;
  int64_t blocks;
};

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
void quantize_block(const T* x, int8_t* q, float* scale, int32_t* start) {
  const __m512 lo = load16(x);
  const __m512 hi = load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float d = amax / 127.0f;
  const __m512 inv = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
  const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qhi));
  *scale = d;
  *start = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
}

template <typename T>
void quantize_rows(const at::Tensor& x, int8_t* q, float* scales, int32_t* starts) {
  const int64_t rows = x.size(0);
  const int64_t k = x.size(1);
  const int64_t blocks = k / kBlock;
  const T* base = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i = b * rows + m;
        quantize_block(base + m * k + b * kBlock, q + i * kBlock, scales + i, starts + i);
      }
    }
  });
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// One tile of 16 output rows times ROWS activation rows; each weight vector is loaded once.
template <int ROWS>
void tile_kernel(const uint8_t* w, const float* w_scales, const QuantizedRows& x, int64_t row0,
                 float* out, int64_t out_stride, const float* bias, __mmask16 valid) {
  __m512 acc[ROWS];
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  const int8_t* xq = x.values + row0 * kBlock;
  const float* xs = x.scales + row0;
  const int32_t* xstart = x.starts + row0;
  for (int64_t b = 0; b < x.blocks; ++b) {
    const __m512i* wb = reinterpret_cast<const __m512i*>(w + b * kTileBlockBytes);
    __m512i wv[kGroups];
#pragma GCC unroll 8
    for (int g = 0; g < kGroups; ++g) wv[g] = _mm512_loadu_si512(wb + g);
    const __m512 ws = _mm512_loadu_ps(w_scales + b * kTileRows);
#pragma GCC unroll 16
    for (int m = 0; m < ROWS; ++m) {
      __m512i sum = _mm512_set1_epi32(xstart[m]);
#pragma GCC unroll 8
      for (int g = 0; g < kGroups; ++g) {
        sum = _mm512_dpbusd_epi32(sum, wv[g], broadcast4(xq + m * kBlock + 4 * g));
      }
      const __m512 d = _mm512_mul_ps(ws, _mm512_set1_ps(xs[m]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d, acc[m]);
    }
    xq += x.rows * kBlock;
    xs += x.rows;
    xstart += x.rows;
  }
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(valid, bias) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) {
    _mm512_mask_storeu_ps(out + (row0 + m) * out_stride, valid, _mm512_add_ps(acc[m], bv));
  }
}

using TileKernel = void (*)(const uint8_t*, const float*, const QuantizedRows&, int64_t, float*,
                            int64_t, const float*, __mmask16);

template <int... R>
constexpr auto make_kernels(std::integer_sequence<int, R...>) {
  return std::array<TileKernel, sizeof...(R)>{&tile_kernel<R + 1>...};
}

constexpr auto kKernels = make_kernels(std::make_integer_sequence<int, kMaxBatchRows>{});

void check_weight(const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == kTileBlockBytes,
              "q8: packed weights must be contiguous uint8 [tiles, blocks, 512]");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == packed.size(0) && scales.size(1) == packed.size(1) &&
                  scales.size(2) == kTileRows,
              "q8: scales must be contiguous float32 [tiles, blocks, 16]");
  TORCH_CHECK(out_features > (packed.size(0) - 1) * kTileRows &&
                  out_features <= packed.size(0) * kTileRows,
              "q8: out_features does not match the number of tiles");
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     int64_t out_features, const std::optional<at::Tensor>& bias) {
  check_weight(packed, scales, out_features);
  const int64_t blocks = packed.size(1);
  const int64_t k = blocks * kBlock;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.is_contiguous(),
              "q8: x must be contiguous [M, in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "q8: x must be float32 or bfloat16");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == out_features,
                "q8: bias must be contiguous float32 [out_features]");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t rows = x.size(0);
  at::Tensor xq = at::empty({blocks, rows, kBlock}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({blocks, rows}, x.options().dtype(at::kFloat));
  at::Tensor xc = at::empty({blocks, rows}, x.options().dtype(at::kInt));
  if (x.scalar_type() == at::kFloat) {
    quantize_rows<float>(x, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xc.data_ptr<int32_t>());
  } else {
    quantize_rows<c10::BFloat16>(x, xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                                 xc.data_ptr<int32_t>());
  }
  const QuantizedRows qx{xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xc.data_ptr<int32_t>(),
                         rows, blocks};
  at::Tensor out = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* ws = scales.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTileRows;
      const int64_t width = std::min(kTileRows, out_features - n0);
      const __mmask16 valid = static_cast<__mmask16>((1u << width) - 1u);
      const uint8_t* wt = w + t * blocks * kTileBlockBytes;
      const float* st = ws + t * blocks * kTileRows;
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxBatchRows) {
        const int64_t count = std::min(kMaxBatchRows, rows - m0);
        kKernels[count - 1](wt, st, qx, m0, out_ptr + n0, out_features,
                            bias_ptr ? bias_ptr + n0 : nullptr, valid);
      }
    }
  });
  return out;
}

at::Tensor q8_rows(const at::Tensor& packed, const at::Tensor& scales, int64_t out_features,
                   const at::Tensor& index) {
  check_weight(packed, scales, out_features);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(),
              "q8: index must be contiguous int64 [L]");
  const int64_t blocks = packed.size(1);
  const int64_t k = blocks * kBlock;
  const int64_t count = index.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < out_features, "q8: row index out of range");
  }
  at::Tensor out = at::empty({count, k}, scales.options());
  float* out_ptr = out.data_ptr<float>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* ws = scales.data_ptr<float>();
  at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t tile = idx[i] / kTileRows;
      const int64_t lane = idx[i] % kTileRows;
      float* dst = out_ptr + i * k;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* src = w + (tile * blocks + b) * kTileBlockBytes + lane * 4;
        const float d = ws[(tile * blocks + b) * kTileRows + lane];
        for (int64_t j = 0; j < kBlock; ++j) {
          const int v = static_cast<int>(src[(j / 4) * 64 + j % 4]) - 128;
          dst[b * kBlock + j] = static_cast<float>(v) * d;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qwen_q8, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor scales, int out_features, Tensor? bias) -> Tensor",
        &q8_linear);
  m.def("rows(Tensor packed, Tensor scales, int out_features, Tensor index) -> Tensor", &q8_rows);
}
