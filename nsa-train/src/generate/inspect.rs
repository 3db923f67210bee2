//! `nsa-train eval RUN --task recall --len L --inspect`: where an NSA model's branches look when
//! it answers, and how much each branch adds — the diagnosis of a miss beyond the window.
//!
//! The same held-out sequences as the evaluation by generation (same batches), run once
//! through [`nsa_model::Model::inspect`] with the true tokens (teacher forced). For every
//! answer whose key is found in its context, split by whether the value lies within the
//! sliding window (the key at most w tokens back: the value, one after it, is among the last w)
//! or beyond it, and for every NSA layer:
//! - the **gates** `g_cmp, g_slc, g_win` (mean over heads): does the layer listen to a branch?
//! - the **contributions** `‖g_c · o_c‖` (L2 over the head's values, mean over heads): how
//!   much each branch adds to the mixed output;
//! - the **value block's score lift**: the selection score (Eqs. 8–10: the compressed
//!   branch's probabilities summed over the group's heads, mapped to blocks) of the block that
//!   holds the value, divided by the mean score of the blocks the query can see, averaged
//!   over the K/V groups. 1 is what a compressed branch blind to the pairs gives; the
//!   selection finds the pairs only where it is well above 1;
//! - **value block selected**: the fraction of answers whose value's block some group
//!   selected (the full forward's selection; the evaluation by generation counts the same in
//!   its decode).
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::retrieval::{held_out, key_position, value_block, RetrievalTask};
use crate::data::IGNORE;
use crate::train::{forward_opts, LoadedRun};

/// Sums over one class of answers (within or beyond the window) for one NSA layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnswerSums {
    pub answers: usize,
    /// Sums over the answers of the mean gate over heads, `[cmp, slc, win]`.
    pub gate_sum: [f64; 3],
    /// Sums over the answers of the mean over heads of `‖g_c · o_c‖`, `[cmp, slc, win]`.
    pub contribution_sum: [f64; 3],
    /// Sum over the answers of the value block's score lift (mean over groups).
    pub value_lift_sum: f64,
    /// Answers whose value's block some group selected.
    pub value_selected: usize,
}

impl AnswerSums {
    fn mean(&self, sum: f64) -> Option<f64> {
        (self.answers > 0).then(|| sum / self.answers as f64)
    }
}

/// One NSA layer's sums, within the window and beyond it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSums {
    /// The block's index in the stack (0-based).
    pub block: usize,
    pub within_window: AnswerSums,
    pub beyond_window: AnswerSums,
}

/// What `--inspect` found (the `inspection` field of `eval --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallInspection {
    /// The window w: answers whose key is at most w tokens back are "within".
    pub window: usize,
    pub sequences: usize,
    /// Teacher-forced answers within / beyond the window, and how many the argmax got right.
    pub answers: [usize; 2],
    pub correct: [usize; 2],
    pub layers: Vec<LayerSums>,
}

