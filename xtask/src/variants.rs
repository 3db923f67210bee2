//! `cargo xtask variants`: release binaries of several revisions in one folder, for an A/B run
//! on a GPU host without cargo.
//!
//! `cargo xtask variants --out .gpu main=main new=wip/x` builds `nsa-train` at each revision (a
//! detached git worktree under `target/variants/`, one shared target folder, so revisions that
//! differ in a kernel rebuild little), and writes into `OUT`:
//! - `variants.tgz`: `nsa-NAME`, each revision's stripped release binary, and `kcache/`, every
//!   binary's kernels compiled for `--arch` (one cache: its keys hash each kernel's source, so
//!   the revisions' kernels sit side by side), gzipped because the device tool carries at most
//!   64 MiB and each binary is about 15 MB;
//! - `variants.txt`: each name, the revision asked for and its commit, and how to unpack the
//!   tarball on the host (the binaries into a folder, the cache into `~/.cache/nsa/kernels`, so
//!   that no run there waits for NVRTC).
//!
//! `OUT` must be ignored by git (e.g. listed in `.git/info/exclude`), so that the device tool's
//! copy of the working tree can carry it. Everything is staged under `target/variants/` and the
//! finished folder renamed into place: an interrupted run leaves the previous `OUT` as it was.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use xshell::{cmd, Shell};

use crate::step;

/// What the device tool carries at most (its `carry` limit, the working tree included).
const CARRY_LIMIT: u64 = 64 << 20;

/// One `NAME=REV` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub rev: String,
}

/// Parses `NAME=REV` (a name of letters, digits, `-` and `_`; any git revision).
pub fn parse_variant(arg: &str) -> Result<Variant, String> {
    let (name, rev) = arg
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=REV (e.g. main=main), got {arg:?}"))?;
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(format!(
            "variant name {name:?}: use letters, digits, '-' and '_' (it names the binary nsa-NAME)"
        ));
    }
    if rev.is_empty() {
        return Err(format!("variant {name:?} names no revision"));
    }
    Ok(Variant {
        name: name.to_string(),
        rev: rev.to_string(),
    })
}

pub fn build(sh: &Shell, root: &Path, out: &Path, arch: &str, variants: &[Variant]) -> Result<()> {
    ensure!(!variants.is_empty(), "name at least one NAME=REV");
    for (i, v) in variants.iter().enumerate() {
        ensure!(
            variants[..i].iter().all(|w| w.name != v.name),
            "variant name {:?} given twice",
            v.name
        );
    }
    let out = root.join(out);
    check_ignored(sh, root, &out)?;
    let libtorch = root.join(".libtorch");
    ensure!(
        libtorch.join("lib").is_dir(),
        "{} has no lib/: run `cargo xtask setup` first",
        libtorch.display()
    );
    // Resolve every revision before building any.
    let mut commits = Vec::new();
    for v in variants {
        let rev = format!("{}^{{commit}}", v.rev);
        let commit = cmd!(sh, "git rev-parse --verify {rev}")
            .quiet()
            .read()
            .with_context(|| format!("variant {:?}: {:?} is not a revision", v.name, v.rev))?;
        commits.push(commit);
    }
    let work = root.join("target/variants");
    let target = work.join("target");
    let staging = work.join("staging");
    let finished = work.join("out");
    for dir in [&staging, &finished] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
    }
    let cache = staging.join("kcache");
    let mut listing = String::new();
    for (v, commit) in variants.iter().zip(&commits) {
        step(&format!(
            "variant {} = {} ({})",
            v.name,
            v.rev,
            &commit[..12]
        ));
        let tree = work.join(format!("wt-{}", v.name));
        let binary = build_at(sh, &tree, commit, &target, &libtorch)?;
        let dest = staging.join(format!("nsa-{}", v.name));
        std::fs::copy(&binary, &dest).with_context(|| format!("copying {}", binary.display()))?;
        cmd!(sh, "strip {dest}").run()?;
        let lib = libtorch.join("lib");
        let _env = sh.push_env("LD_LIBRARY_PATH", lib.as_os_str());
        cmd!(sh, "{dest} kernels --arch {arch} --cache-dir {cache}")
            .run()
            .with_context(|| format!("compiling variant {:?}'s kernels", v.name))?;
        listing.push_str(&format!("{} {} {commit}\n", v.name, v.rev));
    }
    cmd!(sh, "tar czf {finished}/variants.tgz -C {staging} .").run()?;
    std::fs::remove_dir_all(&staging)?;
    let rel = out.strip_prefix(root).unwrap_or(&out).display().to_string();
    listing.push_str(&format!(
        "# on the host, from the repository's root:\n\
         # mkdir -p /tmp/variants ~/.cache/nsa/kernels && tar xzf {rel}/variants.tgz -C /tmp/variants \\\n\
         #   && cp -r /tmp/variants/kcache/. ~/.cache/nsa/kernels/\n\
         # then run /tmp/variants/nsa-NAME with LD_LIBRARY_PATH at the host's torch/lib\n"
    ));
    std::fs::write(finished.join("variants.txt"), &listing)?;
    let size = folder_size(&finished)?;
    let _ = std::fs::remove_dir_all(&out);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(&finished, &out)?;
    print!("{listing}");
    println!(
        "{rel}: {:.1} MiB{}",
        size as f64 / (1u64 << 20) as f64,
        if size > CARRY_LIMIT {
            " — more than the device tool carries (64 MiB): fewer variants per call"
        } else {
            ""
        }
    );
    Ok(())
}

