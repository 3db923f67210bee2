//! Checkpoints: `checkpoints/step-NNNNNNNN/` holding `model.safetensors` (readable parameter
//! names), `optim.safetensors` (AdamW moments), and `state.json` (step, data position, counters,
//! the resolved model config). Each is written into a hidden temporary folder that is renamed
//! into place, so a crash mid-write never leaves a half checkpoint that `--resume` would pick.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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

pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint for `state.step`; `save_tensors` writes the two safetensors files into
/// the folder it is given. Keeps the newest `keep` checkpoints.
pub fn save(
    root: &Path,
    state: &TrainState,
    keep: usize,
    save_tensors: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let name = dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    save_tensors(&tmp)?;
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))?;
    let all = list(root)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dst)
}

/// Complete checkpoints under `root`, oldest first.
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

/// The newest checkpoint under `root`, with its state; a clear error when none or corrupt.
pub fn latest(root: &Path) -> Result<(PathBuf, TrainState)> {
    let Some((_, dir)) = list(root)?.pop() else {
        bail!("no checkpoint under {} to resume from", root.display());
    };
    let state = read_state(&dir)?;
    for f in ["model.safetensors", "optim.safetensors"] {
        if !dir.join(f).is_file() {
            bail!("checkpoint {} is incomplete: {f} is missing", dir.display());
        }
    }
    Ok((dir, state))
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
        let root = std::env::temp_dir().join(format!("nsa-ckpt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for s in [10, 20, 30] {
            save(&root, &state(s), 2, touch).unwrap();
        }
        let steps: Vec<u64> = list(&root).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let (dir, st) = latest(&root).unwrap();
        assert_eq!(st, state(30));
        assert!(dir.ends_with("step-00000030"));
        // A failed write leaves the previous checkpoint as the latest.
        let e = save(&root, &state(40), 2, |_| bail!("disk full")).unwrap_err();
        assert!(e.to_string().contains("disk full"));
        assert_eq!(latest(&root).unwrap().1.step, 30);
        // Corrupt state is reported with the file named.
        std::fs::write(root.join("step-00000030/state.json"), b"{nope").unwrap();
        let e = latest(&root).unwrap_err();
        assert!(format!("{e:#}").contains("state.json is corrupt"), "{e:#}");
        std::fs::remove_dir_all(&root).unwrap();
        assert!(latest(&root)
            .unwrap_err()
            .to_string()
            .contains("no checkpoint"));
    }
}
