//! `nsa-train compare RUN… --out DIR [--eval FILE…]`: several runs side by side.
//!
//! Writes `DIR/val_loss.png` (every run's validation loss against the tokens it had trained
//! on, one line per run), `DIR/compare.md` (a table: run, attention, sequence length, steps,
//! tokens, final validation loss, perplexity, tokens/s) and, given `nsa-train eval --task …
//! --json` files, `DIR/accuracy_by_distance.png` and a second table. Everything is read from
//! the run folders (`config.toml`, `metrics.jsonl`, `summary.json` when the run finished).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordu64;
use plotters::prelude::*;

use crate::generate::retrieval::RetrievalReport;
use crate::metrics::{self, MetricLine};
use crate::plot::{count_label, fit_title, register_font, spans_decades, value_label};

/// Size of the comparison plots, pixels.
pub(crate) const PLOT_SIZE: (u32, u32) = (1000, 600);
const MARGIN: u32 = 12;

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Run folders (runs/NAME), in the order of the table and the legend (none: only the
    /// `--eval` files' accuracy by distance).
    #[arg(required_unless_present = "evals")]
    runs: Vec<PathBuf>,
    /// Output folder (created if missing): val_loss.png, compare.md, accuracy_by_distance.png.
    #[arg(long)]
    out: PathBuf,
    /// JSON files of `nsa-train eval RUN --task … --json FILE`: accuracy by distance, one line
    /// each.
    #[arg(long = "eval", value_name = "FILE")]
    evals: Vec<PathBuf>,
    /// Title of the plots (default: the runs' names).
    #[arg(long)]
    title: Option<String>,
}

/// One run's row of the table, and its validation curve.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub name: String,
    pub attention: String,
    pub seq_len: usize,
    pub steps: u64,
    pub tokens: u64,
    /// The final validation loss (the summary's, else the last one logged).
    pub val_loss: Option<f64>,
    pub tokens_per_s: f64,
    /// (tokens trained, validation loss) at each evaluation.
    pub curve: Vec<(u64, f64)>,
}

/// Reads one run folder.
pub fn read_run(dir: &Path) -> Result<RunRow> {
    let cfg_path = dir.join("config.toml");
    ensure!(
        cfg_path.is_file(),
        "{} is not a run folder: it has no config.toml",
        dir.display()
    );
    let cfg = crate::config::resolve(Some(&cfg_path), &[], std::iter::empty())?;
    let model = crate::train::model_config(&cfg)?;
    let lines = metrics::read(&dir.join("metrics.jsonl"))?;
    ensure!(
        !lines.is_empty(),
        "{}: metrics.jsonl is empty",
        dir.display()
    );
    // Older runs' lines lack the token count: step × tokens per step (one rank).
    let per_step = (cfg.data.batch_size * cfg.data.seq_len) as u64 * cfg.optim.grad_accum;
    let tokens_at = |l: &MetricLine| l.tokens.unwrap_or(l.step * per_step);
    let last = lines.last().context("metrics.jsonl is empty")?;
    let summary: Option<serde_json::Value> = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let from_summary = |key: &str| {
        summary
            .as_ref()
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_f64())
            .filter(|v| v.is_finite())
    };
    let curve: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((tokens_at(l), l.eval_loss.filter(|v| v.is_finite())?)))
        .collect();
    let logged_rate: Vec<f64> = lines
        .iter()
        .map(|l| l.tokens_per_s)
        .filter(|v| v.is_finite())
        .collect();
    let name = std::path::absolute(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(RunRow {
        name,
        attention: model.attention.to_string(),
        seq_len: cfg.data.seq_len,
        steps: last.step,
        tokens: tokens_at(last),
        val_loss: from_summary("eval_loss").or_else(|| curve.last().map(|c| c.1)),
        tokens_per_s: from_summary("tokens_per_s")
            .unwrap_or_else(|| logged_rate.iter().sum::<f64>() / logged_rate.len().max(1) as f64),
        curve,
    })
}

