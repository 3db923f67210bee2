//! Input checks of DecodeStep on the CPU (every refusal, before any launch) and the launch
//! shapes of `grid.rs`.
use super::grid::{
    COMBINE_MAX_THREADS, COMBINE_MIN_THREADS, MAX_SELECT_SLICES, SELECT_SLICE_BLOCKS,
    TILE_CTAS_PER_SM,
};
use super::*;
use tch::Device;

/// Valid inputs of a small step on the CPU: B 2, Hkv 2, 4 heads per group, dk 64, dv 32,
/// 40 raw slots, 16 compressed slots, a window ring of 8.
struct Case {
    q: Tensor,
    cmp_k: Tensor,
    cmp_v: Tensor,
    raw_k: Tensor,
    raw_v: Tensor,
    win_k: Tensor,
    win_v: Tensor,
    positions: Tensor,
    gates: Tensor,
    select: SelectParams,
    window: i64,
    max_position: i64,
    launch: DecodeLaunch,
}

impl Case {
    fn new() -> Self {
        let bf = (Kind::BFloat16, Device::Cpu);
        Case {
            q: Tensor::zeros([2, 2, 4, 64], bf),
            cmp_k: Tensor::zeros([2, 2, 16, 64], bf),
            cmp_v: Tensor::zeros([2, 2, 16, 32], bf),
            raw_k: Tensor::zeros([2, 2, 40, 64], bf),
            raw_v: Tensor::zeros([2, 2, 40, 32], bf),
            win_k: Tensor::zeros([2, 2, 8, 64], bf),
            win_v: Tensor::zeros([2, 2, 8, 32], bf),
            positions: Tensor::from_slice(&[30i64, 31]),
            gates: Tensor::zeros([2, 8, 3], bf),
            select: SelectParams {
                block_len: 8,
                stride: 4,
                select_len: 16,
                top_n: 4,
                n_local: 2,
                tap_first: -1,
                tap_step: 4,
                tap_weights: vec![1, 2, 2, 2, 1],
            },
            window: 8,
            max_position: 31,
            launch: DecodeLaunch::default(),
        }
    }

    fn step(&self) -> Result<DecodeStep, FusedError> {
        DecodeStep::new(
            DecodeInputs {
                q: &self.q,
                cmp_k: &self.cmp_k,
                cmp_v: &self.cmp_v,
                raw_k: &self.raw_k,
                raw_v: &self.raw_v,
                window: Some((&self.win_k, &self.win_v)),
                positions: &self.positions,
                gates: &self.gates,
                tickets: None,
            },
            DecodeParams {
                select: &self.select,
                window: self.window,
                scale: 0.125,
                max_position: self.max_position,
                launch: self.launch,
            },
        )
    }
}

fn input_error(case: &Case) -> (String, String) {
    match case.step() {
        Err(FusedError::Input { what, reason }) => (what.to_string(), reason),
        other => panic!("expected an input error, got {other:?}"),
    }
}

/// Valid inputs pass every check and stop only at the device: the kernels are CUDA-only.
#[test]
fn valid_inputs_on_the_cpu_stop_at_the_device() {
    let (what, reason) = input_error(&Case::new());
    assert_eq!(what, "q");
    assert!(reason.contains("CUDA tensors only"), "{reason}");
}

/// One change that makes a valid case invalid.
type Mutation<'a> = Box<dyn Fn(&mut Case) + 'a>;

