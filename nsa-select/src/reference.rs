//! The reference path: every step is a plain Rust loop over host `Vec`s, written to be read
//! against the NSA semantics in ARCHITECTURE.md rather than to be fast.
//!
//! Each function copies its input tensor to the host, loops over (batch, query, group) rows and
//! returns its result on the input's device. The signatures, layouts and errors are the same as
//! in [`crate::vectorized`]; the two must give identical results (the tests check it).
use tch::{Device, Kind, Tensor};

use crate::config::interval_overlap;
use crate::{check, Ranges, SelectConfig, SelectError, Selection};

/// Block scores (Eqs. 9 and 10) from compressed-attention probabilities, by loops; see
/// [`crate::block_scores`] for the details.
///
/// Layout: `p_cmp` `[B, T, H, Nc]` (any float dtype) → `[B, T, G, Nb]` f32, `G = H / h`.
///
/// For each (batch, query, group) row: the group's `h` heads are added in head order, then
/// each block `j` adds, for compressed tokens `i` in ascending order, the literal Eq. 9 term
/// `|[i·d, i·d + l) ∩ [j·l', (j+1)·l')| / d · p[i]` (only the `i` whose interval can meet the
/// block are visited; tokens `i ≥ Nc` count as zero).
pub fn block_scores(
    p_cmp: &Tensor,
    heads_per_group: i64,
    num_blocks: i64,
    cfg: &SelectConfig,
) -> Result<Tensor, SelectError> {
    let [batch, rows, heads, num_cmp] =
        check::compressed_probs_input(p_cmp, heads_per_group, num_blocks, cfg)?;
    let groups = heads / heads_per_group;
    let probs: Vec<f32> = host_vec(&p_cmp.f_to_kind(Kind::Float)?)?;
    let (h, nc, nb) = (
        heads_per_group as usize,
        num_cmp as usize,
        num_blocks as usize,
    );
    let mut scores = vec![0f32; (batch * rows * groups) as usize * nb];
    let mut group_sum = vec![0f32; nc];
    for row in 0..(batch * rows) as usize {
        for g in 0..groups as usize {
            let head_row = |head: usize| &probs[(row * heads as usize + head) * nc..][..nc];
            group_sum.copy_from_slice(head_row(g * h));
            for head in g * h + 1..(g + 1) * h {
                for (sum, p) in group_sum.iter_mut().zip(head_row(head)) {
                    *sum += *p;
                }
            }
            let out = &mut scores[(row * groups as usize + g) * nb..][..nb];
            for (j, score) in out.iter_mut().enumerate() {
                let (block_start, block_end) =
                    (j as i64 * cfg.select_len, (j as i64 + 1) * cfg.select_len);
                // Compressed tokens whose interval [i·d, i·d + l) can meet the block.
                let first = (block_start - cfg.block_len).div_euclid(cfg.stride) + 1;
                let last = (block_end - 1).div_euclid(cfg.stride);
                let mut acc = 0f32;
                for i in first.max(0)..=last.min(num_cmp - 1) {
                    let token_start = i * cfg.stride;
                    let overlap = interval_overlap(
                        token_start,
                        token_start + cfg.block_len,
                        block_start,
                        block_end,
                    );
                    if overlap > 0 {
                        let weight = (overlap / cfg.stride) as f32;
                        acc += weight * group_sum[i as usize];
                    }
                }
                *score = acc;
            }
        }
    }
    to_device(
        &scores,
        &[batch, rows, groups, num_blocks],
        Kind::Float,
        p_cmp.device(),
    )
}

/// Causal top-n block choice (Eq. 11), by loops; see [`crate::select_blocks`] for the
/// rules.
///
/// Layout: `scores` `[B, T, G, Nb]` f32 for queries `t0 .. t0 + T` → `[B, T, G, n]` i64,
/// ascending, −1 padded.
pub fn select_blocks(scores: &Tensor, t0: i64, cfg: &SelectConfig) -> Result<Tensor, SelectError> {
    let [batch, rows, groups, num_blocks] = check::block_scores_input(scores, t0, cfg)?;
    let values: Vec<f32> = host_vec(scores)?;
    let (nb, n) = (num_blocks as usize, cfg.top_n as usize);
    let mut chosen_ids = vec![-1i64; (batch * rows * groups) as usize * n];
    for b in 0..batch {
        for r in 0..rows {
            let t = t0 + r;
            let current = cfg.current_block(t);
            for g in 0..groups {
                let row = ((b * rows + r) * groups + g) as usize;
                let row_scores = &values[row * nb..][..nb];
                let chosen = choose_row(row_scores, current, cfg);
                chosen_ids[row * n..][..chosen.len()].copy_from_slice(&chosen);
            }
        }
    }
    to_device(
        &chosen_ids,
        &[batch, rows, groups, cfg.top_n],
        Kind::Int64,
        scores.device(),
    )
}

