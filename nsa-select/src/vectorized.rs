//! The vectorized path: libtorch tensor ops only, no per-row host loop, on whatever device the
//! input lives on (CPU or CUDA).
//!
//! Signatures, layouts and errors are those of [`crate::reference`], and the results are
//! identical, bit for bit:
//! - the floating-point work ([`block_scores`]) is a fixed sequence of elementwise adds and
//!   multiplications in the same order as the reference loop, never a reduction kernel that
//!   could reassociate;
//! - the top-n choice ranks unique 64-bit integer keys, so ties cannot be broken differently
//!   by the sorting kernel of one device or another.
//!
//! The host loops that remain run over taps or heads (a handful), never over rows.
use tch::{Device, Kind, Tensor};

use crate::{check, Ranges, SelectConfig, SelectError, Selection};

/// Block scores (Eqs. 9 and 10) from compressed-attention probabilities, with tensor ops; see
/// [`crate::block_scores`] for the details.
///
/// Layout: `p_cmp` `[B, T, H, Nc]` (any float dtype) → `[B, T, G, Nb]` f32, `G = H / h`.
///
/// The group sum adds the `h` head slices one after the other (as the reference does); the
/// overlap mapping adds, tap by tap, a strided slice of the group sums times the tap's integer
/// weight into the blocks that tap reaches (no dense `[Nc, Nb]` matrix, no padding copy).
pub fn block_scores(
    p_cmp: &Tensor,
    heads_per_group: i64,
    num_blocks: i64,
    cfg: &SelectConfig,
) -> Result<Tensor, SelectError> {
    let [batch, rows, heads, num_cmp] =
        check::compressed_probs_input(p_cmp, heads_per_group, num_blocks, cfg)?;
    let groups = heads / heads_per_group;
    let probs = p_cmp.f_to_kind(Kind::Float)?;
    let per_head = probs.f_reshape([batch, rows, groups, heads_per_group, num_cmp])?;
    // [B, T, G, Nc]; a view of p_cmp when h = 1.
    let mut group_sum = per_head.f_select(3, 0)?;
    for head in 1..heads_per_group {
        let next = per_head.f_select(3, head)?;
        if head == 1 {
            group_sum = group_sum.f_add(&next)?;
        } else {
            let _ = group_sum.f_add_(&next)?;
        }
    }
    let scores = Tensor::f_zeros(
        [batch, rows, groups, num_blocks],
        (Kind::Float, p_cmp.device()),
    )?;
    let taps = cfg.overlap_taps();
    for (tap, &weight) in (0i64..).zip(&taps.weights) {
        // Block j reads compressed token i = j·step + offset; keep the j with 0 ≤ i < Nc.
        let offset = taps.compressed_index(0, tap);
        let first_block = ceil_div(-offset, taps.step).max(0);
        let end_block = ceil_div(num_cmp - offset, taps.step).min(num_blocks);
        if first_block >= end_block {
            continue;
        }
        let count = end_block - first_block;
        let first_token = first_block * taps.step + offset;
        let tokens = group_sum.f_slice(
            3,
            first_token,
            first_token + (count - 1) * taps.step + 1,
            taps.step,
        )?;
        let term = if weight == 1 {
            tokens
        } else {
            tokens.f_mul_scalar(weight as f64)?
        };
        let _ = scores.f_narrow(3, first_block, count)?.f_add_(&term)?;
    }
    Ok(scores)
}

fn ceil_div(numerator: i64, denominator: i64) -> i64 {
    -((-numerator).div_euclid(denominator))
}

/// Offset that lifts forced blocks above every score key (those lie in `[−2^62, 2^62)`).
const FORCED_KEY: i64 = 1 << 62;
/// Offset that sinks non-candidate blocks below every score key.
const NON_CANDIDATE_KEY: i64 = i64::MIN;

