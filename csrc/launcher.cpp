// The host side of the hot path (a codec call, a peer-to-peer exchange), compiled on first use
// by moe_flashcomm/kernels.py (torch's C++ extension builder, as DeepSpeed builds its ops)
// unless MOE_FLASHCOMM_NATIVE_LAUNCH=0; then, or without a compiler, the same launches go
// through ctypes. A prototype of Repeat measured 5.5 us of host time per codec call on an H200
// host, where the public encode took 11-12 us through Python and ctypes (docs/notes.md).
//
// Nothing here links the CUDA libraries: the driver's entry points (cuLaunchKernel,
// cuMemcpyAsync, cuEventRecord, cuStreamWaitEvent) come as addresses from the driver library
// that kernels.py already opened, and the current stream from torch's device guard.
#include <torch/extension.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int kInvalidContext = 201;  // CUDA_ERROR_INVALID_CONTEXT
using LaunchFn = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                         unsigned, void*, void**, void**);
using CopyFn = int (*)(uint64_t, uint64_t, size_t, void*);
using RecordFn = int (*)(void*, void*);
using WaitFn = int (*)(void*, void*, unsigned);

// One driver call: where the thread has no context (autograd's threads), ``make_current(device)``
// and the call once more; a failure raises ``error(code, what)`` (kernels.CudaError).
template <typename Call>
void drive(Call&& call, const py::object& make_current, int device, const py::object& error,
           const char* what) {
  int rc = call();
  if (rc == kInvalidContext) {
    make_current(device);
    rc = call();
  }
  if (rc) {
    py::object exc = error(rc, what);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    throw py::error_already_set();
  }
}

// One prepared kernel launch, the twin of kernels.CtypesLaunch: the argument block lives in that
// object's ctypes cells (``keep`` holds them alive); a call writes the pointer cells, each
// a base address plus its offset, and launches on the given stream.
class Launch {
 public:
  Launch(uintptr_t driver_launch, int device, uintptr_t function, unsigned blocks,
         unsigned threads, uintptr_t params, std::vector<std::pair<uintptr_t, uint64_t>> pointers,
         py::object keep, py::object make_current, py::object error)
      : launch_(reinterpret_cast<LaunchFn>(driver_launch)), device_(device),
        function_(reinterpret_cast<void*>(function)), blocks_(blocks), threads_(threads),
        params_(reinterpret_cast<void**>(params)), pointers_(std::move(pointers)),
        keep_(std::move(keep)), make_current_(std::move(make_current)),
        error_(std::move(error)) {}

  // Fewer bases than pointers leave the rest as the last call set them (as kernels.CtypesLaunch).
  void run(uintptr_t stream, const uint64_t* bases, size_t n) {
    n = std::min(n, pointers_.size());
    for (size_t i = 0; i < n; ++i) {
      *reinterpret_cast<uint64_t*>(pointers_[i].first) = bases[i] + pointers_[i].second;
    }
    drive([&] { return go(stream); }, make_current_, device_, error_, "cuLaunchKernel");
  }

  void call(uintptr_t stream, py::args bases) {
    uint64_t values[8];
    size_t n = std::min<size_t>(bases.size(), 8);
    for (size_t i = 0; i < n; ++i) values[i] = bases[i].cast<uint64_t>();
    run(stream, values, n);
  }

  py::object args = py::none();  // the writable view of the argument struct (kernels.CtypesLaunch)

 private:
  int go(uintptr_t stream) {
    return launch_(function_, blocks_, 1, 1, threads_, 1, 1, 0,
                   reinterpret_cast<void*>(stream), params_, nullptr);
  }

  LaunchFn launch_;
  int device_;
  void* function_;
  unsigned blocks_, threads_;
  void** params_;
  std::vector<std::pair<uintptr_t, uint64_t>> pointers_;
  py::object keep_, make_current_, error_;
};

// A codec call made before with the same arguments: a new output [rows of the input,
// columns] of ``dtype`` and the launches (bases: input, output) on the input device's
// current stream. ``stream`` given: that stream instead (tests without a GPU).
class Repeat {
 public:
  Repeat(std::vector<std::shared_ptr<Launch>> launches, int64_t columns, at::ScalarType dtype)
      : launches_(std::move(launches)), columns_(columns), dtype_(dtype) {}

