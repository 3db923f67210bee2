//! A function table over the CUDA driver API (`libcuda.so.1`): device facts, the NCCL
//! communicator's stream and events, and module load / kernel launch for the NVRTC kernels.
//!
//! libtorch exposes device counts but not names, memory or compute capability through tch; the
//! driver API is stable across CUDA versions, so a handful of `cu*` symbols is all we need.
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use serde::Serialize;

use crate::SysError;

type CuResult = c_int;

#[derive(Debug)]
/// The driver entry points the workspace uses: device facts here, device binding, the
/// communication stream and its events for the NCCL communicator (`crate::nccl`). One table, so libcuda is opened and
/// checked in one place.
pub(crate) struct Driver {
    // Never unloaded: NCCL and libtorch keep using the driver for the process's life.
    _lib: std::mem::ManuallyDrop<libloading::Library>,
    device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    device_get_name: unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult,
    device_total_mem: unsafe extern "C" fn(*mut usize, c_int) -> CuResult,
    pub(crate) device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    driver_get_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, c_int) -> CuResult,
    pub(crate) ctx_set_current: unsafe extern "C" fn(CuContext) -> CuResult,
    ctx_get_current: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    pub(crate) stream_query: unsafe extern "C" fn(CuStream) -> CuResult,
    pub(crate) stream_create: unsafe extern "C" fn(*mut CuStream, c_uint) -> CuResult,
    pub(crate) stream_destroy: unsafe extern "C" fn(CuStream) -> CuResult,
    pub(crate) stream_wait_event: unsafe extern "C" fn(CuStream, CuEvent, c_uint) -> CuResult,
    pub(crate) event_create: unsafe extern "C" fn(*mut CuEvent, c_uint) -> CuResult,
    pub(crate) event_destroy: unsafe extern "C" fn(CuEvent) -> CuResult,
    pub(crate) event_record: unsafe extern "C" fn(CuEvent, CuStream) -> CuResult,
    // Timing of the decode kernels (`crate::fused::DecodeStep::launch_timed`).
    pub(crate) event_synchronize: unsafe extern "C" fn(CuEvent) -> CuResult,
    pub(crate) event_elapsed_time: unsafe extern "C" fn(*mut f32, CuEvent, CuEvent) -> CuResult,
    pub(crate) module_load_data: unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult,
    pub(crate) module_get_function:
        unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    pub(crate) func_set_attribute: unsafe extern "C" fn(CuFunction, c_int, c_int) -> CuResult,
    /// `cuLaunchKernel`; handed to the C++ glue, which launches the fused kernels with it.
    pub(crate) launch_kernel: LaunchKernelFn,
    /// `cuLaunchKernelEx`: launches with attributes (the decode kernels' programmatic
    /// dependent launches).
    pub(crate) launch_kernel_ex: unsafe extern "C" fn(
        *const LaunchConfig,
        CuFunction,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    // CUDA graphs of the decode kernels (`crate::fused::DecodeGraph`).
    pub(crate) stream_begin_capture: unsafe extern "C" fn(CuStream, c_int) -> CuResult,
    pub(crate) stream_end_capture: unsafe extern "C" fn(CuStream, *mut CuGraph) -> CuResult,
    pub(crate) graph_instantiate: unsafe extern "C" fn(*mut CuGraphExec, CuGraph, u64) -> CuResult,
    pub(crate) graph_launch: unsafe extern "C" fn(CuGraphExec, CuStream) -> CuResult,
    pub(crate) graph_exec_destroy: unsafe extern "C" fn(CuGraphExec) -> CuResult,
    pub(crate) graph_destroy: unsafe extern "C" fn(CuGraph) -> CuResult,
}

