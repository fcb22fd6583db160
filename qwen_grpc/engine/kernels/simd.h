// A vector of 16 float32 lanes for every kernel of the extension, on two instruction sets: one
// __m512 where the build has AVX-512, two __m256 halves (lanes 0-7, 8-15) in the AVX2 build.
// The kernels are written once against these functions, so both builds run the same algorithm.
//
// Both builds also give the same bits. Every operation is lane-wise except the reductions, and
// those follow one summation tree in both: reduce_add and reduce_max are the order of GCC's
// _mm512_reduce_*_ps (lane l with lane l + 8, then l + 4, l + 2, l + 1), reduce16 applies
// that same tree to each of its 16 vectors, and exp_nonpositive's 2^n scaling rounds once in
// both (vscalefps, or two exact power-of-two factors whose second product is the only
// rounding). Header-only and inline, so each translation unit keeps its own copy; native.py
// hashes this file with the sources, so a change here rebuilds.

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace qwen_simd {

constexpr int64_t kLanes = 16;

#if defined(__AVX512F__)

constexpr bool kWide = true;  // 32 vector registers of 16 lanes
using F32x16 = __m512;
using I32x16 = __m512i;
using Mask16 = __mmask16;

inline F32x16 zeros() { return _mm512_setzero_ps(); }
inline F32x16 broadcast(float x) { return _mm512_set1_ps(x); }
inline F32x16 load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, F32x16 v) { _mm512_storeu_ps(p, v); }
inline F32x16 add(F32x16 a, F32x16 b) { return _mm512_add_ps(a, b); }
inline F32x16 sub(F32x16 a, F32x16 b) { return _mm512_sub_ps(a, b); }
inline F32x16 mul(F32x16 a, F32x16 b) { return _mm512_mul_ps(a, b); }
inline F32x16 div(F32x16 a, F32x16 b) { return _mm512_div_ps(a, b); }
inline F32x16 maximum(F32x16 a, F32x16 b) { return _mm512_max_ps(a, b); }
inline F32x16 absolute(F32x16 a) { return _mm512_abs_ps(a); }
// a * b + c with one rounding.
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) { return _mm512_fmadd_ps(a, b, c); }
// c - a * b with one rounding.
inline F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) { return _mm512_fnmadd_ps(a, b, c); }
inline float reduce_add(F32x16 v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(F32x16 v) { return _mm512_reduce_max_ps(v); }

// Lanes [0, width), width in [0, 16].
inline Mask16 prefix(int64_t width) { return static_cast<Mask16>((1u << width) - 1u); }
inline F32x16 load_masked(Mask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline void store_masked(float* p, Mask16 m, F32x16 v) { _mm512_mask_storeu_ps(p, m, v); }
// m ? yes : no, lane by lane.
inline F32x16 select(Mask16 m, F32x16 yes, F32x16 no) { return _mm512_mask_mov_ps(no, m, yes); }
inline Mask16 not_equal(F32x16 a, F32x16 b) { return _mm512_cmpneq_ps_mask(a, b); }
inline I32x16 load_int(const int32_t* p) {
  return _mm512_loadu_si512(reinterpret_cast<const void*>(p));
}
// The lanes where t < limits.
inline Mask16 below(int32_t t, I32x16 limits) {
  return _mm512_cmplt_epi32_mask(_mm512_set1_epi32(t), limits);
}

inline F32x16 load16(const float* p) { return _mm512_loadu_ps(p); }

// bf16 is the high half of a float32: widening is a 16-bit shift, exact.
inline F32x16 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The integer converted to float exactly (the scale is applied by the caller).
inline F32x16 load16(const int8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

// v rounded to the nearest integer (ties to even) and saturated to int8, into p[0, 16).
inline void store_int8(int8_t* p, F32x16 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}

// Lane i of the result is the sum of the 16 lanes of v[i].
inline F32x16 reduce16(const F32x16* v) {
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

// The 16 bf16 pairs at p widened to float32: even lanes from p[2i], odd lanes from p[2i + 1].
inline void load_bf16_pairs(const uint16_t* p, F32x16& even, F32x16& odd) {
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(p));
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
}

inline F32x16 round_to_integer(F32x16 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// p * 2^n for integral n in [-150, 0], rounded once.
inline F32x16 scale_by_power_of_two(F32x16 p, F32x16 n) { return _mm512_scalef_ps(p, n); }

#else  // AVX2 + FMA

constexpr bool kWide = false;  // 16 vector registers of 8 lanes
struct F32x16 {
  __m256 lo;  // lanes 0-7
  __m256 hi;  // lanes 8-15
};
struct I32x16 {
  __m256i lo;
  __m256i hi;
};
using Mask16 = F32x16;  // all-ones lanes where true

inline F32x16 zeros() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F32x16 broadcast(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, F32x16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline F32x16 add(F32x16 a, F32x16 b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline F32x16 sub(F32x16 a, F32x16 b) {
  return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
}
inline F32x16 mul(F32x16 a, F32x16 b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline F32x16 div(F32x16 a, F32x16 b) {
  return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)};
}
inline F32x16 maximum(F32x16 a, F32x16 b) {
  return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)};
}
inline F32x16 absolute(F32x16 a) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, magnitude), _mm256_and_ps(a.hi, magnitude)};
}
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}

