// Included by the CPU files of the exact lookup (the sorted search, the refinement), which are
// built for the default target: what their arithmetic needs.
#pragma once

// Their float64 distances must round as the oracle's do: squares, then sums in order. A fused
// multiply-add would round once less and could order two nearly equal distances differently.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

// Their one O(V) loop (classifying codes, scoring a block of codes) is built once per
// instruction set and picked at load time; the rest of the file runs the default target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GSQ_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GSQ_SIMD_CLONES
#endif
