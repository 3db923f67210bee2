//! Loading libtorch's CUDA backend, its sync debug mode, and CUDA graphs of libtorch work
//! ([`CudaGraph`]).
//!
//! `libtorch_cuda.so` registers the CUDA hooks from its static initialisers; it must be opened
//! with `RTLD_GLOBAL` so that the kernels it registers resolve against the already-loaded
//! `libtorch_cpu.so`. We open it from the folder that holds the `libtorch_cpu.so` this process
//! already mapped, so the CUDA backend always matches the CPU library (no search path surprises).
use std::ffi::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::autograd::{glue_error, GlueError, ERR_LEN};
use crate::SysError;

/// What [`load_backend`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaBackend {
    /// `libtorch_cuda.so` was opened; `devices` GPUs are visible.
    Loaded { library: PathBuf, devices: usize },
    /// This libtorch has no CUDA backend (a CPU-only build).
    NotBuilt { libtorch_lib: PathBuf },
    /// The backend loaded but no GPU is visible (no driver, or `CUDA_VISIBLE_DEVICES` empty).
    NoDevice { library: PathBuf },
}

impl CudaBackend {
    /// Whether CUDA tensors can be created.
    pub fn has_gpu(&self) -> bool {
        matches!(self, CudaBackend::Loaded { devices, .. } if *devices > 0)
    }
}

impl std::fmt::Display for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaBackend::Loaded { library, devices } => {
                write!(
                    f,
                    "CUDA backend loaded from {} ({devices} GPU(s))",
                    library.display()
                )
            }
            CudaBackend::NotBuilt { libtorch_lib } => {
                write!(
                    f,
                    "CPU-only libtorch at {} (no libtorch_cuda.so)",
                    libtorch_lib.display()
                )
            }
            CudaBackend::NoDevice { library } => {
                write!(
                    f,
                    "CUDA backend loaded from {} but no GPU is visible",
                    library.display()
                )
            }
        }
    }
}

static BACKEND: OnceLock<Result<CudaBackend, String>> = OnceLock::new();

/// Opens libtorch's CUDA backend once per process; later calls return the first result.
///
/// Call it before creating any tensor. On a CPU-only libtorch or a machine without GPUs it
/// succeeds with [`CudaBackend::NotBuilt`] / [`CudaBackend::NoDevice`].
pub fn load_backend() -> Result<CudaBackend, SysError> {
    BACKEND
        .get_or_init(|| load_once().map_err(|e| e.to_string()))
        .clone()
        .map_err(|reason| SysError::Load {
            name: "libtorch_cuda.so".into(),
            reason,
        })
}

fn load_once() -> Result<CudaBackend, SysError> {
    let cpu = libtorch_cpu_path().ok_or_else(|| SysError::Load {
        name: "libtorch_cuda.so".into(),
        reason: "libtorch_cpu.so is not mapped into this process (is tch linked?)".into(),
    })?;
    let dir = cpu.parent().map(Path::to_path_buf).unwrap_or_default();
    let library = dir.join("libtorch_cuda.so");
    if !library.exists() {
        return Ok(CudaBackend::NotBuilt { libtorch_lib: dir });
    }
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
    // SAFETY: opening libtorch_cuda runs its static initialisers, which register CUDA hooks with
    // the libtorch_cpu already loaded from the same folder (same build). The handle is leaked on
    // purpose: unloading libtorch_cuda while tensors exist would be unsound.
    let lib =
        unsafe { libloading::os::unix::Library::open(Some(&library), flags) }.map_err(|e| {
            SysError::Load {
                name: library.display().to_string(),
                reason: e.to_string(),
            }
        })?;
    std::mem::forget(lib);
    let devices = crate::glue::cuda_device_count();
    if devices == 0 {
        Ok(CudaBackend::NoDevice { library })
    } else {
        Ok(CudaBackend::Loaded { library, devices })
    }
}

/// Path of the `libtorch_cpu.so` mapped into this process, read from `/proc/self/maps`.
pub fn libtorch_cpu_path() -> Option<PathBuf> {
    // libtorch_cpu.so is a DT_NEEDED of every binary that links tch, so it is mapped before
    // main. Do NOT call into libtorch here to "make sure": any CUDA query before the dlopen
    // (e.g. tch::utils::has_cuda) makes ATen cache its CPU-only CUDA-hooks stub for good.
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(PathBuf::from)
}

