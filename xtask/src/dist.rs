//! `cargo xtask dist`: a relocatable bundle for GPU hosts without a Rust toolchain.
//!
//! Layout of `dist/nsa-<version>-x86_64-linux/`:
//! - `bin/nsa-train`: a launcher script that finds libtorch 2.11.0 on the host (`LIBTORCH`, or
//!   the host's python torch of that version), puts its `lib/` on `LD_LIBRARY_PATH` and execs
//! - `libexec/nsa-train`: the release binary;
//! - `README.txt`: how to run it.
//!
//! The tarball `dist/nsa-<version>-x86_64-linux.tar.gz` holds the same folder.
use std::path::Path;

use anyhow::{Context, Result};
use xshell::{cmd, Shell};

use crate::step;

const LAUNCHER: &str = include_str!("launcher.sh");

pub fn build(sh: &Shell, root: &Path, out: &Path) -> Result<()> {
    step("cargo build --release -p nsa-train");
    cmd!(sh, "cargo build --release --locked -p nsa-train").run()?;
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("nsa-{version}-x86_64-linux");
    let out = root.join(out);
    let bundle = out.join(&name);
    // Build the bundle under a temporary name and rename it into place at the end, so an
    // interrupted run never leaves a half-written bundle behind.
    let staging = out.join(format!(".{name}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("bin"))?;
    std::fs::create_dir_all(staging.join("libexec"))?;
    std::fs::copy(
        root.join("target/release/nsa-train"),
        staging.join("libexec/nsa-train"),
    )
    .context("copying target/release/nsa-train")?;
    let launcher = staging.join("bin/nsa-train");
    std::fs::write(&launcher, LAUNCHER)?;
    set_executable(&launcher)?;
    std::fs::write(staging.join("README.txt"), readme(&name))?;
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::rename(&staging, &bundle)?;
    let tarball = out.join(format!("{name}.tar.gz"));
    let tmp_tar = out.join(format!(".{name}.tar.gz.tmp"));
    cmd!(sh, "tar -C {out} -czf {tmp_tar} {name}").run()?;
    std::fs::rename(&tmp_tar, &tarball)?;
    let size = std::fs::metadata(&tarball)?.len();
    println!(
        "bundle: {}\ntarball: {} ({:.1} MB)\nrun on the GPU host: tar xzf {name}.tar.gz && \
         {name}/bin/nsa-train env",
        bundle.display(),
        tarball.display(),
        size as f64 / 1e6
    );
    Ok(())
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut perm = std::fs::metadata(path)?.permissions();
    perm.set_mode(0o755);
    std::fs::set_permissions(path, perm)?;
    Ok(())
}

fn readme(name: &str) -> String {
    format!(
        "{name}: nsa-train for x86_64 Linux hosts without a Rust toolchain.\n\n\
         Needs libtorch 2.11.0 on the host, found in this order:\n\
         1. LIBTORCH=/path/to/libtorch (a folder with include/ and lib/),\n\
         2. the torch package of `python3` (or $NSA_PYTHON) if it is version 2.11.0.\n\n\
         Run:  bin/nsa-train env      # device, CUDA/cuDNN/NCCL versions, SDPA backend\n\
         \x20     bin/nsa-train kernels  # build the GPU kernels into the cache ahead of the first run\n\
         \x20     bin/nsa-train check --gpu\n\
         \x20     bin/nsa-train --help\n"
    )
}
