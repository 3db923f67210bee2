//! `cargo xtask …`: every piece of project automation, in Rust.
//!
//! xtask depends only on xshell, clap and anyhow (its tests also on tempfile) — never on tch — and
//! `cargo xtask` builds it into `target/xtask` (see `.cargo/config.toml`), so it works before
//! libtorch exists and running it never rebuilds torch-sys.
#![forbid(unsafe_code)]
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xshell::{cmd, Shell};

mod corpus;
mod dist;
mod libtorch;
mod tidy;
mod variants;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "nsa project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Provision libtorch 2.11.0 (venv with the registry's torch wheel, or an existing one)
    /// and link it at `.libtorch`. Does nothing when it is already there.
    Setup {
        /// Re-check and re-link even when `.libtorch` looks fine.
        #[arg(long)]
        force: bool,
    },
    /// The README's test command: tidy, setup if needed, fmt check, clippy -D warnings, the library
    /// crates' docs, all tests (which also build every crate's examples).
    Test {
        /// Skip fmt and clippy (tests only).
        #[arg(long)]
        quick: bool,
    },
    /// Check the repository's rules: unsafe only in nsa-sys, environment reads, fallible tch
    /// calls in libraries, Markdown links, documented flags, file length (no build needed).
    Tidy,
    /// The README's main command: a real end-to-end run on the default device.
    Smoke {
        /// Extra arguments passed to `nsa-train smoke`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark in release mode and append its table to a file (default: print only).
    Bench {
        /// Which benchmark: select | attn | branches | decode | decode-launch | train | sweep-buckets.
        what: String,
        /// Extra arguments for `nsa-train bench <what>`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Gradient bucket sizes × compression (× overlap) at world size 1 and on every GPU of the
    /// host (NCCL; the in-process backend on the CPU): CSV, PNG and the best setting, under
    /// runs/sweep-buckets/.
    SweepBuckets {
        /// Extra arguments for `nsa-train bench sweep-buckets` (e.g. --preset tiny --device cpu).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build release binaries into a relocatable tarball with a launcher that finds libtorch.
    Dist {
        /// Output folder for the bundle and tarball.
        #[arg(long, default_value = "dist")]
        out: PathBuf,
    },
    /// Release binaries of several git revisions in one git-ignored folder, with their kernels
    /// compiled into one cache: an A/B run on a GPU host without cargo.
    Variants {
        /// Output folder inside the repository, ignored by git (e.g. listed in
        /// .git/info/exclude).
        #[arg(long)]
        out: PathBuf,
        /// GPU architecture the kernel cache is compiled for (`nsa-train kernels --arch`).
        #[arg(long, default_value = "90")]
        arch: String,
        /// NAME=REV pairs: the binary `nsa-NAME` built at git revision REV.
        #[arg(required = true, value_parser = variants::parse_variant)]
        variants: Vec<variants::Variant>,
    },
    /// Fetch a real English corpus (pinned Debian documentation packages, checked by SHA-256),
    /// strip the markup and split it into `<out>/train/*.txt` and `<out>/val/*.txt`.
    Corpus {
        /// Output folder (new, empty, or an earlier corpus folder, whose splits are rebuilt).
        #[arg(long, default_value = "data/corpus")]
        out: PathBuf,
        /// Documents for validation, per mille (by a hash of each document's name).
        #[arg(long, default_value_t = 50)]
        val_permille: u32,
    },
    /// Write an environment snapshot (git, rustc, torch/CUDA/cuDNN/NCCL, GPUs, CPU, SDPA choice).
    Env {
        /// Where to write the JSON.
        #[arg(long, default_value = "runs/env.json")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let sh = Shell::new()?;
    let root = project_root();
    sh.change_dir(&root);
    match cli.command {
        Command::Setup { force } => libtorch::setup(&sh, &root, force).map(|_| ()),
        Command::Test { quick } => test(&sh, &root, quick),
        Command::Tidy => tidy::run(&root),
        Command::Smoke { args } => {
            libtorch::ensure(&sh, &root)?;
            cmd!(sh, "cargo run -p nsa-train -- smoke {args...}").run()?;
            Ok(())
        }
        Command::Bench { what, args } => {
            libtorch::ensure(&sh, &root)?;
            cmd!(
                sh,
                "cargo run --release -p nsa-train -- bench {what} {args...}"
            )
            .run()?;
            Ok(())
        }
        Command::SweepBuckets { args } => {
            libtorch::ensure(&sh, &root)?;
            cmd!(
                sh,
                "cargo run --release -p nsa-train -- bench sweep-buckets {args...}"
            )
            .run()?;
            Ok(())
        }
        Command::Dist { out } => {
            libtorch::ensure(&sh, &root)?;
            dist::build(&sh, &root, &out)
        }
        Command::Variants {
            out,
            arch,
            variants,
        } => {
            libtorch::ensure(&sh, &root)?;
            variants::build(&sh, &root, &out, &arch, &variants)
        }
        Command::Corpus { out, val_permille } => corpus::run(&sh, &root, &out, val_permille),
        Command::Env { out } => {
            libtorch::ensure(&sh, &root)?;
            let out = root.join(out);
            let out = out.display().to_string();
            cmd!(sh, "cargo run -p nsa-train -- env --json {out}").run()?;
            Ok(())
        }
    }
}

fn test(sh: &Shell, root: &Path, quick: bool) -> Result<()> {
    let start = std::time::Instant::now();
    // First: it needs no build and fails in a second.
    step("cargo xtask tidy");
    tidy::run(root)?;
    libtorch::ensure(sh, root)?;
    if !quick {
        step("cargo fmt --check");
        cmd!(sh, "cargo fmt --all -- --check")
            .run()
            .context("formatting differs: run `cargo fmt --all`")?;
        step("cargo clippy -D warnings");
        cmd!(
            sh,
            "cargo clippy --workspace --all-targets --locked -- -D warnings"
        )
        .run()?;
        // Docs are part of the interface (the binary's doc comments are also its --help):
        // no warnings, no broken links, in every crate.
        step("cargo doc (every crate, warnings denied)");
        cmd!(sh, "cargo doc --workspace --no-deps --locked")
            .env("RUSTDOCFLAGS", "-D warnings")
            .run()?;
    }
    step("cargo test");
    cmd!(sh, "cargo test --workspace --locked").run()?;
    println!("xtask test: all steps passed in {:.0?}", start.elapsed());
    Ok(())
}

pub(crate) fn step(what: &str) {
    println!("\n==> {what}");
}

fn project_root() -> PathBuf {
    // CARGO_MANIFEST_DIR is xtask/ at compile time; its parent is the workspace root.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}
