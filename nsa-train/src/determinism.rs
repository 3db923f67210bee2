//! `nsa-train check --determinism`: does `run.deterministic = true` make GPU training
//! reproducible, and what does it cost? For each preset it trains, in child processes of this
//! binary (each a fresh CUDA context and allocator, as a user's runs are):
//! - two identical runs with the flag on, whose per-step losses must be equal bit for bit;
//! - a resumed run: the first run's checkpoint at `--resume-at` kept (later ones and their
//!   metrics removed), then `--resume`, whose losses after the checkpoint must equal the
//!   uninterrupted run's bit for bit;
//! - a run with activation recomputation (`fast.recompute`) and the flag on, whose losses
//!   must equal the first run's bit for bit (the same gradients), for its tokens/s too;
//! - one run with the flag off, for tokens/s (and to show whether it differs).
//!
//! It prints a Markdown table and fails when a comparison does.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// Flags of `check --determinism`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeterminismArgs {
    /// Model presets to train (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    pub presets: Vec<String>,
    /// Steps of each run.
    #[arg(long, default_value_t = 150)]
    pub steps: u64,
    /// Step whose checkpoint the resumed run starts from (a checkpoint is written there).
    #[arg(long, default_value_t = 75)]
    pub resume_at: u64,
    /// Device of every run (`cuda`, `cuda:N`, or `cpu` for a quick check of the machinery).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Keep the run folders here (default: a temporary folder, removed at the end).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// More `--set KEY=VALUE` overrides for every run (e.g. a shorter `data.seq_len`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// Per-step losses as bits (`None` for a skipped step), by step.
type Losses = Vec<(u64, Option<u64>)>;

fn losses(run_dir: &Path) -> Result<Losses> {
    let path = run_dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| format!("a line of {}", path.display()))?;
            let step = v["step"]
                .as_u64()
                .with_context(|| format!("no step in {}", path.display()))?;
            Ok((step, v["loss"].as_f64().map(f64::to_bits)))
        })
        .collect()
}

fn tokens_per_s(run_dir: &Path) -> Result<f64> {
    let path = run_dir.join("summary.json");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    v["tokens_per_s"]
        .as_f64()
        .with_context(|| format!("no tokens_per_s in {}", path.display()))
}

/// How two loss sequences compare: steps compared, and the first step that differs.
#[derive(Debug, Clone, PartialEq)]
struct Comparison {
    steps: usize,
    first_difference: Option<u64>,
    largest_gap: f64,
}

fn compare(a: &Losses, b: &Losses) -> Result<Comparison> {
    ensure!(
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0),
        "the runs logged different steps ({} vs {} lines)",
        a.len(),
        b.len()
    );
    let value = |bits: Option<u64>| bits.map_or(f64::NAN, f64::from_bits);
    let mut first_difference = None;
    let mut largest_gap = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        if x.1 != y.1 {
            first_difference.get_or_insert(x.0);
            largest_gap = largest_gap.max((value(x.1) - value(y.1)).abs());
        }
    }
    Ok(Comparison {
        steps: a.len(),
        first_difference,
        largest_gap,
    })
}

struct Runner<'a> {
    exe: PathBuf,
    out: &'a Path,
    args: &'a DeterminismArgs,
}

impl Runner<'_> {
    /// Trains `name` (`preset`, `deterministic`), `extra` flags last; the child's output goes
    /// to `<out>/<name>.log`.
    fn train(&self, preset: &str, name: &str, deterministic: bool, extra: &[&str]) -> Result<()> {
        let mut sets = vec![
            format!("model.preset={preset:?}"),
            format!("run.out_dir={:?}", self.out.display().to_string()),
            format!("run.name={name:?}"),
            format!("run.device={:?}", self.args.device),
            format!("run.steps={}", self.args.steps),
            format!("run.deterministic={deterministic}"),
            "run.log_every=1".into(),
            format!("run.ckpt_every={}", self.args.resume_at),
            "run.keep_checkpoints=4".into(),
            "run.eval_batches=1".into(),
        ];
        sets.extend(self.args.sets.iter().cloned());
        let mut cmd = Command::new(&self.exe);
        cmd.arg("train");
        for s in &sets {
            cmd.args(["--set", s]);
        }
        cmd.args(extra);
        let log = self.out.join(format!("{name}.log"));
        let output = cmd
            .output()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
        if !output.status.success() {
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "run {name} failed ({}); its last lines:\n{}",
                output.status,
                tail.join("\n")
            );
        }
        Ok(())
    }
}

/// Cuts `run_dir` back to the state of a run stopped at `step`: the checkpoints after it and
/// the metrics lines after it removed (what a run killed right after that checkpoint leaves).
fn roll_back(run_dir: &Path, step: u64) -> Result<()> {
    let ckpts = run_dir.join("checkpoints");
    let mut kept = false;
    for entry in std::fs::read_dir(&ckpts).with_context(|| format!("{}", ckpts.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(s) if s > step => std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?,
            Some(s) if s == step => kept = true,
            _ => {}
        }
    }
    ensure!(kept, "no checkpoint of step {step} in {}", ckpts.display());
    let metrics = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    std::fs::write(&metrics, lines.join("\n") + "\n")?;
    Ok(())
}

/// One row of the table.
struct Row {
    what: String,
    comparison: Comparison,
    must_match: bool,
}