  at::Tensor call(const at::Tensor& src, std::optional<uintptr_t> stream) {
    c10::DeviceGuard guard(src.device());
    at::Tensor out = at::empty({src.size(0), columns_}, src.options().dtype(dtype_));
    uintptr_t s = stream ? *stream : current_stream(src.device());
    uint64_t bases[2] = {reinterpret_cast<uint64_t>(src.data_ptr()),
                         reinterpret_cast<uint64_t>(out.data_ptr())};
    for (auto& launch : launches_) launch->run(s, bases, 2);
    return out;
  }

  static uintptr_t current_stream(const c10::Device& device) {
    return reinterpret_cast<uintptr_t>(
        c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle());
  }

 private:
  std::vector<std::shared_ptr<Launch>> launches_;
  int64_t columns_;
  at::ScalarType dtype_;
};

// The steps of a call as data (kernels.Step; kernels.run_steps is the Python twin): kernel
// launches, asynchronous copies, one stream waiting for another, a staging buffer, a call back
// into Python. Addresses are a base (the call's tokens, its output, its staging buffer, or
// none) plus an offset; streams the call's ("main") or the communicator's copy stream.
class Program {
 public:
  enum Kind { kLaunch, kCopy, kOrder, kStage, kCall };  // kernels.LAUNCH ... CALL
  enum Base { kTokens, kOutput, kStaging, kFixed };     // kernels.TOKENS ... FIXED

  // ``steps``: (kind, target, refs, nbytes, stream) tuples, target a Launch, an event handle
  // (kOrder) or a callable (kCall); ``driver``: the addresses of cuMemcpyAsync, cuEventRecord
  // and cuStreamWaitEvent.
  Program(const py::list& steps, int device, std::tuple<uintptr_t, uintptr_t, uintptr_t> driver,
          py::object make_current, py::object error)
      : device_(device), copy_(reinterpret_cast<CopyFn>(std::get<0>(driver))),
        record_(reinterpret_cast<RecordFn>(std::get<1>(driver))),
        wait_(reinterpret_cast<WaitFn>(std::get<2>(driver))),
        make_current_(std::move(make_current)), error_(std::move(error)) {
    for (const auto& item : steps) {
      auto t = item.cast<py::tuple>();
      Step step;
      step.kind = t[0].cast<int>();
      if (step.kind == kLaunch) step.launch = t[1].cast<std::shared_ptr<Launch>>();
      if (step.kind == kOrder) step.event = t[1].cast<uintptr_t>();
      if (step.kind == kCall) step.call = t[1];
      for (const auto& ref : t[2]) step.refs.push_back(ref.cast<std::pair<int, uint64_t>>());
      if (step.refs.size() > 8) throw std::invalid_argument("a step takes at most 8 addresses");
      step.nbytes = t[3].cast<uint64_t>();
      step.stream = t[4].cast<int>();
      steps_.push_back(std::move(step));
    }
  }

  // Every step on streams (main, side) with the call's tokens and output at ``bases``; a
  // staging buffer lives until the next one is made or the call returns (the steps order the
  // main stream after the copies that read it, so torch's allocator may then reuse it).
  void run(uintptr_t main, uintptr_t side, uint64_t tokens, uint64_t output,
           const c10::Device& device) {
    uint64_t bases[4] = {tokens, output, 0, 0};
    void* streams[2] = {reinterpret_cast<void*>(main), reinterpret_cast<void*>(side)};
    at::Tensor staging;
    for (const auto& step : steps_) {
      uint64_t address[8];
      for (size_t i = 0; i < step.refs.size(); ++i) {
        address[i] = bases[step.refs[i].first] + step.refs[i].second;
      }
      switch (step.kind) {
        case kLaunch:
          step.launch->run(main, address, step.refs.size());
          break;
        case kCopy:
          if (step.nbytes) {
            drive([&] { return copy_(address[0], address[1], step.nbytes, streams[step.stream]); },
                  make_current_, device_, error_, "cuMemcpyAsync");
          }
          break;
        case kOrder: {  // streams[stream] waits for the work queued so far on the other one
          void* event = reinterpret_cast<void*>(step.event);
          drive([&] { return record_(event, streams[1 - step.stream]); }, make_current_,
                device_, error_, "cuEventRecord");
          drive([&] { return wait_(streams[step.stream], event, 0); }, make_current_, device_,
                error_, "cuStreamWaitEvent");
          break;
        }
        case kStage:
          staging = at::empty({static_cast<int64_t>(step.nbytes)},
                              at::TensorOptions().dtype(at::kByte).device(device));
          bases[kStaging] = reinterpret_cast<uint64_t>(staging.data_ptr());
          break;
        case kCall:
          step.call();
          break;
      }
    }
  }

