// gkd._C: thin pybind11 bindings over flat_buffer.h. Reached from Python only through gkd/_ext.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "crc32.h"
#include "flat_buffer.h"

namespace py = pybind11;

// Argument checks; every message names the argument it is about.
#define GKD_CHECK_CPU(t, name) TORCH_CHECK((t).device().is_cpu(), name, " must be a CPU tensor, got ", (t).device())
#define GKD_CHECK_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).is_contiguous(), name, " must be contiguous (call .contiguous() first)")
#define GKD_CHECK_BYTES(t, name)                                                                     \
  TORCH_CHECK((t).scalar_type() == at::kByte && (t).dim() == 1, name, " must be a 1-D uint8 tensor, got ", \
              (t).scalar_type(), " with ", (t).dim(), " dims")
#define GKD_CHECK_SAME_LEN(a, b, name_a, name_b) \
  TORCH_CHECK((a).size() == (b).size(), name_a, " and ", name_b, " must have equal lengths, got ", (a).size(), " and ", (b).size())
#define GKD_CHECK_RANGE(offset, nbytes, total, name)                                                     \
  TORCH_CHECK((offset) >= 0 && (nbytes) >= 0 && (offset) + (nbytes) <= (total), name, " = ", (offset), \
              " with ", (nbytes), " bytes does not fit in a buffer of ", (total), " bytes")

namespace {

std::string item_name(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

int resolve_threads(int64_t num_threads) {
  return num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
}

py::tuple alloc_host(int64_t nbytes, bool pin, bool register_cuda) {
  TORCH_CHECK(nbytes >= 0, "nbytes must be >= 0, got ", nbytes);
  gkd::HostAllocation alloc;
  {
    py::gil_scoped_release no_gil;  // mlock of a large buffer faults in every page
    alloc = gkd::alloc_host(static_cast<size_t>(nbytes), pin, register_cuda && pin);
  }
  // The tensor owns the mapping: its deleter unregisters, unlocks and unmaps it.
  auto deleter = [alloc](void*) { gkd::free_host(alloc); };
  at::Tensor tensor = torch::from_blob(alloc.ptr, {nbytes}, deleter, torch::dtype(torch::kUInt8));
  return py::make_tuple(tensor, alloc.locked, alloc.cuda_registered, alloc.lock_error);
}

// The spans between a list of tensors and a byte buffer; `to_buffer` picks the direction.
std::vector<gkd::CopySpan> spans_for(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& offsets,
                                     const at::Tensor& buffer, const char* list_name, bool to_buffer) {
  GKD_CHECK_SAME_LEN(tensors, offsets, list_name, "offsets");
  GKD_CHECK_CPU(buffer, "buffer");
  GKD_CHECK_BYTES(buffer, "buffer");
  GKD_CHECK_CONTIGUOUS(buffer, "buffer");
  uint8_t* base = buffer.data_ptr<uint8_t>();
  const int64_t total = buffer.numel();
  std::vector<gkd::CopySpan> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const std::string name = item_name(list_name, i);
    GKD_CHECK_CPU(t, name);
    GKD_CHECK_CONTIGUOUS(t, name);
    const int64_t nbytes = static_cast<int64_t>(t.nbytes());
    GKD_CHECK_RANGE(offsets[i], nbytes, total, item_name("offsets", i));
    if (nbytes == 0) continue;
    uint8_t* tensor_bytes = static_cast<uint8_t*>(t.data_ptr());
    uint8_t* buffer_bytes = base + offsets[i];
    spans.push_back(to_buffer ? gkd::CopySpan{tensor_bytes, buffer_bytes, static_cast<size_t>(nbytes)}
                              : gkd::CopySpan{buffer_bytes, tensor_bytes, static_cast<size_t>(nbytes)});
  }
  return spans;
}

void pack(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& offsets, at::Tensor buffer,
          int64_t num_threads) {
  auto spans = spans_for(tensors, offsets, buffer, "tensors", /*to_buffer=*/true);
  const int threads = resolve_threads(num_threads);
  py::gil_scoped_release no_gil;
  gkd::parallel_copy(spans, threads);
}

void unpack(const at::Tensor& buffer, const std::vector<int64_t>& offsets, std::vector<at::Tensor> dests,
            int64_t num_threads) {
  auto spans = spans_for(dests, offsets, buffer, "dests", /*to_buffer=*/false);
  const int threads = resolve_threads(num_threads);
  py::gil_scoped_release no_gil;
  gkd::parallel_copy(spans, threads);
}

uint32_t checksum(const at::Tensor& buffer, int64_t offset, int64_t nbytes, int64_t num_threads) {
  GKD_CHECK_CPU(buffer, "buffer");
  GKD_CHECK_BYTES(buffer, "buffer");
  GKD_CHECK_CONTIGUOUS(buffer, "buffer");
  if (nbytes < 0) nbytes = buffer.numel() - offset;
  GKD_CHECK_RANGE(offset, nbytes, buffer.numel(), "offset");
  const uint8_t* data = buffer.data_ptr<uint8_t>() + offset;
  const int threads = resolve_threads(num_threads);
  py::gil_scoped_release no_gil;
  return gkd::parallel_crc32(data, static_cast<size_t>(nbytes), threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gkd native helpers: page-aligned/pinned host buffers, threaded pack/unpack, CRC-32.";
  m.def("alloc_host", &alloc_host, py::arg("nbytes"), py::arg("pin") = false, py::arg("register_cuda") = false,
        "Page-aligned, zero-filled host memory as a uint8 tensor [nbytes] that unmaps itself when freed.\n"
        "pin=True mlocks it and, with register_cuda=True, registers it with the CUDA runtime.\n"
        "Returns (tensor, locked, cuda_registered, error) -- error says why locking was refused.");
  m.def("pack", &pack, py::arg("tensors"), py::arg("offsets"), py::arg("buffer"), py::arg("num_threads") = 0,
        "Copy contiguous CPU tensors into the uint8 buffer at byte offsets, threaded, without the GIL.\n"
        "num_threads <= 0 uses torch.get_num_threads().");
  m.def("unpack", &unpack, py::arg("buffer"), py::arg("offsets"), py::arg("dests"), py::arg("num_threads") = 0,
        "Copy bytes of the uint8 buffer at byte offsets into contiguous CPU tensors dests, threaded, without the GIL.");
  m.def("checksum", &checksum, py::arg("buffer"), py::arg("offset") = 0, py::arg("nbytes") = -1,
        py::arg("num_threads") = 0,
        "CRC-32 (zlib.crc32's) of buffer[offset:offset+nbytes] (nbytes < 0: to the end), threaded, without the GIL.");
}
