//! Provisioning libtorch 2.11.0 — the version `tch =0.24.0` is built against.
//!
//! Order of preference:
//! 1. `LIBTORCH` in the environment (a libtorch folder with `include/` and `lib/`);
//! 2. an existing `.libtorch` link that already points at a good libtorch (nothing to do);
//! 3. a `python3` whose `torch` is 2.11.0 with the CXX11 ABI (its `torch/` folder is a libtorch);
//! 4. a fresh venv in `.tools/torch-venv` with the registry's `torch==2.11.0` (~4.6 GB).
//!
//! The result is the symlink `.libtorch` in the workspace root. `.cargo/config.toml` points
//! `LIBTORCH` there and the rpath of every binary and test names it, so no `LD_LIBRARY_PATH` is
//! needed. torch-sys skips its own version check for a pip layout, so we check the version
//! ourselves, from `include/torch/version.h`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::step;

pub const TORCH_VERSION: &str = "2.11.0";
const VENV: &str = ".tools/torch-venv";
const LINK: &str = ".libtorch";
/// Free space the wheel install needs (download cache plus the unpacked ~4.6 GB).
const NEEDED_GB: u64 = 10;
const VERSION_HEADERS: [&str; 3] = [
    "include/torch/headeronly/version.h",
    "include/torch/csrc/api/include/torch/version.h",
    "include/torch/version.h",
];

/// Sets up libtorch unless `.libtorch` is already good. Used by every other command.
pub fn ensure(sh: &Shell, root: &Path) -> Result<PathBuf> {
    match check_libtorch(&root.join(LINK)) {
        Ok(_) if user_libtorch(root).is_none_or(|v| same_target(root, v.as_os_str())) => {
            Ok(root.join(LINK))
        }
        _ => setup(sh, root, false),
    }
}

/// `LIBTORCH` as the user set it. `cargo xtask` itself runs under `cargo run`, which applies
/// `.cargo/config.toml`'s `[env] LIBTORCH = <root>/.libtorch`; that value is ours, not a
/// user's choice, so it does not count (on a fresh clone the link does not exist yet).
fn user_libtorch(root: &Path) -> Option<PathBuf> {
    user_choice(root, std::env::var_os("LIBTORCH"))
}

fn user_choice(root: &Path, value: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let v = PathBuf::from(value.filter(|v| !v.is_empty())?);
    (v != root.join(LINK)).then_some(v)
}

fn same_target(root: &Path, libtorch: &std::ffi::OsStr) -> bool {
    let a = std::fs::canonicalize(root.join(LINK)).ok();
    let b = std::fs::canonicalize(libtorch).ok();
    a.is_some() && a == b
}

