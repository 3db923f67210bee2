//! End-to-end tests of `nsa-train generate` and `nsa-train eval --task` on the CPU: text from
//! NSA and dense runs, retrieval scored by generation (with `--inspect`), and the errors a user
//! sees for bad input.
mod common;

use std::path::Path;

use common::{err, ok, run, scratch, sets, strs, tiny};

/// A `tiny` run of 3 steps named `name` under `out`, with `extra` arguments.
fn trained(out: &Path, name: &str, extra: &[String]) -> std::path::PathBuf {
    let mut a = vec!["train".to_string()];
    a.extend(tiny(out, name, 3));
    a.extend(extra.iter().cloned());
    ok(&run(&a));
    out.join(name)
}

#[test]
fn generate_streams_text_from_nsa_and_dense_byte_runs() {
    let tmp = scratch("nsa-train-cli-generate-");
    let out = tmp.path().to_path_buf();
    let corpus = out.join("corpus.txt");
    std::fs::write(
        &corpus,
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            .repeat(40),
    )
    .unwrap();
    for attention in ["nsa", "dense"] {
        let dir = trained(
            &out,
            &format!("text-{attention}"),
            &sets(&[
                "data.source=\"text\"".into(),
                format!("data.path={:?}", corpus.display().to_string()),
                format!("model.attention=\"{attention}\""),
            ]),
        );
        let dir = dir.display().to_string();
        let greedy = strs(&[
            "generate",
            &dir,
            "--prompt",
            "The quick",
            "--max-new-tokens",
            "12",
            "--greedy",
        ]);
        let first = run(&greedy);
        let text = ok(&first);
        let stdout = String::from_utf8_lossy(&first.stdout).into_owned();
        assert!(stdout.starts_with("The quick"), "{attention}: {stdout}");
        assert!(
            text.contains("generated 12 tokens") && text.contains("tokens/s"),
            "{attention}: {text}"
        );
        assert!(text.contains("greedy") && text.contains("bytes"), "{text}");
        // Greedy output, and seeded sampling, are the same on every run.
        assert_eq!(run(&greedy).stdout, first.stdout, "{attention}");
        let sample = |seed: &str| {
            run(&strs(&[
                "generate",
                &dir,
                "--prompt",
                "Pack",
                "--max-new-tokens",
                "16",
                "--temperature",
                "1.5",
                "--top-k",
                "50",
                "--top-p",
                "0.95",
                "--seed",
                seed,
                "--checkpoint",
                "3",
            ]))
        };
        assert_eq!(sample("4").stdout, sample("4").stdout, "{attention}");
        // The context limit stops generation and says so.
        let text = ok(&run(&strs(&[
            "generate",
            &dir,
            "--prompt",
            "The quick brown fox jumps over the lazy dog. Pack my box with",
            "--max-new-tokens",
            "30",
            "--greedy",
        ])));
        assert!(
            text.contains("generated 3 tokens") && text.contains("context limit of 64"),
            "{text}"
        );
    }
}

#[test]
fn generate_names_bad_input() {
    let tmp = scratch("nsa-train-cli-generate-bad-");
    let out = tmp.path().to_path_buf();
    let dir = trained(&out, "recall", &[]).display().to_string();
    let generate = |extra: &[&str]| {
        let mut a = strs(&["generate", &dir]);
        a.extend(strs(extra));
        run(&a)
    };
    // Synthetic runs take ids and print ids.
    let o = generate(&[
        "--prompt-ids",
        "5, 6 7",
        "--max-new-tokens",
        "4",
        "--greedy",
    ]);
    ok(&o);
    let ids: Vec<i64> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!((ids.len(), &ids[..3]), (7, &[5, 6, 7][..]), "{ids:?}");
    assert!(ids.iter().all(|&i| (0..256).contains(&i)));
    for (args, needles) in [
        (&["--prompt", "hi"][..], &["--prompt-ids", "\"recall\""][..]),
        (&["--prompt-ids", " , "], &["empty"]),
        (&["--prompt-ids", "1,300"], &["token 1 is id 300", "0..256"]),
        (&["--prompt-ids", "1,x"], &["\"x\""]),
        (&[], &["give a prompt"]),
        (
            &["--prompt-ids", "1", "--temperature=-1"],
            &["--temperature"],
        ),
        (&["--prompt-ids", "1", "--top-p", "2"], &["--top-p"]),
        (
            &["--prompt-ids", "1", "--checkpoint", "99"],
            &["no such checkpoint", "3"],
        ),
        (&["--prompt-ids", "1", "--device", "tpu"], &["--device"]),
    ] {
        let e = err(&generate(args));
        for n in needles {
            assert!(e.contains(n), "{args:?}: {e}");
        }
    }
    // Past the trained context (data.seq_len = 64) only when asked for.
    let long = vec!["9"; 70].join(",");
    let e = err(&generate(&["--prompt-ids", &long]));
    assert!(
        e.contains("70 tokens") && e.contains("data.seq_len") && e.contains("--max-context"),
        "{e}"
    );
    ok(&generate(&[
        "--prompt-ids",
        &long,
        "--max-context",
        "80",
        "--max-new-tokens",
        "3",
    ]));
    // No run, or a folder that is not one.
    let e = err(&run(&strs(&[
        "generate",
        "/nonexistent/run",
        "--prompt-ids",
        "1",
    ])));
    assert!(e.contains("no run folder at /nonexistent/run"), "{e}");
    let e = err(&run(&strs(&[
        "generate",
        &out.display().to_string(),
        "--prompt-ids",
        "1",
    ])));
    assert!(e.contains("not a run folder"), "{e}");
}