/// Builds `nsa-train` (release) at `commit` in a detached worktree at `tree`, into `target`;
/// returns the binary's path. The worktree is removed afterwards, also after a failed build.
fn build_at(
    sh: &Shell,
    tree: &Path,
    commit: &str,
    target: &Path,
    libtorch: &Path,
) -> Result<PathBuf> {
    let _ = cmd!(sh, "git worktree remove --force {tree}")
        .quiet()
        .ignore_stderr()
        .run();
    cmd!(sh, "git worktree add --detach --force {tree} {commit}")
        .quiet()
        .run()?;
    let built = (|| -> Result<()> {
        let tree_sh = Shell::new()?;
        tree_sh.change_dir(tree);
        let _t = tree_sh.push_env("CARGO_TARGET_DIR", target.as_os_str());
        let _l = tree_sh.push_env("LIBTORCH", libtorch.as_os_str());
        cmd!(tree_sh, "cargo build --release --locked -p nsa-train").run()?;
        Ok(())
    })();
    let removed = cmd!(sh, "git worktree remove --force {tree}").quiet().run();
    built?;
    removed?;
    Ok(target.join("release/nsa-train"))
}

/// `out` must be ignored by git: the device tool carries only ignored paths it is told of, and
/// a tracked or untracked-but-visible folder of binaries would end up in a commit.
fn check_ignored(sh: &Shell, root: &Path, out: &Path) -> Result<()> {
    let rel = out.strip_prefix(root).with_context(|| {
        format!(
            "{} is outside the repository: the device tool carries folders of the working tree",
            out.display()
        )
    })?;
    if rel.as_os_str().is_empty() {
        bail!("--out must name a folder inside the repository, not its root");
    }
    // A trailing slash: a folder that does not exist yet still matches `name/` patterns.
    let probe = format!("{}/", rel.display());
    let ignored = cmd!(sh, "git check-ignore -q {probe}")
        .quiet()
        .ignore_status()
        .output()?;
    if !ignored.status.success() {
        bail!(
            "{} is not ignored by git: add `/{}/` to .git/info/exclude first",
            rel.display(),
            rel.display()
        );
    }
    Ok(())
}

fn folder_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            folder_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_arguments_parse_or_say_why_not() {
        assert_eq!(
            parse_variant("new=wip/decode-bulk-copies"),
            Ok(Variant {
                name: "new".into(),
                rev: "wip/decode-bulk-copies".into()
            })
        );
        assert_eq!(parse_variant("a_1=HEAD~2").unwrap().rev, "HEAD~2");
        for (bad, why) in [
            ("main", "NAME=REV"),
            ("=main", "variant name"),
            ("a/b=main", "variant name"),
            ("new=", "names no revision"),
        ] {
            let err = parse_variant(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
