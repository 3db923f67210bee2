//! `nsa-train eval RUN_DIR --task needle|recall --len L`: long-context retrieval scored the way
//! a user meets it — the model generates each answer, and its own answer stays in its context.
//!
//! Sequences come from the synthetic tasks of `data` (`needle`: one key–value pair hidden in
//! filler, asked for at the end; `recall`: many pairs, then every key again), held out as in
//! `eval` (the run's seed plus `data.eval_seed_offset`, a rank no training process uses). Each
//! batch is prefilled up to the first answer; from there the model decodes one token per step:
//! where the task expects an answer, the model's greedy choice is scored and fed back in place
//! of the true value; everywhere else the sequence's own next token is fed.
//!
//! Each answer is also counted by its distance: from the key's occurrence in the context (the
//! needle, or the pair) to the query asking for it, in tokens. A run trained on recall with a
//! distance (`data.recall_distance` > 0) is evaluated with gaps drawn over the whole `--len`,
//! so the buckets cover distances up to the evaluated length, beyond the trained one too.
use anyhow::{ensure, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{host_row, Sampler, Sampling};
use crate::data::{self, DataConfig, DataSource, Split, TokenSource, IGNORE};
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

/// Recall's score without any key–value binding: every key is asked once, in a random order,
/// so a model can guess uniformly among the pairs' values that no earlier query has answered;
/// query j of `pairs` then has `pairs − j` candidates, and the expected accuracy is
/// H(pairs) / pairs (0.340 for 8 pairs, 0.074 for 64). Accuracy means retrieval only above it.
pub fn recall_elimination_baseline(pairs: usize) -> f64 {
    let n = pairs.max(1);
    (1..=n).map(|k| 1.0 / k as f64).sum::<f64>() / n as f64
}

/// Answers whose distance falls in `[from, to)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistanceBucket {
    pub from: usize,
    pub to: usize,
    pub answers: i64,
    pub correct: i64,
    /// NSA models, one count per NSA layer: the answers whose value token (the one after the
    /// key's earlier occurrence, what the query retrieves) lay in a block that at least one
    /// K/V group of that layer selected for the query. Says whether a miss beyond the window
    /// is the selection's (the block was not chosen) or the attention's (it was, and the
    /// answer is still wrong). Empty for dense models.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub value_block_selected: Vec<i64>,
    /// NSA models: the sum over the bucket's answers of [`blind_selection_chance`], what
    /// `value_block_selected` would count on average (per layer) if the selection ignored
    /// content; divided by `answers` it is the table's "blind choice" column. `None` for
    /// dense models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blind_selection_sum: Option<f64>,
}

impl DistanceBucket {
    pub fn accuracy(&self) -> Option<f64> {
        (self.answers > 0).then(|| self.correct as f64 / self.answers as f64)
    }
}

/// What a retrieval evaluation found.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieval {
    pub sequences: usize,
    /// Answers generated and scored.
    pub answers: i64,
    /// Of those, correct.
    pub correct: i64,
    /// The same answers by distance, in equal-width buckets covering `0..len`.
    pub by_distance: Vec<DistanceBucket>,
}

impl Retrieval {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.answers.max(1) as f64
    }

    /// Counts one answer.
    fn record(&mut self, a: &Answer) {
        self.answers += 1;
        self.correct += i64::from(a.correct);
        let b = self
            .by_distance
            .iter_mut()
            .rev()
            .find(|b| b.from <= a.distance)
            .expect("the first bucket starts at 0");
        b.answers += 1;
        b.correct += i64::from(a.correct);
        if b.value_block_selected.len() < a.value_block_selected.len() {
            b.value_block_selected
                .resize(a.value_block_selected.len(), 0);
        }
        for (n, &hit) in b
            .value_block_selected
            .iter_mut()
            .zip(&a.value_block_selected)
        {
            *n += i64::from(hit);
        }
        if let Some(p) = a.blind_selection_chance {
            *b.blind_selection_sum.get_or_insert(0.0) += p;
        }
    }
}

