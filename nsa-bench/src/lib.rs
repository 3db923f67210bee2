//! `nsa-bench`: the benchmarks of the library crates, run as `nsa-train bench select | attn |
//! branches`, and the helpers every benchmark of the workspace shares.
//!
//! Each benchmark takes its flags as a `clap::Args` struct (the host binary mounts it as a
//! subcommand, so flags and `--help` live here, next to the code that reads them), prints a
//! Markdown table and, with `--out FILE`, appends it to a file: BENCHMARKS.md's tables come from
//! these commands.
//!
//! # What each benchmark measures
//!
//! - [`select`] (`bench select`): nsa-select's reference loops against its vectorized tensor
//!   ops, from block scores to token ranges (`select+ranges`) and from `p_cmp` through block
//!   scores, group sum, top-n and ranges (`pipeline`), at the replaced system's small shape and
//!   at 8k–64k tokens with the paper's lengths; whether both give identical outputs; the peak
//!   memory of the 64k pipeline per query chunk, measured and by formula.
//! - [`attn`] (`bench attn`): one NSA layer (`--path lean` or `fused`) against dense causal
//!   SDPA, forward and forward + backward, plus selection alone; median wall time and, on CUDA,
//!   each case's peak allocator memory in a process of its own.
//! - [`branches`] (`bench branches`, CUDA only): the selected and sliding-window branches alone,
//!   fused kernels against the lean path, forward and forward + backward, with achieved TFLOP/s
//!   and GB/s.
//!
//! The trainer's own benchmarks (`bench train`, `bench sweep-buckets`) stay in nsa-train, which
//! owns training runs, and use the helpers here.
//!
//! # Shared helpers
//!
//! One timing helper ([`time_runs`]: warm-up, device synchronised around every run, [`Timing`]
//! with median, min and max; [`median`]), one device parser ([`DeviceChoice`], behind every
//! `--device` through [`bench_device`] and behind the trainer's `run.device`), one memory probe
//! ([`peak_cuda_bytes`]: libtorch's CUDA caching allocator's peak, no `nvidia-smi`), one table
//! writer ([`append`]).
//!
//! # Errors
//!
//! Every function returns [`BenchError`]; libtorch calls go through tch's `f_` methods.
//!
//! # CUDA start-up
//!
//! As everywhere in the workspace: call `nsa_sys::cuda::load_backend()` before the first
//! libtorch call, or ATen remembers "no CUDA" for the whole process (nsa-train does it first).
#![forbid(unsafe_code)]
#![deny(rustdoc::broken_intra_doc_links)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod attn;
pub mod branches;
mod device;
mod error;
mod measure;
pub mod select;

pub use device::{bench_device, device_description, DeviceChoice, NoGpu};
pub use error::BenchError;
pub use measure::{median, peak_cuda_bytes, time_runs, Timing};

/// How the benchmarks re-run their host binary: some measurements need a process of their own
/// (a fresh CUDA caching allocator, which never returns memory; an out-of-memory failure that
/// stays one case's).
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The running binary (nsa-train: `std::env::current_exe()`).
    pub exe: PathBuf,
    /// The arguments before a benchmark's name (nsa-train: `["bench"]`).
    pub prefix: Vec<String>,
    /// The command line as typed, quoted in the tables.
    pub command_line: String,
}

impl Invocation {
    /// A command that runs benchmark `name` of the host binary; the caller adds its flags.
    pub(crate) fn child(&self, name: &str) -> Command {
        let mut command = Command::new(&self.exe);
        command.args(&self.prefix).arg(name);
        command
    }
}

/// Appends `text` to `path` (creating it), after a blank line.
pub fn append(path: &Path, text: &str) -> Result<(), BenchError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| BenchError::io(format!("opening {}", path.display()), e))?;
    writeln!(f, "\n{text}")
        .map_err(|e| BenchError::io(format!("appending to {}", path.display()), e))?;
    println!("appended to {}", path.display());
    Ok(())
}
