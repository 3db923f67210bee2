//! `nsa-train bench decode-launch`: the decode kernels' launch shapes, swept in one run.
//!
//! The decode step of `bench decode`'s NSA attention graph column (the four decode kernels
//! replayed as one CUDA graph, [`STEPS_PER_RUN`] replays back to back per timed run) at the
//! device's own launch shapes, then with one choice changed at a time: each `--tile-ctas` (the
//! CTAs the compressed and the selected/window tile launches aim for; `nsa_sys::fused::
//! DecodeLaunch::tile_ctas`) with the selection at the device's pick, and each
//! `--select-slices` (selection CTAs per (b, g)) with the tiles at the device's pick, and each
//! `--programmatic` (`on`: the kernels after the first start as programmatic dependents of the
//! one before; `off`: each waits for the one before to end); the device's pick again last, so that a drift of the clocks during the sweep shows. Each row
//! gives the shapes the step took, its time (median (min–max) of `--repeats` runs) and its
//! ratio to the first pick's, each kernel's time in an eager launch (CUDA events between the
//! four launches, `DecodeStep::launch_timed`; median of `--repeats` launches: where the time
//! goes without a profiler), and checks itself against the pick on the same cache, queries
//! and gates: the same blocks, and the output's largest difference relative to the pick's
//! largest magnitude (the partials merge in another order, so bf16 rounding differs). One
//! binary answers what one rule or another would give, without a build per candidate.
//!
//! CUDA only, bf16, random caches (`NsaCache::filled_random`: a step's cost does not depend on
//! the values).
use std::path::PathBuf;

use anyhow::{ensure, Result};
use nsa_attn::NsaCache;
use nsa_sys::fused::{DecodeLaunch, DecodeStep, DECODE_MAX_SELECT_SLICES};
use tch::{Device, Kind, Tensor};

use super::decode::{kernel_inputs, per_step, STEPS_PER_RUN};
use nsa_bench::{bench_device, branches::shape_config, Timing};

#[derive(Debug, clap::Args)]
pub struct DecodeLaunchArgs {
    /// Device: `auto`, `cuda` or `cuda:N` (the decode kernels run on CUDA only).
    #[arg(long)]
    device: Option<String>,
    /// Cached tokens per sequence, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [65536])]
    seq: Vec<i64>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8])]
    batch: Vec<i64>,
    /// Layer shapes: `paper` (G = 16) and/or `125m`, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["paper".to_string()])]
    shape: Vec<String>,
    /// Timed runs per row after one warm-up run.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// CTAs the tile launches aim for, comma-separated: a row each, the selection at the
    /// device's pick.
    #[arg(long, value_delimiter = ',', default_values_t = [66, 132, 264, 396, 528])]
    tile_ctas: Vec<i64>,
    /// Selection CTAs per (b, g), comma-separated, 1 to 64: a row each, the tiles at the
    /// device's pick.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16, 32])]
    select_slices: Vec<i64>,
    /// Programmatic dependent launches `on` or `off`, comma-separated: a row each, the other
    /// shapes at the device's pick (which is `on` from compute capability 9.0).
    #[arg(long, value_delimiter = ',', value_parser = on_off, default_values = ["off"])]
    programmatic: Vec<bool>,
    /// Append the Markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// The launches one cell sweeps: a label and the shapes asked for.
fn launches(
    tile_ctas: &[i64],
    select_slices: &[i64],
    programmatic: &[bool],
) -> Vec<(String, DecodeLaunch)> {
    let pick = ("device's pick".to_string(), DecodeLaunch::default());
    let mut all = vec![pick.clone()];
    all.extend(tile_ctas.iter().map(|&c| {
        let launch = DecodeLaunch {
            tile_ctas: Some(c),
            ..DecodeLaunch::default()
        };
        (format!("tile CTAs {c}"), launch)
    }));
    all.extend(select_slices.iter().map(|&s| {
        let launch = DecodeLaunch {
            select_slices: Some(s),
            ..DecodeLaunch::default()
        };
        (format!("selection CTAs {s}"), launch)
    }));
    all.extend(programmatic.iter().map(|&on| {
        let launch = DecodeLaunch {
            programmatic: Some(on),
            ..DecodeLaunch::default()
        };
        let label = if on { "on" } else { "off" };
        (format!("programmatic {label}"), launch)
    }));
    all.push((format!("{} again", pick.0), pick.1));
    all
}