/// The probability that a selection blind to content holds block `value` for the query at
/// position `t`: each of `groups` K/V groups keeps its forced blocks (block 0 and the `n_local`
/// local ones, Eq. 11's rule) and picks its other `n − forced` blocks uniformly among the other
/// visible blocks `0..=⌊t/l'⌋`, independently of the other groups, so the union holds a free
/// block with probability `1 − (1 − free / candidates)^groups`. 1 when `value` is forced or
/// every visible block fits; 0 for a block after the query's.
pub fn blind_selection_chance(
    t: usize,
    value: usize,
    sel: &nsa_select::SelectConfig,
    groups: i64,
) -> f64 {
    let current = t / sel.select_len.max(1) as usize;
    if value > current {
        return 0.0;
    }
    let local_from = (current + 1).saturating_sub(sel.n_local.max(1) as usize);
    if value == 0 || value >= local_from {
        return 1.0;
    }
    // Block 0 and the local blocks, counted once when they meet.
    let forced = current + 1 - local_from + usize::from(local_from > 0);
    let candidates = current + 1 - forced;
    let free = (sel.top_n.max(0) as usize).saturating_sub(forced);
    if free >= candidates {
        return 1.0;
    }
    1.0 - (1.0 - free as f64 / candidates as f64).powi(groups.clamp(1, 1 << 16) as i32)
}

/// What `nsa-train eval --task … --json FILE` writes (and `nsa-train compare` reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// The run folder's name.
    pub run: String,
    pub attention: String,
    pub task: String,
    pub checkpoint_step: u64,
    /// The evaluated sequence length and the run's trained one.
    pub len: usize,
    pub trained_len: usize,
    pub sequences: usize,
    pub answers: i64,
    pub correct: i64,
    pub accuracy: f64,
    pub by_distance: Vec<DistanceBucket>,
    /// `--inspect`: the NSA layers' gates, contributions and value-block scores by answer class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspection: Option<super::inspect::RecallInspection>,
}

impl RetrievalReport {
    pub fn new(
        run_dir: &std::path::Path,
        run: &LoadedRun,
        task: RetrievalTask,
        len: usize,
        found: &Retrieval,
    ) -> Self {
        let name = std::path::absolute(run_dir)
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| run_dir.display().to_string());
        RetrievalReport {
            run: name,
            attention: run.model_cfg.attention.to_string(),
            task: format!("{task:?}").to_lowercase(),
            checkpoint_step: run.step,
            len,
            trained_len: run.cfg.data.seq_len,
            sequences: found.sequences,
            answers: found.answers,
            correct: found.correct,
            accuracy: found.accuracy(),
            by_distance: found.by_distance.clone(),
            inspection: None,
        }
    }

    /// Accuracy by distance as a Markdown table; for NSA models with a column of the
    /// fraction of answers whose value's block was selected, per layer.
    pub fn table(&self) -> String {
        let layers = self
            .by_distance
            .iter()
            .map(|b| b.value_block_selected.len())
            .max()
            .unwrap_or(0);
        let mut t = String::from("| distance (tokens) | answers | correct | accuracy |");
        if layers > 0 {
            t.push_str(" value's block selected, layers 1… | blind choice |");
        }
        t.push_str("\n| --- | ---: | ---: | ---: |");
        if layers > 0 {
            t.push_str(" --- | ---: |");
        }
        t.push('\n');
        for b in &self.by_distance {
            t.push_str(&format!(
                "| {}–{} | {} | {} | {} |",
                b.from,
                b.to,
                b.answers,
                b.correct,
                b.accuracy().map_or("–".to_string(), |a| format!("{a:.3}"))
            ));
            if layers > 0 {
                let fractions: Vec<String> = (0..layers)
                    .map(|l| match (b.value_block_selected.get(l), b.answers) {
                        (Some(&n), a) if a > 0 => format!("{:.2}", n as f64 / a as f64),
                        _ => "–".to_string(),
                    })
                    .collect();
                let blind = match (b.blind_selection_sum, b.answers) {
                    (Some(p), a) if a > 0 => format!("{:.2}", p / a as f64),
                    _ => "–".to_string(),
                };
                t.push_str(&format!(" {} | {blind} |", fractions.join(" ")));
            }
            t.push('\n');
        }
        t
    }
}

/// `buckets` equal-width buckets covering distances `0..len` (the last one open-ended).
pub fn distance_buckets(len: usize, buckets: usize) -> Vec<DistanceBucket> {
    let buckets = buckets.clamp(1, len.max(1));
    let width = len.div_ceil(buckets).max(1);
    (0..buckets)
        .map(|i| DistanceBucket {
            from: i * width,
            to: ((i + 1) * width).min(len),
            answers: 0,
            correct: 0,
            value_block_selected: Vec::new(),
            blind_selection_sum: None,
        })
        .filter(|b| b.from < b.to)
        .collect()
}

