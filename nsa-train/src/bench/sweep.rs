//! `nsa-train bench sweep-buckets`: trains a fixed number of steps for each gradient bucket size
//! × compression mode, as one data-parallel rank (world size 1: real NCCL calls on a GPU, the
//! in-process backend on the CPU), and reports tokens/s and gradient-sync time per step: a CSV,
//! a PNG plot, a Markdown table and the best setting.
use std::path::PathBuf;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::config::{self, DistEnv};
use crate::train::{self, Launch};

#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Model preset.
    #[arg(long, default_value = "125m")]
    preset: String,
    /// Bucket sizes in MB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "25,50,100")]
    buckets: Vec<f64>,
    /// Compression modes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "none,bf16")]
    compress: Vec<String>,
    /// Training steps per setting; the first 3 are warm-up and not counted.
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Sequence length and batch per rank.
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Device: auto | cpu | cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Folder for the runs, the CSV and the PNG.
    #[arg(long, default_value = "runs/sweep-buckets")]
    out_dir: PathBuf,
    /// Append the Markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra `--set key=value` overrides for every run.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Debug)]
struct Point {
    bucket_mb: f64,
    compress: String,
    tokens_per_s: f64,
    sync_ms: f64,
}

pub fn run(a: SweepArgs) -> Result<()> {
    let backend = nsa_sys::cuda::load_backend()?;
    let mut points = Vec::new();
    for compress in &a.compress {
        for &bucket in &a.buckets {
            let name = format!("{}-b{bucket}-{compress}", a.preset);
            let mut sets = vec![
                format!("run.name={name:?}"),
                format!("run.out_dir={:?}", a.out_dir.display().to_string()),
                format!("run.steps={}", a.steps.max(4)),
                format!("run.device={:?}", a.device),
                "run.log_every=1".into(),
                "run.ckpt_every=0".into(),
                "run.eval_batches=1".into(),
                format!("model.preset={:?}", a.preset),
                format!("data.seq_len={}", a.seq),
                format!("data.batch_size={}", a.batch),
                format!("fast.ddp_bucket_mb={bucket}"),
                format!("fast.ddp_compress={compress:?}"),
            ];
            sets.extend(a.sets.iter().cloned());
            let cfg = config::resolve(None, &sets, std::iter::empty())?;
            let port = crate::launch::free_port()?;
            let dist = DistEnv {
                rank: 0,
                world: 1,
                local_rank: 0,
                master_addr: "127.0.0.1".into(),
                master_port: port,
            };
            let s = train::train(
                &cfg,
                &Launch {
                    overwrite: true,
                    dist: Some(dist),
                    ..Default::default()
                },
                backend.has_gpu(),
            )
            .with_context(|| format!("sweep setting {name}"))?;
            let lines = crate::metrics::read(&s.run_dir.join("metrics.jsonl"))?;
            let timed: Vec<_> = lines.iter().skip(3).collect();
            points.push(Point {
                bucket_mb: bucket,
                compress: compress.clone(),
                tokens_per_s: super::median(timed.iter().map(|l| l.tokens_per_s).collect())
                    .unwrap_or(f64::NAN),
                sync_ms: super::median(timed.iter().filter_map(|l| l.sync_ms).collect())
                    .unwrap_or(f64::NAN),
            });
        }
    }
    std::fs::create_dir_all(&a.out_dir)?;
    let mut csv = String::from("bucket_mb,compression,tokens_per_s,sync_ms\n");
    for p in &points {
        csv.push_str(&format!(
            "{},{},{:.1},{:.3}\n",
            p.bucket_mb, p.compress, p.tokens_per_s, p.sync_ms
        ));
    }
    let csv_path = a.out_dir.join("sweep.csv");
    crate::write_atomic(&csv_path, csv.as_bytes())?;
    let png_path = a.out_dir.join("sweep.png");
    plot(&points, &png_path)?;
    let best = points
        .iter()
        .max_by(|x, y| x.tokens_per_s.total_cmp(&y.tokens_per_s))
        .context("no sweep points")?;
    let mut table = String::from(
        "| bucket MB | compression | tokens/s (median) | grad sync ms/step (median) |\n| ---: | --- | ---: | ---: |\n",
    );
    for p in &points {
        table.push_str(&format!(
            "| {} | {} | {:.0} | {:.3} |\n",
            p.bucket_mb, p.compress, p.tokens_per_s, p.sync_ms
        ));
    }
    table.push_str(&format!(
        "\nBest: fast.ddp_bucket_mb = {}, fast.ddp_compress = \"{}\" ({:.0} tokens/s). World size 1 on {}; preset {}, S = {}, batch {} per rank, {} steps per setting (first 3 not counted).\n",
        best.bucket_mb,
        best.compress,
        best.tokens_per_s,
        super::device_description(if backend.has_gpu() && a.device != "cpu" { tch::Device::Cuda(0) } else { tch::Device::Cpu }),
        a.preset,
        a.seq,
        a.batch,
        a.steps.max(4)
    ));
    println!(
        "\n{table}\nwrote {} and {}",
        csv_path.display(),
        png_path.display()
    );
    if let Some(path) = &a.out {
        super::append(path, &table)?;
    }
    Ok(())
}

fn plot(points: &[Point], out: &std::path::Path) -> Result<()> {
    crate::metrics::register_font();
    let tmp = out.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (900, 700)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (top, bottom) = root.split_vertically(350);
        let labels: Vec<String> = points
            .iter()
            .map(|p| format!("{} MB {}", p.bucket_mb, p.compress))
            .collect();
        let n = points.len() as f64;
        for (area, title, values) in [
            (
                &top,
                "tokens/s",
                points.iter().map(|p| p.tokens_per_s).collect::<Vec<_>>(),
            ),
            (
                &bottom,
                "gradient sync ms / step",
                points.iter().map(|p| p.sync_ms).collect(),
            ),
        ] {
            let hi = values
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .fold(0.0, f64::max)
                .max(1e-9)
                * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..hi)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .x_labels(points.len())
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                        labels[i as usize].clone()
                    } else {
                        String::new()
                    }
                })
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .draw_series(values.iter().enumerate().map(|(i, v)| {
                    Rectangle::new(
                        [(i as f64 - 0.3, 0.0), (i as f64 + 0.3, *v)],
                        BLUE.mix(0.6).filled(),
                    )
                }))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}
