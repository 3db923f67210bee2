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

#[cfg(test)]
mod tests {
    //! The context-binding rule of `glue/stream.cpp` (a thread without a current context gets
    //! its device's primary context, retained once; a thread with one is left alone) over
    //! stand-in driver calls whose state is this thread's.
    use std::cell::Cell;
    use std::os::raw::{c_char, c_int, c_void};

    extern "C" {
        fn nsa_glue_bind_context_with(
            get_current: *const c_void,
            primary_retain: *const c_void,
            set_current: *const c_void,
            device: c_int,
            binds: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }

    /// Stand-in primary context of device d: `PRIMARY + d`.
    const PRIMARY: usize = 0x5000;

    thread_local! {
        static CURRENT: Cell<usize> = const { Cell::new(0) };
        static RETAINS: Cell<u32> = const { Cell::new(0) };
        static SETS: Cell<u32> = const { Cell::new(0) };
        static RETAIN_RC: Cell<c_int> = const { Cell::new(0) };
        /// Whether `set_current` makes its context current (false: a driver that forgets, so
        /// every bind must set again from the cache).
        static STICKY: Cell<bool> = const { Cell::new(true) };
    }

    unsafe extern "C" fn get_current(ctx: *mut *mut c_void) -> c_int {
        // SAFETY: the glue passes a valid out-pointer.
        unsafe { *ctx = CURRENT.get() as *mut c_void };
        0
    }

    unsafe extern "C" fn primary_retain(ctx: *mut *mut c_void, device: c_int) -> c_int {
        RETAINS.set(RETAINS.get() + 1);
        let rc = RETAIN_RC.get();
        if rc == 0 {
            // SAFETY: the glue passes a valid out-pointer.
            unsafe { *ctx = (PRIMARY + device as usize) as *mut c_void };
        }
        rc
    }

    unsafe extern "C" fn set_current(ctx: *mut c_void) -> c_int {
        SETS.set(SETS.get() + 1);
        if STICKY.get() {
            CURRENT.set(ctx as usize);
        }
        0
    }

    fn bind(device: c_int, binds: c_int) -> Result<(), String> {
        let mut err = vec![0u8; 512];
        // SAFETY: three functions with the signatures stream.cpp declares, an error buffer of
        // its stated length; the glue catches every exception.
        let rc = unsafe {
            nsa_glue_bind_context_with(
                get_current as *const c_void,
                primary_retain as *const c_void,
                set_current as *const c_void,
                device,
                binds,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(String::from_utf8_lossy(&err[..end]).into_owned())
    }

    fn reset(current: usize, retain_rc: c_int, sticky: bool) {
        CURRENT.set(current);
        RETAINS.set(0);
        SETS.set(0);
        RETAIN_RC.set(retain_rc);
        STICKY.set(sticky);
    }

    #[test]
    fn a_thread_without_a_context_gets_its_devices_primary_once() {
        reset(0, 0, true);
        bind(3, 3).unwrap();
        assert_eq!(CURRENT.get(), PRIMARY + 3);
        assert_eq!((RETAINS.get(), SETS.get()), (1, 1));
    }

    #[test]
    fn a_thread_with_a_context_is_left_alone() {
        reset(0x77, 0, true);
        bind(0, 2).unwrap();
        assert_eq!(CURRENT.get(), 0x77);
        assert_eq!((RETAINS.get(), SETS.get()), (0, 0));
    }

    #[test]
    fn the_primary_context_is_retained_once_and_set_at_every_bind_that_needs_it() {
        reset(0, 0, false);
        bind(1, 4).unwrap();
        assert_eq!((RETAINS.get(), SETS.get()), (1, 4));
    }

    #[test]
    fn driver_errors_and_bad_ordinals_are_errors_that_name_the_call() {
        reset(0, 100, true);
        let e = bind(1, 1).unwrap_err();
        assert!(
            e.contains("cuDevicePrimaryCtxRetain(1) failed with CUDA driver error 100"),
            "{e}"
        );
        assert_eq!((SETS.get(), CURRENT.get()), (0, 0));
        reset(0, 0, true);
        let e = bind(64, 1).unwrap_err();
        assert!(e.contains("CUDA device 64 out of range"), "{e}");
        assert_eq!(RETAINS.get(), 0);
    }
}