/// Runs the check; an error when a run fails or a comparison that must match does not.
pub fn run(args: &DeterminismArgs) -> Result<()> {
    ensure!(args.steps >= 2, "--steps must be at least 2");
    ensure!(
        (1..args.steps).contains(&args.resume_at),
        "--resume-at must be in 1..{} (before the last step)",
        args.steps
    );
    ensure!(!args.presets.is_empty(), "--presets: name at least one");
    let exe = std::env::current_exe().context("finding this binary")?;
    let scratch;
    let out = match &args.out {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            scratch = tempfile::Builder::new()
                .prefix("nsa-determinism-")
                .tempdir()?;
            scratch.path().to_path_buf()
        }
    };
    let runner = Runner {
        exe,
        out: &out,
        args,
    };
    let mut rows = Vec::new();
    let mut speed = Vec::new();
    for preset in &args.presets {
        eprintln!("determinism: {preset}: two runs with run.deterministic = true …");
        let (a, b, off, rc) = (
            format!("{preset}-a"),
            format!("{preset}-b"),
            format!("{preset}-off"),
            format!("{preset}-recompute"),
        );
        runner.train(preset, &a, true, &[])?;
        runner.train(preset, &b, true, &[])?;
        eprintln!("determinism: {preset}: one run with activation recomputation …");
        runner.train(preset, &rc, true, &["--set", "fast.recompute=true"])?;
        eprintln!("determinism: {preset}: one run with the flag off …");
        runner.train(preset, &off, false, &[])?;
        let (la, lb, lrc, loff) = (
            losses(&out.join(&a))?,
            losses(&out.join(&b))?,
            losses(&out.join(&rc))?,
            losses(&out.join(&off))?,
        );
        eprintln!(
            "determinism: {preset}: resuming {a} from step {} …",
            args.resume_at
        );
        roll_back(&out.join(&a), args.resume_at)?;
        runner.train(preset, &a, true, &["--resume"])?;
        let resumed = losses(&out.join(&a))?;
        let after = |l: &Losses| -> Losses {
            l.iter()
                .filter(|(s, _)| *s > args.resume_at)
                .copied()
                .collect()
        };
        rows.push(Row {
            what: format!("{preset}: two runs, deterministic"),
            comparison: compare(&la, &lb)?,
            must_match: true,
        });
        rows.push(Row {
            what: format!(
                "{preset}: resumed at step {} vs uninterrupted, deterministic",
                args.resume_at
            ),
            comparison: compare(&after(&resumed), &after(&lb))?,
            must_match: true,
        });
        rows.push(Row {
            what: format!("{preset}: activation recomputation vs plain, deterministic"),
            comparison: compare(&lrc, &lb)?,
            must_match: true,
        });
        rows.push(Row {
            what: format!("{preset}: flag off vs on (different kernels: need not match)"),
            comparison: compare(&loff, &lb)?,
            must_match: false,
        });
        speed.push((
            preset.clone(),
            tokens_per_s(&out.join(&b))?,
            tokens_per_s(&out.join(&off))?,
            tokens_per_s(&out.join(&rc))?,
        ));
    }
    println!(
        "| comparison | steps | identical | first differing step | largest loss gap |\n| --- | ---: | --- | ---: | ---: |"
    );
    for r in &rows {
        let c = &r.comparison;
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what,
            c.steps,
            if c.first_difference.is_none() {
                "yes"
            } else if r.must_match {
                "NO"
            } else {
                "no"
            },
            c.first_difference.map_or("—".into(), |s| s.to_string()),
            if c.first_difference.is_none() {
                "0".to_string()
            } else {
                format!("{:.3e}", c.largest_gap)
            }
        );
    }
    println!(
        "\n| preset | tokens/s deterministic | tokens/s default | cost | tokens/s deterministic with recomputation | its cost |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    );
    for (preset, on, off, recompute) in &speed {
        println!(
            "| {preset} | {on:.0} | {off:.0} | {:+.1} % | {recompute:.0} | {:+.1} % |",
            (on / off - 1.0) * 100.0,
            (recompute / on - 1.0) * 100.0
        );
    }
    println!(
        "(device {}, {} steps per run; logs and run folders in {}{})",
        args.device,
        args.steps,
        out.display(),
        if args.out.is_some() {
            ""
        } else {
            ", removed now"
        }
    );
    let failed = rows
        .iter()
        .filter(|r| r.must_match && r.comparison.first_difference.is_some())
        .count();
    ensure!(
        failed == 0,
        "{failed} comparison(s) that must be bit-identical differ"
    );
    println!("determinism: passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_finds_the_first_differing_step_and_the_largest_gap() {
        let l = |v: &[f64]| -> Losses {
            v.iter()
                .enumerate()
                .map(|(i, x)| (i as u64 + 1, Some(x.to_bits())))
                .collect()
        };
        let same = compare(&l(&[1.0, 2.0, 3.0]), &l(&[1.0, 2.0, 3.0])).unwrap();
        assert_eq!(same.first_difference, None);
        let diff = compare(&l(&[1.0, 2.0, 3.0]), &l(&[1.0, 2.5, 3.25])).unwrap();
        assert_eq!(diff.first_difference, Some(2));
        assert_eq!(diff.largest_gap, 0.5);
        // One ulp is a difference.
        let next = f64::from_bits(2.0f64.to_bits() + 1);
        let ulp = compare(&l(&[1.0, 2.0]), &l(&[1.0, next])).unwrap();
        assert_eq!(ulp.first_difference, Some(2));
        assert!(compare(&l(&[1.0]), &l(&[1.0, 2.0])).is_err());
    }
}
