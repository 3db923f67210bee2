// What the glue files that launch kernels or report errors to Rust share: the
// signature of the driver's cuLaunchKernel (whose address Rust loaded and hands over in a
// kernel table) and one checked launch through it (launch_kernel), libtorch's current CUDA
// stream of a device with the device's context bound on the calling thread, and the error
// buffer protocol of
// the extern "C" functions (a NUL-terminated message of at most err_len bytes).
#pragma once
#include <c10/core/Device.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace nsa_glue {

typedef int (*LaunchFn)(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* stream, void** args, void** extra);

// Launches `fn` through `launch` (cuLaunchKernel, as Rust loaded it) with a grid (gx, gy, gz) of
// 1-d blocks of `threads`: checks that the kernel was loaded, the grid's range and the driver's
// answer, naming the kernel `what` in each error.
inline void launch_kernel(void* launch, void* fn, const char* what, int64_t gx, int64_t gy,
                          int64_t gz, int64_t threads, int64_t smem, void* stream, void** args) {
  TORCH_CHECK(fn != nullptr, what, ": kernel not loaded");
  TORCH_CHECK(gx > 0 && gx < (int64_t(1) << 31) && gy > 0 && gy < 65536 && gz > 0 && gz < 65536,
              what, ": grid (", gx, ", ", gy, ", ", gz, ") out of range");
  int rc = reinterpret_cast<LaunchFn>(launch)(fn, unsigned(gx), unsigned(gy), unsigned(gz),
                                              unsigned(threads), 1, 1, unsigned(smem), stream,
                                              args, nullptr);
  TORCH_CHECK(rc == 0, "cuLaunchKernel(", what, ") failed with CUDA driver error ", rc);
}

// Makes `device`'s primary context current on the calling thread when no context is
// (stream.cpp). The driver's cuLaunchKernel needs one, and libtorch does not always bind it:
// c10's set_device skips cudaSetDevice when cudaGetDevice already answers the ordinal, which a
// fresh thread's does for device 0 with no context bound, so a kernel launched first on such a
// thread (autograd's device thread running one of our backward nodes first, a user's thread)
// failed with CUDA_ERROR_INVALID_CONTEXT. A thread whose current context is another device's
// is left as it is (the launch reports the mismatch).
void bind_context(c10::DeviceIndex device);

// libtorch's current CUDA stream of `device`, through c10's device-guard interface (libc10
// only, no CUDA headers), after bind_context: every launch, the glue's and the Rust decode
// kernels', takes its stream from here.
inline void* current_stream(const c10::Device& device) {
  bind_context(device.index());
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(device).native_handle();
}

inline void write_error(const char* what, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

}  // namespace nsa_glue
