//! Stage 1 of a run: everything checked and built before the first step. The order is the
//! point: config, sizes, run-folder plan, data, model and optimizer, resume, data-parallel
//! group — and only when all of that has passed is the run folder created (or replaced) and
//! written. A start that fails leaves the disk as it was.
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use nsa_model::{Model, ModelConfig};
use tch::{nn, Device, Tensor};

use super::dist::Dist;
use super::eval::{audit, Forward};
use super::saver::Saver;
use super::{forward_opts, load_model, model_config, parse_device, run_name, Launch};
use crate::checkpoint::{self, TrainState};
use crate::config::{Precision, TrainConfig};
use crate::data::{self, Split, TokenSource};
use crate::flops::{self, FlopsPerToken, Peak};
use crate::optim::AdamW;
use crate::run_dir;

/// A run that has started: what the step loop and the summary work on.
pub(super) struct Session<'a> {
    pub(super) cfg: &'a TrainConfig,
    pub(super) launch: &'a Launch,
    pub(super) model_cfg: ModelConfig,
    pub(super) name: String,
    pub(super) run_dir: PathBuf,
    pub(super) rank: usize,
    pub(super) world: usize,
    /// Only rank 0 writes: run folder, metrics, plots, checkpoints, summary.
    pub(super) writer: bool,
    pub(super) device: Device,
    pub(super) src: Box<dyn TokenSource>,
    pub(super) eval_src: Box<dyn TokenSource>,
    pub(super) vs: nn::VarStore,
    pub(super) model: Model,
    pub(super) opt: AdamW,
    pub(super) parameters: i64,
    pub(super) state: TrainState,
    pub(super) dist: Option<Dist>,
    pub(super) saver: Saver,
    pub(super) fwd: Forward,
    pub(super) sdpa_audit: Vec<String>,
    /// Model FLOPs per trained token at `data.seq_len` (the MFU's numerator per token).
    pub(super) flops: FlopsPerToken,
    /// One device's peak for the MFU (rank 0 only: it alone logs); `None`: no MFU.
    pub(super) peak: Option<Peak>,
}