/// `CUresult cuLaunchKernel(CUfunction f, unsigned gridX, gridY, gridZ, blockX, blockY, blockZ,
/// unsigned sharedMemBytes, CUstream, void **kernelParams, void **extra)`.
pub(crate) type LaunchKernelFn = unsafe extern "C" fn(
    CuFunction,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    CuStream,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;

/// `CUlaunchConfig`: a launch's grid, block, shared memory, stream and attributes.
#[repr(C)]
pub(crate) struct LaunchConfig {
    pub(crate) grid: [c_uint; 3],
    pub(crate) block: [c_uint; 3],
    pub(crate) shared_mem_bytes: c_uint,
    pub(crate) stream: CuStream,
    pub(crate) attrs: *mut LaunchAttribute,
    pub(crate) num_attrs: c_uint,
}

/// `CUlaunchAttribute`: an attribute id, padded to 8 bytes, and its value (a 64-byte union
/// whose first member, an int, is the value of every flag attribute).
#[repr(C, align(8))]
pub(crate) struct LaunchAttribute {
    pub(crate) id: c_int,
    pub(crate) pad: [u8; 4],
    pub(crate) value: [u8; 64],
}

impl LaunchAttribute {
    /// An attribute whose value is one int (`cooperative`,
    /// `programmaticStreamSerializationAllowed`, ...).
    pub(crate) fn flag(id: c_int, on: bool) -> Self {
        let mut value = [0u8; 64];
        value[..4].copy_from_slice(&c_int::from(on).to_ne_bytes());
        LaunchAttribute {
            id,
            pad: [0; 4],
            value,
        }
    }
}

/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`: the launch may begin before the
/// previous kernel in its stream ends, once every CTA of that kernel has run
/// `griddepcontrol.launch_dependents` (or exited); the kernel's `griddepcontrol.wait` then
/// waits for the previous kernel's completion and its memory. Compute capability 9.0 and up.
pub(crate) const LAUNCH_ATTR_PROGRAMMATIC_SERIALIZATION: c_int = 6;

/// `CUmodule` / `CUfunction`: opaque driver handles.
pub(crate) type CuModule = *mut c_void;
pub(crate) type CuFunction = *mut c_void;
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
pub(crate) const FUNC_ATTR_MAX_DYNAMIC_SHARED: c_int = 8;
/// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
pub(crate) const ATTR_MAX_SHARED_OPTIN: c_int = 97;

/// `CUcontext` / `CUstream`: opaque driver handles.
pub(crate) type CuContext = *mut std::os::raw::c_void;
pub(crate) type CuStream = *mut std::os::raw::c_void;
/// `CUevent`: opaque driver handle.
pub(crate) type CuEvent = *mut std::os::raw::c_void;
/// `CUgraph` / `CUgraphExec`: opaque driver handles.
pub(crate) type CuGraph = *mut std::os::raw::c_void;
pub(crate) type CuGraphExec = *mut std::os::raw::c_void;
/// `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`: only this thread's unsafe calls end a capture.
pub(crate) const CAPTURE_MODE_THREAD_LOCAL: c_int = 1;
/// `CU_STREAM_NON_BLOCKING`: no implicit synchronisation with the legacy default stream.
pub(crate) const STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_EVENT_DISABLE_TIMING`: the cheapest event, for ordering only.
pub(crate) const EVENT_DISABLE_TIMING: c_uint = 2;

pub(crate) const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
/// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR`.
pub(crate) const ATTR_MAX_SHARED_PER_SM: c_int = 81;
pub(crate) const ATTR_CC_MAJOR: c_int = 75;
pub(crate) const ATTR_CC_MINOR: c_int = 76;

/// One GPU as the driver describes it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    pub total_memory_bytes: u64,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
}

/// What the driver reports: its version (e.g. 13000) and the devices.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DriverInfo {
    pub driver_cuda_version: i32,
    pub devices: Vec<DeviceInfo>,
}

/// `Ok` for `CUDA_SUCCESS`, else the call's name and code.
pub(crate) fn check(call: &'static str, code: CuResult) -> Result<(), SysError> {
    if code == 0 {
        Ok(())
    } else {
        Err(SysError::Call {
            call,
            code: code as i64,
        })
    }
}

impl Driver {
    pub(crate) fn open() -> Result<Self, SysError> {
        let name = "libcuda.so.1";
        // SAFETY: libcuda's initialisers have no preconditions.
        let lib = unsafe { libloading::Library::new(name) }.map_err(|e| SysError::Load {
            name: name.into(),
            reason: e.to_string(),
        })?;
        macro_rules! sym {
            ($s:literal) => {{
                // SAFETY: the declared signature matches the CUDA driver API header.
                let f = unsafe { lib.get($s.as_bytes()) }.map_err(|e| SysError::Symbol {
                    library: name.into(),
                    symbol: $s.into(),
                    reason: e.to_string(),
                })?;
                *f
            }};
        }
        let init: unsafe extern "C" fn(c_uint) -> CuResult = sym!("cuInit");
        let driver = Driver {
            device_get_count: sym!("cuDeviceGetCount"),
            device_get_name: sym!("cuDeviceGetName"),
            device_total_mem: sym!("cuDeviceTotalMem_v2"),
            device_get_attribute: sym!("cuDeviceGetAttribute"),
            driver_get_version: sym!("cuDriverGetVersion"),
            primary_ctx_retain: sym!("cuDevicePrimaryCtxRetain"),
            ctx_set_current: sym!("cuCtxSetCurrent"),
            ctx_get_current: sym!("cuCtxGetCurrent"),
            stream_query: sym!("cuStreamQuery"),
            stream_create: sym!("cuStreamCreate"),
            stream_destroy: sym!("cuStreamDestroy_v2"),
            stream_wait_event: sym!("cuStreamWaitEvent"),
            event_create: sym!("cuEventCreate"),
            event_destroy: sym!("cuEventDestroy_v2"),
            event_record: sym!("cuEventRecord"),
            event_synchronize: sym!("cuEventSynchronize"),
            // The original entry point (CUDA 13's header maps the name to `_v2`, added in 12.8):
            // every driver exports it, so older drivers load this table too.
            event_elapsed_time: sym!("cuEventElapsedTime"),
            module_load_data: sym!("cuModuleLoadData"),
            module_get_function: sym!("cuModuleGetFunction"),
            func_set_attribute: sym!("cuFuncSetAttribute"),
            launch_kernel: sym!("cuLaunchKernel"),
            launch_kernel_ex: sym!("cuLaunchKernelEx"),
            stream_begin_capture: sym!("cuStreamBeginCapture_v2"),
            stream_end_capture: sym!("cuStreamEndCapture"),
            graph_instantiate: sym!("cuGraphInstantiateWithFlags"),
            graph_launch: sym!("cuGraphLaunch"),
            graph_exec_destroy: sym!("cuGraphExecDestroy"),
            graph_destroy: sym!("cuGraphDestroy"),
            _lib: std::mem::ManuallyDrop::new(lib),
        };
        // SAFETY: cuInit(0) is always valid to call, repeatedly too.
        check("cuInit", unsafe { init(0) })?;
        // The glue binds a device's primary context on a thread that has none before it takes
        // a stream to launch on (glue/stream.cpp, bind_context).
        // SAFETY: the three pointers are the driver's own entry points with the signatures
        // stream.cpp declares; the driver library is never unloaded.
        unsafe {
            crate::glue::nsa_glue_set_context_calls(
                driver.ctx_get_current as *const c_void,
                driver.primary_ctx_retain as *const c_void,
                driver.ctx_set_current as *const c_void,
            )
        };
        Ok(driver)
    }