 private:
  struct Step {
    int kind = kLaunch;
    std::shared_ptr<Launch> launch;
    uintptr_t event = 0;
    py::object call;
    std::vector<std::pair<int, uint64_t>> refs;
    uint64_t nbytes = 0;
    int stream = 0;
  };
  std::vector<Step> steps_;
  int device_;
  CopyFn copy_;
  RecordFn record_;
  WaitFn wait_;
  py::object make_current_, error_;
};

// A peer-to-peer exchange (comm/exchange.py P2PCall), its hot path in one call: raise what the
// kernels of earlier calls reported (``check``, called only when the error page's "set" word is
// nonzero), an output of ``shape``, torch's current stream ordered after the group's previous
// call (``begin``, called only when the stream changes; it writes the stream cell) and the
// call's program on that stream and the copy stream ``side`` (bases: tokens, output).
// ``stream`` given: that stream instead (tests without a GPU).
class Exchange {
 public:
  Exchange(std::shared_ptr<Program> program, uintptr_t side, at::ScalarType dtype,
           uintptr_t error_set, uintptr_t stream_cell, py::object check, py::object begin)
      : program_(std::move(program)), side_(side), dtype_(dtype),
        error_set_(reinterpret_cast<volatile uint64_t*>(error_set)),
        stream_cell_(reinterpret_cast<const uint64_t*>(stream_cell)), check_(std::move(check)),
        begin_(std::move(begin)) {}

  at::Tensor call(at::Tensor x, const std::vector<int64_t>& shape,
                  std::optional<uintptr_t> stream) {
    if (*error_set_) check_();  // (it raises)
    c10::DeviceGuard guard(x.device());
    if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) {
      x = x.clone();  // the encodes were planned for 16-byte aligned rows
    }
    at::Tensor out = at::empty(shape, x.options().dtype(dtype_));
    uintptr_t s = stream ? *stream : Repeat::current_stream(x.device());
    if (*stream_cell_ != s) begin_(s);
    program_->run(s, side_, reinterpret_cast<uint64_t>(x.data_ptr()),
                  reinterpret_cast<uint64_t>(out.data_ptr()), x.device());
    return out;
  }

 private:
  std::shared_ptr<Program> program_;
  uintptr_t side_;
  at::ScalarType dtype_;
  volatile uint64_t* error_set_;  // pinned host memory the kernels write
  const uint64_t* stream_cell_;
  py::object check_, begin_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Launch, std::shared_ptr<Launch>>(m, "Launch")
      .def(py::init<uintptr_t, int, uintptr_t, unsigned, unsigned, uintptr_t,
                    std::vector<std::pair<uintptr_t, uint64_t>>, py::object, py::object,
                    py::object>())
      .def("__call__", &Launch::call)
      .def_readwrite("args", &Launch::args);
  py::class_<Repeat>(m, "Repeat")
      .def(py::init<std::vector<std::shared_ptr<Launch>>, int64_t, at::ScalarType>())
      .def("__call__", &Repeat::call, py::arg("src"), py::arg("stream") = py::none());
  py::class_<Program, std::shared_ptr<Program>>(m, "Program")
      .def(py::init<const py::list&, int, std::tuple<uintptr_t, uintptr_t, uintptr_t>,
                    py::object, py::object>())
      .def("__call__", &Program::run, py::arg("main"), py::arg("side"), py::arg("tokens"),
           py::arg("output"), py::arg("device"));
  py::class_<Exchange>(m, "Exchange")
      .def(py::init<std::shared_ptr<Program>, uintptr_t, at::ScalarType, uintptr_t, uintptr_t,
                    py::object, py::object>())
      .def("__call__", &Exchange::call, py::arg("x"), py::arg("shape"),
           py::arg("stream") = py::none());
  m.def("current_stream", [](int device) {
    return Repeat::current_stream(c10::Device(c10::DeviceType::CUDA, device));
  });
}
