// libtorch's current CUDA stream of a device, for kernels launched from Rust (the decode
// kernels, nsa_sys::fused::decode). Reached through c10's device-guard interface, so this file
// links against libc10 only, like the rest of the glue.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <exception>

extern "C" int nsa_current_cuda_stream(int device, void** stream, char* err, size_t err_len) {
  try {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    *stream = impl->getStream(c10::Device(c10::DeviceType::CUDA, device)).native_handle();
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(err, e.what(), err_len - 1);
    err[err_len - 1] = '\0';
    return 1;
  }
}
