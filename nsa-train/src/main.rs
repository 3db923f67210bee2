//! `nsa-train`: the command-line front end of the workspace.
//!
//! Subcommands: `train` (a TOML config plus `--set` overrides → a run folder; `--resume`, data
//! parallel through our launcher, torchrun or Slurm), `eval` (held-out loss and accuracy of a run's
//! latest checkpoint; `--task`: retrieval scored by generation), `generate` (continue a prompt
//! through the decode caches), `smoke` (trains the `tiny` NSA model briefly and checks that it
//! learned), `check --gpu` (every fused kernel against the reference path, prefill + decode
//! against the full forward, a fused layer without host synchronisation) and `check
//! --determinism` (bit-identical training with `run.deterministic`), `env` (runtime facts and the SDPA backend audit), `bench` (the
//! benchmarks: nsa-bench's `select`, `attn`, `branches`, and `train`, `decode`, `sweep-buckets`
//! here), `tokenizer train` (a byte-level BPE for real text), `prepare` (text → llm.c token
//! shards), `compare` (several runs' validation curves and retrieval accuracy side by side),
//! and the hidden `rendezvous` (a launcher check without a GPU).
#![forbid(unsafe_code)]

mod bench;
mod checkpoint;
mod compare;
mod config;
mod data;
mod determinism;
mod flops;
#[cfg(test)]
mod fuzz_tests;
mod generate;
mod kernels;
mod launch;
mod metrics;
mod optim;
mod plot;
mod run_dir;
mod signals;
mod sizes;
mod smoke;
mod snapshot;
mod tokenize;
mod train;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nsa-train",
    version,
    about = "Native Sparse Attention training on libtorch"
)]
struct Cli {
    /// Without a command: print the runtime facts (as `env`) and the list of commands.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// TOML config file (sections run, model, data, optim, fast; see README).
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
    /// Override any key, e.g. `--set optim.lr=1e-3 --set model.attention=dense`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue from the latest checkpoint in the run folder. Without --config, the run
    /// folder's own config.toml is the base (this command's --set and shorthands on top).
    #[arg(long)]
    resume: bool,
    /// Replace an existing run folder of the same name.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Shorthand for --set run.steps=N.
    #[arg(long)]
    steps: Option<u64>,
    /// Shorthand for --set run.device=…
    #[arg(long)]
    device: Option<String>,
    /// Shorthand for --set run.name=…
    #[arg(long)]
    name: Option<String>,
    /// Shorthand for --set fast.nvtx=true.
    #[arg(long)]
    nvtx: bool,
    /// Shorthand for --set run.profile=A..B (Chrome trace of steps A to B, numbered as logged: 1 .. run.steps).
    #[arg(long, value_name = "A..B")]
    profile: Option<String>,
    /// Shorthand for --set run.peak_tflops=X: one device's peak for the MFU (default: the GPU's
    /// dense spec sheet at the run's precision; none on the CPU).
    #[arg(long, value_name = "TFLOPS")]
    peak_tflops: Option<f64>,
    /// Print the resolved config and exit.
    #[arg(long)]
    dry_run: bool,
    /// Data parallel: our launcher's flags (torchrun and srun need none; see README).
    #[command(flatten)]
    launch: config::LaunchFlags,
}

