// gkd._C: thin pybind11 bindings over flat_buffer.h. Reached from Python only through gkd/_ext.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
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
#define GKD_CHECK_INT64(t, name)                                                                     \
  TORCH_CHECK((t).device().is_cpu() && (t).is_contiguous() && (t).scalar_type() == at::kLong, name,       \
              " must be a contiguous int64 CPU tensor, got ", (t).scalar_type(), " on ", (t).device())
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

// Why a tensor does not match its layout record. Returned to Python, never thrown: gkd/_ext.py turns it
// into an exception (a C++ exception crashed the interpreter once, see _check_args there). The order is
// that of _ext.MISMATCHES.
enum Mismatch : int64_t {
  kMatch = 0,
  kNotStrided = 1,
  kNotCpu = 2,
  kNotContiguous = 3,
  kShape = 4,
  kDtype = 5,
  kRange = 6,
};

// A layout record: one row of `records`, int64 [n, 4]; the tensor's sizes are the next `ndim` entries of
// `dims`, int64 [sum of ndim].
constexpr int64_t kRecordFields = 4;  // offset (bytes), nbytes, dtype code (c10::ScalarType), ndim

py::tuple mismatch(size_t index, Mismatch why) { return py::make_tuple(static_cast<int64_t>(index), static_cast<int64_t>(why), py::list()); }

// The tensors laid out back to back, each offset a multiple of `alignment` (a power of two): returns
// (records, dims, end, -1, kMatch), or (..., index, kNotStrided) for the first sparse/nested tensor.
py::tuple layout_records(const std::vector<at::Tensor>& tensors, int64_t alignment) {
  TORCH_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, "alignment must be a power of two, got ",
              alignment);
  const int64_t n = static_cast<int64_t>(tensors.size());
  int64_t ndims = 0;
  for (const at::Tensor& t : tensors) ndims += t.layout() == at::kStrided ? t.dim() : 0;
  at::Tensor records = at::empty({n, kRecordFields}, at::kLong);
  at::Tensor dims = at::empty({ndims}, at::kLong);
  int64_t* r = records.data_ptr<int64_t>();
  int64_t* d = dims.data_ptr<int64_t>();
  int64_t end = 0;
  for (size_t i = 0; i < tensors.size(); ++i, r += kRecordFields) {
    const at::Tensor& t = tensors[i];
    if (t.layout() != at::kStrided) return py::make_tuple(records, dims, 0, static_cast<int64_t>(i), static_cast<int64_t>(kNotStrided));
    const int64_t offset = (end + alignment - 1) & ~(alignment - 1);
    end = offset + static_cast<int64_t>(t.nbytes());
    r[0] = offset;
    r[1] = end - offset;
    r[2] = static_cast<int64_t>(t.scalar_type());
    r[3] = t.dim();
    for (int64_t s : t.sizes()) *d++ = s;
  }
  return py::make_tuple(records, dims, end, -1, static_cast<int64_t>(kMatch));
}

bool is_float_code(int64_t code) {
  return code >= 0 && code < static_cast<int64_t>(c10::ScalarType::NumOptions) &&
         c10::isFloatingType(static_cast<c10::ScalarType>(code));
}

