//! `cargo xtask corpus`: a real English corpus, fetched by package name and pinned.
//!
//! The text is the reStructuredText source of two large documentation sets that Debian ships as
//! packages (Sphinx copies each page's source into `html/_sources/`): the Linux kernel's
//! documentation (English only: `translations/` is left out; GPL-2.0) and the Python 3.11
//! documentation (PSF licence). Each `.deb` is fetched with `apt-get download NAME=VERSION` (the
//! archive's signatures are checked by apt), its SHA-256 compared with the one pinned below, and
//! unpacked with `dpkg-deb -x`; [`text::build`] strips the markup and splits the documents into
//! `train/` and `val/` by a hash of their names. Nothing here is committed: the corpus lives in
//! the (gitignored) output folder, and the tests run the text half on a fixture they write.
//!
//! Debian replaces a package version in its archive when a newer one is published; the pinned
//! version then cannot be fetched, and this command says so and what to change.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use xshell::{cmd, Shell};

pub mod text;

/// A pinned Debian package and where its documents sit inside it.
struct Package {
    name: &'static str,
    version: &'static str,
    sha256: &'static str,
    /// Short name in the output file names.
    prefix: &'static str,
    /// The folder of reStructuredText sources inside the package.
    root: &'static str,
    /// Subfolders of `root` left out.
    skip: &'static [&'static str],
    licence: &'static str,
}

const PACKAGES: [Package; 2] = [
    Package {
        name: "linux-doc-6.1",
        version: "6.1.192-3",
        sha256: "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f",
        prefix: "linux",
        root: "usr/share/doc/linux-doc-6.1/html/_sources",
        skip: &["translations"],
        licence: "GPL-2.0 (the Linux kernel's Documentation/)",
    },
    Package {
        name: "python3.11-doc",
        version: "3.11.2-6+deb12u9",
        sha256: "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
        prefix: "python",
        root: "usr/share/doc/python3.11/html/_sources",
        skip: &[],
        licence: "PSF-2.0 (the Python 3.11 documentation)",
    },
];

/// Written last into the output folder: proves a folder is ours to rebuild.
const MARKER: &str = ".nsa-corpus";

/// Documents shorter than this once stripped (index stubs, one-line pages) are left out.
const MIN_DOC_BYTES: usize = 200;

/// `cargo xtask corpus`.
pub fn run(sh: &Shell, root: &Path, out: &Path, val_permille: u32) -> Result<()> {
    let out = root.join(out);
    prepare_out(&out)?;
    let downloads = out.join(".downloads");
    let extract = out.join(".extract");
    std::fs::create_dir_all(&downloads)
        .with_context(|| format!("creating {}", downloads.display()))?;
    if extract.exists() {
        std::fs::remove_dir_all(&extract)?;
    }
    let mut sources = Vec::new();
    for p in &PACKAGES {
        let deb = fetch(sh, p, &downloads)?;
        let dir = extract.join(p.prefix);
        std::fs::create_dir_all(&dir)?;
        cmd!(sh, "dpkg-deb -x {deb} {dir}")
            .run()
            .with_context(|| format!("unpacking {}", deb.display()))?;
        let src_root = dir.join(p.root);
        ensure!(
            src_root.is_dir(),
            "{} {} has no {} folder",
            p.name,
            p.version,
            p.root
        );
        sources.push(text::Source {
            prefix: p.prefix.to_string(),
            root: src_root,
            skip: p.skip.iter().map(|s| s.to_string()).collect(),
        });
    }
    let sizes = text::build(&sources, &out, val_permille, MIN_DOC_BYTES)?;
    std::fs::remove_dir_all(&extract)?;
    let mut about = String::from("nsa corpus (cargo xtask corpus): plain text from\n");
    for p in &PACKAGES {
        about.push_str(&format!(
            "  {} {} (sha256 {}), {}\n",
            p.name, p.version, p.sha256, p.licence
        ));
    }
    about.push_str(&format!(
        "train: {} files, {} bytes; val: {} files, {} bytes (validation: {val_permille} per mille of the documents by name hash); {} short documents skipped\n",
        sizes.train_files, sizes.train_bytes, sizes.val_files, sizes.val_bytes, sizes.skipped
    ));
    std::fs::write(out.join(MARKER), &about)?;
    print!("{about}");
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "wrote {}/train ({:.1} MB) and {}/val ({:.1} MB); next: nsa-train tokenizer train {}/train --out tokenizer.json",
        out.display(),
        mb(sizes.train_bytes),
        out.display(),
        mb(sizes.val_bytes),
        out.display()
    );
    Ok(())
}