impl<'a> Session<'a> {
    pub(super) fn start(cfg: &'a TrainConfig, launch: &'a Launch, has_gpu: bool) -> Result<Self> {
        let model_cfg = model_config(cfg)?;
        let device = match (&launch.dist, parse_device(cfg.run.device, has_gpu)?) {
            // Each rank drives the GPU of its local rank.
            (Some(d), Device::Cuda(_)) => Device::Cuda(d.local_rank),
            (_, dev) => dev,
        };
        if let Device::Cuda(i) = device {
            // The model's kernel families compile in the background while the model and data
            // are set up (or come from the disk cache); a failure shows where a family is first
            // used. main waits for them before the process exits.
            let _ = nsa_sys::fused::prebuild(i, model_cfg.kernel_sources());
        }
        let rank = launch.dist.as_ref().map_or(0, |d| d.rank);
        let world = launch.dist.as_ref().map_or(1, |d| d.world);
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
        crate::sizes::check(cfg, &model_cfg, crate::sizes::device_memory(device))?;
        let name = run_name(cfg, &model_cfg);
        let how = prepare_mode(launch);
        // Checked now, touched only after every other check has passed.
        let run_dir = if writer {
            run_dir::path(&cfg.run.out_dir, &name, how)?
        } else {
            run_dir::validate_name(&name)?;
            cfg.run.out_dir.join(&name)
        };
        let ckpt_dir = run_dir.join("checkpoints");

        // Data first: a missing or bad data path fails before anything is built or written.
        let src = data::open(&cfg.data, model_cfg.vocab_size, cfg.run.seed, Split::Train)?;
        let eval_src = data::open(
            &cfg.data,
            model_cfg.vocab_size,
            cfg.run.seed.wrapping_add(cfg.data.eval_seed_offset),
            Split::Val,
        )?;
        let tokenizer = crate::tokenize::run::RunTokenizer::check(
            &cfg.data,
            model_cfg.vocab_size,
            src.vocab_needed().max(eval_src.vocab_needed()) - 1,
        )?;

        // Deterministic algorithms (or not) before anything runs on the device.
        nsa_sys::train::set_deterministic(cfg.run.deterministic)
            .context("switching libtorch's deterministic algorithms")?;
        nsa_sys::fused::set_key_outer_chunk_bytes(
            (cfg.fast.key_outer_chunk_mib * 1048576.0) as i64,
        );
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
        let mut opt = AdamW::new(cfg.optim.clone(), decay, no_decay)?;
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
        let mut resumed_from = None;
        if launch.resume {
            if checkpoint::list(&ckpt_dir)?.is_empty() {
                println!(
                    "--resume: no checkpoint under {}; starting from step 0",
                    ckpt_dir.display()
                );
            } else {
                // The newest checkpoint that verifies and holds finite tensors; older ones are
                // tried when it does not (and the fallback is reported).
                let (dir, st, ()) = checkpoint::load_latest_good(&ckpt_dir, |dir, st| {
                    load_model(&mut vs, dir, st, &model_json)?;
                    opt.load(&dir.join("optim.safetensors"), st.step)?;
                    if let Some(bad) = opt.first_non_finite()? {
                        bail!(
                            "checkpoint {} holds non-finite values in {bad}",
                            dir.display()
                        );
                    }
                    Ok(())
                })?;
                println!("resumed from {} (step {})", dir.display(), st.step);
                state = st;
                resumed_from = Some(dir);
            }
        }
        if let (None, Some(from)) = (&resumed_from, &cfg.run.init_from) {
            let (dir, step) = super::load::init_weights(&mut vs, from, &model_json)
                .with_context(|| format!("run.init_from = {}", from.display()))?;
            println!(
                "initialised from {} (its step {step}); steps, optimizer and data start afresh",
                dir.display()
            );
        }
        let dist = match &launch.dist {
            Some(env) => {
                let mut d = Dist::new(env, cfg, device, &named)?;
                // Every rank starts from rank 0's parameters (fresh init or the checkpoint).
                d.dp.broadcast_parameters()?;
                Some(d)
            }
            None => None,
        };

        // Every check has passed: now the run folder may be created, replaced and written.
        let mut peak = None;
        if writer {
            run_dir::prepare(&run_dir, how)?;
            checkpoint::remove_stale_temporaries(&ckpt_dir)?;
            crate::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
            if let Some(t) = &tokenizer {
                t.copy_into(&run_dir)?;
            }
            let env = crate::snapshot::EnvSnapshot::collect();
            let gpu_name = device.is_cuda().then(|| {
                env.runtime
                    .gpus
                    .iter()
                    .find(|g| g.index == super::device_index(device))
                    .map(|g| g.name.as_str())
            });
            peak = flops::peak(cfg.run.peak_tflops, gpu_name.flatten(), bf16);
            crate::write_atomic(
                &run_dir.join("env.json"),
                serde_json::to_string_pretty(&env)?.as_bytes(),
            )?;
        }
        let sdpa_audit = if cfg.fast.sdpa_audit {
            audit(&model_cfg, device, bf16)?
        } else {
            Vec::new()
        };
        let per_token = flops::flops_per_token(&model_cfg, cfg.data.seq_len as i64);
        let session = Session {
            cfg,
            launch,
            model_cfg,
            name,
            saver: Saver::new(ckpt_dir, cfg.run.keep_checkpoints, writer, resumed_from),
            run_dir,
            rank,
            world,
            writer,
            device,
            src,
            eval_src,
            vs,
            model,
            opt,
            parameters,
            state,
            dist,
            fwd: Forward {
                opts: forward_opts(cfg),
                device,
                bf16,
                nvtx: cfg.fast.nvtx,
                fused_loss: cfg.fast.fused_loss,
                recompute: cfg.fast.recompute,
            },
            sdpa_audit,
            flops: per_token,
            peak,
        };
        session.print_banner()?;
        Ok(session)
    }

    /// What is about to run, printed once.
    fn print_banner(&self) -> Result<()> {
        let cfg = self.cfg;
        if let Some(d) = self.dist.as_ref().filter(|_| self.writer) {
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
        println!("run:     {}", self.run_dir.display());
        println!("model:   {}", self.model_cfg);
        println!(
            "data:    {}, batch {} × seq {}",
            self.src.describe(),
            cfg.data.batch_size,
            cfg.data.seq_len
        );
        println!("eval:    {}", self.eval_src.describe());
        if let Some(t) = &self.cfg.data.tokenizer {
            println!(
                "tokens:  {} (copied into the run folder as {})",
                t.display(),
                crate::tokenize::run::FILE_NAME
            );
        }
        println!(
            "device:  {:?}, precision {}",
            self.device,
            if self.fwd.bf16 {
                "bf16 autocast (fp32 master)"
            } else {
                "fp32"
            }
        );
        println!(
            "flops:   {:.3e} per token (6·N_mat {:.3e} + φ {:.3e} + attention {:.3e}), {}",
            self.flops.total(),
            self.flops.matrices,
            self.flops.compression,
            self.flops.attention,
            self.peak
                .as_ref()
                .map_or("no MFU (no peak known: --peak-tflops)".to_string(), |p| {
                    format!("MFU against {} TFLOP/s per device ({})", p.tflops, p.source)
                })
        );
        if cfg.run.deterministic {
            println!(
                "determinism: on (libtorch deterministic algorithms, cuDNN deterministic without benchmarking, a reproducible cuBLAS workspace)"
            );
        }
        for a in &self.sdpa_audit {
            println!("sdpa:    {a}");
        }
        Ok(())
    }
}

fn prepare_mode(launch: &Launch) -> run_dir::Prepare {
    match (launch.resume, launch.overwrite) {
        (true, _) => run_dir::Prepare::Resume,
        (false, true) => run_dir::Prepare::Overwrite,
        (false, false) => run_dir::Prepare::Fresh,
    }
}