/// The runs' Markdown table.
pub fn runs_table(rows: &[RunRow]) -> String {
    let mut t = String::from(
        "| run | attention | seq | steps | tokens | final val loss | perplexity | tokens/s |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let (loss, ppl) = match r.val_loss {
            Some(l) => (format!("{l:.4}"), format!("{:.2}", f64::exp(l))),
            None => ("–".into(), "–".into()),
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {loss} | {ppl} | {:.0} |\n",
            r.name,
            r.attention,
            r.seq_len,
            r.steps,
            count_label(r.tokens),
            r.tokens_per_s
        ));
    }
    t
}

/// The retrieval evaluations' Markdown table: overall accuracy and accuracy by distance.
pub fn evals_table(evals: &[RetrievalReport]) -> String {
    let mut t = String::from(
        "| run | attention | task | trained at | evaluated at | answers | accuracy | accuracy by distance (tokens) |\n| --- | --- | --- | ---: | ---: | ---: | ---: | --- |\n",
    );
    for e in evals {
        let by: Vec<String> = e
            .by_distance
            .iter()
            .map(|b| {
                format!(
                    "{}–{}: {}",
                    count_label(b.from as u64),
                    count_label(b.to as u64),
                    b.accuracy().map_or("–".into(), |a| format!("{a:.2}"))
                )
            })
            .collect();
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.3} | {} |\n",
            e.run,
            e.attention,
            e.task,
            e.trained_len,
            e.len,
            e.answers,
            e.accuracy,
            by.join(", ")
        ));
    }
    t
}

