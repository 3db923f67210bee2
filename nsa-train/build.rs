//! Bakes the git revision and the rustc version into the binary for the environment snapshot.
use std::process::Command;

fn output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn main() {
    let sha = output("git", &["rev-parse", "HEAD"]);
    let dirty = !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    println!(
        "cargo:rustc-env=NSA_GIT_SHA={sha}{}",
        if dirty { "-dirty" } else { "" }
    );
    println!(
        "cargo:rustc-env=NSA_RUSTC_VERSION={}",
        output(&rustc, &["--version"])
    );
    // Re-run when HEAD moves: a checkout rewrites HEAD, a commit moves a ref (loose or packed),
    // and staging changes the index (the dirty flag).
    for p in [
        "../.git/HEAD",
        "../.git/refs",
        "../.git/packed-refs",
        "../.git/index",
    ] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
