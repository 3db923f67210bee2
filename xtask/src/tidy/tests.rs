//! Each rule's checker on small in-memory inputs: one that breaks it, one that keeps it.
use super::*;

#[test]
fn code_only_blanks_comments_strings_and_chars() {
    let src = "let a = \"unsafe\"; // unsafe\n/* unsafe /* nested */ */ let b = 'u'; let q = '\\''; fn f<'a>() {}\nlet r = r#\"unsafe\"#;";
    let code = code_only(src);
    assert!(!code.contains("unsafe"), "{code}");
    assert_eq!(code.lines().count(), 3);
    assert!(code.contains("fn f<'a>() {}"));
    assert!(code.contains("let q = '  ';"), "{code}");
}

#[test]
fn unsafe_rule() {
    let bad = "fn f() {\n    unsafe { g() }\n}\nextern \"C\" { fn g(); }\n";
    let v = check_unsafe("nsa-attn/src/a.rs", bad);
    assert_eq!(v.iter().map(|x| x.line).collect::<Vec<_>>(), [2, 4]);
    assert!(check_unsafe("nsa-sys/src/a.rs", bad).is_empty());
    let clean = "#![forbid(unsafe_code)]\n// unsafe in a comment\nlet s = \"extern \\\"C\\\"\";\n";
    assert!(check_unsafe("nsa-attn/src/a.rs", clean).is_empty());
}

#[test]
fn unsafe_lint_rule() {
    let ws = "[workspace.lints.rust]\nunsafe_code = \"deny\"\n";
    let good = [(
        "a/Cargo.toml".to_string(),
        "[lints]\nworkspace = true\n".to_string(),
    )];
    let root = [(
        "a/src/lib.rs".to_string(),
        "#![forbid(unsafe_code)]\n".to_string(),
    )];
    assert!(check_unsafe_lints(ws, &good, &root).is_empty());
    let bad = [("a/Cargo.toml".to_string(), "[dependencies]\n".to_string())];
    let bad_root = [(
        "a/src/lib.rs".to_string(),
        "// #![forbid(unsafe_code)]\n".to_string(),
    )];
    assert_eq!(
        check_unsafe_lints("[workspace]\n", &bad, &bad_root).len(),
        3
    );
}

#[test]
fn env_rule() {
    let bad = "fn f() -> Option<String> {\n    std::env::var(\"X\").ok()\n}\n";
    assert_eq!(check_env("nsa-ddp/src/a.rs", bad)[0].line, 2);
    assert_eq!(check_env("nsa-train/src/steps.rs", bad).len(), 1);
    assert_eq!(
        check_env("nsa-train/src/a.rs", "use std::env::var_os;\n").len(),
        1
    );
    assert!(check_env("nsa-train/src/config.rs", bad).is_empty());
    assert!(check_env("nsa-ddp/tests/a.rs", bad).is_empty());
    let clean = "const V: &str = env!(\"CARGO_PKG_VERSION\");\n// std::env::var(\"X\")\n#[cfg(test)]\nmod tests {\n    fn t() { std::env::var(\"X\"); }\n}\n";
    assert!(check_env("nsa-ddp/src/a.rs", clean).is_empty());
}

#[test]
fn panicking_tch_rule() {
    let bad = "fn f(x: &Tensor) -> Tensor {\n    x.view([2, 2]).softmax(-1, Kind::Float)\n}\nfn g() { Tensor::zeros([1], opts); }\n";
    let v = check_panicking_tch("nsa-attn/src/a.rs", bad);
    assert_eq!(v.iter().map(|x| x.line).collect::<Vec<_>>(), [2, 2, 4]);
    assert_eq!(
        check_panicking_tch("nsa-attn/src/a.rs", "x.contiguous()\n").len(),
        1
    );
    assert_eq!(check_panicking_tch("nsa-train/src/a.rs", bad).len(), 3);
    assert!(check_panicking_tch("nsa-sys/src/a.rs", bad).is_empty());
    assert!(check_panicking_tch("xtask/src/a.rs", bad).is_empty());
    let clean = "fn f(x: &Tensor) -> Result<Tensor> {\n    // x.view([2])\n    let n: usize = v.iter().sum();\n    names.sort();\n    o.transpose()?;\n    Ok(x.f_view([2, 2])?.f_softmax(-1, Kind::Float)?)\n}\n#[cfg(test)]\nmod tests {\n    fn t() { x.view([1]); }\n}\n";
    assert!(check_panicking_tch("nsa-attn/src/a.rs", clean).is_empty());
}

