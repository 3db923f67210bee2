//! The training loop: run folder, model and optimizer, data, mixed precision, guards,
//! checkpoints and resume, signals, metrics, plot, evaluation, NVTX and profiling.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use nsa_attn::ForwardOpts;
use nsa_model::{Model, ModelConfig};
use nsa_sys::train::NvtxRange;
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::{self, TrainState};
use crate::config::{DeviceChoice, DistEnv, Precision, TrainConfig};
use crate::data::{self, Batch, TokenSource, IGNORE};
use crate::metrics::{self, MetricLine, MetricsWriter};
use crate::optim::AdamW;

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

/// The data-parallel side of a run: gradient sync, parameter broadcast and checksums.
struct Dist {
    dp: nsa_ddp::DataParallel<Box<dyn nsa_ddp::Communicator>>,
    world: usize,
}

impl Dist {
    fn new(
        env: &DistEnv,
        cfg: &TrainConfig,
        device: Device,
        params: &[(String, Tensor)],
    ) -> Result<Self> {
        let timeout = std::time::Duration::from_secs_f64(cfg.fast.ddp_timeout_s);
        let comm: Box<dyn nsa_ddp::Communicator> = if device.is_cuda() {
            let rdv =
                nsa_ddp::RendezvousConfig::new(env.master_addr.clone(), env.master_port, timeout);
            let id = nsa_ddp::rendezvous_nccl(&rdv, env.rank, env.world).with_context(|| {
                format!(
                    "rank {}: rendezvous at {}:{}",
                    env.rank, env.master_addr, env.master_port
                )
            })?;
            Box::new(
                nsa_ddp::NcclGroup::new(env.rank, env.world, &id, env.local_rank)?
                    .with_timeout(timeout),
            )
        } else {
            ensure!(
                env.world == 1,
                "data parallel across {} processes needs CUDA GPUs (NCCL); on the CPU only world size 1 (the in-process backend) runs",
                env.world
            );
            Box::new(
                nsa_ddp::LocalGroup::new(1, timeout)?
                    .pop()
                    .expect("one rank"),
            )
        };
        let compression = cfg.fast.ddp_compress;
        let mut dp = nsa_ddp::DataParallel::new(comm, params, cfg.fast.ddp_bucket_mb, compression)?;
        if cfg.fast.ddp_overlap {
            dp.enable_overlap()?;
        }
        Ok(Dist {
            dp,
            world: env.world,
        })
    }

    /// Sums `values` over ranks (one small all-reduce on `device`).
    fn sum(&mut self, values: &[f64], device: Device) -> Result<Vec<f64>> {
        let mut t = Tensor::from_slice(values).to_device(device);
        self.dp.with_comm(|c| -> Result<(), nsa_ddp::DdpError> {
            c.all_reduce_sum(&mut t)?;
            c.synchronize()
        })??;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
    }
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
    pub peak_mem_mb: f64,
    pub eval_loss: f64,
    pub eval_accuracy: f64,
    pub initial_eval_accuracy: f64,
    pub interrupted: bool,
    pub sdpa_audit: Vec<String>,
}

pub fn parse_device(choice: DeviceChoice, has_gpu: bool) -> Result<Device> {
    choice.resolve(has_gpu)
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

fn forward_opts(cfg: &TrainConfig) -> ForwardOpts {
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

/// Cross-entropy over the scored positions (`target != IGNORE`), in fp32.
fn loss_of(logits: &Tensor, target: &Tensor) -> Tensor {
    let v = logits.size().last().copied().unwrap_or(1);
    logits
        .to_kind(Kind::Float)
        .view([-1, v])
        .cross_entropy_loss::<Tensor>(&target.view([-1]), None, tch::Reduction::Mean, IGNORE, 0.0)
}

struct Ctx<'a> {
    model: &'a Model,
    opts: ForwardOpts,
    device: Device,
    bf16: bool,
    nvtx: bool,
}

impl Ctx<'_> {
    fn logits(&self, input: &Tensor) -> Result<Tensor> {
        let _r = NvtxRange::new(self.nvtx, "forward");
        let run = || self.model.forward(input, &self.opts);
        let out = if self.bf16 {
            nsa_sys::train::with_bf16_autocast(run)
        } else {
            run()
        };
        Ok(out?)
    }

    /// Mean loss and answer accuracy over `n` held-out batches.
    fn evaluate(&self, src: &dyn TokenSource, cfg: &TrainConfig, n: u64) -> Result<(f64, f64)> {
        let _g = tch::no_grad_guard();
        let (mut loss, mut correct, mut scored) = (0.0, 0i64, 0i64);
        for i in 0..n.max(1) {
            // Held-out: a rank no training process uses.
            let b = src
                .batch(i, u64::MAX - 1, cfg.data.batch_size, cfg.data.seq_len)?
                .to(self.device);
            let logits = self.logits(&b.input)?;
            loss += loss_of(&logits, &b.target).double_value(&[]);
            let (c, s) = data::answer_accuracy(&logits, &b.target);
            correct += c;
            scored += s;
        }
        Ok((
            loss / n.max(1) as f64,
            if scored > 0 {
                correct as f64 / scored as f64
            } else {
                0.0
            },
        ))
    }
}