    fn info(&self) -> Result<DriverInfo, SysError> {
        let mut version = 0;
        let mut count = 0;
        // SAFETY: out-pointers are valid for the duration of each call.
        unsafe {
            check(
                "cuDriverGetVersion",
                (self.driver_get_version)(&mut version),
            )?;
            check("cuDeviceGetCount", (self.device_get_count)(&mut count))?;
        }
        let mut devices = Vec::new();
        for dev in 0..count {
            let mut name = [0 as c_char; 256];
            let mut mem = 0usize;
            let (mut major, mut minor, mut sms) = (0, 0, 0);
            // SAFETY: `name` holds 256 bytes and the length passed says so; the other
            // out-pointers are valid; `dev` < count is a valid ordinal.
            unsafe {
                check(
                    "cuDeviceGetName",
                    (self.device_get_name)(name.as_mut_ptr(), 256, dev),
                )?;
                check("cuDeviceTotalMem", (self.device_total_mem)(&mut mem, dev))?;
                check(
                    "cuDeviceGetAttribute",
                    (self.device_get_attribute)(&mut major, ATTR_CC_MAJOR, dev),
                )?;
                check(
                    "cuDeviceGetAttribute",
                    (self.device_get_attribute)(&mut minor, ATTR_CC_MINOR, dev),
                )?;
                check(
                    "cuDeviceGetAttribute",
                    (self.device_get_attribute)(&mut sms, ATTR_MULTIPROCESSOR_COUNT, dev),
                )?;
            }
            // SAFETY: the driver writes a NUL-terminated string into the 256-byte buffer.
            let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
            devices.push(DeviceInfo {
                index: dev as usize,
                name: name.to_string_lossy().into_owned(),
                total_memory_bytes: mem as u64,
                compute_capability: (major, minor),
                multiprocessors: sms,
            });
        }
        Ok(DriverInfo {
            driver_cuda_version: version,
            devices,
        })
    }
}

static SHARED: OnceLock<Result<Driver, String>> = OnceLock::new();

/// One driver table for the process (opened on first use), for callers that keep handles
/// (modules, functions) for the process's life.
pub(crate) fn shared() -> Result<&'static Driver, SysError> {
    SHARED
        .get_or_init(|| Driver::open().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| SysError::Load {
            name: "libcuda.so.1".into(),
            reason: reason.clone(),
        })
}

/// Queries the CUDA driver. Errors when `libcuda.so.1` is absent (no NVIDIA driver).
pub fn driver_info() -> Result<DriverInfo, SysError> {
    Driver::open()?.info()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launch structs as `cuda.h` lays them out on 64-bit hosts: `cuLaunchKernelEx` reads
    /// them by offset.
    #[test]
    fn launch_structs_match_the_driver_header() {
        assert_eq!(std::mem::size_of::<LaunchAttribute>(), 72);
        assert_eq!(std::mem::align_of::<LaunchAttribute>(), 8);
        assert_eq!(std::mem::offset_of!(LaunchAttribute, value), 8);
        assert_eq!(std::mem::size_of::<LaunchConfig>(), 56);
        assert_eq!(std::mem::offset_of!(LaunchConfig, stream), 32);
        assert_eq!(std::mem::offset_of!(LaunchConfig, attrs), 40);
        assert_eq!(std::mem::offset_of!(LaunchConfig, num_attrs), 48);
        let on = LaunchAttribute::flag(LAUNCH_ATTR_PROGRAMMATIC_SERIALIZATION, true);
        assert_eq!(on.id, 6);
        assert_eq!(c_int::from_ne_bytes(on.value[..4].try_into().unwrap()), 1);
        let off = LaunchAttribute::flag(LAUNCH_ATTR_PROGRAMMATIC_SERIALIZATION, false);
        assert!(off.value.iter().all(|&b| b == 0));
    }
}
