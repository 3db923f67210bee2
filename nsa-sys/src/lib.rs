//! `nsa-sys`: everything unsafe in the workspace lives here.
//!
//! - [`cuda`]: loading libtorch's CUDA backend at start-up. torch-sys links only `libtorch_cpu` and
//!   `libc10` (the linker drops `libtorch_cuda` as unused), so until `libtorch_cuda.so` is opened
//!   with `RTLD_GLOBAL` libtorch sees no GPU. Call [`cuda::load_backend`] first thing in `main`.
//! - [`driver`]: a small function table over the CUDA driver (`libcuda.so.1`) for device facts
//!   (name, memory, compute capability) that tch does not expose, and module load / launch.
//! - [`nccl`]: the NCCL function table, loaded from `libnccl.so.2`.
//! - [`nvrtc`]: run-time compilation of the CUDA kernels in `kernels/` (NVRTC from the torch
//!   wheel) with an on-disk CUBIN cache.
//! - [`fused`]: the fused NSA attention functions (selected branch on the NVRTC kernels, window
//!   on libtorch's flash kernel), custom autograd functions on libtorch's current stream.
//! - [`facts`]: a serialisable snapshot of the runtime (versions, devices, SDPA backend choice),
//!   the "backend audit" printed by `nsa-train env` and stored with every run.
//! - [`mmap`]: read-only memory maps of data files (token shards read in place).
//! - [`store`]: libtorch's c10d TCPStore (host or client), the key-value store of the
//!   data-parallel rendezvous (torchrun's agent hosts one for its workers).
//! - [`optim`]: libtorch's multi-tensor optimizer kernels (fused AdamW, gradient norm, zeroing).
//! - [`train`]: NVTX ranges, bf16 autocast, the Kineto profiler, CUDA allocator statistics.
//! - [`loss`]: the output head and its cross-entropy in one autograd function, chunked over the
//!   rows (no `[N, V]` logits).
//! - C++ glue in `glue/*.cpp`, compiled by `build.rs` against the same libtorch headers.
//!
//! Tensor layouts: functions that take tensors say so in their doc comment.

pub mod autograd;
pub mod cuda;
pub mod driver;
pub mod facts;
pub mod fused;
mod glue;
pub mod loss;
pub mod mmap;
pub mod nccl;
pub mod nvrtc;
pub mod optim;
pub mod store;
pub mod train;

pub use facts::{GpuFacts, RuntimeFacts, SdpaBackend};

/// Errors from loading native libraries or calling into them.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A shared library could not be opened.
    #[error("could not load {name}: {reason}")]
    Load { name: String, reason: String },
    /// A symbol was missing from a library that did load.
    #[error("{library} has no symbol {symbol}: {reason}")]
    Symbol {
        library: String,
        symbol: String,
        reason: String,
    },
    /// A native call returned an error code.
    #[error("{call} failed with code {code}")]
    Call { call: &'static str, code: i64 },
}
