//! Opening a trained run for inference (`eval`, `generate`): its config, its model on a device,
//! and the weights of a verified checkpoint.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use nsa_model::{Model, ModelConfig};
use tch::{nn, Device};

use super::{load_model, model_config};
use crate::checkpoint;
use crate::config::{DeviceChoice, TrainConfig};

/// A run folder's model with a checkpoint's weights.
#[derive(Debug)]
pub struct LoadedRun {
    /// The run's resolved config (`config.toml`).
    pub cfg: TrainConfig,
    pub model_cfg: ModelConfig,
    pub model: Model,
    /// Holds the model's variables (dropping it would free them).
    pub vs: nn::VarStore,
    pub device: Device,
    /// The checkpoint folder the weights come from.
    pub checkpoint: PathBuf,
    /// Its training step.
    pub step: u64,
}

/// Opens `run_dir` on `device` (default: the run's `run.device`) with the newest checkpoint
/// that verifies and holds finite weights (older ones as fallback, said so), or with the
/// checkpoint `choice` names: a step number, or a checkpoint folder (as given, or inside the
/// run folder). A named checkpoint must verify; there is no fallback.
pub fn load_run(
    run_dir: &Path,
    device: Option<DeviceChoice>,
    choice: Option<&str>,
    has_gpu: bool,
) -> Result<LoadedRun> {
    ensure!(run_dir.is_dir(), "no run folder at {}", run_dir.display());
    let cfg_path = run_dir.join("config.toml");
    ensure!(
        cfg_path.is_file(),
        "{} is not a run folder: it has no config.toml",
        run_dir.display()
    );
    let cfg = crate::config::resolve(Some(&cfg_path), &[], std::iter::empty())?;
    let model_cfg = model_config(&cfg)?;
    let device = device.unwrap_or(cfg.run.device).resolve(has_gpu)?;
    let mut vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &model_cfg)?;
    let model_json = serde_json::to_value(model_cfg)?;
    let mut load = |dir: &Path, st: &checkpoint::TrainState| -> Result<()> {
        load_model(&mut vs, dir, st, &model_json)?;
        let _g = tch::no_grad_guard();
        for (name, t) in vs.variables() {
            ensure!(
                bool::try_from(t.f_isfinite()?.f_all()?)?,
                "checkpoint {} holds non-finite values in {name}",
                dir.display()
            );
        }
        Ok(())
    };
    let root = run_dir.join("checkpoints");
    let (dir, step) = match choice {
        None => {
            let (dir, st, ()) = checkpoint::load_latest_good(&root, &mut load)?;
            (dir, st.step)
        }
        Some(named) => {
            let dir = named_checkpoint(run_dir, &root, named)?;
            let step = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<u64>().ok())
                .with_context(|| {
                    format!(
                        "{} is not a checkpoint folder (step-NNNNNNNN)",
                        dir.display()
                    )
                })?;
            let (st, _) = checkpoint::verify(&dir, step)?;
            load(&dir, &st)?;
            (dir, step)
        }
    };
    Ok(LoadedRun {
        cfg,
        model_cfg,
        model,
        vs,
        device,
        checkpoint: dir,
        step,
    })
}

/// The folder `--checkpoint` names: a step number, a path, or a path inside the run folder.
fn named_checkpoint(run_dir: &Path, root: &Path, named: &str) -> Result<PathBuf> {
    let candidates = match named.parse::<u64>() {
        Ok(step) => vec![root.join(checkpoint::dir_name(step))],
        Err(_) => vec![PathBuf::from(named), run_dir.join(named), root.join(named)],
    };
    if let Some(dir) = candidates.iter().find(|d| d.is_dir()) {
        return Ok(dir.clone());
    }
    let have: Vec<String> = checkpoint::list(root)?
        .into_iter()
        .map(|(step, _)| step.to_string())
        .collect();
    bail!(
        "--checkpoint {named}: no such checkpoint in {} (steps present: {})",
        root.display(),
        if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        }
    )
}