// GCC's _mm512_reduce_*_ps tree: halves, then quarters, then pairs, then the last two lanes.
template <typename Op256, typename Op128>
inline float reduce_tree(F32x16 v, Op256 op256, Op128 op128) {
  const __m256 eight = op256(v.hi, v.lo);
  const __m128 four = op128(_mm256_extractf128_ps(eight, 1), _mm256_castps256_ps128(eight));
  const __m128 two = op128(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(op128(two, _mm_shuffle_ps(two, two, _MM_SHUFFLE(0, 1, 0, 1))));
}
inline float reduce_add(F32x16 v) {
  return reduce_tree(
      v, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); },
      [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
}
inline float reduce_max(F32x16 v) {
  return reduce_tree(
      v, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); },
      [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
}

inline Mask16 prefix(int64_t width) {
  const __m256i n = _mm256_set1_epi32(static_cast<int32_t>(width));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))),
          _mm256_castsi256_ps(
              _mm256_cmpgt_epi32(n, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)))};
}
inline F32x16 load_masked(Mask16 m, const float* p) {
  return {_mm256_maskload_ps(p, _mm256_castps_si256(m.lo)),
          _mm256_maskload_ps(p + 8, _mm256_castps_si256(m.hi))};
}
inline void store_masked(float* p, Mask16 m, F32x16 v) {
  _mm256_maskstore_ps(p, _mm256_castps_si256(m.lo), v.lo);
  _mm256_maskstore_ps(p + 8, _mm256_castps_si256(m.hi), v.hi);
}
inline F32x16 select(Mask16 m, F32x16 yes, F32x16 no) {
  return {_mm256_blendv_ps(no.lo, yes.lo, m.lo), _mm256_blendv_ps(no.hi, yes.hi, m.hi)};
}
inline Mask16 not_equal(F32x16 a, F32x16 b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_NEQ_UQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_NEQ_UQ)};
}
inline I32x16 load_int(const int32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
}
inline Mask16 below(int32_t t, I32x16 limits) {
  const __m256i n = _mm256_set1_epi32(t);
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(limits.lo, n)),
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(limits.hi, n))};
}

inline F32x16 load16(const float* p) { return load(p); }

inline __m256 widen_bf16(__m128i raw) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline F32x16 load16(const c10::BFloat16* p) {
  const __m128i* raw = reinterpret_cast<const __m128i*>(p);
  return {widen_bf16(_mm_loadu_si128(raw)), widen_bf16(_mm_loadu_si128(raw + 1))};
}

inline F32x16 load16(const int8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)))};
}

