use super::*;
use crate::generate::retrieval::DistanceBucket;
use crate::metrics::{test_line, MetricsWriter};

/// A finished-looking run folder: config, metrics with validation every 20 steps, a summary.
fn fake_run(
    root: &Path,
    name: &str,
    attention: &str,
    seq: usize,
    base: f64,
    summary: bool,
) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[model]\npreset = \"tiny\"\nattention = \"{attention}\"\n[data]\nsource = \"bin\"\npath = \"x\"\nseq_len = {seq}\nbatch_size = 4\n"
        ),
    )
    .unwrap();
    let mut w = MetricsWriter::open(&dir.join("metrics.jsonl")).unwrap();
    for step in (10..=100u64).step_by(10) {
        let loss = base + 3.0 * (-(step as f64) / 30.0).exp();
        let eval = (step % 20 == 0).then_some(loss + 0.05);
        let mut l = test_line(step, loss, eval);
        l.tokens = Some(step * 4 * seq as u64);
        l.tokens_per_s = 1000.0 + step as f64;
        w.write(&l).unwrap();
    }
    if summary {
        std::fs::write(
            dir.join("summary.json"),
            format!(
                "{{\"eval_loss\": {}, \"tokens_per_s\": 123456.7}}",
                base + 0.06
            ),
        )
        .unwrap();
    }
    dir
}

fn report(run: &str, attention: &str, len: usize, accs: &[f64]) -> RetrievalReport {
    let w = len / accs.len();
    let by_distance: Vec<DistanceBucket> = accs
        .iter()
        .enumerate()
        .map(|(i, a)| DistanceBucket {
            from: i * w,
            to: (i + 1) * w,
            answers: 100,
            correct: (a * 100.0).round() as i64,
            value_block_selected: Vec::new(),
            blind_selection_sum: None,
        })
        .collect();
    let correct = by_distance.iter().map(|b| b.correct).sum::<i64>();
    RetrievalReport {
        run: run.into(),
        attention: attention.into(),
        task: "recall".into(),
        checkpoint_step: 100,
        len,
        trained_len: 4096,
        sequences: 64,
        answers: 100 * accs.len() as i64,
        correct,
        accuracy: correct as f64 / (100 * accs.len()) as f64,
        by_distance,
        inspection: None,
    }
}

#[test]
fn the_tables_read_as_expected() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        read_run(&fake_run(
            dir.path(),
            "small-nsa-s2048",
            "nsa",
            2048,
            4.0,
            true,
        ))
        .unwrap(),
        read_run(&fake_run(
            dir.path(),
            "small-dense-s2048",
            "dense",
            2048,
            4.2,
            false,
        ))
        .unwrap(),
    ];
    // The summary wins where there is one; else the last logged validation loss and the mean
    // logged rate.
    assert_eq!(rows[0].val_loss, Some(4.06));
    assert_eq!(rows[0].curve.len(), 5);
    assert_eq!(rows[0].curve[0].0, 20 * 4 * 2048);
    assert!((rows[1].tokens_per_s - 1055.0).abs() < 1e-9);
    insta::assert_snapshot!("runs_table", runs_table(&rows));
    let evals = vec![
        report("recall-nsa-s4096", "nsa", 8192, &[1.0, 0.97, 0.9, 0.5]),
        report("recall-dense-s4096", "dense", 8192, &[1.0, 0.99, 0.2, 0.0]),
    ];
    insta::assert_snapshot!("evals_table", evals_table(&evals));
}

/// The whole command on fake runs and an eval file: both PNGs exist with the plot's size, no
/// temporary is left, and every run's colour shows up in the plot area.
#[test]
fn compare_writes_both_plots_and_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<PathBuf> = [
        ("a-nsa", "nsa", 3.0),
        ("b-dense", "dense", 3.5),
        ("c-nsa", "nsa", 4.0),
    ]
    .iter()
    .map(|(n, att, base)| fake_run(dir.path(), n, att, 1024, *base, true))
    .collect();
    let eval = dir.path().join("eval.json");
    std::fs::write(
        &eval,
        serde_json::to_string(&report("a-nsa", "nsa", 4096, &[1.0, 0.8, 0.6, 0.4])).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("cmp");
    run(&CompareArgs {
        runs: runs.clone(),
        out: out.clone(),
        evals: vec![eval],
        title: None,
    })
    .unwrap();
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.starts_with("# a-nsa vs b-dense vs c-nsa"), "{md}");
    assert!(md.contains("val_loss.png") && md.contains("accuracy_by_distance.png"));
    for png in ["val_loss.png", "accuracy_by_distance.png"] {
        let img = image::open(out.join(png)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), PLOT_SIZE, "{png}");
        assert!(!out.join(format!("{png}.tmp.png")).exists());
    }
    let img = image::open(out.join("val_loss.png")).unwrap().to_rgb8();
    for i in 0..3 {
        let c = Palette99::pick(i).to_rgba();
        let want = [c.0, c.1, c.2];
        let count = img.pixels().filter(|p| p.0 == want).count();
        assert!(
            count > 100,
            "run {i}'s colour {want:?} drawn on {count} pixels"
        );
    }
    // A folder that is not a run is an error that says so.
    let e = run(&CompareArgs {
        runs: vec![dir.path().join("nope")],
        out,
        evals: vec![],
        title: None,
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("not a run folder"), "{e:#}");
}