/// The selection block (of `l'` = `block_len` tokens) that holds the value of the key at
/// `key`: the value is the token after its key.
pub(crate) fn value_block(key: usize, block_len: usize) -> usize {
    (key + 1) / block_len
}

/// Where the key an answer at `t` asks for occurred: the latest `p < t - 1` with
/// `tokens[p] == tokens[t]` (the key, fed at `t`) and `tokens[p + 1] == answer`.
pub(crate) fn key_position(tokens: &[i64], t: usize, answer: i64) -> Option<usize> {
    let key = tokens[t];
    (0..t.saturating_sub(1))
        .rev()
        .find(|&p| tokens[p] == key && tokens[p + 1] == answer)
}

/// The held-out sequences of `task` at length `len` for `run`, in batches of `batch_size`:
/// the run's data config with the task's source, gaps over the whole `len` for a run trained
/// with a distance, and the run's evaluation seed. Batch `i` is the same for every caller.
pub(crate) fn held_out(
    run: &LoadedRun,
    task: RetrievalTask,
    len: usize,
    batch_size: usize,
) -> Result<(DataConfig, Box<dyn TokenSource>)> {
    let cfg = &run.cfg;
    let data_cfg = DataConfig {
        source: task.source(),
        seq_len: len,
        batch_size,
        // Gaps over the whole evaluated length (a run trained with a distance).
        recall_distance: if cfg.data.recall_distance > 0 { len } else { 0 },
        ..cfg.data.clone()
    };
    let src = data::open(
        &data_cfg,
        run.model_cfg.vocab_size,
        cfg.run.seed.wrapping_add(cfg.data.eval_seed_offset),
        Split::Val,
    )?;
    Ok((data_cfg, src))
}

/// Scores `samples` held-out sequences of `len` tokens of `task` by greedy generation, in
/// batches of the run's `data.batch_size`.
pub fn evaluate(
    run: &LoadedRun,
    task: RetrievalTask,
    len: usize,
    samples: usize,
    buckets: usize,
    progress: bool,
) -> Result<Retrieval> {
    ensure!(samples >= 1, "--samples must be at least 1");
    ensure!(buckets >= 1, "--buckets must be at least 1");
    let (data_cfg, src) = held_out(run, task, len, run.cfg.data.batch_size.min(samples))?;
    let opts = forward_opts(&run.cfg);
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
        by_distance: distance_buckets(len, buckets),
    };
    let mut greedy = Sampler::new(Sampling::GREEDY, 0)?;
    for batch_index in 0u64.. {
        let rows = (samples - found.sequences).min(data_cfg.batch_size);
        if rows == 0 {
            break;
        }
        let batch = src.batch(batch_index, u64::MAX - 1, rows, len)?;
        for answer in score_batch(run, &batch.input, &batch.target, &mut greedy, &opts)? {
            found.record(&answer);
        }
        found.sequences += rows;
        bar.set_position(found.sequences as u64);
        bar.set_message(format!("accuracy {:.3}", found.accuracy()));
    }
    bar.finish_and_clear();
    Ok(found)
}

/// One scored answer.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    /// Tokens from the key's earlier occurrence to the query (0: not found).
    distance: usize,
    correct: bool,
    /// NSA models, per NSA layer: whether some K/V group selected the block of the value
    /// token (the key's position + 1) for the query.
    value_block_selected: Vec<bool>,
    /// NSA models: [`blind_selection_chance`] of the value's block (0 when the key was not
    /// found); `None` for dense models.
    blind_selection_chance: Option<f64>,
}