impl RecallInspection {
    /// The per-layer table, Markdown.
    pub fn table(&self) -> String {
        let acc = |i: usize| match self.answers[i] {
            0 => "–".to_string(),
            n => format!("{:.3}", self.correct[i] as f64 / n as f64),
        };
        let mut t = format!(
            "teacher forced, {} sequences: accuracy {} within the window (w = {}, {} answers), {} beyond it ({} answers)\n\n",
            self.sequences,
            acc(0),
            self.window,
            self.answers[0],
            acc(1),
            self.answers[1]
        );
        t.push_str("| layer | answers | gate cmp / slc / win | ‖g·o‖ cmp / slc / win | value block: score lift | selected |\n");
        t.push_str("| --- | --- | --- | --- | ---: | ---: |\n");
        for layer in &self.layers {
            for (name, s) in [
                ("within", &layer.within_window),
                ("beyond", &layer.beyond_window),
            ] {
                if s.answers == 0 {
                    continue;
                }
                let three = |sum: &[f64; 3]| {
                    sum.iter()
                        .map(|&x| format!("{:.3}", s.mean(x).unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(" / ")
                };
                t.push_str(&format!(
                    "| {} | {} {} | {} | {} | {:.2} | {:.3} |\n",
                    layer.block + 1,
                    s.answers,
                    name,
                    three(&s.gate_sum),
                    three(&s.contribution_sum),
                    s.mean(s.value_lift_sum).unwrap_or(0.0),
                    s.mean(s.value_selected as f64).unwrap_or(0.0),
                ));
            }
        }
        t
    }
}

/// One answer of a batch: row, position, key position.
struct Site {
    row: usize,
    t: usize,
    key: usize,
}

/// Whether `run` can be inspected (an NSA model): `eval` asks before it evaluates.
pub fn check_run(run: &LoadedRun) -> Result<()> {
    ensure!(
        run.model_cfg.attention == nsa_model::AttentionKind::Nsa,
        "--inspect looks inside NSA layers; this run's attention is {}",
        run.model_cfg.attention
    );
    Ok(())
}

/// Inspects `samples` held-out recall sequences of `len` tokens (the batches
/// [`super::retrieval::evaluate`] scores) with an NSA run's model.
pub fn inspect_recall(run: &LoadedRun, len: usize, samples: usize) -> Result<RecallInspection> {
    ensure!(samples >= 1, "--samples must be at least 1");
    check_run(run)?;
    let batch_size = run.cfg.data.batch_size.min(samples);
    let (_, src) = held_out(run, RetrievalTask::Recall, len, batch_size)?;
    let opts = forward_opts(&run.cfg);
    let window = run.model_cfg.nsa.window.max(1) as usize;
    let mut found = RecallInspection {
        window,
        sequences: 0,
        answers: [0; 2],
        correct: [0; 2],
        layers: Vec::new(),
    };
    for batch_index in 0u64.. {
        let rows = (samples - found.sequences).min(batch_size);
        if rows == 0 {
            break;
        }
        let batch = src.batch(batch_index, u64::MAX - 1, rows, len)?;
        tch::no_grad(|| inspect_batch(run, &batch.input, &batch.target, &opts, &mut found))?;
        found.sequences += rows;
    }
    Ok(found)
}

/// Whether the value of the key at `key` (at `key + 1`) lies outside the window of `window`
/// keys ending at the query `t`: `t − (key + 1) ≥ w`.
fn beyond_window(t: usize, key: usize, window: usize) -> bool {
    t - key > window
}

/// Where the scores of (`row`, query `t_rel` of the rows scored, group `g`) start in the
/// flattened `[B, T, G, Nb]` scores, `(T, G, Nb)` = `dims`.
fn score_row_start(row: usize, t_rel: usize, g: usize, dims: (usize, usize, usize)) -> usize {
    let (rows, groups, blocks) = dims;
    ((row * rows + t_rel) * groups + g) * blocks
}

/// The score of block `value` over the mean score of the blocks a query sees (`visible`, its
/// group's scores of blocks `0 ..= ⌊t / l'⌋`); 0 when they are all 0 (no compressed token
/// visible yet).
fn score_lift(visible: &[f32], value: usize) -> f64 {
    let mean = visible.iter().map(|&x| f64::from(x)).sum::<f64>() / visible.len() as f64;
    if mean > 0.0 {
        f64::from(visible[value]) / mean
    } else {
        0.0
    }
}

/// Adds one batch (`input`, `target` int64 `[B, L]` on the CPU) to `found`.
fn inspect_batch(
    run: &LoadedRun,
    input: &Tensor,
    target: &Tensor,
    opts: &nsa_attn::ForwardOpts,
    found: &mut RecallInspection,
) -> Result<()> {
    let (b, len) = (input.size()[0] as usize, input.size()[1] as usize);
    let tokens = Vec::<i64>::try_from(input.f_flatten(0, -1)?)?;
    let targets = Vec::<i64>::try_from(target.f_flatten(0, -1)?)?;
    let mut sites = Vec::new();
    for row in 0..b {
        let row_tokens = &tokens[row * len..(row + 1) * len];
        for t in 0..len {
            let answer = targets[row * len + t];
            if answer == IGNORE {
                continue;
            }
            if let Some(key) = key_position(row_tokens, t, answer) {
                sites.push(Site { row, t, key });
            }
        }
    }
    let Some(t0) = sites.iter().map(|s| s.t).min() else {
        return Ok(());
    };
    let (logits, layers) = run.model.inspect(&input.f_to_device(run.device)?, opts)?;
    let guesses = Vec::<i64>::try_from(logits.f_argmax(-1, false)?.f_flatten(0, -1)?)?;
    let class = |s: &Site| usize::from(beyond_window(s.t, s.key, found.window));
    for s in &sites {
        found.answers[class(s)] += 1;
        found.correct[class(s)] +=
            usize::from(guesses[s.row * len + s.t] == targets[s.row * len + s.t]);
    }
    let cfg = &run.model_cfg;
    let sel = &cfg.nsa.select;
    let (heads, groups) = (cfg.n_heads as usize, cfg.n_kv_heads as usize);
    let block_len = sel.select_len.max(1) as usize;
    let num_blocks = len.div_ceil(block_len);
    if found.layers.is_empty() {
        found.layers = layers
            .iter()
            .map(|l| LayerSums {
                block: l.block,
                within_window: AnswerSums::default(),
                beyond_window: AnswerSums::default(),
            })
            .collect();
    }
    ensure!(
        found.layers.len() == layers.len(),
        "the model inspected {} NSA layers, then {}",
        found.layers.len(),
        layers.len()
    );
    for (sums, layer) in found.layers.iter_mut().zip(&layers) {
        let br = &layer.branches;
        let gates = br.gates.f_to_kind(Kind::Float)?;
        let contributions = Tensor::f_stack(
            &[&br.compressed, &br.selected, &br.window]
                .iter()
                .enumerate()
                .map(|(c, o)| {
                    o.f_to_kind(Kind::Float)?
                        .f_mul(&gates.f_narrow(3, c as i64, 1)?)?
                        .f_square()?
                        .f_sum_dim_intlist(-1, false, Kind::Float)?
                        .f_sqrt()
                })
                .collect::<Result<Vec<_>, _>>()?,
            -1,
        )?;
        // Mean over heads: [B, S, 3].
        let gates =
            Vec::<f32>::try_from(gates.f_mean_dim(2, false, Kind::Float)?.f_flatten(0, -1)?)?;
        let contributions = Vec::<f32>::try_from(
            contributions
                .f_mean_dim(2, false, Kind::Float)?
                .f_flatten(0, -1)?,
        )?;
        let blocks = Vec::<i64>::try_from(br.blocks.f_flatten(0, -1)?)?;
        let per_token = blocks.len() / (b * len);
        // Selection scores of the rows t0.. only: [B, T, Hkv, Nb].
        let q = br.projections.q.f_narrow(1, t0 as i64, (len - t0) as i64)?;
        let p = nsa_select::compressed_probs(&q, &br.projections.cmp_k, t0 as i64, sel)
            .context("the compressed probabilities of the answers")?;
        let scores = nsa_select::block_scores(&p, (heads / groups) as i64, num_blocks as i64, sel)
            .context("the selection scores of the answers")?;
        let scores = Vec::<f32>::try_from(scores.f_flatten(0, -1)?)?;
        let rows_t = len - t0;
        for s in &sites {
            let sums = match class(s) {
                0 => &mut sums.within_window,
                _ => &mut sums.beyond_window,
            };
            sums.answers += 1;
            let at = s.row * len + s.t;
            for c in 0..3 {
                sums.gate_sum[c] += f64::from(gates[at * 3 + c]);
                sums.contribution_sum[c] += f64::from(contributions[at * 3 + c]);
            }
            let value_block = value_block(s.key, block_len);
            let ids = &blocks[at * per_token..(at + 1) * per_token];
            sums.value_selected += usize::from(ids.contains(&(value_block as i64)));
            let visible = s.t / block_len + 1;
            let lift: f64 = (0..groups)
                .map(|g| {
                    let start = score_row_start(s.row, s.t - t0, g, (rows_t, groups, num_blocks));
                    score_lift(&scores[start..start + visible], value_block)
                })
                .sum();
            sums.value_lift_sum += lift / groups as f64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lift_is_the_blocks_score_over_the_mean_it_competes_with() {
        // Mean 2: the third block holds twice it, the first half.
        assert_eq!(score_lift(&[1.0, 1.0, 4.0, 2.0], 2), 2.0);
        assert_eq!(score_lift(&[1.0, 1.0, 4.0, 2.0], 0), 0.5);
        assert_eq!(score_lift(&[0.0, 0.0], 1), 0.0);
    }

    /// The flat index names the element libtorch holds at [row, t, g, 0].
    #[test]
    fn score_rows_are_found_in_the_flattened_scores() {
        let dims = [2i64, 3, 2, 5];
        let scores = Tensor::arange(
            dims.iter().product::<i64>(),
            (Kind::Float, tch::Device::Cpu),
        )
        .reshape(dims);
        let flat = Vec::<f32>::try_from(scores.flatten(0, -1)).unwrap();
        for (row, t, g) in [(0, 0, 0), (1, 2, 1), (0, 1, 1), (1, 0, 0)] {
            let start = score_row_start(row, t, g, (3, 2, 5));
            for j in 0..5 {
                let want = scores.double_value(&[row as i64, t as i64, g as i64, j]);
                assert_eq!(f64::from(flat[start + j as usize]), want);
            }
        }
    }

    #[test]
    fn the_window_holds_the_last_w_positions() {
        // w = 4, query at 10: the window holds 7..=10, so a value at 7 (key 6) is within it.
        assert!(!beyond_window(10, 6, 4));
        assert!(beyond_window(10, 5, 4));
        assert!(!beyond_window(10, 9, 4));
    }

    #[test]
    fn the_table_shows_means_per_class_and_skips_empty_classes() {
        let within = AnswerSums {
            answers: 2,
            gate_sum: [1.0, 0.5, 1.5],
            contribution_sum: [0.2, 0.4, 2.0],
            value_lift_sum: 3.0,
            value_selected: 2,
        };
        let found = RecallInspection {
            window: 512,
            sequences: 1,
            answers: [2, 0],
            correct: [1, 0],
            layers: vec![LayerSums {
                block: 0,
                within_window: within,
                beyond_window: AnswerSums::default(),
            }],
        };
        insta::assert_snapshot!(found.table());
    }
}
