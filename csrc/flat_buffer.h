// Plain C++ behind gkd._C: page-aligned (optionally page-locked) host memory, threaded scatter/gather
// copies between tensors and one flat byte buffer, and a threaded CRC-32. No torch, no Python here;
// bindings.cpp checks arguments and releases the GIL around these calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gkd {

struct HostAllocation {
  void* ptr = nullptr;
  size_t nbytes = 0;            // bytes mapped (the request rounded up to whole pages)
  bool locked = false;          // mlock succeeded
  bool cuda_registered = false; // cudaHostRegister succeeded
  std::string lock_error;       // why locking or registering was refused, empty if it was not asked for
};

// mmap'ed anonymous memory: page-aligned and zero-filled. With `pin`, mlock'ed; with `register_cuda` as
// well, registered with the CUDA runtime found in the process (dlopen of libcudart, never linked).
HostAllocation alloc_host(size_t nbytes, bool pin, bool register_cuda);

// Undoes alloc_host (unregister, munlock, munmap). Safe to call from any thread.
void free_host(const HostAllocation& alloc);

// One contiguous byte copy.
struct CopySpan {
  const uint8_t* src;
  uint8_t* dst;
  size_t nbytes;
};

// Copies every span, splitting the total byte count evenly over `num_threads` threads (one thread below
// a few MiB, where starting threads costs more than it saves). Spans must not overlap one another.
void parallel_copy(const std::vector<CopySpan>& spans, int num_threads);

// CRC-32 (zlib's) of `nbytes` bytes at `data`; chunks on `num_threads` threads, combined exactly.
uint32_t parallel_crc32(const uint8_t* data, size_t nbytes, int num_threads);

}  // namespace gkd
