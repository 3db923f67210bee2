//! The benchmarks end to end on the CPU at small sizes, through their flags: each must finish,
//! write its table, and (`bench select`) find the vectorized outputs identical to the
//! reference's. Bad flags are typed errors. (Timings are printed, never asserted.)
use clap::Parser;
use nsa_bench::{attn, select, BenchError, Invocation};

/// A bench's flags as a command line parses them.
#[derive(Debug, Parser)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    args: A,
}

fn parse<A: clap::Args>(flags: &[&str]) -> A {
    let argv = std::iter::once("bench").chain(flags.iter().copied());
    Cli::<A>::try_parse_from(argv).unwrap().args
}

/// A host that the CPU runs never start (child processes are for CUDA measurements).
fn host() -> Invocation {
    Invocation {
        exe: "/nonexistent/nsa-train".into(),
        prefix: vec!["bench".into()],
        command_line: "nsa-train bench (test)".into(),
    }
}

/// Runs a bench on the CPU with `flags` plus `--out FILE` and returns the table it appended.
fn table_of<A: clap::Args>(
    run: impl FnOnce(A, &Invocation) -> Result<(), BenchError>,
    flags: &[&str],
) -> String {
    // Before any other libtorch call: see the workspace's note on CUDA start-up.
    nsa_sys::cuda::load_backend().expect("loading libtorch's CUDA backend");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("table.md").display().to_string();
    let mut all = vec!["--device", "cpu", "--out", &out];
    all.extend_from_slice(flags);
    run(parse(&all), &host()).unwrap();
    std::fs::read_to_string(&out).unwrap()
}

#[test]
fn select_bench_runs_and_vectorized_agrees_with_reference() {
    let table = table_of(select::run, &["--shapes", "small", "--repeats", "2"]);
    // Every timed cell is "median (min–max)" with min ≤ median ≤ max.
    let cells: Vec<Vec<f64>> = table
        .lines()
        .filter(|l| l.contains(" | reference | ") || l.contains(" | vectorized | "))
        .map(|l| {
            l.split(" | ")
                .nth(3)
                .unwrap()
                .split([' ', '(', '–', ')'])
                .filter(|x| !x.is_empty())
                .map(|x| x.parse().unwrap_or_else(|_| panic!("{l}")))
                .collect()
        })
        .collect();
    assert!(cells.len() >= 2, "{table}");
    for ms in &cells {
        assert!(ms.len() == 3 && ms[1] <= ms[0] && ms[0] <= ms[2], "{table}");
    }
    assert!(
        table.contains("### nsa-select: reference loops vs vectorized (cpu"),
        "{table}"
    );
    assert!(
        table.contains("Command: `nsa-train bench (test)`"),
        "{table}"
    );
    assert_eq!(
        table.matches("output identical to reference").count(),
        2,
        "{table}"
    );
}

#[test]
fn attn_bench_runs_every_case() {
    let flags = [
        "--seq",
        "96",
        "--dim",
        "64",
        "--dtype",
        "f32",
        "--repeats",
        "3",
    ];
    let table = table_of(attn::run, &flags);
    for case in [
        "nsa fwd",
        "nsa fwd+bwd",
        "nsa select",
        "dense fwd",
        "dense fwd+bwd",
    ] {
        let prefix = format!("| 96 | {case} | ");
        let row = table
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{case}: {table}"));
        // "median (min–max)" of the 3 runs.
        let cell = row[prefix.len()..].split(" |").next().unwrap();
        let ms: Vec<f64> = cell
            .split([' ', '(', '–', ')'])
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap_or_else(|_| panic!("{cell}: {table}")))
            .collect();
        assert!(
            ms.len() == 3 && ms[1] <= ms[0] && ms[0] <= ms[2],
            "{case}: {cell}"
        );
    }
    assert!(!table.contains("failed"), "{table}");
}

#[test]
fn bad_flags_are_flag_errors() {
    nsa_sys::cuda::load_backend().expect("loading libtorch's CUDA backend");
    for (flags, flag) in [
        (["--device", "cpu", "--repeats", "0"], "--repeats"),
        (["--device", "cpu", "--chunk", "0"], "--chunk"),
        (["--device", "tpu", "--seed", "1"], "--device"),
    ] {
        let e = select::run(parse(&flags), &host()).unwrap_err();
        assert!(
            matches!(e, BenchError::Flag(_)) && e.to_string().starts_with(flag),
            "{e}"
        );
    }
    let e = attn::run(parse(&["--device", "cpu", "--seq", "0"]), &host()).unwrap_err();
    assert!(matches!(e, BenchError::Flag(_)), "{e}");
}