#[test]
fn panicking_tch_constructor_rule() {
    let bad = "fn f(vs: &nn::Path<'_>) {
    let l = nn::linear(vs / \"w\", 4, 4, Default::default());
    let e = tch::nn::embedding(vs, 8, 4, c);
    let w = vs.var(\"w\", &[4], init);
    let z = vs.zeros(\"z\", &[4]);
    let k = vs.kaiming_uniform(\"k\", &[4, 4]);
}
use tch::nn::{linear, Linear};
";
    let v = check_panicking_tch("nsa-model/src/a.rs", bad);
    assert_eq!(
        v.iter().map(|x| x.line).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6, 8]
    );
    assert!(v[0].why.contains("f_linear"));
    let clean = "fn f(vs: &nn::Path<'_>) -> Result<(), TchError> {
    let l: nn::Linear = f_linear(&(vs / \"w\"), 4, 4, nn::LinearConfig::default())?;
    let w = vs.f_var(\"w\", &[4], init)?;
    let c = nn::LinearConfig { bias: false, ..Default::default() };
    // nn::linear(vs, 1, 1, c)
    let v = std::env::var(\"X\");
    Ok(())
}
use tch::nn::{self, Linear};
#[cfg(test)]
mod tests {
    fn t() { nn::linear(vs, 1, 1, c); }
}
";
    assert!(check_panicking_tch("nsa-model/src/a.rs", clean).is_empty());
    assert_eq!(check_panicking_tch("nsa-train/src/a.rs", bad).len(), 6);
    assert!(check_panicking_tch("nsa-sys/src/a.rs", bad).is_empty());
}

#[test]
fn link_rule() {
    let other = "# Title\n\n## Two commands\n";
    let read = |p: &str| (p == "OTHER.md").then(|| other.to_string());
    let md = "# Here\nSee [a](OTHER.md), [b](OTHER.md#two-commands), [c](#here), [w](https://x.org/y).\n```\n[not](a link)\n```\n`[code](span)`\n";
    assert!(check_links("D.md", md, &read).is_empty());
    let bad = "# Here\n[a](MISSING.md)\n[b](OTHER.md#nope)\n[c](#there)\n";
    let v = check_links("D.md", bad, &read);
    assert_eq!(v.iter().map(|x| x.line).collect::<Vec<_>>(), [2, 3, 4]);
}

#[test]
fn cli_rule() {
    let src = "#[derive(Debug, Subcommand)]\nenum Command {\n    /// doc\n    Train(TrainArgs),\n    SweepBuckets {\n        #[arg(long)]\n        out_dir: String,\n    },\n}\nstruct TrainArgs {\n    #[arg(long = \"set\", value_name = \"K\")]\n    sets: Vec<String>,\n    #[arg(long, short)]\n    nproc_per_node: usize,\n}\n";
    let cli = CliNames {
        train_flags: clap_longs(&[src]),
        train_commands: clap_subcommands(&[src]),
        xtask_commands: ["test".to_string()].into(),
    };
    assert!(cli.train_flags.contains("nproc-per-node") && cli.train_flags.contains("set"));
    assert!(cli.train_flags.contains("out-dir") && !cli.train_flags.contains("sets"));
    assert_eq!(
        cli.train_commands,
        ["sweep-buckets".to_string(), "train".to_string()].into()
    );
    let clean = "Run `nsa-train train --set a=1 --nproc-per-node 2` or `cargo xtask test`.\n```sh\ncargo run -p nsa-train -- sweep-buckets --out-dir x  # --not-a-flag\ntorchrun --no-python nsa-train train\n```\n";
    assert!(check_cli_names("R.md", clean, &cli).is_empty());
    let bad = "`nsa-train fly --set x`\n```\nnsa-train train --nope\ncargo xtask lint\n```\n";
    let v = check_cli_names("R.md", bad, &cli);
    assert_eq!(v.iter().map(|x| x.line).collect::<Vec<_>>(), [1, 3, 4]);
}

#[test]
fn length_rule() {
    let long = "x\n".repeat(MAX_LINES + 1);
    assert_eq!(check_length("nsa-attn/src/new.rs", &long).len(), 1);
    assert!(check_length("nsa-train/src/config.rs", &long).is_empty());
    assert!(check_length("nsa-attn/src/new.rs", &"x\n".repeat(MAX_LINES)).is_empty());
}

#[test]
fn test_module_files_are_found_from_their_declarations() {
    let sources = [
        (
            "nsa-attn/src/decode.rs".to_string(),
            "mod cache;\n#[cfg(test)]\nmod tests;\n// #[cfg(test)] mod commented;\n".to_string(),
        ),
        (
            "nsa-attn/src/lib.rs".to_string(),
            "#[cfg(test)] mod lib_tests ;\n#[cfg(test)]\nmod inline { }\n".to_string(),
        ),
    ];
    let found = test_module_files(&sources);
    assert!(found.contains("nsa-attn/src/decode/tests.rs"), "{found:?}");
    assert!(found.contains("nsa-attn/src/lib_tests.rs"), "{found:?}");
    assert!(
        !found
            .iter()
            .any(|f| f.contains("cache") || f.contains("commented") || f.contains("inline")),
        "{found:?}"
    );
}