/// The selection of one row: sorted block ids (without padding).
fn choose_row(scores: &[f32], current: i64, cfg: &SelectConfig) -> Vec<i64> {
    let candidates: Vec<i64> = (0..=current).collect();
    if candidates.len() as i64 <= cfg.top_n {
        return candidates;
    }
    let is_forced = |j: i64| j == 0 || j > current - cfg.n_local;
    let (mut chosen, mut others): (Vec<i64>, Vec<i64>) =
        candidates.into_iter().partition(|&j| is_forced(j));
    // Highest score first; equal scores (−0.0 equals +0.0) go to the lower block index.
    let better = |a: &i64, b: &i64| {
        let (sa, sb) = (
            positive_zero(scores[*a as usize]),
            positive_zero(scores[*b as usize]),
        );
        sb.total_cmp(&sa).then(a.cmp(b))
    };
    let free_slots = cfg.top_n as usize - chosen.len();
    if free_slots < others.len() {
        // `better` is a total order, so the first `free_slots` after partitioning are the
        // unique top ones.
        others.select_nth_unstable_by(free_slots, better);
        others.truncate(free_slots);
    }
    chosen.extend(others);
    chosen.sort_unstable();
    chosen
}

/// −0.0 → +0.0, so that `total_cmp` treats the two zeros as equal (it orders −0.0 first).
fn positive_zero(x: f32) -> f32 {
    if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// Block ids → merged token ranges, by loops; see [`crate::ranges_from_blocks`] for the rules.
///
/// Layout: `blocks` `[B, T, G, m]` i64 for queries `t0 .. t0 + T` → `ranges`
/// `[B, T, G, m, 2]` i64 (`[start, end)`, `(0, 0)` padded) and `counts` `[B, T, G]` i64.
pub fn ranges_from_blocks(
    blocks: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
) -> Result<Ranges, SelectError> {
    let [batch, rows, groups, width] = check::block_ids_input(blocks, t0, cfg)?;
    let ids: Vec<i64> = host_vec(blocks)?;
    let m = width as usize;
    let row_count = (batch * rows * groups) as usize;
    let mut ranges = vec![0i64; row_count * m * 2];
    let mut counts = vec![0i64; row_count];
    for b in 0..batch {
        for r in 0..rows {
            let t = t0 + r;
            for g in 0..groups {
                let row = ((b * rows + r) * groups + g) as usize;
                let row_ranges = merge_row(&ids[row * m..][..m], t, cfg);
                counts[row] = row_ranges.len() as i64;
                for (slot, (start, end)) in row_ranges.into_iter().enumerate() {
                    ranges[(row * m + slot) * 2] = start;
                    ranges[(row * m + slot) * 2 + 1] = end;
                }
            }
        }
    }
    let device = blocks.device();
    Ok(Ranges {
        ranges: to_device(
            &ranges,
            &[batch, rows, groups, width, 2],
            Kind::Int64,
            device,
        )?,
        counts: to_device(&counts, &[batch, rows, groups], Kind::Int64, device)?,
    })
}

/// The ranges of one row of block ids for query `t`.
fn merge_row(ids: &[i64], t: i64, cfg: &SelectConfig) -> Vec<(i64, i64)> {
    let current = cfg.current_block(t);
    // Padding (negative ids) and blocks that start after t are dropped.
    let mut kept: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|&j| 0 <= j && j <= current)
        .collect();
    kept.sort_unstable();
    kept.dedup();
    // Runs of consecutive block ids, as (first, last).
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for j in kept {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == j => *last = j,
            _ => runs.push((j, j)),
        }
    }
    runs.into_iter()
        .map(|(first, last)| {
            (
                first * cfg.select_len,
                ((last + 1) * cfg.select_len).min(t + 1),
            )
        })
        .filter(|(start, end)| start < end)
        .collect()
}

