//! Stage 2 of a run: the step loop. One optimizer step is `grad_accum` micro-steps (forward,
//! backward), one gradient sync in a data-parallel run, the non-finite guard and the AdamW
//! update; around it, stop requests, profiling, periodic evaluation, the metrics line and
//! checkpoints.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use nsa_sys::train::NvtxRange;

use super::device_index;
use super::dist::agreed_stop;
use super::session::Session;
use crate::data::Batch;
use crate::metrics::{MetricLine, MetricsWriter};
use crate::signals::{self, StopRequest};

/// How the loop ended.
pub(super) struct LoopEnd {
    pub(super) first_loss: f64,
    pub(super) last_loss: f64,
    /// The signal that stopped it early.
    pub(super) interrupted: Option<i32>,
}

/// One finished optimizer step.
struct StepDone {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    sync_ms: Option<f64>,
    step_ms: f64,
    /// [`MetricLine::activation_mb`] of this step (CUDA only).
    activation_mb: Option<f64>,
}

/// The metrics window between two log lines.
struct Log {
    writer: Option<MetricsWriter>,
    bar: ProgressBar,
    window_start: Instant,
    window_tokens: u64,
}

impl Session<'_> {
    /// Runs steps until `run.steps`, a stop request or too many non-finite steps (an error
    /// naming the last good checkpoint).
    pub(super) fn step_loop(&mut self, stop: &StopRequest) -> Result<LoopEnd> {
        let cfg = self.cfg;
        let total = cfg.run.steps;
        let tokens_per_step = [
            cfg.data.batch_size as u64,
            cfg.data.seq_len as u64,
            cfg.optim.grad_accum,
        ]
        .into_iter()
        .try_fold(self.world as u64, u64::checked_mul)
        .context(
            "world size × data.batch_size × data.seq_len × optim.grad_accum overflows 64 bits",
        )?;
        let profile = cfg.profile_range()?;
        // Stops the profiler however the loop ends (an interruption, an error), so it never
        // outlives the run: left running it crashes the process at exit.
        let mut profiler = Profiler::new(self.run_dir.join(format!(
            "trace-steps-{}.json",
            cfg.run.profile.replace("..", "-")
        )));
        let mut log = Log {
            writer: if self.writer {
                Some(MetricsWriter::open(&self.run_dir.join("metrics.jsonl"))?)
            } else {
                None
            },
            bar: if self.launch.progress && self.writer {
                ProgressBar::new(total)
            } else {
                ProgressBar::hidden()
            },
            window_start: Instant::now(),
            window_tokens: 0,
        };
        log.bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        log.bar.set_position(self.state.step);
        let mut end = LoopEnd {
            first_loss: f64::NAN,
            last_loss: f64::NAN,
            interrupted: None,
        };
        let mut last_eval = (f64::NAN, f64::NAN);
        let run_start = Instant::now();
        if self.device.is_cuda() {
            nsa_sys::train::cuda_reset_peak(device_index(self.device));
        }
        while self.state.step < total {
            // Checked at every step (every rank agrees) and between micro-steps.
            if let Some(sig) = agreed_stop(stop, self.dist.as_mut(), self.device)? {
                self.state.elapsed_s += run_start.elapsed().as_secs_f64();
                if let Some(dir) =
                    self.saver
                        .save(&self.state, &self.vs, &self.opt, self.dist.as_mut())?
                {
                    log.bar.abandon_with_message(format!(
                        "interrupted by {}: checkpoint {} written",
                        signals::name(sig),
                        dir.display()
                    ));
                }
                end.interrupted = Some(sig);
                break;
            }
            // Steps are numbered as the log numbers them: this one is `number`.
            let number = self.state.step + 1;
            if let Some((a, b)) = profile {
                if (a..=b).contains(&number) && !profiler.active() {
                    profiler.start(self.device.is_cuda())?;
                }
            }
            let Some(done) = self.one_step(stop, &log.bar)? else {
                // Abandoned for a stop request: the next turn writes the checkpoint.
                continue;
            };
            if profile.is_some_and(|(_, b)| b == number) {
                let trace = profiler.stop()?;
                log.bar.println(format!(
                    "profile of steps {} written to {}",
                    cfg.run.profile,
                    trace.display()
                ));
            }
            self.state.step += 1;
            self.state.tokens_seen += tokens_per_step;
            log.window_tokens += tokens_per_step;
            if done.loss.is_finite() {
                if end.first_loss.is_nan() {
                    end.first_loss = done.loss;
                }
                end.last_loss = done.loss;
            }
            let eval_now =
                cfg.run.eval_every > 0 && self.state.step.is_multiple_of(cfg.run.eval_every);
            if eval_now {
                match self.fwd.evaluate(
                    &self.model,
                    self.eval_src.as_ref(),
                    cfg,
                    cfg.run.eval_batches,
                    Some(stop),
                )? {
                    Some(e) => last_eval = e,
                    // Interrupted: the next turn of the loop writes the checkpoint and stops.
                    None => continue,
                }
            }
            if self.state.step.is_multiple_of(cfg.run.log_every)
                || self.state.step == total
                || eval_now
            {
                self.log_line(&mut log, &done, eval_now.then_some(last_eval))?;
            }
            log.bar.set_position(self.state.step);
            let ckpt_now =
                cfg.run.ckpt_every > 0 && self.state.step.is_multiple_of(cfg.run.ckpt_every);
            // No checkpoints during a run of non-finite steps: they would rotate the last good
            // checkpoints out (run.keep_checkpoints) while the run may be about to stop.
            if ckpt_now && self.state.step < total && self.state.bad_streak == 0 {
                self.saver
                    .save(&self.state, &self.vs, &self.opt, self.dist.as_mut())?;
            }
        }
        log.bar.finish_and_clear();
        if end.interrupted.is_none() {
            self.state.elapsed_s += run_start.elapsed().as_secs_f64();
        }
        Ok(end)
    }

    /// Micro-steps, gradient sync, guard and update for step `self.state.step`. `None` when a
    /// stop request abandoned it between micro-steps (its gradients are discarded; the
    /// checkpoint then holds the last completed step).
    fn one_step(&mut self, stop: &StopRequest, bar: &ProgressBar) -> Result<Option<StepDone>> {
        let cfg = self.cfg;
        let step = self.state.step;
        let t0 = Instant::now();
        self.opt.zero_grad()?;
        let mut loss_sum = 0.0;
        let mut activation_mb: Option<f64> = None;
        let device = self.device;
        let allocated = || -> Option<f64> {
            device
                .is_cuda()
                .then(|| nsa_sys::train::cuda_memory(device_index(device)))
                .flatten()
                .map(|m| m.allocated as f64 / 1e6)
        };
        for micro in 0..cfg.optim.grad_accum {
            if micro > 0 && agreed_stop(stop, self.dist.as_mut(), self.device)?.is_some() {
                return Ok(None);
            }
            let Batch { input, target } = self
                .src
                .batch(
                    step * cfg.optim.grad_accum + micro,
                    self.rank as u64,
                    cfg.data.batch_size,
                    cfg.data.seq_len,
                )?
                .to(self.device)?;
            let before = allocated();
            let (loss, recompute) = self.fwd.loss(&self.model, &input, &target)?;
            if let (Some(a), Some(b)) = (allocated(), before) {
                activation_mb = Some(activation_mb.map_or(a - b, |m| m.max(a - b)));
            }
            let loss = loss / cfg.optim.grad_accum as f64;
            // With activation recomputation the backward is several passes, and the tied
            // embedding gets its gradient in two of them: buckets are reduced after it instead.
            if micro + 1 == cfg.optim.grad_accum && recompute.is_none() {
                if let Some(d) = self.dist.as_mut() {
                    // This backward's gradients are final: buckets may be reduced as they fill.
                    d.dp.prepare_backward()?;
                }
            }
            {
                let _r = NvtxRange::new(cfg.fast.nvtx, "backward");
                self.fwd
                    .backpropagate(&self.model, &loss, recompute)
                    .with_context(|| format!("step {step}: backward failed"))?;
            }
            loss_sum += loss.f_double_value(&[])?;
        }
        // Gradients are synced once per optimizer step, never on accumulation micro-steps.
        let mut sync_ms = None;
        if let Some(d) = self.dist.as_mut() {
            let _r = NvtxRange::new(cfg.fast.nvtx, "grad_sync");
            let note = self.saver.last_good_note();
            let took = d.dp.sync_gradients().with_context(|| {
                format!("step {step}: gradient sync failed (did another rank die or hang?); {note}")
            })?;
            sync_ms = Some(took.as_secs_f64() * 1e3);
            // The logged loss is the mean over ranks (and every rank skips a non-finite step).
            loss_sum = d.sum_over_ranks(&[loss_sum], self.device)?[0] / d.world as f64;
        }
        let grad_norm = self.opt.grad_norm()?;
        let lr = cfg.optim.lr_at(step, cfg.run.steps);
        if loss_sum.is_finite() && grad_norm.is_finite() {
            let _r = NvtxRange::new(cfg.fast.nvtx, "optimizer");
            self.opt.step(lr, grad_norm)?;
            self.state.bad_streak = 0;
            self.saver.confirm();
        } else {
            self.state.skipped_steps += 1;
            self.state.bad_streak += 1;
            bar.println(format!(
                "step {step}: non-finite loss {loss_sum} or grad norm {grad_norm}; step skipped"
            ));
            if self.state.bad_streak >= cfg.run.max_bad_steps {
                bar.abandon();
                self.saver.set_aside_unconfirmed()?;
                bail!(
                    "stopping: {} non-finite steps in a row (run.max_bad_steps); {}",
                    self.state.bad_streak,
                    self.saver.last_good_note()
                );
            }
        }
        if self.device.is_cuda() {
            tch::Cuda::synchronize(device_index(self.device) as i64);
        }
        Ok(Some(StepDone {
            loss: loss_sum,
            grad_norm,
            lr,
            sync_ms,
            step_ms: t0.elapsed().as_secs_f64() * 1e3,
            activation_mb,
        }))
    }

    /// Writes one metrics line (and prints it when there is no progress bar).
    fn log_line(&mut self, log: &mut Log, done: &StepDone, eval: Option<(f64, f64)>) -> Result<()> {
        let secs = log.window_start.elapsed().as_secs_f64().max(1e-9);
        let peak_mem_mb = if self.device.is_cuda() {
            let i = device_index(self.device);
            let m = nsa_sys::train::cuda_memory(i)
                .map(|m| m.peak_allocated)
                .unwrap_or(0);
            nsa_sys::train::cuda_reset_peak(i);
            m as f64 / 1e6
        } else {
            0.0
        };
        let tokens_per_s = log.window_tokens as f64 / secs;
        let line = MetricLine {
            step: self.state.step,
            tokens: Some(self.state.tokens_seen),
            loss: done.loss,
            lr: done.lr,
            grad_norm: done.grad_norm,
            tokens_per_s,
            step_ms: done.step_ms,
            peak_mem_mb,
            skipped_steps: self.state.skipped_steps,
            eval_loss: eval.map(|e| e.0),
            eval_accuracy: eval.map(|e| e.1),
            sync_ms: done.sync_ms,
            activation_mb: done.activation_mb,
            mfu: self
                .peak
                .as_ref()
                .map(|p| crate::flops::mfu(self.flops.total(), tokens_per_s, p.tflops, self.world)),
        };
        if let Some(m) = log.writer.as_mut() {
            m.write(&line)?;
        }
        let mfu = line
            .mfu
            .map(|m| format!("  MFU {:.1}%", 100.0 * m))
            .unwrap_or_default();
        log.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s{mfu}",
            done.loss, done.lr, line.tokens_per_s
        ));
        if !self.launch.progress && self.writer {
            println!(
                "step {:>6}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s{mfu}{}",
                self.state.step,
                done.loss,
                done.lr,
                done.grad_norm,
                line.tokens_per_s,
                eval.map(|(l, a)| format!("  eval loss {l:.4} acc {a:.3}"))
                    .unwrap_or_default()
            );
        }
        log.window_start = Instant::now();
        log.window_tokens = 0;
        Ok(())
    }
}

/// libtorch's profiler over a range of steps, writing its Chrome trace to `trace` when stopped
/// or dropped while running.
struct Profiler {
    trace: std::path::PathBuf,
    running: bool,
}

impl Profiler {
    fn new(trace: std::path::PathBuf) -> Self {
        Self {
            trace,
            running: false,
        }
    }

    fn active(&self) -> bool {
        self.running
    }

    fn start(&mut self, cuda: bool) -> Result<()> {
        nsa_sys::train::profiler_start(cuda)?;
        self.running = true;
        Ok(())
    }

    /// Stops it and writes the trace; returns the trace's path.
    fn stop(&mut self) -> Result<&std::path::Path> {
        self.running = false;
        nsa_sys::train::profiler_stop(&self.trace)?;
        Ok(&self.trace)
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if self.running {
            // Best effort on an early exit: the trace of the steps that ran.
            let _ = self.stop();
        }
    }
}