/// Causal top-n block choice (Eq. 11) with tensor ops; see [`crate::select_blocks`] for the
/// rules.
///
/// Layout: `scores` `[B, T, G, Nb]` f32 for queries `t0 .. t0 + T` → `[B, T, G, n]` i64,
/// ascending, −1 padded.
///
/// Each score becomes a unique `i64` key: its f32 bits mapped to an `i32` whose signed order is
/// `f32::total_cmp`'s (with −0.0 equal to +0.0), times 2^31, plus `Nb − 1 − j` (so lower blocks
/// win ties). Forced blocks get keys above all scores and non-candidates keys below; `topk` of the
/// keys then picks exactly the reference's set on any device, and a sort orders it.
pub fn select_blocks(scores: &Tensor, t0: i64, cfg: &SelectConfig) -> Result<Tensor, SelectError> {
    let [batch, rows, groups, num_blocks] = check::block_scores_input(scores, t0, cfg)?;
    let device = scores.device();
    let n = cfg.top_n;
    if batch * rows * groups == 0 {
        return Ok(Tensor::f_full(
            [batch, rows, groups, n],
            -1,
            (Kind::Int64, device),
        )?);
    }
    // [1, T, 1, 1]: the current block ⌊t / l'⌋ of each query row.
    let current = query_positions(t0, rows, device)?.f_floor_divide_scalar(cfg.select_len)?;
    // [Nb]: Nb − 1 − j, the tie-break part of the key.
    let rank = Tensor::f_arange_start_step(num_blocks - 1, -1, -1, (Kind::Int64, device))?;

    // Sign-magnitude f32 bits → an i32 whose signed order is `f32::total_cmp`'s order with −0.0
    // made equal to +0.0: non-negative bits stay, negative ones become −magnitude (−0.0 → 0).
    // Integer ops only, so NaN payloads and signs are kept exactly on every device (float
    // arithmetic on CUDA would canonicalise NaNs).
    let bits = scores.f_contiguous()?.f_view_dtype(Kind::Int)?;
    let mut negated_magnitude = bits.f_bitwise_and(0x7FFF_FFFF_i64)?;
    let _ = negated_magnitude.f_neg_()?;
    let ordered = negated_magnitude.f_where_self(&bits.f_lt(0)?, &bits)?;
    drop(negated_magnitude);
    // keys = rank + ordered · 2^31 in one i64 pass (addcmul promotes the i32 operand).
    let shift = Tensor::f_scalar_tensor(1_i64 << 31, (Kind::Int64, device))?;
    let keys = rank.f_addcmul(&ordered, &shift)?;
    drop((bits, ordered));

    // Forced and non-candidate blocks: block 0 (always forced), and the band of blocks that are
    // local or not yet candidates for some row of this chunk. Blocks left of the band are
    // plain candidates for every row, so only the band and column 0 are rewritten.
    let _ = keys
        .f_narrow(3, 0, 1)?
        .f_fill_(FORCED_KEY + num_blocks - 1)?;
    let band_start = (cfg.current_block(t0) - cfg.n_local + 1).max(1);
    if band_start < num_blocks {
        let band_len = num_blocks - band_start;
        let block = Tensor::f_arange_start(band_start, num_blocks, (Kind::Int64, device))?;
        let band_rank = rank.f_narrow(0, band_start, band_len)?;
        let candidate = block.f_le_tensor(&current)?; // [1, T, 1, band]
        let local = block.f_gt_tensor(&current.f_sub_scalar(cfg.n_local)?)?;
        let forced = candidate.f_logical_and(&local)?;
        let mut band = keys.f_narrow(3, band_start, band_len)?;
        let rewritten = band_rank.f_add_scalar(FORCED_KEY)?.f_where_self(
            &forced,
            &band.f_where_self(&candidate, &band_rank.f_add_scalar(NON_CANDIDATE_KEY)?)?,
        )?;
        band.f_copy_(&rewritten)?;
    }

    let k = n.min(num_blocks);
    let (_, top) = keys.f_topk(k, -1, true, false)?;
    drop(keys);
    // Non-candidates are only picked when a row has fewer than k candidates; they become
    // padding. Sort ascending with padding (as Nb) last, then write it as −1.
    let is_candidate = top.f_le_tensor(&current)?;
    let (sorted, _) = top
        .f_where_scalarother(&is_candidate, num_blocks)?
        .f_sort(-1, false)?;
    let chosen = sorted.f_where_scalarother(&sorted.f_lt(num_blocks)?, -1)?;
    if k == n {
        return Ok(chosen);
    }
    let padding = Tensor::f_full([batch, rows, groups, n - k], -1, (Kind::Int64, device))?;
    Ok(Tensor::f_cat(&[chosen, padding], 3)?)
}

