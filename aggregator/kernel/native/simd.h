// The few vector operations the limb kernels need, for the instruction set
// this file is compiled for: AVX-512 (8 float64 lanes), AVX2 (4 lanes) or
// plain scalar code. kernels.cc is compiled once per instruction set.
#pragma once

#include <cmath>
#include <cstddef>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define INLINE inline __attribute__((always_inline))

// Internal linkage: each instruction set's copy stays in its own object
// file, so the linker cannot mix an AVX-512 body into the baseline code.
namespace {
namespace simd {

// Elements per value check: 16 float32, one AVX-512 register.
constexpr size_t BLOCK = 16;

#if defined(__AVX512F__)
constexpr size_t LANES = 8;
using Vec = __m512d;
INLINE Vec widen(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
INLINE Vec load(const double* p) { return _mm512_loadu_pd(p); }
INLINE void store(double* p, Vec v) { _mm512_storeu_pd(p, v); }
INLINE Vec broadcast(double x) { return _mm512_set1_pd(x); }
INLINE Vec add(Vec a, Vec b) { return _mm512_add_pd(a, b); }
INLINE Vec sub(Vec a, Vec b) { return _mm512_sub_pd(a, b); }
INLINE Vec mul(Vec a, Vec b) { return _mm512_mul_pd(a, b); }
// a * b + c with one rounding. Used only where a * b is exact, so it equals
// mul then add bit for bit.
INLINE Vec mulAddExact(Vec a, Vec b, Vec c) { return _mm512_fmadd_pd(a, b, c); }
INLINE Vec truncate(Vec a) {
  return _mm512_roundscale_pd(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
}
INLINE Vec roundDown(Vec a) {
  return _mm512_roundscale_pd(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
// True when all 16 |values| <= limit; false for NaN (ordered compare).
INLINE bool blockValid(const float* p, float limit) {
  __m512 magnitude = _mm512_abs_ps(_mm512_loadu_ps(p));
  return _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(limit), _CMP_LE_OQ) ==
         0xffff;
}
#elif defined(__AVX2__)
constexpr size_t LANES = 4;
using Vec = __m256d;
INLINE Vec widen(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
INLINE Vec load(const double* p) { return _mm256_loadu_pd(p); }
INLINE void store(double* p, Vec v) { _mm256_storeu_pd(p, v); }
INLINE Vec broadcast(double x) { return _mm256_set1_pd(x); }
INLINE Vec add(Vec a, Vec b) { return _mm256_add_pd(a, b); }
INLINE Vec sub(Vec a, Vec b) { return _mm256_sub_pd(a, b); }
INLINE Vec mul(Vec a, Vec b) { return _mm256_mul_pd(a, b); }
INLINE Vec mulAddExact(Vec a, Vec b, Vec c) { return add(mul(a, b), c); }
INLINE Vec truncate(Vec a) {
  return _mm256_round_pd(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
}
INLINE Vec roundDown(Vec a) {
  return _mm256_round_pd(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
INLINE bool blockValid(const float* p, float limit) {
  __m256 signBits = _mm256_set1_ps(-0.0f);
  __m256 bound = _mm256_set1_ps(limit);
  __m256 first = _mm256_andnot_ps(signBits, _mm256_loadu_ps(p));
  __m256 second = _mm256_andnot_ps(signBits, _mm256_loadu_ps(p + 8));
  __m256 valid = _mm256_and_ps(_mm256_cmp_ps(first, bound, _CMP_LE_OQ),
                               _mm256_cmp_ps(second, bound, _CMP_LE_OQ));
  return _mm256_movemask_ps(valid) == 0xff;
}
#else
constexpr size_t LANES = 1;
using Vec = double;
INLINE Vec widen(const float* p) { return static_cast<double>(*p); }
INLINE Vec load(const double* p) { return *p; }
INLINE void store(double* p, Vec v) { *p = v; }
INLINE Vec broadcast(double x) { return x; }
INLINE Vec add(Vec a, Vec b) { return a + b; }
INLINE Vec sub(Vec a, Vec b) { return a - b; }
INLINE Vec mul(Vec a, Vec b) { return a * b; }
INLINE Vec mulAddExact(Vec a, Vec b, Vec c) { return a * b + c; }
INLINE Vec truncate(Vec a) { return std::trunc(a); }
INLINE Vec roundDown(Vec a) { return std::floor(a); }
INLINE bool blockValid(const float* p, float limit) {
  bool valid = true;
  for (size_t j = 0; j < BLOCK; j++) valid &= std::fabs(p[j]) <= limit;
  return valid;
}
#endif

}  // namespace simd
}  // namespace