/// Trains as configured. Returns the summary (also written into the run folder).
pub fn train(cfg: &TrainConfig, launch: &Launch, has_gpu: bool) -> Result<Summary> {
    let model_cfg = model_config(cfg)?;
    let device = match (&launch.dist, parse_device(cfg.run.device, has_gpu)?) {
        // Each rank drives the GPU of its local rank.
        (Some(d), Device::Cuda(_)) => Device::Cuda(d.local_rank),
        (_, dev) => dev,
    };
    let rank = launch.dist.as_ref().map_or(0, |d| d.rank);
    let world = launch.dist.as_ref().map_or(1, |d| d.world);
    // Only rank 0 writes: run folder, metrics, plots, checkpoints, summary.
    let writer = rank == 0;
    let bf16 = match cfg.run.precision {
        Precision::Bf16 => {
            ensure!(
                device.is_cuda(),
                "run.precision = bf16 needs a CUDA device (bf16 autocast is CUDA-only here)"
            );
            true
        }
        Precision::Auto => device.is_cuda(),
        Precision::F32 => false,
    };
    let name = run_name(cfg, &model_cfg);
    let run_dir = cfg.run.out_dir.join(&name);
    let ckpt_dir = run_dir.join("checkpoints");
    if writer && run_dir.exists() && !launch.resume {
        if launch.overwrite {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("removing {}", run_dir.display()))?;
        } else {
            bail!(
                "run folder {} exists: pass --resume to continue it, --overwrite to replace it, or set run.name",
                run_dir.display()
            );
        }
    }
    if writer {
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        crate::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
        let env = crate::snapshot::EnvSnapshot::collect();
        crate::write_atomic(
            &run_dir.join("env.json"),
            serde_json::to_string_pretty(&env)?.as_bytes(),
        )?;
    }

    // Model and optimizer (fp32 master weights; bf16 only inside autocast).
    tch::manual_seed(cfg.run.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &model_cfg)?;
    let parameters: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let (decay, no_decay) = nsa_model::decay_groups(&vs);
    let mut named: Vec<(String, Tensor)> = decay
        .iter()
        .chain(no_decay.iter())
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    // The same order on every rank.
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(cfg.optim.clone(), decay, no_decay);
    let model_json = serde_json::to_value(model_cfg)?;

    let mut state = TrainState {
        step: 0,
        tokens_seen: 0,
        skipped_steps: 0,
        bad_streak: 0,
        seed: cfg.run.seed,
        model: model_json.clone(),
        elapsed_s: 0.0,
    };
    if launch.resume {
        match checkpoint::latest(&ckpt_dir) {
            Ok((dir, st)) => {
                load_model(&mut vs, &dir, &st, &model_json)?;
                opt.load(&dir.join("optim.safetensors"), st.step)?;
                println!("resumed from {} (step {})", dir.display(), st.step);
                state = st;
            }
            Err(e) if checkpoint::list(&ckpt_dir)?.is_empty() => {
                println!("--resume: {e}; starting from step 0");
            }
            Err(e) => return Err(e),
        }
    }

    let mut dist = match &launch.dist {
        Some(env) => {
            let mut d = Dist::new(env, cfg, device, &named)?;
            // Every rank starts from rank 0's parameters (fresh init or the checkpoint).
            d.dp.broadcast_parameters()?;
            Some(d)
        }
        None => None,
    };
    let src = data::open(&cfg.data, model_cfg.vocab_size, cfg.run.seed)?;
    let eval_src = data::open(
        &cfg.data,
        model_cfg.vocab_size,
        cfg.run.seed + cfg.data.eval_seed_offset,
    )?;
    let ctx = Ctx {
        model: &model,
        opts: forward_opts(cfg),
        device,
        bf16,
        nvtx: cfg.fast.nvtx,
    };
    let summary_model = format!("{model_cfg}");
    if let Some(d) = dist.as_ref().filter(|_| writer) {
        println!(
            "ddp:     {} rank(s), {} bucket(s) of <= {} MB, compression {}, {}, batch {} per rank",
            d.world,
            d.dp.bucket_count()?,
            cfg.fast.ddp_bucket_mb,
            cfg.fast.ddp_compress,
            if d.dp.overlap_enabled() {
                "all-reduce overlapped with backward"
            } else {
                "all-reduce after backward"
            },
            cfg.data.batch_size
        );
    }
    println!("run:     {}", run_dir.display());
    println!("model:   {summary_model}");
    println!(
        "data:    {}, batch {} × seq {}",
        src.describe(),
        cfg.data.batch_size,
        cfg.data.seq_len
    );
    println!(
        "device:  {device:?}, precision {}",
        if bf16 {
            "bf16 autocast (fp32 master)"
        } else {
            "fp32"
        }
    );

    let sdpa_audit = if cfg.fast.sdpa_audit {
        audit(&model_cfg, device, bf16)
    } else {
        Vec::new()
    };
    for a in &sdpa_audit {
        println!("sdpa:    {a}");
    }
    let (_, initial_eval_accuracy) = if state.step == 0 {
        ctx.evaluate(eval_src.as_ref(), cfg, cfg.run.eval_batches)?
    } else {
        (f64::NAN, f64::NAN)
    };

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let mut metrics_out = if writer {
        Some(MetricsWriter::open(&run_dir.join("metrics.jsonl"))?)
    } else {
        None
    };
    let profile = cfg.profile_range()?;
    let total = cfg.run.steps;
    let bar = if launch.progress && writer {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(state.step);

    let save_ckpt = |state: &TrainState,
                     vs: &nn::VarStore,
                     opt: &AdamW,
                     dist: &mut Option<Dist>|
     -> Result<Option<PathBuf>> {
        if let Some(d) = dist {
            // Catch a silent desync before it is written down (every rank takes part).
            d.dp.parameter_checksum()?;
        }
        if !writer {
            return Ok(None);
        }
        checkpoint::save(&ckpt_dir, state, cfg.run.keep_checkpoints, |dir| {
            vs.save(dir.join("model.safetensors"))
                .context("writing model.safetensors")?;
            opt.save(&dir.join("optim.safetensors"))
        })
        .map(Some)
    };

    let tokens_per_step =
        world as u64 * cfg.data.batch_size as u64 * cfg.data.seq_len as u64 * cfg.optim.grad_accum;
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut window_start = Instant::now();
    let mut window_tokens = 0u64;
    let mut interrupted = false;
    let mut last_eval = (f64::NAN, f64::NAN);
    let run_start = Instant::now();
    if device.is_cuda() {
        nsa_sys::train::cuda_reset_peak(device_index(device));
    }
    while state.step < total {
        let step = state.step;
        if profile.is_some_and(|(a, _)| a == step) {
            nsa_sys::train::profiler_start(device.is_cuda())?;
        }
        let t0 = Instant::now();
        opt.zero_grad();
        let mut loss_sum = 0.0;
        for micro in 0..cfg.optim.grad_accum {
            let Batch { input, target } = src
                .batch(
                    step * cfg.optim.grad_accum + micro,
                    rank as u64,
                    cfg.data.batch_size,
                    cfg.data.seq_len,
                )?
                .to(device);
            let logits = ctx.logits(&input)?;
            let loss = loss_of(&logits, &target) / cfg.optim.grad_accum as f64;
            if micro + 1 == cfg.optim.grad_accum {
                if let Some(d) = dist.as_mut() {
                    // This backward's gradients are final: buckets may be reduced as they fill.
                    d.dp.prepare_backward()?;
                }
            }
            {
                let _r = NvtxRange::new(cfg.fast.nvtx, "backward");
                loss.backward();
            }
            loss_sum += loss.double_value(&[]);
        }
        // Gradients are synced once per optimizer step, never on accumulation micro-steps.
        let mut sync_ms = None;
        if let Some(d) = dist.as_mut() {
            let _r = NvtxRange::new(cfg.fast.nvtx, "grad_sync");
            let took = d.dp.sync_gradients().with_context(|| {
                format!(
                    "step {step}: gradient sync failed (did another rank die or hang?); the last good checkpoint is in {}",
                    ckpt_dir.display()
                )
            })?;
            sync_ms = Some(took.as_secs_f64() * 1e3);
            // The logged loss is the mean over ranks, and a stop request on any rank stops all
            // (a rank that stopped alone would leave the others waiting in a collective).
            let flag = if stop.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            };
            let sums = d.sum(&[loss_sum, flag], device)?;
            loss_sum = sums[0] / d.world as f64;
            if sums[1] > 0.0 {
                stop.store(true, Ordering::Relaxed);
            }
        }
        let grad_norm = opt.grad_norm();
        let lr = cfg.optim.lr_at(step, total);
        if loss_sum.is_finite() && grad_norm.is_finite() {
            let _r = NvtxRange::new(cfg.fast.nvtx, "optimizer");
            opt.step(lr, grad_norm);
            state.bad_streak = 0;
        } else {
            state.skipped_steps += 1;
            state.bad_streak += 1;
            bar.println(format!(
                "step {step}: non-finite loss {loss_sum} or grad norm {grad_norm}; step skipped"
            ));
            if state.bad_streak >= cfg.run.max_bad_steps {
                bar.abandon();
                bail!(
                    "stopping: {} non-finite steps in a row (run.max_bad_steps); the last good checkpoint is in {}",
                    state.bad_streak,
                    ckpt_dir.display()
                );
            }
        }
        if device.is_cuda() {
            tch::Cuda::synchronize(device_index(device) as i64);
        }
        let step_ms = t0.elapsed().as_secs_f64() * 1e3;
        if profile.is_some_and(|(_, b)| b == step) {
            let trace = run_dir.join(format!(
                "trace-steps-{}.json",
                cfg.run.profile.replace("..", "-")
            ));
            nsa_sys::train::profiler_stop(&trace)?;
            bar.println(format!(
                "profile of steps {} written to {}",
                cfg.run.profile,
                trace.display()
            ));
        }
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        window_tokens += tokens_per_step;
        if first_loss.is_nan() && loss_sum.is_finite() {
            first_loss = loss_sum;
        }
        if loss_sum.is_finite() {
            last_loss = loss_sum;
        }
        let eval_now = cfg.run.eval_every > 0 && state.step.is_multiple_of(cfg.run.eval_every);
        if eval_now {
            last_eval = ctx.evaluate(eval_src.as_ref(), cfg, cfg.run.eval_batches)?;
        }
        if state.step.is_multiple_of(cfg.run.log_every) || state.step == total || eval_now {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let peak_mem_mb = if device.is_cuda() {
                let m = nsa_sys::train::cuda_memory(device_index(device))
                    .map(|m| m.peak_allocated)
                    .unwrap_or(0);
                nsa_sys::train::cuda_reset_peak(device_index(device));
                m as f64 / 1e6
            } else {
                0.0
            };
            let line = MetricLine {
                step: state.step,
                loss: loss_sum,
                lr,
                grad_norm,
                tokens_per_s: window_tokens as f64 / secs,
                step_ms,
                peak_mem_mb,
                skipped_steps: state.skipped_steps,
                eval_loss: eval_now.then_some(last_eval.0),
                eval_accuracy: eval_now.then_some(last_eval.1),
                sync_ms,
            };
            if let Some(m) = metrics_out.as_mut() {
                m.write(&line)?;
            }
            bar.set_message(format!(
                "loss {loss_sum:.4} lr {lr:.2e} {:.0} tok/s",
                line.tokens_per_s
            ));
            if !launch.progress && writer {
                println!(
                    "step {:>6}  loss {loss_sum:.4}  lr {lr:.2e}  |g| {grad_norm:.3}  {:.0} tok/s{}",
                    state.step,
                    line.tokens_per_s,
                    if eval_now { format!("  eval loss {:.4} acc {:.3}", last_eval.0, last_eval.1) } else { String::new() }
                );
            }
            window_start = Instant::now();
            window_tokens = 0;
        }
        bar.set_position(state.step);
        let ckpt_now = cfg.run.ckpt_every > 0 && state.step.is_multiple_of(cfg.run.ckpt_every);
        if stop.load(Ordering::Relaxed) {
            state.elapsed_s += run_start.elapsed().as_secs_f64();
            if let Some(dir) = save_ckpt(&state, &vs, &opt, &mut dist)? {
                bar.abandon_with_message(format!(
                    "interrupted: checkpoint {} written",
                    dir.display()
                ));
            }
            interrupted = true;
            break;
        }
        // No checkpoints during a run of non-finite steps: they would rotate the last good
        // checkpoints out (run.keep_checkpoints) while the run may be about to stop.
        if ckpt_now && state.step < total && state.bad_streak == 0 {
            save_ckpt(&state, &vs, &opt, &mut dist)?;
        }
    }
    bar.finish_and_clear();
    if !interrupted {
        state.elapsed_s += run_start.elapsed().as_secs_f64();
        save_ckpt(&state, &vs, &opt, &mut dist)?;
    }
    let (eval_loss, eval_accuracy) = if interrupted {
        (f64::NAN, f64::NAN)
    } else {
        ctx.evaluate(eval_src.as_ref(), cfg, cfg.run.eval_batches)?
    };
    let lines = if writer {
        let lines = metrics::read(&run_dir.join("metrics.jsonl"))?;
        metrics::plot_loss(
            &lines,
            &format!("{name}: {summary_model}"),
            &run_dir.join("loss.png"),
        )?;
        lines
    } else {
        Vec::new()
    };
    let summary = Summary {
        run_dir: run_dir.clone(),
        model: summary_model,
        parameters,
        device: format!("{device:?}"),
        precision: if bf16 { "bf16".into() } else { "f32".into() },
        steps: state.step,
        first_loss,
        last_loss,
        skipped_steps: state.skipped_steps,
        tokens_per_s: lines
            .iter()
            .rev()
            .take(5)
            .map(|l| l.tokens_per_s)
            .sum::<f64>()
            / lines.len().clamp(1, 5) as f64,
        peak_mem_mb: lines.iter().map(|l| l.peak_mem_mb).fold(0.0, f64::max),
        eval_loss,
        eval_accuracy,
        initial_eval_accuracy,
        interrupted,
        sdpa_audit,
    };
    if !writer {
        return Ok(summary);
    }
    crate::write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let text = format!(
        "{}\nsteps {} ({} skipped), loss {:.4} -> {:.4}, eval loss {:.4}, answer accuracy {:.3} (at start {:.3}), {:.0} tokens/s, peak {:.0} MB\n",
        summary.model,
        summary.steps,
        summary.skipped_steps,
        summary.first_loss,
        summary.last_loss,
        summary.eval_loss,
        summary.eval_accuracy,
        summary.initial_eval_accuracy,
        summary.tokens_per_s,
        summary.peak_mem_mb
    );
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