// Checks every tensor against its record, then copies between the tensors and the buffer (to_buffer:
// into it) on num_threads threads without the GIL. Returns (-1, kMatch, casts) once copied; casts lists
// the floating-point tensors whose dtype differs from their record's, not copied, when allow_cast (the
// caller converts them). Or (index, why, []) for the first tensor that does not match, with nothing copied.
py::tuple copy_layout(const std::vector<at::Tensor>& tensors, const at::Tensor& records, const at::Tensor& dims,
                      at::Tensor buffer, bool to_buffer, bool allow_cast, int64_t num_threads) {
  GKD_CHECK_CPU(buffer, "buffer");
  GKD_CHECK_BYTES(buffer, "buffer");
  GKD_CHECK_CONTIGUOUS(buffer, "buffer");
  GKD_CHECK_INT64(records, "records");
  GKD_CHECK_INT64(dims, "dims");
  TORCH_CHECK(records.dim() == 2 && records.size(0) == static_cast<int64_t>(tensors.size()) &&
                  records.size(1) == kRecordFields,
              "records must be int64 [", tensors.size(), ", ", kRecordFields, "], got ", records.sizes());
  uint8_t* base = buffer.data_ptr<uint8_t>();
  const int64_t total = buffer.numel();
  const int64_t* r = records.data_ptr<int64_t>();
  const int64_t* d = dims.data_ptr<int64_t>();
  int64_t ndims = dims.numel();  // entries of dims not yet read
  std::vector<gkd::CopySpan> spans;
  spans.reserve(tensors.size());
  std::vector<int64_t> casts;
  for (size_t i = 0; i < tensors.size(); ++i, r += kRecordFields) {
    const at::Tensor& t = tensors[i];
    const int64_t offset = r[0], nbytes = r[1], code = r[2], ndim = r[3];
    if (t.layout() != at::kStrided) return mismatch(i, kNotStrided);
    if (!t.device().is_cpu()) return mismatch(i, kNotCpu);
    if (!t.is_contiguous()) return mismatch(i, kNotContiguous);
    const auto sizes = t.sizes();
    if (ndim < 0 || ndim > ndims || static_cast<int64_t>(sizes.size()) != ndim ||
        !std::equal(sizes.begin(), sizes.end(), d)) {
      return mismatch(i, kShape);
    }
    d += ndim;
    ndims -= ndim;
    if (offset < 0 || nbytes < 0 || nbytes > total - offset) return mismatch(i, kRange);
    if (static_cast<int64_t>(t.scalar_type()) != code) {
      if (!(to_buffer && allow_cast && t.is_floating_point() && is_float_code(code))) return mismatch(i, kDtype);
      casts.push_back(static_cast<int64_t>(i));
      continue;
    }
    if (static_cast<int64_t>(t.nbytes()) != nbytes) return mismatch(i, kRange);
    if (nbytes == 0) continue;
    uint8_t* tensor_bytes = static_cast<uint8_t*>(t.data_ptr());
    uint8_t* buffer_bytes = base + offset;
    spans.push_back(to_buffer ? gkd::CopySpan{tensor_bytes, buffer_bytes, static_cast<size_t>(nbytes)}
                              : gkd::CopySpan{buffer_bytes, tensor_bytes, static_cast<size_t>(nbytes)});
  }
  const int threads = resolve_threads(num_threads);
  {
    py::gil_scoped_release no_gil;
    gkd::parallel_copy(spans, threads);
  }
  return py::make_tuple(-1, static_cast<int64_t>(kMatch), casts);
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
  m.def("dtype_code", [](at::ScalarType dtype) { return static_cast<int64_t>(dtype); }, py::arg("dtype"),
        "The code of a torch.dtype in layout records (its c10::ScalarType).");
  m.def("layout_records", &layout_records, py::arg("tensors"), py::arg("alignment"),
        "Lay tensors out back to back at multiples of alignment: (records int64 [n, 4] of offset, nbytes,\n"
        "dtype code, ndim; dims int64 [sum ndim]; end; index, why), index -1 or the first non-strided tensor.");
  m.def("copy_layout", &copy_layout, py::arg("tensors"), py::arg("records"), py::arg("dims"), py::arg("buffer"),
        py::arg("to_buffer") = true, py::arg("allow_cast") = false, py::arg("num_threads") = 0,
        "Check tensors against layout records (see layout_records) and copy them into (to_buffer) or out of\n"
        "the uint8 buffer, threaded, without the GIL. Returns (index, why, casts): index -1 once copied, casts\n"
        "the floating-point tensors left to convert (allow_cast); else the first mismatch, nothing copied.");
}
