//! Checkpoints: `checkpoints/step-NNNNNNNN/` holding `model.safetensors` (readable parameter
//! names), `optim.safetensors` (AdamW moments), `state.json` (step, data position, counters,
//! the resolved model config) and, written last, `manifest.json` (the step and each file's size
//! and SHA-256). Each checkpoint is written into a hidden temporary folder that is renamed into
//! place, so a crash mid-write never leaves a half checkpoint that `--resume` would pick; the
//! manifest catches what a rename cannot (flipped bytes, an edited `state.json`), and resume
//! falls back to the newest older checkpoint that verifies.
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What, besides tensors, a resumed run needs to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed; the next step to run.
    pub step: u64,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    pub bad_streak: u64,
    pub seed: u64,
    /// The model config the tensors belong to (JSON of `nsa_model::ModelConfig`).
    pub model: serde_json::Value,
    pub elapsed_s: f64,
}

/// The files of a checkpoint, each checksummed in the manifest.
const FILES: [&str; 3] = ["model.safetensors", "optim.safetensors", "state.json"];
const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Manifest {
    step: u64,
    files: Vec<FileSum>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct FileSum {
    name: String,
    bytes: u64,
    sha256: String,
}

fn file_sum(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        h.update(&buf[..n]);
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((bytes, hex))
}

pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint for `state.step`; `save_tensors` writes the two safetensors files into
/// the folder it is given. Keeps the newest `keep` checkpoints, and `protect` (the last one known
/// to be good) whatever its age.
pub fn save(
    root: &Path,
    state: &TrainState,
    keep: usize,
    protect: Option<&Path>,
    save_tensors: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let name = dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    save_tensors(&tmp)?;
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    let mut files = Vec::with_capacity(FILES.len());
    for f in FILES {
        let (bytes, sha256) = file_sum(&tmp.join(f))?;
        files.push(FileSum {
            name: f.to_string(),
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        step: state.step,
        files,
    };
    std::fs::write(tmp.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))?;
    let all = list(root)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        if protect != Some(old.as_path()) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(dst)
}

/// Removes `.step-N.tmp` folders left by writes that were killed (only the writer calls this,
/// at start, before it writes checkpoints of its own).
pub fn remove_stale_temporaries(root: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for e in entries {
        let p = e?.path();
        let stale = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".step-") && n.ends_with(".tmp"));
        if stale {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("removing stale temporary {}", p.display()))?;
            println!("removed stale temporary checkpoint folder {}", p.display());
        }
    }
    Ok(())
}

/// Checkpoints under `root` (complete or not), oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for e in entries {
        let p = e?.path();
        let Some(step) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((step, p));
    }
    out.sort();
    Ok(out)
}

