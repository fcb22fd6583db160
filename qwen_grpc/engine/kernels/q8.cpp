// Q8_0 linear and row gather for x86 CPUs with AVX512-VNNI or AVX2, registered as torch ops
// `qwen_q8::*`. The instruction set is the build's: compiled with -mavx512vnni (and F/BW/VL)
// the file is the VNNI and AMX paths below; compiled with -mavx2 -mfma only, it is the AVX2 path.
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
//
// On CPUs with AMX-INT8 (and the kernel's permission to use its tile state) batches of
// kAmxMinRows rows or more take AMX tiles instead: the same 8 vectors of one tile and block are
// exactly the B operand of tdpbsud (8 rows of 4 K values x 16 outputs), 16 activation rows x 32
// bytes are its A operand, and one instruction computes the 16 x 16 block sums that take 128
// vpdpbusd. The int32 sums are the same integers, and the float epilogue is the same operations
// in the same order, so both paths give bit-identical outputs. Large batches are walked in row
// chunks that fit in L2, so a prompt's activations are not re-read from memory per weight tile.
//
// The AVX2 build (AMD Zen 3 and older Intel) reads the same layout as two 256-bit halves per
// vector (rows 0-7, rows 8-15) and has no unsigned x signed byte dot product that cannot
// saturate, so it takes llama.cpp's sign trick instead of the offset: with w = u8 ^ 0x80 (the
// signed weight), vpmaddubsw(|w|, sign(x, w)) multiplies the unsigned |w| by x carrying w's sign,
// giving w x in int16 pairs that cannot saturate (|w|, |x| <= 127, so a pair is at most 32258),
// and vpmaddwd by 1 sums each row's 4 products into int32. The block sums are the same exact
// integers as vpdpbusd's, quantization and the float epilogue are the same operations per lane,
// so the AVX2 build gives the same bits as the VNNI and AMX paths.

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

#include "simd.h"

#if defined(__AVX512VNNI__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileBlockBytes = kTileRows * kBlock;
constexpr int64_t kGroups = kBlock / 4;
// Activation bytes per row chunk: with the weight tile being read, well inside a 1-2 MB L2.
constexpr int64_t kChunkBytes = 512 * 1024;

#if defined(__AVX512VNNI__)
constexpr int64_t kMaxBatchRows = 16;
// Below this many rows a call is bound by reading the weights, and VNNI reaches that bound.
constexpr int64_t kAmxMinRows = 4;
#else
// 16 ymm registers: a row takes two int32 sums (plus two float accumulators, touched once per
// block), beside a group's two weight halves, their absolute values and a broadcast. Measured on
// Zen 3 (one thread, 256 rows times a 2816 x 1024 weight, best of 3): 1 row per kernel 17.8 ms,
// 2 rows 14.5, 3 rows 14.2, 4 rows 12.9, 5 rows 13.2, 6 rows 14.3 (the sums spill).
constexpr int64_t kMaxBatchRows = 4;
#endif

// Activations quantized once per call, stored block-major ([block][row][32], [block][row]) so
// the rows of one K block sit at constant offsets from one pointer. Each block keeps its scale
// and, for VNNI and AMX, -128 * sum(q): the start value of the integer accumulator that undoes
// the weight offset (the AVX2 sign trick multiplies by the signed weights and needs none).
struct QuantizedRows {
  int8_t* values;
  float* scales;
#if defined(__AVX512VNNI__)
  int32_t* starts;
#endif
  int64_t rows;
  int64_t blocks;
};

#if defined(__AVX512VNNI__)

using qwen_simd::load16;

// Block i of `q` from the 32 values at x.
template <typename T>
void quantize_block(const T* x, const QuantizedRows& q, int64_t i) {
  const __m512 lo = load16(x);
  const __m512 hi = load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float d = amax / 127.0f;
  const __m512 inv = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
  const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
  int8_t* values = q.values + i * kBlock;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(values), _mm512_cvtsepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(values + 16), _mm512_cvtsepi32_epi8(qhi));
  q.scales[i] = d;
  q.starts[i] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
}

// Zero rows [rows, q.rows) of every block: AMX reads them as part of its 16-row A tiles.
void clear_padding(const QuantizedRows& q, int64_t rows) {
  for (int64_t b = 0; b < q.blocks; ++b) {
    const int64_t i = b * q.rows + rows;
    std::memset(q.values + i * kBlock, 0, (q.rows - rows) * kBlock);
    std::fill(q.scales + i, q.scales + b * q.rows + q.rows, 0.0f);
    std::fill(q.starts + i, q.starts + b * q.rows + q.rows, 0);
  }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// One K block's exact int32 sums of a row, scaled by the weight and activation scales and
// added to its float32 accumulator. Both paths (VNNI and AMX) call this one step, which is what
// keeps their outputs bit-identical.
inline __m512 add_block(__m512 acc, __m512i sum, __m512 weight_scales, float row_scale) {
  const __m512 d = _mm512_mul_ps(weight_scales, _mm512_set1_ps(row_scale));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d, acc);
}