impl TrainArgs {
    fn resolve(&self) -> anyhow::Result<config::TrainConfig> {
        let mut sets = self.sets.clone();
        if let Some(n) = self.steps {
            sets.push(format!("run.steps={n}"));
        }
        if let Some(d) = &self.device {
            sets.push(format!("run.device={d:?}"));
        }
        if let Some(n) = &self.name {
            sets.push(format!("run.name={n:?}"));
        }
        if self.nvtx {
            sets.push("fast.nvtx=true".into());
        }
        if let Some(p) = &self.profile {
            sets.push(format!("run.profile={p:?}"));
        }
        if let Some(p) = self.peak_tflops {
            sets.push(format!("run.peak_tflops={p:?}"));
        }
        let cfg = config::resolve(self.config.as_deref(), &sets, std::env::vars())?;
        // `--resume` without `--config` continues the run as its folder records it: the
        // run's own config.toml, with this command's overrides on top (e.g. more --steps).
        if let (true, None, Some(name)) = (self.resume, &self.config, &cfg.run.name) {
            let saved = cfg.run.out_dir.join(name).join("config.toml");
            if saved.is_file() {
                println!(
                    "note:    resuming with {} (and this command's overrides)",
                    saved.display()
                );
                return config::resolve(Some(&saved), &sets, std::env::vars());
            }
        }
        Ok(cfg)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the environment snapshot: code revision, host, libtorch / CUDA / cuDNN / NCCL
    /// versions, GPUs and the SDPA backend choice (the attention-backend audit).
    Env {
        /// Also write the snapshot as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Train a model: a TOML config plus overrides; writes a run folder.
    Train(TrainArgs),
    /// Evaluate the latest checkpoint of a run folder on held-out data: loss and answer
    /// accuracy, or with --task the retrieval accuracy of answers the model generates.
    Eval {
        /// The run folder (runs/NAME).
        run: std::path::PathBuf,
        /// Held-out batches to average over (without --task).
        #[arg(long, default_value_t = 16)]
        batches: u64,
        /// Score a synthetic retrieval task by generation: needle or recall.
        #[arg(long, value_enum, requires = "len")]
        task: Option<generate::retrieval::RetrievalTask>,
        /// Sequence length of the --task sequences (may exceed the trained length).
        #[arg(long)]
        len: Option<usize>,
        /// Sequences to score with --task.
        #[arg(long, default_value_t = 64)]
        samples: usize,
        /// With --task: equal-width distance buckets over 0..len for the accuracy table.
        #[arg(long, default_value_t = 8)]
        buckets: usize,
        /// With --task: also write the result (accuracy by distance) as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Checkpoint for --task: a step number or a checkpoint folder (default: the newest
        /// that verifies).
        #[arg(long)]
        checkpoint: Option<String>,
        /// With --task recall, NSA runs: also run the same sequences teacher forced and print,
        /// per layer, for answers within and beyond the window, the gates, each branch's
        /// contribution, and how strongly the compressed scores point at the value's block.
        #[arg(long, requires = "task")]
        inspect: bool,
    },
    /// Continue a prompt with a run's model: streams tokens as they come, tokens/s at the end.
    Generate(generate::GenerateArgs),
    /// Train the `tiny` NSA model briefly and check that it learned (loss and accuracy).
    Smoke(smoke::SmokeArgs),
    /// Tokenizers for real text: `tokenizer train` fits a byte-level BPE to text files.
    Tokenizer {
        #[command(subcommand)]
        what: TokenizerCommand,
    },
    /// Tokenize text files or folders into llm.c token shards (`train/`, `val/`) for
    /// `data.source = "bin"`: streaming, multi-threaded, with a progress bar.
    Prepare(tokenize::prepare::PrepareArgs),
    /// Compare runs: validation loss against tokens on one PNG, a Markdown table (attention,
    /// sequence length, steps, tokens, final validation loss, perplexity, tokens/s), and the
    /// accuracy by distance of `eval --task … --json` files.
    Compare(compare::CompareArgs),
    /// Build every fused kernel with NVRTC into the kernel cache (no GPU needed with --arch),
    /// so that a first start compiles nothing; prints what was built or found.
    Kernels(kernels::KernelsArgs),
    /// Benchmarks; each prints a Markdown table and can append it to a file.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Check this install on its GPU. `--gpu`: parity of every fused kernel against the
    /// reference path on fresh random inputs (outputs and gradients, bf16 and fp32), of prefill
    /// and decode against the full-sequence forward, and a fused layer's forward and backward
    /// without a host synchronisation, as a pass/fail table. `--determinism`: training with
    /// `run.deterministic = true` twice gives bit-identical losses, a resumed run equals an
    /// uninterrupted one, and the flag's cost in tokens/s.
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["gpu", "determinism"])))]
    Check {
        /// Run the kernel, decode and host-synchronisation checks.
        #[arg(long)]
        gpu: bool,
        /// Also write the `--gpu` rows as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// With `--gpu`, only these parts (comma-separated): `kernels` (the fused training
        /// kernels, the whole-layer and the host-synchronisation rows) or one family of them
        /// (`selected`, `window`, `compressed` (with the selection kernel), `pointwise` (with the
        /// output head's loss), `layer`, `sync`), and `decode` (prefill + decode and the decode kernels). A family
        /// alone suits compute-sanitizer, which slows every launch. Default: every row.
        #[arg(long, requires = "gpu", value_delimiter = ',', value_parser = [
            "kernels", "decode", "selected", "window", "compressed", "pointwise", "layer", "sync",
        ])]
        part: Vec<String>,
        /// Run the reproducibility check (trains small runs in child processes).
        #[arg(long)]
        determinism: bool,
        #[command(flatten)]
        det: determinism::DeterminismArgs,
    },
    /// Meet the other ranks through the rendezvous store and print what rank 0 sent, as `train`
    /// would before building its NCCL group: checks a launcher setup without a GPU.
    #[command(hide = true)]
    Rendezvous {
        #[command(flatten)]
        launch: config::LaunchFlags,
        /// Seconds each rendezvous wait lasts.
        #[arg(long, default_value_t = 60.0)]
        timeout_s: f64,
        /// Exchange a real NCCL unique id (needs libnccl) instead of random bytes.
        #[arg(long)]
        nccl: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE (the `tokenizers` crate) on text files; writes `tokenizer.json`.
    Train(tokenize::TrainTokenizerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The rendezvous check touches no tensor: it skips loading the CUDA backend (the slowest
    // part of starting up), so launcher tests that start many ranks stay quick.
    let command = match cli.command {
        Some(Command::Rendezvous {
            launch,
            timeout_s,
            nccl,
        }) => return rendezvous_command(&launch, timeout_s, nccl),
        // Text commands touch no tensor either.
        Some(Command::Tokenizer {
            what: TokenizerCommand::Train(mut a),
        }) => {
            a.progress = std::io::IsTerminal::is_terminal(&std::io::stdout());
            return tokenize::train_tokenizer(&a);
        }
        Some(Command::Compare(a)) => return compare::run(&a),
        Some(Command::Prepare(mut a)) => {
            a.progress = std::io::IsTerminal::is_terminal(&std::io::stdout());
            return tokenize::prepare::prepare_command(&a);
        }
        other => other,
    };
    // First thing: make libtorch's CUDA backend visible (see nsa_sys::cuda).
    let backend = nsa_sys::cuda::load_backend().context("loading libtorch's CUDA backend")?;
    // Compiled kernels are kept on disk, so a second start compiles nothing.
    nsa_sys::fused::configure(nsa_sys::fused::FusedOptions {
        cache_dir: config::process_kernel_cache_dir(),
    });
    let Some(command) = command else {
        print!("{}", snapshot::EnvSnapshot::collect().report());
        println!(
            "\ncommands: train, eval, generate, smoke, check, env, bench, kernels, tokenizer, prepare, compare (see `nsa-train --help`)"
        );
        return Ok(());
    };
    let result = run_command(command, &backend);
    // Kernel builds may still run in the background (a short run that did not need every
    // family): exit would tear NVRTC down under them and crash the finished process.
    nsa_sys::fused::finish_prebuilds();
    result
}

/// A command that needs libtorch's CUDA backend (loaded: `backend`).
fn run_command(command: Command, backend: &nsa_sys::cuda::CudaBackend) -> anyhow::Result<()> {
    match command {
        Command::Env { json } => {
            let facts = snapshot::EnvSnapshot::collect();
            print!("{}", facts.report());
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&facts)?;
                write_atomic(&path, text.as_bytes())?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Train(args) => {
            let cfg = args.resolve()?;
            // A model config that cannot be built (unknown preset, lengths that break a rule)
            // fails here, before the config dump that would push its message off the screen.
            let model = train::model_config(&cfg)?;
            println!("# resolved config\n{}", cfg.to_toml());
            if args.dry_run {
                // Everything else that can be checked without data or a device: that the model
                // fits this machine.
                let device = train::parse_device(cfg.run.device, backend.has_gpu())?;
                sizes::check(&cfg, &model, sizes::device_memory(device))?;
                println!("# model: {model}");
                return Ok(());
            }
            // Before the first cuBLAS handle exists (the model's first matmul).
            if let Some((name, value)) = config::cublas_workspace_for(&cfg, std::env::vars()) {
                std::env::set_var(name, value);
            }
            let launch::Role::Trainer(dist) = launch::role_with(&args.launch)? else {
                return Ok(());
            };
            let launch = train::Launch {
                resume: args.resume,
                overwrite: args.overwrite,
                progress: std::io::IsTerminal::is_terminal(&std::io::stdout()),
                dist,
            };
            let summary = train::train(&cfg, &launch, backend.has_gpu())?;
            exit_if_stopped(&summary)
        }
        Command::Eval {
            run,
            batches: _,
            task: Some(task),
            len,
            samples,
            buckets,
            json,
            checkpoint,
            inspect,
        } => {
            let len = len.context("--task needs --len")?;
            anyhow::ensure!(
                !inspect || task == generate::retrieval::RetrievalTask::Recall,
                "--inspect goes with --task recall"
            );
            let mut loaded = train::load_run(&run, None, checkpoint.as_deref(), backend.has_gpu())?;
            if inspect {
                generate::inspect::check_run(&loaded)?;
            }
            let precision = generate::inference_precision(&mut loaded);
            let progress = std::io::IsTerminal::is_terminal(&std::io::stdout());
            let found =
                generate::retrieval::evaluate(&loaded, task, len, samples, buckets, progress)?;
            let trained = loaded.cfg.data.seq_len;
            println!(
                "{}: step {}, {task:?} at length {len}{} on {:?} ({precision}): {} of {} generated answers correct, accuracy {:.3} over {} sequences",
                loaded.checkpoint.display(),
                loaded.step,
                if len > trained {
                    format!(" ({:.1}x the trained {trained})", len as f64 / trained as f64)
                } else {
                    String::new()
                },
                loaded.device,
                found.correct,
                found.answers,
                found.accuracy(),
                found.sequences
            );
            if task == generate::retrieval::RetrievalTask::Recall {
                let pairs = loaded.cfg.data.recall_pairs;
                println!(
                    "no-binding baseline for {pairs} pairs: {:.3} (guessing among the pairs' values that no earlier query answered)",
                    generate::retrieval::recall_elimination_baseline(pairs)
                );
            }
            let mut report =
                generate::retrieval::RetrievalReport::new(&run, &loaded, task, len, &found);
            print!("{}", report.table());
            if inspect {
                let seen = generate::inspect::inspect_recall(&loaded, len, samples)?;
                print!("\n{}", seen.table());
                report.inspection = Some(seen);
            }
            if let Some(path) = json {
                write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Eval {
            run,
            batches,
            checkpoint,
            json,
            ..
        } => {
            anyhow::ensure!(batches >= 1, "--batches must be at least 1");
            anyhow::ensure!(json.is_none(), "--json goes with --task");
            anyhow::ensure!(
                checkpoint.is_none(),
                "--checkpoint goes with --task (plain eval reads the newest good checkpoint)"
            );
            train::eval_run(&run, batches, backend.has_gpu()).map(|_| ())
        }
        Command::Generate(args) => generate::run(args, backend.has_gpu()),
        Command::Smoke(args) => smoke::run(args, backend),
        Command::Check {
            gpu,
            json,
            part,
            determinism,
            det,
        } => {
            if gpu {
                anyhow::ensure!(
                    backend.has_gpu(),
                    "check --gpu compares the fused kernels on a CUDA device: {backend}"
                );
                gpu_check(json.as_deref(), &part)?;
            }
            if determinism {
                determinism::run(&det)?;
            }
            Ok(())
        }
        Command::Bench { what } => bench::run(what),
        Command::Kernels(a) => kernels::run(&a),
        Command::Rendezvous {
            launch,
            timeout_s,
            nccl,
        } => rendezvous_command(&launch, timeout_s, nccl),
        Command::Tokenizer {
            what: TokenizerCommand::Train(a),
        } => tokenize::train_tokenizer(&a),
        Command::Prepare(a) => tokenize::prepare::prepare_command(&a),
        Command::Compare(a) => compare::run(&a),
    }
}

/// `nsa-train check --gpu`: the fused kernels' parity table (every part, or the `parts` named:
/// `kernels`, `decode` or a family of the kernel rows); fails when any row failed.
fn gpu_check(json: Option<&std::path::Path>, parts: &[String]) -> anyhow::Result<()> {
    use nsa_attn::fused::CheckPart;
    let every = parts.is_empty();
    let named = |name: &str| parts.iter().any(|p| p == name);
    let kernel_parts: Vec<CheckPart> = CheckPart::ALL
        .into_iter()
        .filter(|p| every || named("kernels") || named(p.name()))
        .collect();
    let mut rows = Vec::new();
    if !kernel_parts.is_empty() {
        rows.extend(nsa_attn::fused::gpu_check_parts(&kernel_parts)?);
    }
    if every || named("decode") {
        rows.extend(nsa_attn::decode::decode_check()?);
        rows.extend(nsa_model::decode_graph_check()?);
    }
    println!("| check | max rel err | tolerance | result |\n| --- | ---: | ---: | --- |");
    for r in &rows {
        println!(
            "| {} | {:.2e} | {:.0e} | {} |",
            r.name,
            r.max_rel_err,
            r.tolerance,
            if r.passed {
                "pass".to_string()
            } else {
                format!("FAIL: {}", r.detail)
            }
        );
    }
    if let Some(path) = json {
        write_atomic(path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    let failed = rows.iter().filter(|r| !r.passed).count();
    anyhow::ensure!(failed == 0, "{failed} of {} GPU checks failed", rows.len());
    println!("{} GPU checks passed", rows.len());
    Ok(())
}

/// A run stopped by a signal ends the process with 128 + the signal (130 for SIGINT, 143 for
/// SIGTERM, 129 for SIGHUP) after its checkpoint is written: 0 means the run finished.
pub(crate) fn exit_if_stopped(summary: &train::Summary) -> anyhow::Result<()> {
    if let Some(sig) = summary.stop_signal {
        eprintln!(
            "stopped by {} at step {}; resume with --resume",
            signals::name(sig),
            summary.steps
        );
        // process::exit skips main's wait for background kernel builds: wait here.
        nsa_sys::fused::finish_prebuilds();
        std::process::exit(signals::exit_code(sig));
    }
    Ok(())
}

/// The hidden `rendezvous` command (see [`launch::check_rendezvous`]).
fn rendezvous_command(
    launch: &config::LaunchFlags,
    timeout_s: f64,
    nccl: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        timeout_s.is_finite() && timeout_s > 0.0,
        "--timeout-s {timeout_s}: expected a positive number of seconds"
    );
    if nccl {
        // The real id comes from the NCCL that libtorch's CUDA backend ships with.
        nsa_sys::cuda::load_backend().context("loading libtorch's CUDA backend")?;
    }
    launch::check_rendezvous(launch, std::time::Duration::from_secs_f64(timeout_s), nccl)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a half-written file.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(".".as_ref());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
        ))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}