/// `nsa-train compare`.
pub fn run(a: &CompareArgs) -> Result<()> {
    let rows = a
        .runs
        .iter()
        .map(|d| read_run(d).with_context(|| format!("reading run {}", d.display())))
        .collect::<Result<Vec<_>>>()?;
    let evals = a
        .evals
        .iter()
        .map(|f| -> Result<RetrievalReport> {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not the JSON of `nsa-train eval --task … --json`",
                    f.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    if names.is_empty() {
        names = evals.iter().map(|e| e.run.as_str()).collect();
        names.dedup();
    }
    let title = a.title.clone().unwrap_or_else(|| names.join(" vs "));
    let mut md = format!("# {title}\n");
    if !rows.is_empty() {
        md.push_str(&format!("\n{}", runs_table(&rows)));
    }
    let loss_series: Vec<Series> = rows
        .iter()
        .filter(|r| !r.curve.is_empty())
        .map(|r| Series {
            label: format!("{} ({}, S={})", r.name, r.attention, r.seq_len),
            points: r.curve.clone(),
        })
        .collect();
    let mut wrote = vec![a.out.join("compare.md")];
    if rows.is_empty() {
        // Only evaluations were given: nothing to say about validation losses.
    } else if loss_series.is_empty() {
        println!("compare: no run logged a validation loss (run.eval_every = 0 and unfinished?): no val_loss.png");
    } else {
        let png = a.out.join("val_loss.png");
        plot_series(
            &loss_series,
            &format!("validation loss: {title}"),
            ("tokens", "validation loss"),
            None,
            &png,
        )?;
        md.push_str("\n![validation loss against tokens](val_loss.png)\n");
        wrote.push(png);
    }
    if !evals.is_empty() {
        md.push_str(&format!("\n{}", evals_table(&evals)));
        let series: Vec<Series> = evals
            .iter()
            .map(|e| Series {
                label: format!("{} ({}) at {}", e.run, e.attention, e.len),
                points: e
                    .by_distance
                    .iter()
                    .filter_map(|b| Some((((b.from + b.to) / 2) as u64, b.accuracy()?)))
                    .collect(),
            })
            .collect();
        let png = a.out.join("accuracy_by_distance.png");
        plot_series(
            &series,
            &format!("retrieval accuracy by distance: {title}"),
            ("distance from key to query (tokens)", "accuracy"),
            Some((0.0, 1.0)),
            &png,
        )?;
        md.push_str("\n![accuracy by distance](accuracy_by_distance.png)\n");
        wrote.push(png);
    }
    crate::write_atomic(&a.out.join("compare.md"), md.as_bytes())?;
    print!("{md}");
    for w in wrote {
        println!("wrote {}", w.display());
    }
    Ok(())
}

/// One line of a comparison plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(u64, f64)>,
}

/// Lines (with points) against an integer x axis, one colour and legend entry each; the y axis
/// is `y_fixed`, else the values' range, logarithmic when they span more than a decade.
pub fn plot_series(
    series: &[Series],
    title: &str,
    axes: (&str, &str),
    y_fixed: Option<(f64, f64)>,
    out: &Path,
) -> Result<()> {
    register_font();
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1);
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (title, title_px) = fit_title(title, PLOT_SIZE.0 - 2 * MARGIN);
    let tmp = out.with_extension("png.tmp.png");
    {
        let root = BitMapBackend::new(&tmp, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&title, ("sans-serif", title_px))
            .margin(MARGIN)
            .x_label_area_size(44)
            .y_label_area_size(64);
        // Where each value sits on the drawn y axis, 0 (bottom) to 1 (top), for the legend.
        let linear = |a: f64, b: f64| move |v: f64| (v - a) / (b - a);
        match y_fixed {
            Some((a, b)) => {
                let corner = legend_corner(series, max_x, linear(a, b));
                draw(&mut builder, max_x, a..b, false, axes, series, corner)?
            }
            None if lo > hi => draw(
                &mut builder,
                max_x,
                0.0..1.0,
                false,
                axes,
                series,
                SeriesLabelPosition::UpperRight,
            )?,
            None if spans_decades(lo, hi) => {
                let (a, b) = (lo * 0.9, hi * 1.1);
                let corner = legend_corner(series, max_x, |v: f64| {
                    (v.ln() - a.ln()) / (b.ln() - a.ln())
                });
                draw(
                    &mut builder,
                    max_x,
                    (a..b).log_scale(),
                    true,
                    axes,
                    series,
                    corner,
                )?
            }
            None => {
                let pad = ((hi - lo) * 0.05).max(1e-3);
                let (a, b) = (lo - pad, hi + pad);
                let corner = legend_corner(series, max_x, linear(a, b));
                draw(&mut builder, max_x, a..b, false, axes, series, corner)?
            }
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn draw<Y>(
    builder: &mut ChartBuilder<'_, '_, BitMapBackend<'_>>,
    max_x: u64,
    y: Y,
    log: bool,
    (x_desc, y_desc): (&str, &str),
    series: &[Series],
    legend: SeriesLabelPosition,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let x: RangedCoordu64 = (0..max_x).into();
    let mut chart = builder
        .build_cartesian_2d(x, y)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .light_line_style(if log { TRANSPARENT } else { BLACK.mix(0.05) })
        .y_labels(12)
        .x_label_formatter(&|v| count_label(*v))
        .y_label_formatter(&|v| value_label(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(u64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(PointSeries::of_element(pts, 3, color, &|c, r, st| {
                Circle::new(c, r, st.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests;

/// The corner for the legend: the one whose legend-sized box (about 40 % of the plot's width,
/// a line of height per entry) covers the fewest points of the lines, each segment sampled
/// along its length; ties go to the earlier of upper right, upper left, lower right, lower
/// left. `y_unit` maps a value to its height on the drawn axis, 0 to 1.
pub(crate) fn legend_corner(
    series: &[Series],
    max_x: u64,
    y_unit: impl Fn(f64) -> f64,
) -> SeriesLabelPosition {
    const SAMPLES: usize = 16;
    let (w, h) = (0.42, (0.05 + 0.045 * series.len() as f64).min(0.9));
    let mut points = Vec::new();
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (x as f64 / max_x.max(1) as f64, y_unit(y)))
            .collect();
        points.extend(pts.first().copied());
        for pair in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            points.extend((1..=SAMPLES).map(|k| {
                let f = k as f64 / SAMPLES as f64;
                (x0 + f * (x1 - x0), y0 + f * (y1 - y0))
            }));
        }
    }
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, true, false),
        (SeriesLabelPosition::LowerRight, false, true),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let covered = |&(_, upper, right): &(SeriesLabelPosition, bool, bool)| {
        points
            .iter()
            .filter(|&&(x, y)| {
                let in_x = if right { x >= 1.0 - w } else { x <= w };
                let in_y = if upper { y >= 1.0 - h } else { y <= h };
                in_x && in_y
            })
            .count()
    };
    corners
        .iter()
        .min_by_key(|c| covered(c))
        .map_or(SeriesLabelPosition::UpperRight, |c| c.0.clone())
}
