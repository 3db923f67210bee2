//! The training loop, in three stages:
//!
//! 1. [`session`]: every check and every build before the first step (config, sizes, run-folder
//!    plan, data, model and optimizer, resume, data-parallel group); only then is the run folder
//!    created and written.
//! 2. [`steps`]: the step loop (micro-steps, gradient sync, guard, update, evaluation, metrics,
//!    checkpoints through [`saver`], stop requests).
//! 3. [`train`]'s end: the final checkpoint and evaluation, the plot and the summary.
//!
//! Beside them: [`eval`] (held-out evaluation, `nsa-train eval`, the backend audit) and
//! [`dist`] (the data-parallel side).
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use nsa_attn::ForwardOpts;
use nsa_model::ModelConfig;
use serde::Serialize;
use tch::{nn, Device};

use crate::checkpoint::TrainState;
use crate::config::{DeviceChoice, DistEnv, TrainConfig};
use crate::metrics;
use crate::signals::StopRequest;

mod dist;
mod eval;
mod load;
mod saver;
mod session;
mod steps;

pub use eval::eval_run;
pub use load::{load_run, LoadedRun};
use session::Session;

/// Options that are not part of the run's config (how to start, not what to train).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Continue from the latest checkpoint of the run folder.
    pub resume: bool,
    /// Replace an existing run folder of the same name.
    pub overwrite: bool,
    /// Draw a progress bar (off in tests and when stdout is not a terminal).
    pub progress: bool,
    /// This process's place in a data-parallel run (`None`: a plain single-process run).
    pub dist: Option<DistEnv>,
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub model: String,
    pub parameters: i64,
    pub device: String,
    pub precision: String,
    pub steps: u64,
    pub first_loss: f64,
    pub last_loss: f64,
    pub skipped_steps: u64,
    pub tokens_per_s: f64,
    /// Model FLOPs per trained token at the run's sequence length (`flops` module docs).
    pub flops_per_token: f64,
    /// The peak the MFU is measured against (one device), absent when none is known.
    pub peak: Option<crate::flops::Peak>,
    /// `flops_per_token × tokens_per_s / (peak × devices)`, absent without a peak.
    pub mfu: Option<f64>,
    pub peak_mem_mb: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    /// Held-out loss and answer accuracy before the first step (NaN on a resumed run).
    pub initial_eval_loss: f64,
    pub initial_eval_accuracy: f64,
    pub interrupted: bool,
    /// The signal that stopped the run early (the process then exits with 128 + it).
    pub stop_signal: Option<i32>,
    pub sdpa_audit: Vec<String>,
}

/// `run.device` as a libtorch device; an error that names the key when it asks for a GPU and
/// none is visible.
pub fn parse_device(choice: DeviceChoice, has_gpu: bool) -> Result<Device> {
    choice
        .resolve(has_gpu)
        .map_err(|e| anyhow::anyhow!("run.device = {e}"))
}

/// The model config: the preset named in `[model]`, with every other `[model]` key applied.
pub fn model_config(cfg: &TrainConfig) -> Result<ModelConfig> {
    let mut table = cfg.model.clone();
    let preset = match table.remove("preset") {
        Some(toml::Value::String(s)) => s,
        Some(other) => bail!("model.preset must be a string (got {other})"),
        None => "tiny".to_string(),
    };
    let base = ModelConfig::preset(&preset)?;
    let mut value = toml::Value::try_from(base)?;
    let root = value
        .as_table_mut()
        .expect("a struct serialises to a table");
    for (k, v) in table {
        match (root.get_mut(&k), v) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => {
                for (kk, vv) in src {
                    dst.insert(kk, vv);
                }
            }
            (_, v) => {
                root.insert(k, v);
            }
        }
    }
    let model: ModelConfig = value
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("model config: {e}"))?;
    model.validate()?;
    Ok(model)
}

pub(crate) fn forward_opts(cfg: &TrainConfig) -> ForwardOpts {
    ForwardOpts {
        path: cfg.fast.attn_path.path(),
        select: cfg.fast.select,
        nvtx: cfg.fast.nvtx,
        ..Default::default()
    }
}

