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

ContextCalls context_calls;
std::atomic<bool> context_calls_set{false};
// Each device's primary context, retained once for the process (it lives as long as libtorch's
// runtime keeps it, which is the process's life).
std::array<std::atomic<void*>, 64> primary_contexts{};

}  // namespace

extern "C" void nsa_glue_set_context_calls(void* get_current, void* primary_retain,
                                           void* set_current) {
  if (context_calls_set.load(std::memory_order_acquire)) return;
  context_calls.get_current = reinterpret_cast<CtxGetCurrentFn>(get_current);
  context_calls.primary_retain = reinterpret_cast<PrimaryCtxRetainFn>(primary_retain);
  context_calls.set_current = reinterpret_cast<CtxSetCurrentFn>(set_current);
  context_calls_set.store(true, std::memory_order_release);
}

namespace nsa_glue {

void bind_context(c10::DeviceIndex device) {
  // Without the driver table no kernel was loaded either, so nothing launches.
  if (!context_calls_set.load(std::memory_order_acquire)) return;
  void* ctx = nullptr;
  int rc = context_calls.get_current(&ctx);
  TORCH_CHECK(rc == 0, "cuCtxGetCurrent failed with CUDA driver error ", rc);
  if (ctx != nullptr) return;
  TORCH_CHECK(device >= 0 && size_t(device) < primary_contexts.size(), "CUDA device ", int(device),
              " out of range");
  void* primary = primary_contexts[device].load(std::memory_order_acquire);
  if (primary == nullptr) {
    rc = context_calls.primary_retain(&primary, device);
    TORCH_CHECK(rc == 0, "cuDevicePrimaryCtxRetain(", int(device),
                ") failed with CUDA driver error ", rc);
    primary_contexts[device].store(primary, std::memory_order_release);
  }
  rc = context_calls.set_current(primary);
  TORCH_CHECK(rc == 0, "cuCtxSetCurrent failed with CUDA driver error ", rc);
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
