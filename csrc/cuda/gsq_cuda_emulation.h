// A minimal CUDA execution model on the CPU, so gsq_cuda_kernels.cu can be compiled as plain C++
// and its logic tested where no GPU exists (tests/test_cuda_kernels_emulated.py). Not a general
// emulator: only what those kernels use (1-D launches, __syncthreads, full-warp xor shuffles and
// votes, __shared__ arrays, half/bfloat16 conversions).
//
// Model: blocks run one after another; the threads of a block run as real threads, so
// __syncthreads is a barrier and a warp shuffle or vote is an exchange between 32 threads.
// __shared__ becomes `static`: one copy per kernel instantiation, which is exactly one per block
// because blocks never overlap. A thread that returns early drops out of the barriers, as on a
// GPU. Device memory is host memory.
//
// Tests also read what a GPU would not report: a log of the launches (kernel, blocks, threads)
// and named counters the kernels bump through GSQ_PROBE_* (no-ops in the CUDA build).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

typedef int cudaError_t;
typedef void* cudaStream_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace gsq_emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Dim thread_index;
inline thread_local Dim block_index;
inline Dim block_dim;
inline Dim grid_dim;

struct BlockState {
  explicit BlockState(int threads) : block_barrier(threads) {
    for (int w = 0; w < threads / 32; ++w) {
      warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
      exchange.emplace_back(32);
    }
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<std::vector<uint64_t>> exchange;
};

inline BlockState* block_state = nullptr;

struct Launch {
  std::string kernel;
  int blocks, threads;
};
inline std::mutex record_mutex;
inline std::vector<Launch> launches;
inline std::map<std::string, std::atomic<int64_t>> probes;

inline std::atomic<int64_t>& probe(const char* name) {
  std::lock_guard<std::mutex> lock(record_mutex);
  return probes[name];
}

inline void reset_records() {
  std::lock_guard<std::mutex> lock(record_mutex);
  launches.clear();
  for (auto& entry : probes) entry.second = 0;
}

inline void launch(const char* kernel, int blocks, int threads, const std::function<void()>& body) {
  {
    std::lock_guard<std::mutex> lock(record_mutex);
    launches.push_back(Launch{kernel, blocks, threads});
  }
  block_dim = Dim{static_cast<unsigned>(threads), 1, 1};
  grid_dim = Dim{static_cast<unsigned>(blocks), 1, 1};
  for (int b = 0; b < blocks; ++b) {
    BlockState state(threads);
    block_state = &state;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        block_index = Dim{static_cast<unsigned>(b), 0, 0};
        thread_index = Dim{static_cast<unsigned>(t), 0, 0};
        body();
        state.block_barrier.arrive_and_drop();
        state.warp_barriers[t / 32]->arrive_and_drop();
      });
    }
    for (auto& thread : pool) thread.join();
    block_state = nullptr;
  }
}

}  // namespace gsq_emu

#define threadIdx (gsq_emu::thread_index)
#define blockIdx (gsq_emu::block_index)
#define blockDim (gsq_emu::block_dim)
#define gridDim (gsq_emu::grid_dim)

inline void __syncthreads() { gsq_emu::block_state->block_barrier.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: always the full warp here*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  auto& slots = gsq_emu::block_state->exchange[warp];
  auto& barrier = *gsq_emu::block_state->warp_barriers[warp];
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  slots[lane] = bits;
  barrier.arrive_and_wait();
  const uint64_t other_bits = slots[lane ^ lane_mask];
  barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  T other;
  memcpy(&other, &other_bits, sizeof(T));
  return other;
}

inline unsigned __ballot_sync(unsigned /*mask: always the full warp here*/, bool predicate) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  auto& slots = gsq_emu::block_state->exchange[warp];
  auto& barrier = *gsq_emu::block_state->warp_barriers[warp];
  slots[lane] = predicate ? 1 : 0;
  barrier.arrive_and_wait();
  unsigned votes = 0;
  for (int l = 0; l < 32; ++l) votes |= static_cast<unsigned>(slots[l]) << l;
  barrier.arrive_and_wait();
  return votes;
}

inline bool __any_sync(unsigned mask, bool predicate) {
  return __ballot_sync(mask, predicate) != 0;
}

// Probes: GSQ_PROBE_ADD(name, v) adds v; GSQ_PROBE_MAX(name, v) keeps the largest v;
// GSQ_PROBE_WARP_ANY(name, p, v), called by a whole warp, adds v once if any lane's p holds.
#define GSQ_PROBE_ADD(name, value)                                  \
  do {                                                              \
    static std::atomic<int64_t>& gsq_probe_ = gsq_emu::probe(name); \
    gsq_probe_.fetch_add(static_cast<int64_t>(value));              \
  } while (0)
#define GSQ_PROBE_MAX(name, value)                                                               \
  do {                                                                                           \
    static std::atomic<int64_t>& gsq_probe_ = gsq_emu::probe(name);                              \
    const int64_t gsq_value_ = static_cast<int64_t>(value);                                      \
    int64_t gsq_seen_ = gsq_probe_.load();                                                       \
    while (gsq_seen_ < gsq_value_ && !gsq_probe_.compare_exchange_weak(gsq_seen_, gsq_value_)) { \
    }                                                                                            \
  } while (0)
#define GSQ_PROBE_WARP_ANY(name, predicate, value)                                                 \
  do {                                                                                             \
    if (__any_sync(0xffffffffu, (predicate)) && threadIdx.x % 32 == 0) GSQ_PROBE_ADD(name, value); \
  } while (0)

// IEEE half and bfloat16 storage types with round-to-nearest-even conversions.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16;
  uint32_t exponent = (h.bits >> 10) & 0x1f;
  uint32_t mantissa = h.bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      out = sign;
    } else {  // subnormal half: normalize
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      out = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
  } else {
    out = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  memcpy(&f, &out, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  // Through double: exact, then one correctly rounded step via the hardware's float16 support is
  // not available in plain C++, so round by hand.
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int exponent = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mantissa = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff)
    return __half{static_cast<uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u : 0))};
  if (exponent >= 0x1f) return __half{static_cast<uint16_t>(sign | 0x7c00u)};
  if (exponent <= 0) {
    if (exponent < -10) return __half{static_cast<uint16_t>(sign)};
    mantissa |= 0x800000u;
    const int shift = 14 - exponent;
    uint32_t half_mantissa = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return __half{static_cast<uint16_t>(sign | half_mantissa)};
  }
  uint32_t half_bits = sign | (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t remainder = mantissa & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (half_bits & 1u))) ++half_bits;
  return __half{static_cast<uint16_t>(half_bits)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u)
    return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>((x + rounding) >> 16)};
}
