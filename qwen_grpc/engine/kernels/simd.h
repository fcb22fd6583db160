// AVX512 helpers shared by the KV kernels (kv.cpp, paged.cpp): element loads that widen
// int8 / bf16 / float32 to float32 exactly, the 16-way horizontal reduction that turns 16 dot
// products into one vector of scores, and the exp used by their softmax. Header-only and
// inline so each translation unit keeps its own copy inside the extension; native.py hashes
// this file with the sources, so a change here rebuilds.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace qwen_simd {

constexpr int64_t kLanes = 16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// bf16 is the high half of a float32: widening is a 16-bit shift, exact.
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The integer converted to float exactly (the scale is applied by the caller).
inline __m512 load16(const int8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

// Lane i of the result is the sum of the 16 lanes of v[i].
inline __m512 reduce16(const __m512* v) {
  __m512 half[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = v[2 * i];
    const __m512 b = v[2 * i + 1];
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 quarter[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 a = half[2 * i];
    const __m512 b = half[2 * i + 1];
    quarter[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  __m512 pair[2];
  for (int i = 0; i < 2; ++i) {
    const __m512 a = quarter[2 * i];
    const __m512 b = quarter[2 * i + 1];
    pair[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 mixed = _mm512_add_ps(_mm512_shuffle_ps(pair[0], pair[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_ps(pair[0], pair[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // mixed lane 4k + m holds v[4m + k]
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, mixed);
}

// exp(x) for x <= 0 (scores minus their max): Cody-Waite reduction by ln 2, a degree-6
// polynomial on [-ln2/2, ln2/2] (relative error ~2e-7) and vscalefps for 2^n, which flushes
// to 0 below float range instead of wrapping.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace qwen_simd