/// The whole set-up; prints what it did. Returns the libtorch folder.
pub fn setup(sh: &Shell, root: &Path, force: bool) -> Result<PathBuf> {
    let link = root.join(LINK);
    // 1. The user's own libtorch.
    if let Some(user) = user_libtorch(root) {
        if !same_target(root, user.as_os_str()) || force {
            let version = check_libtorch(&user).with_context(|| {
                format!(
                    "LIBTORCH={} is set but is not a usable libtorch",
                    user.display()
                )
            })?;
            relink(&link, &user)?;
            println!(
                "libtorch {version}: using LIBTORCH={} (linked at {LINK})",
                user.display()
            );
            return Ok(user);
        }
    }
    // 2. Already done.
    if !force {
        if let Ok(version) = check_libtorch(&link) {
            let target = std::fs::read_link(&link).unwrap_or_default();
            println!(
                "libtorch {version} already set up at {LINK} -> {} (nothing to do)",
                target.display()
            );
            return Ok(link);
        }
    }
    // 3. A python torch of the right version.
    let python = find_python(sh)?;
    if let Some(dir) = python_torch(sh, &python) {
        if check_libtorch(&dir).is_ok() {
            relink(&link, &dir)?;
            println!(
                "libtorch {TORCH_VERSION}: using {python}'s torch at {}",
                dir.display()
            );
            return Ok(dir);
        }
    }
    // 4. A venv of our own.
    let venv = root.join(VENV);
    let venv_python = venv.join("bin/python3");
    if !venv_python.exists() {
        step(&format!("creating venv {VENV}"));
        cmd!(sh, "{python} -m venv {venv}").run().context(
            "`python3 -m venv` failed. On Debian/Ubuntu install it with `apt-get install \
             python3-venv`, or point LIBTORCH at an existing libtorch 2.11.0",
        )?;
    }
    let in_venv = python_torch(sh, &venv_python.display().to_string());
    if in_venv
        .as_deref()
        .map(check_libtorch)
        .and_then(Result::ok)
        .is_none()
    {
        check_disk_space(sh, root)?;
        step(&format!(
            "installing torch=={TORCH_VERSION} into {VENV} (about 4.6 GB: CUDA 13 wheels)"
        ));
        let spec = format!("torch=={TORCH_VERSION}");
        cmd!(
            sh,
            "{venv_python} -m pip install --disable-pip-version-check {spec}"
        )
        .run()
        .context(
            "pip could not install torch. Check network access to the package index, or \
             point LIBTORCH at an existing libtorch 2.11.0",
        )?;
    }
    let dir = python_torch(sh, &venv_python.display().to_string())
        .context("torch was installed but `import torch` fails in the venv")?;
    let version = check_libtorch(&dir)?;
    relink(&link, &dir)?;
    println!("libtorch {version} ready at {LINK} -> {}", dir.display());
    Ok(dir)
}

fn find_python(sh: &Shell) -> Result<String> {
    for p in ["python3", "python"] {
        if cmd!(sh, "{p} --version")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run()
            .is_ok()
        {
            return Ok(p.to_string());
        }
    }
    bail!(
        "no python3 found. Install Python 3 with pip and venv (e.g. `apt-get install python3 \
         python3-pip python3-venv`), or set LIBTORCH to an existing libtorch {TORCH_VERSION}"
    )
}

/// The `torch/` folder of `python`'s torch when it is 2.11.0 with the CXX11 ABI.
fn python_torch(sh: &Shell, python: &str) -> Option<PathBuf> {
    let script = "import os, torch; print(torch.__version__.split('+')[0]); \
                  print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(os.path.dirname(torch.__file__))";
    let out = cmd!(sh, "{python} -c {script}")
        .quiet()
        .ignore_stderr()
        .read()
        .ok()?;
    let mut lines = out.lines();
    let (version, abi, dir) = (lines.next()?, lines.next()?, lines.next()?);
    (version == TORCH_VERSION && abi == "1").then(|| PathBuf::from(dir))
}

/// Checks that `dir` is a libtorch 2.11.0 (headers and libraries); returns its version.
pub fn check_libtorch(dir: &Path) -> Result<String> {
    // libtorch 2.11 keeps the defines in headeronly/version.h; older layouts in version.h.
    let header = VERSION_HEADERS
        .iter()
        .map(|h| dir.join(h))
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "{} has no include/torch/**/version.h: not a libtorch folder",
                dir.display()
            )
        })?;
    let text = std::fs::read_to_string(&header)
        .with_context(|| format!("reading {}", header.display()))?;
    let field = |name: &str| -> Option<String> {
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("#define TORCH_VERSION_{name} "))
            })
            .map(|v| v.trim().to_string())
    };
    let version = match (field("MAJOR"), field("MINOR"), field("PATCH")) {
        (Some(a), Some(b), Some(c)) => format!("{a}.{b}.{c}"),
        _ => bail!("{} has no TORCH_VERSION_* defines", header.display()),
    };
    if version != TORCH_VERSION {
        bail!(
            "{} is libtorch {version}, but tch =0.24.0 needs {TORCH_VERSION}. Point LIBTORCH at \
             a {TORCH_VERSION} build, or unset it and run `cargo xtask setup` to install one",
            dir.display()
        );
    }
    for lib in ["libtorch_cpu.so", "libc10.so"] {
        if !dir.join("lib").join(lib).exists() {
            bail!(
                "{} has no lib/{lib}: not a complete libtorch",
                dir.display()
            );
        }
    }
    Ok(version)
}

