//! End-to-end tests of the `nsa-train` binary on the CPU: training, bit-exact resume and the
//! errors a user sees for bad input (signals are in safety.rs; generate and eval --task in
//! generate.rs).
mod common;

use std::path::Path;

use common::{err, losses, ok, run, scratch, strs, tiny};

#[test]
fn resume_continues_bit_exactly() {
    let tmp = scratch("nsa-train-cli-resume-");
    let out = tmp.path().to_path_buf();
    let mut a = vec!["train".to_string()];
    a.extend(tiny(&out, "straight", 6));
    let text = ok(&run(&a));
    assert!(text.contains("step      6"), "{text}");
    let straight = losses(&out.join("straight"));
    assert_eq!(straight.len(), 6);
    // tiny NSA at S = 64, by hand (flops.rs's tests do S = 128 step by step): matrices
    // 6·127360 = 764160; φ 6·2·(15 tokens · 18432)/64 = 51840; attention 1536 FLOPs per key
    // × (435 compressed + 2080 selected + 1552 window)/64 = 97608. No peak on the CPU: no MFU.
    let summary = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(name).join("summary.json")).unwrap())
            .unwrap()
    };
    let s = summary("straight");
    assert_eq!(s["flops_per_token"].as_f64(), Some(913_608.0), "{s}");
    assert!(s["mfu"].is_null() && s["peak"].is_null(), "{s}");
    assert!(text.contains("no MFU"), "{text}");
    let step_lines = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("step "))
            .map(String::from)
            .collect()
    };
    assert!(
        step_lines(&text).iter().all(|l| !l.contains("MFU")),
        "{text}"
    );

    // Same run with a peak given (so with an MFU), then roll back to the step-3 checkpoint as if
    // it had been interrupted there.
    let mut b = vec!["train".to_string()];
    b.extend(tiny(&out, "resumed", 6));
    let mut zero_peak = b.clone();
    zero_peak.extend(strs(&["--peak-tflops", "0"]));
    let e = err(&run(&zero_peak));
    assert!(e.contains("run.peak_tflops must be a positive"), "{e}");
    b.extend(strs(&["--peak-tflops", "0.001"]));
    let text = ok(&run(&b));
    let with_mfu = step_lines(&text);
    assert!(
        with_mfu.len() == 6
            && with_mfu
                .iter()
                .all(|l| l.contains("% ") || l.ends_with('%')),
        "{text}"
    );
    let s = summary("resumed");
    assert_eq!(s["peak"]["tflops"].as_f64(), Some(0.001), "{s}");
    assert_eq!(s["peak"]["source"].as_str(), Some("run.peak_tflops"), "{s}");
    let want = 913_608.0 * s["tokens_per_s"].as_f64().unwrap() / 1e9;
    let mfu = s["mfu"].as_f64().unwrap();
    assert!((mfu - want).abs() <= 1e-9 * want, "{mfu} vs {want}");
    let dir = out.join("resumed");
    std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
    let kept: Vec<String> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(String::from)
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), kept.join("\n") + "\n").unwrap();
    b.push("--resume".into());
    let text = ok(&run(&b));
    assert!(text.contains("resumed from"), "{text}");
    assert_eq!(
        losses(&dir),
        straight,
        "loss curve after resume differs from the uninterrupted run"
    );
    for f in [
        "config.toml",
        "env.json",
        "loss.png",
        "summary.json",
        "summary.txt",
    ] {
        assert!(dir.join(f).is_file(), "run folder lacks {f}");
    }

    // Interrupted again at step 3, then resumed with the run's name and nothing else: the run
    // folder's config.toml supplies the rest (from the default config it would train on other
    // data, with another schedule).
    std::fs::remove_dir_all(dir.join("checkpoints/step-00000006")).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), kept.join("\n") + "\n").unwrap();
    let text = ok(&run(&strs(&[
        "train",
        "--set",
        &format!("run.out_dir={:?}", out.display().to_string()),
        "--name",
        "resumed",
        "--resume",
    ])));
    assert!(
        text.contains("resuming with") && text.contains("config.toml"),
        "{text}"
    );
    assert_eq!(losses(&dir), straight, "resume from the folder's config");
}

