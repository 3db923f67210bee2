// libtorch's current CUDA stream of a device, for kernels launched from Rust (the decode
// kernels, nsa_sys::fused::decode), through launch.h's current_stream (libc10 only).
#include <exception>

#include "launch.h"

extern "C" int nsa_current_cuda_stream(int device, void** stream, char* err, size_t err_len) {
  try {
    *stream = nsa_glue::current_stream(c10::Device(c10::DeviceType::CUDA, device));
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}
