//! The run folder `<out_dir>/<name>/`: which names are allowed, how a folder proves it is one of
//! ours, and the one place that creates or replaces it.
//!
//! Why so careful: `--overwrite` deletes a folder. A name that is empty, `.`, `..`, absolute or
//! holds a separator would make `out_dir.join(name)` point at `out_dir` itself, its parent or an
//! unrelated folder. So names are a plain file-name alphabet, and a folder is only ever deleted
//! when every entry in it is something a run writes and it carries our marker file (or, for runs
//! from before the marker, our `config.toml`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The marker file every run folder carries (written first, removed last).
pub const MARKER: &str = ".nsa-run";

/// The longest run name accepted (a file name on every file system we know).
const MAX_NAME_LEN: usize = 128;

/// Checks a run name: 1 to 128 characters from `A-Z a-z 0-9 - _ . + = @ ,`, not starting with
/// `.` or `-` (no hidden folders, no `.`/`..`, nothing a shell or `rm` reads as an option).
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why: &str| -> Result<()> {
        bail!("run.name {name:?} is not a usable run folder name: {why} (allowed: 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 - _ . + = @ , not starting with . or -)")
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is too long");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it starts with . or -");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.+=@,".contains(*c)))
    {
        return bad(&format!("it holds {c:?}"));
    }
    Ok(())
}

/// Entries a run writes into its folder (`trace-steps-*.json`, hidden temporary files and the
/// marker are recognised by pattern).
const RUN_FILES: [&str; 9] = [
    "config.toml",
    crate::tokenize::run::FILE_NAME,
    "env.json",
    "metrics.jsonl",
    "loss.png",
    "summary.json",
    "summary.txt",
    "checkpoints",
    MARKER,
];

fn is_run_entry(name: &str) -> bool {
    RUN_FILES.contains(&name)
        || (name.starts_with("trace-steps-") && name.ends_with(".json"))
        // write_atomic's temporaries (`.<file>.tmp…`) and the plot's (`loss.png.tmp.png`).
        || (name.starts_with('.') && name.contains(".tmp"))
        || name == "loss.png.tmp.png"
}

/// `Ok(())` when `dir` is verifiably a run folder of ours: it holds the marker or a `config.toml`
/// the trainer can read, and nothing a run does not write. Otherwise an error that says why, so
/// the caller refuses to delete or reuse it.
pub fn verify_ours(dir: &Path) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    let mut foreign = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !is_run_entry(&name) {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        foreign.truncate(5);
        bail!(
            "{} does not look like an nsa run folder (it holds {}); refusing to delete or reuse it",
            dir.display(),
            foreign.join(", ")
        );
    }
    let has_marker = dir.join(MARKER).is_file();
    let has_config = dir.join("config.toml").is_file()
        && crate::config::resolve(Some(&dir.join("config.toml")), &[], std::iter::empty()).is_ok();
    if !has_marker && !has_config {
        bail!(
            "{} has no {MARKER} marker and no readable config.toml, so it is not verifiably an nsa run folder; refusing to delete or reuse it",
            dir.display()
        );
    }
    Ok(())
}

/// What to do with the run folder once every check has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// A fresh run: the folder must not exist, or be ours and hold no checkpoint.
    Fresh,
    /// `--overwrite`: an existing folder of ours is deleted first.
    Overwrite,
    /// `--resume`: the folder is kept.
    Resume,
}

/// The run folder for `name` under `out_dir`, checked but not touched: call this before any
/// expensive check, and [`prepare`] after the last one.
pub fn path(out_dir: &Path, name: &str, how: Prepare) -> Result<PathBuf> {
    validate_name(name)?;
    let dir = out_dir.join(name);
    if std::fs::symlink_metadata(&dir).is_err() {
        return Ok(dir);
    }
    match how {
        Prepare::Resume => {}
        Prepare::Overwrite => verify_ours(&dir)?,
        Prepare::Fresh => {
            verify_ours(&dir).with_context(|| format!("run folder {} exists", dir.display()))?;
            if !crate::checkpoint::list(&dir.join("checkpoints"))?.is_empty() {
                bail!(
                    "run folder {} exists and holds checkpoints: pass --resume to continue it, --overwrite to replace it, or set run.name",
                    dir.display()
                );
            }
        }
    }
    Ok(dir)
}

/// Creates (or, for [`Prepare::Overwrite`] and a checkpoint-less [`Prepare::Fresh`], replaces)
/// the run folder checked by [`path`], and writes the marker. Call only after every check of
/// config, data, model and resume has passed.
pub fn prepare(dir: &Path, how: Prepare) -> Result<()> {
    let exists = std::fs::symlink_metadata(dir).is_ok();
    if exists && how != Prepare::Resume {
        // Checked again right before deleting: the folder may have changed since `path`.
        verify_ours(dir)?;
        if how == Prepare::Fresh {
            println!(
                "note:    replacing {} (a run folder without checkpoints: a failed start)",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::write_atomic(&dir.join(MARKER), b"nsa run folder\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["smoke", "tiny-nsa-recall", "a.b", "x_1+y=2@z,w", "A"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "", ".", "..", "../x", "/tmp/x", "a/b", "a\\b", ".hidden", "-rf", "\"abc", "a b",
            "a\0b", "ü",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn only_our_folders_are_deleted() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path();
        // A foreign folder is never ours, with or without our files in it.
        let foreign = out.join("data");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("precious.bin"), b"x").unwrap();
        assert!(path(out, "data", Prepare::Overwrite).is_err());
        std::fs::write(foreign.join("config.toml"), b"").unwrap();
        let e = path(out, "data", Prepare::Overwrite).unwrap_err();
        assert!(format!("{e:#}").contains("precious.bin"), "{e:#}");
        assert!(foreign.join("precious.bin").exists());
        // An empty folder without marker or config is not verifiably ours either.
        std::fs::create_dir_all(out.join("empty")).unwrap();
        assert!(path(out, "empty", Prepare::Overwrite).is_err());
        // Ours: created by prepare, replaced by overwrite, reused when it has no checkpoint.
        let dir = path(out, "run", Prepare::Fresh).unwrap();
        prepare(&dir, Prepare::Fresh).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), b"").unwrap();
        assert_eq!(path(out, "run", Prepare::Fresh).unwrap(), dir);
        std::fs::create_dir_all(dir.join("checkpoints/step-00000001")).unwrap();
        let e = path(out, "run", Prepare::Fresh).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e:#}");
        path(out, "run", Prepare::Overwrite).unwrap();
        prepare(&dir, Prepare::Overwrite).unwrap();
        assert!(!dir.join("checkpoints").exists());
        assert!(dir.join(MARKER).is_file());
    }
}
