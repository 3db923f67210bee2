//! `nsa-train smoke`: trains the `tiny` NSA model on the synthetic recall task for a fixed
//! number of steps on the default device, then checks that it learned: the training loss fell
//! well below its start and the answer accuracy on held-out data rose. Non-zero exit otherwise.
use anyhow::{ensure, Result};
use nsa_sys::cuda::CudaBackend;

use crate::config;
use crate::train::{self, Launch};

#[derive(Debug, clap::Args)]
pub struct SmokeArgs {
    /// Training steps.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Device: `auto` (CUDA when present), `cpu`, `cuda`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Extra config overrides (`--set key=value`), as for `train`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Run data parallel with one process per GPU on this host (as `train --nproc-per-node`):
    /// each rank trains on its own batch of `data.batch_size`, rank 0 checks and reports.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
}

/// The smoke configuration: small enough for two CPU cores in a few minutes, long enough
/// (S = 128 with the tiny preset's l' = 16, n = 4, w = 32) that all three NSA branches and a
/// real top-n block choice are exercised. Recall with 4 pairs: chance accuracy is 1/15.
pub fn smoke_sets(steps: u64, device: &str) -> Vec<String> {
    [
        "run.name=\"smoke\"".to_string(),
        format!("run.steps={steps}"),
        format!("run.device={device:?}"),
        "run.log_every=10".into(),
        "run.eval_batches=4".into(),
        "run.ckpt_every=0".into(),
        "model.preset=\"tiny\"".into(),
        // A 32-token vocabulary: keys and values from 14 and 15 ids, so two CPU cores learn
        // in-context recall (not just value frequencies) within the smoke's few hundred steps.
        "model.vocab_size=32".into(),
        "data.source=\"recall\"".into(),
        "data.recall_pairs=4".into(),
        "data.seq_len=128".into(),
        "data.batch_size=16".into(),
        "optim.lr=0.01".into(),
        "optim.min_lr=0.001".into(),
        "optim.warmup_steps=10".into(),
    ]
    .to_vec()
}

pub fn run(args: SmokeArgs, backend: &CudaBackend) -> Result<()> {
    println!("backend: {backend}");
    let mut sets = smoke_sets(args.steps, &args.device);
    sets.extend(args.sets);
    let cfg = config::resolve(None, &sets, std::iter::empty())?;
    let crate::launch::Role::Trainer(dist) = crate::launch::role(args.nproc_per_node)? else {
        return Ok(());
    };
    let rank = dist.as_ref().map_or(0, |d| d.rank);
    let launch = Launch {
        overwrite: true,
        progress: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        dist,
        ..Default::default()
    };
    let s = train::train(&cfg, &launch, backend.has_gpu())?;
    crate::exit_if_stopped(&s)?;
    if rank != 0 {
        // Rank 0 judges the run (every rank holds the same parameters after each step).
        return Ok(());
    }
    println!(
        "smoke: {} on {} ({}): loss {:.3} -> {:.3}, answer accuracy {:.3} -> {:.3}, {:.0} tokens/s",
        s.model,
        s.device,
        s.precision,
        s.first_loss,
        s.last_loss,
        s.initial_eval_accuracy,
        s.eval_accuracy,
        s.tokens_per_s
    );
    ensure!(
        s.last_loss < 0.75 * s.first_loss,
        "smoke failed: training loss did not fall well below its start ({:.3} -> {:.3})",
        s.first_loss,
        s.last_loss
    );
    ensure!(
        s.eval_accuracy > s.initial_eval_accuracy + 0.05,
        "smoke failed: answer accuracy did not rise ({:.3} -> {:.3})",
        s.initial_eval_accuracy,
        s.eval_accuracy
    );
    println!("smoke: passed");
    Ok(())
}
