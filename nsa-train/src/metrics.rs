//! Metrics: one JSON line per log step (the loss-curve PNG drawn from them is [`crate::plot`]'s).
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One log step. A non-finite number (the loss of a skipped step, say) is written as `null`
/// (JSON has no NaN) and read back as NaN, so a run can always read its own metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricLine {
    pub step: u64,
    /// Tokens trained on up to this step, all ranks together (absent in older runs' lines).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens: Option<u64>,
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
    /// Model FLOPs utilisation over the log window, a fraction (absent when no peak is known:
    /// the CPU, a GPU not in `flops::peak`'s table without `run.peak_tflops`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mfu: Option<f64>,
    /// CUDA memory the logged step's forward left allocated for its backward (allocated after
    /// the loss minus before the forward, the largest micro-step), MB: the activations the
    /// model saves, which peak memory adds to weights, optimizer state and the backward's own
    /// buffers. Absent on the CPU and in older runs' lines.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub activation_mb: Option<f64>,
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

/// The bench plots register the font through here.
pub(crate) use crate::plot::register_font;

/// A metrics line for tests: the given step and losses, plausible constants elsewhere.
#[cfg(test)]
pub(crate) fn test_line(step: u64, loss: f64, eval_loss: Option<f64>) -> MetricLine {
    MetricLine {
        step,
        tokens: Some(step * 1000),
        loss,
        lr: 1e-3,
        grad_norm: 1.0,
        tokens_per_s: 100.0,
        step_ms: 10.0,
        peak_mem_mb: 0.0,
        skipped_steps: 0,
        eval_loss,
        eval_accuracy: None,
        sync_ms: None,
        mfu: None,
        activation_mb: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, loss: f64) -> MetricLine {
        test_line(step, loss, (step == 20).then_some(loss + 0.1))
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
        crate::plot::plot_loss(&back, "test", &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