// The tile's ROWS accumulators, plus the bias, into the output's first `width` columns.
template <int ROWS>
inline void store_rows(const __m512 (&acc)[ROWS], float* out, int64_t row0, int64_t out_stride,
                       const float* bias, int64_t width) {
  const __mmask16 valid = static_cast<__mmask16>((1u << width) - 1u);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(valid, bias) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) {
    _mm512_mask_storeu_ps(out + (row0 + m) * out_stride, valid, _mm512_add_ps(acc[m], bv));
  }
}

// One tile of 16 output rows times ROWS activation rows; each weight vector is loaded once.
template <int ROWS>
void tile_kernel(const uint8_t* w, const float* w_scales, const QuantizedRows& x, int64_t row0,
                 float* out, int64_t out_stride, const float* bias, int64_t width) {
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
      acc[m] = add_block(acc[m], sum, ws, xs[m]);
    }
    xq += x.rows * kBlock;
    xs += x.rows;
    xstart += x.rows;
  }
  store_rows<ROWS>(acc, out, row0, out_stride, bias, width);
}

#else

// Block i of `q` from the 32 values at x, as the VNNI build computes it: the maximum is exact
// in any order, and the scale and the rounding, saturating conversion are the same operations
// (simd.h).
template <typename T>
void quantize_block(const T* x, const QuantizedRows& q, int64_t i) {
  using namespace qwen_simd;
  const F32x16 lo = load16(x);
  const F32x16 hi = load16(x + 16);
  const float d = reduce_max(maximum(absolute(lo), absolute(hi))) / 127.0f;
  const F32x16 inv = broadcast(d != 0.0f ? 1.0f / d : 0.0f);
  store_int8(q.values + i * kBlock, mul(lo, inv));
  store_int8(q.values + i * kBlock + 16, mul(hi, inv));
  q.scales[i] = d;
}

// One K block's exact int32 sums of a row for 8 of the tile's rows, scaled and accumulated as
// the VNNI build's add_block does, lane by lane.
inline __m256 add_block(__m256 acc, __m256i sum, __m256 weight_scales, float row_scale) {
  const __m256 d = _mm256_mul_ps(weight_scales, _mm256_set1_ps(row_scale));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, acc);
}

// The tile's ROWS accumulators (lanes 0-7 and 8-15), plus the bias, into the output's first
// `width` columns. Without a bias +0 is added, as in the VNNI build, so -0 sums give +0 in both.
template <int ROWS>
inline void store_rows(const __m256 (&acc)[ROWS][2], float* out, int64_t row0,
                       int64_t out_stride, const float* bias, int64_t width) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i valid[2] = {
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(width)), lanes),
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(width) - 8), lanes)};
  __m256 bv[2];
  for (int h = 0; h < 2; ++h) {
    bv[h] = bias ? _mm256_maskload_ps(bias + 8 * h, valid[h]) : _mm256_setzero_ps();
  }
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) {
    for (int h = 0; h < 2; ++h) {
      _mm256_maskstore_ps(out + (row0 + m) * out_stride + 8 * h, valid[h],
                          _mm256_add_ps(acc[m][h], bv[h]));
    }
  }
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// One tile of 16 output rows times ROWS activation rows. Each 4-byte group's two weight halves
// (and their absolute values) are loaded once and serve every row; each broadcast activation
// word serves both halves.
template <int ROWS>
void tile_kernel(const uint8_t* w, const float* w_scales, const QuantizedRows& x, int64_t row0,
                 float* out, int64_t out_stride, const float* bias, int64_t width) {
  const __m256i sign_bit = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[ROWS][2];
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const int8_t* xq = x.values + row0 * kBlock;
  const float* xs = x.scales + row0;
  for (int64_t b = 0; b < x.blocks; ++b) {
    const uint8_t* wb = w + b * kTileBlockBytes;
    __m256i sum[ROWS][2];
#pragma GCC unroll 16
    for (int m = 0; m < ROWS; ++m) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = 0; g < kGroups; ++g) {
      __m256i wv[2];
      __m256i magnitude[2];
      for (int h = 0; h < 2; ++h) {
        wv[h] = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + g * 64 + h * 32)), sign_bit);
        magnitude[h] = _mm256_sign_epi8(wv[h], wv[h]);
      }
