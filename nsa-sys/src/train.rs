//! Training-loop facilities over the C++ glue in `glue/train.cpp`: NVTX ranges, bf16 autocast on
//! CUDA, the Kineto (Chrome-trace) profiler, and the CUDA caching allocator's memory statistics.
use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_longlong};
use std::path::Path;

use crate::SysError;

extern "C" {
    fn nsa_nvtx_push(name: *const c_char);
    fn nsa_nvtx_pop();
    fn nsa_autocast_cuda_bf16_enabled() -> c_int;
    fn nsa_autocast_cuda_bf16(enabled: c_int) -> c_int;
    fn nsa_profiler_start(cuda: c_int, err: *mut c_char, len: usize) -> c_int;
    fn nsa_profiler_stop(path: *const c_char, err: *mut c_char, len: usize) -> c_int;
    fn nsa_cuda_memory_stats(
        device: c_int,
        allocated: *mut c_longlong,
        peak: *mut c_longlong,
        reserved: *mut c_longlong,
    ) -> c_int;
    fn nsa_cuda_reset_peak(device: c_int) -> c_int;
    fn nsa_set_deterministic(on: c_int) -> c_int;
    fn nsa_deterministic() -> c_int;
}

/// An NVTX range that closes when dropped. When `enabled` is false it costs one branch.
#[derive(Debug)]
#[must_use = "the range closes when this guard is dropped"]
pub struct NvtxRange {
    open: bool,
}

impl NvtxRange {
    pub fn new(enabled: bool, name: &str) -> Self {
        if enabled {
            let c = CString::new(name.replace('\0', " ")).expect("NULs were replaced");
            // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
            unsafe { nsa_nvtx_push(c.as_ptr()) };
        }
        NvtxRange { open: enabled }
    }
}

impl Drop for NvtxRange {
    fn drop(&mut self) {
        if self.open {
            // SAFETY: pops the range this guard pushed.
            unsafe { nsa_nvtx_pop() };
        }
    }
}

/// Runs `f` with CUDA autocast to bf16 on (matmuls and attention in bf16, reductions in fp32,
/// parameters stay fp32 masters), restoring the previous state afterwards.
pub fn with_bf16_autocast<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: toggles a thread-local libtorch flag; the C++ side catches exceptions.
    let before = unsafe { nsa_autocast_cuda_bf16(1) };
    let out = f();
    // SAFETY: as above.
    unsafe { nsa_autocast_cuda_bf16(if before == 1 { 1 } else { 0 }) };
    out
}

/// Whether CUDA autocast to bf16 is on for this thread (as [`with_bf16_autocast`] sets it):
/// code that replays a forward later (activation recomputation) runs it the same way.
pub fn bf16_autocast_enabled() -> bool {
    // SAFETY: reads a thread-local libtorch flag; the C++ side catches exceptions.
    unsafe { nsa_autocast_cuda_bf16_enabled() == 1 }
}

fn err_buf() -> Vec<c_char> {
    vec![0; 1024]
}

fn err_text(buf: &[c_char]) -> String {
    // SAFETY: the C++ side NUL-terminates inside the buffer (it was zeroed too).
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Turns deterministic training on or off for the whole process: libtorch's deterministic
/// algorithms (an operation without a deterministic implementation then fails with an error
/// naming it instead of running; scatter/index_add, the flash and memory-efficient attention
/// backwards take their deterministic variants, SDPA skips cuDNN attention, and uninitialised
/// memory of new tensors is filled), cuDNN's deterministic algorithms and no cuDNN
/// benchmarking. cuBLAS also needs `CUBLAS_WORKSPACE_CONFIG=:4096:8` (or `:16:8`) in the
/// environment before its first use, which the binary sets: libtorch refuses cuBLAS calls in
/// deterministic mode without it.
pub fn set_deterministic(on: bool) -> Result<(), SysError> {
    // SAFETY: sets libtorch's global flags; the C++ side catches exceptions.
    match unsafe { nsa_set_deterministic(c_int::from(on)) } {
        0 => Ok(()),
        code => Err(SysError::Call {
            call: "nsa_set_deterministic",
            code: i64::from(code),
        }),
    }
}

/// Whether libtorch's deterministic algorithms are on.
pub fn deterministic() -> bool {
    // SAFETY: reads a libtorch global flag; the C++ side catches exceptions.
    unsafe { nsa_deterministic() == 1 }
}

/// Starts libtorch's Kineto profiler (CPU activity, plus CUDA kernels when `cuda`).
pub fn profiler_start(cuda: bool) -> Result<(), SysError> {
    let mut buf = err_buf();
    // SAFETY: `buf` outlives the call and its length is passed.
    let rc = unsafe { nsa_profiler_start(cuda as c_int, buf.as_mut_ptr(), buf.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(SysError::Load {
            name: "kineto profiler".into(),
            reason: err_text(&buf),
        })
    }
}

/// Stops the profiler and writes a Chrome trace (open it in chrome://tracing or Perfetto).
pub fn profiler_stop(path: &Path) -> Result<(), SysError> {
    let c = CString::new(path.display().to_string()).map_err(|_| SysError::Load {
        name: "kineto profiler".into(),
        reason: "trace path contains a NUL byte".into(),
    })?;
    let mut buf = err_buf();
    // SAFETY: both pointers are valid for the call; the length is passed.
    let rc = unsafe { nsa_profiler_stop(c.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(SysError::Load {
            name: "kineto profiler".into(),
            reason: err_text(&buf),
        })
    }
}

/// The CUDA caching allocator's statistics for one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CudaMemory {
    pub allocated: u64,
    pub peak_allocated: u64,
    pub reserved: u64,
}

/// Memory statistics of CUDA device `device`; `None` without a CUDA allocator.
pub fn cuda_memory(device: usize) -> Option<CudaMemory> {
    let (mut a, mut p, mut r) = (0, 0, 0);
    // SAFETY: out-pointers valid for the call; the C++ side catches exceptions.
    let rc = unsafe { nsa_cuda_memory_stats(device as c_int, &mut a, &mut p, &mut r) };
    (rc == 0).then_some(CudaMemory {
        allocated: a.max(0) as u64,
        peak_allocated: p.max(0) as u64,
        reserved: r.max(0) as u64,
    })
}

/// Resets the peak counters of CUDA device `device` (no-op without CUDA).
pub fn cuda_reset_peak(device: usize) {
    // SAFETY: the C++ side catches exceptions.
    unsafe { nsa_cuda_reset_peak(device as c_int) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvtx_and_autocast_are_harmless_without_a_gpu() {
        let _ = crate::cuda::load_backend();
        {
            let _r = NvtxRange::new(true, "test range");
        }
        let x = with_bf16_autocast(|| 1 + 1);
        assert_eq!(x, 2);
    }

    #[test]
    fn deterministic_mode_switches_libtorchs_flag() {
        let _ = crate::cuda::load_backend();
        assert!(!deterministic());
        set_deterministic(true).unwrap();
        let on = deterministic();
        set_deterministic(false).unwrap();
        assert!(on && !deterministic());
    }

    #[test]
    fn profiler_writes_a_chrome_trace() {
        let _ = crate::cuda::load_backend();
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("trace.json");
        profiler_start(false).unwrap();
        let a = tch::Tensor::randn([64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let _ = a.matmul(&a).sum(tch::Kind::Float);
        profiler_stop(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("traceEvents"), "not a Chrome trace");
        assert!(
            text.contains("aten::mm") || text.contains("aten::matmul"),
            "matmul not traced"
        );
        std::fs::remove_file(path).unwrap();
    }
}
