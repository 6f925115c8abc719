// Run-time ISA choice shared by the CPU kernels that compile their hot loops
// twice (upsample_ce_kernel.cpp, parse_postprocess_kernel.cpp): once for the
// baseline ISA and once for AVX2 + FMA, picked per call by use_avx2(). The
// build passes no -march, so the AVX2 variant only runs where the CPU has it;
// LIPFAST_CPU_NO_AVX2=1 forces the baseline variant (the tests use it).
//
// - LIPFAST_X86_VARIANTS: 1 on x86 with GCC/clang (two variants), else 0 (the
//   "AVX2" variant is a second copy of the baseline one);
// - LIPFAST_TARGET_AVX2: the function attribute of the AVX2 variants;
// - LIPFAST_ALWAYS_INLINE: for the helpers inlined into both variants (their
//   vector arguments never cross a call).
#pragma once

#include <cstdlib>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LIPFAST_X86_VARIANTS 1
#define LIPFAST_ALWAYS_INLINE __attribute__((always_inline))
#define LIPFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define LIPFAST_X86_VARIANTS 0
#define LIPFAST_ALWAYS_INLINE
#define LIPFAST_TARGET_AVX2
#endif

namespace lipfast {
namespace ops {
namespace cpu {

// Whether to run the AVX2 + FMA variants (read once per process).
inline bool use_avx2() {
#if LIPFAST_X86_VARIANTS
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("LIPFAST_CPU_NO_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace ops
}  // namespace lipfast