/// Evaluations alone (their runs' folders gone, say on another machine): the accuracy plot and
/// table, no loss plot, and a title from the evaluated runs' names.
#[test]
fn compare_plots_evaluations_without_runs() {
    let dir = tempfile::tempdir().unwrap();
    let evals: Vec<PathBuf> = [("a-nsa", 4096), ("a-nsa", 8192), ("b-dense", 4096)]
        .iter()
        .map(|(name, len)| {
            let f = dir.path().join(format!("{name}-{len}.json"));
            let r = report(name, "nsa", *len, &[1.0, 0.5]);
            std::fs::write(&f, serde_json::to_string(&r).unwrap()).unwrap();
            f
        })
        .collect();
    let out = dir.path().join("cmp");
    run(&CompareArgs {
        runs: vec![],
        out: out.clone(),
        evals,
        title: None,
    })
    .unwrap();
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(md.starts_with("# a-nsa vs b-dense\n"), "{md}");
    assert!(
        !md.contains("final val loss") && !md.contains("val_loss.png"),
        "{md}"
    );
    assert!(
        md.contains("| a-nsa | nsa | recall | 4096 | 8192 |"),
        "{md}"
    );
    assert!(out.join("accuracy_by_distance.png").is_file());
    assert!(!out.join("val_loss.png").exists());
}

/// Values spanning decades get a log axis; accuracies keep their fixed 0..1.
#[test]
fn axis_choice_follows_the_values() {
    let dir = tempfile::tempdir().unwrap();
    let steep = [Series {
        label: "x".into(),
        points: vec![(0, 20.0), (1000, 0.5)],
    }];
    let png = dir.path().join("steep.png");
    plot_series(&steep, "steep", ("tokens", "loss"), None, &png).unwrap();
    assert!(png.is_file());
    assert!(spans_decades(0.5, 20.0));
    let empty = [Series {
        label: "none".into(),
        points: vec![],
    }];
    plot_series(&empty, "empty", ("a", "b"), None, &dir.path().join("e.png")).unwrap();
}

/// The legend goes to the corner the lines leave free.
#[test]
fn the_legend_avoids_the_lines() {
    let line = |label: &str, points: &[(u64, f64)]| Series {
        label: label.into(),
        points: points.to_vec(),
    };
    let unit = |v: f64| v;
    let corner = |series: &[Series]| legend_corner(series, 1000, unit);
    // Losses falling from the upper left to the lower right: the upper right is free.
    let falling = [line("a", &[(0, 0.95), (500, 0.3), (1000, 0.05)])];
    assert!(matches!(corner(&falling), SeriesLabelPosition::UpperRight));
    // Accuracies high everywhere: a lower corner.
    let high = [
        line("a", &[(0, 0.97), (1000, 0.99)]),
        line("b", &[(0, 0.9), (1000, 0.95)]),
    ];
    assert!(matches!(corner(&high), SeriesLabelPosition::LowerRight));
    // This session's recall plot: dense high to the middle then low, NSA high at the start then
    // low everywhere. The lower left (where the legend used to go for accuracies) hides NSA.
    let mixed = [
        line("dense", &[(0, 1.0), (500, 1.0), (600, 0.2), (1000, 0.15)]),
        line("nsa", &[(0, 0.8), (100, 0.15), (1000, 0.2)]),
        line("nsa-4x", &[(0, 0.2), (200, 0.05), (1000, 0.03)]),
    ];
    let c = corner(&mixed);
    assert!(matches!(c, SeriesLabelPosition::UpperRight), "{c:?}");
}
