// Exact FedAvg limb kernels on caller memory. Every
// kernel computes, for each value v and example count n,
//
//   product = double(v) * n                 (exact: 24 bits times <= 26)
//   whole   = trunc(product)
//   high    = trunc((product - whole) * 2^26)
//   low     = floor(((product - whole) * 2^26 - high) * 2^26 + 0.5)
//
// which are the limbs of addLimbs in aggregator/kernel/exact-sums.ts, and
// adds them to (or subtracts them from) the state. Build with
// -ffp-contract=off and without -ffast-math so that the compiler keeps
// every rounding step as written.
//
// kernels.cc is compiled once per instruction set, each time into its own
// namespace (KERNEL_NAMESPACE); dispatch.cc picks one table at load time.
#pragma once

#include <cstddef>
#include <cstdint>

// Result of a batched add: update < 0 when every value was valid.
struct BatchFailure {
  int64_t update;
  int64_t index;
};

struct KernelTable {
  const char* instructionSet;
  // One update, state as three arrays. Adds values * n and returns -1 when
  // every |value| <= maxAbs. Otherwise it leaves the state unchanged and
  // returns the first invalid index.
  int64_t (*addSeparate)(double* whole, double* high, double* low,
                         const float* values, size_t count, double n,
                         double maxAbs);
  void (*subtractSeparate)(double* whole, double* high, double* low,
                           const float* values, size_t count, double n);
  // A batch of any size, taken in chunks of up to MAX_CHUNK updates (8 by
  // default) whose limbs are summed in registers, then added to the state.
  BatchFailure (*addBatchRegisters)(double* whole, double* high, double* low,
                                    const float* const* values,
                                    const double* n, const double* maxAbs,
                                    size_t updates, size_t count);
};

namespace avx512 { extern const KernelTable table; }
namespace avx2 { extern const KernelTable table; }
namespace baseline { extern const KernelTable table; }

// The table for this CPU: AVX-512, AVX2 or baseline x86-64.
const KernelTable& kernels();