/// Checks one checkpoint folder against its manifest: every file present with the recorded size
/// and SHA-256, and the step of the manifest, of `state.json` and of the folder name equal.
/// Returns the state. A checkpoint written before manifests existed is accepted when complete,
/// with `unverified` set.
pub fn verify(dir: &Path, step_of_name: u64) -> Result<(TrainState, bool)> {
    let manifest_path = dir.join(MANIFEST);
    let unverified = if manifest_path.is_file() {
        let bytes = std::fs::read(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is corrupt", manifest_path.display()))?;
        ensure!(
            m.step == step_of_name,
            "checkpoint {}: its manifest says step {}",
            dir.display(),
            m.step
        );
        for f in FILES {
            let want = m.files.iter().find(|s| s.name == f).with_context(|| {
                format!(
                    "checkpoint {}: the manifest does not list {f}",
                    dir.display()
                )
            })?;
            let path = dir.join(f);
            ensure!(
                path.is_file(),
                "checkpoint {} is incomplete: {f} is missing",
                dir.display()
            );
            let (bytes, sha256) = file_sum(&path)?;
            ensure!(
                bytes == want.bytes && sha256 == want.sha256,
                "checkpoint {}: {f} does not match its checksum ({bytes} bytes, sha256 {sha256}; the manifest recorded {} bytes, sha256 {}): the file is corrupt",
                dir.display(),
                want.bytes,
                want.sha256
            );
        }
        false
    } else {
        for f in FILES {
            ensure!(
                dir.join(f).is_file(),
                "checkpoint {} is incomplete: {f} is missing",
                dir.display()
            );
        }
        true
    };
    let state = read_state(dir)?;
    ensure!(
        state.step == step_of_name,
        "checkpoint {}: state.json says step {}",
        dir.display(),
        state.step
    );
    Ok((state, unverified))
}

/// The newest checkpoint under `root` that verifies and that `load` accepts (it loads the
/// tensors and checks them finite), falling back to older ones and saying so. A clear error
/// when there is none, listing why each candidate was rejected.
pub fn load_latest_good<T>(
    root: &Path,
    mut load: impl FnMut(&Path, &TrainState) -> Result<T>,
) -> Result<(PathBuf, TrainState, T)> {
    let all = list(root)?;
    if all.is_empty() {
        bail!("no checkpoint under {} to resume from", root.display());
    }
    let mut rejected = Vec::new();
    for (step, dir) in all.into_iter().rev() {
        let attempt = verify(&dir, step).and_then(|(st, unverified)| {
            if unverified {
                println!(
                    "note:    checkpoint {} has no manifest.json (written before checksums): not verified",
                    dir.display()
                );
            }
            let t = load(&dir, &st)?;
            Ok((st, t))
        });
        match attempt {
            Ok((st, t)) => {
                if !rejected.is_empty() {
                    println!(
                        "warning: using the older checkpoint {} because newer ones failed:\n  {}",
                        dir.display(),
                        rejected.join("\n  ")
                    );
                }
                return Ok((dir, st, t));
            }
            Err(e) => rejected.push(format!("{e:#}")),
        }
    }
    bail!(
        "no usable checkpoint under {}:\n  {}",
        root.display(),
        rejected.join("\n  ")
    )
}

/// The newest checkpoint under `root` that verifies, with its state (nothing loaded).
#[cfg(test)]
pub fn latest(root: &Path) -> Result<(PathBuf, TrainState)> {
    let (dir, st, ()) = load_latest_good(root, |_, _| Ok(()))?;
    Ok((dir, st))
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            tokens_seen: step * 10,
            skipped_steps: 0,
            bad_streak: 0,
            seed: 1,
            model: serde_json::json!({"dim": 8}),
            elapsed_s: 0.0,
        }
    }

    fn touch(dir: &Path) -> Result<()> {
        std::fs::write(dir.join("model.safetensors"), b"m")?;
        std::fs::write(dir.join("optim.safetensors"), b"o")?;
        Ok(())
    }

    #[test]
    fn keeps_the_newest_and_resumes_from_the_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkpoints");
        for s in [10, 20, 30] {
            save(&root, &state(s), 2, None, touch).unwrap();
        }
        let steps: Vec<u64> = list(&root).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let (dir, st) = latest(&root).unwrap();
        assert_eq!(st, state(30));
        assert!(dir.ends_with("step-00000030"));
        // A failed write leaves the previous checkpoint as the latest, and its temporary folder
        // is removed at the next start.
        let e = save(&root, &state(40), 2, None, |_| bail!("disk full")).unwrap_err();
        assert!(e.to_string().contains("disk full"));
        assert_eq!(latest(&root).unwrap().1.step, 30);
        assert!(root.join(".step-00000040.tmp").exists());
        remove_stale_temporaries(&root).unwrap();
        assert!(!root.join(".step-00000040.tmp").exists());
        // The protected checkpoint survives rotation.
        let kept = root.join("step-00000020");
        save(&root, &state(50), 1, Some(&kept), touch).unwrap();
        let steps: Vec<u64> = list(&root).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 50]);
        std::fs::remove_dir_all(&root).unwrap();
        assert!(latest(&root)
            .unwrap_err()
            .to_string()
            .contains("no checkpoint"));
    }

    /// Each corruption of the newest checkpoint is caught by the manifest, named in the error,
    /// and resume falls back to the older checkpoint.
    #[test]
    fn corruption_is_detected_and_resume_falls_back() {
        type Damage = fn(&Path);
        let cases: [(&str, Damage, &str); 5] = [
            (
                "flipped bytes",
                |d| {
                    let p = d.join("model.safetensors");
                    let mut b = std::fs::read(&p).unwrap();
                    b[0] ^= 0xff;
                    std::fs::write(p, b).unwrap();
                },
                "does not match its checksum",
            ),
            (
                "edited step",
                |d| {
                    let p = d.join("state.json");
                    let t = std::fs::read_to_string(&p)
                        .unwrap()
                        .replace("\"step\": 30", "\"step\": 31");
                    std::fs::write(p, t).unwrap();
                },
                "state.json does not match its checksum",
            ),
            (
                "empty file",
                |d| std::fs::write(d.join("optim.safetensors"), b"").unwrap(),
                "optim.safetensors does not match",
            ),
            (
                "missing file",
                |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
                "model.safetensors is missing",
            ),
            (
                "corrupt manifest",
                |d| std::fs::write(d.join("manifest.json"), b"{").unwrap(),
                "manifest.json is corrupt",
            ),
        ];
        for (what, damage, message) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path();
            save(root, &state(20), 5, None, touch).unwrap();
            let newest = save(root, &state(30), 5, None, touch).unwrap();
            damage(&newest);
            let e = verify(&newest, 30).unwrap_err();
            assert!(format!("{e:#}").contains(message), "{what}: {e:#}");
            let (dir, st) = latest(root).unwrap();
            assert_eq!(st.step, 20, "{what}");
            assert!(dir.ends_with("step-00000020"), "{what}");
        }
        // A loader that rejects the newest (e.g. non-finite tensors) also falls back.
        let tmp = tempfile::tempdir().unwrap();
        save(tmp.path(), &state(20), 5, None, touch).unwrap();
        save(tmp.path(), &state(30), 5, None, touch).unwrap();
        let (_, st, ()) = load_latest_good(tmp.path(), |_, st| {
            ensure!(st.step != 30, "NaN in layers.0.w");
            Ok(())
        })
        .unwrap();
        assert_eq!(st.step, 20);
        let e = load_latest_good(tmp.path(), |_, _| -> Result<()> { bail!("NaN") }).unwrap_err();
        assert!(format!("{e:#}").contains("no usable checkpoint"), "{e:#}");
    }
}
