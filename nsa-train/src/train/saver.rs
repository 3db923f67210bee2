//! Checkpoints during a run, and which one is good to fall back to.
//!
//! A checkpoint is "good" once its weights have given a finite step: finite tensors are not
//! enough (weights about to overflow still are). The newest good one is named when the run
//! fails and is never rotated out; a checkpoint whose weights only gave non-finite steps is moved
//! aside when the run stops, out of reach of `--resume` and `eval`.
use std::path::PathBuf;

use anyhow::{Context, Result};
use tch::nn;

use super::dist::Dist;
use crate::checkpoint::{self, TrainState};
use crate::optim::AdamW;

#[derive(Debug)]
pub(super) struct Saver {
    dir: PathBuf,
    keep: usize,
    /// Only rank 0 writes.
    writer: bool,
    last_good: Option<PathBuf>,
    /// Written, not yet followed by a finite step.
    unconfirmed: Option<PathBuf>,
}

impl Saver {
    /// `resumed_from`: the checkpoint the run continues (it loaded with finite values).
    pub(super) fn new(
        dir: PathBuf,
        keep: usize,
        writer: bool,
        resumed_from: Option<PathBuf>,
    ) -> Self {
        Saver {
            dir,
            keep,
            writer,
            last_good: resumed_from,
            unconfirmed: None,
        }
    }

    /// Writes a checkpoint of `state` (every rank takes part in the checksum; rank 0 writes).
    /// Non-finite parameters or optimizer state are never written (returns `None`).
    pub(super) fn save(
        &mut self,
        state: &TrainState,
        vs: &nn::VarStore,
        opt: &AdamW,
        dist: Option<&mut Dist>,
    ) -> Result<Option<PathBuf>> {
        if let Some(d) = dist {
            // Catch a silent desync before it is written down.
            d.dp.parameter_checksum()?;
        }
        if !self.writer {
            return Ok(None);
        }
        if let Some(bad) = opt.first_non_finite()? {
            println!(
                "warning: step {}: {bad} holds non-finite values; checkpoint not written",
                state.step
            );
            return Ok(None);
        }
        let dir = checkpoint::save(
            &self.dir,
            state,
            self.keep,
            self.last_good.as_deref(),
            |dir| {
                vs.save(dir.join("model.safetensors"))
                    .context("writing model.safetensors")?;
                opt.save(&dir.join("optim.safetensors"))
            },
        )?;
        self.unconfirmed = Some(dir.clone());
        Ok(Some(dir))
    }

    /// A step was finite: the checkpoint before it is good.
    pub(super) fn confirm(&mut self) {
        if let Some(dir) = self.unconfirmed.take() {
            self.last_good = Some(dir);
        }
    }

    /// The run stops on non-finite steps: the unconfirmed checkpoint holds weights that went
    /// bad; keep it for inspection as `step-N.diverged`.
    pub(super) fn set_aside_unconfirmed(&mut self) -> Result<()> {
        if let Some(dir) = self.unconfirmed.take() {
            let aside = dir.with_extension("diverged");
            std::fs::rename(&dir, &aside).with_context(|| format!("renaming {}", dir.display()))?;
            println!(
                "checkpoint {} gave only non-finite steps; moved to {}",
                dir.display(),
                aside.display()
            );
        }
        Ok(())
    }

    /// For error messages: where to go back to.
    pub(super) fn last_good_note(&self) -> String {
        match &self.last_good {
            Some(d) => format!("the last good checkpoint is {}", d.display()),
            None => format!(
                "no good checkpoint was written under {}",
                self.dir.display()
            ),
        }
    }
}
