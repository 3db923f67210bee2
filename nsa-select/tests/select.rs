//! The reference and vectorized paths against each other (proptest, on CPU and, where present,
//! CUDA), invariants of the selection, and insta snapshots of small hand-checkable cases.
//!
//! Random scores and probabilities are small integers divided by a power of two: exact in f32,
//! so sums do not depend on the order of addition, and ties are frequent.
use std::collections::BTreeSet;
use std::fmt::Write as _;

use nsa_select::{
    block_scores, compressed_probs, ranges_from_blocks, reference, select_blocks, select_chunked,
    select_for_sequence, select_ranges, vectorized, SelectConfig, SelectError, SelectImpl,
    Selection,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------------------------
// Helpers

/// CPU, plus the first GPU when libtorch can see one. libtorch's CUDA backend is only visible
/// once nsa-sys has loaded it (a dev-dependency: the library itself stays CUDA-agnostic), so the
/// same tests run on CUDA on a GPU machine.
fn devices() -> Vec<Device> {
    nsa_sys::cuda::load_backend().expect("loading libtorch's CUDA backend");
    let mut devices = vec![Device::Cpu];
    if let Device::Cuda(i) = Device::cuda_if_available() {
        devices.push(Device::Cuda(i));
    }
    devices
}

fn tensor_f32(values: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(values).view(shape)
}

fn tensor_i64(values: &[i64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(values).view(shape)
}

fn host_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_device(Device::Cpu).flatten(0, -1)).unwrap()
}

fn host_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1)).unwrap()
}

/// Equal shapes, kinds and bits (f32 compared as bits, so −0.0 ≠ +0.0 here).
fn same_bits(a: &Tensor, b: &Tensor) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.size(), b.size());
    prop_assert_eq!(a.kind(), b.kind());
    let (a, b) = (a.to_device(Device::Cpu), b.to_device(Device::Cpu));
    let (a, b) = if a.kind() == Kind::Float {
        (a.view_dtype(Kind::Int), b.view_dtype(Kind::Int))
    } else {
        (a, b)
    };
    prop_assert!(a.equal(&b), "tensors differ:\n{a}\n{b}");
    Ok(())
}

fn same_selection(a: &Selection, b: &Selection) -> Result<(), TestCaseError> {
    same_bits(&a.blocks, &b.blocks)?;
    same_bits(&a.ranges, &b.ranges)?;
    same_bits(&a.counts, &b.counts)
}

/// A config for selection-only tests: l = d = 1 (irrelevant there), given l', n, n_local.
fn select_cfg(select_len: i64, top_n: i64, n_local: i64) -> SelectConfig {
    SelectConfig::new(1, 1, select_len, top_n, n_local).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// A score: k/4 with k in −6..=6, or −0.0 (which must rank equal to +0.0).
fn score() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => (-6i32..=6).prop_map(|k| k as f32 / 4.0),
        1 => Just(-0.0f32),
    ]
}

/// `count` scores, either random (many ties) or all equal.
fn scores(count: usize) -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        3 => prop::collection::vec(score(), count),
        1 => score().prop_map(move |s| vec![s; count]),
    ]
}

#[derive(Debug, Clone)]
struct SelectCase {
    cfg: SelectConfig,
    t0: i64,
    shape: [i64; 4], // [B, T, G, Nb]
    scores: Vec<f32>,
}

impl SelectCase {
    fn scores(&self, device: Device) -> Tensor {
        tensor_f32(&self.scores, &self.shape).to_device(device)
    }
}

/// Random chunks: t0 in the first block or far out, S not a multiple of l', n from 2 up to
/// more than the number of blocks, Nb from exactly the needed blocks to a few more.
fn select_case() -> impl Strategy<Value = SelectCase> {
    (
        1i64..=8,
        1i64..=3,
        0i64..=6,
        0i64..=60,
        1i64..=12,
        1i64..=2,
        1i64..=3,
        0i64..=3,
    )
        .prop_flat_map(
            |(select_len, n_local, extra_n, t0, rows, batch, groups, extra_blocks)| {
                let cfg = select_cfg(select_len, n_local + 1 + extra_n, n_local);
                let num_blocks = cfg.current_block(t0 + rows - 1) + 1 + extra_blocks;
                let shape = [batch, rows, groups, num_blocks];
                scores((batch * rows * groups * num_blocks) as usize).prop_map(move |scores| {
                    SelectCase {
                        cfg,
                        t0,
                        shape,
                        scores,
                    }
                })
            },
        )
}

#[derive(Debug, Clone)]
struct RangesCase {
    cfg: SelectConfig,
    t0: i64,
    shape: [i64; 4], // [B, T, G, m]
    ids: Vec<i64>,
}

/// Random id rows: unsorted, duplicates, −1 and other negatives, gaps, ids after t.
fn ranges_case() -> impl Strategy<Value = RangesCase> {
    (1i64..=8, 0i64..=60, 1i64..=10, 1i64..=2, 1i64..=3, 1i64..=8).prop_flat_map(
        |(select_len, t0, rows, batch, groups, width)| {
            let cfg = select_cfg(select_len, 2, 1);
            let last_block = cfg.current_block(t0 + rows - 1);
            let shape = [batch, rows, groups, width];
            let id = prop_oneof![1 => Just(-1i64), 1 => -3i64..0, 6 => 0..=last_block + 3];
            prop::collection::vec(id, (batch * rows * groups * width) as usize).prop_map(
                move |ids| RangesCase {
                    cfg,
                    t0,
                    shape,
                    ids,
                },
            )
        },
    )
}