// Saturating int32 -> int16 -> int8 clamps to the same value as one int32 -> int8 step.
inline void store_int8(int8_t* p, F32x16 v) {
  const __m256i words = _mm256_permute4x64_epi64(
      _mm256_packs_epi32(_mm256_cvtps_epi32(v.lo), _mm256_cvtps_epi32(v.hi)), _MM_SHUFFLE(3, 1, 2, 0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
}

// Lane i of the result is the sum of the 16 lanes of v[i], by reduce_add's tree.
inline F32x16 reduce16(const F32x16* v) {
  __m256 eight[16];  // lane l + lane l + 8
  for (int i = 0; i < 16; ++i) eight[i] = _mm256_add_ps(v[i].lo, v[i].hi);
  __m256 four[8];  // [v[2i] (4 lanes), v[2i + 1] (4 lanes)]: lane l + lane l + 4
  for (int i = 0; i < 8; ++i) {
    const __m256 a = eight[2 * i];
    const __m256 b = eight[2 * i + 1];
    four[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  __m256 two[4];  // low half [v[4i], v[4i + 2]], high half [v[4i + 1], v[4i + 3]], 2 lanes each
  for (int i = 0; i < 4; ++i) {
    const __m256 a = four[2 * i];
    const __m256 b = four[2 * i + 1];
    two[i] = _mm256_add_ps(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m256 one[2];  // lanes hold v[8i + 0, 2, 4, 6, 1, 3, 5, 7]
  for (int i = 0; i < 2; ++i) {
    const __m256 a = two[2 * i];
    const __m256 b = two[2 * i + 1];
    one[i] = _mm256_add_ps(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  return {_mm256_permutevar8x32_ps(one[0], order), _mm256_permutevar8x32_ps(one[1], order)};
}

inline void load_bf16_pairs(const uint16_t* p, F32x16& even, F32x16& odd) {
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
  odd = {_mm256_castsi256_ps(_mm256_and_si256(lo, high)), _mm256_castsi256_ps(_mm256_and_si256(hi, high))};
}

inline F32x16 round_to_integer(F32x16 x) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, kMode), _mm256_round_ps(x.hi, kMode)};
}

// p * 2^(n - n / 2) * 2^(n / 2): both factors are normal floats for n >= -150 and the first
// product is exact, so only the second rounds, as vscalefps does.
inline __m256 scale_half(__m256 p, __m256 n) {
  const __m256i exponent = _mm256_cvtps_epi32(n);
  const __m256i first = _mm256_srai_epi32(exponent, 1);
  const __m256i second = _mm256_sub_epi32(exponent, first);
  const __m256i bias = _mm256_set1_epi32(127);
  const auto power = [&](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, bias), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, power(first)), power(second));
}
inline F32x16 scale_by_power_of_two(F32x16 p, F32x16 n) {
  return {scale_half(p.lo, n.lo), scale_half(p.hi, n.hi)};
}

#endif

// exp(x) for x <= 0 (scores minus their max): Cody-Waite reduction by ln 2, a degree-6
// polynomial on [-ln2/2, ln2/2] (relative error ~2e-7) and 2^n by exponent scaling, which
// flushes to 0 below float range instead of wrapping.
inline F32x16 exp_nonpositive(F32x16 x) {
  x = maximum(x, broadcast(-104.0f));
  const F32x16 n = round_to_integer(mul(x, broadcast(1.44269504088896341f)));
  F32x16 r = fnmadd(n, broadcast(0.693145751953125f), x);
  r = fnmadd(n, broadcast(1.428606765330187045e-06f), r);
  F32x16 p = broadcast(1.0f / 720.0f);
  p = fmadd(p, r, broadcast(1.0f / 120.0f));
  p = fmadd(p, r, broadcast(1.0f / 24.0f));
  p = fmadd(p, r, broadcast(1.0f / 6.0f));
  p = fmadd(p, r, broadcast(0.5f));
  p = fmadd(p, r, broadcast(1.0f));
  p = fmadd(p, r, broadcast(1.0f));
  return scale_by_power_of_two(p, n);
}

}  // namespace qwen_simd