/// Every answer of one batch, `input` and `target` int64 `[B, L]` on the CPU.
fn score_batch(
    run: &LoadedRun,
    input: &Tensor,
    target: &Tensor,
    greedy: &mut Sampler,
    opts: &nsa_attn::ForwardOpts,
) -> Result<Vec<Answer>> {
    let (b, len) = (input.size()[0] as usize, input.size()[1] as usize);
    let tokens = Vec::<i64>::try_from(input.f_flatten(0, -1)?)?;
    let targets = Vec::<i64>::try_from(target.f_flatten(0, -1)?)?;
    let scored = |row: usize, t: usize| targets[row * len + t] != IGNORE;
    let Some(first) = (0..len).find(|&t| (0..b).any(|row| scored(row, t))) else {
        return Ok(Vec::new());
    };
    // Prefill up to and including the first position whose next token is an answer.
    let prompt = input
        .f_narrow(1, 0, first as i64 + 1)?
        .f_to_device(run.device)?;
    let lengths = vec![first as i64 + 1; b];
    let pre = run.model.prefill(&prompt, &lengths, len as i64, opts)?;
    let mut cache = pre.cache;
    // Steps replay a CUDA graph where they can and gain from it (nsa_model::KvCache::use_graphs,
    // Model::decodes_faster_from_graphs).
    cache.use_graphs(run.model.decodes_faster_from_graphs());
    let mut logits = pre.logits.f_select(1, first as i64)?;
    // Each NSA layer's selected blocks for the token at t, int64 [B, Hkv, n] (−1 padded).
    let mut blocks = pre
        .blocks
        .iter()
        .map(|b| b.f_select(1, first as i64))
        .collect::<Result<Vec<_>, _>>()?;
    let select = &run.model_cfg.nsa.select;
    let block_len = select.select_len.max(1) as usize;
    let nsa = !blocks.is_empty();
    let mut scored_answers = Vec::new();
    let vocab = run.model_cfg.vocab_size as usize;
    for t in first..len {
        // One device→host copy of the batch's logits (and selections) where any row answers.
        let answering = (0..b).any(|row| scored(row, t));
        let (host, host_blocks) = if answering {
            let sel = blocks
                .iter()
                .map(|x| Ok(Vec::<i64>::try_from(x.f_flatten(0, -1)?)?))
                .collect::<Result<Vec<_>>>()?;
            (host_row(&logits)?, sel)
        } else {
            (Vec::new(), Vec::new())
        };
        let next: Vec<i64> = (0..b)
            .map(|row| -> Result<i64> {
                if scored(row, t) {
                    let guess = greedy.pick(&host[row * vocab..(row + 1) * vocab])?;
                    let answer = targets[row * len + t];
                    let row_tokens = &tokens[row * len..(row + 1) * len];
                    let key = key_position(row_tokens, t, answer);
                    let value_block = key.map(|p| value_block(p, block_len) as i64);
                    let value_block_selected = host_blocks
                        .iter()
                        .map(|sel| {
                            let per_row = sel.len() / b;
                            let row_ids = &sel[row * per_row..(row + 1) * per_row];
                            value_block.is_some_and(|v| row_ids.contains(&v))
                        })
                        .collect();
                    let blind_selection_chance = nsa.then(|| {
                        value_block.map_or(0.0, |v| {
                            let groups = run.model_cfg.n_kv_heads;
                            blind_selection_chance(t, v as usize, select, groups)
                        })
                    });
                    scored_answers.push(Answer {
                        distance: key.map_or(0, |p| t - p),
                        correct: guess == answer,
                        value_block_selected,
                        blind_selection_chance,
                    });
                    Ok(guess)
                } else if t + 1 < len {
                    Ok(tokens[row * len + t + 1])
                } else {
                    Ok(0)
                }
            })
            .collect::<Result<_>>()?;
        if t + 1 < len {
            let step = run.model.decode_step(&mut cache, &next, opts)?;
            logits = step.logits;
            blocks = step.reads.into_iter().map(|r| r.blocks).collect();
        }
    }
    Ok(scored_answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_length_and_answers_land_by_distance() {
        let b = distance_buckets(1000, 4);
        let edges: Vec<(usize, usize)> = b.iter().map(|b| (b.from, b.to)).collect();
        assert_eq!(edges, [(0, 250), (250, 500), (500, 750), (750, 1000)]);
        assert_eq!(distance_buckets(10, 4).len(), 4);
        assert_eq!(distance_buckets(3, 8).len(), 3);
        let mut r = Retrieval {
            sequences: 1,
            answers: 0,
            correct: 0,
            by_distance: b,
        };
        // Two NSA layers: whether each selected the value's block.
        for (distance, correct, sel, blind) in [
            (0, true, [true, true], 1.0),
            (249, false, [true, false], 0.5),
            (250, true, [false, true], 0.25),
            (999, true, [true, true], 1.0),
            (5000, false, [false, false], 0.75),
        ] {
            r.record(&Answer {
                distance,
                correct,
                value_block_selected: sel.to_vec(),
                blind_selection_chance: Some(blind),
            });
        }
        let counts: Vec<(i64, i64, Vec<i64>)> = r
            .by_distance
            .iter()
            .map(|b| (b.answers, b.correct, b.value_block_selected.clone()))
            .collect();
        assert_eq!(
            counts,
            [
                (2, 1, vec![2, 1]),
                (1, 1, vec![0, 1]),
                (0, 0, vec![]),
                (2, 1, vec![1, 1])
            ]
        );
        assert_eq!((r.answers, r.correct), (5, 3));
        assert_eq!(r.by_distance[2].accuracy(), None);
        let report = RetrievalReport {
            run: "r".into(),
            attention: "nsa".into(),
            task: "recall".into(),
            checkpoint_step: 1,
            len: 1000,
            trained_len: 1000,
            sequences: 1,
            answers: r.answers,
            correct: r.correct,
            accuracy: r.accuracy(),
            by_distance: r.by_distance.clone(),
            inspection: None,
        };
        insta::assert_snapshot!(report.table());
        // A dense model's answers carry no selection: no column, and none in the JSON.
        let mut dense = Retrieval {
            sequences: 1,
            answers: 0,
            correct: 0,
            by_distance: distance_buckets(10, 1),
        };
        dense.record(&Answer {
            distance: 3,
            correct: true,
            value_block_selected: Vec::new(),
            blind_selection_chance: None,
        });
        let json = serde_json::to_string(&dense.by_distance[0]).unwrap();
        assert!(!json.contains("value_block_selected"), "{json}");
        assert!(!json.contains("blind_selection_sum"), "{json}");
        assert!(!RetrievalReport {
            by_distance: dense.by_distance,
            ..report
        }
        .table()
        .contains("selected"));
    }

    /// Against a count by hand, and against a simulation of the blind choice itself.
    #[test]
    fn blind_selection_chance_counts_forced_and_free_blocks() {
        // l' 64, n 16, 2 local blocks. Query at t = 4000: current block 62, forced 0, 61, 62;
        // 13 free slots among the other 60 blocks.
        let sel = nsa_select::SelectConfig::new(32, 16, 64, 16, 2).unwrap();
        let f = 13.0 / 60.0;
        assert!((blind_selection_chance(4000, 30, &sel, 1) - f).abs() < 1e-12);
        let two = 1.0 - (1.0 - f) * (1.0 - f);
        assert!((blind_selection_chance(4000, 30, &sel, 2) - two).abs() < 1e-12);
        for forced in [0, 61, 62] {
            assert_eq!(blind_selection_chance(4000, forced, &sel, 2), 1.0);
        }
        // Everything visible fits (16 blocks or fewer), and a block after the query's.
        assert_eq!(blind_selection_chance(1000, 5, &sel, 1), 1.0);
        assert_eq!(blind_selection_chance(1000, 20, &sel, 1), 0.0);
        // One local block: block 0 and the current one are forced; t in block 1 forces both.
        let one = nsa_select::SelectConfig::new(32, 16, 64, 3, 1).unwrap();
        assert_eq!(blind_selection_chance(100, 1, &one, 1), 1.0);
        assert!((blind_selection_chance(64 * 9, 4, &one, 1) - 1.0 / 8.0).abs() < 1e-12);
        // A simulation of two groups choosing uniformly, with a fixed generator.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % m as u64) as usize
        };
        let (trials, mut hits) = (20_000, 0);
        for _ in 0..trials {
            let mut held = false;
            for _group in 0..2 {
                // 13 distinct picks from the 60 free blocks 1..=60; block 30 is one of them.
                let mut pool: Vec<usize> = (1..=60).collect();
                for k in 0..13 {
                    let j = k + next(60 - k);
                    pool.swap(k, j);
                }
                held |= pool[..13].contains(&30);
            }
            hits += usize::from(held);
        }
        let simulated = hits as f64 / trials as f64;
        assert!((simulated - two).abs() < 0.015, "{simulated} vs {two}");
    }

    #[test]
    fn the_elimination_baseline_is_the_mean_of_one_over_the_candidates_left() {
        assert_eq!(recall_elimination_baseline(1), 1.0);
        assert!((recall_elimination_baseline(2) - 0.75).abs() < 1e-12);
        assert!((recall_elimination_baseline(8) - 0.339_732_142_857).abs() < 1e-9);
        assert!((recall_elimination_baseline(64) - 0.074_123_295).abs() < 1e-9);
    }

    #[test]
    fn the_key_is_found_where_it_precedes_its_answer() {
        // key 7 with value 9 at 2..4; a decoy 7 followed by 8 at 5; asked for at 10.
        let tokens = [1, 1, 7, 9, 1, 7, 8, 1, 1, 1, 7];
        assert_eq!(key_position(&tokens, 10, 9), Some(2));
        assert_eq!(key_position(&tokens, 10, 8), Some(5));
        assert_eq!(key_position(&tokens, 10, 4), None);
    }
}