/// The folder of the libtorch this process uses (parent of its `lib/`).
pub fn libtorch_root() -> Option<PathBuf> {
    libtorch_cpu_path()?
        .parent()?
        .parent()
        .map(Path::to_path_buf)
}

/// libtorch's CUDA synchronisation debug mode (PyTorch's `torch.cuda.set_sync_debug_mode`):
/// what a host-synchronising CUDA call (`.item()`, a blocking copy, `nonzero`, a stream or
/// device synchronize, …) does while it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDebugMode {
    /// Nothing (libtorch's default).
    Disabled,
    /// A warning per synchronising call.
    Warn,
    /// The synchronising call throws ("called a synchronizing CUDA operation"), which reaches
    /// Rust as an error of the tch call that made it.
    Error,
}

impl SyncDebugMode {
    fn from_code(code: i32) -> Self {
        match code {
            0 => SyncDebugMode::Disabled,
            1 => SyncDebugMode::Warn,
            _ => SyncDebugMode::Error,
        }
    }

    fn code(self) -> i32 {
        // c10::cuda::SyncDebugMode's values (c10/cuda/CUDAFunctions.h).
        match self {
            SyncDebugMode::Disabled => 0,
            SyncDebugMode::Warn => 1,
            SyncDebugMode::Error => 2,
        }
    }
}

/// Address of c10's `warning_state()` singleton in `libc10_cuda.so` (one process-wide object,
/// a `STB_GNU_UNIQUE` symbol that libtorch_cuda's inline checks read): the `WarningState`
/// whose only member is the `SyncDebugMode` (an `enum class`, an `int`).
static SYNC_STATE: OnceLock<Result<usize, String>> = OnceLock::new();

fn sync_state() -> Result<*mut i32, SysError> {
    let found = SYNC_STATE.get_or_init(|| {
        let backend = load_backend().map_err(|e| e.to_string())?;
        let (CudaBackend::Loaded { library, .. } | CudaBackend::NoDevice { library }) = backend
        else {
            return Err(format!("no CUDA backend: {backend}"));
        };
        let c10 = library.with_file_name("libc10_cuda.so");
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        // SAFETY: libtorch_cuda.so already loaded this library (a dependency), so opening it
        // again only takes a reference; the handle is leaked like the backend's.
        let lib = unsafe { libloading::os::unix::Library::open(Some(&c10), flags) }
            .map_err(|e| format!("{}: {e}", c10.display()))?;
        // SAFETY: a data symbol looked up by its mangled name; we only take its address.
        let addr = unsafe {
            lib.get::<*mut i32>(b"_ZZN3c104cuda13warning_stateEvE14warning_state_\0")
                .map(|s| *s as usize)
        }
        .map_err(|e| format!("c10::cuda::warning_state() in {}: {e}", c10.display()))?;
        std::mem::forget(lib);
        Ok(addr)
    });
    match found {
        Ok(addr) => Ok(*addr as *mut i32),
        Err(reason) => Err(SysError::Load {
            name: "libc10_cuda.so (sync debug mode)".into(),
            reason: reason.clone(),
        }),
    }
}

/// libtorch's current [`SyncDebugMode`] (an error where its CUDA backend is not loaded).
pub fn sync_debug_mode() -> Result<SyncDebugMode, SysError> {
    let state = sync_state()?;
    // SAFETY: as in `SyncDebugGuard::new`.
    Ok(SyncDebugMode::from_code(unsafe {
        std::ptr::read_volatile(state)
    }))
}

/// Sets libtorch's [`SyncDebugMode`] for its lifetime and restores the previous mode on drop,
/// so code between can be checked for host synchronisations: under [`SyncDebugMode::Error`]
/// any synchronising CUDA call fails with libtorch's message (set
/// `TORCH_SHOW_CPP_STACKTRACES=1` to see which operation made it). The mode is process-wide
/// (autograd's device threads see it too); one guard at a time.
#[derive(Debug)]
pub struct SyncDebugGuard {
    state: *mut i32,
    before: i32,
}

