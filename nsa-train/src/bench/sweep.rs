//! `nsa-train bench sweep-buckets`: trains a fixed number of steps for each gradient bucket size
//! × compression mode and world size, and reports tokens/s and gradient-sync time per step: a
//! CSV, a PNG plot, a Markdown table and the best setting. World size 1 runs in this process as
//! one data-parallel rank (real NCCL calls on a GPU, the in-process backend on the CPU); larger
//! world sizes start `nsa-train train --nproc-per-node N` (one process per GPU) and read rank 0's
//! metrics.
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
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
    /// World sizes to sweep (comma-separated). Default: every GPU of this host on CUDA (plus 1
    /// when there are several), 1 on the CPU.
    #[arg(long, value_delimiter = ',')]
    world: Vec<usize>,
    /// Overlap the all-reduce with backward (`true`), sync after backward (`false`), or both
    /// (`true,false`: measures the overlap win).
    #[arg(long, value_delimiter = ',', default_value = "true")]
    overlap: Vec<bool>,
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
    world: usize,
    overlap: bool,
    bucket_mb: f64,
    compress: String,
    tokens_per_s: f64,
    step_ms: f64,
    sync_ms: f64,
}

pub fn run(a: SweepArgs) -> Result<()> {
    let backend = nsa_sys::cuda::load_backend()?;
    let on_gpu = backend.has_gpu() && a.device != "cpu";
    let worlds = if !a.world.is_empty() {
        a.world.clone()
    } else {
        let gpus = if on_gpu {
            usize::try_from(tch::Cuda::device_count())
                .unwrap_or(1)
                .max(1)
        } else {
            1
        };
        if gpus > 1 {
            vec![1, gpus]
        } else {
            vec![1]
        }
    };
    if let Some(w) = worlds.iter().find(|&&w| w == 0 || (w > 1 && !on_gpu)) {
        bail!("--world {w}: world sizes above 1 need one GPU per rank (and 0 is not a world size)");
    }
    let mut points = Vec::new();
    for &world in &worlds {
        for compress in &a.compress {
            for &bucket in &a.buckets {
                for &overlap in &a.overlap {
                    points.push(sweep_point(
                        &a,
                        world,
                        bucket,
                        compress,
                        overlap,
                        backend.has_gpu(),
                    )?);
                }
            }
        }
    }
    std::fs::create_dir_all(&a.out_dir)?;
    let mut csv =
        String::from("world,bucket_mb,compression,overlap,tokens_per_s,step_ms,sync_ms\n");
    for p in &points {
        csv.push_str(&format!(
            "{},{},{},{},{:.1},{:.2},{:.3}\n",
            p.world, p.bucket_mb, p.compress, p.overlap, p.tokens_per_s, p.step_ms, p.sync_ms
        ));
    }
    let csv_path = a.out_dir.join("sweep.csv");
    crate::write_atomic(&csv_path, csv.as_bytes())?;
    let png_path = a.out_dir.join("sweep.png");
    plot(&points, &png_path)?;
    let widest = worlds.iter().copied().max().unwrap_or(1);
    let best = points
        .iter()
        .filter(|p| p.world == widest)
        .max_by(|x, y| x.tokens_per_s.total_cmp(&y.tokens_per_s))
        .context("no sweep points")?;
    let mut table = String::from(
        "| world | bucket MB | compression | all-reduce | tokens/s | step ms | sync ms after backward |\n| ---: | ---: | --- | --- | ---: | ---: | ---: |\n",
    );
    for p in &points {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.3} |\n",
            p.world,
            p.bucket_mb,
            p.compress,
            if p.overlap {
                "overlapped"
            } else {
                "after backward"
            },
            p.tokens_per_s,
            p.step_ms,
            p.sync_ms
        ));
    }
    table.push_str(&format!(
        "\nMedians over the steps after the first 3. Best at world size {widest}: fast.ddp_bucket_mb = {}, fast.ddp_compress = \"{}\", fast.ddp_overlap = {} ({:.0} tokens/s). Rank 0 on {}; preset {}, S = {}, batch {} per rank, {} steps per setting.\n",
        best.bucket_mb,
        best.compress,
        best.overlap,
        best.tokens_per_s,
        nsa_bench::device_description(if on_gpu { tch::Device::Cuda(0) } else { tch::Device::Cpu }),
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
        nsa_bench::append(path, &table)?;
    }
    Ok(())
}

/// Trains one setting and returns its medians over the steps after warm-up.
fn sweep_point(
    a: &SweepArgs,
    world: usize,
    bucket: f64,
    compress: &str,
    overlap: bool,
    has_gpu: bool,
) -> Result<Point> {
    let sync = if overlap { "overlap" } else { "after" };
    let name = format!("{}-w{world}-b{bucket}-{compress}-{sync}", a.preset);
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
        format!("fast.ddp_overlap={overlap}"),
    ];
    sets.extend(a.sets.iter().cloned());
    let cfg = config::resolve(None, &sets, std::iter::empty())?;
    let run_dir = if world == 1 {
        let dist = DistEnv::solo(crate::launch::free_port()?);
        let launch = Launch {
            overwrite: true,
            dist: Some(dist),
            ..Default::default()
        };
        train::train(&cfg, &launch, has_gpu)
            .with_context(|| format!("sweep setting {name}"))?
            .run_dir
    } else {
        let exe = std::env::current_exe().context("locating the nsa-train binary")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "train",
            "--overwrite",
            "--nproc-per-node",
            &world.to_string(),
        ]);
        for set in &sets {
            cmd.args(["--set", set]);
        }
        let status = cmd
            .status()
            .with_context(|| format!("starting sweep setting {name}"))?;
        ensure!(status.success(), "sweep setting {name} failed ({status})");
        a.out_dir.join(&name)
    };
    let lines = crate::metrics::read(&run_dir.join("metrics.jsonl"))?;
    let timed: Vec<_> = lines.iter().skip(3).collect();
    Ok(Point {
        world,
        overlap,
        bucket_mb: bucket,
        compress: compress.to_string(),
        tokens_per_s: nsa_bench::median(timed.iter().map(|l| l.tokens_per_s).collect())
            .unwrap_or(f64::NAN),
        step_ms: nsa_bench::median(timed.iter().map(|l| l.step_ms).collect()).unwrap_or(f64::NAN),
        sync_ms: nsa_bench::median(timed.iter().filter_map(|l| l.sync_ms).collect())
            .unwrap_or(f64::NAN),
    })
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
            .map(|p| {
                format!(
                    "w{} {}MB {}{}",
                    p.world,
                    p.bucket_mb,
                    p.compress,
                    if p.overlap { "" } else { " post" }
                )
            })
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
