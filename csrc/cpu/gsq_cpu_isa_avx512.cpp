// The CPU kernels built for AVX-512 (16 floats per register). Chosen at run time only on CPUs
// that report avx512f/dq/bw/vl and fma (see gsq_cpu.cpp).
#include "gsq_cpu_kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi2")
#define GSQ_CPU_ISA avx512
#define GSQ_CPU_ISA_X86_AVX512 1
#define GSQ_CPU_ISA_NAME "avx512"
#include "gsq_cpu_kernels_impl.h"
#pragma GCC pop_options

const gsq_cpu::KernelTable<float>* gsq_cpu::avx512_table_f32() {
  return &avx512::Table<float, 16>::value;
}
#else
const gsq_cpu::KernelTable<float>* gsq_cpu::avx512_table_f32() { return nullptr; }
#endif