/// The output folder: new, empty, or one of ours (then its `train/` and `val/` are replaced;
/// downloads are kept).
fn prepare_out(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    // Ours: it has the marker, or holds only what an unfinished first run leaves (downloads).
    let mut entries = Vec::new();
    for e in std::fs::read_dir(out).with_context(|| format!("{} is not a folder", out.display()))? {
        entries.push(e?.file_name().to_string_lossy().into_owned());
    }
    let has_marker = out.join(MARKER).is_file();
    let unfinished = entries.iter().all(|e| e == ".downloads" || e == ".extract");
    if !has_marker && !unfinished {
        bail!(
            "{} exists and is not a corpus folder of ours (no {MARKER}): give another --out",
            out.display()
        );
    }
    if !has_marker {
        return Ok(());
    }
    std::fs::remove_file(out.join(MARKER))?;
    for split in ["train", "val"] {
        let d = out.join(split);
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    Ok(())
}

/// The package's `.deb` in `dir`, downloaded unless a copy with the pinned SHA-256 is there.
fn fetch(sh: &Shell, p: &Package, dir: &Path) -> Result<PathBuf> {
    // apt names the file NAME_VERSION_ARCH.deb with the epoch's ':' written as %3a.
    let file = dir.join(format!(
        "{}_{}_all.deb",
        p.name,
        p.version.replace(':', "%3a")
    ));
    if file.is_file() && sha256(sh, &file)? == p.sha256 {
        println!("corpus: {} {} already downloaded", p.name, p.version);
        return Ok(file);
    }
    let spec = format!("{}={}", p.name, p.version);
    let _d = sh.push_dir(dir);
    if let Err(e) = cmd!(sh, "apt-get download {spec}").run() {
        bail!(
            "apt-get download {spec} failed ({e}). If apt says the version is not found, this \
             machine's package lists may be older than the pin (a fresh machine's usually are): \
             run `apt-get update` and try again. If it is still not found, Debian has dropped \
             it: `apt-cache policy {}` shows the current version; update the pin (version and \
             the .deb's sha256) in xtask/src/corpus.rs",
            p.name
        );
    }
    ensure!(
        file.is_file(),
        "apt-get download did not write {}",
        file.display()
    );
    let got = sha256(sh, &file)?;
    ensure!(
        got == p.sha256,
        "{} has sha256 {got}, not the pinned {}: refusing to use it",
        file.display(),
        p.sha256
    );
    Ok(file)
}

fn sha256(sh: &Shell, file: &Path) -> Result<String> {
    let line = cmd!(sh, "sha256sum {file}").read()?;
    Ok(line.split_whitespace().next().unwrap_or("").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output folder is rebuilt only when it is ours; anything else is left alone.
    #[test]
    fn only_our_folders_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        prepare_out(&dir.path().join("new")).unwrap();
        let out = dir.path().join("c");
        std::fs::create_dir_all(out.join(".downloads")).unwrap();
        prepare_out(&out).unwrap();
        std::fs::create_dir_all(out.join("train")).unwrap();
        std::fs::write(out.join("train/a.txt"), "x").unwrap();
        let e = prepare_out(&out).unwrap_err().to_string();
        assert!(e.contains("not a corpus folder of ours"), "{e}");
        assert!(out.join("train/a.txt").is_file());
        std::fs::write(out.join(MARKER), "ours").unwrap();
        prepare_out(&out).unwrap();
        assert!(!out.join("train").exists() && out.join(".downloads").is_dir());
        assert!(!out.join(MARKER).exists());
    }
}