/// Sort key of ids that are not kept (padding, blocks after t): above every kept id, and small
/// enough that differences with it cannot overflow.
const DROPPED_ID: i64 = 1 << 62;

/// Block ids → merged token ranges with tensor ops; see [`crate::ranges_from_blocks`] for
/// the rules.
///
/// Layout: `blocks` `[B, T, G, m]` i64 for queries `t0 .. t0 + T` → `ranges`
/// `[B, T, G, m, 2]` i64 (`[start, end)`, `(0, 0)` padded) and `counts` `[B, T, G]` i64.
///
/// Each row is sorted with dropped ids as a sentinel at the end. With `gap_before` / `gap_after`
/// the differences to the neighbouring sorted ids (0: a duplicate, 1: the next block, ≥ 2: a
/// gap), a kept id starts a range iff `gap_before ≥ 2` (its first occurrence, not continuing
/// the previous block) and ends one iff `gap_after ≥ 2` (its last occurrence, not continued).
/// A cumulative sum of the starts numbers the ranges; starts and ends are scattered into a
/// buffer with one extra leading slot that collects every position that is not a start
/// (resp. an end) and is cut off.
pub fn ranges_from_blocks(
    blocks: &Tensor,
    t0: i64,
    cfg: &SelectConfig,
) -> Result<Ranges, SelectError> {
    let [batch, rows, groups, width] = check::block_ids_input(blocks, t0, cfg)?;
    let device = blocks.device();
    if batch * rows * groups * width == 0 {
        return Ok(Ranges {
            ranges: Tensor::f_zeros([batch, rows, groups, width, 2], (Kind::Int64, device))?,
            counts: Tensor::f_zeros([batch, rows, groups], (Kind::Int64, device))?,
        });
    }
    let positions = query_positions(t0, rows, device)?; // [1, T, 1, 1]
    let current = positions.f_floor_divide_scalar(cfg.select_len)?;
    let sorted = {
        let kept = blocks
            .f_ge(0)?
            .f_logical_and(&blocks.f_le_tensor(&current)?)?;
        blocks
            .f_where_scalarother(&kept, DROPPED_ID)?
            .f_sort(-1, false)?
            .0
    };
    let (is_start, is_end) = {
        let edge =
            |value: i64| Tensor::f_full([batch, rows, groups, 1], value, (Kind::Int64, device));
        // [B, T, G, m + 1]: differences along [−2, sorted…, DROPPED_ID]; −2 is two below any
        // kept id, so the first kept id always starts a range.
        let gaps = sorted.f_diff(1, 3, Some(edge(-2)?), Some(edge(DROPPED_ID)?))?;
        let is_start = gaps
            .f_narrow(3, 0, width)?
            .f_ge(2)?
            .f_logical_and(&sorted.f_lt(DROPPED_ID)?)?;
        // Dropped ids have gap_after 0 (they are followed by DROPPED_ID), so no mask here.
        let is_end = gaps.f_narrow(3, 1, width)?.f_ge(2)?;
        (is_start, is_end)
    };
    // Slot 1 + r for range r, slot 0 for everything else (cut off below).
    let range_slot = is_start.f_cumsum(3, Kind::Int64)?;
    let counts = is_start.f_sum_dim_intlist(3, false, Kind::Int64)?;
    // Dropped ids are clamped to the current block so that the arithmetic below cannot
    // overflow; they only ever land in the cut-off slot.
    let safe = sorted.f_minimum(&current)?;
    drop(sorted);
    let starts = safe.f_mul_scalar(cfg.select_len)?;
    let ends = safe
        .f_add_scalar(1)?
        .f_mul_scalar(cfg.select_len)?
        .f_minimum(&positions.f_add_scalar(1)?)?;
    drop(safe);
    let buffer = Tensor::f_zeros([batch, rows, groups, width + 1, 2], (Kind::Int64, device))?;
    for (column, is_slot, values) in [(0, &is_start, &starts), (1, &is_end, &ends)] {
        let slot = range_slot.f_where_scalarother(is_slot, 0)?.f_unsqueeze(4)?;
        let _ = buffer
            .f_narrow(4, column, 1)?
            .f_scatter_(3, &slot, &values.f_unsqueeze(4)?)?;
    }
    let ranges = buffer.f_narrow(3, 1, width)?.f_contiguous()?;
    Ok(Ranges { ranges, counts })
}