#pragma GCC unroll 16
      for (int m = 0; m < ROWS; ++m) {
        const __m256i xv = broadcast4(xq + m * kBlock + 4 * g);
        for (int h = 0; h < 2; ++h) {
          const __m256i products = _mm256_maddubs_epi16(magnitude[h], _mm256_sign_epi8(xv, wv[h]));
          sum[m][h] = _mm256_add_epi32(sum[m][h], _mm256_madd_epi16(products, ones));
        }
        // An empty asm that "changes" the sums, so GCC adds the groups in order: otherwise it
        // re-associates each row's 8 additions into a tree, whose partial sums do not fit in 16
        // registers and spill (about 15% slower on Zen 3 at 4 rows).
        __asm__("" : "+x"(sum[m][0]), "+x"(sum[m][1]));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 ws = _mm256_loadu_ps(w_scales + b * kTileRows + 8 * h);
#pragma GCC unroll 16
      for (int m = 0; m < ROWS; ++m) acc[m][h] = add_block(acc[m][h], sum[m][h], ws, xs[m]);
    }
    xq += x.rows * kBlock;
    xs += x.rows;
  }
  store_rows<ROWS>(acc, out, row0, out_stride, bias, width);
}

#endif

template <typename T>
void quantize_rows(const at::Tensor& x, const QuantizedRows& q) {
  const int64_t rows = x.size(0);
  const int64_t k = x.size(1);
  const T* base = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < q.blocks; ++b) {
        quantize_block(base + m * k + b * kBlock, q, b * q.rows + m);
      }
    }
  });
}

using TileKernel = void (*)(const uint8_t*, const float*, const QuantizedRows&, int64_t, float*,
                            int64_t, const float*, int64_t);
using TileKernels = std::array<TileKernel, kMaxBatchRows>;

template <int... R>
constexpr TileKernels make_kernels(std::integer_sequence<int, R...>) {
  return {&tile_kernel<R + 1>...};
}

constexpr TileKernels kKernels = make_kernels(std::make_integer_sequence<int, kMaxBatchRows>{});

#if defined(__AVX512VNNI__)

// Linux hands out AMX tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM);
// without it the first tile instruction faults. Asked once, here, before any tile is touched.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool cpu_has_amx_int8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1u;
  const bool int8 = (edx >> 25) & 1u;
  return tile && int8;
}

bool amx_permitted() {
  static const bool permitted =
      cpu_has_amx_int8() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
}

std::atomic<bool> use_amx{false};

// Palette 1 with two sets of three tiles, so one block's sums are computed while the previous
// block's are scaled: C (tmm0 / tmm3, 16 x 16 int32), A (tmm1 / tmm4, 16 rows x 32 bytes), B
// (tmm2 / tmm5, 8 rows x 64 bytes). The configuration is per thread, so each worker loads it.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 32, 64, 64, 32, 64};
  uint8_t rows[16] = {16, 16, static_cast<uint8_t>(kGroups), 16, 16, static_cast<uint8_t>(kGroups)};
};

__attribute__((target("amx-tile"))) void configure_tiles() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// The 16 x 16 integer sums of one block into `sums`, through tile set 0 or 1 (the intrinsics
// take tile numbers as literals, hence the two spelled-out sets).
template <int SET>
__attribute__((target("amx-tile,amx-int8"))) inline void block_sums(const int8_t* xq,
                                                                   const uint8_t* wb,
                                                                   int32_t* sums) {
  if constexpr (SET == 0) {
    _tile_zero(0);
    _tile_loadd(1, xq, kBlock);
    _tile_loadd(2, wb, 64);
    _tile_dpbsud(0, 1, 2);
    _tile_stored(0, sums, 64);
  } else {
    _tile_zero(3);
    _tile_loadd(4, xq, kBlock);
    _tile_loadd(5, wb, 64);
    _tile_dpbsud(3, 4, 5);
    _tile_stored(3, sums, 64);
  }
}

