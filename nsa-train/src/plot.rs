//! The run folder's `loss.png`, and the helpers every plot of the project shares: a title that
//! fits the image, integer labels on step and token axes, and a log scale once values span more
//! than a decade.
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordu64;
use plotters::prelude::*;

use crate::metrics::MetricLine;

/// Size of `loss.png`, pixels.
const LOSS_PLOT_SIZE: (u32, u32) = (900, 540);
/// Margin around the chart (and its title), pixels.
const MARGIN: u32 = 12;
/// The title's font size when it fits; it shrinks down to [`TITLE_MIN_PX`] before it is cut.
const TITLE_PX: u32 = 22;
const TITLE_MIN_PX: u32 = 13;

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

/// Width of `text` in the embedded sans-serif font at `px`, pixels (an upper bound when the
/// font cannot measure it, so a caller never draws past the edge).
fn text_width(text: &str, px: u32) -> u32 {
    register_font();
    ("sans-serif", px)
        .into_font()
        .box_size(text)
        .map_or(px * text.chars().count() as u32, |(w, _)| w)
}

/// The title and font size to draw in `width` pixels: the title unchanged at the largest size
/// from [`TITLE_PX`] down to [`TITLE_MIN_PX`] at which it fits, else cut in the middle (`…`) at
/// the smallest size, so both ends (run name, model shape) stay readable.
pub(crate) fn fit_title(title: &str, width: u32) -> (String, u32) {
    for px in (TITLE_MIN_PX..=TITLE_PX).rev() {
        if text_width(title, px) <= width {
            return (title.to_string(), px);
        }
    }
    let chars: Vec<char> = title.chars().collect();
    for keep in (0..chars.len()).rev() {
        let head = keep.div_ceil(2);
        let tail = keep / 2;
        let cut: String = chars[..head]
            .iter()
            .chain(std::iter::once(&'…'))
            .chain(&chars[chars.len() - tail..])
            .collect();
        if text_width(&cut, TITLE_MIN_PX) <= width {
            return (cut, TITLE_MIN_PX);
        }
    }
    ("…".to_string(), TITLE_MIN_PX)
}

/// Label of an integer axis (steps, tokens): exact below 10 000, else with k / M / G and at
/// most three significant digits (`12.5k`, `3M`), never a fractional step.
pub(crate) fn count_label(v: u64) -> String {
    if v < 10_000 {
        return v.to_string();
    }
    let (div, suffix) = match v {
        10_000..1_000_000 => (1e3, "k"),
        1_000_000..1_000_000_000 => (1e6, "M"),
        _ => (1e9, "G"),
    };
    let x = v as f64 / div;
    let digits = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{x:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{suffix}")
}

/// Label of a value axis (loss, tokens/s): three significant digits, no trailing zeros, no
/// exponent between 1e-3 and 1e6.
pub(crate) fn value_label(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-3..6).contains(&mag) {
        return format!("{v:.2e}");
    }
    let digits = (2 - mag).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Whether positive values from `lo` to `hi` span more than a decade (then a log axis).
pub(crate) fn spans_decades(lo: f64, hi: f64) -> bool {
    lo > 0.0 && hi / lo > 10.0
}

/// The y range of the losses: finite values only, padded 5% on a linear axis.
fn loss_range(lines: &[MetricLine]) -> (f64, f64, bool) {
    let (lo, hi) = lines
        .iter()
        .map(|l| l.loss)
        .chain(lines.iter().filter_map(|l| l.eval_loss))
        .filter(|v| v.is_finite())
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (0.0, 1.0, false);
    }
    if spans_decades(lo, hi) {
        return (lo * 0.9, hi * 1.1, true);
    }
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    };
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad, false)
}

/// Draws the training loss (a line) and the validation loss (a line through points, where
/// present) against the step on one chart; the loss axis is logarithmic when the losses span
/// more than a decade. Written through a temporary, so `out` is whole or absent.
pub fn plot_loss(lines: &[MetricLine], title: &str, out: &Path) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    register_font();
    let tmp = out.with_extension("png.tmp.png");
    let max_step = lines.iter().map(|l| l.step).max().unwrap_or(1).max(1);
    let (lo, hi, log) = loss_range(lines);
    let (title, title_px) = fit_title(title, LOSS_PLOT_SIZE.0 - 2 * MARGIN);
    {
        let root = BitMapBackend::new(&tmp, LOSS_PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&title, ("sans-serif", title_px))
            .margin(MARGIN)
            .x_label_area_size(40)
            .y_label_area_size(60);
        let chart = &mut builder;
        if log {
            draw_losses(chart, max_step, (lo..hi).log_scale(), true, lines)?;
        } else {
            draw_losses(chart, max_step, lo..hi, false, lines)?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// The chart of [`plot_loss`] for either kind of loss axis.
fn draw_losses<Y>(
    builder: &mut ChartBuilder<'_, '_, BitMapBackend<'_>>,
    max_step: u64,
    y: Y,
    log: bool,
    lines: &[MetricLine],
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let x: RangedCoordu64 = (0..max_step).into();
    let mut chart = builder
        .build_cartesian_2d(x, y)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        // plotters' light lines between log-axis labels crowd into a grey band: none there.
        .light_line_style(if log { TRANSPARENT } else { BLACK.mix(0.05) })
        .y_labels(12)
        .x_label_formatter(&|s| count_label(*s))
        .y_label_formatter(&|v| value_label(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(
            lines
                .iter()
                .filter(|l| l.loss.is_finite())
                .map(|l| (l.step, l.loss)),
            &BLUE,
        ))
        .map_err(|e| anyhow!("{e}"))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    let evals: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l.step, l.eval_loss.filter(|v| v.is_finite())?)))
        .collect();
    if !evals.is_empty() {
        chart
            .draw_series(LineSeries::new(evals.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(PointSeries::of_element(evals, 4, &RED, &|c, s, st| {
                Circle::new(c, s, st.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label("validation loss")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests;