impl SyncDebugGuard {
    /// Switches to `mode`; an error where libtorch's CUDA backend is not loaded.
    pub fn new(mode: SyncDebugMode) -> Result<Self, SysError> {
        let state = sync_state()?;
        // SAFETY: `state` is the live, process-lifetime int of c10's warning state; libtorch
        // itself writes it the same way (a plain store) from torch.cuda.set_sync_debug_mode.
        let before = unsafe { std::ptr::read_volatile(state) };
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(state, mode.code()) };
        Ok(Self { state, before })
    }
}

impl Drop for SyncDebugGuard {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { std::ptr::write_volatile(self.state, self.before) };
    }
}

extern "C" {
    fn nsa_cuda_graph_new(
        device: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn nsa_cuda_graph_begin(graph: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn nsa_cuda_graph_end(graph: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn nsa_cuda_graph_replay(graph: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn nsa_cuda_graph_free(graph: *mut c_void);
}

/// Calls a glue function of the graph family with an error buffer.
fn graph_call(
    call: &'static str,
    f: impl FnOnce(*mut c_char, usize) -> c_int,
) -> Result<(), GlueError> {
    let mut err = vec![0u8; ERR_LEN];
    if f(err.as_mut_ptr().cast(), err.len()) != 0 {
        return Err(glue_error(call, &err));
    }
    Ok(())
}

/// The libtorch work (kernels, copies, allocations) of one region of code, captured once as a
/// CUDA graph and replayed on libtorch's current stream: libtorch's `at::cuda::CUDAGraph`
/// (PyTorch's `torch.cuda.CUDAGraph`). Tensors the region allocates come from the graph's
/// private memory pool and are rewritten by every replay, so a replay's results are read from
/// the tensors the capture returned; inputs are tensors the region read, overwritten in place
/// before a replay. Drop those tensors before the graph (the pool goes with it).
///
/// The region must not synchronise with the host, read device values on the host, allocate
/// pinned memory or load modules (run it once without capture first, which also builds what
/// runs lazily). Capturing needs libtorch's CUDA backend ([`load_backend`]).
#[derive(Debug)]
pub struct CudaGraph {
    raw: *mut c_void,
}

impl CudaGraph {
    /// Captures what `body` enqueues on CUDA device `device` (nothing runs during the capture)
    /// and returns the graph with `body`'s result. When `body` fails, the capture is ended and
    /// its error returned.
    pub fn capture<T, E: From<GlueError>>(
        device: usize,
        body: impl FnOnce() -> Result<T, E>,
    ) -> Result<(Self, T), E> {
        let mut raw = std::ptr::null_mut();
        let device = c_int::try_from(device).map_err(|_| GlueError {
            call: "nsa_cuda_graph_new",
            message: format!("device {device} out of range"),
        })?;
        // SAFETY: the glue writes a heap-allocated graph through `out` on success and an error
        // message of at most `err_len` bytes on failure.
        graph_call("nsa_cuda_graph_new", |err, len| unsafe {
            nsa_cuda_graph_new(device, &mut raw, err, len)
        })?;
        let graph = Self { raw };
        // SAFETY: `graph.raw` is the live graph made above; the glue restores the current stream
        // on its own failure.
        graph_call("nsa_cuda_graph_begin", |err, len| unsafe {
            nsa_cuda_graph_begin(graph.raw, err, len)
        })?;
        let result = body();
        // SAFETY: as above; the capture began, so it is ended whatever `body` returned (which
        // also switches the current stream back).
        let ended = graph_call("nsa_cuda_graph_end", |err, len| unsafe {
            nsa_cuda_graph_end(graph.raw, err, len)
        });
        let value = result?;
        ended?;
        Ok((graph, value))
    }

    /// Runs the captured work once more, on libtorch's current stream of the device.
    pub fn replay(&self) -> Result<(), GlueError> {
        // SAFETY: `self.raw` is a graph whose capture ended successfully.
        graph_call("nsa_cuda_graph_replay", |err, len| unsafe {
            nsa_cuda_graph_replay(self.raw, err, len)
        })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `nsa_cuda_graph_new` and is freed exactly once.
        unsafe { nsa_cuda_graph_free(self.raw) };
    }
}