#[test]
fn bad_input_is_named() {
    let tmp = scratch("nsa-train-cli-bad-");
    let out = tmp.path().to_path_buf();
    let e = err(&run(&strs(&["train", "--set", "optim.lrr=1", "--dry-run"])));
    assert!(e.contains("lrr"), "{e}");
    let e = err(&run(&strs(&[
        "train",
        "--set",
        "model.dimm=3",
        "--steps",
        "1",
    ])));
    assert!(e.contains("dimm"), "{e}");
    let huge = run(&strs(&[
        "train",
        "--set",
        "model.preset=\"huge\"",
        "--steps",
        "1",
    ]));
    let e = err(&huge);
    assert!(e.contains("huge") && e.contains("tiny"), "{e}");
    // A model config that cannot be built fails before the config dump, not after it.
    let stdout = String::from_utf8_lossy(&huge.stdout);
    assert!(!stdout.contains("resolved config"), "{stdout}");
    // A benchmark on a device this machine lacks stops once, before any configuration runs.
    let e = err(&run(&strs(&[
        "bench", "train", "--device", "cuda", "--steps", "1",
    ])));
    assert!(e.contains("--device cuda needs a GPU"), "{e}");
    let e = err(&run(&strs(&[
        "bench", "attn", "--path", "fused", "--seq", "64",
    ])));
    assert!(e.contains("--path fused times the CUDA kernels"), "{e}");
    let cfg = out.join("bad.toml");
    std::fs::write(
        &cfg,
        "[data]\nsource = \"bin\"\npath = \"/nonexistent/shards\"\n",
    )
    .unwrap();
    let e = err(&run(&[
        "train".into(),
        "--config".into(),
        cfg.display().to_string(),
        "--set".into(),
        format!("run.out_dir={:?}", out.display().to_string()),
    ]));
    assert!(e.contains("/nonexistent/shards"), "{e}");

    // An existing run folder is never silently overwritten, and a corrupt checkpoint is named.
    let mut a = vec!["train".to_string()];
    a.extend(tiny(&out, "exists", 3));
    ok(&run(&a));
    let e = err(&run(&a));
    assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    std::fs::write(
        out.join("exists/checkpoints/step-00000003/state.json"),
        b"garbage",
    )
    .unwrap();
    a.push("--resume".into());
    let e = err(&run(&a));
    assert!(e.contains("state.json does not match its checksum"), "{e}");
    // A checkpoint of another model is refused with both configs shown.
    std::fs::remove_dir_all(out.join("exists")).unwrap();
    let mut b = vec!["train".to_string()];
    b.extend(tiny(&out, "exists", 3));
    ok(&run(&b));
    b.extend(["--resume".into(), "--set".into(), "model.n_layers=3".into()]);
    let e = err(&run(&b));
    assert!(e.contains("another model config"), "{e}");
}

#[test]
fn data_parallel_world_size_one_matches_a_plain_run() {
    let tmp = scratch("nsa-train-cli-ddp1-");
    let out = tmp.path().to_path_buf();
    let mut plain = vec!["train".to_string()];
    plain.extend(tiny(&out, "plain", 4));
    ok(&run(&plain));
    // One rank through the launcher and the in-process backend, gradients packed into small
    // buckets: the same losses to the bit, and a sync time in every metrics line.
    let mut ddp = vec!["train".to_string(), "--nproc-per-node".into(), "1".into()];
    ddp.extend(tiny(&out, "ddp", 4));
    ddp.extend(["--set".into(), "fast.ddp_bucket_mb=0.05".into()]);
    let text = ok(&run(&ddp));
    assert!(text.contains("launched 1 rank"), "{text}");
    assert_eq!(losses(&out.join("ddp")), losses(&out.join("plain")));
    let metrics = std::fs::read_to_string(out.join("ddp/metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().all(|l| l.contains("\"sync_ms\"")),
        "{metrics}"
    );
    assert!(
        text.contains("all-reduce overlapped with backward"),
        "{text}"
    );
    // The fallback (all-reduce after backward) gives the same losses too.
    let mut after = vec!["train".to_string(), "--nproc-per-node".into(), "1".into()];
    after.extend(tiny(&out, "ddp-after", 4));
    after.extend(["--set".into(), "fast.ddp_bucket_mb=0.05".into()]);
    after.extend(["--set".into(), "fast.ddp_overlap=false".into()]);
    let text = ok(&run(&after));
    assert!(text.contains("all-reduce after backward"), "{text}");
    assert_eq!(losses(&out.join("ddp-after")), losses(&out.join("plain")));
    // Several processes need NCCL, which the CPU does not have: a clear error, not a hang.
    let mut two = vec!["train".to_string(), "--nproc-per-node".into(), "2".into()];
    two.extend(tiny(&out, "two", 2));
    let e = err(&run(&two));
    assert!(e.contains("needs CUDA GPUs"), "{e}");
    let smoke = [
        "smoke".to_string(),
        "--device".into(),
        "cpu".into(),
        "--nproc-per-node".into(),
        "2".into(),
        "--steps".into(),
        "1".into(),
        "--set".into(),
        format!("run.out_dir={:?}", out.display().to_string()),
    ];
    let e = err(&run(&smoke));
    assert!(e.contains("needs CUDA GPUs"), "{e}");
}