#[derive(Debug, Clone)]
struct PipelineCase {
    cfg: SelectConfig,
    t0: i64,
    heads_per_group: i64,
    num_blocks: i64,
    shape: [i64; 4], // [B, T, H, Nc]
    probs: Vec<f32>,
}

impl PipelineCase {
    fn p_cmp(&self, device: Device) -> Tensor {
        tensor_f32(&self.probs, &self.shape).to_device(device)
    }
}

/// Random (l, d, l') with d | l and d | l', GQA groups of 1–3 heads, probabilities k/8 with
/// k in 0..=4 (or all equal), Nc the visible compressed tokens (plus maybe a few more).
fn pipeline_case() -> impl Strategy<Value = PipelineCase> {
    (
        (1i64..=3, 1i64..=3, 1i64..=3, 1i64..=2, 0i64..=4),
        (
            0i64..=40,
            1i64..=10,
            1i64..=2,
            1i64..=2,
            1i64..=3,
            0i64..=2,
            0i64..=2,
        ),
    )
        .prop_flat_map(|((d, b, a, n_local, extra_n), rest)| {
            let (t0, rows, batch, groups, heads_per_group, extra_cmp, extra_blocks) = rest;
            let cfg = SelectConfig::new(b * d, d, a * d, n_local + 1 + extra_n, n_local).unwrap();
            let num_cmp = cfg.num_compressed(t0 + rows) + extra_cmp;
            let num_blocks = cfg.num_select_blocks(t0 + rows) + extra_blocks;
            let shape = [batch, rows, groups * heads_per_group, num_cmp];
            let count = shape.iter().product::<i64>() as usize;
            let prob = (0i32..=4).prop_map(|k| k as f32 / 8.0);
            let probs = prop_oneof![
                3 => prop::collection::vec(prob.clone(), count),
                1 => prob.prop_map(move |p| vec![p; count]),
            ];
            probs.prop_map(move |probs| PipelineCase {
                cfg,
                t0,
                heads_per_group,
                num_blocks,
                shape,
                probs,
            })
        })
}

/// 128 cases per property keeps the whole file to a few seconds on 2 CPU cores; failures are
/// recorded in `nsa-select/proptest-regressions/select.txt` and replayed first on later runs.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/select.txt",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Reference vs vectorized

proptest! {
    #![proptest_config(config())]

    #[test]
    fn select_blocks_agree(case in select_case()) {
        select_blocks_agree_on(&case)?;
    }

    #[test]
    fn ranges_from_blocks_agree(case in ranges_case()) {
        ranges_from_blocks_agree_on(&case)?;
    }

    #[test]
    fn block_scores_agree_with_naive_loop(case in pipeline_case()) {
        block_scores_agree_on(&case)?;
    }

    #[test]
    fn pipeline_agrees(case in pipeline_case()) {
        pipeline_agrees_on(&case)?;
    }

    #[test]
    fn group_heads_share_one_selection(case in pipeline_case(), salt in 0i64..1000) {
        group_heads_share_one_selection_on(&case, salt)?;
    }

    #[test]
    fn chunked_equals_whole(case in pipeline_case(), chunk in 1i64..=7) {
        chunked_equals_whole_on(&case, chunk)?;
    }
}

fn select_blocks_agree_on(case: &SelectCase) -> Result<(), TestCaseError> {
    let expected = reference::select_blocks(&case.scores(Device::Cpu), case.t0, &case.cfg).unwrap();
    for device in devices() {
        let got = vectorized::select_blocks(&case.scores(device), case.t0, &case.cfg).unwrap();
        prop_assert_eq!(got.device(), device);
        same_bits(&expected, &got)?;
    }
    check_selected_blocks(case, &expected)
}

fn ranges_from_blocks_agree_on(case: &RangesCase) -> Result<(), TestCaseError> {
    let ids = tensor_i64(&case.ids, &case.shape);
    let expected = reference::ranges_from_blocks(&ids, case.t0, &case.cfg).unwrap();
    for device in devices() {
        let got =
            vectorized::ranges_from_blocks(&ids.to_device(device), case.t0, &case.cfg).unwrap();
        same_bits(&expected.ranges, &got.ranges)?;
        same_bits(&expected.counts, &got.counts)?;
    }
    check_ranges(
        &case.ids,
        &case.shape,
        case.t0,
        &case.cfg,
        &expected.ranges,
        &expected.counts,
    )
}

fn block_scores_agree_on(case: &PipelineCase) -> Result<(), TestCaseError> {
    let (h, nb, cfg) = (case.heads_per_group, case.num_blocks, &case.cfg);
    let looped = reference::block_scores(&case.p_cmp(Device::Cpu), h, nb, cfg).unwrap();
    prop_assert_eq!(host_f32(&looped), naive_block_scores(case));
    for device in devices() {
        let got = block_scores(&case.p_cmp(device), h, nb, cfg).unwrap();
        same_bits(&looped, &got)?;
    }
    Ok(())
}

