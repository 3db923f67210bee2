//! Input validation of the fused functions (runs on the CPU: every bad input is a typed error
//! before anything reaches a kernel), and, with a GPU, that the kernels load and a second load
//! of the same device is free.
use nsa_sys::fused::{self, FusedError};
use tch::{Device, Kind, Tensor};

fn backend() -> nsa_sys::cuda::CudaBackend {
    nsa_sys::cuda::load_backend().expect("libtorch backend")
}

fn is_input(r: Result<Tensor, FusedError>, what: &str) -> bool {
    match r {
        Err(FusedError::Input { what: w, .. }) => w.contains(what),
        _ => false,
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let backend = backend();
    let dev = if backend.has_gpu() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let o = (Kind::Float, dev);
    let (q, k, v) = (
        Tensor::zeros([1, 8, 4, 64], o),
        Tensor::zeros([1, 8, 2, 64], o),
        Tensor::zeros([1, 8, 2, 128], o),
    );
    let ids = Tensor::zeros([1, 8, 2, 3], (Kind::Int64, dev));
    let sel = |q: &Tensor, k: &Tensor, v: &Tensor, ids: &Tensor, l: i64| {
        fused::selected_attention(q, k, v, ids, l, 0.125)
    };
    if dev == Device::Cpu {
        // CPU tensors are refused by name.
        assert!(is_input(sel(&q, &k, &v, &ids, 4), "q"));
        assert!(is_input(fused::window_attention(&q, &k, &k, 4, 0.125), "q"));
        return;
    }
    assert!(is_input(sel(&q.to_kind(Kind::Half), &k, &v, &ids, 4), "q"));
    assert!(is_input(
        sel(&q, &k, &v, &ids.to_kind(Kind::Float), 4),
        "blocks"
    ));
    assert!(is_input(sel(&q, &k, &v, &ids.narrow(1, 0, 7), 4), "blocks"));
    assert!(is_input(
        sel(&q, &k.narrow(2, 0, 1).repeat([1, 1, 3, 1]), &v, &ids, 4),
        "k"
    ));
    assert!(is_input(sel(&q.transpose(1, 2), &k, &v, &ids, 4), "q"));
    assert!(is_input(sel(&q, &k, &v, &ids, 0), "block_len"));
    assert!(is_input(
        sel(&q, &k, &v, &ids.to_device(Device::Cpu), 4),
        "blocks"
    ));
    // fp32 window: not flash's dtype; dv > dk: not the kernels' shape; dk not a multiple of 8;
    // a window of no keys.
    assert!(is_input(fused::window_attention(&q, &k, &k, 4, 0.125), "q"));
    let b = |t: &Tensor| t.to_kind(Kind::BFloat16);
    assert!(is_input(
        fused::window_attention(&b(&q), &b(&k), &b(&v), 4, 0.125),
        "q, v"
    ));
    let odd = |t: &Tensor| b(&t.narrow(3, 0, 60)).contiguous();
    assert!(is_input(
        fused::window_attention(&odd(&q), &odd(&k), &odd(&k), 4, 0.125),
        "q, v"
    ));
    assert!(is_input(
        fused::window_attention(&b(&q), &b(&k), &b(&k), 0, 0.125),
        "window"
    ));
}

#[test]
#[ignore = "needs a CUDA device"]
fn kernels_load_once_per_device_through_the_cache() {
    assert!(backend().has_gpu());
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    fused::configure(fused::FusedOptions {
        cache_dir: Some(dir.clone()),
    });
    let a = fused::kernels(0).expect("compile and load");
    let b = fused::kernels(0).unwrap();
    assert!(std::ptr::eq(a, b), "loaded once per device");
    assert!(a.max_shared_memory() >= 48 * 1024);
    assert!(
        std::fs::read_dir(&dir).unwrap().count() >= 2,
        "both families cached"
    );
}

fn host_i64(t: &Tensor) -> Vec<i64> {
    let t = t.to_kind(Kind::Int64).contiguous().view([-1]);
    let n = t.numel();
    let mut v = vec![0i64; n];
    t.copy_data(&mut v, n);
    v
}

/// The ids the selected kernels read (CPU: libtorch's operators; `check --gpu` compares the
/// CUDA kernel with them): distinct ids inside the token's blocks and the keys, descending,
/// then -1, whatever the input order, duplicates or range.
#[test]
fn clean_block_ids_keep_distinct_valid_ids_descending() {
    backend();
    // [B 1, S 6, G 1, n 3], l' = 4: tokens 0..3 see block 0, tokens 4, 5 blocks 0 and 1.
    let rows: [[i64; 3]; 6] = [
        [1, 1, 0],
        [0, 0, 0],
        [-1, 7, 0],
        [0, 1, 2],
        [1, 1, 0],
        [0, 1, 1 << 40],
    ];
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    let blocks = Tensor::from_slice(&flat).reshape([1, 6, 1, 3]);
    let want: Vec<i64> = vec![
        0, -1, -1, 0, -1, -1, 0, -1, -1, 0, -1, -1, 1, 0, -1, 1, 0, -1,
    ];
    for kind in [Kind::Int64, Kind::Int] {
        let got =
            fused::clean_block_ids(&blocks.clamp_max(i64::from(i32::MAX)).to_kind(kind), 4, 6)
                .unwrap();
        assert_eq!(got.kind(), Kind::Int);
        assert_eq!(host_i64(&got), want);
    }
    // Fewer keys than tokens: only block 0 exists; no keys: nothing is valid.
    let got = host_i64(&fused::clean_block_ids(&blocks, 4, 3).unwrap());
    assert_eq!(got, [0, -1, -1].repeat(6));
    let got = host_i64(&fused::clean_block_ids(&blocks, 4, 0).unwrap());
    assert_eq!(got, vec![-1; 18]);
    assert!(matches!(
        fused::clean_block_ids(&blocks, 0, 6),
        Err(FusedError::Input { .. })
    ));
}

/// The backward's inverse index (CPU; the same ATen code runs on the GPU): every segment
/// (b, g, j) lists exactly the tokens whose cleaned ids contain j, ascending, for random ids
/// with duplicates and out-of-range values; segments counted in int16 keys (all but the last
/// case) and in int32 keys (33,000 segments).
#[test]
fn inverse_index_lists_each_blocks_tokens_in_order() {
    backend();
    for (seed, (b, s, g, n, l)) in [
        (1, 3, 1, 1, 1),
        (2, 37, 3, 4, 5),
        (1, 64, 2, 6, 16),
        (2, 9, 1, 3, 16),
        (1, 33_000, 1, 2, 1),
    ]
    .into_iter()
    .enumerate()
    {
        tch::manual_seed(seed as i64);
        let nb = (s + l - 1) / l;
        let blocks = Tensor::randint_low(-3, nb + 3, [b, s, g, n], (Kind::Int64, Device::Cpu));
        let (tokens, starts) = fused::inverse_index(&blocks.to_kind(Kind::Int), l).unwrap();
        assert_eq!(tokens.kind(), Kind::Int);
        let (tokens, starts, ids) = (host_i64(&tokens), host_i64(&starts), host_i64(&blocks));
        assert_eq!(starts.len() as i64, b * g * nb + 1);
        // Sized by the shapes (no host synchronisation): the index, then padding.
        assert_eq!(tokens.len() as i64, b * s * g * n);
        assert!(*starts.last().unwrap() as usize <= tokens.len());
        // Each segment's tokens, from one pass over the rows (t ascending within a segment).
        let mut want = vec![Vec::new(); (b * g * nb) as usize];
        for bi in 0..b {
            for t in 0..s {
                for gi in 0..g {
                    let row = (((bi * s + t) * g + gi) * n) as usize;
                    let mut seen = Vec::new();
                    for &j in &ids[row..row + n as usize] {
                        if (0..=t / l).contains(&j) && j < nb && !seen.contains(&j) {
                            seen.push(j);
                            want[((bi * g + gi) * nb + j) as usize].push(t);
                        }
                    }
                }
            }
        }
        for (i, want) in want.iter().enumerate() {
            let got = &tokens[starts[i] as usize..starts[i + 1] as usize];
            assert_eq!(got, want.as_slice(), "segment {i}");
        }
    }
    assert!(matches!(
        fused::inverse_index(&Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu)), 4),
        Err(FusedError::Input { .. })
    ));
}