/// Each kind of bad input is refused with an error that names it, before any launch.
#[test]
fn bad_inputs_get_typed_errors() {
    let bf = (Kind::BFloat16, Device::Cpu);
    let cases: Vec<(&str, &str, Mutation<'_>)> = vec![
        ("q", "dtype", Box::new(|c| c.q = c.q.to_kind(Kind::Half))),
        (
            "q",
            "[B, Hkv, h, dk]",
            Box::new(|c| c.q = Tensor::zeros([2, 8, 64], bf)),
        ),
        (
            "q",
            "dk in {64, 128, 192}",
            Box::new(|c| {
                c.q = Tensor::zeros([2, 2, 4, 32], bf);
                c.cmp_k = Tensor::zeros([2, 2, 16, 32], bf);
                c.raw_k = Tensor::zeros([2, 2, 40, 32], bf);
                c.win_k = Tensor::zeros([2, 2, 8, 32], bf);
            }),
        ),
        (
            "compressed keys",
            "contiguous",
            Box::new(|c| c.cmp_k = Tensor::zeros([2, 2, 64, 16], bf).transpose(2, 3)),
        ),
        (
            "raw values",
            "[2, 2, slots, 32]",
            Box::new(|c| c.raw_v = Tensor::zeros([2, 2, 40, 48], bf)),
        ),
        (
            "raw values",
            "slots differ",
            Box::new(|c| c.raw_v = Tensor::zeros([2, 2, 39, 32], bf)),
        ),
        ("window", "w = 16 slots, got 8", Box::new(|c| c.window = 16)),
        (
            "gates",
            "[2, 8, 3]",
            Box::new(|c| c.gates = Tensor::zeros([2, 8, 2], bf)),
        ),
        (
            "gates",
            "Float",
            Box::new(|c| c.gates = c.gates.to_kind(Kind::Float)),
        ),
        (
            "positions",
            "int64 [2]",
            Box::new(|c| c.positions = Tensor::from_slice(&[3i32, 4])),
        ),
        ("params", "n ≤ 32", Box::new(|c| c.select.top_n = 33)),
        (
            "params",
            "overlap taps",
            Box::new(|c| c.select.tap_weights.clear()),
        ),
        (
            "max_position",
            "does not fit",
            Box::new(|c| c.max_position = 40),
        ),
        (
            "tile_ctas",
            "at least 1",
            Box::new(|c| c.launch.tile_ctas = Some(0)),
        ),
        (
            "select_slices",
            "1 to 64",
            Box::new(|c| c.launch.select_slices = Some(0)),
        ),
        (
            "select_slices",
            "1 to 64",
            Box::new(|c| c.launch.select_slices = Some(MAX_SELECT_SLICES + 1)),
        ),
        (
            "max_position",
            "does not fit",
            Box::new(|c| {
                c.cmp_k = Tensor::zeros([2, 2, 4, 64], bf);
                c.cmp_v = Tensor::zeros([2, 2, 4, 32], bf);
            }),
        ),
    ];
    for (what, needle, mutate) in cases {
        let mut case = Case::new();
        mutate(&mut case);
        let (got_what, reason) = input_error(&case);
        assert_eq!(got_what, what, "{needle}: {reason}");
        assert!(
            reason.contains(needle),
            "{what}: expected {needle:?} in {reason:?}"
        );
    }
}

#[test]
fn tiles_per_cta_fill_the_device_once() {
    // The paper shape at 64k cached tokens on an H200: 64 compressed tiles per (b, g), 4 groups,
    // 132 SMs with 2 double-buffered CTAs each (105 KB of 228 KB).
    let resident = resident_ctas(104_960, 232_448, 132, 233_472);
    assert_eq!(resident, 264);
    assert_eq!(tiles_per_cta(64, 4, resident), 1); // batch 1: 256 CTAs of one tile
    assert_eq!(tiles_per_cta(64, 32, resident), 8); // batch 8: 256 CTAs of eight tiles
    assert_eq!(tiles_per_cta(24, 32, resident), 3);
    // Never more tiles than a (b, g) has, never fewer than one.
    assert_eq!(tiles_per_cta(5, 100_000, resident), 5);
    assert_eq!(tiles_per_cta(1, 100_000, resident), 1);
    assert_eq!(tiles_per_cta(0, 8, resident), 1);
    // A double-buffered CTA that does not fit: one tile per CTA.
    assert_eq!(resident_ctas(300_000, 232_448, 132, 233_472), 0);
    assert_eq!(tiles_per_cta(64, 32, 0), 1);
    // The selected and window tiles (16 and 8 per (b, g)) in CTAs of one branch: 3 tiles each
    // would take 6 + 3 CTAs per pair, 288 > 264; 4 take 4 + 2, 192.
    assert_eq!(branch_tiles_per_cta(16, 8, 32, resident), 4);
    assert_eq!(branch_tiles_per_cta(16, 8, 4, resident), 1); // batch 1: 96 CTAs
    assert_eq!(branch_tiles_per_cta(16, 8, 32, 0), 1);
    // Many pairs: one CTA per branch.
    assert_eq!(branch_tiles_per_cta(16, 8, 10_000, resident), 24);
    // More CTAs fit than the registers allow: capped.
    assert_eq!(
        resident_ctas(10_000, 232_448, 132, 233_472),
        132 * TILE_CTAS_PER_SM
    );
}

#[test]
fn selection_slices_fill_the_device_once() {
    // The paper shape at 64k cached tokens (1,024 selection blocks) on 132 SMs. Batch 8: 160
    // CTAs would fill the device, but slices hold at most SELECT_SLICE_BLOCKS: 16 of 64;
    // batch 1: 128 CTAs of a warp's chunk each.
    assert_eq!(select_slices(1024, 32, 132, 256), (16, SELECT_SLICE_BLOCKS));
    assert_eq!(select_slices(1024, 4, 132, 256), (32, 32));
    // Enough pairs to fill the device alone: still slices of at most SELECT_SLICE_BLOCKS.
    assert_eq!(select_slices(1024, 256, 132, 256), (16, 64));
    assert_eq!(select_slices(300, 256, 132, 256), (5, 64));
    // Blocks within one pass of a CTA's threads (16k cached tokens: 256 blocks): one CTA.
    assert_eq!(select_slices(256, 4, 132, 256), (1, 256));
    assert_eq!(select_slices(257, 4, 132, 256), (9, 32));
    assert_eq!(select_slices(1, 4, 132, 256), (1, 32));
    // Never more than MAX_SELECT_SLICES per pair.
    assert_eq!(select_slices(4096, 1, 132, 256), (MAX_SELECT_SLICES, 64));
}

