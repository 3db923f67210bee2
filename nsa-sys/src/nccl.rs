//! The NCCL function table, loaded from `libnccl.so.2`, and a communicator over it.
//!
//! No Rust binding of NCCL exists; we open the library the torch wheel ships (or the system's)
//! and resolve the symbols we call. Search order: the system loader's paths, then the torch
//! wheel layout `<site-packages>/nvidia/nccl/lib/` beside the libtorch in use.
//!
//! Signatures and enum values are those of `nccl.h` (NCCL 2.x):
//!
//! | C | here |
//! | --- | --- |
//! | `ncclUniqueId` (`char internal[128]`) | [`UniqueId`] |
//! | `ncclDataType_t`: int64 = 4, float16 = 6, float32 = 7, float64 = 8, bfloat16 = 9 (NCCL ≥ 2.10) | [`DataType`] |
//! | `ncclRedOp_t`: sum = 0 | (sum is the only reduction we issue) |
//!
//! # Streams
//!
//! `tch` never changes libtorch's current CUDA stream, so every libtorch op of this process runs
//! on the *legacy default stream* of its device. [`NcclComm`] runs its collectives on a stream of
//! its own (non-blocking, so the default stream's kernels run beside it), ordered by two events:
//!
//! - every collective first makes the communication stream wait for an event recorded on the
//!   default stream at the moment of the call, so it reads its input after the kernels enqueued
//!   before the call (by any thread, e.g. an autograd worker inside `backward`);
//! - [`NcclComm::join`] makes the default stream wait for everything issued on the communication
//!   stream so far, so kernels enqueued after `join` see the results.
//!
//! Between a collective and `join`, the default stream keeps computing (this is what lets
//! gradient buckets be reduced while backward still runs) and must neither read nor write the
//! tensor. The communicator keeps a reference to each such tensor until `join`, so the caching
//! allocator cannot hand its memory to other default-stream work meanwhile.
//! [`NcclComm::synchronize`] joins first. If a caller ever makes libtorch itself run on another
//! stream (a `CUDAStreamGuard` in C++ glue), that caller must synchronise with the default stream.
//!
//! # Devices
//!
//! NCCL binds a communicator to the CUDA device current at `ncclCommInitRank`. [`NcclComm`] makes
//! the primary context of its device current on the calling thread (driver API:
//! `cuDevicePrimaryCtxRetain` + `cuCtxSetCurrent`, what `cudaSetDevice` does) before init and
//! before every collective, so one process may drive any visible device.
//!
//! # Completion and timeouts
//!
//! Collectives are enqueued and return at once. [`NcclComm::synchronize`] joins, then waits for
//! the default stream by polling `cuStreamQuery` and `ncclCommGetAsyncError`; past its timeout
//! it calls `ncclCommAbort` (which unblocks the stuck kernels) and returns
//! [`NcclError::Timeout`]. An
//! aborted communicator refuses further work. `ncclCommInitRank` itself blocks until every rank
//! called it; run a rendezvous first so that all ranks are known to be alive.
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::driver::{
    CuContext, CuEvent, CuStream, Driver as CudaDriver, EVENT_DISABLE_TIMING, STREAM_NON_BLOCKING,
};
use crate::SysError;

/// Bytes in an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// The opaque `ncclUniqueId` that rank 0 creates and every rank passes to `ncclCommInitRank`.
pub type UniqueId = [u8; UNIQUE_ID_BYTES];

type NcclResult = c_int;
type RawComm = *mut c_void;
type Stream = *mut c_void;

/// `typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;` — passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

/// `ncclDataType_t` values we use (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Int64 = 4,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    /// Needs NCCL ≥ 2.10.
    Bfloat16 = 9,
}

impl DataType {
    /// The NCCL type of a libtorch dtype, if NCCL has one we support.
    pub fn from_kind(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Int64 => Some(Self::Int64),
            Kind::Half => Some(Self::Float16),
            Kind::Float => Some(Self::Float32),
            Kind::Double => Some(Self::Float64),
            Kind::BFloat16 => Some(Self::Bfloat16),
            _ => None,
        }
    }
}

/// `ncclSum`.
const NCCL_SUM: c_int = 0;

