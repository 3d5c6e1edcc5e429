// One buffer carved into arrays, each starting at a multiple of 256 bytes (the alignment of
// cudaMalloc and of cub's scratch; more than any CPU array needs). A carver with a null base only
// measures: carve once to size the buffer, allocate it, then carve the same arrays into it.
// Plain C++, shared by the CPU glue and the CUDA kernels' host code.
#pragma once

#include <stddef.h>

namespace gsq_workspace {

struct Carver {
  char* base;
  size_t bytes = 0;  // carved so far

  template <typename T>
  T* take(size_t count) {
    T* out = base == nullptr ? nullptr : reinterpret_cast<T*>(base + bytes);
    bytes += (count * sizeof(T) + 255) / 256 * 256;
    return out;
  }
};

}  // namespace gsq_workspace
