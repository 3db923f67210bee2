//! `nsa-train bench …`: each benchmark lives in its own module, prints a Markdown table, and with
//! `--out FILE` appends it to a file (BENCHMARKS.md takes its tables from these commands).
use clap::Subcommand;

mod attn;
mod branches;
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