/// A tiny run trained for 3 steps on `source` (`--set` pairs appended), in `out/name`.
/// Real text end to end: train a tokenizer on a text folder, tokenize the folder into shards
/// (the first 500 tokens into `val/`), then train on the `train/` shards with the `bin` source.
#[test]
fn tokenizer_prepare_and_train_on_text() {
    let tmp = common::scratch("nsa-train-cli-text-");
    let out = tmp.path().to_path_buf();
    let corpus = out.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let line =
        "Native sparse attention selects blocks of keys, compresses the rest and keeps a window.\n";
    std::fs::write(corpus.join("a.txt"), line.repeat(200)).unwrap();
    std::fs::write(corpus.join("b.txt"), line.to_uppercase().repeat(100)).unwrap();
    let tok = out.join("tokenizer.json");
    let p = |p: &Path| p.display().to_string();
    let text = ok(&run(&strs(&[
        "tokenizer",
        "train",
        &p(&corpus),
        "--vocab-size",
        "300",
        "--out",
        &p(&tok),
    ])));
    assert!(text.contains("wrote") && tok.is_file(), "{text}");
    let e = err(&run(&strs(&[
        "tokenizer",
        "train",
        &p(&corpus),
        "--vocab-size",
        "100",
    ])));
    assert!(e.contains("--vocab-size 100"), "{e}");
    let shards = out.join("shards");
    let prepare = strs(&[
        "prepare",
        &p(&corpus),
        "--tokenizer",
        &p(&tok),
        "--out",
        &p(&shards),
    ]);
    let sizes = strs(&["--val-tokens", "500", "--shard-tokens", "2000"]);
    let text = ok(&run(&[prepare.clone(), sizes].concat()));
    assert!(text.contains("500 validation tokens"), "{text}");
    assert!(shards.join("val/shard_000000.bin").is_file());
    assert!(shards.join("train/shard_000001.bin").is_file(), "{text}");
    let e = err(&run(&prepare));
    assert!(e.contains("is not empty"), "{e}");
    let mut a = strs(&["train"]);
    a.extend(common::tiny(&out, "text", 3));
    a.extend(strs(&[
        "--set",
        "data.source=\"bin\"",
        "--set",
        &format!("data.path={:?}", p(&shards.join("train"))),
        "--set",
        "model.vocab_size=300",
    ]));
    let text = ok(&run(&a));
    assert!(text.contains("step      3"), "{text}");
    // The prepared folder itself: training reads train/, evaluation val/, and the run records
    // the tokenizer, so generate takes text and prints text.
    let mut a = strs(&["train"]);
    a.extend(common::tiny(&out, "text2", 3));
    a.extend(strs(&[
        "--set",
        "data.source=\"bin\"",
        "--set",
        &format!("data.path={:?}", p(&shards)),
        "--set",
        &format!("data.tokenizer={:?}", p(&tok)),
        "--set",
        "model.vocab_size=300",
    ]));
    let text = ok(&run(&a));
    assert!(
        text.contains("/shards/train: 8 files") && text.contains("/shards/val: 1 files"),
        "{text}"
    );
    let run_dir = out.join("text2");
    assert_eq!(
        std::fs::read(run_dir.join("tokenizer.json")).unwrap(),
        std::fs::read(&tok).unwrap()
    );
    let o = run(&strs(&[
        "generate",
        &p(&run_dir),
        "--prompt",
        "Native sparse",
        "--max-new-tokens",
        "5",
        "--greedy",
    ]));
    let said = ok(&o);
    assert!(said.starts_with("Native sparse"), "{said}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("tokenizer.json (300 tokens)"));
    // A tokenizer with a byte-level source, or one too large for the model, is refused.
    let mut a = strs(&["train"]);
    a.extend(common::tiny(&out, "text3", 3));
    a.extend(strs(&[
        "--set",
        "data.source=\"text\"",
        "--set",
        &format!("data.path={:?}", p(&corpus)),
        "--set",
        &format!("data.tokenizer={:?}", p(&tok)),
    ]));
    let e = err(&run(&a));
    assert!(
        e.contains("data.tokenizer goes with data.source = \"bin\""),
        "{e}"
    );
    let compare_out = out.join("cmp");
    let text = ok(&run(&strs(&[
        "compare",
        &p(&run_dir),
        &p(&out.join("text")),
        "--out",
        &p(&compare_out),
    ])));
    assert!(text.contains("| text2 | nsa | 64 | 3 |"), "{text}");
    assert!(compare_out.join("compare.md").is_file());
}

/// `check --determinism` on the CPU (the machinery; the GPU is where it matters): two runs with
/// `run.deterministic = true` agree bit for bit, the run resumed from its mid checkpoint equals
/// the uninterrupted one, and the table and verdict are printed. Bad arguments are errors.
#[test]
fn determinism_check_compares_runs_and_a_resume() {
    let quick = strs(&[
        "check",
        "--determinism",
        "--device",
        "cpu",
        "--presets",
        "tiny",
        "--steps",
        "4",
        "--resume-at",
        "2",
        "--set",
        "data.seq_len=64",
        "--set",
        "data.batch_size=4",
        "--set",
        "data.source=\"recall\"",
        "--set",
        "data.recall_pairs=4",
    ]);
    let text = ok(&run(&quick));
    for want in [
        "| tiny: two runs, deterministic | 4 | yes |",
        "| tiny: resumed at step 2 vs uninterrupted, deterministic | 2 | yes |",
        "| tiny: activation recomputation vs plain, deterministic | 4 | yes |",
        "| tiny | ",
        "determinism: passed",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let mut late = quick.clone();
    let at = late.iter().position(|a| a == "--resume-at").unwrap();
    late[at + 1] = "4".into();
    assert!(err(&run(&late)).contains("--resume-at"));
    // clap's usage error (exit status 2) names the flags that say what to check.
    let none = run(&strs(&["check"]));
    assert_eq!(none.status.code(), Some(2));
    assert!(
        common::text(&none).contains("--gpu"),
        "{}",
        common::text(&none)
    );
    // `--part` names parts of `--gpu` (kernels, decode or a family of the kernel rows), and
    // only with it.
    for bad in [
        strs(&["check", "--gpu", "--part", "attention"]),
        strs(&["check", "--gpu", "--part", "selected,attention"]),
        strs(&["check", "--determinism", "--part", "decode"]),
    ] {
        let out = run(&bad);
        assert_eq!(out.status.code(), Some(2), "{}", common::text(&out));
    }
    // A family is accepted; without a GPU the check then stops with the reason, not a usage
    // error.
    let cpu = run(&strs(&["check", "--gpu", "--part", "selected,layer"]));
    assert_eq!(cpu.status.code(), Some(1), "{}", common::text(&cpu));
    assert!(
        common::text(&cpu).contains("check --gpu compares the fused kernels on a CUDA device"),
        "{}",
        common::text(&cpu)
    );
}

#[test]
fn init_from_starts_from_another_runs_weights() {
    let tmp = scratch("nsa-train-cli-init-");
    let out = tmp.path();
    let summary = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(name).join("summary.json")).unwrap())
            .unwrap()
    };
    let train = |name: &str, extra: &[String]| -> std::process::Output {
        let mut a = vec!["train".to_string()];
        a.extend(tiny(out, name, 6));
        a.extend(extra.iter().cloned());
        run(&a)
    };
    let from = |path: &Path| -> Vec<String> {
        strs(&[
            "--set",
            &format!("run.init_from={:?}", path.display().to_string()),
        ])
    };
    ok(&train("base", &[]));
    let base = summary("base");
    let fresh = summary("base")["initial_eval_loss"].as_f64().unwrap();

    // From the run folder: the base's final weights, evaluated on the same held-out batches
    // before the first step, give the base's final held-out loss bit for bit.
    let text = ok(&train("warm", &from(&out.join("base"))));
    assert!(text.contains("initialised from"), "{text}");
    let warm = summary("warm");
    assert_eq!(
        warm["initial_eval_loss"].as_f64().unwrap().to_bits(),
        base["eval_loss"].as_f64().unwrap().to_bits(),
        "{warm} vs {base}"
    );
    assert_ne!(warm["initial_eval_loss"].as_f64(), Some(fresh));
    assert_eq!(warm["steps"].as_u64(), Some(6), "{warm}");

    // From a checkpoint folder: the weights of step 3, neither the fresh ones nor the final.
    ok(&train(
        "from-step-3",
        &from(&out.join("base/checkpoints/step-00000003")),
    ));
    let mid = summary("from-step-3")["initial_eval_loss"]
        .as_f64()
        .unwrap();
    assert!(
        mid != fresh && mid != base["eval_loss"].as_f64().unwrap(),
        "{mid}"
    );

    // Bad sources: nothing there, and another model's weights.
    let e = err(&train("none", &from(&out.join("no-such-run"))));
    assert!(
        e.contains("run.init_from") && e.contains("neither a run folder"),
        "{e}"
    );
    assert!(
        !out.join("none").exists(),
        "a failed start wrote its run folder"
    );
    let mut dense = from(&out.join("base"));
    dense.extend(strs(&["--set", "model.attention=\"dense\""]));
    let e = err(&train("dense", &dense));
    assert!(e.contains("another model config"), "{e}");
}