#[test]
fn eval_scores_retrieval_by_generation() {
    let tmp = scratch("nsa-train-cli-eval-task-");
    let out = tmp.path().to_path_buf();
    let dir = trained(&out, "recall", &[]).display().to_string();
    let text = ok(&run(&strs(&[
        "eval",
        &dir,
        "--task",
        "needle",
        "--len",
        "40",
        "--samples",
        "6",
    ])));
    assert!(
        text.contains("Needle at length 40") && text.contains("of 6 generated answers correct"),
        "{text}"
    );
    // Recall with the run's 4 pairs: 4 answers per sequence; longer than trained.
    let text = ok(&run(&strs(&[
        "eval",
        &dir,
        "--task",
        "recall",
        "--len",
        "96",
        "--samples",
        "5",
        "--checkpoint",
        "3",
    ])));
    assert!(
        text.contains("(1.5x the trained 64)") && text.contains("of 20 generated answers"),
        "{text}"
    );
    let accuracy: f64 = text
        .split("accuracy ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{text}");
    // Accuracy by distance: a table, and JSON that compare plots.
    let json = out.join("eval.json");
    let text = ok(&run(&strs(&[
        "eval",
        &dir,
        "--task",
        "recall",
        "--len",
        "64",
        "--samples",
        "4",
        "--buckets",
        "4",
        "--json",
        &json.display().to_string(),
    ])));
    assert!(
        text.contains("| distance (tokens) | answers |") && text.contains("| 48–64 |"),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["by_distance"].as_array().unwrap().len(), 4);
    assert_eq!(report["answers"], 16);
    // The NSA run's two layers report whether they selected each answer's value block; a
    // value under 16 tokens back lies in one of the two local blocks (l' = 16), which every
    // selection holds.
    assert!(text.contains("value's block selected"), "{text}");
    let near = &report["by_distance"][0];
    let answers = near["answers"].as_i64().unwrap();
    assert!(answers > 0, "{report}");
    assert_eq!(
        near["value_block_selected"],
        serde_json::json!([answers, answers])
    );
    // ... and a selection blind to content would hold them too (forced blocks).
    assert!(text.contains("blind choice"), "{text}");
    assert_eq!(near["blind_selection_sum"].as_f64(), Some(answers as f64));
    // --inspect: the same sequences teacher forced, per layer and answer class, in the table
    // and the JSON (the run's window is 32 tokens: at 96 some pairs lie beyond it).
    let json = out.join("inspect.json");
    let text = ok(&run(&strs(&[
        "eval",
        &dir,
        "--task",
        "recall",
        "--len",
        "96",
        "--samples",
        "4",
        "--inspect",
        "--json",
        &json.display().to_string(),
    ])));
    assert!(
        text.contains("teacher forced, 4 sequences")
            && text.contains("(w = 32,")
            && text.contains("| value block: score lift |"),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let seen = &report["inspection"];
    assert_eq!(seen["layers"].as_array().unwrap().len(), 2, "{report}");
    let classes = seen["answers"].as_array().unwrap();
    let total: u64 = classes.iter().map(|a| a.as_u64().unwrap()).sum();
    assert!(total > 0 && total <= 16, "{report}");
    for layer in seen["layers"].as_array().unwrap() {
        let within = layer["within_window"]["answers"].as_u64().unwrap();
        let beyond = layer["beyond_window"]["answers"].as_u64().unwrap();
        assert_eq!(
            [within, beyond],
            [classes[0].as_u64().unwrap(), classes[1].as_u64().unwrap()]
        );
    }
    let e = err(&run(&strs(&[
        "eval",
        &dir,
        "--task",
        "needle",
        "--len",
        "40",
        "--inspect",
    ])));
    assert!(e.contains("--inspect goes with --task recall"), "{e}");
    let dense = trained(
        &out,
        "recall-dense",
        &sets(&["model.attention=\"dense\"".into()]),
    );
    let e = err(&run(&strs(&[
        "eval",
        &dense.display().to_string(),
        "--task",
        "recall",
        "--len",
        "64",
        "--inspect",
    ])));
    assert!(
        e.contains("--inspect looks inside NSA layers; this run's attention is dense"),
        "{e}"
    );
    let e = err(&run(&strs(&[
        "eval", &dir, "--task", "needle", "--len", "5",
    ])));
    assert!(e.contains("needle task needs seq_len >= 7"), "{e}");
    let bad = run(&strs(&["eval", &dir, "--task", "needle"]));
    assert_eq!(bad.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--len"));
}
