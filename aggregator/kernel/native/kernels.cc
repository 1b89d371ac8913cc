#include "kernels.h"

#include <cfloat>
#include <cmath>

#include "simd.h"

namespace KERNEL_NAMESPACE {
namespace {

using namespace simd;

constexpr double SCALE = 67108864.0;  // 2^26
// Updates summed in registers per pass over the state (8 or 16).
#ifndef MAX_CHUNK
#define MAX_CHUNK 8
#endif
// Elements ahead of the current block that the batched kernel prefetches,
// in the inputs and in the three state arrays (2 KB ahead per input, 4 KB
// per state array). Prefetching the state as well cut
// 100 updates of 1e6 values in batches of 8 from 26 ms to 18 ms (AMD EPYC
// family 26 VM, AVX-512 build; TypedArray.set of the same bytes 14 ms).
// Distances from 256 to 2048 measured the same. PREFETCH_DISTANCE
// overrides it for experiments.
#ifndef PREFETCH_DISTANCE
#define PREFETCH_DISTANCE 512
#endif

struct Limbs {
  double whole, high, low;
};

struct VecLimbs {
  Vec whole, high, low;
};

// floor(x + 0.5) is Math.round here: x has at most 50 significant bits, so
// x + 0.5 is exact and never rounds across an integer.
INLINE Limbs split(float value, double n) {
  double product = static_cast<double>(value) * n;
  double whole = std::trunc(product);
  double fraction = (product - whole) * SCALE;
  double high = std::trunc(fraction);
  double low = std::floor((fraction - high) * SCALE + 0.5);
  return {whole, high, low};
}

// The same steps as split, on LANES values at `values`.
INLINE VecLimbs splitVec(const float* values, Vec n) {
  Vec product = mul(widen(values), n);
  Vec whole = truncate(product);
  Vec fraction = mul(sub(product, whole), broadcast(SCALE));
  Vec high = truncate(fraction);
  // (fraction - high) * 2^26 is exact, so fusing the + 0.5 rounds once,
  // exactly like the separate multiply and add.
  Vec low = roundDown(
      mulAddExact(sub(fraction, high), broadcast(SCALE), broadcast(0.5)));
  return {whole, high, low};
}

// Returns the largest float32 at most `limit`. Comparing a float32 with it
// gives the same result as comparing the float64 value with `limit`.
INLINE float float32AtMost(double limit) {
  if (std::isnan(limit)) return NAN;
  if (limit == INFINITY) return INFINITY;
  if (limit >= FLT_MAX) return FLT_MAX;
  if (limit < -FLT_MAX) return -INFINITY;
  float rounded = static_cast<float>(limit);
  if (rounded > limit) rounded = std::nextafter(rounded, -INFINITY);
  return rounded;
}

INLINE int64_t firstInvalid(const float* values, size_t from, size_t to,
                            double maxAbs) {
  for (size_t i = from; i < to; i++) {
    if (!(std::fabs(static_cast<double>(values[i])) <= maxAbs)) {
      return static_cast<int64_t>(i);
    }
  }
  return -1;
}

template <bool Subtract>
INLINE void combine(double* state, double limb) {
  *state = Subtract ? *state - limb : *state + limb;
}

template <bool Subtract>
INLINE void combineVec(double* state, Vec limb) {
  store(state, Subtract ? sub(load(state), limb) : add(load(state), limb));
}

template <bool Subtract>
INLINE void separateBlock(double* whole, double* high, double* low,
                          const float* values, Vec n) {
  for (size_t j = 0; j < BLOCK; j += LANES) {
    VecLimbs limbs = splitVec(values + j, n);
    combineVec<Subtract>(whole + j, limbs.whole);
    combineVec<Subtract>(high + j, limbs.high);
    combineVec<Subtract>(low + j, limbs.low);
  }
}

template <bool Subtract>
INLINE void separateRange(double* whole, double* high, double* low,
                          const float* values, size_t from, size_t to,
                          double n) {
  Vec examples = broadcast(n);
  size_t i = from;
  for (; i + BLOCK <= to; i += BLOCK) {
    separateBlock<Subtract>(whole + i, high + i, low + i, values + i,
                            examples);
  }
  for (; i < to; i++) {
    Limbs limbs = split(values[i], n);
    combine<Subtract>(whole + i, limbs.whole);
    combine<Subtract>(high + i, limbs.high);
    combine<Subtract>(low + i, limbs.low);
  }
}

// Adds values[0, count) block by block, checking each block before adding
// it. On an invalid value it subtracts what it added and returns the index.
INLINE int64_t addSeparateInline(double* whole, double* high, double* low,
                                 const float* values, size_t count, double n,
                                 double maxAbs) {
  float limit = float32AtMost(maxAbs);
  Vec examples = broadcast(n);
  size_t i = 0;
  for (; i + BLOCK <= count; i += BLOCK) {
    if (!blockValid(values + i, limit)) break;
    separateBlock<false>(whole + i, high + i, low + i, values + i, examples);
  }
  int64_t invalid = firstInvalid(values, i, count, maxAbs);
  if (invalid < 0) {
    separateRange<false>(whole, high, low, values, i, count, n);
    return -1;
  }
  separateRange<true>(whole, high, low, values, 0, i, n);
  return invalid;
}

// Scans the updates in order for the first invalid value, after the
// caller has taken back everything the batch added.
BatchFailure scanBatch(const float* const* values, const double* maxAbs,
                       size_t updates, size_t count) {
  for (size_t k = 0; k < updates; k++) {
    int64_t index = firstInvalid(values[k], 0, count, maxAbs[k]);
    if (index >= 0) return {static_cast<int64_t>(k), index};
  }
  return {-1, -1};
}

// Prefetches the BLOCK float64 state elements at `state` (two cache lines)
// for writing. Without -mprfchw the compiler emits prefetcht0 instead.
INLINE void prefetchStateBlock(const double* state) {
  static_assert(BLOCK * sizeof(double) == 128, "two 64-byte lines per block");
  __builtin_prefetch(state, 1);
  __builtin_prefetch(state + 8, 1);
}

// Adds the B updates at `values` with their limbs summed in registers.
// Integer-valued limb sums below 2^53 are exact, so summing the batch
// first gives the same state as adding update after update. Returns true,
// or on an invalid value undoes its own work and returns false.
template <size_t B>
INLINE bool registersChunk(double* whole, double* high, double* low,
                           const float* const* values, const double* n,
                           const double* maxAbs, size_t count) {
  const float* input[B];
  Vec examples[B];
  float limit[B];
  for (size_t k = 0; k < B; k++) {
    input[k] = values[k];
    examples[k] = broadcast(n[k]);
    limit[k] = float32AtMost(maxAbs[k]);
  }
  size_t i = 0;
  for (; i + BLOCK <= count; i += BLOCK) {
    bool valid = true;
    for (size_t k = 0; k < B; k++) valid &= blockValid(input[k] + i, limit[k]);
    if (!valid) break;
    for (size_t k = 0; k < B; k++) {
      __builtin_prefetch(input[k] + i + PREFETCH_DISTANCE);
    }
    prefetchStateBlock(whole + i + PREFETCH_DISTANCE);
    prefetchStateBlock(high + i + PREFETCH_DISTANCE);
    prefetchStateBlock(low + i + PREFETCH_DISTANCE);
    for (size_t j = i; j < i + BLOCK; j += LANES) {
      // Starting from the first update's limbs (not from +0.0) saves three
      // adds. Only the sign of a zero sum can differ, and adding either
      // zero leaves the state unchanged, because the state starts at +0.0
      // and so never contains -0.0.
      VecLimbs first = splitVec(input[0] + j, examples[0]);
      Vec sumWhole = first.whole;
      Vec sumHigh = first.high;
      Vec sumLow = first.low;
      for (size_t k = 1; k < B; k++) {
        VecLimbs limbs = splitVec(input[k] + j, examples[k]);
        sumWhole = add(sumWhole, limbs.whole);
        sumHigh = add(sumHigh, limbs.high);
        sumLow = add(sumLow, limbs.low);
      }
      combineVec<false>(whole + j, sumWhole);
      combineVec<false>(high + j, sumHigh);
      combineVec<false>(low + j, sumLow);
    }
  }
  bool valid = true;
  for (size_t k = 0; k < B; k++) {
    valid &= firstInvalid(input[k], i, count, maxAbs[k]) < 0;
  }
  if (valid) {
    for (size_t k = 0; k < B; k++) {
      separateRange<false>(whole, high, low, input[k], i, count, n[k]);
    }
    return true;
  }
  for (size_t k = 0; k < B; k++) {
    separateRange<true>(whole, high, low, input[k], 0, i, n[k]);
  }
  return false;
}

int64_t addSeparate(double* whole, double* high, double* low,
                    const float* values, size_t count, double n,
                    double maxAbs) {
  return addSeparateInline(whole, high, low, values, count, n, maxAbs);
}

void subtractSeparate(double* whole, double* high, double* low,
                      const float* values, size_t count, double n) {
  separateRange<true>(whole, high, low, values, 0, count, n);
}

BatchFailure addBatchRegisters(double* whole, double* high, double* low,
                               const float* const* values, const double* n,
                               const double* maxAbs, size_t updates,
                               size_t count) {
  size_t k = 0;
  while (k < updates) {
    size_t left = updates - k;
    size_t chunk = left >= MAX_CHUNK ? MAX_CHUNK
                   : left >= 8        ? 8
                   : left >= 4        ? 4
                   : left >= 2        ? 2
                                      : 1;
    bool added;
    switch (chunk) {
      case 16:
        added = registersChunk<16>(whole, high, low, values + k, n + k,
                                   maxAbs + k, count);
        break;
      case 8:
        added = registersChunk<8>(whole, high, low, values + k, n + k,
                                  maxAbs + k, count);
        break;
      case 4:
        added = registersChunk<4>(whole, high, low, values + k, n + k,
                                  maxAbs + k, count);
        break;
      case 2:
        added = registersChunk<2>(whole, high, low, values + k, n + k,
                                  maxAbs + k, count);
        break;
      default:
        added = addSeparateInline(whole, high, low, values[k], count, n[k],
                                  maxAbs[k]) < 0;
    }
    if (!added) {
      for (size_t done = 0; done < k; done++) {
        separateRange<true>(whole, high, low, values[done], 0, count,
                            n[done]);
      }
      return scanBatch(values, maxAbs, updates, count);
    }
    k += chunk;
  }
  return {-1, -1};
}

}  // namespace

extern const KernelTable table = {
    KERNEL_NAME, addSeparate, subtractSeparate, addBatchRegisters,
};

}  // namespace KERNEL_NAMESPACE
