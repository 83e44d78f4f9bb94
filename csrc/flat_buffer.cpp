#include "flat_buffer.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <thread>

#include "crc32.h"

namespace gkd {
namespace {

// Below this many bytes one thread does the work: a thread start costs ~20-50 us, ~0.5 MiB of copying.
constexpr size_t kMinBytesPerThread = size_t{2} << 20;

size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

using CudaHostRegisterFn = int (*)(void*, size_t, unsigned int);
using CudaHostUnregisterFn = int (*)(void*);

struct CudaRuntime {
  CudaHostRegisterFn host_register = nullptr;
  CudaHostUnregisterFn host_unregister = nullptr;
};

// The CUDA runtime torch already loaded (RTLD_NOLOAD), else any libcudart on the loader path. gkd never
// links against CUDA, so the extension builds and imports with CPU-only torch.
const CudaRuntime& cuda_runtime() {
  static const CudaRuntime runtime = [] {
    CudaRuntime rt;
    const char* names[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};
    void* handle = nullptr;
    for (int mode : {RTLD_LAZY | RTLD_NOLOAD, RTLD_LAZY}) {
      for (const char* name : names) {
        if ((handle = dlopen(name, mode)) != nullptr) break;
      }
      if (handle != nullptr) break;
    }
    if (handle != nullptr) {
      rt.host_register = reinterpret_cast<CudaHostRegisterFn>(dlsym(handle, "cudaHostRegister"));
      rt.host_unregister = reinterpret_cast<CudaHostUnregisterFn>(dlsym(handle, "cudaHostUnregister"));
    }
    return rt;
  }();
  return runtime;
}

int clamp_threads(int num_threads, size_t nbytes) {
  const size_t by_size = std::max<size_t>(1, nbytes / kMinBytesPerThread);
  return static_cast<int>(std::min<size_t>(std::max(1, num_threads), by_size));
}

// Runs fn(t) for t in [0, n) with t = 0 on the calling thread.
template <typename Fn>
void run_threads(int n, Fn&& fn) {
  std::vector<std::thread> workers;
  workers.reserve(n - 1);
  for (int t = 1; t < n; ++t) workers.emplace_back(fn, t);
  fn(0);
  for (auto& w : workers) w.join();
}

}  // namespace

HostAllocation alloc_host(size_t nbytes, bool pin, bool register_cuda) {
  HostAllocation alloc;
  const size_t page = page_size();
  alloc.nbytes = std::max<size_t>(page, (nbytes + page - 1) / page * page);
  void* ptr = mmap(nullptr, alloc.nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) throw std::bad_alloc();
  alloc.ptr = ptr;
  if (!pin) return alloc;
  if (mlock(ptr, alloc.nbytes) == 0) {
    alloc.locked = true;
  } else {
    alloc.lock_error = std::string("mlock failed: ") + std::strerror(errno) +
                       " (raise RLIMIT_MEMLOCK, e.g. `ulimit -l unlimited`, or run with CAP_IPC_LOCK)";
  }
  if (register_cuda) {
    const CudaRuntime& rt = cuda_runtime();
    if (rt.host_register == nullptr || rt.host_unregister == nullptr) {
      alloc.lock_error += (alloc.lock_error.empty() ? "" : "; ");
      alloc.lock_error += "cudaHostRegister not found: no libcudart is loaded";
    } else if (int err = rt.host_register(ptr, alloc.nbytes, 0); err == 0) {
      alloc.cuda_registered = true;
    } else {
      alloc.lock_error += (alloc.lock_error.empty() ? "" : "; ");
      alloc.lock_error += "cudaHostRegister failed with cudaError " + std::to_string(err);
    }
  }
  return alloc;
}

void free_host(const HostAllocation& alloc) {
  if (alloc.ptr == nullptr) return;
  if (alloc.cuda_registered) cuda_runtime().host_unregister(alloc.ptr);
  if (alloc.locked) munlock(alloc.ptr, alloc.nbytes);
  munmap(alloc.ptr, alloc.nbytes);
}

void parallel_copy(const std::vector<CopySpan>& spans, int num_threads) {
  // starts[i]: position of span i in the concatenation of all spans.
  std::vector<size_t> starts(spans.size() + 1, 0);
  for (size_t i = 0; i < spans.size(); ++i) starts[i + 1] = starts[i] + spans[i].nbytes;
  const size_t total = starts.back();
  const int n = clamp_threads(num_threads, total);
  // Thread t copies bytes [t*total/n, (t+1)*total/n) of the concatenation: equal work per thread
  // whatever the mix of many small and few large tensors.
  run_threads(n, [&](int t) {
    const size_t lo = total * t / n, hi = total * (t + 1) / n;
    size_t i = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
    for (; i < spans.size() && starts[i] < hi; ++i) {
      const size_t a = std::max(lo, starts[i]) - starts[i];
      const size_t b = std::min(hi, starts[i + 1]) - starts[i];
      if (b > a) std::memcpy(spans[i].dst + a, spans[i].src + a, b - a);
    }
  });
}

uint32_t parallel_crc32(const uint8_t* data, size_t nbytes, int num_threads) {
  const int n = clamp_threads(num_threads, nbytes);
  std::vector<uint32_t> crcs(n, 0);
  std::vector<size_t> lens(n, 0);
  run_threads(n, [&](int t) {
    const size_t lo = nbytes * t / n, hi = nbytes * (t + 1) / n;
    crcs[t] = crc32_update(0, data + lo, hi - lo);
    lens[t] = hi - lo;
  });
  uint32_t crc = crcs[0];
  for (int t = 1; t < n; ++t) crc = crc32_combine(crc, crcs[t], lens[t]);
  return crc;
}

}  // namespace gkd
