//! `nsa-train generate RUN_DIR`: continue a prompt with a trained run's model, token by token
//! through the decode caches (`nsa_model::Model::prefill` then `decode_step`), streaming the
//! text as it comes; and the generation side of `nsa-train eval --task` ([`retrieval`], with
//! [`inspect`] for `--inspect`).
pub mod inspect;
pub mod retrieval;
mod sample;
pub mod text;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nsa_attn::ForwardOpts;
use nsa_model::Model;
use tch::{Kind, Tensor};

use crate::config::{DeviceChoice, Precision};
use crate::train::{forward_opts, load_run, LoadedRun};
pub use sample::{Sampler, Sampling};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The run folder (runs/NAME).
    run: PathBuf,
    /// Checkpoint to load: a step number or a checkpoint folder (default: the newest one that
    /// verifies).
    #[arg(long)]
    checkpoint: Option<String>,
    /// The prompt text (runs with a recorded tokenizer, and byte-level runs).
    #[arg(long, conflicts_with_all = ["prompt_file", "prompt_ids"])]
    prompt: Option<String>,
    /// Read the prompt text from this file.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt_file: Option<PathBuf>,
    /// The prompt as token ids, separated by commas or spaces (any run).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// Tokens to generate (fewer if the context limit comes first).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Always take the most likely token (the same as --temperature 0).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Softmax temperature of the sampling; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens that together reach probability p.
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampling (the same seed draws the same tokens on any device).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: auto, cpu, cuda or cuda:N (default: the run's run.device).
    #[arg(long)]
    device: Option<String>,
    /// Run every decode step eagerly (libtorch's operators launched one by one) instead of
    /// replaying a CUDA graph of the step (the default on CUDA for NSA models; dense models
    /// decode eagerly, which is faster for them; see README, Generation).
    #[arg(long)]
    no_graphs: bool,
    /// Longest sequence, prompt plus generated tokens (default: the run's data.seq_len, the
    /// longest it was trained on; positions past it were never trained).
    #[arg(long)]
    max_context: Option<usize>,
}

/// Timings of one generation.
#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill: Duration,
    /// From the first generated token to the last.
    pub decode: Duration,
    /// Decode steps that replayed a CUDA graph.
    pub graph_replays: u64,
    /// Why the steps ran eagerly although graphs were asked for.
    pub graphs_unavailable: Option<String>,
}

impl GenerationStats {
    /// How the decode steps ran, for the summary line.
    pub fn steps_description(&self) -> String {
        let steps = self.new_tokens.saturating_sub(1);
        match &self.graphs_unavailable {
            Some(why) => format!("eager decode steps ({why})"),
            None if self.graph_replays > 0 => {
                format!(
                    "{} of {steps} decode steps replayed a CUDA graph",
                    self.graph_replays
                )
            }
            None => "eager decode steps".into(),
        }
    }
}

/// Continues `prompt` by up to `budget` tokens chosen by `sampler`, calling `on_token` with each
/// as soon as it is chosen: prefill of the prompt, then one decode step per token (replayed
/// from a CUDA graph with `graphs` where the model and device allow it and the model gains
/// from it: [`Model::decodes_faster_from_graphs`]).
pub fn generate(
    model: &Model,
    prompt: &[i64],
    budget: usize,
    sampler: &mut Sampler,
    opts: &ForwardOpts,
    graphs: bool,
    mut on_token: impl FnMut(i64) -> Result<()>,
) -> Result<GenerationStats> {
    ensure!(
        !prompt.is_empty(),
        "the prompt is empty: nothing to continue"
    );
    let len = prompt.len() as i64;
    let start = Instant::now();
    let tokens = Tensor::f_from_slice(prompt)?
        .f_to_device(model.device())?
        .f_view([1, len])?;
    let pre = model.prefill(&tokens, &[len], len + budget as i64, opts)?;
    let mut logits = host_row(&pre.logits.f_select(1, len - 1)?)?;
    let mut cache = pre.cache;
    let dense_eager = graphs && !model.decodes_faster_from_graphs();
    cache.use_graphs(graphs && !dense_eager);
    let prefill = start.elapsed();
    let start = Instant::now();
    for i in 0..budget {
        let id = sampler.pick(&logits)?;
        on_token(id)?;
        if i + 1 < budget {
            logits = host_row(&model.decode_step(&mut cache, &[id], opts)?.logits)?;
        }
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        new_tokens: budget,
        prefill,
        decode: start.elapsed(),
        graph_replays: cache.graph_replays(),
        graphs_unavailable: match cache.graph_unavailable() {
            Some(why) => Some(why.to_string()),
            None if dense_eager => Some("dense models decode faster eagerly".into()),
            None => None,
        },
    })
}

/// Logits `[1, V]` (or `[V]`) → host floats (the step's one device→host copy).
pub(crate) fn host_row(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        logits.f_to_kind(Kind::Float)?.f_flatten(0, -1)?,
    )?)
}

/// The run's model in the precision it trained in: bf16 weights on CUDA unless the run was
/// f32 (decoding keeps one kind throughout; autocast's mixed kinds do not fit the caches).
pub(crate) fn inference_precision(run: &mut LoadedRun) -> &'static str {
    if run.device.is_cuda() && run.cfg.run.precision != Precision::F32 {
        run.vs.bfloat16();
        "bf16"
    } else {
        "f32"
    }
}

