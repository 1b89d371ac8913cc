#include <cstdlib>
#include <cstring>

#include "kernels.h"

// LIMBS_INSTRUCTION_SET=avx2 or baseline forces a lower instruction set,
// so that all three builds can be tested on one machine.
const KernelTable& kernels() {
  static const KernelTable& chosen = [] () -> const KernelTable& {
    const char* forced = std::getenv("LIMBS_INSTRUCTION_SET");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) {
      return baseline::table;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    bool avx2Only = forced != nullptr && std::strcmp(forced, "avx2") == 0;
    if (!avx2Only && __builtin_cpu_supports("avx512f")) return avx512::table;
    if (__builtin_cpu_supports("avx2")) return avx2::table;
#endif
    return baseline::table;
  }();
  return chosen;
}