fn relink(link: &Path, target: &Path) -> Result<()> {
    let target = std::fs::canonicalize(target)?;
    // Replace atomically: make the new link under a temporary name, then rename over the old.
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)
        .with_context(|| format!("creating symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, link).with_context(|| format!("replacing {}", link.display()))?;
    Ok(())
}

fn check_disk_space(sh: &Shell, root: &Path) -> Result<()> {
    let out = cmd!(sh, "df -Pk {root}")
        .quiet()
        .read()
        .context("running df")?;
    let avail_kb: u64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .context("could not read free space from df")?;
    let avail_gb = avail_kb / (1024 * 1024);
    if avail_gb < NEEDED_GB {
        bail!(
            "only {avail_gb} GB free under {}; installing torch needs about {NEEDED_GB} GB. Free \
             some space, or point LIBTORCH at an existing libtorch {TORCH_VERSION}",
            root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_libtorch(version: (u32, u32, u32), with_libs: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("include/torch/headeronly")).unwrap();
        std::fs::create_dir_all(d.path().join("lib")).unwrap();
        let (a, b, c) = version;
        std::fs::write(
            d.path().join("include/torch/headeronly/version.h"),
            format!(
                "#pragma once\n#define TORCH_VERSION_MAJOR {a}\n#define TORCH_VERSION_MINOR {b}\n\
                 #define TORCH_VERSION_PATCH {c}\n"
            ),
        )
        .unwrap();
        if with_libs {
            std::fs::write(d.path().join("lib/libtorch_cpu.so"), "").unwrap();
            std::fs::write(d.path().join("lib/libc10.so"), "").unwrap();
        }
        d
    }

    #[test]
    fn accepts_2_11_0_with_libraries() {
        let d = fake_libtorch((2, 11, 0), true);
        assert_eq!(check_libtorch(d.path()).unwrap(), "2.11.0");
    }

    #[test]
    fn rejects_wrong_version_with_advice() {
        let d = fake_libtorch((2, 10, 0), true);
        let e = check_libtorch(d.path()).unwrap_err().to_string();
        assert!(e.contains("2.10.0") && e.contains("needs 2.11.0"), "{e}");
    }

    #[test]
    fn rejects_headers_without_libraries() {
        let d = fake_libtorch((2, 11, 0), false);
        let e = check_libtorch(d.path()).unwrap_err().to_string();
        assert!(e.contains("libtorch_cpu.so"), "{e}");
    }

    #[test]
    fn rejects_a_folder_that_is_not_libtorch() {
        let d = tempfile::tempdir().unwrap();
        let e = check_libtorch(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a libtorch folder"), "{e}");
    }

    #[test]
    fn the_configs_own_libtorch_value_is_not_a_user_choice() {
        // cargo's [env] sets LIBTORCH=<root>/.libtorch for `cargo xtask`; only another value
        // is the user's.
        let root = Path::new("/some/root");
        assert_eq!(user_choice(root, Some("/some/root/.libtorch".into())), None);
        assert_eq!(user_choice(root, Some("".into())), None);
        assert_eq!(user_choice(root, None), None);
        assert_eq!(
            user_choice(root, Some("/opt/libtorch".into())),
            Some(PathBuf::from("/opt/libtorch"))
        );
    }

    #[test]
    fn relink_replaces_an_existing_link() {
        let a = fake_libtorch((2, 11, 0), true);
        let b = fake_libtorch((2, 11, 0), true);
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join(".libtorch");
        relink(&link, a.path()).unwrap();
        relink(&link, b.path()).unwrap();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            std::fs::canonicalize(b.path()).unwrap()
        );
    }
}
