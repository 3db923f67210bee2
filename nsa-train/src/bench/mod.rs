//! `nsa-train bench …`: each benchmark prints a Markdown table, and with `--out FILE` appends it
//! to a file (BENCHMARKS.md takes its tables from these commands). The library crates'
//! benchmarks (select, attn, branches) live in the `nsa-bench` crate; training and the bucket
//! sweep, which run the trainer, live here and use nsa-bench's helpers.
use anyhow::Context;
use clap::Subcommand;
use nsa_bench::{attn, branches, select, Invocation};

mod decode;
mod decode_launch;
mod sweep;
mod train;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// nsa-select: reference loops vs vectorized tensor ops, scores -> ranges.
    Select(select::SelectBenchArgs),
    /// nsa-attn: one NSA layer (lean path) vs dense SDPA, forward and backward, time and memory.
    Attn(attn::AttnBenchArgs),
    /// The selected, window and compressed branches alone: fused vs the lean path, TFLOP/s, GB/s.
    Branches(branches::BranchBenchArgs),
    /// Decode: one NSA layer step vs dense SDPA over the same cache (8k-128k cached tokens),
    /// and whole-model generation tokens/s, NSA vs dense.
    Decode(decode::DecodeBenchArgs),
    /// The decode kernels' launch shapes (tile CTAs, selection CTAs) swept in one run: time
    /// and exactness against the device's pick (CUDA only).
    DecodeLaunch(decode_launch::DecodeLaunchArgs),
    /// Whole-model training: tokens/s and peak memory, NSA vs dense; needle accuracy.
    Train(train::TrainBenchArgs),
    /// DDP gradient buckets × compression at world size 1: tokens/s, sync time, CSV and PNG.
    SweepBuckets(sweep::SweepArgs),
}

pub fn run(what: BenchCommand) -> anyhow::Result<()> {
    match what {
        BenchCommand::Select(args) => Ok(select::run(args, &invocation()?)?),
        BenchCommand::Attn(args) => Ok(attn::run(args, &invocation()?)?),
        BenchCommand::Branches(args) => Ok(branches::run(args)?),
        BenchCommand::Decode(args) => decode::run(args),
        BenchCommand::DecodeLaunch(args) => decode_launch::run(args),
        BenchCommand::Train(args) => train::run(args),
        BenchCommand::SweepBuckets(args) => sweep::run(args),
    }
}

/// This binary as the benchmarks re-run it (`nsa-train bench <name> …` in a fresh process).
fn invocation() -> anyhow::Result<Invocation> {
    Ok(Invocation {
        exe: std::env::current_exe().context("locating the nsa-train binary")?,
        prefix: vec!["bench".to_string()],
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
    })
}
