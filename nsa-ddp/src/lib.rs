//! `nsa-ddp`: data parallelism — NCCL process group, gradient buckets (size in MB), gradient
//! compression (none / bf16 / fp16), parameter broadcast, rendezvous, and an in-process backend
//! for tests.
//!
//! # How a data-parallel run fits together
//!
//! Each rank (one process per GPU, or one thread per rank in tests) builds the same model, then:
//!
//! 1. **Rendezvous** ([`rendezvous_nccl`]): every rank meets in a c10d TCPStore at
//!    `master_addr:master_port` (hosted by rank 0, or by the launcher: torchrun's agent store);
//!    rank 0 waits for the other `world − 1` ranks, checks their world sizes, creates an NCCL
//!    unique id and publishes its 128 bytes, which every rank reads (see [`rendezvous()`]).
//! 2. **Process group** ([`NcclGroup::new`]): every rank calls `ncclCommInitRank` with that id on
//!    its CUDA device. Tests use [`LocalGroup`] instead: threads of one process on CPU.
//! 3. **Front** ([`DataParallel::new`]): plans gradient buckets over the trainable parameters;
//!    optionally [`DataParallel::enable_overlap`].
//! 4. [`DataParallel::broadcast_parameters`] once, so all ranks start from rank 0's weights.
//! 5. Every step: forward and backward on this rank's share of the batch (with overlap on,
//!    [`DataParallel::prepare_backward`] right before the last backward of the step), then
//!    [`DataParallel::sync_gradients`], then the optimizer step. Each rank computes its loss as
//!    the mean over *its* examples; averaging gradients over ranks then gives the gradient of the
//!    mean over the whole batch (shards of equal size).
//! 6. Now and then (e.g. at checkpoints) [`DataParallel::parameter_checksum`], which fails on
//!    every rank if any rank's parameters drifted from rank 0's.
//!
//! The library reads no environment variables: the binary maps its flags or `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` onto these typed arguments.
//!
//! # Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use nsa_ddp::{Compression, DataParallel, LocalGroup};
//! use tch::{nn, Device};
//!
//! # fn main() -> Result<(), nsa_ddp::DdpError> {
//! // One rank per thread on the CPU; with GPUs: one process per GPU, `rendezvous_nccl` and
//! // `NcclGroup::new` (after `nsa_sys::cuda::load_backend()`), the rest unchanged.
//! let mut ranks = LocalGroup::new(1, Duration::from_secs(30))?;
//! let vs = nn::VarStore::new(Device::Cpu);
//! let _layer = nn::linear(vs.root() / "l", 4, 4, Default::default());
//! let mut params: Vec<_> = vs.variables().into_iter().collect();
//! params.sort_by(|a, b| a.0.cmp(&b.0)); // the same order on every rank
//! let mut dp = DataParallel::new(ranks.remove(0), &params, 25.0, Compression::Bf16)?;
//! dp.broadcast_parameters()?;
//! // every step: forward, backward on this rank's shard, then
//! dp.sync_gradients()?;
//! // then the optimizer step
//! # Ok(())
//! # }
//! ```
//!
//! `examples/local_data_parallel.rs` trains a small model on two thread ranks and checks that
//! they stay identical (`cargo run -p nsa-ddp --example local_data_parallel`). Doc examples are
//! `no_run`: doctest binaries are linked without libtorch's library path.
//!
//! # Gradient buckets
//!
//! See [`bucket`]: parameters in reverse order, packed greedily into persistent flat buffers of at
//! most `bucket_mb` MiB per dtype and device; a parameter larger than the cap gets its own bucket.
//! Fewer, larger buckets mean fewer collective launches; the cap bounds the extra memory (one flat
//! buffer per bucket, plus a wire buffer of half the size when compressing fp32 gradients).
//!
//! # Compression and its error
//!
//! See [`compress`]: with bf16 or fp16 on the wire, the averaged gradient of each element errs by
//! at most `1.04·u·Σ_r|g_r| + 2η` for up to 8 ranks (`u` = 2⁻⁸ for bf16, 2⁻¹¹ for fp16), i.e.
//! about `W·u` times the mean per-rank gradient magnitude. fp16 overflows above 65504.
//!
//! # Overlap with backward
//!
//! With [`DataParallel::enable_overlap`], gradient-ready hooks (C++ post hooks on each
//! parameter's gradient accumulator, in `nsa_sys::autograd`) tell the front when a gradient is
//! final during `backward`; each bucket's all-reduce starts as soon as it and the buckets before
//! it are complete, while backward keeps computing the rest. Buckets launch in bucket order on
//! every rank (collectives must match), and after the first armed step the buckets are
//! re-planned in the order gradients became ready on rank 0. Without the hooks (or without
//! [`DataParallel::prepare_backward`]) everything happens in `sync_gradients`, after backward:
//! the fallback path, with the same arithmetic.
//!
//! # Streams (NCCL)
//!
//! `tch` never changes libtorch's current CUDA stream, so all libtorch work runs on the legacy
//! default stream. [`NcclGroup`] runs collectives on a non-blocking stream of its own, after an
//! event recorded on the default stream when the collective is issued (so after the packing that
//! preceded it, even when an autograd worker thread issued it); [`Communicator::join`] makes the
//! default stream wait for them before the buffers are read back. Packing, casting, the
//! all-reduce, dividing and unpacking are thus ordered with two events per step and no host
//! synchronisation until [`Communicator::synchronize`] at the end of
//! [`DataParallel::sync_gradients`]. Code that runs libtorch on another stream must synchronise
//! with the default stream before calling into this crate.
//!
//! # Timeouts
//!
//! Nothing here waits forever:
//! - [`LocalGroup`]: every collective waits at most the group's timeout for the other ranks, then
//!   returns [`DdpError::Timeout`] naming the ranks that did not arrive, and breaks the group.
//! - [`NcclGroup`]: [`Communicator::synchronize`] polls the stream and `ncclCommGetAsyncError`;
//!   past the timeout (default [`DEFAULT_NCCL_TIMEOUT`], 10 min) it calls `ncclCommAbort` and
//!   returns an error. Only `ncclCommInitRank` itself cannot time out; the rendezvous before it
//!   makes sure every rank is alive.
//! - [`rendezvous()`]: every wait is bounded by [`RendezvousConfig::timeout`], reported as
//!   [`DdpError::RendezvousTimeout`] (naming the ranks not heard from).
#![forbid(unsafe_code)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod bucket;
pub mod comm;
pub mod compress;
pub mod dp;
pub mod nccl;
pub mod rendezvous;