/// The exact dK/dV plan of segment sizes `sizes` with pieces of at most `piece` tokens (the
/// rule the device-built plan must reproduce as its real prefix): work items `(seg, a, b,
/// slot)` and split segments `(seg, first slot, pieces)`.
type ExactPlan = (Vec<[i64; 4]>, Vec<[i64; 3]>);
fn exact_plan(sizes: &[i64], piece: i64) -> ExactPlan {
    let (mut items, mut red) = (Vec::new(), Vec::new());
    let (mut start, mut next_slot) = (0, 0);
    for (s, &size) in sizes.iter().enumerate() {
        let pieces = ((size + piece - 1) / piece).max(1);
        if pieces > 1 {
            red.push([s as i64, next_slot, pieces]);
        }
        for p in 0..pieces {
            let a = start + p * piece;
            let slot = if pieces > 1 {
                next_slot += 1;
                next_slot - 1
            } else {
                -1
            };
            items.push([s as i64, a, (a + piece).min(start + size), slot]);
        }
        start += size;
    }
    (items, red)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// The dK/dV work plan (CPU; the same ATen code runs on the GPU), built from the shapes'
    /// bound without reading the data's sizes: its real items are the exact plan's, in order
    /// (each segment cut into consecutive pieces of at most `piece` tokens; single-piece
    /// segments write directly, slot -1; split ones own consecutive scratch slots listed once
    /// in the reduce arrays), the rest is padding (segment -1), and the bounds hold.
    #[test]
    fn dkdv_plan_cuts_every_segment_into_ordered_pieces(
        sizes in proptest::collection::vec(
            proptest::prop_oneof![0i64..3, 0i64..40],
            1..24,
        ),
        piece in 1i64..12,
        slack in 0i64..30,
    ) {
        backend();
        let mut starts = vec![0i64];
        for s in &sizes {
            starts.push(starts.last().unwrap() + s);
        }
        let entries = starts.last().unwrap() + slack;
        let plan = fused::dkdv_plan(&Tensor::from_slice(&starts), piece, entries).unwrap();
        let (items, red) = exact_plan(&sizes, piece);
        let nseg = sizes.len() as i64;
        let (seg, a, b, slot) =
            (host_i64(&plan.seg), host_i64(&plan.a), host_i64(&plan.b), host_i64(&plan.slot));
        proptest::prop_assert_eq!(seg.len() as i64, nseg + entries / piece);
        proptest::prop_assert!(items.len() <= seg.len());
        for (w, item) in items.iter().enumerate() {
            proptest::prop_assert_eq!([seg[w], a[w], b[w], slot[w]], *item, "work item {}", w);
        }
        for w in items.len()..seg.len() {
            proptest::prop_assert_eq!([seg[w], a[w], b[w], slot[w]], [-1, 0, 0, -1]);
        }
        let (red_seg, red_slot0, red_count) =
            (host_i64(&plan.red_seg), host_i64(&plan.red_slot0), host_i64(&plan.red_count));
        proptest::prop_assert!(red.len() <= red_seg.len());
        for (r, want) in red.iter().enumerate() {
            proptest::prop_assert_eq!([red_seg[r], red_slot0[r], red_count[r]], *want);
        }
        proptest::prop_assert!(red_seg[red.len()..].iter().all(|&s| s == -1));
        let used = items.iter().filter(|i| i[3] >= 0).count() as i64;
        proptest::prop_assert!(used <= plan.slots, "{} slots used, {} allocated", used, plan.slots);
    }
}

#[test]
fn dkdv_plan_rejects_bad_arguments() {
    backend();
    let starts = Tensor::from_slice(&[0i64, 3, 5]);
    assert!(fused::dkdv_plan(&starts, 0, 5).is_err());
    assert!(fused::dkdv_plan(&starts, 2, -1).is_err());
}
