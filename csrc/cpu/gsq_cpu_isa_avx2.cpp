// The CPU kernels built for AVX2 + FMA (8 floats per register). Chosen at run time only on CPUs
// that report avx2 and fma (see gsq_cpu.cpp).
#include "gsq_cpu_kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define GSQ_CPU_ISA avx2
#define GSQ_CPU_ISA_X86_AVX2 1
#define GSQ_CPU_ISA_NAME "avx2"
#include "gsq_cpu_kernels_impl.h"
#pragma GCC pop_options

const gsq_cpu::KernelTable<float>* gsq_cpu::avx2_table_f32() {
  return &avx2::Table<float, 8>::value;
}
#else
const gsq_cpu::KernelTable<float>* gsq_cpu::avx2_table_f32() { return nullptr; }
#endif