/// Errors from the NCCL communicator.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    /// Loading NCCL or the CUDA driver failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// An NCCL call returned an error code.
    #[error("{call} failed: {message} (ncclResult_t {code})")]
    Call {
        call: &'static str,
        code: i64,
        message: String,
    },
    /// A CUDA driver call returned an error code.
    #[error("{call} failed with CUresult {code}")]
    Driver { call: &'static str, code: i64 },
    /// A collective did not complete in time; the communicator was aborted.
    #[error("NCCL rank {rank}: collectives not complete after {waited:?}; communicator aborted")]
    Timeout { rank: usize, waited: Duration },
    /// `ncclCommGetAsyncError` reported a failure; the communicator was aborted.
    #[error("NCCL rank {rank}: asynchronous error: {message} (ncclResult_t {code}); communicator aborted")]
    Async {
        rank: usize,
        code: i64,
        message: String,
    },
    /// The communicator was aborted earlier and cannot be used.
    #[error("NCCL rank {rank}: communicator was aborted")]
    Aborted { rank: usize },
    /// A tensor that NCCL cannot take as it is.
    #[error("tensor not usable by NCCL: {0}")]
    BadTensor(String),
    /// Arguments out of range (rank ≥ world, bf16 on an old NCCL, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// An opened `libnccl.so.2` with its function table.
#[derive(Debug)]
pub struct Nccl {
    // Never closed: `ncclGetUniqueId` starts a bootstrap thread inside libnccl that outlives the
    // call (it serves the other ranks' connections); unmapping the library would crash it.
    lib: std::mem::ManuallyDrop<libloading::Library>,
    path: String,
}

/// The resolved entry points (valid while the owning [`Nccl`] lives).
#[derive(Clone, Copy)]
struct Table {
    get_unique_id: unsafe extern "C" fn(*mut RawUniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, RawUniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        Stream,
    ) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        Stream,
    ) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

impl Nccl {
    /// Opens NCCL from the first place that has it (see the module docs).
    pub fn open() -> Result<Self, SysError> {
        let mut tried = Vec::new();
        for candidate in candidates() {
            // SAFETY: NCCL's initialisers have no preconditions.
            match unsafe { libloading::Library::new(&candidate) } {
                Ok(lib) => {
                    return Ok(Nccl {
                        lib: std::mem::ManuallyDrop::new(lib),
                        path: candidate,
                    })
                }
                Err(e) => tried.push(format!("{candidate}: {e}")),
            }
        }
        Err(SysError::Load {
            name: "libnccl.so.2".into(),
            reason: tried.join("; "),
        })
    }

    /// Where the library was found.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn sym<T: Copy>(&self, name: &'static str) -> Result<T, SysError> {
        // SAFETY: every caller declares `T` as the signature nccl.h gives for `name`.
        let f: libloading::Symbol<'_, T> =
            unsafe { self.lib.get(name.as_bytes()) }.map_err(|e| SysError::Symbol {
                library: self.path.clone(),
                symbol: name.into(),
                reason: e.to_string(),
            })?;
        Ok(*f)
    }

    fn table(&self) -> Result<Table, SysError> {
        Ok(Table {
            get_unique_id: self.sym("ncclGetUniqueId")?,
            comm_init_rank: self.sym("ncclCommInitRank")?,
            all_reduce: self.sym("ncclAllReduce")?,
            broadcast: self.sym("ncclBroadcast")?,
            comm_destroy: self.sym("ncclCommDestroy")?,
            comm_abort: self.sym("ncclCommAbort")?,
            comm_get_async_error: self.sym("ncclCommGetAsyncError")?,
            get_error_string: self.sym("ncclGetErrorString")?,
        })
    }

    /// NCCL's version as (major, minor, patch), from `ncclGetVersion`.
    pub fn version(&self) -> Result<(i32, i32, i32), SysError> {
        // Signature from nccl.h: ncclResult_t ncclGetVersion(int *version).
        let f: unsafe extern "C" fn(*mut c_int) -> c_int = self.sym("ncclGetVersion")?;
        let mut v = 0;
        // SAFETY: `v` is a valid out-pointer.
        let code = unsafe { f(&mut v) };
        if code != 0 {
            return Err(SysError::Call {
                call: "ncclGetVersion",
                code: code as i64,
            });
        }
        // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
        Ok((v / 10000, (v / 100) % 100, v % 100))
    }

    /// `ncclGetErrorString` for a result code.
    pub fn error_string(&self, code: i32) -> String {
        match self.sym::<unsafe extern "C" fn(NcclResult) -> *const c_char>("ncclGetErrorString") {
            // SAFETY: NCCL returns a pointer to a static NUL-terminated string (or null).
            Ok(f) => unsafe { cstr_or(f(code), code) },
            Err(_) => format!("NCCL error {code}"),
        }
    }

    /// A fresh `ncclUniqueId` (`ncclGetUniqueId`). Rank 0 creates it and hands it to the others.
    /// Needs no GPU: it only picks a bootstrap network interface and port.
    pub fn unique_id(&self) -> Result<UniqueId, NcclError> {
        let table = self.table()?;
        let mut raw = RawUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: `raw` is a valid out-pointer to an ncclUniqueId.
        let code = unsafe { (table.get_unique_id)(&mut raw) };
        check(&table, "ncclGetUniqueId", code)?;
        Ok(raw.internal.map(|c| c as u8))
    }
}

