//! Metrics: one JSON line per log step, and the loss-curve PNG drawn from them at the end.
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One log step. A non-finite number (the loss of a skipped step, say) is written as `null`
/// (JSON has no NaN) and read back as NaN, so a run can always read its own metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricLine {
    pub step: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub step_ms: f64,
    /// Peak CUDA memory allocated since the last log line, MB (0 on CPU).
    #[serde(deserialize_with = "nan_if_null")]
    pub peak_mem_mb: f64,
    pub skipped_steps: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_accuracy: Option<f64>,
    /// Gradient sync time of the logged step, ms (data-parallel runs only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sync_ms: Option<f64>,
}

/// `null` (how serde_json writes NaN and infinities) → NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Appends lines to `metrics.jsonl` (append mode: a resumed run continues the same file).
#[derive(Debug)]
pub struct MetricsWriter {
    file: std::fs::File,
}

impl MetricsWriter {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsWriter { file })
    }

    pub fn write(&mut self, line: &MetricLine) -> Result<()> {
        let mut s = serde_json::to_string(line)?;
        s.push('\n');
        self.file.write_all(s.as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

/// Reads `metrics.jsonl`, keeping for each step the last line written (a resumed run may repeat
/// steps after its checkpoint), ordered by step.
pub fn read(path: &Path) -> Result<Vec<MetricLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_step = std::collections::BTreeMap::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let m: MetricLine = serde_json::from_str(l)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        by_step.insert(m.step, m);
    }
    Ok(by_step.into_values().collect())
}

/// Draws the training loss (and eval loss where present) against the step.
pub fn plot_loss(lines: &[MetricLine], title: &str, out: &Path) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    register_font();
    let tmp = out.with_extension("png.tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let max_step = lines.iter().map(|l| l.step).max().unwrap_or(1).max(1) as f64;
        let losses = lines
            .iter()
            .map(|l| l.loss)
            .chain(lines.iter().filter_map(|l| l.eval_loss));
        let (lo, hi) = losses
            .filter(|v| v.is_finite())
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo < hi {
            (lo, hi)
        } else {
            (lo - 1.0, lo + 1.0)
        };
        let pad = (hi - lo) * 0.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(
                lines
                    .iter()
                    .filter(|l| l.loss.is_finite())
                    .map(|l| (l.step as f64, l.loss)),
                &BLUE,
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        let evals: Vec<(f64, f64)> = lines
            .iter()
            .filter_map(|l| Some((l.step as f64, l.eval_loss.filter(|v| v.is_finite())?)))
            .collect();
        if !evals.is_empty() {
            chart
                .draw_series(PointSeries::of_element(evals, 4, &RED, &|c, s, st| {
                    Circle::new(c, s, st.filled())
                }))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("eval loss")
                .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// plotters draws text with ab_glyph and needs a font registered once; DejaVu Sans is embedded
/// so plots never depend on the host's fonts.
pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, loss: f64) -> MetricLine {
        MetricLine {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_s: 100.0,
            step_ms: 10.0,
            peak_mem_mb: 0.0,
            skipped_steps: 0,
            eval_loss: (step == 20).then_some(loss + 0.1),
            eval_accuracy: None,
            sync_ms: None,
        }
    }

    #[test]
    fn jsonl_round_trips_and_later_lines_win() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut w = MetricsWriter::open(&path).unwrap();
        for (s, l) in [(10, 3.0), (20, 2.0), (20, 1.5), (30, 1.0), (40, f64::NAN)] {
            w.write(&line(s, l)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"loss\":null"), "{text}");
        let back = read(&path).unwrap();
        assert_eq!(
            back.iter().map(|m| m.step).collect::<Vec<_>>(),
            vec![10, 20, 30, 40]
        );
        assert_eq!(back[1].loss, 1.5);
        // A skipped step's loss reads back as NaN, and the plot skips it.
        assert!(back[3].loss.is_nan());
        let png = dir.join("loss.png");
        plot_loss(&back, "test", &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
