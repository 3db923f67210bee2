//! `nsa-train eval RUN_DIR --task needle|recall --len L`: long-context retrieval scored the way
//! a user meets it — the model generates each answer, and its own answer stays in its context.
//!
//! Sequences come from the synthetic tasks of `data` (`needle`: one key–value pair hidden in
//! filler, asked for at the end; `recall`: many pairs, then every key again), held out as in
//! `eval` (the run's seed plus `data.eval_seed_offset`, a rank no training process uses). Each
//! batch is prefilled up to the first answer; from there the model decodes one token per step:
//! where the task expects an answer, the model's greedy choice is scored and fed back in place
//! of the true value; everywhere else the sequence's own next token is fed.
use anyhow::{ensure, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tch::Tensor;

use super::{host_row, Sampler, Sampling};
use crate::data::{self, DataConfig, DataSource, IGNORE};
use crate::train::{forward_opts, LoadedRun};

/// The synthetic retrieval tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RetrievalTask {
    /// One key–value pair at a random depth, asked for once at the end.
    Needle,
    /// `data.recall_pairs` pairs, then every key again (each answer scored).
    Recall,
}

impl RetrievalTask {
    fn source(self) -> DataSource {
        match self {
            RetrievalTask::Needle => DataSource::Needle,
            RetrievalTask::Recall => DataSource::Recall,
        }
    }
}

/// What a retrieval evaluation found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retrieval {
    pub sequences: usize,
    /// Answers generated and scored.
    pub answers: i64,
    /// Of those, correct.
    pub correct: i64,
}

impl Retrieval {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.answers.max(1) as f64
    }
}

/// Scores `samples` held-out sequences of `len` tokens of `task` by greedy generation, in
/// batches of the run's `data.batch_size`.
pub fn evaluate(
    run: &LoadedRun,
    task: RetrievalTask,
    len: usize,
    samples: usize,
    progress: bool,
) -> Result<Retrieval> {
    ensure!(samples >= 1, "--samples must be at least 1");
    let cfg = &run.cfg;
    let data_cfg = DataConfig {
        source: task.source(),
        seq_len: len,
        batch_size: cfg.data.batch_size.min(samples),
        ..cfg.data.clone()
    };
    let src = data::open(
        &data_cfg,
        run.model_cfg.vocab_size,
        cfg.run.seed.wrapping_add(cfg.data.eval_seed_offset),
    )?;
    let opts = forward_opts(cfg);
    let bar = if progress {
        ProgressBar::new(samples as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} sequences [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut found = Retrieval {
        sequences: 0,
        answers: 0,
        correct: 0,
    };
    let mut greedy = Sampler::new(Sampling::GREEDY, 0)?;
    for batch_index in 0u64.. {
        let rows = (samples - found.sequences).min(data_cfg.batch_size);
        if rows == 0 {
            break;
        }
        let batch = src.batch(batch_index, u64::MAX - 1, rows, len)?;
        let (c, a) = score_batch(run, &batch.input, &batch.target, &mut greedy, &opts)?;
        found.correct += c;
        found.answers += a;
        found.sequences += rows;
        bar.set_position(found.sequences as u64);
        bar.set_message(format!("accuracy {:.3}", found.accuracy()));
    }
    bar.finish_and_clear();
    Ok(found)
}

/// (correct, scored) answers of one batch, `input` and `target` int64 `[B, L]` on the CPU.
fn score_batch(
    run: &LoadedRun,
    input: &Tensor,
    target: &Tensor,
    greedy: &mut Sampler,
    opts: &nsa_attn::ForwardOpts,
) -> Result<(i64, i64)> {
    let (b, len) = (input.size()[0] as usize, input.size()[1] as usize);
    let tokens = Vec::<i64>::try_from(input.f_flatten(0, -1)?)?;
    let targets = Vec::<i64>::try_from(target.f_flatten(0, -1)?)?;
    let scored = |row: usize, t: usize| targets[row * len + t] != IGNORE;
    let Some(first) = (0..len).find(|&t| (0..b).any(|row| scored(row, t))) else {
        return Ok((0, 0));
    };
    // Prefill up to and including the first position whose next token is an answer.
    let prompt = input
        .f_narrow(1, 0, first as i64 + 1)?
        .f_to_device(run.device)?;
    let lengths = vec![first as i64 + 1; b];
    let pre = run.model.prefill(&prompt, &lengths, len as i64, opts)?;
    let mut cache = pre.cache;
    let mut logits = pre.logits.f_select(1, first as i64)?;
    let (mut correct, mut answers) = (0, 0);
    let vocab = run.model_cfg.vocab_size as usize;
    for t in first..len {
        // One device→host copy of the batch's logits where any row answers.
        let host = if (0..b).any(|row| scored(row, t)) {
            host_row(&logits)?
        } else {
            Vec::new()
        };
        let next: Vec<i64> = (0..b)
            .map(|row| -> Result<i64> {
                if scored(row, t) {
                    let guess = greedy.pick(&host[row * vocab..(row + 1) * vocab])?;
                    answers += 1;
                    correct += i64::from(guess == targets[row * len + t]);
                    Ok(guess)
                } else if t + 1 < len {
                    Ok(tokens[row * len + t + 1])
                } else {
                    Ok(0)
                }
            })
            .collect::<Result<_>>()?;
        if t + 1 < len {
            logits = run.model.decode_step(&mut cache, &next, opts)?.logits;
        }
    }
    Ok((correct, answers))
}