/// # Safety
/// `p` must be null or point to a NUL-terminated string.
unsafe fn cstr_or(p: *const c_char, code: i32) -> String {
    if p.is_null() {
        format!("NCCL error {code}")
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn error_message(table: &Table, code: NcclResult) -> String {
    // SAFETY: ncclGetErrorString returns a static string for any code.
    unsafe { cstr_or((table.get_error_string)(code), code) }
}

fn check(table: &Table, call: &'static str, code: NcclResult) -> Result<(), NcclError> {
    if code == 0 {
        Ok(())
    } else {
        Err(NcclError::Call {
            call,
            code: code as i64,
            message: error_message(table, code),
        })
    }
}

fn candidates() -> Vec<String> {
    let mut out = vec!["libnccl.so.2".to_string()];
    if let Some(root) = crate::cuda::libtorch_root() {
        // <site-packages>/torch -> <site-packages>/nvidia/nccl/lib/libnccl.so.2
        if let Some(site) = root.parent() {
            let p: PathBuf = site.join("nvidia/nccl/lib/libnccl.so.2");
            out.push(p.display().to_string());
        }
    }
    out
}

type CuResult = c_int;

fn driver_call(call: &'static str, code: CuResult) -> Result<(), NcclError> {
    Ok(crate::driver::check(call, code)?)
}

/// `CUDA_ERROR_NOT_READY`.
const CUDA_ERROR_NOT_READY: CuResult = 600;

/// One rank's NCCL communicator, bound to one CUDA device (see the module docs for streams,
/// devices and timeouts).
pub struct NcclComm {
    _nccl: Arc<Nccl>,
    table: Table,
    driver: CudaDriver,
    comm: RawComm,
    ctx: CuContext,
    /// The communication stream and its two ordering events (see the module docs).
    stream: CuStream,
    inputs_ready: CuEvent,
    results_ready: CuEvent,
    /// Tensors of collectives issued since the last `join`, kept alive until then.
    in_flight: Vec<Tensor>,
    rank: usize,
    world: usize,
    device: usize,
    bf16: bool,
    aborted: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclComm` needs `&mut self` for every call, so moving it between threads is sound.
// The CUDA context handle is process-wide (a primary context).
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("aborted", &self.aborted)
            .finish()
    }
}

impl NcclComm {
    /// `ncclCommInitRank` for `rank` of `world` on CUDA device `device`, with the id rank 0 made.
    /// Blocks until all `world` ranks have called it.
    pub fn init(
        nccl: Arc<Nccl>,
        rank: usize,
        world: usize,
        id: &UniqueId,
        device: usize,
    ) -> Result<Self, NcclError> {
        if world == 0 || rank >= world {
            return Err(NcclError::Invalid(format!(
                "rank {rank} of world size {world}"
            )));
        }
        let table = nccl.table()?;
        let bf16 = nccl.version().map(|v| v >= (2, 10, 0)).unwrap_or(false);
        let driver = CudaDriver::open()?;
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer; an invalid ordinal returns an error code.
        driver_call("cuDevicePrimaryCtxRetain", unsafe {
            (driver.primary_ctx_retain)(&mut ctx, device as c_int)
        })?;
        let mut raw_id = RawUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (dst, src) in raw_id.internal.iter_mut().zip(id) {
            *dst = *src as c_char;
        }
        let mut out = NcclComm {
            _nccl: nccl,
            table,
            driver,
            comm: std::ptr::null_mut(),
            ctx,
            stream: std::ptr::null_mut(),
            inputs_ready: std::ptr::null_mut(),
            results_ready: std::ptr::null_mut(),
            in_flight: Vec::new(),
            rank,
            world,
            device,
            bf16,
            aborted: false,
        };
        out.bind_device()?;
        // SAFETY: valid out-pointers; the primary context of `device` is current. Handles that
        // were created are destroyed by `Drop` even if a later call fails.
        unsafe {
            driver_call(
                "cuStreamCreate",
                (out.driver.stream_create)(&mut out.stream, STREAM_NON_BLOCKING),
            )?;
            driver_call(
                "cuEventCreate",
                (out.driver.event_create)(&mut out.inputs_ready, EVENT_DISABLE_TIMING),
            )?;
            driver_call(
                "cuEventCreate",
                (out.driver.event_create)(&mut out.results_ready, EVENT_DISABLE_TIMING),
            )?;
        }
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is passed by value as nccl.h declares.
        let code =
            unsafe { (out.table.comm_init_rank)(&mut comm, world as c_int, raw_id, rank as c_int) };
        check(&out.table, "ncclCommInitRank", code)?;
        out.comm = comm;
        Ok(out)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The CUDA device this communicator is bound to.
    pub fn device(&self) -> usize {
        self.device
    }

    fn bind_device(&self) -> Result<(), NcclError> {
        // SAFETY: `ctx` is a retained primary context.
        driver_call("cuCtxSetCurrent", unsafe {
            (self.driver.ctx_set_current)(self.ctx)
        })
    }

    /// Binds the device and makes the communication stream wait for the work enqueued so far on
    /// the default stream; returns the communication stream for the collective to run on.
    fn launch_stream(&mut self, t: &Tensor) -> Result<Stream, NcclError> {
        self.bind_device()?;
        self.wait_for(self.stream, self.inputs_ready, std::ptr::null_mut())?;
        self.in_flight.push(t.shallow_clone());
        Ok(self.stream)
    }

    /// Makes `waiter` wait for the work enqueued so far on `signaller`, through `event`. The
    /// null stream is the legacy default stream; the device must be bound.
    fn wait_for(
        &self,
        waiter: CuStream,
        event: CuEvent,
        signaller: CuStream,
    ) -> Result<(), NcclError> {
        // SAFETY: `event` and the communication stream are live handles of this (current)
        // context, created in `init`; the null stream is always valid.
        unsafe {
            driver_call(
                "cuEventRecord",
                (self.driver.event_record)(event, signaller),
            )?;
            driver_call(
                "cuStreamWaitEvent",
                (self.driver.stream_wait_event)(waiter, event, 0),
            )
        }
    }

    /// Makes the default stream wait for every collective issued so far: kernels enqueued after
    /// this (by any thread) see their results. Does not block the host. Releases the references
    /// to the collectives' tensors.
    pub fn join(&mut self) -> Result<(), NcclError> {
        if self.aborted {
            return Err(NcclError::Aborted { rank: self.rank });
        }
        if self.in_flight.is_empty() {
            return Ok(());
        }
        self.bind_device()?;
        self.wait_for(std::ptr::null_mut(), self.results_ready, self.stream)?;
        // Later default-stream work is ordered after the collectives, so the allocator may now
        // reuse this memory for it.
        self.in_flight.clear();
        Ok(())
    }

    fn check_tensor(&self, t: &Tensor) -> Result<(DataType, usize), NcclError> {
        if self.aborted {
            return Err(NcclError::Aborted { rank: self.rank });
        }
        if t.device() != Device::Cuda(self.device) {
            return Err(NcclError::BadTensor(format!(
                "tensor on {:?}, communicator on cuda:{}",
                t.device(),
                self.device
            )));
        }
        if !t.is_contiguous() {
            return Err(NcclError::BadTensor("tensor is not contiguous".into()));
        }
        let kind = t.kind();
        let dtype = DataType::from_kind(kind)
            .ok_or_else(|| NcclError::BadTensor(format!("dtype {kind:?} has no NCCL type")))?;
        if dtype == DataType::Bfloat16 && !self.bf16 {
            return Err(NcclError::Invalid("bfloat16 needs NCCL >= 2.10".into()));
        }
        Ok((dtype, t.numel()))
    }

    /// Enqueues an in-place sum all-reduce of `t` (contiguous, on this communicator's device) on
    /// the communication stream, after the work already enqueued on the default stream. Leave
    /// `t` alone until [`NcclComm::join`] (or `synchronize`), after which later libtorch ops see
    /// the result.
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), NcclError> {
        let (dtype, count) = self.check_tensor(t)?;
        let stream = self.launch_stream(t)?;
        let ptr = t.data_ptr();
        // SAFETY: `ptr` addresses `count` contiguous elements of `dtype` on this device, owned by
        // `t`; `in_flight` keeps the storage alive until `join` orders the default stream (where
        // libtorch would reuse it) after the collective.
        let code = unsafe {
            (self.table.all_reduce)(ptr, ptr, count, dtype as c_int, NCCL_SUM, self.comm, stream)
        };
        check(&self.table, "ncclAllReduce", code)
    }

    /// Enqueues an in-place broadcast of `t` from `root` on the communication stream (ordered as
    /// [`NcclComm::all_reduce_sum`]).
    pub fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), NcclError> {
        if root >= self.world {
            return Err(NcclError::Invalid(format!(
                "broadcast root {root} of world size {}",
                self.world
            )));
        }
        let (dtype, count) = self.check_tensor(t)?;
        let stream = self.launch_stream(t)?;
        let ptr = t.data_ptr();
        // SAFETY: as in `all_reduce_sum`.
        let code = unsafe {
            (self.table.broadcast)(
                ptr,
                ptr,
                count,
                dtype as c_int,
                root as c_int,
                self.comm,
                stream,
            )
        };
        check(&self.table, "ncclBroadcast", code)
    }

    /// Joins (see [`NcclComm::join`]), then waits until the legacy default stream of this device
    /// is idle, polling NCCL's asynchronous error state. Past `timeout`, or on an asynchronous
    /// error, aborts the communicator (`ncclCommAbort`) and returns the error.
    pub fn synchronize(&mut self, timeout: Duration) -> Result<(), NcclError> {
        self.join()?;
        self.bind_device()?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: the null stream is the legacy default stream of the current context.
            let q = unsafe { (self.driver.stream_query)(std::ptr::null_mut()) };
            if q == 0 {
                return Ok(());
            }
            if q != CUDA_ERROR_NOT_READY {
                self.abort();
                return Err(NcclError::Driver {
                    call: "cuStreamQuery",
                    code: q as i64,
                });
            }
            let mut async_err: NcclResult = 0;
            // SAFETY: `comm` is live (not aborted) and `async_err` a valid out-pointer.
            let code = unsafe { (self.table.comm_get_async_error)(self.comm, &mut async_err) };
            check(&self.table, "ncclCommGetAsyncError", code)?;
            // ncclInProgress (7) is not a failure.
            if async_err != 0 && async_err != 7 {
                let message = error_message(&self.table, async_err);
                self.abort();
                return Err(NcclError::Async {
                    rank: self.rank,
                    code: async_err as i64,
                    message,
                });
            }
            let waited = start.elapsed();
            if waited >= timeout {
                self.abort();
                return Err(NcclError::Timeout {
                    rank: self.rank,
                    waited,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// `ncclCommAbort`: frees the communicator and unblocks its pending kernels. Idempotent.
    pub fn abort(&mut self) {
        if !self.aborted && !self.comm.is_null() {
            // SAFETY: `comm` is live; after this it is never used again.
            unsafe { (self.table.comm_abort)(self.comm) };
        }
        self.aborted = true;
    }

    /// Whether the communicator was aborted.
    pub fn is_aborted(&self) -> bool {
        self.aborted
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted && !self.comm.is_null() {
            // Destroy waits for pending work; a communicator that failed was aborted instead.
            // SAFETY: `comm` is live and never used after this.
            unsafe { (self.table.comm_destroy)(self.comm) };
        }
        let _ = self.bind_device();
        // SAFETY: handles created in `init` (null ones were never created), destroyed once.
        // The driver releases a stream's resources once its pending work is done.
        unsafe {
            for event in [self.inputs_ready, self.results_ready] {
                if !event.is_null() {
                    (self.driver.event_destroy)(event);
                }
            }
            if !self.stream.is_null() {
                (self.driver.stream_destroy)(self.stream);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_values_match_nccl_h() {
        assert_eq!(DataType::Int64 as i32, 4);
        assert_eq!(DataType::Float16 as i32, 6);
        assert_eq!(DataType::Float32 as i32, 7);
        assert_eq!(DataType::Float64 as i32, 8);
        assert_eq!(DataType::Bfloat16 as i32, 9);
        assert_eq!(
            DataType::from_kind(Kind::BFloat16),
            Some(DataType::Bfloat16)
        );
        assert_eq!(DataType::from_kind(Kind::Int8), None);
    }

    #[test]
    fn unique_id_is_128_bytes_when_nccl_loads() {
        let nccl = match Nccl::open() {
            Ok(n) => n,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        nccl.table().expect("all NCCL symbols resolve");
        let a = nccl.unique_id().expect("ncclGetUniqueId");
        let b = nccl.unique_id().expect("ncclGetUniqueId");
        assert_eq!(a.len(), UNIQUE_ID_BYTES);
        assert!(a.iter().any(|&x| x != 0), "id is all zeros");
        assert_ne!(a, b, "two ids must differ");
        assert!(!nccl.error_string(4).is_empty());
    }
}
