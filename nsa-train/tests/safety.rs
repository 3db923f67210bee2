//! The trainer under careless or hostile use: run names and `--overwrite`, failed starts,
//! non-finite values, corrupt checkpoints, signals, impossible sizes and small lies. Each case is
//! one a user hit (issue "Lose nothing"); each asserts that nothing outside the run is touched,
//! nothing written is lost, and the error says what to fix.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, err, ok, run, scratch, strs, tiny};

fn train(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["train".to_string()];
    a.extend(tiny(out, "tiny", steps));
    a.extend(strs(&[
        "--set",
        "run.ckpt_every=2",
        "--set",
        "fast.sdpa_audit=false",
    ]));
    a.extend(strs(extra));
    a
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn checkpoints(run: &Path) -> Vec<String> {
    entries(&run.join("checkpoints"))
}

#[test]
fn run_names_and_overwrite_never_reach_outside_the_run() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("runs");
    // Two runs and a foreign folder beside them.
    ok(&run(&train(&out, 2, &["--name", "a"])));
    ok(&run(&train(&out, 2, &["--name", "b"])));
    let foreign = out.join("data");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), b"keep me").unwrap();
    std::fs::write(root.path().join("sibling.txt"), b"keep me").unwrap();
    let before = entries(&out);

    for bad in ["", ".", "..", "../x", "/tmp", "a/b", "-rf"] {
        let flag = format!("--name={bad}");
        let e = err(&run(&train(&out, 2, &[&flag, "--overwrite"])));
        assert!(e.contains("run folder name"), "{bad:?}: {e}");
    }
    let e = err(&run(&train(
        &out,
        2,
        &["--set", "run.name=\"abc", "--overwrite"],
    )));
    assert!(e.contains("not a valid TOML value"), "{e}");
    // A folder that is not a run is never deleted, even when named.
    let e = err(&run(&train(&out, 2, &["--name", "data", "--overwrite"])));
    assert!(e.contains("does not look like an nsa run folder"), "{e}");
    assert_eq!(entries(&out), before);
    assert!(foreign.join("precious.txt").is_file());
    assert!(root.path().join("sibling.txt").is_file());
    assert!(!root.path().join("x").exists() && !root.path().join("abc").exists());

    // --overwrite with a check that fails later (missing data) keeps the old run whole.
    let ckpts = checkpoints(&out.join("a"));
    let e = err(&run(&train(
        &out,
        2,
        &[
            "--name",
            "a",
            "--overwrite",
            "--set",
            "data.source=\"bin\"",
            "--set",
            "data.path=\"/nonexistent/shards\"",
        ],
    )));
    assert!(e.contains("/nonexistent/shards"), "{e}");
    assert_eq!(checkpoints(&out.join("a")), ckpts);
    // … and with every check passing it replaces the run.
    ok(&run(&train(&out, 1, &["--name", "a", "--overwrite"])));
    assert_eq!(checkpoints(&out.join("a")), vec!["step-00000001"]);
}

#[test]
fn a_failed_start_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path();
    let bad_data = [
        "--name",
        "c",
        "--set",
        "data.source=\"bin\"",
        "--set",
        "data.path=\"/nonexistent/shards\"",
    ];
    err(&run(&train(out, 2, &bad_data)));
    assert!(
        !out.join("c").exists(),
        "a failed start wrote {:?}",
        entries(&out.join("c"))
    );
    // The corrected command needs no --overwrite.
    ok(&run(&train(out, 2, &["--name", "c"])));
    let config = std::fs::read(out.join("c/config.toml")).unwrap();
    // A rejected resume (another model) leaves config.toml as it was, so eval still works.
    let e = err(&run(&train(
        out,
        4,
        &["--name", "c", "--resume", "--set", "model.n_layers=3"],
    )));
    assert!(e.contains("another model config"), "{e}");
    assert_eq!(std::fs::read(out.join("c/config.toml")).unwrap(), config);
    ok(&run(&["eval".into(), out.join("c").display().to_string()]));
}