pub fn run(a: GenerateArgs, has_gpu: bool) -> Result<()> {
    let sampling = if a.greedy {
        Sampling::GREEDY
    } else {
        Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
        }
    };
    let mut sampler = Sampler::new(sampling, a.seed)?;
    let device = a
        .device
        .map(|d| DeviceChoice::try_from(d).map_err(|e| anyhow::anyhow!("--device: {e}")))
        .transpose()?;
    let mut run = load_run(&a.run, device, a.checkpoint.as_deref(), has_gpu)?;
    let tokenizer = text::for_run(&a.run, &run.cfg.data, run.model_cfg.vocab_size)?;
    let prompt = match (&a.prompt, &a.prompt_file, &a.prompt_ids) {
        (Some(t), _, _) => tokenizer.encode(t)?,
        (_, Some(f), _) => tokenizer.encode(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )?,
        (_, _, Some(ids)) => text::parse_ids(ids)?,
        _ => bail!("give a prompt: --prompt TEXT, --prompt-file FILE or --prompt-ids IDS"),
    };
    ensure!(
        !prompt.is_empty(),
        "the prompt is empty: nothing to continue"
    );
    let vocab = run.model_cfg.vocab_size;
    if let Some((i, id)) = prompt
        .iter()
        .enumerate()
        .find(|(_, &id)| !(0..vocab).contains(&id))
    {
        bail!("prompt token {i} is id {id}, outside this run's vocabulary 0..{vocab}");
    }
    let context = a.max_context.unwrap_or(run.cfg.data.seq_len);
    ensure!(
        prompt.len() <= context,
        "the prompt has {} tokens, more than the {context} this run was trained on \
         (data.seq_len); positions past that were never trained: pass --max-context N to go \
         further anyway",
        prompt.len()
    );
    let budget = a.max_new_tokens.min(context - prompt.len());
    let precision = inference_precision(&mut run);
    eprintln!(
        "model:   {}\nweights: {} (step {})\ndevice:  {:?}, {precision}\ntokens:  {}; {}",
        run.model_cfg,
        run.checkpoint.display(),
        run.step,
        run.device,
        tokenizer.describe(),
        sampler_description(&sampling, a.seed),
    );
    let mut out = std::io::stdout().lock();
    let mut decoder = tokenizer.decoder();
    let echo: String = prompt.iter().map(|&id| decoder.push(id)).collect();
    write!(out, "{echo}")?;
    out.flush()?;
    let stats = generate(
        &run.model,
        &prompt,
        budget,
        &mut sampler,
        &forward_opts(&run.cfg),
        !a.no_graphs,
        |id| {
            write!(out, "{}", decoder.push(id))?;
            Ok(out.flush()?)
        },
    )?;
    writeln!(out, "{}", decoder.finish())?;
    let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "generated {} tokens in {:.2} s: {:.1} tokens/s (prompt of {} tokens prefilled in {:.0} ms, {:.0} tokens/s; {}){}",
        stats.new_tokens,
        stats.decode.as_secs_f64(),
        per_s(stats.new_tokens, stats.decode),
        stats.prompt_tokens,
        stats.prefill.as_secs_f64() * 1e3,
        per_s(stats.prompt_tokens, stats.prefill),
        stats.steps_description(),
        if budget < a.max_new_tokens {
            format!("; stopped at the context limit of {context} tokens (--max-context)")
        } else {
            String::new()
        }
    );
    Ok(())
}

fn sampler_description(how: &Sampling, seed: u64) -> String {
    if how.temperature == 0.0 {
        how.describe()
    } else {
        format!("{}, seed {seed}", how.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsa_model::{AttentionKind, ModelConfig};
    use tch::{nn, Device};

    /// Greedy generation through the caches picks exactly the tokens that re-running the full
    /// forward on the growing sequence picks (argmax of its last row), for NSA and dense.
    #[test]
    fn greedy_generation_equals_repeated_full_forwards() {
        for attention in [AttentionKind::Nsa, AttentionKind::Dense] {
            tch::manual_seed(5);
            let mut cfg = ModelConfig::preset("tiny")
                .unwrap()
                .with_attention(attention);
            cfg.init_std = 0.2;
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Model::new(&vs.root(), &cfg).unwrap();
            let prompt: Vec<i64> = (0..13).map(|i| (i * 37 + 5) % 256).collect();
            let opts = ForwardOpts::default();
            let mut got = Vec::new();
            let mut sampler = Sampler::new(Sampling::GREEDY, 0).unwrap();
            let stats = generate(&model, &prompt, 40, &mut sampler, &opts, true, |id| {
                got.push(id);
                Ok(())
            })
            .unwrap();
            assert_eq!((stats.prompt_tokens, stats.new_tokens), (13, 40));
            let mut seq = prompt.clone();
            for _ in 0..40 {
                let t = Tensor::from_slice(&seq).view([1, -1]);
                let logits = model.forward(&t, &opts).unwrap();
                let last = logits.get(0).get(seq.len() as i64 - 1);
                seq.push(last.argmax(0, false).int64_value(&[]));
            }
            assert_eq!(got, seq[13..], "{attention:?}");
            // 53 tokens cross many blocks (l = 8, d = 4, l' = 16) and the window (w = 32).
            assert!(got.iter().collect::<std::collections::BTreeSet<_>>().len() > 1);
        }
    }
}