fn pipeline_agrees_on(case: &PipelineCase) -> Result<(), TestCaseError> {
    let (t0, h, nb, cfg) = (case.t0, case.heads_per_group, case.num_blocks, &case.cfg);
    let expected = reference::select_ranges(&case.p_cmp(Device::Cpu), t0, h, nb, cfg).unwrap();
    for device in devices() {
        let got =
            select_ranges(&case.p_cmp(device), t0, h, nb, cfg, SelectImpl::Vectorized).unwrap();
        same_selection(&expected, &got)?;
    }
    let [batch, rows, heads, _] = case.shape;
    let ids = host_i64(&expected.blocks);
    let shape = [batch, rows, heads / h, cfg.top_n];
    check_ranges(&ids, &shape, t0, cfg, &expected.ranges, &expected.counts)
}

/// All heads of a group share one selection: it is the selection of the group's summed
/// probabilities, and it does not change when the heads of a group are permuted or when
/// another group's probabilities change.
fn group_heads_share_one_selection_on(case: &PipelineCase, salt: i64) -> Result<(), TestCaseError> {
    let [batch, rows, heads, num_cmp] = case.shape;
    let h = case.heads_per_group;
    let groups = heads / h;
    let cpu = (Kind::Int64, Device::Cpu);
    let p = case.p_cmp(Device::Cpu);
    let run = |p: &Tensor, h: i64| {
        select_ranges(
            p,
            case.t0,
            h,
            case.num_blocks,
            &case.cfg,
            SelectImpl::Vectorized,
        )
        .unwrap()
    };
    let selection = run(&p, h);
    // Summed per group in the test (exact: dyadic values).
    let per_head = p.view([batch, rows, groups, h, num_cmp]);
    let summed = per_head.sum_dim_intlist(3, false, Kind::Float);
    same_selection(&selection, &run(&summed, 1))?;
    // Reverse the heads inside every group.
    let reversed = per_head.flip([3]).reshape([batch, rows, heads, num_cmp]);
    same_selection(&selection, &run(&reversed, h))?;
    // Change the probabilities of every group but group 0: group 0's selection stays.
    if groups > 1 {
        let count = batch * rows * heads * num_cmp;
        let noise = ((Tensor::arange(count, cpu) * 7 + salt).remainder(5))
            .to_kind(Kind::Float)
            .view([batch, rows, heads, num_cmp])
            / 8.0;
        let head = Tensor::arange(heads, cpu).view([1, 1, heads, 1]);
        let other = run(&p.where_self(&head.lt(h), &noise), h);
        same_bits(&selection.blocks.select(2, 0), &other.blocks.select(2, 0))?;
        same_bits(&selection.ranges.select(2, 0), &other.ranges.select(2, 0))?;
    }
    Ok(())
}

/// The chunked driver equals one call over the whole sequence, for any chunk size.
fn chunked_equals_whole_on(case: &PipelineCase, chunk: i64) -> Result<(), TestCaseError> {
    let [batch, rows, heads, num_cmp] = case.shape;
    let (h, cfg) = (case.heads_per_group, &case.cfg);
    let seq_len = case.t0 + rows;
    let cpu = (Kind::Int64, Device::Cpu);
    // A full causal sequence: rows 0..seq_len built by repeating the case's rows, with the
    // compressed tokens a row cannot see zeroed (as compressed_probs leaves them).
    let last_token = Tensor::arange(num_cmp, cpu) * cfg.stride + (cfg.block_len - 1);
    let position = Tensor::arange(seq_len, cpu).view([1, seq_len, 1, 1]);
    let visible = last_token.view([1, 1, 1, num_cmp]).le_tensor(&position);
    let p = case
        .p_cmp(Device::Cpu)
        .repeat([1, seq_len / rows + 1, 1, 1])
        .narrow(1, 0, seq_len)
        .where_scalarother(&visible, 0.0);
    prop_assert!(num_cmp >= cfg.num_compressed(seq_len));
    let num_blocks = cfg.num_select_blocks(seq_len);
    let whole = select_ranges(&p, 0, h, num_blocks, cfg, SelectImpl::Reference).unwrap();
    prop_assert_eq!(
        whole.blocks.size(),
        vec![batch, seq_len, heads / h, cfg.top_n]
    );
    for imp in [SelectImpl::Reference, SelectImpl::Vectorized] {
        let chunked = select_chunked(seq_len, chunk, h, cfg, imp, |t0, t1| {
            Ok::<_, SelectError>(
                p.narrow(1, t0, t1 - t0)
                    .narrow(3, 0, cfg.num_compressed(t1)),
            )
        })
        .unwrap();
        same_selection(&whole, &chunked)?;
    }
    Ok(())
}