fn run_name(cfg: &TrainConfig, model: &ModelConfig) -> String {
    cfg.run.name.clone().unwrap_or_else(|| {
        let preset = cfg
            .model
            .get("preset")
            .and_then(|v| v.as_str())
            .unwrap_or("tiny");
        format!("{preset}-{}-{}", model.attention, cfg.data.source)
    })
}

/// Trains as configured. Returns the summary (also written into the run folder).
pub fn train(cfg: &TrainConfig, launch: &Launch, has_gpu: bool) -> Result<Summary> {
    let mut run = Session::start(cfg, launch, has_gpu)?;
    let stop = StopRequest::install()?;
    let (initial_eval_loss, initial_eval_accuracy) = if run.state.step == 0 {
        run.fwd
            .evaluate(
                &run.model,
                run.eval_src.as_ref(),
                cfg,
                cfg.run.eval_batches,
                Some(&stop),
            )?
            .unwrap_or((f64::NAN, f64::NAN))
    } else {
        (f64::NAN, f64::NAN)
    };
    let end = run.step_loop(&stop)?;
    let mut interrupted = end.interrupted;
    if interrupted.is_none() {
        run.saver
            .save(&run.state, &run.vs, &run.opt, run.dist.as_mut())?;
    }
    let (eval_loss, eval_accuracy) = match interrupted {
        Some(_) => (f64::NAN, f64::NAN),
        None => match run.fwd.evaluate(
            &run.model,
            run.eval_src.as_ref(),
            cfg,
            cfg.run.eval_batches,
            Some(&stop),
        )? {
            Some(e) => e,
            None => {
                interrupted = stop.signal();
                (f64::NAN, f64::NAN)
            }
        },
    };
    let summary_model = format!("{}", run.model_cfg);
    let run_dir = run.run_dir.clone();
    let lines = if run.writer {
        let lines = metrics::read(&run_dir.join("metrics.jsonl"))?;
        crate::plot::plot_loss(
            &lines,
            &format!("{}: {summary_model}", run.name),
            &run_dir.join("loss.png"),
        )?;
        lines
    } else {
        Vec::new()
    };
    let tokens_per_s = lines
        .iter()
        .rev()
        .take(5)
        .map(|l| l.tokens_per_s)
        .sum::<f64>()
        / lines.len().clamp(1, 5) as f64;
    let summary = Summary {
        run_dir: run_dir.clone(),
        model: summary_model,
        parameters: run.parameters,
        device: format!("{:?}", run.device),
        precision: if run.fwd.bf16 {
            "bf16".into()
        } else {
            "f32".into()
        },
        steps: run.state.step,
        first_loss: end.first_loss,
        last_loss: end.last_loss,
        skipped_steps: run.state.skipped_steps,
        tokens_per_s,
        flops_per_token: run.flops.total(),
        mfu: run
            .peak
            .as_ref()
            .map(|p| crate::flops::mfu(run.flops.total(), tokens_per_s, p.tflops, run.world)),
        peak: run.peak.clone(),
        peak_mem_mb: lines.iter().map(|l| l.peak_mem_mb).fold(0.0, f64::max),
        eval_loss,
        eval_accuracy,
        initial_eval_loss,
        initial_eval_accuracy,
        interrupted: interrupted.is_some(),
        stop_signal: interrupted,
        sdpa_audit: run.sdpa_audit.clone(),
    };
    if !run.writer {
        return Ok(summary);
    }
    crate::write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let text = summary_text(&summary);
    crate::write_atomic(&run_dir.join("summary.txt"), text.as_bytes())?;
    print!("{text}");
    println!(
        "wrote {}/{{config.toml,env.json,metrics.jsonl,loss.png,summary.json,checkpoints/}}",
        run_dir.display()
    );
    Ok(summary)
}

fn device_index(d: Device) -> usize {
    match d {
        Device::Cuda(i) => i,
        _ => 0,
    }
}

