// libtorch's current CUDA stream of a device, for kernels launched from Rust (the decode
// kernels, nsa_sys::fused::decode), through launch.h's current_stream (libc10 only); and
// launch.h's bind_context, over the driver's context calls that Rust loaded
// (nsa_sys::driver hands them over once, when it opens libcuda).
#include <array>
#include <atomic>
#include <exception>

#include "launch.h"

namespace {

typedef int (*CtxGetCurrentFn)(void** ctx);
typedef int (*PrimaryCtxRetainFn)(void** ctx, int device);
typedef int (*CtxSetCurrentFn)(void* ctx);

struct ContextCalls {
  CtxGetCurrentFn get_current = nullptr;
  PrimaryCtxRetainFn primary_retain = nullptr;
  CtxSetCurrentFn set_current = nullptr;
};

// Each device's primary context, retained once (it lives as long as libtorch's runtime keeps
// it, which is the process's life).
typedef std::array<std::atomic<void*>, 64> PrimaryContexts;

ContextCalls context_calls;
std::atomic<bool> context_calls_set{false};
PrimaryContexts primary_contexts{};

ContextCalls calls_of(void* get_current, void* primary_retain, void* set_current) {
  ContextCalls calls;
  calls.get_current = reinterpret_cast<CtxGetCurrentFn>(get_current);
  calls.primary_retain = reinterpret_cast<PrimaryCtxRetainFn>(primary_retain);
  calls.set_current = reinterpret_cast<CtxSetCurrentFn>(set_current);
  return calls;
}

// bind_context's rule over given driver calls and cache (launch.h says why).
void bind_context_with(const ContextCalls& calls, PrimaryContexts& primary, int device) {
  void* ctx = nullptr;
  int rc = calls.get_current(&ctx);
  TORCH_CHECK(rc == 0, "cuCtxGetCurrent failed with CUDA driver error ", rc);
  if (ctx != nullptr) return;
  TORCH_CHECK(device >= 0 && size_t(device) < primary.size(), "CUDA device ", device,
              " out of range");
  void* p = primary[device].load(std::memory_order_acquire);
  if (p == nullptr) {
    rc = calls.primary_retain(&p, device);
    TORCH_CHECK(rc == 0, "cuDevicePrimaryCtxRetain(", device, ") failed with CUDA driver error ",
                rc);
    primary[device].store(p, std::memory_order_release);
  }
  rc = calls.set_current(p);
  TORCH_CHECK(rc == 0, "cuCtxSetCurrent failed with CUDA driver error ", rc);
}

}  // namespace

extern "C" void nsa_glue_set_context_calls(void* get_current, void* primary_retain,
                                           void* set_current) {
  if (context_calls_set.load(std::memory_order_acquire)) return;
  context_calls = calls_of(get_current, primary_retain, set_current);
  context_calls_set.store(true, std::memory_order_release);
}

// bind_context's rule over stand-in driver calls and a fresh cache, `binds` times in a row
// (nsa-sys's unit test of the rule; the process's own calls and cache are untouched).
extern "C" int nsa_glue_bind_context_with(void* get_current, void* primary_retain,
                                          void* set_current, int device, int binds, char* err,
                                          size_t err_len) {
  try {
    const ContextCalls calls = calls_of(get_current, primary_retain, set_current);
    PrimaryContexts cache{};
    for (int i = 0; i < binds; ++i) bind_context_with(calls, cache, device);
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}

namespace nsa_glue {

void bind_context(c10::DeviceIndex device) {
  // Without the driver table no kernel was loaded either, so nothing launches.
  if (!context_calls_set.load(std::memory_order_acquire)) return;
  bind_context_with(context_calls, primary_contexts, device);
}

}  // namespace nsa_glue

extern "C" int nsa_current_cuda_stream(int device, void** stream, char* err, size_t err_len) {
  try {
    *stream = nsa_glue::current_stream(c10::Device(c10::DeviceType::CUDA, device));
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}
