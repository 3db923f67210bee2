// CUDA graphs of libtorch work for Rust (nsa_sys::cuda::CudaGraph): libtorch's own
// at::cuda::CUDAGraph, so that the tensors a captured region allocates come from the graph's
// private memory pool and stay the graph's for as long as it lives (a capture made with the
// driver's stream capture alone would leave them to the caching allocator, which would hand
// them to other tensors while replays still write them).
//
// The glue is compiled without CUDA headers and libtorch_cuda.so is opened at run time
// (nsa_sys::cuda::load_backend, RTLD_GLOBAL), so CUDAGraph's members are looked up by their
// mangled names (those of libtorch 2.11, the pinned version) and called on storage of our own
// (Itanium ABI: `this` first; the pool id, a std::pair of two integers, in two registers; the
// capture mode an int). A missing symbol is an error, never a crash.
//
// Capture runs on a stream of c10's pool (CUDAGraph refuses the default stream), made current
// for the capture and switched back after it; replays run on the current stream.
#include <dlfcn.h>

#include <c10/core/Stream.h>

#include <exception>
#include <new>
#include <optional>
#include <utility>

#include "launch.h"

namespace {

using PoolId = std::pair<unsigned long long, unsigned long long>;
using Ctor = void (*)(void*, bool);
using Member = void (*)(void*);
using Begin = void (*)(void*, PoolId, int);

struct GraphApi {
  Ctor construct;
  Member destroy;
  Begin capture_begin;
  Member capture_end;
  Member replay;
};

void* graph_symbol(const char* name, const char* what) {
  void* p = dlsym(RTLD_DEFAULT, name);
  TORCH_CHECK(p != nullptr, "CUDA graphs: libtorch_cuda.so has no at::cuda::CUDAGraph::", what,
              " (", name, "); is libtorch's CUDA backend loaded, and is it libtorch 2.11?");
  return p;
}

const GraphApi& graph_api() {
  static const GraphApi api = {
      reinterpret_cast<Ctor>(graph_symbol("_ZN2at4cuda9CUDAGraphC1Eb", "CUDAGraph(bool)")),
      reinterpret_cast<Member>(graph_symbol("_ZN2at4cuda9CUDAGraphD1Ev", "~CUDAGraph()")),
      reinterpret_cast<Begin>(graph_symbol(
          "_ZN2at4cuda9CUDAGraph13capture_beginESt4pairIyyE21cudaStreamCaptureMode",
          "capture_begin")),
      reinterpret_cast<Member>(graph_symbol("_ZN2at4cuda9CUDAGraph11capture_endEv",
                                            "capture_end")),
      reinterpret_cast<Member>(graph_symbol("_ZN2at4cuda9CUDAGraph6replayEv", "replay")),
  };
  return api;
}

// cudaStreamCaptureModeThreadLocal: other threads (the background kernel builds) may make CUDA
// calls while this one captures.
constexpr int kCaptureThreadLocal = 1;

// sizeof(at::cuda::CUDAGraph) is about 200 bytes in libtorch 2.11; the storage leaves room.
constexpr size_t kGraphBytes = 4096;

struct Graph {
  alignas(64) unsigned char storage[kGraphBytes];
  c10::Device device;
  // The stream that was current before a capture began (restored when it ends).
  std::optional<c10::Stream> before;
  explicit Graph(c10::Device d) : device(d) {}
};

const c10::impl::DeviceGuardImplInterface* cuda_impl() {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

void restore_stream(Graph& g) {
  if (g.before) {
    cuda_impl()->exchangeStream(*g.before);
    g.before.reset();
  }
}

}  // namespace

extern "C" int nsa_cuda_graph_new(int device, void** out, char* err, size_t err_len) {
  try {
    const GraphApi& api = graph_api();
    auto* g = new Graph(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    try {
      api.construct(g->storage, false);
    } catch (...) {
      delete g;
      throw;
    }
    *out = g;
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}

extern "C" int nsa_cuda_graph_begin(void* graph, char* err, size_t err_len) {
  auto& g = *static_cast<Graph*>(graph);
  try {
    TORCH_CHECK(!g.before, "CUDA graphs: a capture is already under way");
    c10::DeviceGuard guard(g.device);
    c10::Stream side = cuda_impl()->getStreamFromGlobalPool(g.device, false);
    g.before = cuda_impl()->exchangeStream(side);
    graph_api().capture_begin(g.storage, PoolId{0, 0}, kCaptureThreadLocal);
    return 0;
  } catch (const std::exception& e) {
    restore_stream(g);
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}

extern "C" int nsa_cuda_graph_end(void* graph, char* err, size_t err_len) {
  auto& g = *static_cast<Graph*>(graph);
  int rc = 0;
  try {
    c10::DeviceGuard guard(g.device);
    graph_api().capture_end(g.storage);
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    rc = 1;
  }
  restore_stream(g);
  return rc;
}

extern "C" int nsa_cuda_graph_replay(void* graph, char* err, size_t err_len) {
  auto& g = *static_cast<Graph*>(graph);
  try {
    c10::DeviceGuard guard(g.device);
    graph_api().replay(g.storage);
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}

extern "C" void nsa_cuda_graph_free(void* graph) {
  auto* g = static_cast<Graph*>(graph);
  restore_stream(*g);
  try {
    c10::DeviceGuard guard(g->device);
    graph_api().destroy(g->storage);
  } catch (...) {
    // The destructor frees the graph and its pool; nothing is left to report it to.
  }
  delete g;
}
