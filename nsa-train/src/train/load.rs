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
    if let Device::Cuda(i) = device {
        // The model's kernels compile in the background (or come from the disk cache) while
        // the checkpoint loads; main waits for them before the process exits.
        let _ = nsa_sys::fused::prebuild(i, model_cfg.kernel_sources());
    }
    let mut vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &model_cfg)?;
    let model_json = serde_json::to_value(model_cfg)?;
    let root = run_dir.join("checkpoints");
    let (dir, step) = match choice {
        None => load_newest(&mut vs, &root, &model_json)?,
        Some(named) => {
            let dir = named_checkpoint(run_dir, &root, named)?;
            load_folder(&mut vs, &dir, &model_json)?
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

/// Loads `model_json`'s weights from `from` into `vs` (`run.init_from`): a run folder (its
/// newest checkpoint that verifies and holds finite weights) or a checkpoint folder. Returns
/// the checkpoint folder and its step.
pub(crate) fn init_weights(
    vs: &mut nn::VarStore,
    from: &Path,
    model_json: &serde_json::Value,
) -> Result<(PathBuf, u64)> {
    if from.join("config.toml").is_file() {
        load_newest(vs, &from.join("checkpoints"), model_json)
    } else if from.is_dir() && step_of(from).is_some() {
        load_folder(vs, from, model_json)
    } else {
        bail!(
            "{} is neither a run folder (with a config.toml) nor a checkpoint folder \
             (…/checkpoints/step-NNNNNNNN)",
            from.display()
        )
    }
}

/// The newest checkpoint under `root` that verifies, loaded (older ones as fallback, said so).
fn load_newest(
    vs: &mut nn::VarStore,
    root: &Path,
    model_json: &serde_json::Value,
) -> Result<(PathBuf, u64)> {
    let (dir, st, ()) =
        checkpoint::load_latest_good(root, |dir, st| load_finite(vs, dir, st, model_json))?;
    Ok((dir, st.step))
}

/// Checkpoint folder `dir` (`step-NNNNNNNN`), verified and loaded; no fallback.
fn load_folder(
    vs: &mut nn::VarStore,
    dir: &Path,
    model_json: &serde_json::Value,
) -> Result<(PathBuf, u64)> {
    let step = step_of(dir).with_context(|| {
        format!(
            "{} is not a checkpoint folder (step-NNNNNNNN)",
            dir.display()
        )
    })?;
    let (st, _) = checkpoint::verify(dir, step)?;
    load_finite(vs, dir, &st, model_json)?;
    Ok((dir.to_path_buf(), step))
}

fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse::<u64>()
        .ok()
}

/// The checkpoint's weights into `vs`, refused when any is not finite.
fn load_finite(
    vs: &mut nn::VarStore,
    dir: &Path,
    st: &checkpoint::TrainState,
    model_json: &serde_json::Value,
) -> Result<()> {
    load_model(vs, dir, st, model_json)?;
    let _g = tch::no_grad_guard();
    for (name, t) in vs.variables() {
        ensure!(
            bool::try_from(t.f_isfinite()?.f_all()?)?,
            "checkpoint {} holds non-finite values in {name}",
            dir.display()
        );
    }
    Ok(())
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