/// Eq. 9 with the literal interval overlap over every compressed token (no tap window).
fn naive_block_scores(case: &PipelineCase) -> Vec<f32> {
    let [batch, rows, heads, num_cmp] = case.shape;
    let (h, cfg) = (case.heads_per_group, &case.cfg);
    let mut out = Vec::new();
    for b in 0..batch {
        for r in 0..rows {
            for g in 0..heads / h {
                for j in 0..case.num_blocks {
                    let mut score = 0f32;
                    for i in 0..num_cmp {
                        let lo = (i * cfg.stride).max(j * cfg.select_len);
                        let hi = (i * cfg.stride + cfg.block_len).min((j + 1) * cfg.select_len);
                        let weight = (hi - lo).max(0) as f32 / cfg.stride as f32;
                        for head in g * h..(g + 1) * h {
                            let idx = (((b * rows + r) * heads + head) * num_cmp + i) as usize;
                            score += weight * case.probs[idx];
                        }
                    }
                    out.push(score);
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Invariants

/// Forced blocks present, candidates only, sorted, −1 only as trailing padding, the count is
/// min(n, candidates), and every chosen non-forced block scores at least as high as every
/// candidate left out (ties: lower index).
fn check_selected_blocks(case: &SelectCase, blocks: &Tensor) -> Result<(), TestCaseError> {
    let [batch, rows, groups, num_blocks] = case.shape;
    let cfg = &case.cfg;
    let n = cfg.top_n as usize;
    prop_assert_eq!(blocks.size(), vec![batch, rows, groups, cfg.top_n]);
    let ids = host_i64(blocks);
    for (row, chosen) in ids.chunks(n).enumerate() {
        let r = (row as i64 / groups) % rows;
        let t = case.t0 + r;
        let current = cfg.current_block(t);
        let valid: Vec<i64> = chosen.iter().copied().take_while(|&j| j >= 0).collect();
        prop_assert!(
            chosen[valid.len()..].iter().all(|&j| j == -1),
            "padding not trailing: {chosen:?}"
        );
        prop_assert!(
            valid.windows(2).all(|w| w[0] < w[1]),
            "not sorted: {chosen:?}"
        );
        prop_assert!(
            valid.iter().all(|&j| j <= current),
            "non-candidate in {chosen:?} at t={t}"
        );
        prop_assert_eq!(valid.len() as i64, cfg.top_n.min(current + 1));
        let forced: Vec<i64> = std::iter::once(0)
            .chain((current - cfg.n_local + 1).max(0)..=current)
            .collect();
        for f in forced {
            prop_assert!(
                valid.contains(&f),
                "forced block {f} missing from {chosen:?} at t={t}"
            );
        }
        let row_scores = &case.scores[row * num_blocks as usize..][..num_blocks as usize];
        let key = |j: i64| {
            let s = row_scores[j as usize];
            if s == 0.0 {
                0.0
            } else {
                s
            }
        };
        let is_forced = |j: i64| j == 0 || j > current - cfg.n_local;
        for &won in valid.iter().filter(|&&j| !is_forced(j)) {
            for lost in (0..=current).filter(|j| !valid.contains(j)) {
                let ok = key(won) > key(lost) || (key(won) == key(lost) && won < lost);
                prop_assert!(
                    ok,
                    "block {won} chosen over {lost} at t={t}: {row_scores:?}"
                );
            }
        }
    }
    Ok(())
}

/// Ranges are non-empty, end ≤ t + 1, sorted, disjoint and non-adjacent, padded with (0, 0),
/// and cover exactly the kept ids' tokens up to t.
fn check_ranges(
    ids: &[i64],
    shape: &[i64; 4],
    t0: i64,
    cfg: &SelectConfig,
    ranges: &Tensor,
    counts: &Tensor,
) -> Result<(), TestCaseError> {
    let [batch, rows, groups, width] = *shape;
    prop_assert_eq!(ranges.size(), vec![batch, rows, groups, width, 2]);
    prop_assert_eq!(counts.size(), vec![batch, rows, groups]);
    let (ranges, counts) = (host_i64(ranges), host_i64(counts));
    let m = width as usize;
    for (row, &count) in counts.iter().enumerate() {
        let t = t0 + (row as i64 / groups) % rows;
        let row_ranges: Vec<(i64, i64)> = ranges[row * m * 2..][..m * 2]
            .chunks(2)
            .map(|p| (p[0], p[1]))
            .collect();
        let (used, unused) = row_ranges.split_at(count as usize);
        prop_assert!(
            unused.iter().all(|&r| r == (0, 0)),
            "padding {row_ranges:?}"
        );
        for &(start, end) in used {
            prop_assert!(
                start < end && end <= t + 1,
                "range ({start}, {end}) at t={t}"
            );
        }
        for w in used.windows(2) {
            prop_assert!(
                w[0].1 < w[1].0,
                "not sorted/disjoint/non-adjacent: {row_ranges:?}"
            );
        }
        let covered: BTreeSet<i64> = used.iter().flat_map(|&(s, e)| s..e).collect();
        let expected: BTreeSet<i64> = ids[row * m..][..m]
            .iter()
            .filter(|&&j| j >= 0)
            .flat_map(|&j| j * cfg.select_len..((j + 1) * cfg.select_len).min(t + 1))
            .collect();
        prop_assert_eq!(covered, expected, "t={}", t);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hard cases, one by one

fn both_select(scores: &Tensor, t0: i64, cfg: &SelectConfig) -> Vec<i64> {
    let expected = select_blocks(scores, t0, cfg, SelectImpl::Reference).unwrap();
    for device in devices() {
        let got =
            select_blocks(&scores.to_device(device), t0, cfg, SelectImpl::Vectorized).unwrap();
        assert!(
            expected.equal(&got.to_device(Device::Cpu)),
            "{expected}\n{got}"
        );
    }
    host_i64(&expected)
}

#[test]
fn ties_go_to_the_lower_block() {
    // t = 40, l' = 4: candidates 0..=10; forced 0, 10; two free slots among 1..=9, all tied.
    let cfg = select_cfg(4, 4, 1);
    let scores = tensor_f32(&[0.5; 11], &[1, 1, 1, 11]);
    assert_eq!(both_select(&scores, 40, &cfg), vec![0, 1, 2, 10]);
    // A strictly higher score wins over a lower index; ties among the rest still go low.
    let mut values = [0.5f32; 11];
    values[7] = 0.75;
    let scores = tensor_f32(&values, &[1, 1, 1, 11]);
    assert_eq!(both_select(&scores, 40, &cfg), vec![0, 1, 7, 10]);
}

#[test]
fn negative_zero_ties_with_positive_zero() {
    // Free slots: 2 among 1..=4 with scores [-0, +0, -0, -0.25]: all zeros tie → 1, 2.
    let cfg = select_cfg(1, 3, 1);
    let scores = tensor_f32(&[9.0, -0.0, 0.0, -0.0, -0.25, 1.0], &[1, 1, 1, 6]);
    assert_eq!(both_select(&scores, 5, &cfg), vec![0, 1, 5]);
}

#[test]
fn special_floats_follow_total_cmp() {
    // Free slots pick the 4 highest of: NaN > +inf > 1 > denormal > 0 = −0 > … > −inf > −NaN.
    let cfg = select_cfg(1, 6, 1);
    let tiny = f32::from_bits(1);
    let values = [
        0.0,
        f32::INFINITY,
        -f32::NAN,
        1.0,
        -tiny,
        tiny,
        f32::NAN,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
    ];
    let scores = tensor_f32(&values, &[1, 1, 1, 10]);
    // Candidates 0..=9; forced 0 and 9; free 4 of 1..=8: NaN (6), +inf (1), 1 (3), tiny (5).
    assert_eq!(both_select(&scores, 9, &cfg), vec![0, 1, 3, 5, 6, 9]);
}

#[test]
fn all_candidates_when_at_most_n() {
    let cfg = select_cfg(4, 5, 2);
    let scores = Tensor::zeros([1, 3, 1, 5], (Kind::Float, Device::Cpu));
    // t = 0 (first block, one candidate), t = 9 (3 candidates), t = 19 (5 candidates = n).
    let mut out = Vec::new();
    for t in [0, 9, 19] {
        out.extend(both_select(&scores.narrow(1, 0, 1), t, &cfg));
    }
    assert_eq!(out, vec![0, -1, -1, -1, -1, 0, 1, 2, -1, -1, 0, 1, 2, 3, 4],);
}

#[test]
fn n_larger_than_the_number_of_blocks() {
    // Nb = 2 < n = 5: topk takes k = Nb and the rest is padding.
    let cfg = select_cfg(8, 5, 1);
    let scores = tensor_f32(&[0.25, 0.5, 0.25, 0.5], &[1, 2, 1, 2]);
    assert_eq!(
        both_select(&scores, 8, &cfg),
        vec![0, 1, -1, -1, -1, 0, 1, -1, -1, -1]
    );
}

#[test]
fn ranges_hard_cases() {
    let cfg = select_cfg(4, 2, 1);
    // t = 13 (current block 3): unsorted, duplicates, −1, an id after t (5), a gap, block 3
    // clamped to t + 1 = 14.
    let ids = tensor_i64(&[3, -1, 0, 5, 1, 3, 0, -1], &[1, 1, 1, 8]);
    for imp in [SelectImpl::Reference, SelectImpl::Vectorized] {
        for device in devices() {
            let out = ranges_from_blocks(&ids.to_device(device), 13, &cfg, imp).unwrap();
            let ranges = host_i64(&out.ranges);
            assert_eq!(&ranges[..6], &[0, 8, 12, 14, 0, 0], "{imp:?} {device:?}");
            assert!(ranges[6..].iter().all(|&x| x == 0));
            assert_eq!(host_i64(&out.counts), vec![2]);
        }
    }
    // A single block and nothing else; then only padding.
    for (row, t, expected, count) in [
        (vec![0, -1], 2, vec![0, 3, 0, 0], 1),
        (vec![-1, -1], 2, vec![0; 4], 0),
    ] {
        let ids = tensor_i64(&row, &[1, 1, 1, 2]);
        for imp in [SelectImpl::Reference, SelectImpl::Vectorized] {
            let out = ranges_from_blocks(&ids, t, &cfg, imp).unwrap();
            assert_eq!(host_i64(&out.ranges), expected);
            assert_eq!(host_i64(&out.counts), vec![count]);
        }
    }
}

#[test]
fn identity_mapping_when_l_d_and_l_prime_are_equal() {
    let cfg = SelectConfig::new(4, 4, 4, 3, 1).unwrap();
    let p = Tensor::randint(16, [2, 3, 4, 6], (Kind::Float, Device::Cpu)) / 16.0;
    for device in devices() {
        let scores = block_scores(&p.to_device(device), 1, 6, &cfg).unwrap();
        assert!(scores.to_device(Device::Cpu).equal(&p));
        let looped = reference::block_scores(&p, 1, 6, &cfg).unwrap();
        assert!(looped.equal(&p));
    }
}

#[test]
fn paper_weights_reach_the_right_blocks() {
    // One compressed token i = 7 with p = 1 (covers tokens 112..144): blocks 1 (64..128) gets
    // 16/16 = 1 and block 2 (128..192) gets 1; token i = 8 (128..160) gives block 2 weight 2.
    let cfg = SelectConfig::paper();
    let mut p = vec![0f32; 12];
    p[7] = 1.0;
    let scores = block_scores(&tensor_f32(&p, &[1, 1, 1, 12]), 1, 4, &cfg).unwrap();
    assert_eq!(host_f32(&scores), vec![0.0, 1.0, 1.0, 0.0]);
    p[7] = 0.0;
    p[8] = 1.0;
    let scores = block_scores(&tensor_f32(&p, &[1, 1, 1, 12]), 1, 4, &cfg).unwrap();
    assert_eq!(host_f32(&scores), vec![0.0, 0.0, 2.0, 0.0]);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let cfg = SelectConfig::paper();
    let scores = Tensor::zeros([1, 4, 2, 3], (Kind::Float, Device::Cpu));
    // t0 = 192: current block 3 needs Nb ≥ 4.
    for imp in [SelectImpl::Reference, SelectImpl::Vectorized] {
        assert!(matches!(
            select_blocks(&scores, 192, &cfg, imp),
            Err(SelectError::TooFewBlocks { needed: 4, .. })
        ));
        assert!(matches!(
            select_blocks(&scores, -1, &cfg, imp),
            Err(SelectError::NegativeStart { t0: -1 })
        ));
        assert!(matches!(
            select_blocks(&scores.to_kind(Kind::Double), 0, &cfg, imp),
            Err(SelectError::DType { .. })
        ));
        assert!(matches!(
            select_blocks(&scores.view([4, 2, 3]), 0, &cfg, imp),
            Err(SelectError::Shape { .. })
        ));
        let ids = Tensor::zeros([1, 4, 2, 3], (Kind::Int, Device::Cpu));
        assert!(matches!(
            ranges_from_blocks(&ids, 0, &cfg, imp),
            Err(SelectError::DType { .. })
        ));
        let p = Tensor::zeros([1, 4, 6, 3], (Kind::Float, Device::Cpu));
        assert!(matches!(
            select_ranges(&p, 0, 4, 1, &cfg, imp),
            Err(SelectError::HeadsNotDivisible {
                heads: 6,
                heads_per_group: 4
            })
        ));
        assert!(matches!(
            select_ranges(&p, 0, 3, 0, &cfg, imp),
            Err(SelectError::NonPositive { .. })
        ));
        assert!(matches!(
            select_ranges(&p.to_kind(Kind::Int64), 0, 3, 1, &cfg, imp),
            Err(SelectError::DType { .. })
        ));
    }
    let bad = SelectConfig { stride: 5, ..cfg };
    assert!(matches!(
        block_scores(
            &Tensor::zeros([1, 1, 1, 1], (Kind::Float, Device::Cpu)),
            1,
            1,
            &bad
        ),
        Err(SelectError::StrideDoesNotDivide { stride: 5, .. })
    ));
    let err = select_chunked(10, 4, 1, &cfg, SelectImpl::Vectorized, |_, _| {
        Ok::<_, SelectError>(Tensor::zeros([1, 3, 1, 0], (Kind::Float, Device::Cpu)))
    });
    assert!(matches!(err, Err(SelectError::Shape { .. })), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// compressed_probs and the sequence driver

#[test]
fn compressed_probs_masks_and_normalises() {
    let cfg = SelectConfig::new(4, 2, 4, 3, 1).unwrap();
    let (batch, seq, heads, kv_heads, dk) = (2, 11, 4, 2, 8);
    let q = Tensor::randn([batch, seq, heads, dk], (Kind::Float, Device::Cpu));
    let nc = cfg.num_compressed(seq);
    let k = Tensor::randn([batch, nc, kv_heads, dk], (Kind::Float, Device::Cpu));
    let p = compressed_probs(&q, &k, 0, &cfg).unwrap();
    assert_eq!(p.size(), vec![batch, seq, heads, nc]);
    let values = host_f32(&p);
    for b in 0..batch {
        for t in 0..seq {
            for hh in 0..heads {
                let row = &values[(((b * seq + t) * heads + hh) * nc) as usize..][..nc as usize];
                let visible = cfg.num_visible_compressed(t) as usize;
                assert!(row[visible..].iter().all(|&x| x == 0.0));
                if visible == 0 {
                    assert!(row.iter().all(|&x| x == 0.0));
                    continue;
                }
                // Against a softmax written out for this (b, t, head), key head hh / 2.
                let qv = host_f32(&q.get(b).get(t).get(hh));
                let logits: Vec<f32> = (0..visible as i64)
                    .map(|i| {
                        let kv = host_f32(&k.get(b).get(i).get(hh / (heads / kv_heads)));
                        qv.iter().zip(&kv).map(|(a, b)| a * b).sum::<f32>() / (dk as f32).sqrt()
                    })
                    .collect();
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
                let total: f32 = exps.iter().sum();
                for (got, e) in row.iter().zip(&exps) {
                    assert!((got - e / total).abs() < 1e-5, "{got} vs {}", e / total);
                }
            }
        }
    }
    // Chunk rows computed at their absolute offset give the same rows.
    let tail = compressed_probs(&q.narrow(1, 5, 6), &k, 5, &cfg).unwrap();
    assert!(tail.allclose(&p.narrow(1, 5, 6), 1e-6, 1e-7, false));
}

#[test]
fn select_for_sequence_equals_the_unchunked_pipeline() {
    let cfg = SelectConfig::new(4, 2, 4, 3, 1).unwrap();
    let (batch, seq, heads, kv_heads, dk) = (1, 37, 4, 2, 8);
    // q = 0: every visible key gets exactly 1/V, whatever the chunking, so the comparison can
    // be exact (with random logits a chunk's softmax may round its last bit differently).
    let q = Tensor::zeros([batch, seq, heads, dk], (Kind::Float, Device::Cpu));
    let k = Tensor::randn(
        [batch, cfg.num_compressed(seq), kv_heads, dk],
        (Kind::Float, Device::Cpu),
    );
    let p = compressed_probs(&q, &k, 0, &cfg).unwrap();
    let whole = select_ranges(
        &p,
        0,
        2,
        cfg.num_select_blocks(seq),
        &cfg,
        SelectImpl::Vectorized,
    )
    .unwrap();
    for chunk in [1, 5, 16, 64] {
        let chunked = select_for_sequence(&q, &k, chunk, &cfg, SelectImpl::Vectorized).unwrap();
        assert!(whole.blocks.equal(&chunked.blocks), "chunk {chunk}");
        assert!(whole.ranges.equal(&chunked.ranges), "chunk {chunk}");
        assert!(whole.counts.equal(&chunked.counts), "chunk {chunk}");
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// Per query t: the chosen blocks and their ranges.
fn describe(selection: &Selection, t0: i64, cfg: &SelectConfig) -> String {
    let blocks = host_i64(&selection.blocks);
    let ranges = host_i64(&selection.ranges);
    let counts = host_i64(&selection.counts);
    let n = cfg.top_n as usize;
    let mut text = String::new();
    for (r, &count) in counts.iter().enumerate() {
        let ids: Vec<String> = blocks[r * n..][..n].iter().map(|j| j.to_string()).collect();
        let spans: Vec<String> = ranges[r * n * 2..][..count as usize * 2]
            .chunks(2)
            .map(|p| format!("[{}, {})", p[0], p[1]))
            .collect();
        writeln!(
            text,
            "t={:>2} blocks=[{}] ranges={}",
            t0 + r as i64,
            ids.join(", "),
            spans.join(" ")
        )
        .unwrap();
    }
    text
}

#[test]
fn snapshot_select_s20() {
    // S = 20, l' = 4 (5 blocks), n = 3, n_local = 1: block 0 and the current block are forced,
    // the third slot takes the best earlier block. Block scores per j, the same for every t:
    // j: 0     1     2    3     4
    //    0.5   0.25  1.0  0.25  0.75
    let cfg = select_cfg(4, 3, 1);
    let per_block = [0.5f32, 0.25, 1.0, 0.25, 0.75];
    let scores: Vec<f32> = (0..20).flat_map(|_| per_block).collect();
    let scores = tensor_f32(&scores, &[1, 20, 1, 5]);
    let mut selections = Vec::new();
    for imp in [SelectImpl::Reference, SelectImpl::Vectorized] {
        let blocks = select_blocks(&scores, 0, &cfg, imp).unwrap();
        let ranges = ranges_from_blocks(&blocks, 0, &cfg, imp).unwrap();
        selections.push(describe(
            &Selection {
                blocks,
                ranges: ranges.ranges,
                counts: ranges.counts,
            },
            0,
            &cfg,
        ));
    }
    assert_eq!(selections[0], selections[1]);
    insta::assert_snapshot!(selections[0]);
}

#[test]
fn snapshot_pipeline_paper_taps() {
    // (l, d, l') = (4, 2, 4): taps [1, 2, 1] on compressed tokens 2j − 1, 2j, 2j + 1. One
    // group of two heads; every query puts probability 1/2 per head on compressed token 5
    // (tokens 10..14: half in block 2, half in block 3) and 1/4 on token 1 in head 0 only
    // (tokens 2..6: blocks 0 and 1). n = 3, n_local = 1.
    let cfg = SelectConfig::new(4, 2, 4, 3, 1).unwrap();
    let (t0, rows) = (12, 8); // t = 12..19, current block 3 or 4
    let nc = cfg.num_compressed(t0 + rows);
    let mut p = vec![0f32; (rows * 2 * nc) as usize];
    for r in 0..rows as usize {
        for head in 0..2 {
            let row = &mut p[(r * 2 + head) * nc as usize..][..nc as usize];
            row[5] = 0.5;
            row[1] = if head == 0 { 0.25 } else { 0.0 };
        }
    }
    let p_cmp = tensor_f32(&p, &[1, rows, 2, nc]);
    let nb = cfg.num_select_blocks(t0 + rows);
    let scores = block_scores(&p_cmp, 2, nb, &cfg).unwrap();
    let reference = select_ranges(&p_cmp, t0, 2, nb, &cfg, SelectImpl::Reference).unwrap();
    let vectorized = select_ranges(&p_cmp, t0, 2, nb, &cfg, SelectImpl::Vectorized).unwrap();
    let text = describe(&vectorized, t0, &cfg);
    assert_eq!(describe(&reference, t0, &cfg), text);
    let header = format!(
        "taps {:?}\nscores of row t={t0}: {:?}\n",
        cfg.overlap_taps(),
        &host_f32(&scores)[..nb as usize]
    );
    insta::assert_snapshot!(header + &text);
}

#[test]
fn snapshot_ranges_tricky_ids() {
    let cfg = select_cfg(4, 2, 1);
    // The same ids for every row t = 11..=24 (unsorted, duplicate 3, padding −1 and −7, a gap
    // at 2 and 4, blocks 5 and 6 that start only at t = 20 and 24).
    let row = [6, 3, -1, 3, 0, 5, 1, -7];
    let (t0, rows) = (11, 14);
    let ids: Vec<i64> = (0..rows).flat_map(|_| row).collect();
    let ids = tensor_i64(&ids, &[1, rows, 1, 8]);
    let mut texts = Vec::new();
    for imp in [SelectImpl::Reference, SelectImpl::Vectorized] {
        let out = ranges_from_blocks(&ids, t0, &cfg, imp).unwrap();
        let (ranges, counts) = (host_i64(&out.ranges), host_i64(&out.counts));
        let mut text = format!("ids per row {row:?}, l' = 4\n");
        for (r, count) in counts.iter().enumerate() {
            let spans: Vec<String> = ranges[r * 16..][..16]
                .chunks(2)
                .map(|p| format!("({}, {})", p[0], p[1]))
                .collect();
            writeln!(
                text,
                "t={} count={count} {}",
                t0 + r as i64,
                spans.join(" ")
            )
            .unwrap();
        }
        texts.push(text);
    }
    assert_eq!(texts[0], texts[1]);
    insta::assert_snapshot!(texts[0]);
}

// ---------------------------------------------------------------------------------------------
// Arbitrary floats and the crate docs' example

/// Not only dyadic inputs: the vectorized block scores add in the reference's order, so the two
/// paths agree bit for bit on any probabilities (here uniform random f32, not exact sums).
#[test]
fn pipeline_agrees_on_arbitrary_floats() {
    tch::manual_seed(7);
    let paper = SelectConfig::paper();
    let configs = [
        (paper, 700, 64, 16),
        (SelectConfig::new(6, 2, 4, 4, 2).unwrap(), 50, 9, 3),
        (SelectConfig::new(4, 4, 8, 3, 1).unwrap(), 33, 17, 1),
    ];
    for (cfg, t0, rows, heads_per_group) in configs {
        let (nc, nb) = (
            cfg.num_compressed(t0 + rows),
            cfg.num_select_blocks(t0 + rows),
        );
        let p = Tensor::rand(
            [2, rows, 2 * heads_per_group, nc],
            (Kind::Float, Device::Cpu),
        );
        let looped = reference::block_scores(&p, heads_per_group, nb, &cfg).unwrap();
        let expected = reference::select_ranges(&p, t0, heads_per_group, nb, &cfg).unwrap();
        for device in devices() {
            let p = p.to_device(device);
            let scores = block_scores(&p, heads_per_group, nb, &cfg).unwrap();
            same_bits(&looped, &scores).unwrap();
            let got = vectorized::select_ranges(&p, t0, heads_per_group, nb, &cfg).unwrap();
            same_selection(&expected, &got).unwrap();
        }
    }
}

/// The example of the crate docs (a `no_run` doctest there).
#[test]
fn crate_docs_example() -> Result<(), SelectError> {
    let cfg = SelectConfig::new(4, 2, 4, 3, 1)?;
    let (t0, rows, heads, heads_per_group) = (16, 4, 2, 2);
    let nc = cfg.num_compressed(t0 + rows);
    let nb = cfg.num_select_blocks(t0 + rows);
    let p_cmp = Tensor::f_rand([1, rows, heads, nc], (Kind::Float, Device::Cpu))?;
    let sel = select_ranges(
        &p_cmp,
        t0,
        heads_per_group,
        nb,
        &cfg,
        SelectImpl::Vectorized,
    )?;
    assert_eq!(sel.blocks.size(), [1, rows, 1, 3]);
    assert_eq!(sel.ranges.size(), [1, rows, 1, 3, 2]);
    let first_row = Vec::<i64>::try_from(sel.blocks.f_flatten(0, -1)?.f_narrow(0, 0, 3)?)?;
    assert_eq!((first_row[0], first_row[2]), (0, 4));
    let same = select_ranges(&p_cmp, t0, heads_per_group, nb, &cfg, SelectImpl::Reference)?;
    assert!(same.blocks.equal(&sel.blocks) && same.ranges.equal(&sel.ranges));
    Ok(())
}
