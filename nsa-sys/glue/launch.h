// What the glue files that launch kernels or report errors to Rust share: the
// signature of the driver's cuLaunchKernel (whose address Rust loaded and hands over in a
// kernel table), libtorch's current CUDA stream of a device, and the error buffer protocol of
// the extern "C" functions (a NUL-terminated message of at most err_len bytes).
#pragma once
#include <c10/core/Device.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstddef>
#include <cstring>

namespace nsa_glue {

typedef int (*LaunchFn)(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* stream, void** args, void** extra);

// libtorch's current CUDA stream of `device`, through c10's device-guard interface (libc10
// only, no CUDA headers).
inline void* current_stream(const c10::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(device).native_handle();
}

inline void write_error(const char* what, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

}  // namespace nsa_glue