/// The flags' values, checked before any device work.
fn check_args(a: &DecodeLaunchArgs) -> Result<()> {
    ensure!(
        a.seq.iter().all(|&s| s >= 1) && a.batch.iter().all(|&b| b >= 1),
        "--seq and --batch values must be at least 1"
    );
    ensure!(a.repeats >= 1, "--repeats must be at least 1");
    ensure!(
        a.tile_ctas.iter().all(|&c| c >= 1),
        "--tile-ctas values must be at least 1, got {:?}",
        a.tile_ctas
    );
    ensure!(
        a.select_slices
            .iter()
            .all(|&s| (1..=DECODE_MAX_SELECT_SLICES).contains(&s)),
        "--select-slices values must be 1 to {DECODE_MAX_SELECT_SLICES}, got {:?}",
        a.select_slices
    );
    Ok(())
}

pub fn run(a: DecodeLaunchArgs) -> Result<()> {
    check_args(&a)?;
    let shapes = a
        .shape
        .iter()
        .map(|s| Ok((s.clone(), shape_config(s)?)))
        .collect::<Result<Vec<_>>>()?;
    nsa_sys::cuda::load_backend()?;
    let device = bench_device(a.device.as_deref())?;
    ensure!(
        device.is_cuda(),
        "bench decode-launch times the decode kernels, which run on CUDA only (got {device:?})"
    );
    let sweep = launches(&a.tile_ctas, &a.select_slices, &a.programmatic);
    let mut table = format!(
        "Decode kernels' launch shapes, {}, bf16. The four decode kernels replayed as one CUDA graph, ms per step over {STEPS_PER_RUN} replays back to back, median (min–max) of {} runs; one shape changed at a time from the device's pick. CTAs are per (b, g) pair; blocks: selection blocks per selection CTA. Kernels µs: compressed tiles / selection / selected and window tiles / combine, each from CUDA events between the four launches of an eager step (median of the runs' launches). Same blocks and max Δ out: against the device's pick on the same inputs (Δ relative to the pick's largest output magnitude).\n\n| shape | cached tokens | batch | launch | compressed tiles per CTA × CTAs | selected/window tiles per CTA × CTAs | selection CTAs × blocks | programmatic | NSA attention graph ms | / pick | kernels µs | same blocks | max Δ out |\n| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |\n",
        nsa_bench::device_description(device),
        a.repeats
    );
    for (name, cfg) in &shapes {
        for &s in &a.seq {
            for &b in &a.batch {
                let cell = Cell {
                    cfg,
                    seq: s,
                    batch: b,
                    device,
                    repeats: a.repeats,
                };
                for line in cell.rows(name, &sweep)? {
                    print!("{line}");
                    table.push_str(&line);
                }
            }
        }
    }
    println!();
    if let Some(path) = &a.out {
        nsa_bench::append(path, &table)?;
    }
    Ok(())
}

/// One (shape, cached tokens, batch) of the sweep.
struct Cell<'a> {
    cfg: &'a nsa_attn::NsaConfig,
    seq: i64,
    batch: i64,
    device: Device,
    repeats: usize,
}