/// The whole pipeline by loops: [`block_scores`] → [`select_blocks`] → [`ranges_from_blocks`];
/// see [`crate::select_ranges`].
///
/// Layout: `p_cmp` `[B, T, H, Nc]` for queries `t0 .. t0 + T` → `blocks` `[B, T, G, n]`,
/// `ranges` `[B, T, G, n, 2]`, `counts` `[B, T, G]` (all i64).
pub fn select_ranges(
    p_cmp: &Tensor,
    t0: i64,
    heads_per_group: i64,
    num_blocks: i64,
    cfg: &SelectConfig,
) -> Result<Selection, SelectError> {
    let scores = block_scores(p_cmp, heads_per_group, num_blocks, cfg)?;
    let blocks = select_blocks(&scores, t0, cfg)?;
    let Ranges { ranges, counts } = ranges_from_blocks(&blocks, t0, cfg)?;
    Ok(Selection {
        blocks,
        ranges,
        counts,
    })
}

/// All elements of `tensor` in row-major order, on the host.
fn host_vec<T: tch::kind::Element + Copy>(tensor: &Tensor) -> Result<Vec<T>, SelectError> {
    let numel = tensor.numel();
    let mut out = vec![T::ZERO; numel];
    if numel > 0 {
        tensor.f_copy_data(&mut out, numel)?;
    }
    Ok(out)
}

fn to_device<T: tch::kind::Element>(
    data: &[T],
    shape: &[i64],
    kind: Kind,
    device: Device,
) -> Result<Tensor, SelectError> {
    let host = if data.is_empty() {
        Tensor::f_zeros(shape, (kind, Device::Cpu))?
    } else {
        Tensor::f_from_slice(data)?.f_view(shape)?
    };
    Ok(host.f_to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_row_by_hand() {
        // l' = 1, n = 4, n_local = 2: at t = 7 candidates 0..=7, forced 0, 6, 7; one free slot.
        let cfg = SelectConfig::new(1, 1, 1, 4, 2).unwrap();
        let scores = [0.0, 0.1, 0.9, 0.3, 0.9, 0.2, 5.0, 5.0];
        // One free slot: 2 and 4 tie at 0.9, the lower index wins.
        assert_eq!(choose_row(&scores, 7, &cfg), vec![0, 2, 6, 7]);
        // At most n candidates: all of them, whatever the scores.
        assert_eq!(choose_row(&scores, 3, &cfg), vec![0, 1, 2, 3]);
        assert_eq!(choose_row(&scores, 0, &cfg), vec![0]);
    }

    #[test]
    fn merge_row_by_hand() {
        let cfg = SelectConfig::new(1, 1, 4, 2, 1).unwrap();
        // t = 13: blocks 0..=3 exist; 7 starts after t; −1 is padding.
        assert_eq!(
            merge_row(&[3, 1, -1, 0, 7, 1], 13, &cfg),
            vec![(0, 8), (12, 14)]
        );
        assert_eq!(merge_row(&[2, 0], 13, &cfg), vec![(0, 4), (8, 12)]);
        assert_eq!(merge_row(&[-1, -1], 13, &cfg), vec![]);
    }

    #[test]
    fn block_scores_by_hand() {
        // Paper lengths (weights [1, 2, 2, 2, 1] on i = 4j − 1 … 4j + 3), one group of two
        // heads, 5 compressed tokens with group sums [1.5, 2, 0, 4, 8]: block 0 (tokens
        // 0..64) gets 2·1.5 + 2·2 + 2·0 + 1·4 = 11 (token −1 does not exist), block 1 (64..128)
        // gets 1·4 + 2·8 = 20 (tokens 5..7 do not exist).
        let cfg = SelectConfig::paper();
        let p = Tensor::from_slice(&[1.0f32, 2.0, 0.0, 4.0, 8.0, 0.5, 0.0, 0.0, 0.0, 0.0])
            .view([1, 1, 2, 5]);
        let scores = block_scores(&p, 2, 2, &cfg).unwrap();
        let values = host_vec::<f32>(&scores).unwrap();
        assert_eq!(values, vec![11.0, 20.0]);
    }
}
