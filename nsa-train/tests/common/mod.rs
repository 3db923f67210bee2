//! Helpers shared by the CLI test binaries: run the `nsa-train` binary and read its output.
#![allow(dead_code)]
use std::path::Path;
use std::process::{Command, Output};

/// The binary, with the old system's `NSA_*` environment names removed (they must not leak in
/// from the developer's shell) and no backtraces in error output.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nsa-train"));
    c.env("RUST_BACKTRACE", "0");
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("NSA_")) {
        c.env_remove(name);
    }
    c
}

/// Owned arguments from string slices.
pub fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub fn run(args: &[String]) -> Output {
    bin().args(args).output().expect("nsa-train runs")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts success; returns stdout and stderr.
pub fn ok(out: &Output) -> String {
    let t = text(out);
    assert!(out.status.success(), "nsa-train failed:\n{t}");
    t
}

/// Asserts a clean failure (exit status 1 with a message, never a panic or an abort); returns
/// stderr.
pub fn err(out: &Output) -> String {
    let t = text(out);
    assert_eq!(out.status.code(), Some(1), "expected a clean error:\n{t}");
    assert!(!t.contains("panicked"), "panic:\n{t}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `--set` flags of a tiny, fast CPU training run: every NSA branch runs (S = 64 > w = 32 >
/// l' = 16).
pub fn tiny(out: &Path, name: &str, steps: u64) -> Vec<String> {
    sets(&[
        format!("run.out_dir={:?}", out.display().to_string()),
        format!("run.name={name:?}"),
        format!("run.steps={steps}"),
        "run.log_every=1".into(),
        "run.ckpt_every=3".into(),
        "run.eval_batches=1".into(),
        "run.device=\"cpu\"".into(),
        "data.source=\"recall\"".into(),
        "data.recall_pairs=4".into(),
        "data.seq_len=64".into(),
        "data.batch_size=4".into(),
    ])
}

/// `--set` before each of `pairs`.
pub fn sets(pairs: &[String]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|s| ["--set".to_string(), s.clone()])
        .collect()
}

/// A scratch folder for one test, named with `prefix` (removed when dropped).
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// A run's `(step, loss bits)` from its `metrics.jsonl`: for bit-exact comparisons.
pub fn losses(run_dir: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}