#[test]
fn non_finite_values_never_reach_a_checkpoint_and_metrics_stay_readable() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path();
    // Decoupled weight decay of lr·wd = 100 flips and multiplies the weights by -99 each step:
    // they overflow to infinity after about 20 steps, and every later loss is non-finite.
    let diverge = [
        "--name",
        "nan",
        "--set",
        "optim.lr=10",
        "--set",
        "optim.min_lr=10",
        "--set",
        "optim.weight_decay=10",
        "--set",
        "optim.warmup_steps=0",
        "--set",
        "optim.grad_clip=0",
        "--set",
        "run.ckpt_every=1",
        "--set",
        "run.max_bad_steps=3",
    ];
    let e = err(&run(&train(out, 200, &diverge)));
    assert!(e.contains("3 non-finite steps in a row"), "{e}");
    let good = e
        .split("the last good checkpoint is ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap_or_else(|| panic!("no checkpoint named: {e}"))
        .trim()
        .to_string();
    assert!(Path::new(&good).is_dir(), "{good}");
    // Every checkpoint kept evaluates to a finite loss: NaN state is never written, so
    // rotation never pushed the good ones out.
    let metrics = std::fs::read_to_string(out.join("nan/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"loss\":null"), "{metrics}");
    let t = ok(&run(&[
        "eval".into(),
        out.join("nan").display().to_string(),
    ]));
    let loss: f64 = t
        .split("eval loss ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{t}"));
    assert!(loss.is_finite(), "{t}");
    // A run that finishes with skipped steps reads its own metrics, writes its summary, and
    // resumes.
    let mut finish = diverge.to_vec();
    finish[1] = "nan2";
    let last = finish.len() - 1;
    finish[last] = "run.max_bad_steps=100";
    let t = ok(&run(&train(out, 24, &finish)));
    assert!(t.contains("skipped"), "{t}");
    assert!(out.join("nan2/summary.json").is_file());
    let mut more = finish.clone();
    more.push("--resume");
    ok(&run(&train(out, 25, &more)));
    // Out-of-range hyper-parameters are config errors.
    for bad in [
        "optim.eps=inf",
        "optim.lr=1e30",
        "optim.lr=nan",
        "optim.beta2=1",
    ] {
        let e = err(&run(&train(out, 2, &["--set", bad, "--dry-run"])));
        assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
    }
}

#[test]
fn corrupt_checkpoints_are_caught_and_resume_falls_back() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path();
    let a = train(out, 4, &["--name", "k", "--set", "run.keep_checkpoints=3"]);
    ok(&run(&a));
    assert_eq!(
        checkpoints(&out.join("k")),
        vec!["step-00000002", "step-00000004"]
    );
    // 64 flipped bytes in the newest checkpoint's tensor data.
    let model = out.join("k/checkpoints/step-00000004/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 64..] {
        *b ^= 0x5a;
    }
    std::fs::write(&model, bytes).unwrap();
    // A stale temporary folder from a killed write.
    std::fs::create_dir_all(out.join("k/checkpoints/.step-00000006.tmp")).unwrap();
    let mut resume = train(
        out,
        5,
        &["--name", "k", "--resume", "--set", "run.keep_checkpoints=3"],
    );
    let t = ok(&run(&resume));
    assert!(t.contains("does not match its checksum"), "{t}");
    assert!(
        t.contains("resumed from") && t.contains("step-00000002"),
        "{t}"
    );
    assert!(!out.join("k/checkpoints/.step-00000006.tmp").exists());
    // A state.json edited to another step is caught.
    let state = out.join("k/checkpoints/step-00000005/state.json");
    let edited = std::fs::read_to_string(&state)
        .unwrap()
        .replace("\"step\": 5", "\"step\": 3");
    std::fs::write(&state, edited).unwrap();
    resume = train(out, 6, &["--name", "k", "--resume"]);
    let t = ok(&run(&resume));
    assert!(t.contains("state.json does not match its checksum"), "{t}");
    // With every checkpoint damaged: a clear error listing each.
    for c in checkpoints(&out.join("k")) {
        std::fs::write(
            out.join("k/checkpoints").join(c).join("optim.safetensors"),
            b"",
        )
        .unwrap();
    }
    let e = err(&run(&train(out, 8, &["--name", "k", "--resume"])));
    assert!(e.contains("no usable checkpoint"), "{e}");
}