/// The whole pipeline with tensor ops: [`block_scores`] → [`select_blocks`] →
/// [`ranges_from_blocks`]; see [`crate::select_ranges`].
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
    drop(scores);
    let Ranges { ranges, counts } = ranges_from_blocks(&blocks, t0, cfg)?;
    Ok(Selection {
        blocks,
        ranges,
        counts,
    })
}

/// `[1, T, 1, 1]` i64: the absolute positions `t0 .. t0 + T` of the query rows.
fn query_positions(t0: i64, rows: i64, device: Device) -> Result<Tensor, SelectError> {
    Ok(Tensor::f_arange_start(t0, t0 + rows, (Kind::Int64, device))?.f_view([1, rows, 1, 1])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;

    #[test]
    fn ceil_div_rounds_up_for_negative_numerators() {
        assert_eq!(ceil_div(-1, 4), 0);
        assert_eq!(ceil_div(-4, 4), -1);
        assert_eq!(ceil_div(-5, 4), -1);
        assert_eq!(ceil_div(0, 4), 0);
        assert_eq!(ceil_div(1, 4), 1);
        assert_eq!(ceil_div(8, 4), 2);
    }

    /// Arbitrary f32 bit patterns (NaNs of both signs and any payload, denormals, ±0, ±∞):
    /// the integer key orders them exactly like the reference's `total_cmp` after −0 → +0.
    #[test]
    fn ordering_key_matches_total_cmp_on_any_bits() {
        let cfg = SelectConfig::new(1, 1, 1, 5, 1).unwrap();
        let (rows, num_blocks) = (400, 12);
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next_bits = || {
            // xorshift64*: deterministic, no extra dependency.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
        };
        let special = [
            0x0000_0000,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xffc0_0001,
            1,
            0x8000_0001,
        ];
        let values: Vec<f32> = (0..rows * num_blocks)
            .map(|_| {
                let bits = next_bits();
                // A third of the entries from a small set, so that equal keys are common.
                f32::from_bits(if bits % 3 == 0 {
                    special[(bits as usize / 3) % special.len()]
                } else {
                    bits
                })
            })
            .collect();
        // Every row at t = 11: candidates 0..=11, forced 0 and 11, 3 free slots.
        let scores = Tensor::from_slice(&values).view([1, rows as i64, 1, num_blocks as i64]);
        for row in 0..rows as i64 {
            let one = scores.narrow(1, row, 1);
            let expected = reference::select_blocks(&one, 11, &cfg).unwrap();
            let got = select_blocks(&one, 11, &cfg).unwrap();
            assert!(expected.equal(&got), "row {row}: {expected} vs {got}");
        }
    }
}