impl Cell<'_> {
    /// A row per launch of `sweep`, a failed launch a row saying why. The first launch that
    /// runs (the device's pick, unless it failed) is the reference of the later rows.
    fn rows(&self, name: &str, sweep: &[(String, DecodeLaunch)]) -> Result<Vec<String>> {
        let _no_grad = tch::no_grad_guard();
        let (cfg, s, b) = (self.cfg, self.seq, self.batch);
        let kind = Kind::BFloat16;
        let lengths = vec![s; b as usize];
        let cache = NsaCache::filled_random(cfg, &lengths, s + 1, kind, self.device)?;
        let position = s - 1;
        let (q, gates, positions) = kernel_inputs(cfg, b, position, kind, self.device)?;
        let step = |launch| {
            nsa_attn::decode::kernel_step(&cache, &q, &positions, position, &gates, launch)
        };
        let mut rows = Vec::with_capacity(sweep.len());
        // The reference: its output, blocks, graph ms and largest output magnitude.
        let mut pick: Option<(Tensor, Tensor, f64, f64)> = None;
        for (label, launch) in sweep {
            let measured = step(*launch)
                .map_err(anyhow::Error::from)
                .and_then(|st| self.measure(&st));
            let line = match measured {
                Ok(m) => {
                    let (out, ids, median, scale) = match &mut pick {
                        Some(reference) => &*reference,
                        slot @ None => {
                            let scale = m.out.f_abs()?.f_max()?.f_double_value(&[])?;
                            &*slot.insert((
                                m.out.shallow_clone(),
                                m.ids.shallow_clone(),
                                m.time.median,
                                scale.max(f64::MIN_POSITIVE),
                            ))
                        }
                    };
                    let same = ids.f_equal(&m.ids)?;
                    let diff = m.out.f_sub(out)?.f_abs()?.f_max()?.f_double_value(&[])? / scale;
                    let shape = m.shape;
                    format!(
                        "| {name} | {s} | {b} | {label} | {} × {} | {} × {} | {} × {} | {} | {} | {:.2} | {} | {} | {diff:.1e} |\n",
                        shape.cmp_tiles_per_cta,
                        shape.cmp_ctas,
                        shape.attend_tiles_per_cta,
                        shape.attend_ctas,
                        shape.select_slices,
                        shape.blocks_per_slice,
                        if shape.programmatic { "on" } else { "off" },
                        m.time.cell_to(4),
                        m.time.median / *median,
                        m.kernels,
                        if same { "yes" } else { "**no**" },
                    )
                }
                Err(e) => format!(
                    "| {name} | {s} | {b} | {label} | failed: {} | | | | | | | | |\n",
                    format!("{e:#}").lines().next().unwrap_or("")
                ),
            };
            rows.push(line);
        }
        Ok(rows)
    }

    /// One launch (its output and blocks), each kernel's time over `repeats` timed launches,
    /// then the step captured and timed as a graph.
    fn measure(&self, step: &DecodeStep) -> Result<Measured> {
        step.launch()?;
        let out = step.output().f_to_kind(Kind::Float)?;
        let ids = step.blocks().f_detach_copy()?;
        let mut each: [Vec<f64>; 4] = Default::default();
        for _ in 0..self.repeats {
            let t = step.launch_timed()?;
            for (v, ms) in each
                .iter_mut()
                .zip([t.compressed, t.selection, t.attend, t.combine])
            {
                v.push(ms * 1e3);
            }
        }
        let kernels = each
            .map(|v| Timing::of(v).map_or("–".to_string(), |t| format!("{:.1}", t.median)))
            .join(" / ");
        let graph = step.capture()?;
        let time = per_step(self.device, self.repeats, || Ok(graph.replay()?))?;
        Ok(Measured {
            out,
            ids,
            time,
            kernels,
            shape: step.shape(),
        })
    }
}

struct Measured {
    out: Tensor,
    ids: Tensor,
    time: Timing,
    /// Each kernel's median µs, "compressed / selection / attend / combine".
    kernels: String,
    shape: nsa_sys::fused::DecodeShape,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: DecodeLaunchArgs,
    }

    fn args(flags: &[&str]) -> DecodeLaunchArgs {
        let argv = std::iter::once("bench").chain(flags.iter().copied());
        Cli::try_parse_from(argv).unwrap().args
    }

    /// The sweep: the pick first and last, one shape changed in each row between.
    #[test]
    fn the_sweep_changes_one_shape_at_a_time() {
        let sweep = launches(&[132, 264], &[1, 4], &[false]);
        let labels: Vec<&str> = sweep.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "device's pick",
                "tile CTAs 132",
                "tile CTAs 264",
                "selection CTAs 1",
                "selection CTAs 4",
                "programmatic off",
                "device's pick again"
            ]
        );
        assert_eq!(sweep[0].1, DecodeLaunch::default());
        assert_eq!(sweep[6].1, DecodeLaunch::default());
        assert_eq!(sweep[5].1.programmatic, Some(false));
        assert_eq!(sweep[5].1.tile_ctas, None);
        assert_eq!(sweep[2].1.tile_ctas, Some(264));
        assert_eq!(sweep[2].1.select_slices, None);
        assert_eq!(sweep[4].1.select_slices, Some(4));
        assert_eq!(sweep[4].1.tile_ctas, None);
    }

    /// Bad flags are refused before any device work, each with a message naming the flag; on
    /// the CPU valid flags stop at the device.
    #[test]
    fn bad_flags_and_the_cpu_get_clear_errors() {
        for (flags, needle) in [
            (vec!["--tile-ctas", "0,132"], "--tile-ctas"),
            (vec!["--select-slices", "65"], "--select-slices"),
            (vec!["--select-slices", "0"], "--select-slices"),
            (vec!["--seq", "0"], "--seq"),
            (vec!["--repeats", "0"], "--repeats"),
            (vec!["--shape", "huge"], "huge"),
            (vec!["--device", "cpu"], "CUDA only"),
        ] {
            let err = run(args(&flags)).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{flags:?}: {err:#}");
        }
        let err = Cli::try_parse_from(["bench", "--programmatic", "yes"]).unwrap_err();
        assert!(err.to_string().contains("on or off"), "{err}");
    }
}