#[test]
fn combine_takes_a_part_group_per_partial() {
    // The paper shape at 64k cached tokens: batch 1 has 64 + 16 + 8 partials per (b, g),
    // batch 8 has 8 + 4 + 2.
    assert_eq!(combine_parts(88, 128), (32, 1024));
    assert_eq!(combine_parts(14, 128), (14, 448));
    assert_eq!(combine_parts(1, 512), (1, 128));
    assert_eq!(combine_parts(500, 64), (64, 1024));
    // A warp per branch at least: three warps.
    assert_eq!(combine_parts(3, 16), (24, 96));
}

proptest::proptest! {
    /// The combine's CTA: dv / 4 threads per part group, COMBINE_MIN_THREADS to
    /// COMBINE_MAX_THREADS threads, a group per partial while they fit.
    #[test]
    fn combine_parts_fit_a_cta(parts in 1i64..10_000, dv4 in 1i64..=128) {
        let (groups, threads) = combine_parts(parts, 4 * dv4);
        proptest::prop_assert_eq!(threads, groups * dv4);
        proptest::prop_assert!((COMBINE_MIN_THREADS..=COMBINE_MAX_THREADS).contains(&threads));
        proptest::prop_assert!(groups >= parts.min(COMBINE_MAX_THREADS / dv4));
        if groups > parts {
            // Raised only to reach three warps.
            proptest::prop_assert!((groups - 1) * dv4 < COMBINE_MIN_THREADS);
        }
    }

    /// Every selection block in exactly one slice, slices of whole warp chunks, no more CTAs
    /// per (b, g) than asked for (clamped to 1 ..= MAX_SELECT_SLICES), and as many as asked
    /// while the blocks have a warp chunk for each.
    #[test]
    fn selection_slices_cover_every_block_once(nb in 1i64..200_000, ask in -4i64..100) {
        let (slices, per) = slices_of(nb, ask);
        let want = ask.clamp(1, MAX_SELECT_SLICES);
        proptest::prop_assert!(per >= 32 && per % 32 == 0);
        proptest::prop_assert!(slices >= 1 && slices <= want);
        proptest::prop_assert!((slices - 1) * per < nb && nb <= slices * per);
        if (nb + 31) / 32 >= want * want {
            // Enough chunks that rounding each slice up to whole chunks cannot drop one.
            proptest::prop_assert_eq!(slices, want);
        }
    }

    /// The device's pick: one CTA per (b, g) while a pass of its `threads` covers the blocks,
    /// else the slices that fill `sms` SMs once with `groups` (b, g) pairs, more where that
    /// leaves slices longer than SELECT_SLICE_BLOCKS.
    #[test]
    fn selection_slices_fill_the_device(
        nb in 1i64..200_000,
        groups in 1i64..2_000,
        sms in 1i64..300,
        threads in proptest::sample::select(vec![32i64, 256, 1024]),
    ) {
        let (slices, per) = select_slices(nb, groups, sms, threads);
        if nb <= threads {
            proptest::prop_assert_eq!((slices, per), slices_of(nb, 1));
        } else {
            let fill = (sms + groups - 1) / groups;
            if fill <= MAX_SELECT_SLICES && (nb + 31) / 32 >= fill * fill {
                // The device is filled once (where whole warp chunks allow it).
                proptest::prop_assert!(slices * groups >= sms);
            }
            if (nb + SELECT_SLICE_BLOCKS - 1) / SELECT_SLICE_BLOCKS <= MAX_SELECT_SLICES {
                proptest::prop_assert!(per <= SELECT_SLICE_BLOCKS);
            } else {
                proptest::prop_assert_eq!(slices, (nb + per - 1) / per);
                proptest::prop_assert!(slices <= MAX_SELECT_SLICES);
            }
        }
    }

    /// The selected/window launch's tiles per CTA: never fewer than tiles_per_cta's count over
    /// both branches, raised only while the two branches' partials overfill the resident CTAs,
    /// and then until they fit or a CTA takes a whole branch.
    #[test]
    fn branch_tiles_fit_the_resident_ctas(
        slc in 1i64..64,
        win in 1i64..64,
        groups in 1i64..1_000,
        resident in 0i64..1_000,
    ) {
        let tpc = branch_tiles_per_cta(slc, win, groups, resident);
        let base = tiles_per_cta(slc + win, groups, resident);
        let parts = |t: i64| (slc + t - 1) / t + (win + t - 1) / t;
        proptest::prop_assert!(tpc >= base);
        if tpc > base {
            proptest::prop_assert!(parts(tpc - 1) * groups > resident && tpc <= slc.max(win));
        }
        if resident > 0 {
            proptest::prop_assert!(parts(tpc) * groups <= resident || tpc >= slc.max(win));
        }
    }
}