use std::time::Duration;

pub use bucket::{Bucket, BucketEntry, GradBuckets};
pub use comm::{Communicator, LocalGroup};
pub use compress::Compression;
pub use dp::{Checksum, DataParallel};
pub use nccl::{rendezvous_nccl, NcclGroup, DEFAULT_NCCL_TIMEOUT};
pub use nsa_sys::nccl::{UniqueId, UNIQUE_ID_BYTES};
pub use rendezvous::{rendezvous, RendezvousConfig, StoreHost};

/// Errors of the data-parallel layer.
#[derive(Debug, thiserror::Error)]
pub enum DdpError {
    /// A collective did not complete because some ranks never arrived.
    #[error("rank {rank}: collective #{seq} ({op}) timed out after {waited:?}; ranks that did not arrive: {missing:?}")]
    Timeout {
        rank: usize,
        op: &'static str,
        seq: u64,
        waited: Duration,
        missing: Vec<usize>,
    },
    /// Ranks called different collectives or used different sizes; the group is broken.
    #[error("rank {rank}: collective mismatch: {detail}")]
    Mismatch { rank: usize, detail: String },
    /// The group cannot be used any more.
    #[error("rank {rank}: process group broken: {reason}")]
    Broken { rank: usize, reason: String },
    /// Parameter checksums disagree across ranks.
    #[error("rank {rank}: parameters differ from rank 0's on ranks {differing:?} (checksums by rank: {checksums:?})")]
    ChecksumMismatch {
        rank: usize,
        differing: Vec<usize>,
        checksums: Vec<Checksum>,
    },
    /// Trainable parameters that had no gradient when gradients were synchronised.
    #[error("rank {rank}: parameters without a gradient at sync_gradients: {names:?}")]
    MissingGradients { rank: usize, names: Vec<String> },
    /// A gradient compression name [`Compression`]'s `FromStr` does not know (the trainer's
    /// config key is `fast.ddp_compress`).
    #[error("unknown gradient compression {0:?}: expected one of none, bf16, fp16")]
    UnknownCompression(String),
    /// A rendezvous wait ran out.
    #[error("rank {rank}: rendezvous timed out after {waited:?} {what}; ranks not heard from: {missing:?}")]
    RendezvousTimeout {
        rank: usize,
        what: String,
        waited: Duration,
        missing: Vec<usize>,
    },
    /// A rendezvous protocol or network error.
    #[error("rank {rank}: rendezvous failed: {detail}")]
    Rendezvous { rank: usize, detail: String },
    /// An argument out of range.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Gradient-ready hooks saw something the overlapped sync cannot handle.
    #[error("rank {rank}: overlapped gradient sync: {detail}")]
    Overlap { rank: usize, detail: String },
    /// Registering gradient-ready hooks failed.
    #[error(transparent)]
    Hooks(#[from] nsa_sys::autograd::GlueError),
    /// NCCL (or loading it) failed.
    #[error(transparent)]
    Nccl(#[from] nsa_sys::nccl::NcclError),
    /// A libtorch operation failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