/// The attention-backend audit: which SDPA kernel the dense attention of this model's shape
/// would use on this device (NSA's lean path computes its branches with its own chunked ops).
fn audit(m: &ModelConfig, device: Device, bf16: bool) -> Vec<String> {
    let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
    let _g = tch::no_grad_guard();
    let (h, hk) = (m.n_heads, m.n_kv_heads);
    let q = Tensor::randn([1, h, 128, m.head_dim_k], (kind, device));
    let k = Tensor::randn([1, hk, 128, m.head_dim_k], (kind, device));
    let v = Tensor::randn([1, hk, 128, m.head_dim_v], (kind, device));
    vec![format!(
        "{} attention; dense causal SDPA for H={h} Hkv={hk} dk={} dv={} {kind:?} picks {}",
        m.attention,
        m.head_dim_k,
        m.head_dim_v,
        nsa_sys::SdpaBackend::choice(&q, &k, &v, true)
    )]
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

/// `nsa-train eval`: loss and answer accuracy of the latest checkpoint of a run folder.
pub fn eval_run(run_dir: &Path, batches: u64, has_gpu: bool) -> Result<(f64, f64)> {
    let cfg_path = run_dir.join("config.toml");
    let cfg = crate::config::resolve(Some(&cfg_path), &[], std::iter::empty())?;
    let model_cfg = model_config(&cfg)?;
    let device = parse_device(cfg.run.device, has_gpu)?;
    let (dir, st) = checkpoint::latest(&run_dir.join("checkpoints"))?;
    let mut vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &model_cfg)?;
    load_model(&mut vs, &dir, &st, &serde_json::to_value(model_cfg)?)?;
    let eval_src = data::open(
        &cfg.data,
        model_cfg.vocab_size,
        cfg.run.seed + cfg.data.eval_seed_offset,
    )?;
    let bf16 = device.is_cuda() && cfg.run.precision != Precision::F32;
    let ctx = Ctx {
        model: &model,
        opts: forward_opts(&cfg),
        device,
        bf16,
        nvtx: false,
    };
    let (loss, acc) = ctx.evaluate(eval_src.as_ref(), &cfg, batches)?;
    println!(
        "{}: step {}, eval loss {loss:.4}, answer accuracy {acc:.3} over {batches} batches",
        dir.display(),
        st.step
    );
    Ok((loss, acc))
}