// As tile_kernel, with each block's 16 x 16 integer sums from one tdpbsud. The A operand is
// always 16 rows (the quantized activations are padded with zero rows to a multiple of 16);
// only the first ROWS are used. Block b + 1's sums are stored before block b's are read, so
// the vector epilogue does not wait on the tile store.
template <int ROWS>
__attribute__((target("amx-tile,amx-int8"))) void amx_tile_kernel(
    const uint8_t* w, const float* w_scales, const QuantizedRows& x, int64_t row0, float* out,
    int64_t out_stride, const float* bias, int64_t width) {
  alignas(64) int32_t sums[2][kTileRows * kTileRows];
  __m512 acc[ROWS];
#pragma GCC unroll 16
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t block_stride = x.rows * kBlock;
  const int8_t* xq = x.values + row0 * kBlock;
  const float* xs = x.scales + row0;
  const int32_t* xstart = x.starts + row0;
  block_sums<0>(xq, w, sums[0]);
  for (int64_t b = 0; b < x.blocks; ++b) {
    if (b + 1 < x.blocks) {
      const int8_t* next_x = xq + (b + 1) * block_stride;
      const uint8_t* next_w = w + (b + 1) * kTileBlockBytes;
      if (b & 1) {
        block_sums<0>(next_x, next_w, sums[0]);
      } else {
        block_sums<1>(next_x, next_w, sums[1]);
      }
    }
    const int32_t* current = sums[b & 1];
    const __m512 ws = _mm512_loadu_ps(w_scales + b * kTileRows);
#pragma GCC unroll 16
    for (int m = 0; m < ROWS; ++m) {
      const __m512i sum = _mm512_add_epi32(_mm512_load_si512(current + m * kTileRows),
                                           _mm512_set1_epi32(xstart[m]));
      acc[m] = add_block(acc[m], sum, ws, xs[m]);
    }
    xs += x.rows;
    xstart += x.rows;
  }
  store_rows<ROWS>(acc, out, row0, out_stride, bias, width);
}

template <int... R>
constexpr TileKernels make_amx_kernels(std::integer_sequence<int, R...>) {
  return {&amx_tile_kernel<R + 1>...};
}

constexpr TileKernels kAmxKernels =
    make_amx_kernels(std::make_integer_sequence<int, kMaxBatchRows>{});

#endif

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
#if defined(__AVX512VNNI__)
  // Zero rows pad the quantized activations to whole 16-row A tiles; no output reads them.
  const int64_t padded = (rows + kTileRows - 1) / kTileRows * kTileRows;
#else
  const int64_t padded = rows;
#endif
  at::Tensor xq = at::empty({blocks, padded, kBlock}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({blocks, padded}, x.options().dtype(at::kFloat));
#if defined(__AVX512VNNI__)
  at::Tensor xc = at::empty({blocks, padded}, x.options().dtype(at::kInt));
  const QuantizedRows qx{xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xc.data_ptr<int32_t>(),
                         padded, blocks};
  clear_padding(qx, rows);
#else
  const QuantizedRows qx{xq.data_ptr<int8_t>(), xs.data_ptr<float>(), padded, blocks};
#endif
  if (x.scalar_type() == at::kFloat) {
    quantize_rows<float>(x, qx);
  } else {
    quantize_rows<c10::BFloat16>(x, qx);
  }
  at::Tensor out = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* ws = scales.data_ptr<float>();
  const int64_t chunk =
      std::max(kMaxBatchRows, kChunkBytes / k / kMaxBatchRows * kMaxBatchRows);
  // Tiles [begin, end) times every row, chunk by chunk, kMaxBatchRows rows per kernel call.
  const auto run = [&](const TileKernels& kernels, int64_t begin, int64_t end) {
    for (int64_t c0 = 0; c0 < rows; c0 += chunk) {
      const int64_t c1 = std::min(rows, c0 + chunk);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTileRows;
        const int64_t width = std::min(kTileRows, out_features - n0);
        const uint8_t* wt = w + t * blocks * kTileBlockBytes;
        const float* st = ws + t * blocks * kTileRows;
        for (int64_t m0 = c0; m0 < c1; m0 += kMaxBatchRows) {
          const int64_t count = std::min(kMaxBatchRows, c1 - m0);
          kernels[count - 1](wt, st, qx, m0, out_ptr + n0, out_features,
                             bias_ptr ? bias_ptr + n0 : nullptr, width);
        }
      }
    }
  };
#if defined(__AVX512VNNI__)
  const bool amx = rows >= kAmxMinRows && use_amx.load(std::memory_order_relaxed);
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    if (amx) {
      configure_tiles();
      run(kAmxKernels, begin, end);
      release_tiles();
    } else {
      run(kKernels, begin, end);
    }
  });
#else
  at::parallel_for(0, packed.size(0), 1,
                   [&](int64_t begin, int64_t end) { run(kKernels, begin, end); });
#endif
  return out;
}

#if defined(__AVX512VNNI__)
// Turns the AMX path on or off (on only where the CPU has AMX-INT8 and Linux grants its tile
// state) and says whether it is on, so the Python side can log the path that runs.
bool q8_use_amx(bool wanted) {
  const bool on = wanted && amx_permitted();
  use_amx.store(on, std::memory_order_relaxed);
  return on;
}
#else
// The AVX2 build has no AMX path: the op exists so the Python side need not know the build.
bool q8_use_amx(bool) { return false; }
#endif

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
  m.def("use_amx(bool wanted) -> bool", &q8_use_amx);
}
