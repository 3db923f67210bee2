use super::*;
use crate::metrics::{read, test_line as line, MetricsWriter};

#[test]
fn count_labels_are_integers() {
    let cases = [
        (0, "0"),
        (20, "20"),
        (9_999, "9999"),
        (10_000, "10k"),
        (12_500, "12.5k"),
        (999_000, "999k"),
        (1_000_000, "1M"),
        (2_097_152, "2.1M"),
        (134_217_728, "134M"),
        (3_000_000_000, "3G"),
    ];
    for (v, want) in cases {
        assert_eq!(count_label(v), want, "{v}");
    }
}

#[test]
fn value_labels_have_three_significant_digits() {
    let cases = [
        (0.0, "0"),
        (2.5, "2.5"),
        (3.0, "3"),
        (10.37, "10.4"),
        (0.0123456, "0.0123"),
        (123456.0, "123456"),
        (1.5e7, "1.50e7"),
    ];
    for (v, want) in cases {
        assert_eq!(value_label(v), want, "{v}");
    }
}

#[test]
fn decades_decide_the_log_axis() {
    assert!(spans_decades(0.5, 10.0));
    assert!(!spans_decades(2.0, 10.0));
    assert!(!spans_decades(0.0, 10.0));
    let flat = [line(1, 3.0, None), line(2, 2.0, Some(2.2))];
    assert!(!loss_range(&flat).2);
    let steep = [line(1, 11.0, None), line(2, 0.05, Some(0.9))];
    let (lo, hi, log) = loss_range(&steep);
    assert!(log && lo > 0.0 && lo < 0.05 && hi > 11.0, "{lo} {hi} {log}");
}

#[test]
fn titles_fit_their_width() {
    let (short, px) = fit_title("tiny-nsa-copy", 876);
    assert_eq!((short.as_str(), px), ("tiny-nsa-copy", TITLE_PX));
    let long = format!(
        "a-very-long-run-name: {}",
        "d_model=512 heads=8 ".repeat(12)
    );
    for width in [876, 300, 40] {
        let (fitted, px) = fit_title(&long, width);
        assert!(text_width(&fitted, px) <= width, "{fitted:?} at {px}px");
        assert_eq!(px, TITLE_MIN_PX);
        assert!(fitted.contains('…'), "{fitted:?}");
    }
    let (cut, _) = fit_title(&long, 876);
    assert!(
        cut.starts_with("a-very-long-run-name") && cut.ends_with("heads=8 "),
        "{cut:?}"
    );
}

/// Renders `loss.png` from a metrics file whose title is far wider than the image and checks
/// the pixels: nothing drawn in the margins at either end of the title band.
#[test]
fn loss_png_from_a_metrics_file_keeps_its_title_inside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let mut w = MetricsWriter::open(&path).unwrap();
    for step in 1..=60u64 {
        let loss = 20.0 * (-(step as f64) / 10.0).exp() + 0.3;
        let eval = (step % 20 == 0).then_some(loss * 1.1);
        w.write(&line(step, loss, eval)).unwrap();
    }
    let lines = read(&path).unwrap();
    assert!(loss_range(&lines).2, "these losses span two decades");
    let png = dir.path().join("loss.png");
    let title = format!("run: {}", "a long model description ".repeat(8));
    plot_loss(&lines, &title, &png).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), LOSS_PLOT_SIZE);
    let (w, _) = img.dimensions();
    let band = MARGIN + TITLE_PX + 8;
    let mut inked_middle = false;
    for y in 0..band {
        for x in 0..w {
            let white = img.get_pixel(x, y).0 == [255, 255, 255];
            if x < MARGIN || x >= w - MARGIN {
                assert!(white, "title ink at ({x}, {y}), inside the margin");
            } else if !white {
                inked_middle = true;
            }
        }
    }
    assert!(inked_middle, "no title drawn");
    assert!(!dir.path().join("loss.png.tmp.png").exists());
}
