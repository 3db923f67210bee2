//! `nsa-train bench …`: each benchmark lives in its own module, prints a Markdown table, and with
//! `--out FILE` appends it to a file (BENCHMARKS.md takes its tables from these commands).
use clap::Subcommand;

mod attn;
mod branches;
mod decode;
mod select;
mod sweep;
mod train;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// nsa-select: reference loops vs vectorized tensor ops, scores -> ranges.
    Select(select::SelectBenchArgs),
    /// nsa-attn: one NSA layer (lean path) vs dense SDPA, forward and backward, time and memory.
    Attn(attn::AttnBenchArgs),
    /// The selected and window branches alone: fused kernels vs the lean path, TFLOP/s, GB/s.
    Branches(branches::BranchBenchArgs),
    /// Decode: one NSA layer step vs dense SDPA over the same cache (8k-128k cached tokens),
    /// and whole-model generation tokens/s, NSA vs dense.
    Decode(decode::DecodeBenchArgs),
    /// Whole-model training: tokens/s and peak memory, NSA vs dense; needle accuracy.
    Train(train::TrainBenchArgs),
    /// DDP gradient buckets × compression at world size 1: tokens/s, sync time, CSV and PNG.
    SweepBuckets(sweep::SweepArgs),
}

pub fn run(what: BenchCommand) -> anyhow::Result<()> {
    match what {
        BenchCommand::Select(args) => select::run(args),
        BenchCommand::Attn(args) => attn::run(args),
        BenchCommand::Branches(args) => branches::run(args),
        BenchCommand::Decode(args) => decode::run(args),
        BenchCommand::Train(args) => train::run(args),
        BenchCommand::SweepBuckets(args) => sweep::run(args),
    }
}

/// Appends `text` to `path` (creating it), after a blank line.
pub(crate) fn append(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "\n{text}").with_context(|| format!("appending to {}", path.display()))?;
    println!("appended to {}", path.display());
    Ok(())
}

/// The device as the tables name it: `cuda:N (<GPU name>)` or `cpu (N libtorch threads)`.
pub(crate) fn device_description(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(index) => {
            let name = nsa_sys::driver::driver_info()
                .ok()
                .and_then(|d| d.devices.into_iter().find(|g| g.index == index))
                .map(|g| g.name)
                .unwrap_or_else(|| "unknown GPU".into());
            format!("cuda:{index} ({name})")
        }
        _ => format!("cpu ({} libtorch threads)", tch::get_num_threads()),
    }
}

/// The median (upper middle for even counts) of `v`; `None` when empty.
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The bench commands' `--device`: `auto` (CUDA when visible), `cpu`, `cuda`, `cuda:N` — the
/// trainer's `run.device` rule, so both parse and check devices the same way.
pub(crate) fn bench_device(arg: Option<&str>) -> anyhow::Result<tch::Device> {
    let choice = crate::config::DeviceChoice::try_from(arg.unwrap_or("auto").to_string())
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let device = choice.resolve(tch::Cuda::is_available())?;
    if let tch::Device::Cuda(i) = device {
        anyhow::ensure!(
            i < tch::Cuda::device_count() as usize,
            "--device cuda:{i}: no such CUDA device is visible to libtorch"
        );
    }
    Ok(device)
}

/// Wall times of repeated runs, ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Timing {
    /// `median (min–max)`.
    pub fn cell(&self) -> String {
        format!("{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

/// Times `repeats` runs of `f` (after one untimed warm-up run when `warm_up`), synchronising
/// the device around each, and returns the timing and the last run's result.
pub(crate) fn time_runs<T>(
    device: tch::Device,
    repeats: usize,
    warm_up: bool,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Timing, T)> {
    let sync = || {
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    anyhow::ensure!(repeats >= 1, "at least one timed run is needed");
    if warm_up {
        drop(f()?);
    }
    sync();
    let mut times = Vec::with_capacity(repeats);
    let mut last = None;
    for _ in 0..repeats {
        let start = std::time::Instant::now();
        last = Some(f()?);
        sync();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let timing = Timing {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
    };
    Ok((timing, last.ok_or_else(|| anyhow::anyhow!("no timed run"))?))
}

/// The one memory probe of the benchmarks: the peak of libtorch's CUDA caching allocator while
/// `f` runs, minus what was allocated before (bytes), read from the allocator's own statistics
/// (nothing else on the GPU is counted, and no external tool is needed).
pub(crate) fn peak_cuda_bytes<T>(
    index: usize,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64)> {
    tch::Cuda::synchronize(index as i64);
    let before = nsa_sys::train::cuda_memory(index)
        .map(|m| m.allocated)
        .unwrap_or(0);
    nsa_sys::train::cuda_reset_peak(index);
    let out = f()?;
    tch::Cuda::synchronize(index as i64);
    let peak = nsa_sys::train::cuda_memory(index)
        .map(|m| m.peak_allocated)
        .ok_or_else(|| anyhow::anyhow!("libtorch's CUDA allocator statistics are unavailable"))?;
    Ok((out, peak.saturating_sub(before)))
}
