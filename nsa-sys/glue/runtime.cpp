// Facts about the libtorch runtime that tch does not expose: versions of libtorch, CUDA and cuDNN.
// Every entry point is `extern "C"` and catches all C++ exceptions (they must not cross into Rust).
#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/version.h>

extern "C" {

void nsa_torch_version(int* major, int* minor, int* patch) {
  *major = TORCH_VERSION_MAJOR;
  *minor = TORCH_VERSION_MINOR;
  *patch = TORCH_VERSION_PATCH;
}

// CUDA runtime version libtorch was built with (e.g. 13000), or -1 when the CUDA backend is absent.
long nsa_cuda_runtime_version() {
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    return hooks.hasCUDA() ? hooks.versionCUDART() : -1;
  } catch (...) {
    return -1;
  }
}

// cuDNN version (e.g. 91900), or -1 when cuDNN is not usable.
long nsa_cudnn_version() {
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    return (hooks.hasCUDA() && hooks.hasCuDNN()) ? hooks.versionCuDNN() : -1;
  } catch (...) {
    return -1;
  }
}

int nsa_cuda_device_count() {
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    return hooks.hasCUDA() ? hooks.getNumGPUs() : 0;
  } catch (...) {
    return 0;
  }
}

}  // extern "C"