/// Starts a run, waits until it has written `marker` and a little longer (it is then inside
/// `what` the test set up), sends `signal` `deliveries` times 20 ms apart, and returns (exit
/// status, seconds from the first signal to exit).
fn interrupt(
    args: &[String],
    marker: &Path,
    signal: &str,
    deliveries: usize,
) -> (Option<i32>, f64) {
    let mut child = bin()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !marker.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let sent = Instant::now();
    for k in 0..deliveries {
        if k > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
    }
    let status = child.wait().unwrap();
    (status.code(), sent.elapsed().as_secs_f64())
}

#[test]
fn signals_stop_within_a_micro_step_and_exit_with_their_status() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path();
    // 10,000 micro-steps per optimizer step: the first step takes minutes, and the signal
    // is seen at the next micro-step.
    let a = train(
        out,
        1000,
        &[
            "--name",
            "int",
            "--set",
            "optim.grad_accum=10000",
            "--set",
            "run.eval_batches=1",
        ],
    );
    let (code, secs) = interrupt(&a, &out.join("int/config.toml"), "INT", 1);
    assert_eq!(code, Some(130), "SIGINT");
    assert!(
        secs < 20.0,
        "SIGINT took {secs:.1} s (the step takes minutes)"
    );
    assert_eq!(checkpoints(&out.join("int")), vec!["step-00000000"]);
    // Through our launcher: the signal is passed on to the rank, which writes its checkpoint;
    // rank and launcher exit 130.
    let l = train(
        out,
        1000,
        &[
            "--name",
            "launched",
            "--nproc-per-node",
            "1",
            "--set",
            "optim.grad_accum=10000",
            "--set",
            "run.eval_batches=1",
        ],
    );
    let (code, secs) = interrupt(&l, &out.join("launched/config.toml"), "INT", 1);
    assert_eq!(code, Some(130), "SIGINT to the launcher");
    assert!(secs < 20.0, "the launcher took {secs:.1} s");
    assert_eq!(checkpoints(&out.join("launched")), vec!["step-00000000"]);
    // SIGHUP (a closed terminal) inside a long evaluation (the one before the first step).
    let b = train(
        out,
        1000,
        &["--name", "hup", "--set", "run.eval_batches=100000"],
    );
    let (code, secs) = interrupt(&b, &out.join("hup/config.toml"), "HUP", 1);
    assert_eq!(code, Some(129), "SIGHUP");
    assert!(
        secs < 20.0,
        "SIGHUP took {secs:.1} s (the evaluation takes minutes)"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hup/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["stop_signal"], 1);
    // A resumed run continues from the checkpoint the signal wrote.
    let mut c = b.clone();
    c.extend([
        "--resume".into(),
        "--set".into(),
        "run.steps=2".into(),
        "--set".into(),
        "run.eval_batches=1".into(),
    ]);
    let t = ok(&run(&c));
    assert!(t.contains("resumed from"), "{t}");
}

#[test]
fn sigterm_saves_a_checkpoint_before_exit() {
    let tmp = common::scratch("nsa-train-cli-signal-");
    let out = tmp.path();
    let mut a = vec!["train".to_string()];
    a.extend(tiny(out, "sig", 100_000));
    // Twice, 20 ms apart, as `timeout` does (the process, then its process group): one
    // request delivered twice, not "exit at once" (which lost the checkpoint).
    let (code, _) = interrupt(&a, &out.join("sig/metrics.jsonl"), "TERM", 2);
    assert_eq!(code, Some(143), "exit status after SIGTERM");
    assert!(
        !checkpoints(&out.join("sig")).is_empty(),
        "no checkpoint written on SIGTERM"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sig/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["interrupted"], true);
}

