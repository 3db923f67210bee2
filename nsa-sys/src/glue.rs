//! Declarations of the C++ glue compiled from `glue/*.cpp`.
use std::os::raw::{c_int, c_long, c_void};

extern "C" {
    /// Hands the glue the driver's `cuCtxGetCurrent`, `cuDevicePrimaryCtxRetain` and
    /// `cuCtxSetCurrent` (glue/stream.cpp); the first call wins.
    pub(crate) fn nsa_glue_set_context_calls(
        get_current: *const c_void,
        primary_retain: *const c_void,
        set_current: *const c_void,
    );
    pub fn nsa_torch_version(major: *mut c_int, minor: *mut c_int, patch: *mut c_int);
    pub fn nsa_cuda_runtime_version() -> c_long;
    pub fn nsa_cudnn_version() -> c_long;
    pub fn nsa_cuda_device_count() -> c_int;
}

/// The libtorch version the glue was compiled against (major, minor, patch).
pub fn torch_version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: the function writes three ints through valid pointers and cannot fail.
    unsafe { nsa_torch_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

/// CUDA runtime version libtorch was built with (e.g. 13000), `None` without a CUDA backend.
pub fn cuda_runtime_version() -> Option<i64> {
    // SAFETY: no arguments; the C++ side catches every exception.
    let v = unsafe { nsa_cuda_runtime_version() };
    (v >= 0).then_some(v as i64)
}

/// cuDNN version (e.g. 91900), `None` when cuDNN is not usable.
pub fn cudnn_version() -> Option<i64> {
    // SAFETY: as above.
    let v = unsafe { nsa_cudnn_version() };
    (v >= 0).then_some(v as i64)
}

/// Number of CUDA devices libtorch sees (0 without a CUDA backend).
pub fn cuda_device_count() -> usize {
    // SAFETY: as above.
    let n = unsafe { nsa_cuda_device_count() };
    n.max(0) as usize
}