/// Loads a checkpoint's `model.safetensors` into `vs` after checking that the checkpoint was
/// written for `model_json` (the resolved model config), naming both configs when not.
fn load_model(
    vs: &mut nn::VarStore,
    dir: &Path,
    st: &TrainState,
    model_json: &serde_json::Value,
) -> Result<()> {
    ensure!(
        st.model == *model_json,
        "checkpoint {} belongs to another model config:\n  checkpoint: {}\n  this run:   {}",
        dir.display(),
        st.model,
        model_json
    );
    vs.load(dir.join("model.safetensors"))
        .with_context(|| format!("loading {}/model.safetensors", dir.display()))
}

/// The run's closing lines (printed, and written as `summary.txt`): the model, then steps and
/// losses, the held-out scores where there are any (a run stopped by a signal skips its final
/// evaluation; a resumed run has no "at start" score), speed, and the peak of libtorch's CUDA
/// allocator on a GPU (the CPU has none to report).
fn summary_text(s: &Summary) -> String {
    let mut line = format!(
        "steps {} ({} skipped), loss {:.4} -> {:.4}",
        s.steps, s.skipped_steps, s.first_loss, s.last_loss
    );
    if s.eval_loss.is_finite() {
        line += &format!(", eval loss {:.4}", s.eval_loss);
        if s.eval_accuracy.is_finite() {
            line += &format!(", answer accuracy {:.3}", s.eval_accuracy);
            if s.initial_eval_accuracy.is_finite() {
                line += &format!(" (at start {:.3})", s.initial_eval_accuracy);
            }
        }
    } else if let Some(sig) = s.stop_signal {
        line += &format!(", no final eval (stopped by {})", crate::signals::name(sig));
    }
    line += &format!(", {:.0} tokens/s", s.tokens_per_s);
    if let Some(m) = s.mfu {
        line += &format!(" (MFU {:.1}%)", 100.0 * m);
    }
    if s.peak_mem_mb > 0.0 {
        line += &format!(", peak {:.0} MB", s.peak_mem_mb);
    }
    format!("{}\n{line}\n", s.model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            run_dir: PathBuf::from("runs/x"),
            model: "dense decoder: 2 layers, dim 64".into(),
            parameters: 108_864,
            device: "Cuda(0)".into(),
            precision: "bf16".into(),
            steps: 3000,
            first_loss: 5.5628,
            last_loss: 1.8415,
            skipped_steps: 0,
            tokens_per_s: 53458.7,
            flops_per_token: 1.0e6,
            peak: None,
            mfu: Some(0.1234),
            peak_mem_mb: 1534.2,
            eval_loss: 1.8449,
            eval_accuracy: 0.3240,
            initial_eval_loss: 5.57,
            initial_eval_accuracy: 0.0,
            interrupted: false,
            stop_signal: None,
            sdpa_audit: Vec::new(),
        }
    }

    #[test]
    fn summary_text_of_a_finished_gpu_run() {
        insta::assert_snapshot!("summary_finished_gpu", summary_text(&summary()));
    }

    #[test]
    fn summary_text_of_a_stopped_resumed_cpu_run_shows_no_nan() {
        let s = Summary {
            device: "Cpu".into(),
            mfu: None,
            peak_mem_mb: 0.0,
            eval_loss: f64::NAN,
            eval_accuracy: f64::NAN,
            initial_eval_loss: f64::NAN,
            initial_eval_accuracy: f64::NAN,
            interrupted: true,
            stop_signal: Some(15),
            ..summary()
        };
        let text = summary_text(&s);
        assert!(!text.contains("NaN"), "{text}");
        insta::assert_snapshot!("summary_stopped_cpu", text);
    }

    #[test]
    fn summary_text_of_a_resumed_run_omits_the_start_score() {
        let s = Summary {
            initial_eval_accuracy: f64::NAN,
            ..summary()
        };
        insta::assert_snapshot!("summary_resumed", summary_text(&s));
    }
}