#[test]
fn impossible_sizes_and_small_lies_are_errors() {
    let root = tempfile::tempdir().unwrap();
    let out: PathBuf = root.path().into();
    for (set, key) in [
        ("model.vocab_size=1000000000000", "model.vocab_size"),
        ("model.dim=10000000000", "model.dim"),
        ("data.seq_len=1000000000000", "data.seq_len"),
        ("data.batch_size=1000000000000", "data.batch_size"),
        ("data.batch_size=4611686018427387904", "data.batch_size"),
    ] {
        let e = err(&run(&train(&out, 2, &["--set", set])));
        assert!(e.contains(key) && e.contains("GB"), "{set}: {e}");
        assert!(
            !out.join("tiny-nsa-recall").exists(),
            "{set} wrote a run folder"
        );
    }
    let e = err(&run(&train(
        &out,
        2,
        &["--dry-run", "--set", "model.dim=0"],
    )));
    assert!(e.contains("dim"), "{e}");
    let t = ok(&run(&train(
        &out,
        2,
        &["--dry-run", "--set", "model.nsa.window=16"],
    )));
    assert!(t.contains("w 16"), "{t}");
    let e = err(&run(&train(&out, 2, &["--set", "run.eval_batches=0"])));
    assert!(e.contains("run.eval_batches"), "{e}");
    ok(&run(&train(&out, 1, &["--name", "e"])));
    let run_e = out.join("e").display().to_string();
    let e = err(&run(&strs(&["eval", &run_e, "--batches", "0"])));
    assert!(e.contains("--batches"), "{e}");
    let e = err(&run(&strs(&[
        "bench", "train", "--seq", "0", "--device", "cpu",
    ])));
    assert!(e.contains("--seq"), "{e}");
    for flag in [
        ["--batch", "0"],
        ["--seq", "1"],
        ["--branch", "nope"],
        ["--shape", "huge"],
    ] {
        let e = err(&run(&strs(&["bench", "branches", flag[0], flag[1]])));
        assert!(e.contains(flag[0]), "{flag:?}: {e}");
    }
    let bench_out = out.join("bench").display().to_string();
    let e = err(&run(&strs(&[
        "bench",
        "train",
        "--preset",
        "huge",
        "--seq",
        "64",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out-dir",
        &bench_out,
    ])));
    assert!(e.contains("failed"), "{e}");
}

#[test]
fn profile_through_the_last_step_writes_its_trace_and_exits_cleanly() {
    let tmp = scratch("nsa-train-cli-profile-");
    // Steps are numbered as logged (1 .. 3): the range ends on the run's last step, which once
    // left the profiler running and crashed the process at exit.
    let mut a = vec!["train".to_string()];
    a.extend(tiny(tmp.path(), "prof", 3));
    a.extend(strs(&["--profile", "2..3", "--nvtx"]));
    ok(&run(&a));
    let dir = tmp.path().join("prof");
    let trace = std::fs::read_to_string(dir.join("trace-steps-2-3.json")).unwrap();
    let events: serde_json::Value = serde_json::from_str(&trace).expect("a Chrome trace");
    // With --nvtx the ranges are in the trace too (user annotations), with the layer's
    // branches inside the forward: what scripts/trace_summary.py --kernel attributes kernels to.
    let ranges: Vec<&str> = events["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "user_annotation")
        .filter_map(|e| e["name"].as_str())
        .collect();
    for name in ["forward", "backward", "optimizer", "nsa.win", "nsa.slc"] {
        assert!(ranges.contains(&name), "{name} not among {ranges:?}");
    }
    // A range past the run's steps is a configuration error, before anything is written.
    let mut a = vec!["train".to_string()];
    a.extend(tiny(tmp.path(), "prof-bad", 3));
    a.extend(strs(&["--profile", "3..4"]));
    let e = err(&run(&a));
    assert!(e.contains("1 to run.steps = 3"), "{e}");
    assert!(!tmp.path().join("prof-bad").exists());
}
