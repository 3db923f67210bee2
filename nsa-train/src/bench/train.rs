//! `nsa-train bench train`: whole-model training throughput and memory, NSA vs dense attention
//! of the same size, at several sequence lengths with the same tokens per step; and the
//! synthetic needle task's answer accuracy of both after the same number of steps.
use anyhow::Result;

use crate::config;
use crate::train::{self, Launch, Summary};

#[derive(Debug, clap::Args)]
pub struct TrainBenchArgs {
    /// Model preset.
    #[arg(long, default_value = "125m")]
    preset: String,
    /// Sequence lengths (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2048,8192,32768")]
    seq: Vec<usize>,
    /// Tokens per optimizer step (batch = tokens / seq, at least 1).
    #[arg(long, default_value_t = 32768)]
    tokens_per_step: usize,
    /// Timed steps per configuration (after 3 warm-up steps); 0 skips the throughput table.
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Steps of the needle comparison (0 = skip it).
    #[arg(long, default_value_t = 0)]
    needle_steps: u64,
    /// Sequence length of the needle comparison.
    #[arg(long, default_value_t = 2048)]
    needle_seq: usize,
    /// Device: auto | cpu | cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Folder for the runs' folders.
    #[arg(long, default_value = "runs/bench-train")]
    out_dir: String,
    /// Append the Markdown table to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Extra `--set key=value` overrides for every run.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

fn one(
    a: &TrainBenchArgs,
    attention: &str,
    seq: usize,
    batch: usize,
    steps: u64,
    source: &str,
    extra: &[String],
) -> Result<Summary> {
    let mut sets = vec![
        format!("run.name=\"{}-{attention}-{source}-s{seq}\"", a.preset),
        format!("run.out_dir={:?}", a.out_dir),
        format!("run.steps={steps}"),
        format!("run.device={:?}", a.device),
        "run.log_every=1".into(),
        "run.ckpt_every=0".into(),
        "run.eval_batches=4".into(),
        format!("model.preset={:?}", a.preset),
        format!("model.attention={attention:?}"),
        format!("data.source={source:?}"),
        format!("data.seq_len={seq}"),
        format!("data.batch_size={batch}"),
        "optim.warmup_steps=3".into(),
    ];
    sets.extend(extra.iter().cloned());
    sets.extend(a.sets.iter().cloned());
    let cfg = config::resolve(None, &sets, std::iter::empty())?;
    let backend = nsa_sys::cuda::load_backend()?;
    train::train(
        &cfg,
        &Launch {
            overwrite: true,
            ..Default::default()
        },
        backend.has_gpu(),
    )
}

/// Tokens/s of the timed steps (the metrics lines after the 3 warm-up steps; all of them when
/// there are no more): median, min and max.
fn tokens_per_s(lines: &[crate::metrics::MetricLine]) -> Option<nsa_bench::Timing> {
    let warm_up = if lines.len() > 3 { 3 } else { 0 };
    nsa_bench::Timing::of(lines.iter().skip(warm_up).map(|l| l.tokens_per_s).collect())
}

pub fn run(a: TrainBenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.seq.iter().all(|&s| s >= 2),
        "--seq: every sequence length must be at least 2 (got {:?})",
        a.seq
    );
    anyhow::ensure!(
        a.tokens_per_step >= 1,
        "--tokens-per-step must be at least 1"
    );
    anyhow::ensure!(a.needle_seq >= 2, "--needle-seq must be at least 2");
    if a.device.starts_with("cuda") {
        // Once, rather than as a failed row for every configuration.
        let backend = nsa_sys::cuda::load_backend()?;
        anyhow::ensure!(
            backend.has_gpu(),
            "--device {} needs a GPU: {backend}",
            a.device
        );
    }
    // Every row is printed; the command still fails when any configuration did.
    let mut failures = 0usize;
    let mut table = String::from(
        "| preset | S | batch | attention | tokens/s, median (min–max) of the timed steps | peak memory (MB) | held for backward (MB) | NSA / dense (medians) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let seqs: &[usize] = if a.steps == 0 { &[] } else { &a.seq };
    for &seq in seqs {
        let batch = (a.tokens_per_step / seq).max(1);
        let mut dense_tps = None;
        for attention in ["dense", "nsa"] {
            let cell = match one(&a, attention, seq, batch, a.steps + 3, "needle", &[]) {
                Ok(s) => {
                    let lines = crate::metrics::read(&s.run_dir.join("metrics.jsonl"))?;
                    let timing = tokens_per_s(&lines).unwrap_or(nsa_bench::Timing {
                        median: 0.0,
                        min: 0.0,
                        max: 0.0,
                    });
                    let tps = timing.median;
                    let ratio = match (attention, dense_tps) {
                        ("nsa", Some(d)) if d > 0.0 => format!("{:.2}×", tps / d),
                        _ => String::new(),
                    };
                    if attention == "dense" {
                        dense_tps = Some(tps);
                    }
                    // What the forward left for the backward (the activations), largest step.
                    let held = lines
                        .iter()
                        .filter_map(|l| l.activation_mb)
                        .reduce(f64::max)
                        .map_or(String::new(), |m| format!("{m:.0}"));
                    format!(
                        "{} | {:.0} | {held} | {ratio}",
                        timing.cell_to(0),
                        s.peak_mem_mb
                    )
                }
                Err(e) => {
                    failures += 1;
                    format!(
                        "failed: {} | | | ",
                        format!("{e:#}")
                            .lines()
                            .next()
                            .unwrap_or("")
                            .replace('|', "/")
                    )
                }
            };
            table.push_str(&format!(
                "| {} | {seq} | {batch} | {attention} | {cell} |\n",
                a.preset
            ));
        }
    }
    if a.needle_steps > 0 {
        table.push_str(&format!(
            "\nNeedle retrieval after {} steps at S = {} (answer accuracy on held-out sequences):\n\n| attention | eval loss | answer accuracy |\n| --- | --- | --- |\n",
            a.needle_steps, a.needle_seq
        ));
        let batch = (a.tokens_per_step / a.needle_seq).max(1);
        for attention in ["dense", "nsa"] {
            let row = match one(
                &a,
                attention,
                a.needle_seq,
                batch,
                a.needle_steps,
                "needle",
                &["run.log_every=10".into(), "run.eval_batches=16".into()],
            ) {
                Ok(s) => format!(
                    "| {attention} | {:.4} | {:.3} |\n",
                    s.eval_loss, s.eval_accuracy
                ),
                Err(e) => {
                    failures += 1;
                    format!(
                        "| {attention} | failed: {} | |\n",
                        format!("{e:#}").lines().next().unwrap_or("")
                    )
                }
            };
            table.push_str(&row);
        }
    }
    println!("\n{table}");
    if let Some(path) = &a.out {
        nsa_bench::append(path, &table)?;
    }
    anyhow::ensure!(
        failures == 0,
        "{failures} benchmark configuration(s) failed (see the table)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricLine;

    fn line(step: u64, tokens_per_s: f64) -> MetricLine {
        MetricLine {
            tokens_per_s,
            ..crate::metrics::test_line(step, 1.0, None)
        }
    }

    #[test]
    fn throughput_skips_the_warm_up_steps_and_shows_the_spread() {
        // Warm-up steps (slow first, compiling) are left out of the timed steps.
        let speeds = [10.0, 20.0, 30.0, 1004.0, 998.0, 1001.0, 1010.0, 990.0];
        let lines: Vec<MetricLine> = (1..).zip(speeds).map(|(s, t)| line(s, t)).collect();
        let t = tokens_per_s(&lines).unwrap();
        assert_eq!((t.median, t.min, t.max), (1001.0, 990.0, 1010.0));
        assert_eq!(t.cell_to(0), "1001 (990–1010)");
        // A run of warm-up steps alone still reports them.
        let t = tokens_per_s(&lines[..2]).unwrap();
        assert_eq!((t.median, t.min, t.max), (20.0, 10.0, 20.0));
        assert!(tokens_per_s(&[]).is_none());
    }
}
